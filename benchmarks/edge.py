"""`turbofed bench edge`: what the edge agent costs on the machine it runs on.

Measured, each profile in its own fresh Python process (so one profile's imports never
count against the other's memory):

- resident memory of the agent (training and inference-only profiles) after a replay of
  N engines (default 100 C-MAPSS FD001 training engines, else the synthetic fleet): the
  peak (VmHWM, what the device must fit) and the resident set at each stage;
- CPU seconds per replayed cycle (one engine's sensor reading, handled end to end);
- per-prediction latency, window update included, with onnxruntime (what the agent
  runs) next to scikit-learn's own `predict` on the same input.

The agent is fed in process, without a broker: `EdgeAgent.handle(topic, payload)` gets
exactly the (topic, payload) pairs `turbofed replay` publishes (turbofed.simulation.replay's schedule:
SensorReading payloads, failure events), plus the aggregator's messages (a round
announcement and a global model trained here on the same engines). Its MQTT client is
a stand-in that drops what the agent publishes, so the figures are the agent's own,
not the network's. Each child process does what the agent's run loop does: handle every
message, flush predictions every `predictions_every_s`, save state when dirty:

    1. global model v0 and round 1 (the training profile sits it out: no labels yet)
    2. replay pass 1: the N engines run to failure (labels reach the training buffer)
    3. training profile only: round 2, trained from the global model (the federated
       model, then the site's local model), update sent
    4. replay pass 2: the same engines again under new ids; the training profile now
       predicts every cycle with both its local and the federated model

`cpu_s_per_cycle` is pass 2 (the steady state); pass 1 and the round are in `detail`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from turbofed.benchmarks import emit, machine_info

# Only the standard library at module level: a child process imports this module, and
# whatever it imports counts against the agent's measured memory.

SITE = "bench"
# Inference RSS goal: issue #17 (was 80 MB).
GOALS = {"rss_inference_mb": 60.0, "rss_training_mb": 250.0, "predict_p50_us": 50.0}
# Packages worth knowing about when they are in the agent's process (top-level names).
HEAVY = ("sklearn", "skl2onnx", "scipy", "onnx", "pandas", "pyarrow", "matplotlib", "torch")
WARMUP = 200  # predictions whose timings are dropped (first calls allocate)
MAX_TIMED = 10_000  # predictions timed per path
TRAIN_EPOCHS = 5  # for the global model the agents start from


# --------------------------------------------------------------------------- helpers


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Resident set size now (Linux /proc; elsewhere the peak is the best we have)."""
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return round(kb / 1024, 1)


def percentiles(values_ns: list[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values_ns, dtype=float) / 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1), "mean": round(float(a.mean()), 1), "n": int(a.size)}


def environment() -> dict[str, Any]:
    """The Python environment measured: a device's venv holds only the bundle's packages.

    scikit-learn imports pandas and pyarrow when they are installed (a development venv
    with the dashboard has them), which adds ~90 MB to the training profile that a device
    installed from a bundle does not pay."""
    from importlib.util import find_spec

    extra = [name for name in ("pandas", "pyarrow", "streamlit") if find_spec(name) is not None]
    return {"prefix": sys.prefix, "installed_beyond_bundle": extra, "device_like": not extra}


