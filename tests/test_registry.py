"""The model registry: checkpoints round-trip, never go backwards, and detect corruption."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from turbofed.aggregator.registry import Checkpoint, ModelRegistry, RegistryError

STATE = {"velocity/coefficient": np.arange(6, dtype=np.float32).reshape(2, 3),
         "file": np.array([1.5, -2.0]), "step": np.array(7, dtype=np.int64)}
FLEET = {"count": 1000, "sum": np.array([1.0, 2.0]), "sites": ["s1", "s2"]}


def test_fresh_registry_is_empty(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path / "reg") as reg:
        assert reg.latest() is None and reg.versions() == []
        with pytest.raises(RegistryError, match="no model version 1"):
            reg.get(1)
    assert (tmp_path / "reg" / "registry.sqlite").is_file()


def test_save_latest_round_trip(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as reg:
        p1 = reg.save(1, 0, b"onnx-one", {}, {"count": 0})
        p2 = reg.save(2, 1, b"onnx-two", STATE, FLEET)
        assert p1 == tmp_path / "models" / "v00001.onnx" and p2.read_bytes() == b"onnx-two"
        assert (tmp_path / "models" / "v00002.npz").is_file()
    with ModelRegistry(tmp_path) as reg:  # survives reopening, as after a restart
        cp = reg.latest()
        assert isinstance(cp, Checkpoint)
        assert (cp.version, cp.round, cp.model) == (2, 1, b"onnx-two")
        assert cp.sha256 == hashlib.sha256(b"onnx-two").hexdigest()
        assert cp.fleet == {"count": 1000, "sum": [1.0, 2.0], "sites": ["s1", "s2"]}
        assert set(cp.strategy_state) == set(STATE)
        for name, array in STATE.items():
            assert cp.strategy_state[name].dtype == array.dtype
            np.testing.assert_array_equal(cp.strategy_state[name], array)
        assert reg.get(1) == b"onnx-one"
        versions = reg.versions()
        assert [(v["version"], v["round"]) for v in versions] == [(1, 0), (2, 1)]
        assert versions[0]["path"] == str(p1) and versions[0]["sha256"] == hashlib.sha256(b"onnx-one").hexdigest()
        assert versions[0]["created"] <= versions[1]["created"]


def test_refuses_non_increasing_version(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as reg:
        reg.save(3, 2, b"three", {}, {})
        for version in (3, 2):
            with pytest.raises(RegistryError, match="not newer"):
                reg.save(version, 9, b"other", {}, {})
        assert reg.get(3) == b"three" and [v["version"] for v in reg.versions()] == [3]
        assert not (tmp_path / "models" / "v00002.onnx").exists()


def test_corrupted_file_detected(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as reg:
        path = reg.save(1, 0, b"good model", {"m": np.zeros(2)}, {})
        path.write_bytes(b"bad model!")
        with pytest.raises(RegistryError, match="v00001.onnx is corrupted"):
            reg.latest()
        with pytest.raises(RegistryError, match="v00001.onnx"):
            reg.get(1)
        path.unlink()
        with pytest.raises(RegistryError, match="v00001.onnx is missing"):
            reg.latest()


def test_corrupted_state_detected(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as reg:
        reg.save(1, 0, b"model", {"m": np.zeros(2)}, {})
        (tmp_path / "models" / "v00001.npz").write_bytes(b"junk")
        with pytest.raises(RegistryError, match="v00001.npz is corrupted"):
            reg.latest()


def test_crash_between_file_and_row(tmp_path: Path) -> None:
    """A crash after writing v2's file but before its row: latest() stays at v1, and
    saving v2 again replaces the stray file."""
    with ModelRegistry(tmp_path) as reg:
        reg.save(1, 0, b"one", {"m": np.ones(1)}, {"n": 1})
    (tmp_path / "models" / "v00002.onnx").write_bytes(b"half-written stray")
    (tmp_path / "models" / ".v00003.onnx.abc.tmp").write_bytes(b"temp left by a crash")
    with ModelRegistry(tmp_path) as reg:
        cp = reg.latest()
        assert cp is not None and (cp.version, cp.model, cp.fleet) == (1, b"one", {"n": 1})
        reg.save(2, 1, b"two", {}, {})
        assert reg.latest().model == b"two"
        assert [v["version"] for v in reg.versions()] == [1, 2]
    leftovers = {p.name for p in (tmp_path / "models").iterdir()}
    assert leftovers >= {"v00001.onnx", "v00001.npz", "v00002.onnx", "v00002.npz"}


def test_aggregator_refuses_an_older_checkpoint_and_keeps_it(tmp_path: Path) -> None:
    """A checkpoint whose feature spec and statistics predate the baseline features (3 features
    a sensor, no feature sums): the aggregator says which checkpoint and why, and deletes nothing."""
    from turbofed.aggregator.service import Aggregator
    from turbofed.config import FleetConfig, ModelSettings
    from turbofed.edge.learner import RulModel
    from turbofed.spec import FeatureSpec

    model = RulModel(ModelSettings(), FeatureSpec((0, 1), 30, (0.0,) * 9, (1.0,) * 9)).to_onnx()
    old_spec = {"sensors": [0, 1], "window": 30, "offset": [0.0] * 7, "scale": [1.0] * 7}
    old_stats = {"count": 10.0, "sum": [0.0] * 22, "sumsq": [0.0] * 22, "sum_y": 0.0, "sumsq_y": 0.0, "sum_xy": [0.0] * 22}
    with ModelRegistry(tmp_path / "registry") as reg:
        reg.save(3, 2, model, {}, {"spec": old_spec, "stats": old_stats})
    config = FleetConfig(sites=("site1",), store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"), insecure_unsigned=True)
    with pytest.raises(RegistryError, match=r"checkpoint v3 in .*registry holds .* cannot use \(feature spec offset/scale length"):
        Aggregator(config)
    with ModelRegistry(tmp_path / "registry") as reg:
        assert reg.latest().model == model  # left as it was


def _checkpoint_fleet(spec) -> dict:  # noqa: ANN001
    """The fleet part of a checkpoint: statistics and the spec they fixed."""
    from turbofed.spec import FleetStats

    return {"spec": spec.to_dict(), "stats": FleetStats(count=10.0).to_dict(), "strategy": "fedavg", "strategy_params": {}}


def test_aggregator_resumes_a_checkpoint_exported_by_sites(tmp_path: Path) -> None:
    """A checkpoint from when sites proposed v0 (skl2onnx wrote it): the same graph, so the
    aggregator resumes with its weights, in the graph it builds itself."""
    import onnx

    from turbofed.aggregator.service import Aggregator
    from turbofed.codec import read_weights
    from turbofed.config import FleetConfig, ModelSettings
    from turbofed.edge.learner import RulModel
    from turbofed.graph import reference_model
    from turbofed.spec import FeatureSpec

    spec, settings = FeatureSpec((0, 1), 30, (0.5,) * 9, (2.0,) * 9), ModelSettings(seed=3)
    exported = RulModel(settings, spec).to_onnx()
    with ModelRegistry(tmp_path / "registry") as reg:
        reg.save(2, 2, exported, {}, _checkpoint_fleet(spec))
    config = FleetConfig(sites=("site1",), store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"), model=settings, insecure_unsigned=True)
    aggregator = Aggregator(config)
    try:
        assert aggregator.version == 2
        ours, theirs = read_weights(aggregator.model), read_weights(onnx.load_model_from_string(exported))
        assert all(np.array_equal(ours[n], theirs[n]) for n in theirs)
        assert aggregator.model.SerializeToString() == reference_model(spec, settings, theirs).SerializeToString()
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_aggregator_refuses_a_checkpoint_of_other_model_settings(tmp_path: Path) -> None:
    """fleet.toml's [model] changed since the checkpoint: updates could never fit, so say so at start."""
    from turbofed.aggregator.service import Aggregator
    from turbofed.config import FleetConfig, ModelSettings
    from turbofed.graph import reference_model
    from turbofed.spec import FeatureSpec

    spec = FeatureSpec((0, 1), 30, (0.0,) * 9, (1.0,) * 9)
    with ModelRegistry(tmp_path / "registry") as reg:
        reg.save(1, 1, reference_model(spec, ModelSettings(hidden=(8,))).SerializeToString(), {}, _checkpoint_fleet(spec))
    config = FleetConfig(sites=("site1",), store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"), insecure_unsigned=True)
    with pytest.raises(RegistryError, match=r"checkpoint v1 in .*registry is not the model this fleet config's \[model\] settings make \(.*initializer names differ"):
        Aggregator(config)


def test_corrupt_newest_falls_back_to_newest_intact(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One byte flipped in the newest .onnx: latest() warns (file and version) and returns the
    previous checkpoint; saving that version again quarantines the corrupt files as *.corrupt."""
    with ModelRegistry(tmp_path) as reg:
        reg.save(1, 1, b"one", {"m": np.ones(1)}, {"n": 1})
        path = reg.save(2, 2, b"two", {"m": np.ones(1)}, {"n": 2})
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
        with caplog.at_level("WARNING", logger="turbofed.aggregator.registry"):
            cp = reg.latest()
        assert (cp.version, cp.model) == (1, b"one")
        assert any("v2" in r.getMessage() and "v00002.onnx" in r.getMessage() for r in caplog.records), caplog.text
        with pytest.raises(RegistryError, match="not newer"):
            reg.save(1, 1, b"again", {}, {})  # an intact version still blocks
        reg.save(2, 2, b"two again", {}, {"n": 22})
        cp = reg.latest()
        assert (cp.version, cp.model, cp.fleet) == (2, b"two again", {"n": 22})
        assert [v["version"] for v in reg.versions()] == [1, 2]
    assert (tmp_path / "models" / "v00002.onnx.corrupt").read_bytes() == bytes(data)
    assert (tmp_path / "models" / "v00002.npz.corrupt").is_file()


def test_no_intact_checkpoint_is_an_error(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as reg:
        reg.save(1, 1, b"one", {}, {})
        (tmp_path / "models" / "v00001.npz").write_bytes(b"junk")
        with pytest.raises(RegistryError, match="no intact checkpoint.*v00001.npz is corrupted"):
            reg.latest()


def test_epoch_is_remembered(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as reg:
        assert reg.epoch() is None
        reg.set_epoch(4)
    with ModelRegistry(tmp_path) as reg:
        assert reg.epoch() == 4
