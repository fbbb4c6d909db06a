"""The agent's state folder: learners saved without pickle continue training exactly; a
corrupt or unreadable file stops the agent at start-up with one line naming it, and is
left as it is; an old learners.pkl is never unpickled."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from turbofed.config import ModelSettings, SiteConfig
from turbofed.data.cmapss import load_subset
from turbofed.edge.agent import EdgeAgent
from turbofed.edge.features import run_features, runs_stats
from turbofed.edge.learner import RulModel
from turbofed.edge.state import StateError, load_learners, save_learners
from turbofed.spec import DEFAULT_WINDOW, FeatureSpec

SETTINGS = ModelSettings(hidden=(16, 8))


@pytest.fixture(scope="module")
def runs(cmapss_dir: Path):
    return load_subset("FD001", cmapss_dir).train[:8]


@pytest.fixture(scope="module")
def data(runs):
    spec = FeatureSpec.from_stats(runs_stats(runs, DEFAULT_WINDOW))
    x = np.vstack([run_features(spec, r.cycles, r.sensors) for r in runs])
    return spec, x, np.concatenate([r.rul() for r in runs])


# --- learners: saved and loaded, training continues exactly -----------------------------


@pytest.mark.parametrize("kind", ["mlp", "sgd"])
def test_saved_learner_continues_training_bit_for_bit(data, tmp_path: Path, kind: str) -> None:
    spec, x, y = data
    kept = RulModel(SETTINGS.replace(kind=kind), spec)
    kept.train(x, y, epochs=2)
    save_learners(tmp_path / "learners.npz", {"federated": kept, "local": None})
    loaded = load_learners(tmp_path / "learners.npz")
    assert loaded["local"] is None
    restored = loaded["federated"]
    assert restored.settings == kept.settings and restored.spec == kept.spec and restored.samples_seen == kept.samples_seen
    np.testing.assert_array_equal(restored.predict(x), kept.predict(x))
    weights_only = RulModel(SETTINGS.replace(kind=kind), spec)  # what an ONNX reload gives: no optimizer state
    weights_only.load_onnx(kept.to_onnx())
    for _ in range(3):
        for model in (kept, restored, weights_only):
            model.train(x, y, epochs=1)
    np.testing.assert_array_equal(restored.predict(x), kept.predict(x))
    assert restored.samples_seen == kept.samples_seen
    if kind == "mlp":  # Adam's moments matter: without them training goes elsewhere
        assert restored.estimator._optimizer.t == kept.estimator._optimizer.t
        assert not np.array_equal(weights_only.predict(x), kept.predict(x))


def test_learners_file_is_plain_arrays_and_a_json_header(data, tmp_path: Path) -> None:
    spec, x, y = data
    fed = RulModel(SETTINGS, spec)
    fed.train(x, y, epochs=1)
    local = RulModel(SETTINGS.replace(kind="sgd"), spec)  # never trained: saved unfitted
    save_learners(tmp_path / "learners.npz", {"federated": fed, "local": local})
    with np.load(tmp_path / "learners.npz", allow_pickle=False) as npz:  # no object array anywhere
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays.pop("header").tobytes())
    assert header["format"] == "turbofed-learners" and header["version"] == 1
    assert header["learners"]["federated"]["estimator"] == "MLPRegressor"
    assert header["learners"]["federated"]["spec"] == spec.to_dict()
    assert header["learners"]["local"]["fitted"] is False
    assert {k.split(".")[0] for k in arrays} == {"federated"}
    assert arrays["federated.coef0"].shape == (spec.n_features, 16) and arrays["federated.coef0"].dtype == np.float32
    assert arrays["federated.adam_v5"].shape == (1,)
    again = load_learners(tmp_path / "learners.npz")
    assert again["local"].settings.kind == "sgd" and not again["local"].fitted
    assert not (tmp_path / "learners.npz.tmp").exists()


# --- the agent's state folder ------------------------------------------------------------


def _config(state_dir: Path) -> SiteConfig:
    return SiteConfig(site="site1", state_dir=str(state_dir), min_samples=50, insecure_unsigned=True)


@pytest.fixture(scope="module")
def saved_state(runs, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state folder with every file: buffer, engines in service, state.json, global
    model and both learners (trained), written by the agent's own save()."""
    spec, _, _ = data
    state_dir = tmp_path_factory.mktemp("saved") / "state"
    agent = EdgeAgent(_config(state_dir))
    for run in runs[:6]:
        agent.buffer.add(f"FD001-train-{run.unit}", run.cycles, run.sensors, run.rul().astype(float))
    for run in runs[6:]:
        agent.on_reading(str(run.unit), json.dumps({"cycle": 1, "settings": [0, 0, 100], "sensors": run.sensors[0].tolist()}).encode())
    agent.settings, agent.fleet_spec = SETTINGS, spec
    agent.answered, agent.scored = ["a0", "a1"], {"7": [31.0, 40.5, None]}
    agent.counters["readings"] += 5
    agent.fed_learner = RulModel(SETTINGS, spec)
    model = agent.fed_learner.to_onnx()
    from turbofed.edge.inference import OnnxPredictor

    agent.global_model, agent.global_version, agent.fed_predictor = model, 3, OnnxPredictor(model)
    (state_dir / "global.onnx").write_bytes(model)
    agent.fed_learner.load_onnx(model)
    agent.fed_learner.train(*agent.buffer.training_rows(spec), epochs=1)
    agent._train_local()
    agent.save()
    assert sorted(p.name for p in state_dir.iterdir()) == ["buffer.npz", "engines.npz", "global.onnx", "learners.npz", "outbox.sqlite", "state.json"]
    return state_dir


