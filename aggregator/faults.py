"""Crash injection FOR CRASH TESTS ONLY: lets tests/test_faults_live.py kill the aggregator
at one exact step of committing a round, to prove no round is lost or repeated.

Set TURBOFED_FAULT_KILL_AT to a step (after_merge, after_checkpoint, after_store,
after_publish), optionally with a round number ("after_store:2"); the aggregator then
SIGKILLs itself when it reaches that step (of that round). Unset, it does nothing; no
configuration file can turn it on.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

ENV = "TURBOFED_FAULT_KILL_AT"
STEPS = ("after_merge", "after_checkpoint", "after_store", "after_publish")

log = logging.getLogger("turbofed.aggregator.faults")


def kill_point(step: str, round: int, settle: Callable[[], object] | None = None) -> None:
    """SIGKILL this process here if TURBOFED_FAULT_KILL_AT names `step` (and `round`);
    `settle` runs first (e.g. wait until a publish has left)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, number = wanted.partition(":")
    if name == step and (not number or number.strip() == str(round)):
        if settle is not None:
            settle()
        log.warning("%s=%s: killing the aggregator at %s of round %d (crash test)", ENV, wanted, step, round)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
