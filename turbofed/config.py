"""Settings shared by the edge, the aggregator and the benchmarks.

`ModelSettings` travels in every round announcement, so a site trains exactly what the
aggregator asked for. It holds plain values only (no scikit-learn import).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import tempfile
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Final, Union

from turbofed.errors import ConfigError, TurbofedError
from turbofed.spec import DEFAULT_WINDOW

MAX_WINDOW: Final = 2000  # cycles in a feature window (an agent keeps 2,000 cycles of history by default)
MAX_LAYERS: Final = 16  # hidden layers a round may ask sites to train ...
MAX_LAYER_WIDTH: Final = 4096  # ... and units per layer: bounds what one announcement makes every site allocate


# --- checking every value: types from the dataclass fields, allowed values from RANGES ------


@dataclass(frozen=True)
class Limit:
    """The values one config field allows. Types come from the dataclass field (booleans must
    be TOML booleans, strings non-empty, numbers finite); this adds the range (`lo`..`hi`,
    `lo` excluded when `above`), the choices of a string, the length of a list (`items`,
    whose elements get the range), or `check`: a callable that raises with the reason."""

    lo: float | None = None
    hi: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    items: tuple[int, int] | None = None
    check: Callable[[Any], Any] | None = None

    def allows(self, value: float) -> bool:
        low_ok = self.lo is None or (value > self.lo if self.above else value >= self.lo)
        return low_ok and (self.hi is None or value <= self.hi)

    def describe(self, integer: bool) -> str:
        """'an integer in 1..65535', 'a number > 0 and <= 10': the allowed range, in words."""
        kind = "an integer" if integer else "a number"
        if self.lo is None and self.hi is None:
            return kind
        if self.above or self.lo is None or self.hi is None:
            low = "" if self.lo is None else f" {'>' if self.above else '>='} {_num(self.lo)}"
            high = "" if self.hi is None else f" <= {_num(self.hi)}"
            return f"{kind}{low}{' and' if low and high else ''}{high}"
        return f"{kind} in {_num(self.lo)}..{_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e12 else f"{x:g}"


def _topic_root(value: str) -> None:
    from turbofed.topics import Topics

    Topics(value, value)  # validates both roots the same way


def _site_ids(values: tuple[str, ...]) -> None:
    from turbofed.topics import validate_site

    for v in values:
        validate_site(v)
    if len(set(values)) != len(values):
        raise ValueError(f"site ids must be unique, got {list(values)!r}")


def _engine_ids(values: tuple[str, ...]) -> None:
    from turbofed.topics import validate_engine

    for v in values:
        validate_engine(v)


def _word_bits(value: int) -> None:
    if value not in (32, 64):
        raise ValueError(f"must be 32 or 64 (bits per fixed-point word), got {value}")


def _site_id(value: str) -> None:
    from turbofed.topics import validate_site

    validate_site(value)


# Allowed values per dataclass and field. A field added to one of these classes is checked by
# its type alone until it gets an entry here; tests/test_config.py requires an entry (or a
# bad-value case) for every field. Keys are class names, so the table needs no import order.
RANGES: dict[str, dict[str, Limit]] = {
    "ModelSettings": {
        "kind": Limit(choices=("mlp", "sgd")),
        "hidden": Limit(1, MAX_LAYER_WIDTH, items=(0, MAX_LAYERS)),
        "learning_rate": Limit(0, 10, above=True),
        "batch_size": Limit(1, 1_000_000),
        "alpha": Limit(0, 1_000),
        "window": Limit(1, MAX_WINDOW),
        "rul_cap": Limit(0, 100_000, above=True),
        "rounds": Limit(1, 1_000_000),
        "local_epochs": Limit(1, 10_000),
        "seed": Limit(0, 2**32 - 1),
    },
    "BrokerSettings": {
        "port": Limit(1, 65535),
        "keepalive": Limit(1, 65535),
        "topic_root": Limit(check=_topic_root),
        "plant_root": Limit(check=_topic_root),
    },
    "SiteConfig": {
        "site": Limit(check=_site_id),
        "engines": Limit(items=(1, 10_000_000), check=_engine_ids),
        "buffer_rows": Limit(1, 100_000_000),
        "min_samples": Limit(1, 1_000_000_000),
        "holdout_share": Limit(0, 0.5),
        "history_cycles": Limit(1, 1_000_000),
        "predictions_every_s": Limit(0, 3600, above=True),
        "min_stats_engines": Limit(2, 1_000_000),
        "max_stats_window": Limit(1, MAX_WINDOW),
        "max_engines": Limit(1, 10_000_000),
        "engine_idle_s": Limit(0, 1e9, above=True),
        "sensor_abs_max": Limit(0, 1e300, above=True),
        "outbox_max_bytes": Limit(64 * 1024, 2**39),
        "metrics_port": Limit(1, 65535),
    },
    "GatewayConfig": {
        "site": Limit(check=_site_id),
    },
    "FleetConfig": {
        "sites": Limit(items=(1, 100_000), check=_site_ids),
        "quorum": Limit(1, 100_000),
        "round_deadline_s": Limit(0, 1e7, above=True),
        "stats_retry_s": Limit(0, 86_400, above=True),
        "min_samples": Limit(1, 1_000_000_000),
        "max_update_bytes": Limit(1, 4 * 1024 * 1024),  # envelope.MAX_PAYLOAD_BYTES: nothing larger arrives
        "epoch": Limit(0, 1_000_000_000),
        "rollback_margin": Limit(0, 100),
        "max_site_share": Limit(0, 1, above=True),
        "max_empty_rounds": Limit(1, 1_000_000),
        "stall_retry_s": Limit(0, 1e7, above=True),
        "metrics_port": Limit(1, 65535),
    },
    "RegionConfig": {
        "region": Limit(check=_site_id),
        "sites": Limit(items=(1, 100_000), check=_site_ids),
        "quorum": Limit(1, 100_000),
        "close_before_s": Limit(0, 1e6),
        "max_update_bytes": Limit(1, 4 * 1024 * 1024),
        "max_site_share": Limit(0, 1, above=True),
        "shared_group": Limit(check=_site_id),
        "batch": Limit(1, 16),
        "flush_s": Limit(0, 60, above=True),
        "site_records": Limit(choices=("full", "summary")),
    },
    "PrivacySettings": {
        "clip_norm": Limit(0, 1e6, above=True),
        "noise_multiplier": Limit(0, 1e4, above=True),
        "target_epsilon": Limit(0, 1e4, above=True),
        "delta": Limit(0, 0.1, above=True),
        "mode": Limit(choices=("central", "distributed")),
        "epsilon_budget": Limit(0, 1e6, above=True),
        "expected_sites": Limit(1, 100_000),
        "accountant": Limit(choices=("rdp", "pld")),
        "seed": Limit(0, 2**63 - 1),
    },
    "IntervalSettings": {
        "coverage": Limit(0.5, 0.999),
        "min_group_residuals": Limit(1, 1_000_000_000),
    },
    "BufferedRounds": {
        "size": Limit(0, 100_000),
        "max_staleness": Limit(0, 1_000),
        "staleness_exponent": Limit(0, 10),
    },
    "SecureAggregationSettings": {
        "threshold": Limit(0, 1024),
        "neighbours": Limit(0, 1024),
        "bits": Limit(32, 64, check=_word_bits),
        "clip": Limit(0, 1e6, above=True),
        "weight_unit": Limit(1, 1_000_000_000),
        "max_weight": Limit(1, 65_536),
        "phase_timeout_s": Limit(0, 3600, above=True),
    },
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check each of `values` against its field's type in `cls` and its RANGES entry; return
    the values normalised (ints as floats where a float is declared, lists as tuples).
    Raises ConfigError "<where> <key> must be <what is allowed>, got <value>"."""
    hints, limits = _hints(cls), RANGES.get(cls.__name__, {})
    return {name: _checked(hints[name], value, f"{where} {name}", limits.get(name, Limit())) if name in hints else value
            for name, value in values.items()}


