"""Settings shared by the edge, the aggregator and the benchmarks.

`ModelSettings` travels in every round announcement, so a site trains exactly what the
aggregator asked for. It holds plain values only (no scikit-learn import).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from turbofed.errors import ConfigError
from turbofed.spec import DEFAULT_WINDOW


@dataclass(frozen=True)
class ModelSettings:
    """The learner, its training budget and the federation schedule.

    Defaults were chosen on FD001 and FD001+FD003 (see the README's accuracy table): a
    (64, 32) MLP with Adam on 57 features of a 30-cycle window and each engine's baseline,
    mini-batches of 64, and many short rounds (80 rounds of 1 local epoch): short rounds
    keep sites with different fault modes from drifting apart between averages. On FD003
    (seed 0) federated/central was 1.24x after 40 rounds and 1.12x after 80 (the limit).
    """

    kind: str = "mlp"  # "mlp" (MLPRegressor, Adam) or "sgd" (SGDRegressor)
    hidden: tuple[int, ...] = (64, 32)
    learning_rate: float = 3e-3
    batch_size: int = 64
    alpha: float = 1e-4  # L2 penalty
    window: int = DEFAULT_WINDOW
    rul_cap: float = 125.0
    rounds: int = 80
    local_epochs: int = 1
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
    where = f"{path} [broker]"
    values = dict(raw)
    for name in _TLS_KEYS:
        if name in values:
            if not isinstance(values[name], str) or not values[name]:
                raise ConfigError(f"{where}: {name} must be a file path, got {values[name]!r}")
            values[name] = _relative(path.parent, values[name])
    if "tls" in values and not isinstance(values["tls"], bool):
        raise ConfigError(f"{where}: tls must be true or false, got {values['tls']!r}")
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
            raise ConfigError(f"{where}: cert/key are set but tls is false; set tls = true and ca")
        return
    if not broker.ca:
        raise ConfigError(f"{where}: tls = true needs ca (the fleet's CA certificate)")
    if bool(broker.cert) != bool(broker.key):
        raise ConfigError(f"{where}: cert and key go together (the client identity); got only {'cert' if broker.cert else 'key'}")
    for name in _TLS_KEYS:
        value = getattr(broker, name)
        if value is None:
            continue
        file = Path(value)
        try:
            with open(file, "rb") as handle:
                handle.read(1)
        except FileNotFoundError:
            raise ConfigError(f"{where}: {name}: {file} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"{where}: {name}: {file} is not readable: {exc.strerror or exc}") from None
        if name == "key" and os.name == "posix" and file.stat().st_mode & 0o077:
            raise ConfigError(f"{where}: key: {file} is readable by other users (mode {file.stat().st_mode & 0o777:o}); "
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
    history_cycles: int = 2_000  # longest history kept per engine before failure
    predictions_every_s: float = 1.0
    share_sensors: bool = False  # raw sensor rows never leave the site unless this is set
    identity: IdentitySettings | None = None
    insecure_unsigned: bool = False

    def __post_init__(self) -> None:
        _secure_or_explicit(self.identity is not None, self.insecure_unsigned, f"site {self.site}", "[identity] table")


@dataclass(frozen=True)
class StrategySettings:
    """Which aggregation strategy the fleet runs, with its parameters: fleet.toml's
    `[strategy]` table (`name` plus parameters) or a plain `strategy = "name"`.

    Only the shape is checked here (the core imports no room); the aggregator checks the
    parameters against the strategy class (turbofed.aggregator.strategies.make_strategy)
    before it starts. `where` prefixes those errors, e.g. "fleet.toml: [strategy]".
    """

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="[strategy]", compare=False)


@dataclass(frozen=True)
class FleetConfig:
    """The aggregator: the sites it expects, the schedule, the strategy and where results go."""

    sites: tuple[str, ...]
    store: str
    registry: str
    model: ModelSettings = ModelSettings()
    strategy: StrategySettings = StrategySettings()
    quorum: int | None = None  # updates that close a round early; default: every site
    round_deadline_s: float = 120.0
    stats_retry_s: float = 5.0
    min_samples: int = 200
    max_update_bytes: int = 1024 * 1024
    broker: BrokerSettings = BrokerSettings()
    influx: dict[str, Any] | None = None  # [influx] table: url, org, bucket, token, ... (docs/telemetry.md)
    pki: str | None = None  # the fleet's identity folder (`turbofed fleet init`): fleet id, signing keys
    insecure_unsigned: bool = False  # without pki: sign and verify nothing (development only)
    epoch: int = 0  # fleet reset counter, sent in signed round announcements (docs/protocol.md)

    def __post_init__(self) -> None:
        _secure_or_explicit(self.pki is not None, self.insecure_unsigned, "fleet", "pki folder")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or not 0 <= self.epoch <= 2**53 - 1:
            raise ConfigError(f"fleet: epoch must be a whole number in [0, 2^53-1], got {self.epoch!r}")

    @property
    def effective_quorum(self) -> int:
        return self.quorum or len(self.sites)


def _secure_or_explicit(has_keys: bool, insecure: Any, where: str, what: str) -> None:
    """Signed messages unless the config explicitly (a TOML boolean) turns them off."""
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: insecure_unsigned must be true or false, got {insecure!r}")
    if has_keys and insecure:
        raise ConfigError(f"{where}: insecure_unsigned = true and a {what} contradict each other; keep one")
    if not has_keys and not insecure:
        raise ConfigError(f"{where}: no {what}: messages are signed and checked by default; {_NO_IDENTITY}")


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


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [n for n, f in known.items() if n not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    for name, value in values.items():
        expected = known[name].type
        if expected in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        if expected == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _relative(base: Path, value: str) -> str:
    """Paths in a config file are relative to the file, not to wherever the command runs."""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _identity(path: Path, raw: dict[str, Any]) -> IdentitySettings | None:
    """The `[identity]` table, its key files resolved and read now (a bad key stops the start)."""
    from turbofed.signing import KeyFileError, SigningKey, load_public_key

    _secure_or_explicit("identity" in raw, raw.get("insecure_unsigned", False), str(path), "[identity] table")
    table = raw.pop("identity", None)
    if table is None:
        return None
    where = f"{path} [identity]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table (fleet_id, signing_key, aggregator_key)")
    identity = _build(IdentitySettings, table, where)
    if not identity.fleet_id.strip() or len(identity.fleet_id) > 128 or not identity.fleet_id.isprintable():
        raise ConfigError(f"{where}: fleet_id must be printable text of 1 to 128 characters")
    signing, aggregator = _relative(path.parent, identity.signing_key), _relative(path.parent, identity.aggregator_key)
    for key, file, load in (("signing_key", signing, lambda f: SigningKey.load("site", f)), ("aggregator_key", aggregator, load_public_key)):
        try:
            load(file)
        except KeyFileError as exc:
            raise ConfigError(f"{where} {key}: {exc}") from None
    return IdentitySettings(identity.fleet_id, signing, aggregator)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site TOML file; errors name the file and the key."""
    path = Path(path)
    raw = _read_toml(path)
    raw["identity"] = _identity(path, raw)
    broker = _load_broker(path, raw.pop("broker", {}))
    if "engines" in raw:
        engines = raw["engines"]
        if engines == "*":
            raw["engines"] = None
        elif isinstance(engines, list) and all(isinstance(e, str) for e in engines):
            raw["engines"] = tuple(engines)
        else:
            raise ConfigError(f"{path}: engines must be \"*\" or a list of engine ids")
    config = _build(SiteConfig, {**raw, "broker": broker}, str(path))
    from turbofed.topics import TopicError, validate_site

    try:
        validate_site(config.site)
    except TopicError as exc:
        raise ConfigError(f"{path}: site: {exc}") from None
    return replace(config, state_dir=_relative(path.parent, config.state_dir))


def load_fleet_config(path: str | Path, keys: bool = True) -> FleetConfig:
    """Read the fleet TOML file; errors name the file and the key. `keys=False` (for `turbofed
    fleet init`, which creates the pki folder) skips the signing keys' checks."""
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
    broker = _load_broker(path, raw.pop("broker", {}))
    model = ModelSettings.from_dict(raw.pop("model", {}), f"{path} [model]")
    sites = raw.get("sites")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
        raise ConfigError(f"{path}: sites must be a non-empty list of site ids")
    raw["sites"] = tuple(sites)
    strategy = _strategy_settings(raw.pop("strategy", "fedavg"), path)
    config = _build(FleetConfig, {**raw, "broker": broker, "model": model, "strategy": strategy}, str(path))
    if not 1 <= config.effective_quorum <= len(config.sites):
        raise ConfigError(f"{path}: quorum must be between 1 and the number of sites ({len(config.sites)})")
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
