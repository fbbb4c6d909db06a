"""What the aggregator tells every site: round announcements and statistics requests, and
the sites' statistics replies (the two phases the aggregator drives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from turbofed.config import ModelSettings
from turbofed.conformal import HistogramError, IntervalTable, Layout, ResidualHistogram
from turbofed.envelope import encode_json
from turbofed.layout import N_SENSORS
from turbofed.messages._check import (
    MAX_LAYER_WIDTH,
    MAX_LAYERS,
    MAX_STATS_VALUES,
    MAX_WINDOW,
    MessageError,
    bounded_list,
    finite,
    flag,
    json_body,
    optional,
    refused_as,
    required,
    site_of,
    text,
    whole,
)
from turbofed.messages.secure import SecureSum
from turbofed.refusals import Refusal
from turbofed.spec import FeatureSpec, FleetStats, Regimes, RegimeStats

# --- aggregator -> sites -----------------------------------------------------------------


@dataclass(frozen=True)
class SiteNoise:
    """Distributed DP (docs/privacy.md): clip your delta to L2 norm `clip_norm`, then add
    N(0, noise_std^2) to every coordinate before sending it."""

    clip_norm: float
    noise_std: float

    def to_dict(self) -> dict[str, float]:
        return {"clip_norm": self.clip_norm, "noise_std": self.noise_std}

    @classmethod
    def from_dict(cls, value: Any, what: str) -> "SiteNoise":
        with refused_as(Refusal.BAD_ROUND, what):
            if not isinstance(value, dict):
                raise MessageError(f"{what} must be an object", Refusal.BAD_ROUND)
            clip_norm = finite(required(value, "clip_norm", what), f"{what} clip_norm")
            if clip_norm <= 0:
                raise MessageError(f"{what} clip_norm must be > 0, got {clip_norm}", Refusal.BAD_ROUND)
            return cls(clip_norm, finite(required(value, "noise_std", what), f"{what} noise_std", 0.0))


@dataclass(frozen=True)
class RoundAnnouncement:
    """Round `round` is open (train from global `model_version` before `deadline`), or, with
    `done`, all rounds are over; `spec` lets a site that joins late predict."""

    round: int
    spec: FeatureSpec | None = None
    announce_id: str | None = None
    model_version: int | None = None
    deadline: float | None = None
    settings: ModelSettings | None = None
    min_samples: int | None = None
    strategy: str | None = None
    done: bool = False
    epoch: int = 0  # fleet reset counter: a higher signed epoch lets sites start again from v0
    dp: SiteNoise | None = None  # distributed DP: each site clips and noises its own delta
    secagg: SecureSum | None = None  # secure aggregation: deltas travel masked (turbofed/messages/secure.py)
    intervals: IntervalTable | None = None  # conformal interval table of global v(intervals.model_version) (turbofed/conformal.py)

    @property
    def version(self) -> int:
        """The model version a signature of this announcement binds: the starting model, or
        when done the last one."""
        return self.round if self.model_version is None else self.model_version

    @property
    def versions(self) -> tuple[int, ...]:
        """The global model versions this announcement vouches for: the round's starting model
        and the model the round produces (version = round number), or, when done, the last."""
        return (self.round,) if self.done else (self.model_version, self.round)

    def __post_init__(self) -> None:
        if not self.done and None in (self.announce_id, self.model_version, self.deadline, self.settings):
            raise ValueError("an open round needs announce_id, model_version, deadline and settings")

    def to_payload(self) -> bytes:
        spec = self.spec.to_dict() if self.spec else None
        epoch = {"epoch": self.epoch} if self.epoch else {}
        if self.intervals is not None:
            epoch["intervals"] = self.intervals.to_dict()
        if self.done:
            return encode_json({"round": self.round, "done": True, **({"spec": spec} if spec else {}), **epoch})
        body: dict[str, Any] = {
            "round": self.round, "announce_id": self.announce_id, "model_version": self.model_version,
            "deadline": self.deadline, "settings": self.settings.to_dict(),
        }
        if spec:
            body["spec"] = spec
        for key in ("min_samples", "strategy"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.dp is not None:
            body["dp"] = self.dp.to_dict()
        if self.secagg is not None:
            body["secagg"] = self.secagg.to_dict()
        return encode_json({**body, **epoch})

    @classmethod
    def from_payload(cls, payload: bytes) -> "RoundAnnouncement":
        what = "round announcement"
        body = json_body(payload, what)
        number = whole(required(body, "round", what), f"{what} round")
        spec = None
        if body.get("spec") is not None:
            spec = _spec(body["spec"], f"{what} spec")
        epoch = whole(body.get("epoch", 0), f"{what} epoch")
        intervals = optional(body.get("intervals"), _intervals, f"{what} intervals")
        if flag(body.get("done", False), f"{what} done"):
            return cls(number, spec, done=True, epoch=epoch, intervals=intervals)
        with refused_as(Refusal.BAD_ROUND, f"{what} settings"):
            settings = body.get("settings")
            if not isinstance(settings, dict):
                raise MessageError(f"{what} settings must be an object, got {type(settings).__name__}", Refusal.BAD_ROUND)
            if "hidden" in settings:
                for h in bounded_list(settings["hidden"], f"{what} settings hidden", MAX_LAYERS):
                    whole(h, f"{what} settings hidden[]", 1, MAX_LAYER_WIDTH)
            if "window" in settings:
                whole(settings["window"], f"{what} settings window", 1, MAX_WINDOW)
            settings = ModelSettings.from_dict(settings, f"{what} settings")
        return cls(
            number,
            spec,
            announce_id=text(required(body, "announce_id", what), f"{what} announce_id"),
            model_version=whole(required(body, "model_version", what), f"{what} model_version"),
            deadline=finite(required(body, "deadline", what), f"{what} deadline"),
            settings=settings,
            min_samples=optional(body.get("min_samples"), whole, f"{what} min_samples"),
            strategy=optional(body.get("strategy"), text, f"{what} strategy"),
            epoch=epoch,
            dp=optional(body.get("dp"), SiteNoise.from_dict, f"{what} dp"),
            secagg=optional(body.get("secagg"), SecureSum.from_dict, f"{what} secagg"),
            intervals=intervals,
        )


def _intervals(value: Any, what: str) -> IntervalTable:
    """A conformal interval table: bounded lists, finite or open bounds, coverage in (0, 1)."""
    try:
        return IntervalTable.from_dict(value, what)
    except HistogramError as exc:
        raise MessageError(str(exc), Refusal.BAD_ROUND) from None


def _spec(value: Any, what: str) -> FeatureSpec:
    """A feature spec: sensor indices, a window, and a finite offset and positive scale per feature."""
    with refused_as(Refusal.BAD_ROUND, what):
        if not isinstance(value, dict):
            raise MessageError(f"{what} must be an object", Refusal.BAD_ROUND)
        sensors = [whole(i, f"{what} sensors[]", 0, N_SENSORS - 1) for i in bounded_list(required(value, "sensors", what), f"{what} sensors", N_SENSORS)]
        window = whole(required(value, "window", what), f"{what} window", 1, MAX_WINDOW)
        offset = [finite(v, f"{what} offset[]") for v in bounded_list(required(value, "offset", what), f"{what} offset", MAX_STATS_VALUES)]
        scale = [finite(v, f"{what} scale[]") for v in bounded_list(required(value, "scale", what), f"{what} scale", MAX_STATS_VALUES)]
        if any(v <= 0 for v in scale):
            raise MessageError(f"{what} scale must be positive (features are divided by it)", Refusal.BAD_ROUND)
        regimes = optional(value.get("regimes"), _regimes, f"{what} regimes")
        return FeatureSpec.from_dict({"sensors": sensors, "window": window, "offset": offset, "scale": scale,
                                      "regimes": regimes.to_dict() if regimes else None})


T = TypeVar("T")


def _regimes(value: Any, what: str) -> Regimes:
    """Operating regimes: at most MAX_REGIMES grid cells, finite means, spreads not negative."""
    return _from_dict(value, Regimes.from_dict, what, Refusal.BAD_ROUND)


def _from_dict(value: Any, parse: Callable[[Any], T], what: str, reason: Refusal) -> T | None:
    """None for an absent value, else `parse(value)`; its ValueError is refused with `reason`,
    naming `what`."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise MessageError(f"{what}: {exc}", reason) from None