def _checked(tp: Any, value: Any, key: str, limit: Limit) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be a boolean (true or false, without quotes), got {value!r:.60}")
        return value
    if tp in (int, float):
        integer = tp is int
        ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
        if not ok_type or not math.isfinite(value) or not limit.allows(value):
            raise ConfigError(f"{key} must be {limit.describe(integer)}, got {value!r:.60}")
        value = int(value) if integer else float(value)
    elif tp is str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key} must be a non-empty string, got {value!r:.60}")
        if limit.choices and value not in limit.choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, limit.choices))}, got {value!r:.60}")
    elif origin is tuple:
        lo, hi = limit.items or (0, 1_000_000)
        (element, _) = args
        what = "integers" if element is int else "numbers" if element is float else "non-empty strings"
        if element in (int, float) and (limit.lo is not None or limit.hi is not None):
            what = f"{what} ({limit.describe(element is int)[len('an integer ' if element is int else 'a number '):]})"
        if not isinstance(value, (list, tuple)) or not lo <= len(value) <= hi:
            raise ConfigError(f"{key} must be a list of {lo}..{hi} {what}, got {value!r:.60}")
        try:
            value = tuple(_checked(element, v, key, replace(limit, items=None, check=None)) for v in value)
        except ConfigError:
            raise ConfigError(f"{key} must be a list of {lo}..{hi} {what}, got {value!r:.60}") from None
    elif origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r:.60}")
    elif is_dataclass(tp) and not isinstance(value, tp):
        raise ConfigError(f"{key} must be a table ([{key.rsplit(' ', 1)[-1]}]), got {value!r:.60}")
    if limit.check is not None:
        try:
            limit.check(value)
        except (TurbofedError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return value


@dataclass(frozen=True)
class ModelSettings:
    """The learner, its training budget and the federation schedule.

    Defaults are justified on validation engines only (a fifth of each site's training
    engines held out, `turbofed bench accuracy --validation`; docs/accuracy.md), never on
    the official test sets: mini-batches of 256, not 64, lowered the federated model's mean
    validation RMSE (seeds 0 and 1) on FD001 (13.90 vs 14.43), FD002 (15.09 vs 16.24) and on
    every subset of the 8-site FD001+FD002+FD003+FD004 fleet (FD003: 14.72 vs 17.96): fewer,
    larger local steps keep non-IID sites from drifting apart between averages. A (128, 64)
    network and 160 rounds did no better there. The (64, 32) MLP, Adam at 3e-3, alpha 1e-4 and
    the 30-cycle window were re-checked on validation against windows of 20, 40 and 50, rates
    of 1e-3 and 1e-2, a (32, 16) network and alpha 1e-3: none did better on both the 4-site
    and the 8-site fleets (docs/accuracy.md). Nor did (seeds 0-2, FD001 and FD002; defaults'
    mean federated RMSE 13.99 and 14.38) averaging the last 5/10/20 rounds' global models
    (14.00/14.03/14.14 and 14.39/14.39/14.40), a cosine rate decay to 0.1x (14.74, 14.08)
    or 2 local epochs in 40 rounds (14.64, 14.59). With ten seeds (rules fixed before the runs;
    defaults 12.55 and 14.41), a 40-cycle window and RUL caps of 120, 130 and 140 did not
    either (none better on both subsets and the 8-site fleet).
    """

    kind: str = "mlp"  # "mlp" (MLPRegressor, Adam) or "sgd" (SGDRegressor)
    hidden: tuple[int, ...] = (64, 32)
    learning_rate: float = 3e-3
    batch_size: int = 256
    alpha: float = 1e-4  # L2 penalty
    window: int = DEFAULT_WINDOW
    rul_cap: float = 125.0  # labels capped and predictions clipped here; the literature's, kept on validation
    rounds: int = 80
    local_epochs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(type(self), {f.name: getattr(self, f.name) for f in fields(self)}, "model settings")
        if self.kind == "mlp" and not self.hidden:
            raise ConfigError(f"model settings hidden must be at least one layer size for an mlp, got {self.hidden!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model settings") -> "ModelSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where} unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = check_fields(cls, d, where)
        if values.get("kind", "mlp") == "mlp" and values.get("hidden") == ():
            raise ConfigError(f"{where} hidden must be at least one layer size for an mlp, got []")
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelSettings":
        return ModelSettings.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


DEFAULT_DATA_DIR = Path("data/cmapss")


def resolve_data_dir(cli_value: str | os.PathLike | None = None) -> Path:
    """The C-MAPSS folder: --data-dir, else $TURBOFED_DATA_DIR, else data/cmapss/."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get("TURBOFED_DATA_DIR")
    return Path(env) if env else DEFAULT_DATA_DIR


# --- TOML files: one per site (`turbofed edge`), one for the fleet (`turbofed aggregator`) ---


TLS_PORT = 8883


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and who we are to it.

    With `ca` (the fleet's CA certificate) the client speaks TLS and verifies the broker
    against that CA; `cert`/`key` are this client's identity (`turbofed fleet init` writes
    them; the broker takes the certificate's CN as the MQTT username). `tls` defaults to
    true when a `ca` is given; in a TOML file the port then defaults to 8883.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = "tfl/v1"
    plant_root: str = "plant"
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    tls: bool | None = None

    def __post_init__(self) -> None:
        if self.tls is None:
            object.__setattr__(self, "tls", self.ca is not None)

    @property
    def identity(self) -> str | None:
        """The CN of our client certificate (the broker's name for us), if we have one."""
        if not self.cert:
            return None
        try:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            cert = x509.load_pem_x509_certificate(Path(self.cert).read_bytes())
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return str(names[0].value) if names else None
        except (OSError, ValueError):
            return None


_TLS_KEYS = ("ca", "cert", "key")


def _load_broker(path: Path, raw: dict[str, Any]) -> BrokerSettings:
    """The [broker] table: TLS paths relative to the file, checked now (a missing CA or an
    unreadable key is a one-line error naming file and key, not a TLS traceback later)."""
    where = f"{path}: [broker]"
    values = dict(raw)
    for name in _TLS_KEYS:
        if name in values:
            if not isinstance(values[name], str) or not values[name]:
                raise ConfigError(f"{where} {name} must be a file path, got {values[name]!r}")
            values[name] = _relative(path.parent, values[name])
    if "tls" in values and not isinstance(values["tls"], bool):
        raise ConfigError(f"{where} tls must be true or false, got {values['tls']!r}")
    if values.get("tls", "ca" in values) and "port" not in values:
        values["port"] = TLS_PORT
    broker = _build(BrokerSettings, values, where)
    check_tls_files(broker, where)
    return broker


def check_tls_files(broker: BrokerSettings, where: str) -> None:
    """Refuse TLS settings that cannot work: no CA, a cert without its key (or the reverse),
    a missing or unreadable file, or a private key other users may read (like ssh, we
    refuse a group- or world-readable key instead of warning: a leaked key is a site
    another party can impersonate)."""
    if not broker.tls:
        if broker.cert or broker.key:
            raise ConfigError(f"{where} cert/key are set but tls is false; set tls = true and ca")
        return
    if not broker.ca:
        raise ConfigError(f"{where} tls = true needs ca (the fleet's CA certificate)")
    if bool(broker.cert) != bool(broker.key):
        raise ConfigError(f"{where} cert and key go together (the client identity); got only {'cert' if broker.cert else 'key'}")
    for name in _TLS_KEYS:
        value = getattr(broker, name)
        if value is None:
            continue
        file = Path(value)
        try:
            with open(file, "rb") as handle:
                handle.read(1)
        except FileNotFoundError:
            raise ConfigError(f"{where} {name}: {file} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"{where} {name}: {file} is not readable: {exc.strerror or exc}") from None
        if name == "key" and os.name == "posix" and file.stat().st_mode & 0o077:
            raise ConfigError(f"{where} key: {file} is readable by other users (mode {file.stat().st_mode & 0o777:o}); "
                              f"chmod 600 it")


@dataclass(frozen=True)
class IdentitySettings:
    """A site's `[identity]` table: the fleet it belongs to, its own Ed25519 signing key and the
    aggregator's public key it pins (paths relative to the config file, checked at load)."""

    fleet_id: str
    signing_key: str
    aggregator_key: str


_NO_IDENTITY = ("set insecure_unsigned = true only for the development broker or tests "
                "(nothing is then signed or verified)")


@dataclass(frozen=True)
class SiteConfig:
    """One edge agent: who it is, where the broker is, what it watches, where it keeps state.

    Secure is the default: without `identity` the config must say `insecure_unsigned = True`."""

    site: str
    state_dir: str
    engines: tuple[str, ...] | None = None  # None: every engine published under the site
    broker: BrokerSettings = BrokerSettings()
    buffer_rows: int = 100_000  # labelled rows kept for training; oldest engines go first
    min_samples: int = 200  # fewer labelled rows than this: the site sits the round out
    # Share of failed engines held out of training (fixed per engine by a hash of site and engine:
    # edge/buffer.py is_held_out). They serve twice, never trained on: each round both models are
    # scored on them (the learning curve, Metrics on "validation"), and they calibrate the fleet's
    # conformal RUL intervals (edge/calibration.py; a fleet with [intervals] needs sites that hold
    # some out). 0: every failed engine trains, no learning curve and no intervals from this site.
    holdout_share: float = 0.0
    history_cycles: int = 2_000  # longest history kept per engine before failure
    predictions_every_s: float = 1.0
    share_sensors: bool = False  # raw sensor rows never leave the site unless this is set
    min_stats_engines: int = 5  # statistics are shared only over at least this many labelled engines
    max_stats_window: int = 250  # a statistics request for a longer window is unaffordable: refused
    # Engines tracked at once; a new engine beyond this is refused (TOO_MANY_ENGINES) unless an idle one
    # can be forgotten. A turbofan site has tens to hundreds of engines: 1,000 leaves room for renumbering
    # and spares while bounding memory (~0.4 MB per engine at the default history_cycles: ~0.4 GB worst case).
    max_engines: int = 1_000
    engine_idle_s: float = 7 * 24 * 3600.0  # an engine not heard from for this long is forgotten
    sensor_abs_max: float = 1e6  # plausibility bound on every sensor and setting value (absolute)
    # Reports waiting for the broker (edge/outbox.py), payload bytes. 16 MiB holds a day of predictions
    # for 100 engines reporting every minute (~6 MB) plus a few updates; beyond it the oldest predictions go.
    outbox_max_bytes: int = 16 * 1024 * 1024
    identity: IdentitySettings | None = None
    insecure_unsigned: bool = False
    # Prometheus /metrics (turbofed.observability; needs the [metrics] extra): off unless a port is given.
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _secure_or_explicit(self.identity is not None, self.insecure_unsigned, f"site {self.site}", "[identity] table")


# The aggregation strategy a fleet runs unless fleet.toml names another: chosen by
# `turbofed bench attack` on validation engines (README, "Robust aggregation"): within 7% of
# its clean RMSE under every attack there with one site of five (FD001) and two of ten
# (synthetic) compromised, and within 1% of FedAvg without an attack.
DEFAULT_STRATEGY = "filtered-fedavg"


@dataclass(frozen=True)
class StrategySettings:
    """Which aggregation strategy the fleet runs, with its parameters: fleet.toml's
    `[strategy]` table (`name` plus parameters) or a plain `strategy = "name"`.

    Only the shape is checked here (the core imports no room); the aggregator checks the
    parameters against the strategy class (turbofed.aggregator.strategies.make_strategy)
    before it starts. `where` prefixes those errors, e.g. "fleet.toml: [strategy]".
    """

    name: str = DEFAULT_STRATEGY
    params: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="[strategy]", compare=False)


@dataclass(frozen=True)
class PrivacySettings:
    """Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018): fleet.toml's
    `[privacy]` table; docs/privacy.md. Exactly one of `noise_multiplier` (sigma) and
    `target_epsilon` (sigma calibrated for `[model] rounds`); `epsilon_budget` defaults to
    `target_epsilon` (or unlimited). `expected_sites` is the fixed denominator of the noised
    sum (default: every site). `mode = "distributed"`: each site clips and noises its own
    delta as the round announcement asks. `seed` fixes the noise: benchmarks and tests only."""

    clip_norm: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    mode: str = "central"
    epsilon_budget: float | None = None
    expected_sites: int | None = None
    accountant: str = "rdp"
    seed: int | None = None


@dataclass(frozen=True)
class IntervalSettings:
    """Conformal RUL intervals (turbofed/conformal.py): fleet.toml's `[intervals]` table. After
    the last round the aggregator asks the sites for residual histograms of the final model on
    their calibration engines (SiteConfig.holdout_share) and ships the interval table at
    `coverage` with the final announcement; a Mondrian group with fewer than
    `min_group_residuals` residuals uses the pooled ones."""

    coverage: float = 0.9
    min_group_residuals: int = 100


@dataclass(frozen=True)
class BufferedRounds:
    """Buffered asynchronous rounds (FedBuff: Nguyen et al., "Federated Learning with Buffered
    Asynchronous Aggregation", AISTATS 2022): fleet.toml's `[buffered_rounds]` table;
    docs/scaling.md. A round closes once `size` updates are in (0: the quorum) or at its
    deadline; an update trained from a global model up to `max_staleness` versions old is
    still taken, its delta scaled by 1 / (1 + staleness) ** `staleness_exponent`."""

    size: int = 0
    max_staleness: int = 4
    staleness_exponent: float = 0.5


@dataclass(frozen=True)
class SecureAggregationSettings:
    """Secure aggregation (Bonawitz et al., CCS 2017): fleet.toml's `[secure_aggregation]`
    table; docs/privacy.md. The aggregator learns only the weighted sum of the sites' deltas
    (and the fleet totals of the statistics), as long as fewer than `threshold` sites collude
    with it. `threshold` 0: a majority of the sites in the round. `neighbours` > 0: SecAgg+
    (Bell et al., CCS 2020), each site masks with k neighbours only. A delta is cut to
    +-`clip` per coordinate and sent in `bits`-bit fixed point (the scale is the finest the
    fleet's size leaves room for); a site weighs ceil(samples / weight_unit), at most
    `max_weight` (1 under differential privacy). Each phase after the first ends
    `phase_timeout_s` after it opened or after its latest answer, if not every site still in
    has answered by then."""

    threshold: int = 0
    neighbours: int = 0
    bits: int = 32
    clip: float = 4.0
    weight_unit: int = 256
    max_weight: int = 64
    phase_timeout_s: float = 30.0


@dataclass(frozen=True)
class FleetConfig:
    """The aggregator: the sites it expects, the schedule, the strategy and where results go."""

    sites: tuple[str, ...]
    store: str
    registry: str
    model: ModelSettings = ModelSettings()
    strategy: StrategySettings = StrategySettings()
    privacy: PrivacySettings | None = None  # [privacy]: client-level differential privacy (docs/privacy.md)
    secure_aggregation: SecureAggregationSettings | None = None  # [secure_aggregation] (docs/privacy.md)
    buffered_rounds: BufferedRounds | None = None  # [buffered_rounds]: FedBuff (docs/scaling.md); synchronous without
    intervals: IntervalSettings | None = None  # [intervals]: conformal RUL intervals (turbofed/conformal.py); none without
    quorum: int | None = None  # updates that close a round early; default: every site
    round_deadline_s: float = 120.0
    stats_retry_s: float = 5.0
    min_samples: int = 200
    max_update_bytes: int = 1024 * 1024
    broker: BrokerSettings = BrokerSettings()
    influx: dict[str, Any] | None = None  # [influx] table: url, org, bucket, token, ... (docs/telemetry.md)

    pki: str | None = None  # the fleet's identity folder (`turbofed fleet init`): fleet id, signing keys
    insecure_unsigned: bool = False  # without pki: sign and verify nothing (development only)
    epoch: int = 0  # fleet reset counter, sent in signed round announcements (docs/protocol.md); a floor: `--reset` raises it
    max_site_share: float = 0.5  # no update weighs more than this share of a round's total (docs/operations.md)
    max_empty_rounds: int = 3  # rounds in a row without a usable update before the aggregator reports `stalled`
    stall_retry_s: float = 300.0  # while stalled: re-announce the round this often (and when a site comes back online)
    # A new global model whose median RMSE on the sites' own labelled rows is more than this
    # much worse than the last good model's (0.25 = 25%) is rolled back (aggregator/rollback.py); 0: never.
    rollback_margin: float = 0.25
    # Prometheus /metrics (turbofed.observability; needs the [metrics] extra): off unless a port is given.
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    # [regions]: region -> its sites; their updates reach this aggregator only as the region's
    # signed partial (aggregator/regional.py, docs/scaling.md). Sites in no region send directly.
    regions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # workers = [ids]: shared-subscription ingestion workers (aggregator/regional.py, docs/scaling.md). With
    # workers, sites in no region reach this aggregator only through the workers' signed batch partials.
    workers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _secure_or_explicit(self.pki is not None, self.insecure_unsigned, "fleet", "pki folder")

    @functools.cached_property
    def direct_sites(self) -> frozenset[str]:
        """The sites in no region: they send to this aggregator, or with workers to the workers."""
        return frozenset(self.sites) - set(self._site_regions)

    @property
    def effective_quorum(self) -> int:
        return self.quorum or len(self.sites)

    def region_of(self, site: str) -> str | None:
        """The region whose partial carries `site`'s updates, or None (it sends directly)."""
        return self._site_regions.get(site)

    @functools.cached_property
    def _site_regions(self) -> dict[str, str]:
        return {site: region for region, sites in self.regions.items() for site in sites}


@dataclass(frozen=True)
class RegionConfig:
    """A regional aggregator (`turbofed region --config region.toml`): its region id (an
    identity of role region in the fleet's identity folder), the sites it serves, its
    regional broker, and when it sends its partial: once `quorum` of its sites answered
    (default all), or `close_before_s` before the round's deadline."""

    region: str
    sites: tuple[str, ...]
    pki: str | None = None  # (a copy of) the fleet's identity folder: public keys and this region's own key
    insecure_unsigned: bool = False
    broker: BrokerSettings = BrokerSettings()
    quorum: int | None = None
    close_before_s: float = 5.0
    max_update_bytes: int = 1024 * 1024
    max_site_share: float = 0.5  # applied among the region's sites (docs/scaling.md)
    # What a partial tells the top aggregator of each site: "summary" (which sites answered, and
    # totals: the top records those sites without weight or norm; the partial stays one update's
    # size) or "full" (weight, claim, bytes, delta norm: 2-10 bytes a site on the wire, for an
    # audit at the top). A worker's batch always names its sites. docs/scaling.md.
    site_records: str = "summary"
    # An ingestion worker (docs/scaling.md): updates come from the shared subscription
    # $share/<shared_group>/<root>/sites/+/update, and a batch partial goes out after `batch`
    # updates (at most 16: Mosquitto's default max_inflight_messages is 20, and a worker acks an
    # update only once its partial is at the broker) or `flush_s` after its first unsent update.
    shared_group: str | None = None
    batch: int = 16
    flush_s: float = 0.5

    def __post_init__(self) -> None:
        _secure_or_explicit(self.pki is not None, self.insecure_unsigned, f"region {self.region}", "pki folder")

    @property
    def worker(self) -> bool:
        return self.shared_group is not None

    @property
    def effective_quorum(self) -> int:
        return self.quorum or len(self.sites)


def load_region_config(path: str | Path) -> RegionConfig:
    """Read a region TOML file; every value is checked, errors name the file and the key."""
    path = Path(path)
    raw = _read_toml(path)
    _secure_or_explicit("pki" in raw, raw.get("insecure_unsigned", False), str(path), "pki folder (pki = \"pki\")")
    if "pki" in raw:
        if not isinstance(raw["pki"], str) or not raw["pki"].strip():
            raise ConfigError(f"{path}: pki must be the path of the fleet's identity folder")
        raw["pki"] = _relative(path.parent, raw["pki"])
    broker = _load_broker(path, _table(raw, "broker", path))
    config = _build(RegionConfig, {**raw, "broker": broker}, f"{path}:")
    if config.quorum is not None and config.quorum > len(config.sites):
        raise ConfigError(f"{path}: quorum must be between 1 and the number of sites ({len(config.sites)}), got {config.quorum}")
    if config.worker and raw.get("site_records", "full") != "full":
        raise ConfigError(f"{path}: site_records must be \"full\" for a worker (shared_group): a batch names its sites, "
                          "since the top cannot know which of the fleet's sites a worker was handed")
    return replace(config, site_records="full") if config.worker else config


def _regions(value: Any, sites: tuple[str, ...], path: Path) -> dict[str, tuple[str, ...]]:
    """fleet.toml's `[regions]` table: region id = [its sites], each a site of the fleet, in one region only."""
    from turbofed.topics import TopicError, validate_id

    where = f"{path}: [regions]"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table of region = [site ids], got {value!r:.60}")
    regions: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for region, members in value.items():
        try:
            validate_id(region, "region id")
        except TopicError as exc:
            raise ConfigError(f"{where} {exc}") from None
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{where} {region} must be a non-empty list of site ids, got {members!r:.60}")
        for site in members:
            if site not in sites:
                raise ConfigError(f"{where} {region}: site {site!r} is not in the fleet's sites")
            if site in seen:
                raise ConfigError(f"{where} {region}: site {site!r} is already in region {seen[site]!r}")
            seen[site] = region
        regions[region] = tuple(members)
    return regions


def _workers(value: Any, config: FleetConfig, path: Path) -> tuple[str, ...]:
    """fleet.toml's `workers = [ids]`: ingestion workers, each an identity of role region
    whose id is no region's; they send batch sums, so nothing that needs each update."""
    from turbofed.topics import TopicError, validate_id

    where = f"{path}: workers"
    if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value) or len(set(value)) != len(value):
        raise ConfigError(f"{where} must be a non-empty list of distinct worker ids, got {value!r:.60}")
    for worker in value:
        try:
            validate_id(worker, "worker id")
        except TopicError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if worker in config.regions:
            raise ConfigError(f"{where}: {worker!r} is already a region in [regions]")
    if config.secure_aggregation is not None or config.privacy is not None or config.buffered_rounds is not None:
        raise ConfigError(f"{where} cannot run with [secure_aggregation], [privacy] or [buffered_rounds] "
                          "(a worker sends a plain weighted sum of fresh updates: docs/scaling.md)")
    if config.max_site_share < 1:
        raise ConfigError(f"{where} needs max_site_share = 1: a worker's batch sum hides each update, so the "
                          f"fleet-wide share cap ({config.max_site_share:g}) cannot be applied (docs/scaling.md)")
    if not config.direct_sites:
        raise ConfigError(f"{where}: every site is in a region, so workers would have nothing to ingest")
    return tuple(value)


def require_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove it writable now, at start, not at the first save;
    ConfigError names `what` (e.g. "site.toml: state_dir") and the path otherwise."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {str(folder)!r} is not a writable folder: {exc.strerror or exc}") from None
    return folder


