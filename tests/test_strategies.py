"""Strategies: exact FedAvg arithmetic, ONNX in and out, and no scikit-learn in the aggregator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.plugins.median import Median
from turbofed.aggregator.service import Aggregator
from turbofed.aggregator.strategies import (
    FedAdam,
    FedAvg,
    FedAvgM,
    Range,
    SiteUpdate,
    Strategy,
    aggregate_onnx,
    make_strategy,
)
from turbofed.codec import ForeignGraph, WeightsMismatch, read_weights
from turbofed.config import ModelSettings, load_fleet_config
from turbofed.edge.learner import RulModel
from turbofed.errors import ConfigError
from turbofed.spec import FeatureSpec

SPEC = FeatureSpec((0, 1), 30, (0.0,) * 9, (1.0,) * 9)  # 4 features a sensor + the cycle


def updates() -> list[SiteUpdate]:
    return [
        SiteUpdate("a", {"w": np.array([1.0, 2.0], np.float32)}, 100),
        SiteUpdate("b", {"w": np.array([3.0, 6.0], np.float32)}, 300),
    ]


def test_fedavg_is_sample_weighted() -> None:
    out = FedAvg().aggregate({"w": np.zeros(2, np.float32)}, updates())
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32


def test_fedavgm_accumulates_momentum_and_checkpoints() -> None:
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    current = {"w": np.zeros(2, np.float32)}
    first = s.aggregate(current, updates())
    np.testing.assert_allclose(first["w"], [2.5, 5.0])
    restored = FedAvgM(server_lr=1.0, momentum=0.5)
    restored.load_state(s.state())
    second = restored.aggregate(first, updates())  # delta 0, velocity 0.5 * previous
    np.testing.assert_allclose(second["w"], [2.5 + 1.25, 5.0 + 2.5])


def test_fedadam_moves_toward_the_mean() -> None:
    s = FedAdam(server_lr=0.1)
    out = s.aggregate({"w": np.zeros(2, np.float32)}, updates())
    assert np.all(out["w"] > 0) and np.all(out["w"] <= 2.5 + 1e-6)
    assert set(s.state()) == {"m/w", "v/w"}


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'; choose one of fedavg, fedavgm, fedadam"):
        make_strategy("fedsgd")


def test_new_algorithm_is_one_class() -> None:
    """A median written outside turbofed (tests/plugins/median.py), loaded by "module:Class"."""
    median = make_strategy("tests.plugins.median:Median")
    assert type(median) is Median and median.parameters() == {"server_lr": 1.0}
    out = median.aggregate({"w": np.zeros(2, np.float32)}, updates())
    np.testing.assert_allclose(out["w"], [2.0, 4.0])
    half = make_strategy("tests.plugins.median:Median", {"server_lr": 0.5})
    np.testing.assert_allclose(half.aggregate({"w": np.zeros(2, np.float32)}, updates())["w"], [1.0, 2.0])


def test_parameters_reach_the_constructor() -> None:
    s = make_strategy("fedadam", {"server_lr": 0.1, "beta1": 0, "tau": 1e-6})
    assert isinstance(s, FedAdam)
    assert s.parameters() == {"server_lr": 0.1, "beta1": 0.0, "beta2": 0.99, "tau": 1e-6, "clip": 0.0}
    assert isinstance(s.beta1, float)  # an integer in TOML is a float parameter's number
    assert make_strategy("fedavgm", {"momentum": 0.9}).parameters() == {"server_lr": 1.0, "momentum": 0.9, "clip": 0.0}
    assert make_strategy("fedavg").parameters() == {}


def test_every_builtin_documents_its_parameters_and_paper() -> None:
    for cls in (FedAvg, FedAvgM, FedAdam):
        doc = cls.__doc__ or ""
        assert any(year in doc for year in ("2017", "2019", "2021")), cls
        for name in make_strategy(cls.name).parameters():
            assert f"{name}:" in doc, (cls, name)
            assert name in cls.ranges, (cls, name)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("fedavgm", {"momentum": 1.5}, r"^f.toml: \[strategy\] momentum must be in \[0, 1\), got 1.5$"),
        ("fedavgm", {"server_lr": 0}, r"^f.toml: \[strategy\] server_lr must be in \(0, inf\), got 0.0$"),
        ("fedadam", {"tau": float("nan")}, r"^f.toml: \[strategy\] tau must be a number, got nan$"),
        ("fedavgm", {"momentum": "0.9"}, r"^f.toml: \[strategy\] momentum must be a number, got '0.9'$"),
        ("fedavgm", {"momentum": True}, r"^f.toml: \[strategy\] momentum must be a number, got True$"),
        ("fedavgm", {"momentom": 0.9}, r"^f.toml: \[strategy\] momentom: unknown parameter for strategy 'fedavgm'; "
                                        r"known: clip, momentum, server_lr$"),
        ("fedavg", {"server_lr": 1.0}, r"^f.toml: \[strategy\] server_lr: unknown parameter for strategy 'fedavg'; "
                                       r"it takes no parameters$"),
        ("fedsgd", {}, r"^f.toml: \[strategy\] name: unknown strategy 'fedsgd'; choose one of fedavg, fedavgm, fedadam"),
        ("tests.plugins.nope:Median", {}, r"^f.toml: \[strategy\] name: cannot import module 'tests.plugins.nope' "
                                          r"for strategy 'tests.plugins.nope:Median': ModuleNotFoundError: "),
        ("tests.plugins.median:Mean", {}, r"^f.toml: \[strategy\] name: module 'tests.plugins.median' has no "
                                          r"attribute 'Mean'$"),
        ("tests.plugins.median:not_a_strategy", {}, r"^f.toml: \[strategy\] name: 'tests.plugins.median:not_a_strategy' "
                                                    r"is not a Strategy subclass \(it is a function\)"),
        ("tests.plugins.median:SiteUpdate", {}, r"is not a Strategy subclass \(it is the class "
                                                r"turbofed.aggregator.strategies.SiteUpdate\)"),
        ("tests.plugins.median:", {}, r"name: 'tests.plugins.median:' must look like \"package.module:ClassName\"$"),
        ("tests.plugins.median:Median", {"server_lr": -1}, r"^f.toml: \[strategy\] server_lr must be in \(0, inf\), got -1.0$"),
    ],
)
def test_refusals_are_one_line_config_errors_naming_key(name: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        make_strategy(name, params, "f.toml: [strategy]")
    assert "\n" not in str(info.value)


class Picky(Strategy):
    """Refuses some values itself, and takes a parameter it does not keep."""

    def __init__(self, level: int = 1, label: str = "x") -> None:
        if level > 3:
            raise ValueError(f"level {level} is too deep\nsecond line")
        self.level = level


def test_refusals_of_the_class_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^w: strategy 'tests.test_strategies:Picky' refused its parameters: "
                                          r"level 4 is too deep second line$"):
        make_strategy("tests.test_strategies:Picky", {"level": 4}, "w")
    with pytest.raises(ConfigError, match=r"^w level must be an integer, got 2.5$"):
        make_strategy("tests.test_strategies:Picky", {"level": 2.5}, "w")
    with pytest.raises(ConfigError, match=r"does not keep its parameters as attributes of the same name"):
        make_strategy("tests.test_strategies:Picky", {"level": 2}, "w")  # `label` is not kept: unrecordable
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('plugin is\\nbroken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^w name: cannot import module 'raising_plugin' for strategy "
                                          r"'raising_plugin:X': RuntimeError: plugin is broken$"):
        make_strategy("raising_plugin:X", None, "w")


def _distribution(folder: Path, entries: dict[str, str], dist: str = "tfplugin") -> None:
    """A throwaway installed distribution: a .dist-info folder with entry_points.txt."""
    info = folder / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[turbofed.strategies]\n{lines}")


def test_entry_point_names_a_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _distribution(tmp_path, {"robust-median": "tests.plugins.median:Median", "wrong": "tests.plugins.median:not_a_strategy",
                             "gone": "tests.plugins.nope:Median", "fedavg": "tests.plugins.median:Median"})
    with pytest.raises(ConfigError, match="unknown strategy 'robust-median'"):
        make_strategy("robust-median")  # not installed yet
    monkeypatch.syspath_prepend(str(tmp_path))
    s = make_strategy("robust-median", {"server_lr": 0.25})
    assert type(s) is Median and s.parameters() == {"server_lr": 0.25}
    assert type(make_strategy("fedavg")) is FedAvg  # a built-in name is never shadowed
    with pytest.raises(ConfigError, match=r"^w name: 'wrong' is not a Strategy subclass \(it is a function\)"):
        make_strategy("wrong", None, "w")
    with pytest.raises(ConfigError, match=r"^w name: entry point 'gone' \(tests.plugins.nope:Median\) cannot be "
                                          r"loaded: ModuleNotFoundError: "):
        make_strategy("gone", None, "w")
    with pytest.raises(ConfigError, match=r"choose one of fedavg, fedavgm, fedadam, median, trimmed-mean, multi-krum, filtered-fedavg, clipped-fedavg, gone, robust-median, wrong, or give"):
        make_strategy("fedsgd")
    other = tmp_path / "other"
    _distribution(other, {"robust-median": "tests.plugins.median:not_a_strategy"}, "tfplugin2")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(ConfigError, match=r"'robust-median' is offered by several entry points"):
        make_strategy("robust-median")


def test_bad_strategy_table_stops_the_aggregator_before_it_opens_anything(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('insecure_unsigned = true\nsites = ["a"]\nstore = "r.sqlite"\nregistry = "reg"\n[strategy]\nname = "fedavgm"\nmomentum = 1.5\n')
    config = load_fleet_config(path)
    with pytest.raises(ConfigError, match=rf"^{path}: \[strategy\] momentum must be in \[0, 1\), got 1.5$"):
        Aggregator(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.toml"]  # no store, no registry


def test_range_reads_like_an_interval() -> None:
    assert str(Range(0, 1, high_open=True)) == "[0, 1)" and 0 in Range(0, 1, high_open=True)
    assert 1 not in Range(0, 1, high_open=True) and float("nan") not in Range()
    assert str(Range(0.0, float("inf"), low_open=True, high_open=True)) == "(0, inf)"


def test_onnx_in_onnx_out() -> None:
    models = [RulModel(ModelSettings(seed=s), SPEC) for s in (1, 2)]
    current = onnx.load_model_from_string(models[0].to_onnx())
    merged = aggregate_onnx(FedAvg(), current, [("a", m.to_onnx(), 1) for m in models])
    wa, wb = (read_weights(onnx.load_model_from_string(m.to_onnx())) for m in models)
    out = read_weights(merged)
    for name in out:
        np.testing.assert_allclose(out[name], (wa[name] + wb[name]) / 2, rtol=1e-6)
    wrong = RulModel(ModelSettings(hidden=(4, 32)), SPEC).to_onnx()
    with pytest.raises(WeightsMismatch, match=r"'coefficient' has shape \(\d+, 4\), expected \(\d+, 64\)"):
        aggregate_onnx(FedAvg(), current, [("a", wrong, 1)])
    fewer_layers = RulModel(ModelSettings(hidden=(4,)), SPEC).to_onnx()
    with pytest.raises(ForeignGraph, match="initializer names differ"):
        aggregate_onnx(FedAvg(), current, [("a", fewer_layers, 1)])


def test_aggregator_never_imports_sklearn() -> None:
    code = (
        "import sys, turbofed.aggregator.strategies, turbofed.aggregator.service, turbofed.codec, turbofed.cli; "
        "from turbofed.graph import reference_model; from turbofed.config import ModelSettings; "
        "from turbofed.spec import FeatureSpec; "
        "reference_model(FeatureSpec((0, 1), 30, (0.0,) * 9, (1.0,) * 9), ModelSettings()); "  # global v0, built as the aggregator does
        "bad = [m for m in sys.modules if m.startswith(('sklearn', 'skl2onnx'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