STATS_PHASES = ("regimes", "features", "residuals")


@dataclass(frozen=True)
class StatsRequest:
    """Asks every site for statistics, in two phases: `regimes` (per settings-grid cell,
    counts and raw sensor sums: where the fleet flies) and `features` (feature statistics
    over `window`-cycle windows of the sensors normalised with `regimes`; None: raw sensors,
    the single phase of a fleet that predates regimes). After the rounds, a third:
    `residuals`, the residual histogram (in `layout`) of global `model_version` on the
    site's calibration engines (turbofed/conformal.py)."""

    request_id: str
    min_samples: int
    window: int
    phase: str = "features"
    regimes: Regimes | None = None
    secagg: SecureSum | None = None  # answer through a secure sum, not a StatsReply (docs/privacy.md)
    layout: Layout | None = None  # residuals phase: the bins to count in
    model_version: int | None = None  # residuals phase: the global model to calibrate

    def to_payload(self) -> bytes:
        body: dict[str, Any] = {"request_id": self.request_id, "min_samples": self.min_samples, "window": self.window}
        if self.layout is not None:
            body["layout"] = self.layout.to_dict()
        if self.model_version is not None:
            body["model_version"] = self.model_version
        if self.phase != "features":
            body["phase"] = self.phase
        if self.regimes is not None:
            body["regimes"] = self.regimes.to_dict()
        if self.secagg is not None:
            body["secagg"] = self.secagg.to_dict()
        return encode_json(body)

    @classmethod
    def from_payload(cls, payload: bytes) -> "StatsRequest":
        what = "stats request"
        body = json_body(payload, what)
        with refused_as(Refusal.BAD_STATS_REQUEST, what):
            request_id = text(required(body, "request_id", what), f"{what} request_id")
            where = f"{what} {request_id!r}"
            phase = body.get("phase", "features")
            if phase not in STATS_PHASES:
                raise MessageError(f"{where} phase must be one of {', '.join(STATS_PHASES)}, got {str(phase)[:40]!r}", Refusal.BAD_STATS_REQUEST)
            regimes = _from_dict(body.get("regimes"), Regimes.from_dict, f"{where} regimes", Refusal.BAD_STATS_REQUEST)
            if phase == "regimes" and regimes is not None:
                raise MessageError(f"{where}: the regimes phase is asked without regimes", Refusal.BAD_STATS_REQUEST)
            secagg = optional(body.get("secagg"), SecureSum.from_dict, f"{where} secagg")
            if secagg is not None and phase != "features":
                raise MessageError(f"{where}: only the features phase goes through a secure sum", Refusal.BAD_STATS_REQUEST)
            layout = version = None
            if phase == "residuals":
                try:
                    layout = Layout.from_dict(required(body, "layout", where), f"{where} layout")
                except HistogramError as exc:
                    raise MessageError(str(exc), Refusal.BAD_STATS_REQUEST) from None
                version = whole(required(body, "model_version", where), f"{where} model_version")
            return cls(request_id, whole(required(body, "min_samples", where), f"{where} min_samples"),
                       whole(required(body, "window", where), f"{where} window", 1, MAX_WINDOW), phase, regimes, secagg,
                       layout, version)


