"""Writes that appear complete or not at all, for every tool in the package.

A file or directory is built under a hidden temporary name beside its target and renamed into place, so a
crash, a kill or Ctrl-C never leaves a valid-looking partial output. A temporary name carries the writer's
PID, so the next writer of the same target removes what an interrupted one left behind (only those hidden
names, never anything a user made).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hidden(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of `target` whose writer process is gone; returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("partial", "old", "tmp"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            parts = path.name[len(f".{target.name}.{kind}-"):].split("-")
            if not parts[0].isdigit() or _pid_alive(int(parts[0])):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a hidden temporary beside `path` for writing; it replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _hidden(path, "tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def staged_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden directory next to `output_dir`; it replaces `output_dir` on success, is removed on any error."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output_dir)
    tmp = _hidden(output_dir, "partial")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory `src` at `dst`; an existing `dst` is moved aside first, so it is never half-replaced."""
    if dst.exists():
        old = _hidden(dst, "old")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)
