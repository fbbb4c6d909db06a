"""Whole files or none: the one way turbofed replaces a file it keeps (agent state,
checkpoints, fleet identities).

A temporary file beside the target (created 0600 by `mkstemp`, so a key is never readable by
others, even for a moment) is written, fsynced, given its final mode and renamed over the
target; then the folder is fsynced so the rename itself survives a power cut. On any failure
the temporary file is removed and the old file is left as it was: a full disk leaves no
half-written state and no stray temporary files behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` (with `mode`) when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """`data` replaces `path` whole, or `path` is left as it was."""
    with atomic_file(path, mode) as handle:
        handle.write(data)
