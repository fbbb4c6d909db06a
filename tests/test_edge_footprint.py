"""The inference-only profile: predicts with onnxruntime, follows the global model, and never
imports scikit-learn, skl2onnx or onnx (asserted on sys.modules in the agent's own process:
onnxruntime and numpy are all a device needs to predict).
Also a smoke run of `turbofed bench edge`."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.livefleet import admit_topics, broker_table
from turbofed import envelope
from turbofed.config import BrokerSettings, ModelSettings
from turbofed.deploy.identities import AGGREGATOR, gateway_name
from turbofed.messages import Predictions, RoundAnnouncement, SensorReading, Status
from turbofed.mqtt import connect, make_client
from turbofed.simulation.broker import BrokerHandle
from turbofed.topics import Topics

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0
# What an inference-only agent never imports (top-level package names; onnxruntime is not onnx).
TRAINING_ONLY = ("sklearn", "skl2onnx", "onnx")
# Printed by the agent process on its way out: the training-only modules it ever imported.
MODULES_HOOK = (
    "import atexit, json, sys\n"
    f"atexit.register(lambda: print('MODULES ' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_ONLY!r})), flush=True))\n"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small global model (trained here, with scikit-learn) on synthetic engines, its spec,
    and the engines whose readings the agent will get."""
    from turbofed.data.synthetic import generate_fleet
    from turbofed.edge.features import run_features, runs_stats
    from turbofed.edge.learner import RulModel
    from turbofed.spec import FeatureSpec

    runs = generate_fleet(n_train=6, n_test=0, seed=3).train
    settings = ModelSettings(hidden=(8,), local_epochs=1, window=20)
    stats = runs_stats(runs, settings.window)
    spec = FeatureSpec.from_stats(stats, settings.window)
    model = RulModel(settings, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn on the one-row initialising step
        model.train(np.vstack([run_features(spec, r.cycles, r.sensors) for r in runs]), np.concatenate([r.rul() for r in runs]), epochs=2)
    return {"runs": runs, "settings": settings, "spec": spec, "onnx": model.to_onnx()}


def _announcement(trained: dict, number: int, model_version: int) -> bytes:
    return RoundAnnouncement(
        number, trained["spec"], announce_id=uuid.uuid4().hex, model_version=model_version, deadline=time.time() + 120,
        settings=trained["settings"], min_samples=50, strategy="fedavg",
    ).to_payload()


def _global(trained: dict, version: int) -> bytes:
    return envelope.encode(kind="global", site="aggregator", round=version, model_version=version, samples=100, body=trained["onnx"])


class Listener:
    """A test-side MQTT client that queues (topic, payload)."""

    def __init__(self, broker: BrokerSettings, *topics: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = make_client(f"t-fp-{uuid.uuid4().hex[:8]}", broker)
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload))
        connect(self.client, broker)
        for topic in topics:
            self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=TIMEOUT)

    def wait(self, what: str, match, timeout: float = TIMEOUT, proc: subprocess.Popen | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the agent exited ({proc.returncode}) while waiting for {what}: {proc.stdout.read() if proc.stdout else ''}")
            try:
                topic, payload = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            found = match(topic, payload)
            if found:
                return found
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _readings(topics: Topics, site: str, runs, cycles: int) -> list[tuple[str, bytes]]:
    out = []
    for t in range(cycles):
        for k, run in enumerate(runs):
            if t < len(run):
                out.append((topics.sensors(site, f"e{k}"), SensorReading(int(run.cycles[t]), tuple(run.settings[t]), tuple(run.sensors[t])).to_payload()))
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_inference_agent_predicts_follows_the_global_model_and_never_imports_sklearn_or_onnx(broker: BrokerHandle, trained: dict, tmp_path: Path) -> None:
    """`turbofed edge --profile inference` against a real broker: retained global model and
    round announcement caught up on connect, federated predictions published, a new global
    model followed, and no scikit-learn module in its sys.modules when it exits."""
    tag = uuid.uuid4().hex[:8]
    site = "site1"  # a session identity: on Mosquitto the agent connects as itself, with TLS
    topics = Topics(f"fp{tag}/v1", f"plantfp{tag}")
    admit_topics(broker, topics)
    settings = broker.settings(AGGREGATOR, topic_root=topics.root, plant_root=topics.plant_root)
    config = tmp_path / "site.toml"
    config.write_text(f'site = "{site}"\nstate_dir = "{tmp_path / "state"}"\nengines = "*"\npredictions_every_s = 0.2\n'
                      'insecure_unsigned = true\n\n'
                      + broker_table(broker.settings(site, topic_root=topics.root, plant_root=topics.plant_root)))
    listener = Listener(settings, topics.predictions(site), topics.status(site), topics.update(site))
    listener.publish(topics.global_model, _global(trained, 0), retain=True)
    listener.publish(topics.round, _announcement(trained, 1, 0), retain=True)
    code = MODULES_HOOK + "from turbofed.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "edge", "--config", str(config), "--profile", "inference"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, cwd=tmp_path,
    )
    try:
        def status(version: int):
            def match(topic: str, payload: bytes):
                if topic == topics.status(site) and payload:
                    body = Status.from_payload(payload, site=site)
                    return body if body.online and body.model_version == version else None
            return match

        first = listener.wait("the agent online with global v0", status(0), proc=proc)
        assert first.profile == "inference"
        gateway = Listener(broker.settings(gateway_name(site), topic_root=topics.root, plant_root=topics.plant_root))
        for topic, payload in _readings(topics, site, trained["runs"][:2], 40):
            gateway.publish(topic, payload)  # readings come from the site's gateway: the ACL lets only it publish them
        gateway.close()

        def federated(topic: str, payload: bytes):
            if topic != topics.predictions(site):
                return None
            rows = Predictions.from_payload(payload, site=site).rows
            return rows if rows and all(r[3] is not None for r in rows) else None

        rows = listener.wait("federated predictions", federated, proc=proc)
        assert all(r[2] is None for r in rows)  # no local model without training
        assert all(r[3] >= 0 for r in rows)
        listener.publish(topics.global_model, _global(trained, 1), retain=True)  # the fleet trained a round
        listener.wait("the agent to follow global v1", status(1), proc=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        for topic in (topics.global_model, topics.round, topics.status(site)):
            listener.publish(topic, b"", retain=True)
        listener.close()
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.startswith("MODULES ")]
    assert lines, f"the agent did not report its modules:\n{out}"
    assert json.loads(lines[-1][len("MODULES "):]) == []


