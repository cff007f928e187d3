"""Files a run writes, written so that a crash never leaves a half-written one in place.

Files go to a temporary name in the same directory, are fsynced, then renamed over the target (atomic on
POSIX); directories are built under a temporary name and renamed the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from minioprd.errors import MinioprdError


def home() -> Path:
    """minioprd's cache: `$MINIOPRD_HOME`, default `~/.cache/minioprd` (builtin models, demo models)."""
    return Path(os.environ.get("MINIOPRD_HOME", Path.home() / ".cache" / "minioprd"))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise MinioprdError(f"could not write {path}: {e.strerror or e} (is the disk full?); "
                            f"earlier files are untouched") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` (the old one is removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise MinioprdError(f"could not write {path}: {e.strerror or e} (is the disk full?); "
                            f"the previous version is kept") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_once(target: str | Path, build: Callable[[Path], object], marker: str = "config.json") -> Path:
    """A cached directory built at most once: `build(dir)` writes into a temporary sibling (a path that does not
    exist yet) that is renamed to `target`; `target/marker` says it is complete. When two processes build at
    once the first rename wins and the other's copy is dropped (theirs is as good as ours); a crash leaves only
    a hidden temporary directory behind, never a half-built `target`."""
    target = Path(target)
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        work = tmp / "out"
        build(work)
        try:
            os.replace(work, target)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON object per line, flushed and fsynced so a killed run keeps every finished step."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything before it is good
    return out
