"""Site and fleet TOML files: defaults, relative paths, and errors that name file and key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from turbofed.config import (
    RANGES,
    BrokerSettings,
    FleetConfig,
    ModelSettings,
    SiteConfig,
    StrategySettings,
    load_fleet_config,
    load_site_config,
)
from turbofed.errors import ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_site_config_with_defaults_and_relative_state(tmp_path: Path) -> None:
    cfg = load_site_config(write(tmp_path, "s.toml", 'insecure_unsigned = true\nsite = "hangar-7"\nstate_dir = "state"\n[broker]\nport = 1884\n'))
    assert cfg.site == "hangar-7" and cfg.engines is None and cfg.broker.port == 1884
    assert cfg.state_dir == str(tmp_path / "state") and not cfg.share_sensors


def test_site_engine_list(tmp_path: Path) -> None:
    cfg = load_site_config(write(tmp_path, "s.toml", 'insecure_unsigned = true\nsite = "a"\nstate_dir = "/var/lib/x"\nengines = ["e1", "e2"]\n'))
    assert cfg.engines == ("e1", "e2") and cfg.state_dir == "/var/lib/x"


@pytest.mark.parametrize(
    "text, message",
    [
        ('insecure_unsigned = true\nsite = "a"\n', r"s.toml: missing key\(s\) state_dir"),
        ('insecure_unsigned = true\nsite = "a"\nstate_dir = "x"\nbufer_rows = 3\n', r"s.toml: unknown key\(s\) bufer_rows"),
        ('insecure_unsigned = true\nsite = "a/b"\nstate_dir = "x"\n', r"s.toml: site: invalid site id 'a/b'"),
        ('insecure_unsigned = true\nsite = "a"\nstate_dir = "x"\n[broker]\nport = "1883"\n', r"s.toml: \[broker\] port must be an integer in 1..65535, got '1883'$"),
        ('insecure_unsigned = true\nsite = "a"\nstate_dir = "x"\nengines = 3\n', r"s.toml: engines must be"),
        ('insecure_unsigned = true\nsite = "a"\nstate_dir = \n', r"s.toml: not valid TOML"),
    ],
)
def test_site_config_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_site_config(write(tmp_path, "s.toml", text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_site_config(tmp_path / "nope.toml")


def test_fleet_config(tmp_path: Path) -> None:
    text = 'insecure_unsigned = true\nsites = ["a", "b", "c"]\nstore = "r.sqlite"\nregistry = "reg"\nquorum = 2\n[model]\nrounds = 3\nhidden = [8]\n'
    cfg = load_fleet_config(write(tmp_path, "f.toml", text))
    assert cfg.sites == ("a", "b", "c") and cfg.effective_quorum == 2
    assert cfg.model.rounds == 3 and cfg.model.hidden == (8,) and cfg.store == str(tmp_path / "r.sqlite")
    influx = load_fleet_config(write(tmp_path, "g.toml", text.replace('"r.sqlite"', '"influxdb"')))
    assert influx.store == "influxdb"
    assert cfg.strategy == StrategySettings("filtered-fedavg", {})  # the default (config.DEFAULT_STRATEGY)


def test_fleet_strategy_as_a_name_or_a_table(tmp_path: Path) -> None:
    base = 'insecure_unsigned = true\nsites = ["a"]\nstore = "r.sqlite"\nregistry = "reg"\n'
    plain = load_fleet_config(write(tmp_path, "f.toml", base + 'strategy = "fedavgm"\n'))
    assert plain.strategy == StrategySettings("fedavgm", {}) and plain.strategy.where == f"{tmp_path / 'f.toml'}: strategy"
    table = base + '[strategy]\nname = "tests.plugins.median:Median"\nserver_lr = 0.5\nflag = true\nlabel = "x"\n'
    cfg = load_fleet_config(write(tmp_path, "g.toml", table))
    assert cfg.strategy == StrategySettings("tests.plugins.median:Median", {"server_lr": 0.5, "flag": True, "label": "x"})
    assert cfg.strategy.where == f"{tmp_path / 'g.toml'}: [strategy]"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("quorum = 4\n", "quorum must be between 1 and the number of sites"),
        ("[model]\nkind = 'lstm'\n", r"f.toml: \[model\] kind must be one of 'mlp', 'sgd', got 'lstm'$"),
        ("[model]\nrounds = 0\n", r"f.toml: \[model\] rounds must be an integer in 1..1000000, got 0$"),
        ("[model]\nepochs = 3\n", r"f.toml: \[model\] unknown setting\(s\) epochs"),
        ("[strategy]\nmomentum = 0.9\n", r"f.toml: \[strategy\] name must be a non-empty string"),
        ("[strategy]\nname = 3\n", r"f.toml: \[strategy\] name must be a non-empty string .*, got 3$"),
        ("[strategy]\nname = \"fedavgm\"\nmomentum = [0.9]\n", r"f.toml: \[strategy\] momentum must be a number, string or boolean, got \[0.9\]$"),
        ("[strategy]\nname = \"fedavgm\"\n[strategy.inner]\nx = 1\n", r"f.toml: \[strategy\] inner must be a number, string or boolean"),
        ("strategy = 3\n", r"f.toml: strategy must be a name or a \[strategy\] table, got 3$"),
        ("strategy = \"\"\n", r"f.toml: strategy must be a non-empty name$"),
    ],
)
def test_fleet_config_errors(tmp_path: Path, extra: str, message: str) -> None:
    text = 'insecure_unsigned = true\nsites = ["a", "b"]\nstore = "r.sqlite"\nregistry = "reg"\n' + extra
    with pytest.raises(ConfigError, match=message):
        load_fleet_config(write(tmp_path, "f.toml", text))


# --- [broker] TLS settings -----------------------------------------------------------


def tls_files(folder: Path, key_mode: int = 0o600) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        (folder / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    (folder / "client.key").chmod(key_mode)


TLS = '[broker]\nca = "id/ca.crt"\ncert = "id/client.crt"\nkey = "id/client.key"\n'


def test_tls_paths_relative_to_the_file_and_tls_on_by_default(tmp_path: Path) -> None:
    tls_files(tmp_path / "id")
    cfg = load_site_config(write(tmp_path, "s.toml", f'site = "a"\nstate_dir = "x"\ninsecure_unsigned = true\n{TLS}'))
    assert cfg.broker.tls is True and cfg.broker.port == 8883
    assert cfg.broker.ca == str(tmp_path / "id" / "ca.crt") and cfg.broker.key == str(tmp_path / "id" / "client.key")
    fleet = load_fleet_config(write(tmp_path, "f.toml", f'sites = ["a"]\nstore = "r"\nregistry = "g"\ninsecure_unsigned = true\n{TLS}port = 1884\n'))
    assert fleet.broker.tls and fleet.broker.port == 1884 and fleet.broker.cert == str(tmp_path / "id" / "client.crt")
    plain = load_site_config(write(tmp_path, "p.toml", 'site = "a"\nstate_dir = "x"\ninsecure_unsigned = true\n'))
    assert plain.broker.tls is False and plain.broker.port == 1883


@pytest.mark.parametrize(
    "broker, message",
    [
        ('ca = "id/nope.crt"\n', r"s.toml: \[broker\] ca: .*nope.crt does not exist"),
        ('ca = "id/ca.crt"\ncert = "id/client.crt"\n', r"s.toml: \[broker\] cert and key go together"),
        ('ca = "id/ca.crt"\ncert = "id/client.crt"\nkey = "id/gone.key"\n', r"s.toml: \[broker\] key: .*gone.key does not exist"),
        ('tls = "yes"\nca = "id/ca.crt"\n', r"s.toml: \[broker\] tls must be true or false"),
        ('tls = true\n', r"s.toml: \[broker\] tls = true needs ca"),
        ('ca = 5\n', r"s.toml: \[broker\] ca must be a file path"),
        ('tls = false\ncert = "id/client.crt"\nkey = "id/client.key"\n', r"s.toml: \[broker\] cert/key are set but tls is false"),
    ],
)
def test_tls_errors_name_file_and_key(tmp_path: Path, broker: str, message: str) -> None:
    tls_files(tmp_path / "id")
    with pytest.raises(ConfigError, match=message):
        load_site_config(write(tmp_path, "s.toml", f'site = "a"\nstate_dir = "x"\ninsecure_unsigned = true\n[broker]\n{broker}'))


def test_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    tls_files(tmp_path / "id", key_mode=0o644)
    with pytest.raises(ConfigError, match=r"s.toml: \[broker\] key: .*client.key is readable by other users \(mode 644\); chmod 600"):
        load_site_config(write(tmp_path, "s.toml", f'site = "a"\nstate_dir = "x"\ninsecure_unsigned = true\n{TLS}'))


# --- every value is checked: one bad value per field, and the one-line message it gets ---------

SITE_BASE = 'insecure_unsigned = true\nsite = "s1"\nstate_dir = "state"\n'
FLEET_BASE = 'insecure_unsigned = true\nsites = ["a", "b"]\nstore = "r.sqlite"\nregistry = "reg"\n'

# (class, field, TOML that sets one bad value, the whole message after "<file>: ")
SITE_CASES = [
    ("SiteConfig", "site", 'insecure_unsigned = true\nsite = ""\nstate_dir = "x"\n', r"site must be a non-empty string, got ''"),
    ("SiteConfig", "state_dir", 'insecure_unsigned = true\nsite = "s1"\nstate_dir = 5\n', r"state_dir must be a non-empty string, got 5"),
    ("SiteConfig", "engines", SITE_BASE + 'engines = ["e1", ""]\n', r"engines must be a list of 1..10000000 non-empty strings, got \['e1', ''\]"),
    ("SiteConfig", "broker", SITE_BASE + "broker = 3\n", r"broker must be a table \(\[broker\]\), got 3"),
    ("SiteConfig", "buffer_rows", SITE_BASE + "buffer_rows = -10\n", r"buffer_rows must be an integer in 1..100000000, got -10"),
    ("SiteConfig", "min_samples", SITE_BASE + "min_samples = 0\n", r"min_samples must be an integer in 1..1000000000, got 0"),
    ("SiteConfig", "holdout_share", SITE_BASE + "holdout_share = 0.6\n", r"holdout_share must be a number in 0\.\.0\.5, got 0\.6"),
    ("SiteConfig", "history_cycles", SITE_BASE + "history_cycles = 0\n", r"history_cycles must be an integer in 1..1000000, got 0"),
    ("SiteConfig", "predictions_every_s", SITE_BASE + "predictions_every_s = 0\n", r"predictions_every_s must be a number > 0 and <= 3600, got 0"),
    ("SiteConfig", "share_sensors", SITE_BASE + 'share_sensors = "false"\n', r"share_sensors must be a boolean \(true or false, without quotes\), got 'false'"),
    ("SiteConfig", "min_stats_engines", SITE_BASE + "min_stats_engines = 1\n", r"min_stats_engines must be an integer in 2..1000000, got 1"),
    ("SiteConfig", "max_stats_window", SITE_BASE + "max_stats_window = 50000\n", r"max_stats_window must be an integer in 1..2000, got 50000"),
    ("SiteConfig", "max_engines", SITE_BASE + "max_engines = 0\n", r"max_engines must be an integer in 1..10000000, got 0"),
    ("SiteConfig", "engine_idle_s", SITE_BASE + "engine_idle_s = -1.5\n", r"engine_idle_s must be a number > 0 and <= 1000000000, got -1.5"),
    ("SiteConfig", "sensor_abs_max", SITE_BASE + "sensor_abs_max = inf\n", r"sensor_abs_max must be a number > 0 and <= 1e\+300, got inf"),
    ("SiteConfig", "outbox_max_bytes", SITE_BASE + "outbox_max_bytes = 1000\n", r"outbox_max_bytes must be an integer in 65536\.\.549755813888, got 1000"),
    ("SiteConfig", "metrics_port", SITE_BASE + "metrics_port = 0\n", r"metrics_port must be an integer in 1..65535, got 0"),
    ("SiteConfig", "metrics_address", SITE_BASE + 'metrics_address = ""\n', r"metrics_address must be a non-empty string, got ''"),
    ("BrokerSettings", "host", SITE_BASE + '[broker]\nhost = ""\n', r"\[broker\] host must be a non-empty string, got ''"),
    ("BrokerSettings", "port", SITE_BASE + "[broker]\nport = -1\n", r"\[broker\] port must be an integer in 1..65535, got -1"),
    ("BrokerSettings", "topic_root", SITE_BASE + '[broker]\ntopic_root = "tfl/#"\n', r"\[broker\] topic_root: invalid topic root level '#'"),
    ("BrokerSettings", "plant_root", SITE_BASE + '[broker]\nplant_root = "plant//x"\n', r"\[broker\] plant_root: topic root 'plant//x' has an empty level"),
    ("BrokerSettings", "keepalive", SITE_BASE + "[broker]\nkeepalive = -5\n", r"\[broker\] keepalive must be an integer in 1..65535, got -5"),
    ("BrokerSettings", "username", SITE_BASE + "[broker]\nusername = 5\n", r"\[broker\] username must be a non-empty string, got 5"),
    ("BrokerSettings", "password", SITE_BASE + '[broker]\npassword = ""\n', r"\[broker\] password must be a non-empty string, got ''"),
    ("BrokerSettings", "ca", SITE_BASE + '[broker]\nca = 5\n', r"\[broker\] ca must be a file path, got 5"),
    ("BrokerSettings", "cert", SITE_BASE + '[broker]\ncert = ""\n', r"\[broker\] cert must be a file path, got ''"),
    ("BrokerSettings", "key", SITE_BASE + '[broker]\nkey = []\n', r"\[broker\] key must be a file path, got \[\]"),
    ("BrokerSettings", "tls", SITE_BASE + '[broker]\ntls = "yes"\n', r"\[broker\] tls must be true or false, got 'yes'"),
    ("SiteConfig", "identity", 'site = "s1"\nstate_dir = "state"\nidentity = 3\n', r"\[identity\] must be a table"),
    ("SiteConfig", "insecure_unsigned", 'site = "s1"\nstate_dir = "state"\ninsecure_unsigned = "yes"\n', r"insecure_unsigned must be true or false, got 'yes'"),
]
FLEET_CASES = [
    ("FleetConfig", "sites", 'insecure_unsigned = true\nsites = []\nstore = "r"\nregistry = "g"\n', r"sites must be a list of 1..100000 non-empty strings, got \[\]"),
    ("FleetConfig", "store", 'insecure_unsigned = true\nsites = ["a"]\nstore = ""\nregistry = "g"\n', r"store must be a non-empty string, got ''"),
    ("FleetConfig", "registry", 'insecure_unsigned = true\nsites = ["a"]\nstore = "r"\nregistry = 1\n', r"registry must be a non-empty string, got 1"),
    ("FleetConfig", "model", FLEET_BASE + "model = 5\n", r"model must be a table \(\[model\]\), got 5"),
    ("FleetConfig", "strategy", FLEET_BASE + "strategy = 3\n", r"strategy must be a name or a \[strategy\] table, got 3"),
    ("FleetConfig", "privacy", FLEET_BASE + "privacy = 3\n", r"\[privacy\] must be a table, got 3"),
    ("FleetConfig", "secure_aggregation", FLEET_BASE + "secure_aggregation = 3\n", r"\[secure_aggregation\] must be a table, got 3"),
    ("FleetConfig", "buffered_rounds", FLEET_BASE + "[buffered_rounds]\nmax_staleness = -1\n",
     r"\[buffered_rounds\] max_staleness must be an integer in 0..1000, got -1"),
    ("FleetConfig", "intervals", FLEET_BASE + "[intervals]\ncoverage = 1.2\n", r"\[intervals\] coverage must be a number in 0.5..0.999, got 1.2"),
    ("FleetConfig", "intervals", FLEET_BASE + "[intervals]\ncoverage = 0.9\nmin_group_residuals = 0\n",
     r"\[intervals\] min_group_residuals must be an integer in 1..1000000000, got 0"),
    ("FleetConfig", "intervals", FLEET_BASE + "[intervals]\ncoverage = 0.9\nwidth = 3\n", r"\[intervals\].*width"),
    ("FleetConfig", "quorum", FLEET_BASE + "quorum = 0\n", r"quorum must be an integer in 1..100000, got 0"),
    ("FleetConfig", "round_deadline_s", FLEET_BASE + 'round_deadline_s = "2m"\n', r"round_deadline_s must be a number > 0 and <= 10000000, got '2m'"),
    ("FleetConfig", "stats_retry_s", FLEET_BASE + "stats_retry_s = 0.0\n", r"stats_retry_s must be a number > 0 and <= 86400, got 0.0"),
    ("FleetConfig", "min_samples", FLEET_BASE + "min_samples = true\n", r"min_samples must be an integer in 1..1000000000, got True"),
    ("FleetConfig", "max_update_bytes", FLEET_BASE + "max_update_bytes = -1\n", r"max_update_bytes must be an integer in 1..4194304, got -1"),
    ("FleetConfig", "broker", FLEET_BASE + 'broker = "localhost"\n', r"broker must be a table \(\[broker\]\), got 'localhost'"),
    ("FleetConfig", "influx", FLEET_BASE + "influx = 3\n", r"influx must be a table, got 3"),
    ("FleetConfig", "pki", 'sites = ["a"]\nstore = "r"\nregistry = "g"\npki = 7\n', r"pki must be the path of the fleet's identity folder"),
    ("FleetConfig", "insecure_unsigned", 'sites = ["a"]\nstore = "r"\nregistry = "g"\ninsecure_unsigned = 1\n', r"insecure_unsigned must be true or false, got 1"),
    ("FleetConfig", "epoch", FLEET_BASE + "epoch = -1\n", r"epoch must be an integer in 0..1000000000, got -1"),
    ("FleetConfig", "rollback_margin", FLEET_BASE + "rollback_margin = -0.1\n", r"rollback_margin must be a number in 0..100, got -0.1"),
    ("FleetConfig", "max_site_share", FLEET_BASE + "max_site_share = 0.0\n", r"max_site_share must be a number > 0 and <= 1, got 0.0"),
    ("FleetConfig", "max_empty_rounds", FLEET_BASE + "max_empty_rounds = 0\n", r"max_empty_rounds must be an integer in 1..1000000, got 0"),
    ("FleetConfig", "stall_retry_s", FLEET_BASE + "stall_retry_s = 0\n", r"stall_retry_s must be a number > 0 and <= 10000000, got 0"),
    ("FleetConfig", "metrics_port", FLEET_BASE + "metrics_port = 70000\n", r"metrics_port must be an integer in 1..65535, got 70000"),
    ("FleetConfig", "metrics_address", FLEET_BASE + "metrics_address = 5\n", r"metrics_address must be a non-empty string, got 5"),
    ("FleetConfig", "regions", FLEET_BASE + '[regions]\neast = ["a", "z"]\n', r"\[regions\] east: site 'z' is not in the fleet's sites"),
    ("FleetConfig", "workers", FLEET_BASE + 'workers = ["w1", "w1"]\n', r"workers must be a non-empty list of distinct worker ids"),
    ("FleetConfig", "workers", FLEET_BASE + 'workers = ["w1"]\n', r"workers needs max_site_share = 1: a worker's batch sum hides"),
    ("FleetConfig", "workers", FLEET_BASE + 'workers = ["a/b"]\n', r"workers: invalid worker id 'a/b'"),
    ("ModelSettings", "kind", FLEET_BASE + '[model]\nkind = ""\n', r"\[model\] kind must be a non-empty string, got ''"),
    ("ModelSettings", "hidden", FLEET_BASE + "[model]\nhidden = [64, 0]\n", r"\[model\] hidden must be a list of 0..16 integers \(in 1..4096\), got \[64, 0\]"),
    ("ModelSettings", "learning_rate", FLEET_BASE + "[model]\nlearning_rate = 0\n", r"\[model\] learning_rate must be a number > 0 and <= 10, got 0"),
    ("ModelSettings", "batch_size", FLEET_BASE + "[model]\nbatch_size = 6.4\n", r"\[model\] batch_size must be an integer in 1..1000000, got 6.4"),
    ("ModelSettings", "alpha", FLEET_BASE + "[model]\nalpha = -1e-4\n", r"\[model\] alpha must be a number in 0..1000, got -0.0001"),
    ("ModelSettings", "window", FLEET_BASE + "[model]\nwindow = 50000\n", r"\[model\] window must be an integer in 1..2000, got 50000"),
    ("ModelSettings", "rul_cap", FLEET_BASE + "[model]\nrul_cap = nan\n", r"\[model\] rul_cap must be a number > 0 and <= 100000, got nan"),
    ("ModelSettings", "rounds", FLEET_BASE + "[model]\nrounds = 0\n", r"\[model\] rounds must be an integer in 1..1000000, got 0"),
    ("ModelSettings", "local_epochs", FLEET_BASE + "[model]\nlocal_epochs = -1\n", r"\[model\] local_epochs must be an integer in 1..10000, got -1"),
    ("ModelSettings", "seed", FLEET_BASE + "[model]\nseed = -3\n", r"\[model\] seed must be an integer in 0..4294967295, got -3"),
]


@pytest.mark.parametrize("cls, key, text, message", SITE_CASES, ids=[f"{c}.{k}" for c, k, _, _ in SITE_CASES])
def test_every_site_value_is_checked(tmp_path: Path, cls: str, key: str, text: str, message: str) -> None:
    path = write(tmp_path, "site.toml", text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}") as info:
        load_site_config(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls, key, text, message", FLEET_CASES, ids=[f"{c}.{k}" for c, k, _, _ in FLEET_CASES])
def test_every_fleet_value_is_checked(tmp_path: Path, cls: str, key: str, text: str, message: str) -> None:
    path = write(tmp_path, "fleet.toml", text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}") as info:
        load_fleet_config(path)
    assert "\n" not in str(info.value)


def test_the_tables_cover_every_field() -> None:
    """A field someone adds gets a bad-value case here, and a range in RANGES if it is a number."""
    import typing

    covered = {(c, k) for c, k, _, _ in SITE_CASES + FLEET_CASES}
    for cls in (SiteConfig, BrokerSettings, FleetConfig, ModelSettings):
        for f in dataclasses.fields(cls):
            assert (cls.__name__, f.name) in covered, f"{cls.__name__}.{f.name} has no bad-value case"
            hint = typing.get_type_hints(cls)[f.name]
            if hint in (int, float, int | None, float | None):
                assert f.name in RANGES[cls.__name__], f"{cls.__name__}.{f.name} has no range in config.RANGES"


def test_good_values_at_the_edges_of_their_ranges(tmp_path: Path) -> None:
    text = SITE_BASE + "share_sensors = true\nmin_stats_engines = 2\nengine_idle_s = 1\n[broker]\nport = 65535\nkeepalive = 1\n"
    cfg = load_site_config(write(tmp_path, "site.toml", text))
    assert cfg.broker.port == 65535 and cfg.share_sensors is True and cfg.engine_idle_s == 1.0
    assert isinstance(cfg.engine_idle_s, float)  # a TOML integer where a number is wanted is taken as one


def test_unwritable_state_and_registry_folders_are_refused_at_start(tmp_path: Path) -> None:
    """Checked when the agent or aggregator starts (a flash bundle is built on another host)."""
    from turbofed.aggregator.service import Aggregator
    from turbofed.edge.agent import EdgeAgent

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"^state_dir '{re.escape(str(blocker))}/state' is not a writable folder: "):
        EdgeAgent(SiteConfig(site="s1", state_dir=str(blocker / "state"), insecure_unsigned=True), training=False)
    fleet = FleetConfig(sites=("a",), store=str(tmp_path / "r.sqlite"), registry=str(blocker / "registry"), insecure_unsigned=True)
    with pytest.raises(ConfigError, match=rf"^registry '{re.escape(str(blocker))}/registry' is not a writable folder: "):
        Aggregator(fleet)
