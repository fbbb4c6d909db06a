"""Models are data, not code: the aggregator builds global v0 itself (turbofed.graph, no
scikit-learn), it predicts what scikit-learn predicts with the same weights, sites send it
back with their weights in it, and an update that is anything but that graph with other
numbers in it is refused as `foreign_graph` before any of its values is read."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.fakeclient import FakeClient
from turbofed import envelope
from turbofed.aggregator.rounds import Rejected, Round
from turbofed.aggregator.strategies import FedAvg, SiteUpdate, merge
from turbofed.codec import (
    ForeignGraph,
    check_graph,
    graph_signature,
    load_compatible,
    read_weights,
    replace_weights,
)
from turbofed.config import ModelSettings, SiteConfig
from turbofed.data.cmapss import load_subset
from turbofed.edge.agent import EdgeAgent
from turbofed.edge.features import run_features, runs_stats
from turbofed.edge.inference import OnnxPredictor
from turbofed.edge.learner import RulModel
from turbofed.graph import initial_weights, reference_model
from turbofed.messages import EngineEvent, RoundAnnouncement, SensorReading
from turbofed.messages.signed import Unsigned
from turbofed.refusals import Refusal
from turbofed.spec import DEFAULT_WINDOW, FeatureSpec
from turbofed.topics import Topics

# Offsets and scales that are not 0 and 1, so the Scaler's attributes are checked too.
SPEC = FeatureSpec((0, 1, 2), 30, tuple(1.37 * i for i in range(13)), tuple(0.3 + 0.71 * i for i in range(13)))
ARCHITECTURES = [ModelSettings(), ModelSettings(kind="sgd"), ModelSettings(hidden=(8,)), ModelSettings(hidden=(5, 4, 3), seed=4)]


@pytest.fixture(scope="module")
def data(cmapss_dir: Path):
    runs = load_subset("FD001", cmapss_dir).train[:20]
    spec = FeatureSpec.from_stats(runs_stats(runs, DEFAULT_WINDOW))
    x = np.vstack([run_features(spec, r.cycles, r.sensors) for r in runs])
    return spec, x, np.concatenate([r.rul() for r in runs])


@pytest.mark.parametrize("settings", ARCHITECTURES, ids=lambda s: f"{s.kind}{list(s.hidden) if s.kind == 'mlp' else ''}")
def test_the_aggregators_graph_is_what_the_learner_exports(settings: ModelSettings) -> None:
    exported = onnx.load_model_from_string(RulModel(settings, SPEC).to_onnx())  # skl2onnx, as sites export
    built = reference_model(SPEC, settings)
    assert graph_signature(built) == graph_signature(exported)  # nodes, ops, attributes, names, shapes
    opsets = lambda m: sorted((o.domain, o.version) for o in m.opset_import)  # noqa: E731 - skl2onnx's order varies
    assert (built.ir_version, opsets(built)) == (exported.ir_version, opsets(exported)) == (8, [("", 17), ("ai.onnx.ml", 1)])
    check_graph(exported, built)  # the learner's own export passes the aggregator's check
    # v0 holds the weights scikit-learn starts from (Glorot uniform from the seed), bit for bit.
    sk, ours = RulModel(settings, SPEC).weights(), read_weights(built)
    assert list(ours) == list(sk)
    for name in sk:
        assert ours[name].dtype == sk[name].dtype == np.float32 and np.array_equal(ours[name], sk[name]), name


UNSIGNED = Unsigned("aggregator")  # signatures are tested in test_signed_messages.py; these tests are about graphs


def test_initial_weights_follow_the_seed() -> None:
    a, b, c = (initial_weights(SPEC, ModelSettings(seed=s)) for s in (0, 0, 1))
    assert all(np.array_equal(a[n], b[n]) for n in a) and not any(np.array_equal(a[n], c[n]) for n in a)
    bound = np.sqrt(6.0 / (13 + 64))
    assert np.abs(a["coefficient"]).max() <= bound and np.abs(a["coefficient"]).max() > 0.9 * bound
    assert all(not w.any() for w in initial_weights(SPEC, ModelSettings(kind="sgd")).values())


def _raw_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = OnnxPredictor(model.SerializeToString()).session  # unclipped output
    return session.run(None, {"X": x.astype(np.float32)})[0].reshape(-1)


@pytest.mark.parametrize("kind", ["mlp", "sgd"])
def test_the_aggregators_model_predicts_what_sklearn_predicts(data, kind: str) -> None:
    spec, x, y = data
    settings = ModelSettings(kind=kind)
    v0 = reference_model(spec, settings)
    learner = RulModel(settings, spec)
    learner.load_weights(read_weights(v0))  # what a site does with global v0
    np.testing.assert_allclose(_raw_ort(v0, x), learner.predict(x), rtol=1e-5, atol=1e-5)
    learner.train(x, y, epochs=2)
    update = replace_weights(v0, learner.weights())  # what a site sends back
    sk = learner.predict(x)
    assert np.std(sk) > 1.0  # it learned something, so agreement means something
    # 1e-5 of the predictions' range: both run float32, whose step at 128 cycles is 1.5e-5.
    np.testing.assert_allclose(_raw_ort(update, x), sk, rtol=1e-5, atol=1e-5 * np.abs(sk).max())
    assert set(load_compatible(update.SerializeToString(), v0)) == set(read_weights(v0))


# --- updates that are more than weights ----------------------------------------------------


def _update(settings: ModelSettings = ModelSettings()) -> onnx.ModelProto:
    """A legitimate update: the reference graph with other (seed 5) weights in it."""
    return reference_model(SPEC, settings, initial_weights(SPEC, settings.replace(seed=5)))


def _external(model: onnx.ModelProto, name: str, location: str, length: int) -> onnx.ModelProto:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return model


def _extra_initializer(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(numpy_helper.from_array(np.ones(3, dtype=np.float32), "extra"))


def _extra_node(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Identity", ["add_result"], ["side_output"], name="Identity"))


def _changed_op(m: onnx.ModelProto) -> None:
    m.graph.node[4].op_type = "Sigmoid"


def _subgraph(m: onnx.ModelProto) -> None:
    """Relu replaced by an If whose branches both return Relu(add_result): same arithmetic, control flow."""
    relu = m.graph.node[4]
    branch = helper.make_graph([helper.make_node("Relu", ["add_result"], ["branch_out"])], "branch", [],
                               [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
    cond = helper.make_node("If", ["always"], list(relu.output), name="Relu", then_branch=branch, else_branch=branch)
    m.graph.node[4].CopyFrom(cond)


def _function(m: onnx.ModelProto) -> None:
    m.functions.append(helper.make_function("custom", "Leak", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                            [helper.make_opsetid("", 17)]))


def _sparse(m: onnx.ModelProto) -> None:
    values = numpy_helper.from_array(np.ones(1, dtype=np.float32), "sparse")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0], dtype=np.int64)), [4]))


def _external_constant(m: onnx.ModelProto) -> None:
    tensor = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape")
    _external_tensor = onnx.TensorProto()
    _external_tensor.CopyFrom(tensor)
    _external_tensor.ClearField("raw_data")
    _external_tensor.data_location = TensorProto.EXTERNAL
    entry = _external_tensor.external_data.add()
    entry.key, entry.value = "location", "fleet.toml"
    m.graph.node.insert(0, helper.make_node("Constant", [], ["shape_const"], name="Constant", value=_external_tensor))


def _opset(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = 18


def _ir_version(m: onnx.ModelProto) -> None:
    m.ir_version = 9


def _training_info(m: onnx.ModelProto) -> None:
    m.training_info.add().algorithm.CopyFrom(helper.make_graph([], "train", [], []))


def _metadata(m: onnx.ModelProto) -> None:
    helper.set_model_props(m, {"note": "anything"})


def _value_info(m: onnx.ModelProto) -> None:
    m.graph.value_info.append(helper.make_tensor_value_info("mul_result", TensorProto.FLOAT, [None, 64]))


def _shape_constant(m: onnx.ModelProto) -> None:
    shape = next(i for i in m.graph.initializer if i.name == "shape_tensor")
    shape.CopyFrom(helper.make_tensor("shape_tensor", TensorProto.INT64, [2], [1, -1]))


FOREIGN = {
    "external data": (lambda m: _external(m, "intercepts2", "fleet.toml", 4), "initializer 'intercepts2' is external data \\(location 'fleet.toml'\\)"),
    "extra initializer": (_extra_initializer, "initializer names differ: missing \\[\\], unexpected \\['extra'\\]"),
    "extra node": (_extra_node, "1 extra node\\(s\\), the first Identity 'Identity'"),
    "changed op": (_changed_op, "node 4 is Sigmoid 'Relu', expected Relu 'Relu'"),
    "subgraph": (_subgraph, "node 'Relu' \\(If\\) attribute '(then|else)_branch' holds a subgraph"),
    "function": (_function, "model defines 1 function\\(s\\) \\('Leak'\\)"),
    "sparse initializer": (_sparse, "1 sparse initializer"),
    "external constant": (_external_constant, "node 'Constant' \\(Constant\\) attribute 'value' is external data"),
    "opset": (_opset, "expected IR 8 with \\[\\('', 17\\), \\('ai.onnx.ml', 1\\)\\]"),
    "IR version": (_ir_version, "IR version 9 with"),
    "training graph": (_training_info, "training graphs"),
    "metadata": (_metadata, "outside its weights"),
    "value info": (_value_info, "value info declarations differ"),
    "shape constant": (_shape_constant, "outside its weights"),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_anything_but_the_reference_graph_is_refused(name: str) -> None:
    tamper, message = FOREIGN[name]
    reference = reference_model(SPEC, ModelSettings())
    model = _update()
    tamper(model)
    with pytest.raises(ForeignGraph, match=message) as caught:
        load_compatible(model.SerializeToString(), reference)
    assert caught.value.reason is Refusal.FOREIGN_GRAPH


def test_descriptive_fields_do_not_matter() -> None:
    """A checkpoint written when sites proposed v0 says producer "skl2onnx": still the same graph."""
    model = _update()
    model.producer_name, model.producer_version, model.doc_string = "skl2onnx", "1.20.0", "something else"
    model.opset_import.reverse()  # skl2onnx writes them in either order
    assert set(load_compatible(model.SerializeToString(), reference_model(SPEC, ModelSettings()))) == set(read_weights(model))


def test_external_data_update_is_refused_and_the_file_never_reaches_a_global_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack from issue 11: an update whose weight is external data pointing at
    fleet.toml (next to the aggregator, holding a token). Reading it as numbers would
    fetch the file; the round refuses it as foreign_graph and the global model never
    holds the file's bytes."""
    secret = b'token = "influx-SECRET-0123456789abcdef"\n'
    (tmp_path / "fleet.toml").write_bytes(secret)
    monkeypatch.chdir(tmp_path)  # where a relative external-data location is looked up
    settings = ModelSettings()
    v0 = reference_model(SPEC, settings)
    n = 13 * 64
    attack = _external(_update(), "coefficient", "fleet.toml", len(secret) // 4 * 4)
    attack.graph.initializer[0].dims[:] = [len(secret) // 4]  # the shape the file's bytes fill
    raw = numpy_helper.to_array(attack.graph.initializer[0]).tobytes()
    assert raw == secret[: len(raw)]  # the attack is real: reading the tensor reads the file
    attack.graph.initializer[0].dims[:] = [13, 64]
    attack.graph.initializer[0].external_data[2].value = str(4 * n)  # ... or as much of it as the shape holds

    sites = ("site1", "site2")
    r = Round(1, 0, uuid.uuid4().hex, time.time(), time.time() + 60, sites)
    payload = envelope.encode(kind="update", site="site1", round=1, model_version=0, samples=100, body=attack.SerializeToString())
    with pytest.raises(Rejected, match="initializer 'coefficient' is external data") as caught:
        r.check("site1", payload, v0, 1024 * 1024, UNSIGNED)
    assert caught.value.reason is Refusal.FOREIGN_GRAPH and not r.accepted
    with pytest.raises(ForeignGraph):
        read_weights(attack)  # nor does reading weights anywhere else fetch the file

    good = _update()
    payload = envelope.encode(kind="update", site="site2", round=1, model_version=0, samples=100, body=good.SerializeToString())
    accepted = r.check("site2", payload, v0, 1024 * 1024, UNSIGNED)
    v1 = merge(FedAvg(), v0, [SiteUpdate(accepted.site, accepted.weights, accepted.samples)]).SerializeToString()
    assert secret[:8] not in v1 and b"fleet.toml" not in v1 and b"influx" not in v1
    check_graph(onnx.load_model_from_string(v1), v0)


def test_a_round_has_no_site_proposed_model() -> None:
    """Round 0 is gone from the sites' side: an update is always checked against a global model."""
    r = Round(1, 0, uuid.uuid4().hex, time.time(), time.time() + 60, ("site1",))
    other = reference_model(SPEC, ModelSettings(hidden=(8,)))  # any self-consistent model a site might propose
    payload = envelope.encode(kind="update", site="site1", round=1, model_version=0, samples=100, body=other.SerializeToString())
    with pytest.raises(Rejected) as caught:
        r.check("site1", payload, reference_model(SPEC, ModelSettings()), 1024 * 1024, UNSIGNED)
    assert caught.value.reason is Refusal.FOREIGN_GRAPH


# --- the site's side ----------------------------------------------------------------------


Capture = FakeClient  # stands in for the MQTT client: records what the agent publishes


def test_site_update_is_the_global_model_with_its_weights(cmapss_dir: Path, tmp_path: Path) -> None:
    """A site waits for the aggregator's v0 (it proposes nothing), trains from its weights and
    sends the global model back with its own weights in it; its local model still works."""
    runs = load_subset("FD001", cmapss_dir).train[:6]
    settings = ModelSettings(hidden=(16,), local_epochs=1)
    spec = FeatureSpec.from_stats(runs_stats(runs, settings.window))
    topics = Topics()
    agent = EdgeAgent(SiteConfig(site="s1", state_dir=str(tmp_path / "state"), min_samples=10, insecure_unsigned=True))
    agent.client = Capture()
    for k, run in enumerate(runs):
        for t in range(len(run)):
            agent.handle(topics.sensors("s1", f"e{k}"), SensorReading(int(run.cycles[t]), tuple(run.settings[t]), tuple(run.sensors[t])).to_payload())
        agent.handle(topics.events("s1", f"e{k}"), EngineEvent("failure", int(run.cycles[-1])).to_payload())
    announcement = RoundAnnouncement(1, spec, announce_id=uuid.uuid4().hex, model_version=0, deadline=time.time() + 60,
                                     settings=settings, min_samples=10)
    agent.handle(topics.round, announcement.to_payload())
    updates = lambda: [envelope.decode(p) for t, p in agent.client.sent if t == topics.update("s1")]  # noqa: E731
    assert updates() == []  # waits for global v0
    v0 = reference_model(spec, settings)
    agent.handle(topics.global_model, envelope.encode(kind="global", site="aggregator", round=0, model_version=0, samples=0, body=v0.SerializeToString()))
    assert not any(k.startswith(("rejected", "internal")) for k in agent.counters), agent.counters
    [update] = updates()
    assert (update.kind, update.round, update.model_version, update.samples) == ("update", 1, 0, agent.buffer.rows)
    model = onnx.load_model_from_string(update.body)
    weights = check_graph(model, v0)  # the aggregator's graph, by construction
    assert model.SerializeToString() == replace_weights(v0, weights).SerializeToString()
    assert all(not np.array_equal(weights[n], w) for n, w in read_weights(v0).items())  # it trained
    assert agent.local_predictor is not None  # the site's local-only model is trained and exported as before
