"""Refusals logged once per reason per minute, counted always, sampled in a bounded ring.

A flood of bad input (one broken gateway sends a NaN every cycle for a week) must not
flood the log, fill the disk or grow memory: each service keeps, per process, counters by
reason, the last few refusals as samples, and logs a reason at most once per interval,
saying how many like it were not logged since. Tracebacks of internal errors go through
the same gate, so a bug met on every message logs one traceback a minute, not thousands.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

LOG_INTERVAL_S = 60.0
RECENT_SAMPLES = 100


class Throttle:
    """Lets one event per key through per `interval` seconds and counts the ones held back."""

    def __init__(self, interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[Hashable, float] = {}
        self.held: Counter[Hashable] = Counter()  # held back since the key last went through

    def allow(self, key: Hashable) -> int | None:
        """None: hold this one back (counted). Otherwise how many were held back before it."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.held[key] += 1
            return None
        self._last[key] = now
        return self.held.pop(key, 0)

    def due(self) -> list[tuple[Hashable, int]]:
        """Keys with held-back events whose interval has passed: (key, count), now reset."""
        now = self.clock()
        out = [(k, n) for k, n in self.held.items() if now - self._last.get(k, 0.0) >= self.interval]
        for k, _ in out:
            del self.held[k]
            self._last[k] = now
        return out


class RateLimitedLog:
    """A logger's warnings (or tracebacks) for one key at most once per interval."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.throttle = Throttle(interval, clock)

    def warning(self, key: Hashable, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log `msg % args` unless `key` was logged within the interval; True if it was logged."""
        held = self.throttle.allow(key)
        if held is None:
            return False
        suffix = f" ({held} more like it in the last {self.throttle.interval:.0f} s not logged)" if held else ""
        self.logger.warning(msg + "%s", *args, suffix, exc_info=exc_info)
        return True


@dataclass(frozen=True)
class Sample:
    """One refused message kept as an example: when, from whom, why, what was wrong."""

    at: float
    source: str
    reason: str
    detail: str


class RefusalLog:
    """Counters by reason, the last RECENT_SAMPLES refusals, and a log line per reason per interval."""

    def __init__(self, logger: logging.Logger, fmt: str, interval: float = LOG_INTERVAL_S, samples: int = RECENT_SAMPLES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`fmt` formats (source, reason, count, detail), e.g. "rejected from %s (%s, #%d): %s"."""
        self.log = RateLimitedLog(logger, interval, clock)
        self.fmt = fmt
        self.recent: deque[Sample] = deque(maxlen=samples)

    def refused(self, counters: Counter[str], key: str, source: str, reason: str, detail: str) -> None:
        """Count `key`, keep a sample (detail cut to 500 characters) and log it if its turn has come."""
        counters[key] += 1
        detail = detail[:500]
        self.recent.append(Sample(time.time(), source, reason, detail))
        self.log.warning(reason, self.fmt, source, reason, counters[key], detail)
