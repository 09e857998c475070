"""Files written whole or not at all: each write goes to a new, uniquely named file beside its target, which
is renamed over the target once complete. A failed or interrupted write leaves the target as it was, and two
writers of one path never share a temporary file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A new empty file beside `path` for the block to write and rename; removed if still there after it.
    It has the mode the umask gives new files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror}") from err
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)`, then tmp renamed over `path`, with the umask's mode (the mode is read off the new file:
    os.umask cannot read the mask without setting it; and some writers, safetensors among them, make their
    file 0600, unreadable by the container's user)."""
    with temporary_beside(path) as tmp:
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        tmp.chmod(mode)
        os.replace(tmp, path)