class NullClient:
    """Stands in for the agent's paho client: publishes go nowhere (but are counted) and are
    acknowledged at once, so the agent's outbox empties as with a broker."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.on_publish: Any = None

    def is_connected(self) -> bool:
        return True

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False) -> SimpleNamespace:
        self.messages += 1
        self.bytes += len(payload)
        if qos and self.on_publish is not None:
            self.on_publish(self, None, self.messages, None, None)
        return SimpleNamespace(mid=self.messages, rc=0)

    def disconnect(self) -> None:
        pass

    def loop_stop(self) -> None:
        pass


# --------------------------------------------------------------------------- child


def _messages(path: Path, prefix: str = ""):
    """(topic, payload) from a schedule file; `prefix` renames engines (a second pass)."""
    with open(path, "rb") as handle:
        for line in handle:
            topic, payload = line.rstrip(b"\n").split(b"\t", 1)
            text = topic.decode()
            if prefix:
                root, site, engine, kind = text.split("/")
                text = f"{root}/{site}/{prefix}{engine}/{kind}"
            yield text, payload


def _replay(agent: Any, path: Path, prefix: str = "") -> dict[str, float]:
    """Feed one pass the way EdgeAgent.run does (flush every predictions_every_s)."""
    every = agent.config.predictions_every_s
    cycles = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    next_flush = time.monotonic() + every
    for topic, payload in _messages(path, prefix):
        agent.handle(topic, payload)
        cycles += topic.endswith("/sensors")
        if time.monotonic() >= next_flush:
            agent.flush()
            next_flush = time.monotonic() + every
    agent.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cycles": cycles, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "cpu_s_per_cycle": cpu / max(cycles, 1)}


def child(profile: str, work: Path) -> dict[str, Any]:
    """One profile, in this (fresh) process: returns its memory and CPU figures."""
    rss_start = rss_mb()
    from turbofed.config import BrokerSettings, IdentitySettings, ModelSettings, SiteConfig
    from turbofed.edge.agent import EdgeAgent  # what `turbofed edge` imports
    from turbofed.messages import RoundAnnouncement, signed
    from turbofed.spec import FeatureSpec
    from turbofed.topics import Topics

    rss_import = rss_mb()
    meta = json.loads((work / "meta.json").read_text())
    topics = Topics(BrokerSettings().topic_root, BrokerSettings().plant_root)
    pki = work / "pki"  # the site signs what it sends and checks the aggregator's signatures, as in service
    identity = IdentitySettings(json.loads((pki / "fleet.json").read_text())["fleet_id"], str(pki / "identities" / SITE / "signing.key"),
                                str(pki / "identities" / "aggregator" / "signing.pub"))
    config = SiteConfig(site=SITE, state_dir=str(work / f"state-{profile}"), identity=identity)
    agent = EdgeAgent(config, training=(profile == "training"))
    agent.client = NullClient()
    aggregator = signed.aggregator_keys(str(pki))[0]

    def announce(number: int) -> None:
        body = RoundAnnouncement(
            number, FeatureSpec.from_dict(meta["spec"]), announce_id=uuid.uuid4().hex, model_version=0, deadline=time.time() + 3600,
            settings=ModelSettings.from_dict(meta["settings"]), min_samples=200, strategy="fedavg",
        )
        agent.handle(topics.round, aggregator.seal(signed.ROUND, body.to_payload(), round=body.round, version=body.version))

    model = (work / "global.onnx").read_bytes()
    announce(1)  # round 1 from global v0: the announcement vouches for the global that follows
    agent.handle(topics.global_model, aggregator.envelope(kind="global", round=0, model_version=0, samples=meta["rows"], body=model))
    out: dict[str, Any] = {"profile": profile, "rss_mb": {"start": rss_start, "after_import": rss_import}}
    out["pass1"] = _replay(agent, work / "schedule.txt")
    out["rss_mb"]["after_pass1"] = rss_mb()
    if profile == "training":
        cpu0, wall0 = time.process_time(), time.perf_counter()
        announce(2)
        out["round"] = {"cpu_s": round(time.process_time() - cpu0, 3), "wall_s": round(time.perf_counter() - wall0, 3),
                        "updates_sent": agent.counters.get("sent.update", 0), "rows": agent.buffer.rows}
        out["rss_mb"]["after_round"] = rss_mb()
    out["rss_mb"]["peak_after_replay"] = peak_rss_mb()  # the headline: N engines replayed (and one round trained)
    out["pass2"] = _replay(agent, work / "schedule.txt", prefix="p2-")
    out["rss_mb"]["after_pass2"] = rss_mb()
    agent.save()
    out["rss_mb"]["peak"] = peak_rss_mb()
    out["predictors"] = {"local": agent.local_predictor is not None, "federated": agent.fed_predictor is not None}
    out["published"] = {"messages": agent.client.messages, "bytes": agent.client.bytes}
    out["rejected"] = {k: v for k, v in agent.counters.items() if k.startswith(("rejected", "internal"))}
    out["sklearn_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "skl2onnx"))[:5]
    out["heavy_packages"] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    return out


# --------------------------------------------------------------------------- parent


def load_runs(n_engines: int, seed: int) -> tuple[list[Any], str]:
    """N training engines (run to failure): C-MAPSS FD001 when it is there, else synthetic."""
    from turbofed.config import resolve_data_dir
    from turbofed.data.cmapss import load_subset
    from turbofed.data.synthetic import generate_fleet
    from turbofed.errors import DataError

    folder = resolve_data_dir(None)
    if n_engines <= 100:
        try:
            return load_subset("FD001", folder).train[:n_engines], f"C-MAPSS FD001 train engines 1-{n_engines} from {folder}"
        except DataError as exc:
            reason = str(exc).split(";")[0]
    else:
        reason = "FD001 has 100 training engines"
    fleet = generate_fleet(n_train=n_engines, n_test=0, seed=seed)
    return fleet.train, f"synthetic fleet, {n_engines} engines, seed {seed} ({reason})"


def prepare(work: Path, n_engines: int, seed: int) -> dict[str, Any]:
    """The replay schedule, the fleet spec and a trained global model, written to `work`."""
    import numpy as np

    from turbofed.config import ModelSettings
    from turbofed.edge.features import run_features, runs_regime_stats, runs_stats, two_phase_spec
    from turbofed.edge.learner import RulModel
    from turbofed.simulation.fleet import FleetEngine, engine_id
    from turbofed.simulation.replay import publish_schedule

    runs, data = load_runs(n_engines, seed)
    settings = ModelSettings(seed=seed)
    spec = two_phase_spec(runs_regime_stats(runs), lambda regimes: runs_stats(runs, settings.window, regimes))  # as the fleet fixes it
    x = np.vstack([run_features(spec, r.cycles, r.sensors, r.settings) for r in runs])
    y = np.concatenate([r.rul() for r in runs])
    model = RulModel(settings, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn on the one-row initialising step
        model.train(x, y, epochs=TRAIN_EPOCHS)
    (work / "global.onnx").write_bytes(model.to_onnx())
    engines = [FleetEngine(SITE, engine_id("B", "train", r.unit), "train", r) for r in runs]
    n_messages = 0
    with open(work / "schedule.txt", "wb") as handle:
        for p in publish_schedule(engines):
            handle.write(p.topic.encode() + b"\t" + p.payload + b"\n")
            n_messages += 1
    meta = {"settings": settings.to_dict(), "spec": spec.to_dict(), "rows": int(len(x)), "messages": n_messages, "cycles": int(len(x)), "data": data}
    (work / "meta.json").write_text(json.dumps(meta))
    from turbofed.deploy.identities import init_from_fleet

    (work / "fleet.toml").write_text(f'sites = ["{SITE}"]\nstore = "results.sqlite"\nregistry = "registry"\n')
    init_from_fleet(work / "fleet.toml")  # work/pki: the site's and the aggregator's keys
    return {"meta": meta, "runs": runs, "spec": spec, "model": model}


def latency(runs: list[Any], spec: Any, model: Any, onnx_model: bytes) -> dict[str, Any]:
    """Per-prediction latency on the same readings, in replay order (tick-major).

    onnxruntime: exactly the agent's path, `EdgeAgent._predict` (window lookup, window
    update, features, onnxruntime, rounding). scikit-learn: the same window update and
    features, then `RulModel.predict` (the estimator's own predict, normalisation included).
    """
    import numpy as np

    from turbofed.edge.agent import EngineTrack
    from turbofed.edge.features import EngineWindow
    from turbofed.edge.inference import OnnxPredictor

    predictor = OnnxPredictor(onnx_model)
    order = sorted(((t, k) for k, r in enumerate(runs) for t in range(len(r))), key=lambda tk: (tk[0], tk[1]))[: MAX_TIMED + WARMUP]
    rows = [(k, int(runs[k].cycles[t]), np.asarray(runs[k].sensors[t], dtype=float)) for t, k in order]
    settings_of = {(k, int(runs[k].cycles[t])): np.asarray(runs[k].settings[t], dtype=float) for t, k in order}  # regimes need them

    cpu_ns: dict[str, list[int]] = {}

    def timed(step, name: str = "") -> list[int]:
        """Wall time per call; CPU time of this thread too (immune to other work on the box)."""
        wall, cpu = [], []
        for k, cycle, sensors in rows:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            step(k, cycle, sensors)
            wall.append(time.perf_counter_ns() - t0)
            cpu.append(time.thread_time_ns() - c0)
        if name:
            cpu_ns[name] = cpu[WARMUP:]
        return wall[WARMUP:]

    tracks = {k: EngineTrack() for k in range(len(runs))}
    def with_ort(k: int, c: int, s: np.ndarray) -> None:
        tracks[k].append(c, s, 10_000, settings_of[k, c])  # the agent's own window update
        float(predictor.predict(tracks[k].window(spec).features())[0])  # what EdgeAgent._predict does per model

    ort_ns = timed(with_ort, "onnxruntime")
    windows = {k: EngineWindow(spec) for k in range(len(runs))}

    def sk(k: int, c: int, s: np.ndarray) -> None:
        w = windows[k]
        w.push(c, s, settings_of[k, c])
        model.predict(w.features())

    sk_ns = timed(sk, "sklearn")
    windows = {k: EngineWindow(spec) for k in range(len(runs))}

    def window_only(k: int, c: int, s: np.ndarray) -> None:
        w = windows[k]
        w.push(c, s, settings_of[k, c])
        w.features()

    win_ns = timed(window_only)
    windows = {k: EngineWindow(spec) for k in range(len(runs))}
    push_ns = timed(lambda k, c, s: windows[k].push(c, s, settings_of[k, c]))  # push alone
    feats = [windows[k].features() for k in range(len(runs))]
    x = np.asarray(feats[0])
    ort_run = timed(lambda k, c, s: predictor.predict(x))
    sk_run = timed(lambda k, c, s: model.predict(x))
    return {
        "predict_us": {"onnxruntime": percentiles(ort_ns), "sklearn": percentiles(sk_ns)},
        "predict_cpu_us": {name: percentiles(v) for name, v in cpu_ns.items()},
        "parts_us": {
            "window_update_and_features": percentiles(win_ns),
            "window_push_only": percentiles(push_ns),
            "onnxruntime_run_only": percentiles(ort_run),
            "sklearn_predict_only": percentiles(sk_run),
        },
    }


def run_child(profile: str, work: Path, timeout: float = 900.0) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    cmd = [sys.executable, "-m", "turbofed.benchmarks.edge", "--child", profile, "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        from turbofed.errors import TurbofedError

        raise TurbofedError(f"bench edge: the {profile} child failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(n_engines: int = 100, seed: int = 0, progress=None) -> dict[str, Any]:
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="turbofed-bench-edge-") as tmp:
        work = Path(tmp)
        say(f"bench edge: preparing {n_engines} engines and a global model ({TRAIN_EPOCHS} epochs)")
        prep = prepare(work, n_engines, seed)
        meta = prep["meta"]
        children = {}
        for profile in ("inference", "training"):
            say(f"bench edge: {profile} profile in its own process ({meta['cycles']} cycles per pass)")
            children[profile] = run_child(profile, work)
        say("bench edge: prediction latency (onnxruntime vs scikit-learn, window update included)")
        lat = latency(prep["runs"], prep["spec"], prep["model"], (work / "global.onnx").read_bytes())
    rss = {p: children[p]["rss_mb"]["peak_after_replay"] for p in ("training", "inference")}
    cpu = {p: float(f"{children[p]['pass2']['cpu_s_per_cycle']:.3g}") for p in ("training", "inference")}
    p50 = lat["predict_us"]["onnxruntime"]["p50"]
    return {
        "rss_mb": rss,
        "predict_us": {k: {"p50": v["p50"], "p99": v["p99"]} for k, v in lat["predict_us"].items()},
        "cpu_s_per_cycle": cpu,
        "goals": {
            **GOALS,
            "met": {
                "rss_inference": rss["inference"] <= GOALS["rss_inference_mb"],
                "rss_training": rss["training"] <= GOALS["rss_training_mb"],
                "predict_p50": p50 <= GOALS["predict_p50_us"],
            },
        },
        "detail": {
            "rss_mb": {p: children[p]["rss_mb"] for p in ("training", "inference")},
            "passes": {p: {k: children[p][k] for k in ("pass1", "pass2", "round") if k in children[p]} for p in ("training", "inference")},
            "predictors_after": {p: children[p]["predictors"] for p in ("training", "inference")},
            "sklearn_modules_loaded": {p: children[p]["sklearn_modules"] for p in ("training", "inference")},
            "heavy_packages_loaded": {p: children[p]["heavy_packages"] for p in ("training", "inference")},
            "rejected": {p: children[p]["rejected"] for p in ("training", "inference")},
            "predict_us": lat["predict_us"],
            "predict_cpu_us": lat["predict_cpu_us"],
            "parts_us": lat["parts_us"],
        },
        "machine": machine_info("onnxruntime", "scikit-learn", "paho-mqtt"),
        "settings": {
            "engines": n_engines,
            "cycles_per_pass": meta["cycles"],
            "data": meta["data"],
            "feed": "in process: EdgeAgent.handle() with turbofed replay's (topic, payload) schedule; no broker (publishes dropped)",
            "rss": "peak resident set (VmHWM) of a fresh process per profile after replay pass 1 (and, training, one round); stages in detail.rss_mb",
            "environment": environment(),
            "cpu_s_per_cycle": "process CPU seconds per sensor reading in replay pass 2 (models loaded); pass 1 and the round in detail.passes",
            "latency": f"{MAX_TIMED} predictions after {WARMUP} warm-up, replay order; onnxruntime = EdgeAgent._predict, sklearn = same window update + RulModel.predict; wall time (thread CPU time in detail.predict_cpu_us)",
            "global_model_epochs": TRAIN_EPOCHS,
            "model": meta["settings"],
            "onnxruntime_threads": 1,
        },
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    r, p, c = result["rss_mb"], result["predict_us"], result["cpu_s_per_cycle"]
    g = result["goals"]
    lines = [
        f"{'':<34}{'measured':>12}{'goal':>10}",
        f"{'RSS, inference-only profile':<34}{r['inference']:>9.1f} MB{'<= ' + format(g['rss_inference_mb'], '.0f') + ' MB':>10}",
        f"{'RSS, training profile':<34}{r['training']:>9.1f} MB{'<= 250 MB':>10}",
        f"{'predict p50/p99, onnxruntime':<34}{p['onnxruntime']['p50']:>6.1f}/{p['onnxruntime']['p99']:.0f} us{'<= 50 us':>9}",
        f"{'predict p50/p99, scikit-learn':<34}{p['sklearn']['p50']:>6.0f}/{p['sklearn']['p99']:.0f} us",
        f"{'CPU per cycle, inference/training':<34}{c['inference'] * 1e6:>6.0f}/{c['training'] * 1e6:.0f} us",
        f"goals met: {', '.join(k for k, v in g['met'].items() if v) or 'none'}; missed: {', '.join(k for k, v in g['met'].items() if not v) or 'none'}",
    ]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    n = int(getattr(args, "engines", 100) or 100)
    if n < 1:
        from turbofed.errors import TurbofedError

        raise TurbofedError(f"--engines must be at least 1, got {n}")
    result = run_bench(n, seed=int(getattr(args, "seed", 0) or 0))
    emit(result, getattr(args, "json_out", None))
    print(format_table(result), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m turbofed.benchmarks.edge --child PROFILE --work DIR` (used by run_bench)."""
    parser = argparse.ArgumentParser(prog="python -m turbofed.benchmarks.edge")
    parser.add_argument("--child", choices=("training", "inference"),
                        help="internal: measure this profile in this process (run_bench starts one child per profile)")
    parser.add_argument("--work", help="internal: the folder run_bench prepared (schedule, model, identities)")
    parser.add_argument("--engines", type=int, default=100, help="engines replayed through each profile (default 100)")
    parser.add_argument("--json", dest="json_out", help="write the result JSON here too")
    args = parser.parse_args(argv)
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(json.dumps(child(args.child, Path(args.work))))
        return 0
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