# --- sites -> aggregator -------------------------------------------------------------------


@dataclass(frozen=True)
class StatsReply:
    """A site's count, sums and sums of squares for a request (`stats` None: no labelled
    data yet); for the regimes phase, `regime_stats` instead; for the residuals phase,
    `residuals` (counts only: no residual leaves the site) over `engines` calibration engines."""

    request_id: str
    site: str
    samples: int
    engines: int
    stats: FleetStats | None = None
    regime_stats: RegimeStats | None = None
    residuals: ResidualHistogram | None = None

    def to_payload(self) -> bytes:
        stats = self.stats.to_dict() if self.stats is not None else None
        body = {"request_id": self.request_id, "site": self.site, "samples": self.samples, "engines": self.engines, "stats": stats}
        if self.regime_stats is not None:
            body["regime_stats"] = self.regime_stats.to_dict()
        if self.residuals is not None:
            body["residuals"] = self.residuals.to_dict()
        return encode_json(body)

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str) -> "StatsReply":
        what = f"stats reply from {site}"
        body = json_body(payload, what)
        site_of(body, site, what)
        stats = body.get("stats")
        if stats is not None:
            stats = _fleet_stats(stats, f"{what}: stats")
        regime_stats = _from_dict(body.get("regime_stats"), RegimeStats.from_dict, f"{what}: regime_stats", Refusal.BAD_STATS)
        residuals = None
        if body.get("residuals") is not None:
            try:
                residuals = ResidualHistogram.from_dict(body["residuals"], f"{what}: residuals")
            except HistogramError as exc:
                raise MessageError(str(exc), Refusal.BAD_STATS) from None
        return cls(
            text(required(body, "request_id", what), f"{what} request_id"), site,
            whole(required(body, "samples", what), f"{what} samples"), whole(body.get("engines", 0), f"{what} engines"), stats,
            regime_stats, residuals,
        )


def _fleet_stats(value: Any, what: str) -> FleetStats:
    """Statistics whose every number is finite and every list bounded, before FleetStats checks sizes."""
    with refused_as(Refusal.BAD_STATS, what):
        if not isinstance(value, dict):
            raise MessageError(f"{what} must be an object", Refusal.BAD_STATS)
        clean: dict[str, Any] = {}
        for key, v in value.items():
            if isinstance(v, list):
                clean[key] = [finite(x, f"{what} {key}[]") for x in bounded_list(v, f"{what} {key}", MAX_STATS_VALUES)]
            elif key == "window":
                clean[key] = whole(v, f"{what} window", 1, MAX_WINDOW)
            else:
                clean[key] = finite(v, f"{what} {key}")
        if clean.get("count", 0) < 0:
            raise MessageError(f"{what} count is negative", Refusal.BAD_STATS)
        return FleetStats.from_dict(clean)