CHILD = textwrap.dedent(
    """
    import json, sys, time, types, uuid
    from pathlib import Path
    from turbofed.edge.agent import EdgeAgent
    from turbofed.config import ModelSettings, SiteConfig
    from turbofed.messages import EngineEvent, RoundAnnouncement, SensorReading
    from turbofed.spec import FeatureSpec
    from turbofed.topics import Topics

    work = Path(sys.argv[1])
    training_only = tuple(sys.argv[2].split(","))
    spec, settings = json.loads((work / "spec.json").read_text()), json.loads((work / "settings.json").read_text())
    published = []

    class Client:  # connected; acknowledges every message at once (so the outbox empties)
        on_publish = None

        def is_connected(self):
            return True

        def publish(self, topic, payload=b"", qos=0, retain=False):
            published.append(topic)
            if qos and self.on_publish:
                self.on_publish(self, None, len(published), None, None)
            return types.SimpleNamespace(mid=len(published), rc=0)

    t = Topics()
    agent = EdgeAgent(SiteConfig(site="s1", state_dir=str(work / "state"), insecure_unsigned=True), training=False)
    agent.client = Client()
    agent.handle(t.global_model, (work / "global.env").read_bytes())
    agent.handle(t.round, RoundAnnouncement(1, FeatureSpec.from_dict(spec), announce_id=uuid.uuid4().hex, model_version=0,
        deadline=time.time() + 60, settings=ModelSettings.from_dict(settings), min_samples=10).to_payload())
    readings = json.loads((work / "readings.json").read_text())
    for engine, cycle, setting, sensors in readings:
        agent.handle(t.sensors("s1", engine), SensorReading(cycle, tuple(setting), tuple(sensors)).to_payload())
    last = {}
    for engine, cycle, _, _ in readings:
        last[engine] = cycle
    for engine, cycle in last.items():
        agent.handle(t.events("s1", engine), EngineEvent("failure", cycle).to_payload())
    agent.flush()
    agent.save()
    print(json.dumps({
        "training_only": sorted(m for m in sys.modules if m.split(".")[0] in training_only),
        "onnxruntime": "onnxruntime" in sys.modules,
        "readings": agent.counters["readings"], "failures": agent.counters["failures"],
        "predictions": published.count(t.predictions("s1")),
        "federated": agent.fed_predictor is not None, "labelled_rows": agent.buffer.rows,
        "rejected": {k: v for k, v in agent.counters.items() if k.startswith("rejected")},
    }))
    """
)


