"""steer_eval: how well a SteerLM model steers (eval), how well a reward model predicts (rm-eval), and the CPU demo.

Evaluation uses training's data readers and loops (the demo trains); training never imports this package.
"""
