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


def test_reader_returns_every_dtype_and_shape_as_safetensors_does(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 2).bfloat16(),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(0.25),
        "empty": torch.empty(0, 3),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = CheckpointReader(tmp_path)
    for name, want in load_file(tmp_path / "model.safetensors").items():
        got = r.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape and r.shape(name) == tuple(want.shape)
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_row_parts_and_column_slices_are_written_as_the_tensor_they_stand_for(tmp_path, monkeypatch):
    from steerlm.convert import stream

    monkeypatch.setattr(stream, "WRITE_BLOCK", 64)  # many blocks per column slice
    w = torch.randn(40, 12)
    q, k = torch.randn(6, 4).half(), torch.randn(2, 4).half()
    layout = [("cols", (40, 5), torch.float32), ("qk", (8, 4), torch.float16)]
    with StreamingWriter(tmp_path / "x.safetensors", layout) as writer:
        writer.write("cols", w[:, 3:8])
        writer.write("qk", [q, k])
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["cols"], w[:, 3:8]) and torch.equal(back["qk"], torch.cat([q, k]))


def test_unchanged_source_bytes_are_copied_file_to_file(tmp_path, monkeypatch):
    from steerlm.convert import stream

    sent = []
    real_sendfile = stream.os.sendfile
    monkeypatch.setattr(stream.os, "sendfile", lambda *a: sent.append(a[3]) or real_sendfile(*a))
    src = torch.randn(8, 4)
    save_file({"w": src}, str(tmp_path / "model.safetensors"))
    w = CheckpointReader(tmp_path).get("w")
    layout = [("rows", (4, 4), torch.float32), ("double", (8, 4), torch.float32)]
    with StreamingWriter(tmp_path / "x.safetensors", layout) as writer:
        writer.write("rows", w[4:])  # a row shard: bytes as they are in the file
        writer.write("double", w * 2)  # computed: written from memory
    back = load_file(tmp_path / "x.safetensors")
    assert sum(sent) == 4 * 4 * 4
    assert torch.equal(back["rows"], src[4:]) and torch.equal(back["double"], src * 2)
