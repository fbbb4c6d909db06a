"""Issue #12, edge side: an agent on a full or read-only disk keeps predicting and serving,
says so once (and in its Status), leaves no temporary file and no damaged state, saves
again by itself when space returns, and after a restart has every labelled row; new engine
ids cannot grow an agent beyond max_engines, nor its memory beyond a bound per engine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import fill_disk
from tests.fakeclient import FakeClient
from turbofed.benchmarks.edge_memory import feed_new_engines, serving_agent
from turbofed.config import ModelSettings, SiteConfig
from turbofed.data.cmapss import EngineRun, load_subset
from turbofed.edge.agent import EdgeAgent
from turbofed.edge.buffer import load_histories
from turbofed.edge.features import runs_stats
from turbofed.edge.inference import OnnxPredictor
from turbofed.edge.learner import RulModel
from turbofed.edge.outbox import OUTBOX_DB, Outbox
from turbofed.messages import EngineEvent, SensorReading, Status
from turbofed.spec import FeatureSpec
from turbofed.topics import Topics

SITE = "site1"
TOPICS = Topics()


def _agent(state_dir: Path) -> EdgeAgent:
    agent = EdgeAgent(SiteConfig(site=SITE, state_dir=str(state_dir), insecure_unsigned=True))
    agent.client = FakeClient()
    return agent


def _serve(agent: EdgeAgent, engine: str, run: EngineRun, fail: bool, cycles: int = 60) -> None:
    """The first `cycles` readings of `run`, then a failure at the last of them if `fail`."""
    for t in range(cycles):
        agent.handle(TOPICS.sensors(SITE, engine), SensorReading(int(run.cycles[t]), tuple(run.settings[t]), tuple(run.sensors[t])).to_payload())
    if fail:
        agent.handle(TOPICS.events(SITE, engine), EngineEvent("failure", int(run.cycles[cycles - 1])).to_payload())


def _statuses(agent: EdgeAgent) -> list[Status]:
    return [Status.from_payload(p, site=SITE) for t, p in agent.client.sent if t == TOPICS.status(SITE)]


def _predictions(agent: EdgeAgent) -> int:
    return sum(len(json.loads(p)["rows"]) for t, p in agent.client.sent if t == TOPICS.predictions(SITE))


def test_full_then_read_only_disk_loses_no_labelled_row(small_disk: Path, cmapss_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = load_subset("FD001", cmapss_dir).train[:5]
    settings = ModelSettings(hidden=(8,))
    spec = FeatureSpec.from_stats(runs_stats(runs, settings.window))
    state = small_disk / "state"
    agent = _agent(state)
    model = RulModel(settings, spec).to_onnx()  # an untrained model predicts all the same
    agent.fleet_spec, agent.global_model, agent.global_version, agent.fed_predictor = spec, model, 0, OnnxPredictor(model)
    _serve(agent, "e1", runs[0], fail=True)
    _serve(agent, "e2", runs[1], fail=True)
    agent.flush()
    agent.save()
    saved_rows = 120
    assert agent.storage.state == "ok" and agent.buffer.rows == saved_rows
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.suffix in (".npz", ".json", ".onnx")}

    filler = fill_disk(small_disk)
    sent_before = _predictions(agent)
    with caplog.at_level(logging.INFO, logger="turbofed.edge"):
        _serve(agent, "e3", runs[2], fail=True)  # fails here while the disk is full
        _serve(agent, "e4", runs[3], fail=False, cycles=40)  # and one still in service
        for _ in range(3):
            agent.flush()
            agent.save()
    held = saved_rows + 60
    assert agent.buffer.rows == held and agent.storage.state == "full"
    assert _predictions(agent) - sent_before == 60 + 40  # every reading still predicted and reported
    assert _statuses(agent)[-1].storage == "full"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    expected = (f"site {SITE}: state folder {state}: disk full (No space left on device); keeping the last saved state, "
                f"{held} labelled rows held in memory")
    assert [w for w in warnings if "disk full" in w] == [expected]  # once, however many saves fail
    assert not any(r.exc_info for r in caplog.records) and not any("Traceback" in w for w in warnings)
    assert agent.counters["internal_error"] == 0
    assert sorted(p.name for p in state.iterdir() if ".tmp" in p.name) == []  # no temporary file left filling the disk
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.name in before} == before  # the previous state, whole
    assert sum(len(c) for _, c, _, _ in load_histories(state / "buffer.npz")[0]) == saved_rows

    filler.unlink()  # space returns: the next save has every row, without being asked
    with caplog.at_level(logging.INFO, logger="turbofed.edge"):
        agent.dirty, agent._last_save = True, 0.0
        agent.flush()
    assert agent.storage.state == "ok" and _statuses(agent)[-1].storage == "ok"
    assert any("takes saves again" in r.getMessage() for r in caplog.records)
    assert sum(len(c) for _, c, _, _ in load_histories(state / "buffer.npz")[0]) == held

    # Read-only: the same, said as such. (A filesystem with a file open for writing cannot be made
    # read-only: the outbox is closed for the remount and opened again on the read-only disk.)
    agent.outbox.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        agent.outbox = Outbox(state / OUTBOX_DB, agent.config.outbox_max_bytes, agent.outbox.topics, SITE, logging.getLogger("t"), agent.counters)
        agent.client = agent.client  # its acknowledgements to the new outbox
        _serve(agent, "e5", runs[4], fail=True)
        agent.flush()
        agent.save()
        assert agent.storage.state == "read-only" and _statuses(agent)[-1].storage == "read-only"
        assert agent.buffer.rows == held + 60
        assert agent.counters["outbox.unsaved"] > 0 and _predictions(agent) > sent_before + 100  # reports go out from memory
    finally:
        agent.outbox.close()
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    agent.outbox = Outbox(state / OUTBOX_DB, agent.config.outbox_max_bytes, agent.outbox.topics, SITE, logging.getLogger("t"), agent.counters)
    agent.save()
    assert agent.storage.state == "ok"
    del agent

    restarted = _agent(state)  # every labelled row is back, and the engine in service
    assert restarted.buffer.rows == held + 60
    assert sorted(e for e, *_ in restarted.buffer.engines) == ["e1", "e2", "e3", "e5"]
    assert list(restarted.engines) == ["e4"] and restarted.engines["e4"].n == 40
    np.testing.assert_array_equal(restarted.engines["e4"].history()[0], runs[3].cycles[:40])
    assert os.path.exists(state / "global.onnx")


# --- bounded memory: new engine ids cannot grow an agent without limit ----------------------

PER_ENGINE_BYTES = 12 * 1024  # an engine heard from once: ~1.4 KB of history, one 30-cycle window (6.7 KB), bookkeeping


def test_new_engine_ids_are_bounded_in_number_and_memory(tmp_path: Path) -> None:
    agent = serving_agent(tmp_path / "state")
    cap = agent.config.max_engines
    assert cap == 1_000  # the default: a site has tens to hundreds of engines
    feed_new_engines(agent, 10, prefix="warm")  # onnxruntime's first-call buffers are not the engines'
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        feed_new_engines(agent, cap + 500)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(agent.engines) == cap
    assert agent.counters["rejected.too_many_engines"] == 510  # none idle: refused and counted
    assert held - before < cap * PER_ENGINE_BYTES, (held - before) / cap
    track = next(iter(agent.engines.values()))
    assert track.cycles.nbytes + track.sensors.nbytes <= 8 * 22 * 8  # no preallocated history

    # Engines gone quiet make room: the idle are forgotten, the new taken, the count stays at the cap.
    idle = list(agent.engines)[:300]
    for engine in idle:
        agent.engines[engine].last_seen -= agent.config.engine_idle_s + 1
    refused = agent.counters["rejected.too_many_engines"]
    feed_new_engines(agent, 300, prefix="later")
    assert len(agent.engines) == cap and not set(idle) & set(agent.engines)
    assert agent.counters["engines_evicted"] == 300 and agent.counters["rejected.too_many_engines"] == refused

    # A history grows with its readings (doubling), up to history_cycles.
    topics = Topics()
    engine = next(iter(agent.engines))
    sensors = tuple(float(x) for x in range(21))
    for cycle in range(2, 101):
        agent.handle(topics.sensors("s1", engine), SensorReading(cycle, (0.0, 0.0, 100.0), sensors).to_payload())
    assert agent.engines[engine].n == 100 and len(agent.engines[engine].cycles) == 128

    # Everything else keyed by engine id stays within the cap too: truths revealed for many engines.
    for i in range(cap + 200):
        e = f"scored-{i}"
        if len(agent.engines) == cap:  # room for it (truth then forgets it)
            agent.engines.pop(next(iter(agent.engines)))
        agent.handle(topics.sensors("s1", e), SensorReading(1, (0.0, 0.0, 100.0), sensors).to_payload())
        agent.handle(topics.events("s1", e), EngineEvent("truth", 1, 50.0).to_payload())
    assert len(agent.scored) == cap and len(agent.engines) <= cap
