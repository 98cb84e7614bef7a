"""Send raw numpy tensors to one model over gRPC streaming, as stock Triton clients do (no steerlm_client)."""

from __future__ import annotations

import numpy as np


def stream_infer(url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> list:
    """The (result, error) pairs of one streamed request made of exactly these inputs, in arrival order."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, arr in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        tensors.append(t)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    results = []
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    client.async_stream_infer(model, tensors, outputs=requested)
    client.stop_stream()
    client.close()
    return results
