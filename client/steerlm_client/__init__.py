"""Python client for a SteerLM Triton server (the `steerlm` ensemble and the `reward_model` model).

    from steerlm_client import SteerClient
    client = SteerClient("localhost:8001")                     # gRPC; SteerClient("localhost:8000", "http")
    print(client.generate("Where did techno originate?", attributes={"verbosity": 4}, max_tokens=128))
    for piece in client.stream("And when?", attributes="verbosity:1"):
        print(piece, end="", flush=True)

Needs only tritonclient and numpy, not the steerlm package."""

from steerlm_client.client import Completion, SteerClient, SteerError, StreamedAnswer

__all__ = ["Completion", "SteerClient", "SteerError", "StreamedAnswer"]