def _secure_or_explicit(has_keys: bool, insecure: Any, where: str, what: str) -> None:
    """Signed messages unless the config explicitly (a TOML boolean) turns them off."""
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: insecure_unsigned must be true or false, got {insecure!r}")
    if has_keys and insecure:
        raise ConfigError(f"{where}: insecure_unsigned = true and a {what} contradict each other; keep one")
    if not has_keys and not insecure:
        raise ConfigError(f"{where}: no {what}: messages are signed and checked by default; {_NO_IDENTITY}")


def _identity(path: Path, raw: dict[str, Any]) -> IdentitySettings | None:
    """The `[identity]` table, its key files resolved and read now (a bad key stops the start)."""
    from turbofed.signing import KeyFileError, SigningKey, load_public_key

    _secure_or_explicit("identity" in raw, raw.get("insecure_unsigned", False), str(path), "[identity] table")
    table = raw.pop("identity", None)
    if table is None:
        return None
    where = f"{path}: [identity]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table (fleet_id, signing_key, aggregator_key)")
    identity = _build(IdentitySettings, table, where)
    if not identity.fleet_id.strip() or len(identity.fleet_id) > 128 or not identity.fleet_id.isprintable():
        raise ConfigError(f"{where} fleet_id must be printable text of 1 to 128 characters")
    signing, aggregator = _relative(path.parent, identity.signing_key), _relative(path.parent, identity.aggregator_key)
    for key, file, load in (("signing_key", signing, lambda f: SigningKey.load("site", f)), ("aggregator_key", aggregator, load_public_key)):
        try:
            load(file)
        except KeyFileError as exc:
            raise ConfigError(f"{where} {key}: {exc}") from None
    return IdentitySettings(identity.fleet_id, signing, aggregator)