@pytest.mark.timeout(120)
def test_inference_agent_in_process_never_imports_sklearn_or_onnx(trained: dict, tmp_path: Path) -> None:
    """No broker: a fresh process feeds an inference agent a global model, a round and
    readings through EdgeAgent.handle (predicting every cycle), then reports which
    scikit-learn, skl2onnx and onnx modules it imported: none (issue #17: importing `onnx` costs
    ~17 MB of RSS and it is never needed to predict)."""
    runs = trained["runs"][:3]
    (tmp_path / "spec.json").write_text(json.dumps(trained["spec"].to_dict()))
    (tmp_path / "settings.json").write_text(json.dumps(trained["settings"].to_dict()))
    (tmp_path / "global.env").write_bytes(_global(trained, 0))
    readings = [[f"e{k}", int(r.cycles[t]), r.settings[t].tolist(), r.sensors[t].tolist()] for k, r in enumerate(runs) for t in range(len(r))]
    (tmp_path / "readings.json").write_text(json.dumps(readings))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), ",".join(TRAINING_ONLY)],
                          capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["training_only"] == []
    assert report["onnxruntime"]  # the check looked at a process that did predict
    assert report["federated"] and report["predictions"] >= 1
    assert report["readings"] == len(readings) and report["failures"] == len(runs)
    assert report["labelled_rows"] == 0 and report["rejected"] == {}  # no training data kept without training


def _inference_agent(tmp_path: Path):
    from tests.fakeclient import FakeClient
    from turbofed.config import SiteConfig
    from turbofed.edge.agent import EdgeAgent

    agent = EdgeAgent(SiteConfig(site="s1", state_dir=str(tmp_path / "state"), insecure_unsigned=True), training=False)
    agent.client = FakeClient()
    return agent


def test_inference_site_answers_a_round_with_skip(trained: dict, tmp_path: Path) -> None:
    agent = _inference_agent(tmp_path)
    topics = Topics()
    agent.handle(topics.global_model, _global(trained, 0))
    agent.handle(topics.round, _announcement(trained, 1, 0))
    sent = [envelope.decode(p) for t, p in agent.client.sent if t == topics.update("s1")]
    assert [(e.kind, e.round) for e in sent] == [("skip", 1)]


def test_inference_site_joining_after_training_predicts(trained: dict, tmp_path: Path) -> None:
    agent = _inference_agent(tmp_path)
    topics = Topics()
    agent.handle(topics.global_model, _global(trained, 8))
    agent.handle(topics.round, RoundAnnouncement(8, trained["spec"], done=True).to_payload())
    for topic, payload in _readings(topics, "s1", trained["runs"][:1], 5):
        agent.handle(topic, payload)
    assert agent.engines["e0"].last[2] is not None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_edge_smoke(tmp_path: Path) -> None:
    """`turbofed bench edge` on 3 engines: the JSON keys, and no sklearn in the inference child."""
    out = tmp_path / "edge.json"
    proc = subprocess.run(
        [sys.executable, "-m", "turbofed.cli", "bench", "edge", "--engines", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["rss_mb"]) == {"training", "inference"}
    rss = result["rss_mb"]
    # The inference profile never loads scikit-learn: it must cost clearly less memory than
    # training (README: 75.9 vs 212.0 MB in a device-like venv); a Python process holding
    # numpy and onnxruntime is never below 20 MB, so a smaller figure measured nothing.
    assert 20 < rss["inference"] < 0.8 * rss["training"], rss
    for engine in ("onnxruntime", "sklearn"):
        assert 0 < result["predict_us"][engine]["p50"] <= result["predict_us"][engine]["p99"]
    assert set(result["cpu_s_per_cycle"]) == {"training", "inference"}
    assert all(v > 0 for v in result["cpu_s_per_cycle"].values())
    assert {"machine", "settings", "seed"} <= set(result)
    assert result["detail"]["sklearn_modules_loaded"]["inference"] == []
    assert result["detail"]["sklearn_modules_loaded"]["training"] != []
    assert "onnx" not in result["detail"]["heavy_packages_loaded"]["inference"]
    assert result["detail"]["passes"]["training"]["round"]["updates_sent"] == 1
