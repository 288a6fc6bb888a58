"""Outputs appear whole or not at all: write beside the target, flush it to disk (fsync), then
rename into place and flush the folder that holds the name, so that after a crash or a power loss
a path holds the old output or the new one, never a renamed folder of empty files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: the renames inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _sync(Path(folder) / name)
        _sync(Path(folder))


def remove_stale(path: Path) -> None:
    """Clean up after a process killed while writing `path` (kill -9 runs no cleanup): its
    `.<name>.tmp-<pid>` is deleted; its `.<name>.old-<pid>` (the previous output, moved aside
    just before the new one moved in) is put back if `path` is missing, else deleted."""
    for stale in sorted(path.parent.glob(f".{path.name}.*-*")):
        kind, _, pid = stale.name.rpartition("-")
        if not (kind.endswith((".tmp", ".old")) and pid.isdigit()) or _alive(int(pid)):
            continue
        if kind.endswith(".old") and not path.exists():
            stale.rename(path)
        elif stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_tree(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _sync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync(tmp)
    os.replace(tmp, path)
    _sync(path.parent)


def write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows) -> None:
    """One JSON object per line."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