def _copy(saved_state: Path, tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    shutil.copytree(saved_state, state_dir)
    return state_dir


def test_agent_resumes_everything_it_saved(saved_state: Path, tmp_path: Path, data) -> None:
    spec, x, _ = data
    agent = EdgeAgent(_config(_copy(saved_state, tmp_path)))
    assert agent.answered == ["a0", "a1"] and agent.global_version == 3 and agent.fed_predictor is not None
    assert agent.settings == SETTINGS and agent.fleet_spec == spec and agent.scored == {"7": [31.0, 40.5, None]}
    assert agent.counters["readings"] == 7  # 2 readings handled + 5
    assert len(agent.buffer.engines) == 6 and sorted(agent.engines) == sorted(str(r) for r in (7, 8))
    assert agent.fed_learner.estimator._optimizer.t > 0  # Adam's state came back
    assert agent.local_learner is not None and agent.local_predictor is not None and agent.local_spec == agent.local_learner.spec
    assert np.all(np.isfinite(agent.local_predictor.predict(run_features(agent.local_spec, *_first_rows(agent)))))


def _first_rows(agent: EdgeAgent) -> tuple[np.ndarray, np.ndarray]:
    engine = agent.buffer.engines[0]
    return engine.cycles, engine.sensors


def _garbage(_: bytes) -> bytes:
    return b"\x00\xffnot a state file\x13\x37" * 3


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _empty(_: bytes) -> bytes:
    return b""


def _json_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        state = json.loads(data)
        edit(state)
        return json.dumps(state).encode()

    return apply


def _npz_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        edit(arrays)
        out = io.BytesIO()
        np.savez(out, **arrays)  # allow_pickle defaults to True here: object arrays get written
        return out.getvalue()

    return apply


def _header_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def on_arrays(arrays: dict) -> None:
        header = json.loads(arrays["header"].tobytes())
        edit(header)
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    return _npz_edit(on_arrays)


def _set(key: str, value: object) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *path, last = key.split("/")
        for part in path:
            d = d[part]
        d[last] = value

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *path, last = key.split("/")
        for part in path:
            d = d[part]
        del d[last]

    return edit


def _fed(key: str) -> str:
    return f"learners/federated/{key}"


CORRUPTIONS = {
    "state.json": [
        ("truncated", _truncated, "not valid JSON"),
        ("garbage", _garbage, "not valid JSON"),
        ("empty", _empty, "not valid JSON"),
        ("not an object", lambda _: b"[1, 2]", "expected a JSON object, found list"),
        ("NaN", lambda d: d.replace(b"40.5", b"NaN"), "NaN is not a JSON number"),
        ("wrong type", _json_edit(_set("answered", "a0")), "key 'answered' must be a list, got 'a0'"),
        ("wrong item type", _json_edit(_set("answered", ["a0", 3])), "key 'answered' must be a list of strings"),
        ("bool for int", _json_edit(_set("global_version", True)), "key 'global_version' must be a whole number"),
        ("out of range", _json_edit(_set("global_version", -5)), "key 'global_version' must be at least -1"),
        ("missing key", _json_edit(_drop("counters")), "missing key 'counters'"),
        ("bad counter", _json_edit(_set("counters/readings", "many")), "counters: key 'readings' must be a whole number"),
        ("bad scored row", _json_edit(_set("scored/7", [None, 1.0, 2.0])), "scored['7'] must be"),
        ("settings type", _json_edit(_set("settings/batch_size", "64")), "settings: key 'batch_size' must be a whole number"),
        ("settings missing", _json_edit(_drop("settings/hidden")), "settings: missing key 'hidden'"),
        ("settings unknown", _json_edit(_set("settings/momentum", 0.9)), "unknown setting(s) momentum"),
        ("spec scale", _json_edit(lambda s: s["fleet_spec"]["scale"].__setitem__(0, 0.0)), "fleet_spec: key 'scale' must hold positive"),
        ("spec length", _json_edit(lambda s: s["fleet_spec"]["offset"].pop()), "offset/scale length does not match"),
        ("spec sensor", _json_edit(_set("fleet_spec/sensors", [2, 99])), "fleet_spec: key 'sensors' must be distinct sensor indices"),
        ("newer format", _json_edit(_set("format", 2)), "format 2 is not one this turbofed reads"),
    ],
    "learners.npz": [
        ("truncated", _truncated, "not a readable .npz file"),
        ("garbage", _garbage, "not an .npz file (it is not a zip archive)"),
        ("empty", _empty, "not an .npz file (it is empty)"),
        ("object array", _npz_edit(_set("federated.coef0", np.array([{"x": 1}], dtype=object))), "array 'federated.coef0': Object arrays cannot be loaded"),
        ("header not JSON", _npz_edit(_set("header", np.frombuffer(b"{oops", dtype=np.uint8))), "header is not valid JSON"),
        ("header wrong dtype", _npz_edit(_set("header", np.zeros(3))), "array 'header' holds float64, expected unsigned integers"),
        ("newer version", _header_edit(_set("version", 2)), "learners format version 2; this turbofed reads version 1"),
        ("not ours", _header_edit(_set("format", "other")), "header does not say format 'turbofed-learners'"),
        ("missing key", _header_edit(_drop(_fed("t_"))), "federated learner: missing key 't_'"),
        ("wrong type", _header_edit(_set(_fed("samples_seen"), "lots")), "federated learner: key 'samples_seen' must be a whole number"),
        ("adam type", _header_edit(_set(_fed("adam/t"), 1.5)), "federated learner: adam: key 't' must be a whole number"),
        ("kind mismatch", _header_edit(_set(_fed("estimator"), "SGDRegressor")), "estimator 'SGDRegressor' does not match model kind 'mlp'"),
        ("wrong shape", _npz_edit(lambda a: a.__setitem__("federated.coef1", a["federated.coef1"][:, :3])), "array 'coef1' has shape (16, 3), expected (16, 8)"),
        ("wrong dtype", _npz_edit(lambda a: a.__setitem__("federated.coef0", a["federated.coef0"].astype(np.float64))), "array 'coef0' holds float64, expected float32"),
        ("non-finite", _npz_edit(lambda a: a["federated.intercept0"].__setitem__(0, np.inf)), "array 'intercept0' holds non-finite values"),
        ("missing array", _npz_edit(_drop("local.adam_m2")), "local learner: missing array 'adam_m2'"),
        ("negative moment", _npz_edit(lambda a: a["federated.adam_v1"].__setitem__(0, -1.0)), "second moments (adam_v*) must not be negative"),
    ],
}
for name in ("buffer.npz", "engines.npz"):
    CORRUPTIONS[name] = [
        ("truncated", _truncated, "not a readable .npz file"),
        ("garbage", _garbage, "not an .npz file (it is not a zip archive)"),
        ("empty", _empty, "not an .npz file (it is empty)"),
        ("object array", _npz_edit(lambda a: a.__setitem__("names", a["names"].astype(object))), "array 'names': Object arrays cannot be loaded"),
        ("wrong shape", _npz_edit(lambda a: a.__setitem__("sensors", a["sensors"][:, :20])), "array 'sensors' has shape"),
        ("wrong dtype", _npz_edit(lambda a: a.__setitem__("cycles", a["cycles"].astype(float))), "array 'cycles' holds float64, expected integers"),
        ("lengths", _npz_edit(lambda a: a["lengths"].__setitem__(0, a["lengths"][0] + 1)), "array 'lengths' must be non-negative and add up"),
        ("non-finite", _npz_edit(lambda a: a["sensors"].__setitem__((0, 3), np.nan)), "array 'sensors' holds non-finite values"),
        ("missing array", _npz_edit(_drop("rul")), "missing array 'rul'"),
    ]
CORRUPTIONS["global.onnx"] = [
    ("truncated", _truncated, "onnxruntime cannot load it"),
    ("garbage", _garbage, "onnxruntime cannot load it"),
]
CASES = [(name, label, corrupt, message) for name, cases in CORRUPTIONS.items() for label, corrupt, message in cases]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("name", "label", "corrupt", "message"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_corrupt_state_file_stops_the_agent_and_is_kept(saved_state: Path, tmp_path: Path, name: str, label: str, corrupt, message: str) -> None:
    state_dir = _copy(saved_state, tmp_path)
    path = state_dir / name
    path.write_bytes(corrupt(path.read_bytes()))
    before = _snapshot(state_dir)
    with pytest.raises(StateError) as caught:
        EdgeAgent(_config(state_dir))
    text = str(caught.value)
    assert text.startswith(f"{path}: "), text
    assert message in text
    assert "\n" not in text and len(text) < 400
    assert _snapshot(state_dir) == before  # nothing stored is lost or rewritten


def test_unreadable_state_file_is_named(saved_state: Path, tmp_path: Path) -> None:
    state_dir = _copy(saved_state, tmp_path)
    (state_dir / "engines.npz").unlink()
    (state_dir / "engines.npz").mkdir()  # exists, but cannot be read as a file
    with pytest.raises(StateError, match=r"engines\.npz: cannot read it \(Is a directory\)"):
        EdgeAgent(_config(state_dir))


def test_turbofed_edge_prints_one_line_and_exits_2(saved_state: Path, tmp_path: Path) -> None:
    state_dir = _copy(saved_state, tmp_path)
    (state_dir / "buffer.npz").write_bytes(b"PK\x03\x04 cut short")
    config = tmp_path / "site.toml"
    config.write_text('insecure_unsigned = true\nsite = "site1"\nstate_dir = "state"\n\n[broker]\nport = 1\n')
    done = subprocess.run([sys.executable, "-m", "turbofed.cli", "edge", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"turbofed: error: {state_dir / 'buffer.npz'}: not a readable .npz file (File is not a zip file)"]
    assert (state_dir / "buffer.npz").read_bytes() == b"PK\x03\x04 cut short"


# --- learners.pkl from older versions ----------------------------------------------------


class _Tripwire:
    """Unpickling this writes a file: proof that nobody unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.write_text, (self.marker, "unpickled"))


def test_old_learners_pickle_is_never_loaded_but_renamed_once(saved_state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state_dir = _copy(saved_state, tmp_path)
    (state_dir / "learners.npz").unlink()  # as an older version left it: learners only as a pickle
    marker = tmp_path / "unpickled.txt"
    (state_dir / "learners.pkl").write_bytes(pickle.dumps({"federated": _Tripwire(marker), "local": None}))
    with caplog.at_level(logging.WARNING, logger="turbofed.edge"):
        agent = EdgeAgent(_config(state_dir))
        EdgeAgent(_config(state_dir))  # a second start: nothing left to say
    assert not marker.exists()
    assert not (state_dir / "learners.pkl").exists() and (state_dir / "learners.pkl.ignored").exists()
    warnings = [r.getMessage() for r in caplog.records if "learners.pkl" in r.getMessage()]
    assert len(warnings) == 1 and "not loaded" in warnings[0] and "restart from the global model" in warnings[0]
    assert agent.fed_learner is None and agent.local_learner is None  # they start again at the next round
    assert agent.global_version == 3 and len(agent.buffer.engines) == 6  # everything else resumed


def test_old_learners_pickle_stays_when_another_file_is_corrupt(saved_state: Path, tmp_path: Path) -> None:
    state_dir = _copy(saved_state, tmp_path)
    (state_dir / "learners.pkl").write_bytes(b"old pickle")
    (state_dir / "state.json").write_bytes(b"{")
    with pytest.raises(StateError, match="state.json: not valid JSON"):
        EdgeAgent(_config(state_dir))
    assert (state_dir / "learners.pkl").read_bytes() == b"old pickle"


def _histories(engines: int, rows: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"E{k}", np.arange(1, rows + 1 + k, dtype=np.int64), rng.normal(size=(rows + k, 21)), rng.normal(size=rows + k))
            for k in range(engines)]


@pytest.mark.parametrize("engines", [0, 1, 7])
def test_saved_histories_read_back_as_np_savez_would_have_written_them(tmp_path: Path, engines: int) -> None:
    """The streamed writer (edge/state.py, Stacked) keeps the engines.npz format: every
    array np.savez of the joined histories holds, with the same dtype and shape."""
    from turbofed.edge.buffer import load_histories, load_history_settings, save_histories

    histories = _histories(engines, 40)
    settings = [np.full((len(c), 3), float(k)) for k, (_, c, _, _) in enumerate(histories)]
    path = tmp_path / "engines.npz"
    save_histories(path, histories, extra={"dropped": 3}, settings=settings)
    reference = tmp_path / "reference.npz"
    join = (lambda k, empty: np.concatenate([h[k] for h in histories]) if histories else empty)  # noqa: E731
    np.savez(reference, names=np.array([h[0] for h in histories], dtype=str), lengths=np.array([len(h[1]) for h in histories], dtype=np.int64),
             cycles=join(1, np.zeros(0, np.int64)), sensors=join(2, np.zeros((0, 21))), rul=join(3, np.zeros(0)),
             settings=np.concatenate(settings) if settings else np.zeros((0, 3)), dropped=np.int64(3))
    with np.load(path, allow_pickle=False) as got, np.load(reference, allow_pickle=False) as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    loaded, extra = load_histories(path)
    assert extra == {"dropped": 3} and [h[0] for h in loaded] == [h[0] for h in histories]
    for (_, c, s, r), (_, c2, s2, r2) in zip(histories, loaded):
        np.testing.assert_array_equal(c, c2), np.testing.assert_array_equal(s, s2), np.testing.assert_array_equal(r, r2)
    for want_settings, got_settings in zip(settings, load_history_settings(path, [len(h[1]) for h in histories])):
        np.testing.assert_array_equal(want_settings, got_settings)


def test_saving_histories_does_not_copy_them_in_memory(tmp_path: Path) -> None:
    """The agent saves every in-service engine's history every few seconds: joining them
    first (np.concatenate, then np.savez) doubled their memory at each save, the peak a
    small device must fit (issue #17). Streamed, the extra memory is one engine's rows."""
    import tracemalloc

    from turbofed.edge.buffer import save_histories

    histories = _histories(100, 300)
    settings = [np.zeros((len(c), 3)) for _, c, _, _ in histories]
    held = sum(c.nbytes + s.nbytes + r.nbytes for _, c, s, r in histories) + sum(g.nbytes for g in settings)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        save_histories(tmp_path / "engines.npz", histories, settings=settings)
        extra = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert held > 5_000_000  # the histories are large enough for a copy to show
    assert extra < held / 20, f"saving {held / 1e6:.1f} MB of histories allocated {extra / 1e6:.1f} MB more"
