"""steerlm.convert.stream: incrementally written safetensors files are ordinary safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steerlm.convert.stream import CheckpointReader, StreamingWriter


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b.half": torch.randn(7).half(),
        "c.bf16": torch.randn(2, 2, 2).bfloat16(),
        "d.fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "e.empty": torch.empty(0, 3),
    }
    layout = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with StreamingWriter(tmp_path / "x.safetensors", layout, {"format": "pt"}) as w:
        for name, t in tensors.items():
            w.write(name, t)
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].view(torch.uint8), t.view(torch.uint8))
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_refuses_tensors_out_of_order_or_of_the_wrong_shape(tmp_path):
    layout = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    w = StreamingWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(ValueError, match="expected tensor 'a' next"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", torch.zeros(3))
    w.abort()


def test_closing_before_every_tensor_is_written_is_an_error(tmp_path):
    w = StreamingWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32), ("b", (1,), torch.float32)])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="never written, first 'b'"):
        w.close()


def test_reader_finds_tensors_across_index_shards(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "m1.safetensors"))
    save_file({"y": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "m2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "m1.safetensors", "y": "m2.safetensors"}})
    )
    r = CheckpointReader(tmp_path)
    assert r.shape("y") == (3,) and r.dtype("y") == torch.bfloat16 and torch.equal(r.get("x"), torch.ones(2))
    with pytest.raises(KeyError, match="no tensor 'z'"):
        r.get("z")
