"""Streaming safetensors I/O: read one tensor at a time from (sharded) checkpoints, write files incrementally.

The safetensors library only writes whole dicts of tensors, which would put every tensor of a rank
in memory at once. The format itself is simple enough to stream (little-endian u64 header length,
JSON header with each tensor's dtype, shape and byte range, then the raw bytes back to back), so
`StreamingWriter` computes the header from shapes and dtypes up front and then appends tensor bytes
as they are produced. Peak memory is then the largest tensor in flight, not the model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class StreamingWriter:
    """Writes one safetensors file whose tensors are declared up front and then written in that order.

    `layout` is a sequence of (name, shape, dtype). `write()` must be called once per tensor, in the
    declared order, with a tensor of exactly the declared shape and dtype; `close()` checks that all
    were written. Anything else raises, so a mismatch can never produce a file that parses but lies.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._layout = [(name, tuple(int(d) for d in shape), dtype) for name, shape, dtype in layout]
        names = [name for name, _, _ in self._layout]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names in layout")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, shape, dtype in self._layout:
            if dtype not in DTYPE_CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        # Pad the header with spaces so tensor data starts 8-byte aligned, as the reference writer does.
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise ValueError(f"{self.path}: unexpected tensor {name!r}; all declared tensors are written")
        want_name, want_shape, want_dtype = self._layout[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {want_shape} {want_dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises if any declared tensor was never written."""
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._layout):
            missing = [n for n, _, _ in self._layout[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} declared tensors never written, first {missing[0]!r}")

    def abort(self) -> None:
        self._file.close()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CheckpointReader:
    """Random access to the tensors of a Hugging Face safetensors checkpoint, one tensor at a time.

    Handles a single `model.safetensors` and sharded checkpoints described by
    `model.safetensors.index.json`. Only the requested tensor is materialised.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.model_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._files = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.model_dir}: no model.safetensors or model.safetensors.index.json "
                "(convert .bin checkpoints with save_pretrained(safe_serialization=True) first)"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        try:
            path = self._files[name]
        except KeyError:
            raise KeyError(f"{self.model_dir}: checkpoint has no tensor {name!r}") from None
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with safe_open(self._files[name], framework="pt") as f:
            return CODE_DTYPES[f.get_slice(name).get_dtype()]

