"""steerlm.files: outputs appear whole or not at all, and what an interrupted writer left is cleaned up."""

import subprocess
import sys

import pytest

from steerlm.files import remove_stale, staged_dir, write_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staged_dir_replaces_the_output_only_on_success(tmp_path):
    out = tmp_path / "ckpt"
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "config.json").write_text('{"half": true}')
            raise RuntimeError("killed")
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_next_writer_removes_partials_of_a_dead_writer_only(tmp_path):
    out = tmp_path / "ckpt"
    stale = tmp_path / f".ckpt.partial-{_dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "rank0.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".ckpt.partial-{subprocess.os.getpid()}-cafe0000"
    live.mkdir()
    user = tmp_path / ".ckpt.partial-notes"  # not ours: no writer PID in the name
    user.mkdir()
    with staged_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists()
    assert live.exists() and user.exists()


def test_write_atomic_leaves_no_temporary_behind(tmp_path):
    path = write_atomic(tmp_path / "a" / "b.json", "{}")
    assert path.read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]
    assert remove_stale(path) == []
