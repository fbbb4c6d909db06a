"""Settings shared by the edge, the aggregator and the benchmarks.

`ModelSettings` travels in every round announcement, so a site trains exactly what the
aggregator asked for. It holds plain values only (no scikit-learn import).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from turbofed.errors import ConfigError


@dataclass(frozen=True)
class ModelSettings:
    """The learner, its training budget and the federation schedule.

    Defaults were chosen on FD001 (see README's accuracy table): a (64, 32) MLP with Adam
    on 43 window features, mini-batches of 64, 8 rounds of 5 local epochs.
    """

    kind: str = "mlp"  # "mlp" (MLPRegressor, Adam) or "sgd" (SGDRegressor)
    hidden: tuple[int, ...] = (64, 32)
    learning_rate: float = 1e-3
    batch_size: int = 64
    alpha: float = 1e-4  # L2 penalty
    window: int = 30
    rul_cap: float = 125.0
    rounds: int = 8
    local_epochs: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "sgd"):
            raise ConfigError(f"model kind must be 'mlp' or 'sgd', got {self.kind!r}")
        positive = ("learning_rate", "batch_size", "window", "rul_cap", "rounds", "local_epochs")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"model setting {name} must be positive, got {getattr(self, name)!r}")
        if self.kind == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"model setting hidden must be layer sizes >= 1, got {self.hidden!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model settings") -> "ModelSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(d)
        if "hidden" in values:
            values["hidden"] = tuple(int(h) for h in values["hidden"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def replace(self, **changes: Any) -> "ModelSettings":
        return ModelSettings.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})
