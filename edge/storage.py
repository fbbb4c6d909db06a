"""Whether the state folder still takes saves: a full or read-only disk is a state the agent
runs in, not a crash.

A failed save leaves every previous file whole (turbofed.files writes a temporary file and
removes it on failure); the agent keeps predicting and serving from memory, says so in one
rate-limited line and in its Status (`storage`), and tries again at the next save, so saves
resume by themselves when space returns.
"""

from __future__ import annotations

import errno
import logging

from turbofed.ratelog import RateLimitedLog

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_problem(exc: OSError) -> str:
    """The Status.storage word for a failed write: "full", "read-only" or "error"."""
    if exc.errno in FULL:
        return "full"
    if exc.errno in READ_ONLY:
        return "read-only"
    return "error"


class StorageWatch:
    """The state folder's condition, from the outcome of each save."""

    def __init__(self, site: str, folder: object, logger: logging.Logger) -> None:
        self.site, self.folder, self.log = site, folder, logger
        self.state = "ok"
        self.failed_saves = 0
        self._warn = RateLimitedLog(logger)

    def failed(self, exc: OSError, labelled_rows: int) -> bool:
        """Record a failed save; True if the condition changed (the status should say so)."""
        state = storage_problem(exc)
        what = {"full": "disk full", "read-only": "read-only"}.get(state, "cannot write")
        self.failed_saves += 1
        self._warn.warning(("save", state), "site %s: state folder %s: %s (%s); keeping the last saved state, %d labelled rows held in memory",
                           self.site, self.folder, what, exc.strerror or exc, labelled_rows)
        changed, self.state = self.state != state, state
        return changed

    def saved(self, labelled_rows: int) -> bool:
        """Record a successful save; True if it ends a period of failures."""
        if self.state == "ok":
            return False
        self.log.warning("site %s: state folder %s takes saves again (%d labelled rows saved after %d failed saves)",
                         self.site, self.folder, labelled_rows, self.failed_saves)
        self.state, self.failed_saves = "ok", 0
        return True
