"""The results-store interface: rounds, rejections, site status, metrics, predictions, truth, events.

The aggregator's recorder writes here; the dashboard and the demo read here. Both go
through `ResultsStore`, so InfluxDB can later stand in for the embedded SQLite default
without either side changing. Reads return lists of plain dicts (JSON- and
DataFrame-friendly). Timestamps are float unix seconds.

Predictions are stored one row per (site, engine, cycle, model) with model "local" or
"federated"; the federated row also holds the prediction's conformal interval (lower, upper
RUL at the fleet's configured coverage; None without one). Each row also says whether the
model's input lay outside its training range (out_of_range 1 or 0, None when the site did
not say: FeatureSpec.out_of_range). True RUL is stored once per engine, as it becomes known (RUL 0 at the
failure cycle, or a test engine's revealed RUL at its last cycle); the truth at any
earlier cycle c follows as rul + (cycle - c). It is not capped: capping is a modelling
choice the reader makes. Raw sensor rows are stored only where a site chose to share them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from turbofed.errors import TurbofedError
from turbofed.messages.site import MODELS  # noqa: F401 (re-exported: the stores' model names)

# engine, cycle, local RUL, federated RUL[, lower, upper[, out_of_range]]: the federated RUL's
# conformal interval and then the models whose input was outside their training range (a
# tuple of MODELS names) may be left off, as rows from before them are
PredictionRow = tuple[Any, ...]


def round_total(record: dict[str, Any], key: str) -> int:
    """A stored round's total `key` ("samples" or "update_bytes") over its participants and the
    regions that sent summary partials (whose sites' rows carry none)."""
    return sum(p.get(key) or 0 for p in record.get("participants", [])) + sum(r.get(key) or 0 for r in record.get("regions", []))


def full_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """A prediction row as seven values: (engine, cycle, local, federated, lower, upper,
    out_of_range), the missing ones None."""
    return (*row, *(None,) * (7 - len(row)))


def out_of_range_flag(models: Sequence[str] | None, model: str) -> int | None:
    """What a store records for `model`'s prediction: 1 if its input was outside its training
    range, 0 if not, None if the site did not say."""
    return None if models is None else int(model in models)


def engine_flag(flags: Sequence[int | None]) -> int | None:
    """An engine's out_of_range at a cycle, from its models' flags: 1 if any model's input was
    outside its training range, 0 if each that said was inside, None if none said (as SQL MAX)."""
    known = [int(f) for f in flags if f is not None]
    return max(known) if known else None


ARCHIVE_EVENT = "rounds_archived"  # the event a store without an archive table marks a fleet reset with


class StoreError(TurbofedError):
    """The results store cannot be opened or is from a newer turbofed."""


class ResultsStore(ABC):
    """What the recorder writes and the dashboard reads, whatever the backend."""

    # --- write side (the aggregator's recorder) ---
    @abstractmethod
    def record_round(self, round: int, model_version: int, started: float, closed: float,
                     participants: list[dict[str, Any]], aggregate_ms: float, strategy: str,
                     closed_by: str, strategy_params: dict[str, Any] | None = None,
                     regions: dict[str, dict[str, Any]] | None = None) -> None:
        """A closed round; participants are {"site", "samples", "update_bytes"} and, where the
        aggregator reported them, what the strategy did with each update ("norm" of its delta,
        "cosine" to the aggregate delta, "action": kept, clipped, trimmed or excluded); the
        strategy's name and the parameters it ran with (read back as `strategy_params`).
        `regions`: the totals of each region that sent a summary partial ({"sites", "samples",
        "update_bytes"}; its sites' participant rows carry no weight), read back as the round's
        `regions` and counted in its `samples`."""

    @abstractmethod
    def record_rejection(self, round: int | None, site: str, reason: str, detail: str, at: float) -> None:
        """An update or message the aggregator refused, and why."""

    @abstractmethod
    def record_status(self, site: str, online: bool, at: float, agent_version: str | None,
                      model_version: int | None, samples: int | None) -> None:
        """A site's status message (or last will); only the latest per site is kept."""

    @abstractmethod
    def record_metrics(self, site: str, round: int | None, model_version: int | None,
                       metrics: dict[str, Any], at: float) -> None:
        """{"engines": n, "local": {"rmse", "score"}, "federated": {...}}: one row per model."""

    @abstractmethod
    def record_validation(self, site: str, round: int, model_version: int | None, metrics: dict[str, Any], at: float) -> None:
        """A site's RMSE of its local and the federated model on its validation engines after
        `round` (Metrics with on = "validation"): one row per model, the learning curve."""

    @abstractmethod
    def record_predictions(self, site: str, rows: Sequence[PredictionRow], at: float) -> None:
        """Rows of (engine, cycle, local RUL, federated RUL[, lower, upper[, out_of_range]]); None
        means not predicted; lower/upper bound the federated RUL (its conformal interval);
        out_of_range names the models whose input was outside their training range."""

    @abstractmethod
    def record_sensors(self, site: str, rows: list[tuple[str, int, list[float], list[float]]], at: float) -> None:
        """Rows of (engine, cycle, 3 settings, 21 sensors): raw telemetry a site chose to share."""

    @abstractmethod
    def record_truth(self, site: str, engine: str, cycle: int, rul: float, at: float) -> None:
        """The true RUL of `engine` at `cycle` became known (failure: rul 0)."""

    @abstractmethod
    def record_event(self, kind: str, detail: dict[str, Any], at: float) -> None:
        """An aggregator event (started, resumed, round announced...)."""

    @abstractmethod
    def archive_rounds(self, epoch: int) -> int:
        """A fleet reset (`--reset`) starts round numbers again: keep fleet epoch `epoch`'s
        rounds, set aside from the current ones (`rounds()`), so the new epoch's round n does
        not replace the old round n. How many rounds were kept."""

    # --- read side (dashboard, demo) ---
    @abstractmethod
    def rounds(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def rejections(self, round: int | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def site_status(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def metrics(self, site: str | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def validation_metrics(self) -> list[dict[str, Any]]:
        """Every validation row (site, round, model_version, model, engines, rmse, at), oldest first."""

    @abstractmethod
    def latest_metrics(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def latest_predictions(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def engine_trajectory(self, site: str, engine: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def engines_with_truth(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def events(self, limit: int = 100) -> list[dict[str, Any]]: ...

    @abstractmethod
    def counts(self) -> dict[str, int]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
