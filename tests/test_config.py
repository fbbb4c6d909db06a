"""Site and fleet TOML files: defaults, relative paths, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbofed.config import StrategySettings, load_fleet_config, load_site_config
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
        ('insecure_unsigned = true\nsite = "a"\nstate_dir = "x"\n[broker]\nport = "1883"\n', r"s.toml \[broker\]: port must be a number"),
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
    assert cfg.strategy == StrategySettings("fedavg", {})  # the default


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
        ("[model]\nkind = 'lstm'\n", r"model kind must be 'mlp' or 'sgd'"),
        ("[model]\nrounds = 0\n", "rounds must be positive"),
        ("[model]\nepochs = 3\n", r"f.toml \[model\]: unknown setting\(s\) epochs"),
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
        ('ca = "id/nope.crt"\n', r"s.toml \[broker\]: ca: .*nope.crt does not exist"),
        ('ca = "id/ca.crt"\ncert = "id/client.crt"\n', r"s.toml \[broker\]: cert and key go together"),
        ('ca = "id/ca.crt"\ncert = "id/client.crt"\nkey = "id/gone.key"\n', r"s.toml \[broker\]: key: .*gone.key does not exist"),
        ('tls = "yes"\nca = "id/ca.crt"\n', r"s.toml \[broker\]: tls must be true or false"),
        ('tls = true\n', r"s.toml \[broker\]: tls = true needs ca"),
        ('ca = 5\n', r"s.toml \[broker\]: ca must be a file path"),
        ('tls = false\ncert = "id/client.crt"\nkey = "id/client.key"\n', r"s.toml \[broker\]: cert/key are set but tls is false"),
    ],
)
def test_tls_errors_name_file_and_key(tmp_path: Path, broker: str, message: str) -> None:
    tls_files(tmp_path / "id")
    with pytest.raises(ConfigError, match=message):
        load_site_config(write(tmp_path, "s.toml", f'site = "a"\nstate_dir = "x"\ninsecure_unsigned = true\n[broker]\n{broker}'))


def test_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    tls_files(tmp_path / "id", key_mode=0o644)
    with pytest.raises(ConfigError, match=r"s.toml \[broker\]: key: .*client.key is readable by other users \(mode 644\); chmod 600"):
        load_site_config(write(tmp_path, "s.toml", f'site = "a"\nstate_dir = "x"\ninsecure_unsigned = true\n{TLS}'))
