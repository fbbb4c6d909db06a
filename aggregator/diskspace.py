"""A full or read-only disk is a state to wait out, not a crash (docs/operations.md, "Full
or read-only disk"): telling it from any other failure (`disk_problem`), retrying a write
while saying so once per interval (`DiskWatch`), and starting with a full registry folder
(`check_registry_folder`)."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from turbofed.errors import ConfigError
from turbofed.ratelog import Throttle

log = logging.getLogger("turbofed.aggregator")

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


class DiskWatch:
    """A write the disk refuses is retried, not fatal: one ERROR line per interval ("<what>:
    disk full (...); <held>"), a "disk_full" event when it starts and "disk_ok" when it ends."""

    def __init__(self, record_event: Callable[[str, dict[str, Any]], None], log_interval_s: float) -> None:
        self.refusing: str | None = None  # what the disk refuses writes to, while it does
        self._record = record_event
        self._log = Throttle(log_interval_s)

    def until_written(self, what: str, write: Callable[[], object], wait: Callable[[], bool], held: str,
                      detail: dict[str, Any]) -> bool:
        """`write` until it works (True); `wait` between tries returns False to give up."""
        while True:
            try:
                write()
            except Exception as exc:
                problem = disk_problem(exc)
                if problem is None:
                    raise
                if self._log.allow(what) is not None:
                    log.error("%s: %s; %s", what, problem, held)
                if self.refusing != what:
                    self.refusing = what
                    self._record("disk_full", {"what": what, "problem": problem, **detail})
                if not wait():
                    return False
                continue
            if self.refusing is not None:
                log.info("%s is writable again", self.refusing)
                self._record("disk_ok", {"what": self.refusing, **detail})
                self.refusing = None
            return True


def check_registry_folder(folder: str) -> None:
    """The registry folder must exist and be ours to write; a full disk is not a reason to
    stop (reading is enough to resume; commits wait for room), so it is only said."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"x")  # a byte, not just a name: a full disk still has inodes
            probe.flush()
    except OSError as exc:
        problem = disk_problem(exc)
        if problem is None or exc.errno == errno.EROFS and not path.is_dir():
            raise ConfigError(f"registry {str(path)!r} is not a writable folder: {exc.strerror or exc}") from None
        log.warning("registry folder %s: %s; starting anyway (reading is enough to resume), rounds wait for room", path, problem)
