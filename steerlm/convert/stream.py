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
import mmap
import os
import struct
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

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
WRITE_BLOCK = 8 << 20  # bytes gathered per write for tensors that are not contiguous in memory
Tensor = torch.Tensor
Rows = Sequence[torch.Tensor]  # one tensor given as parts to concatenate along dim 0 (fused q/k/v)


def shape_dtype(tensor: Tensor | Rows) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of a tensor, or of the concatenation along dim 0 of row parts of one dtype."""
    if isinstance(tensor, torch.Tensor):
        return tuple(tensor.shape), tensor.dtype
    first = tensor[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in tensor):
        raise ValueError("row parts differ in dtype or in their trailing dimensions")
    return (sum(p.shape[0] for p in tensor), *first.shape[1:]), first.dtype


def joined(tensor: Tensor | Rows) -> torch.Tensor:
    """The tensor, or its row parts concatenated, contiguous: as a file holds it."""
    return (tensor if isinstance(tensor, torch.Tensor) else torch.cat(list(tensor), dim=0)).contiguous()


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
        self._file = open(self.path, "wb", buffering=0)  # every write is large; no user-space buffer
        self._write_all(memoryview(struct.pack("<Q", len(raw)) + raw))
        self._next = 0
        self._buffer: np.ndarray | None = None

    def write(self, name: str, tensor: Tensor | Rows) -> None:
        """Append the next declared tensor; a sequence of tensors stands for their concatenation along dim 0."""
        if self._next >= len(self._layout):
            raise ValueError(f"{self.path}: unexpected tensor {name!r}; all declared tensors are written")
        want_name, want_shape, want_dtype = self._layout[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        shape, dtype = shape_dtype(tensor)
        if shape != want_shape or dtype != want_dtype:
            raise ValueError(f"{self.path}: tensor {name!r} is {shape} {dtype}, declared {want_shape} {want_dtype}")
        for part in [tensor] if isinstance(tensor, torch.Tensor) else tensor:
            self._write_part(part.detach().to("cpu"))
        self._next += 1

    def _write_part(self, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        if t.is_contiguous():
            span = _source_span(t)
            if span is not None:
                # Bytes unchanged from a source file (same dtype, whole tensor or a row shard): the kernel copies
                # them file to file, as a plain copy does, without mapping them into this process.
                self._send_all(*span, t.numel() * t.element_size())
            else:
                self._write_all(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            return
        if t.dim() < 2 or t.stride(-1) != 1:
            self._write_all(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            return
        # A column shard: gather a block of rows at a time into one reused buffer, so no shard-sized copy
        # (and no page faults on fresh memory for it) is made. numpy copies the bytes on this thread: a memory
        # copy gains little from torch's thread pool, whose start-up per call dominates on busy cores.
        rows = t.reshape(t.shape[0], -1).view(torch.uint8).numpy()  # bytes of each row's slice
        step = max(1, WRITE_BLOCK // rows.shape[1])
        if self._buffer is None or self._buffer.size < step * rows.shape[1]:
            self._buffer = np.empty(step * rows.shape[1], dtype=np.uint8)
        for i in range(0, rows.shape[0], step):
            block = rows[i : i + step]
            out = self._buffer[: block.size].reshape(block.shape)
            np.copyto(out, block)
            self._write_all(memoryview(out).cast("B"))

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[self._file.write(view):]

    def _send_all(self, path: Path, offset: int, count: int) -> None:
        with open(path, "rb", buffering=0) as src:
            while count:
                sent = os.sendfile(self._file.fileno(), src.fileno(), offset, count)
                if sent == 0:
                    raise ValueError(f"{path}: ends before byte {offset + count} (file changed while converting?)")
                offset, count = offset + sent, count - sent

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


# Storage address of each tensor `CheckpointReader.get` mapped that is still alive -> (file, offset of its first
# byte). An entry is removed when its mapping is, so an address reused by a later allocation is never mistaken.
_MAPPED: dict[int, tuple[Path, int]] = {}


def _source_span(t: torch.Tensor) -> tuple[Path, int] | None:
    """(file, offset) of a contiguous tensor whose bytes lie unchanged in a checkpoint file, else None."""
    storage = t.untyped_storage()
    where = _MAPPED.get(storage.data_ptr())
    if where is None or not t.is_contiguous():
        return None
    return where[0], where[1] + t.data_ptr() - storage.data_ptr()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CheckpointReader:
    """Random access to the tensors of a Hugging Face safetensors checkpoint, one tensor at a time.

    Handles a single `model.safetensors` and sharded checkpoints described by
    `model.safetensors.index.json`. Headers are read once; `get` maps only the requested tensor's bytes.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            files = sorted({self.model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif single.is_file():
            files = [single]
        else:
            raise FileNotFoundError(
                f"{self.model_dir}: no model.safetensors or model.safetensors.index.json "
                "(convert .bin checkpoints with save_pretrained(safe_serialization=True) first)"
            )
        self._entries: dict[str, _Entry] = {}
        for path in files:
            self._entries.update(read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> "_Entry":
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.model_dir}: checkpoint has no tensor {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by a read-only mapping of its bytes in the file: no copy is made, so a
        caller must not modify it in place. The mapping lives as long as the tensor does."""
        e = self._entry(name)
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        start = e.offset - e.offset % mmap.ALLOCATIONGRANULARITY
        with open(e.path, "rb") as f:
            # MAP_POPULATE maps every page at once: faulting them in 4 KiB at a time costs more than the copy.
            region = mmap.mmap(f.fileno(), e.offset + e.nbytes - start, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                               prot=mmap.PROT_READ, offset=start)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(region, dtype=torch.uint8, count=e.nbytes, offset=e.offset - start)
        ptr = raw.untyped_storage().data_ptr()
        _MAPPED[ptr] = (e.path, e.offset)
        # The tensor's storage holds the mapping; when the last view goes, so do the mapping and this entry.
        weakref.finalize(region, _MAPPED.pop, ptr, None)
        return raw.view(e.dtype).reshape(e.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype


@dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int  # of the first byte, from the start of the file
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: str | os.PathLike) -> dict[str, _Entry]:
    """Where each tensor of one safetensors file lies: a little-endian u64 header length, the JSON header,
    then the data, whose `data_offsets` count from the end of the header."""
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = CODE_DTYPES[info["dtype"]]
        except KeyError:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, not one of "
                             f"{', '.join(CODE_DTYPES)}") from None
        begin, end = info["data_offsets"]
        entries[name] = _Entry(path, 8 + length + begin, end - begin, tuple(info["shape"]), dtype)
    return entries