def _read_toml(path: str | Path) -> dict[str, Any]:
    import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _build(cls: type, values: Any, where: str) -> Any:
    """`cls` from one TOML table, every value checked; `where` is "file:" or "file: [table]"."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table, got {values!r:.60}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where} unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [n for n, f in known.items() if n not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where} missing key(s) {', '.join(missing)}")
    return cls(**check_fields(cls, values, where))


def _table(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    """A sub-table ([broker], [model]) popped from `raw`; anything but a table is named."""
    value = raw.pop(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key} must be a table ([{key}]), got {value!r:.60}")
    return value


def _relative(base: Path, value: str) -> str:
    """Paths in a config file are relative to the file, not to wherever the command runs."""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site TOML file; every value is checked, errors name the file and the key."""
    path = Path(path)
    raw = _read_toml(path)
    raw["identity"] = _identity(path, raw)
    broker = _load_broker(path, _table(raw, "broker", path))
    if raw.get("engines") == "*":
        raw["engines"] = None
    elif "engines" in raw and not isinstance(raw["engines"], list):
        raise ConfigError(f"{path}: engines must be \"*\" or a list of engine ids, got {raw['engines']!r:.60}")
    config = _build(SiteConfig, {**raw, "broker": broker}, f"{path}:")
    return replace(config, state_dir=_relative(path.parent, config.state_dir))


