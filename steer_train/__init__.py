"""steer_train: the four SteerLM steps (reward model, annotation, attribute-conditioned SFT, bootstrap)."""
