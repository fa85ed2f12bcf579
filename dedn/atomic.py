"""Atomic file writes: every file `dedn` writes goes to a temporary name beside its target and is
renamed into place, so a crash or a full disk never leaves a half-written file under the real name.

One helper for all writers (dataset manifests, checkpoints, tables, plots, predictions), and
`file_lock` for work that two processes must not do at once (creating a new sqlite store).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dedn.errors import OutputError, os_reason

__all__ = ["atomic_path", "output_errors", "write_text", "write_bytes", "save_figure", "file_lock"]


@contextmanager
def output_errors(path: str | os.PathLike[str], *work: str | os.PathLike[str]) -> Iterator[None]:
    """Inside the block, an OSError of the output (full disk, read-only or blocked location) becomes
    an OutputError naming `path`. `work`: folders the writer owns (its temporary folder). An
    OSError about another file (an input) passes unchanged."""
    target = Path(path)
    owned = [Path(w) for w in work]

    def ours(name: object) -> bool:  # the target, a file beside it (its temporary), a folder above it, or owned
        q = Path(os.fsdecode(name))  # type: ignore[arg-type]
        return q.parent == target.parent or target.is_relative_to(q) or any(q.is_relative_to(w) for w in owned)

    try:
        yield
    except OSError as e:
        names = [n for n in (e.filename, e.filename2) if n is not None]
        if names and not any(ours(n) for n in names):
            raise
        other = [os.fsdecode(n) for n in names if Path(os.fsdecode(n)) != target]
        raise OutputError(target, os_reason(e) + (f": {other[0]}" if other else "")) from None


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds.

    The temporary file is removed when the block raises. `suffix` keeps the file type for
    writers that infer it from the name (matplotlib: ".png"). Parent folders are created. A
    location that cannot be written is an OutputError naming `path`.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        with output_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, target)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the parent is not a folder: nothing was written
            pass


def write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` atomically; `fsync` flushes it to disk before the rename (manifests)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write UTF-8 `text` atomically."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it (also when saving fails)."""
    import matplotlib.pyplot as plt  # heavy: only callers that draw pay for it

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock), held for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