@dataclass(frozen=True)
class GatewayConfig:
    """A site's sensor gateway: the site whose readings it publishes (plant/<site>/<engine>/...)
    and how it reaches the broker (on a secure broker, as identity gateway-<site>)."""

    site: str
    broker: BrokerSettings = BrokerSettings()


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read a gateway TOML file (`turbofed replay --gateway FILE`); errors name the file and the key."""
    path = Path(path)
    raw = _read_toml(path)
    broker = _load_broker(path, _table(raw, "broker", path))
    return _build(GatewayConfig, {**raw, "broker": broker}, f"{path}:")


def load_fleet_config(path: str | Path, keys: bool = True) -> FleetConfig:
    """Read the fleet TOML file; every value is checked, errors name the file and the key.
    `keys=False` (for `turbofed fleet init`, which creates the pki folder) skips the signing keys."""
    path = Path(path)
    raw = _read_toml(path)
    if not keys:
        raw.pop("pki", None)
        raw["insecure_unsigned"] = True
    else:
        _secure_or_explicit("pki" in raw, raw.get("insecure_unsigned", False), str(path), "pki folder (pki = \"pki\")")
    if "pki" in raw:
        if not isinstance(raw["pki"], str) or not raw["pki"].strip():
            raise ConfigError(f"{path}: pki must be the path of the fleet's identity folder")
        raw["pki"] = _relative(path.parent, raw["pki"])
        from turbofed.messages.signed import FleetKeys

        try:
            FleetKeys.load(raw["pki"])
        except ConfigError as exc:
            raise ConfigError(f"{path}: pki: {exc}") from None
    broker = _load_broker(path, _table(raw, "broker", path))
    model = ModelSettings.from_dict(_table(raw, "model", path), f"{path}: [model]")
    secure = raw.pop("secure_aggregation", None)
    secure = None if secure is None else _build(SecureAggregationSettings, secure, f"{path}: [secure_aggregation]")
    # With secure aggregation the aggregator sees only a sum: the default strategy is FedAvg.
    strategy = _strategy_settings(raw.pop("strategy", "fedavg" if secure else DEFAULT_STRATEGY), path)
    privacy = _privacy_settings(raw.pop("privacy", None), path)
    buffered = raw.pop("buffered_rounds", None)
    buffered = None if buffered is None else _build(BufferedRounds, buffered, f"{path}: [buffered_rounds]")
    intervals = raw.pop("intervals", None)
    intervals = None if intervals is None else _build(IntervalSettings, intervals, f"{path}: [intervals]")
    regions = raw.pop("regions", None)
    workers = raw.pop("workers", None)
    config = _build(FleetConfig, {**raw, "broker": broker, "model": model, "strategy": strategy, "privacy": privacy,
                                  "secure_aggregation": secure, "buffered_rounds": buffered, "intervals": intervals}, f"{path}:")
    if buffered is not None and secure is not None:
        raise ConfigError(f"{path}: [buffered_rounds] cannot run with [secure_aggregation]: a secure sum takes every "
                          "site's update from the same global model, in one session")
    if regions is not None:
        config = replace(config, regions=_regions(regions, config.sites, path))
        if secure is not None or privacy is not None or buffered is not None:
            raise ConfigError(f"{path}: [regions] cannot run with [secure_aggregation], [privacy] or [buffered_rounds] "
                              "(a region sends a plain weighted sum of fresh updates: docs/scaling.md)")
    if workers is not None:
        config = replace(config, workers=_workers(workers, config, path))
    if privacy is not None and (privacy.expected_sites or 0) > len(config.sites):
        raise ConfigError(f"{path}: [privacy] expected_sites must be at most the number of sites ({len(config.sites)}), "
                          f"got {privacy.expected_sites}")
    if secure is not None:
        _check_secure(config, secure, path)
    if not 1 <= config.effective_quorum <= len(config.sites):
        raise ConfigError(f"{path}: quorum must be between 1 and the number of sites ({len(config.sites)}), got {config.quorum}")
    is_url = config.store == "influxdb" or "://" in config.store
    store = config.store if is_url else _relative(path.parent, config.store)
    return replace(config, store=store, registry=_relative(path.parent, config.registry))


def _strategy_settings(value: Any, path: Path) -> StrategySettings:
    """`strategy = "name"` or a `[strategy]` table with `name` and scalar parameters."""
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{path}: strategy must be a non-empty name")
        return StrategySettings(value, {}, f"{path}: strategy")
    where = f"{path}: [strategy]"
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: strategy must be a name or a [strategy] table, got {value!r}")
    params = dict(value)
    name = params.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where} name must be a non-empty string (a built-in strategy, \"module:Class\" "
                          f"or an entry point), got {name!r}")
    for key, v in params.items():
        if not isinstance(v, (bool, int, float, str)):
            raise ConfigError(f"{where} {key} must be a number, string or boolean, got {v!r}")
    return StrategySettings(name, params, where)


def _check_secure(config: FleetConfig, secure: SecureAggregationSettings, path: Path) -> None:
    """What secure aggregation needs of the rest of fleet.toml (the strategy is checked by
    the aggregator, which knows which strategies need individual updates)."""
    where = f"{path}: [secure_aggregation]"
    if config.pki is None:
        raise ConfigError(f"{where} needs the fleet's identity folder (pki): its messages are signed like every other")
    if len(config.sites) > 1024 or len(config.sites) < 2:
        raise ConfigError(f"{where} works with 2 to 1024 sites (Shamir shares are indexed by site), this fleet has {len(config.sites)}")
    if secure.threshold > len(config.sites) or secure.threshold == 1:
        raise ConfigError(f"{where} threshold must be 0 (a majority) or between 2 and the number of sites "
                          f"({len(config.sites)}), got {secure.threshold}")
    if secure.neighbours and secure.threshold > secure.neighbours + 1:
        raise ConfigError(f"{where} threshold ({secure.threshold}) counts within a neighbourhood of neighbours + 1 "
                          f"({secure.neighbours + 1}) sites: lower it or raise neighbours")
    if config.privacy is not None and config.privacy.mode != "distributed":
        raise ConfigError(f"{where} needs [privacy] mode = \"distributed\": with secure aggregation the aggregator "
                          "cannot clip one site's delta, so each site clips and noises its own")


def _privacy_settings(value: Any, path: Path) -> PrivacySettings | None:
    """The `[privacy]` table: checked key by key, then sigma and the target/budget together."""
    if value is None:
        return None
    where = f"{path}: [privacy]"
    settings = _build(PrivacySettings, value, where)
    if (settings.noise_multiplier is None) == (settings.target_epsilon is None):
        raise ConfigError(f"{where} give exactly one of noise_multiplier (sigma) and target_epsilon")
    if settings.target_epsilon is not None and settings.epsilon_budget is not None and settings.epsilon_budget < settings.target_epsilon:
        raise ConfigError(f"{where} epsilon_budget ({settings.epsilon_budget:g}) is below target_epsilon "
                          f"({settings.target_epsilon:g}): the calibrated rounds could never run")
    return settings
