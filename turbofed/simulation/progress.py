"""Round progress for `turbofed demo`: rounds done out of the total, with the fleet's RMSE
of the newest global model, so a two-minute run is never silent.

On a terminal it is a `rich` progress bar (when rich is installed); anywhere else (a log
file, CI, a pipe) one plain line each time a round closes, because a bar redrawn with
carriage returns is unreadable in a file.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO


def pooled_rmse(scores: Mapping[str, tuple[float, int]]) -> float | None:
    """RMSE over every site's rows together, from each site's (RMSE, rows)."""
    rows = sum(n for _, n in scores.values())
    if rows <= 0:
        return None
    return math.sqrt(sum(n * rmse * rmse for rmse, n in scores.values()) / rows)


def describe(done: int, total: int, version: int | None, rmse: float | None, sites: int) -> str:
    """'fleet RMSE 21.40 (global v3, 4 sites)' or 'fleet RMSE: waiting for the sites'."""
    if rmse is None or version is None:
        return "fleet RMSE: waiting for the sites' first evaluation"
    whose = "1 site's" if sites == 1 else f"{sites} sites'"
    return f"fleet RMSE {rmse:.2f} (global v{version} on {whose} labelled engines)"


class RoundProgress:
    """`update(done, version, rmse, sites)` as rounds close; `close()` at the end."""

    def __init__(self, total: int, stream: TextIO | None = None, fancy: bool | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.last: tuple[Any, ...] | None = None
        self._bar: Any = None
        if fancy is None:
            fancy = bool(getattr(self.stream, "isatty", lambda: False)())
        if fancy:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:  # rich is optional: plain lines then
                return
            self._bar = Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rmse]}"),
                                 TimeElapsedColumn(), console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task("rounds", total=total, rmse=describe(0, total, None, None, 0))
            self._bar.start()

    @property
    def fancy(self) -> bool:
        return self._bar is not None

    def update(self, done: int, version: int | None = None, rmse: float | None = None, sites: int = 0) -> None:
        """The bar follows every change; a plain line is printed once per round closed."""
        key = (done, version, rmse) if self._bar is not None else (done,)
        if self.last == key:
            return
        self.last = key
        text = describe(done, self.total, version, rmse, sites)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rmse=text)
        else:
            print(f"round {done}/{self.total} done; {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
