"""Child processes that never outlive the command that started them.

`turbofed demo` and the benchmarks start a broker, an aggregator, agents and replays. Two
things keep any of them from being orphaned:

- **Signals become a clean stop.** `stop_on_signals()` turns SIGTERM (what `timeout`,
  `kill` and systemd send) and SIGINT (Ctrl-C) into a `Stopped` exception in the main
  thread, so the caller's `finally` stops every child in order, with a bounded grace period
  and then SIGKILL. The command then exits with 128 + the signal number (143 for SIGTERM,
  130 for SIGINT), as a shell reports a command a signal ended.
- **The kernel covers the rest.** Should the parent itself die without cleaning up
  (SIGKILL, the OOM killer, a crash), every child started by `spawn` gets SIGTERM from the
  kernel (Linux `PR_SET_PDEATHSIG`, set between fork and exec): agents and the aggregator
  then save their state and close the store as on any SIGTERM, Mosquitto saves its
  database. We chose this over a watchdog process because it needs no extra process
  and cannot itself be killed first; its limits: Linux only (elsewhere only the first
  mechanism applies), the signal follows the *thread* that spawned the child (spawn from
  the main thread), and a child that ignores SIGTERM would survive (ours do not).

Children also get their own session (process group), so a terminal's Ctrl-C reaches the
parent only, and the parent stops agents before the aggregator before the broker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; raised in the main thread. A KeyboardInterrupt, so that no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number: what a shell reports for a command a signal ended."""
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Stopped` (once: further stop signals are
    ignored while the caller cleans up, which its grace periods bound). Main thread only."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function asking the kernel to SIGTERM the child when we die (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen` for a child that must not outlive us: its own session, and SIGTERM
    from the kernel if we die (see the module docstring). Call it from the main thread."""
    return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_die_with_parent(), **kwargs)  # noqa: PLW1509 - see _die_with_parent

