"""Telling a full or read-only disk from any other failure, so the aggregator can wait
for space instead of crashing (docs/operations.md, "Full or read-only disk")."""

from __future__ import annotations

import errno
import os
import sqlite3

_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
_SQLITE_MESSAGES = {"disk is full": "disk full", "readonly database": "read-only", "disk i/o error": "disk I/O error"}


def disk_problem(exc: BaseException) -> str | None:
    """'disk full (No space left on device)', 'read-only file system (...)' and the like,
    or None when `exc` is not about the disk refusing a write."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return f"{_DISK_ERRNOS[exc.errno]} ({exc.strerror or os.strerror(exc.errno)})"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        for needle, what in _SQLITE_MESSAGES.items():
            if needle in text:
                return f"{what} ({exc})"
    cause = exc.__cause__ or exc.__context__
    return disk_problem(cause) if cause is not None and cause is not exc else None
