"""Faults without loss: stopping never leaves processes behind or loses what was learned.

- `turbofed demo` on SIGTERM and SIGINT stops every child it started (broker, agents,
  replay, aggregator) and exits 128 + signum; SIGKILLed, its children still go (the kernel
  SIGTERMs them: PR_SET_PDEATHSIG), and still save their state on the way.
- An agent SIGTERMed right after buffering labelled rows has them on disk: restarted, it
  reports the same count. The aggregator SIGTERMed closes its store (no WAL left behind).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.livefleet import LiveFleet, wait_for
from tests.procs import descendants, wait_all_dead
from turbofed.deploy.identities import MONITOR
from turbofed.edge.buffer import TrainingBuffer
from turbofed.simulation.broker import BrokerHandle
from turbofed.simulation.localfleet import FleetWatch
from turbofed.simulation.replay import replay

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def _count(store: Path, sql: str) -> int:
    """One count from the results store, read-only (0 while it cannot be read)."""
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:  # closed: never the last connection
            return int(db.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0


def _started(store: Path) -> bool:
    """The aggregator has opened its store and recorded its start."""
    return _count(store, "SELECT COUNT(*) FROM events WHERE kind = 'started'") > 0


def _demo_children(demo: subprocess.Popen, until: str, timeout: float) -> dict[tuple[int, int], str]:
    """Every process the demo started, collected until one whose command line holds `until` runs."""
    seen: dict[tuple[int, int], str] = {}
    deadline = time.monotonic() + timeout
    while not any(until in cmd for cmd in seen.values()):
        assert demo.poll() is None, f"the demo exited early ({demo.returncode})"
        assert time.monotonic() < deadline, f"no {until.strip()} within {timeout:.0f} s; saw {sorted(seen.values())}"
        seen.update(descendants(demo.pid))
        time.sleep(0.05)
    return seen


# SIGINT arrives while the training engines are replayed, the others once the aggregator runs.
@pytest.mark.parametrize("sig, when", [(signal.SIGTERM, " aggregator "), (signal.SIGINT, " replay "), (signal.SIGKILL, " aggregator ")],
                         ids=["SIGTERM", "SIGINT-during-replay", "SIGKILL"])
def test_demo_stops_every_child_it_started(sig: signal.Signals, when: str, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "turbofed.cli", "demo", "--dataset", "SYN001", "--sites", "2", "--rounds", "50", "--workdir", str(work)]
    with open(tmp_path / "demo.err", "wb") as err:
        demo = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    try:
        children = _demo_children(demo, when, 90)
        kinds = " ".join(children.values())
        for part in ("mosquitto" if "mosquitto" in kinds else "serve_amqtt", " edge ", when):
            assert part in kinds, (part, kinds)
        assert len([c for c in children.values() if " edge " in c]) == 2
        if when == " aggregator ":
            # Past its start-up (connected, subscribed: it needs the broker for that) to its first round.
            wait_for("the aggregator's round 0", lambda: _count(work / "results.sqlite", "SELECT COUNT(*) FROM rounds") > 0, 60)
        demo.send_signal(sig)
        code = demo.wait(45)  # grace: agents and replay, then the aggregator, then the broker, 10 s each at most
    finally:
        if demo.poll() is None:
            demo.kill()
    left = wait_all_dead(list(children), 20)
    assert not left, [children[k] for k in left]
    stderr = (tmp_path / "demo.err").read_text(errors="replace")
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + sig, stderr[-2000:]
        assert f"stopped by {sig.name}" in stderr
    # Every child stopped on SIGTERM, even after a SIGKILLed demo: state saved, store closed.
    for site in ("site1", "site2"):
        assert (work / "state" / site / "state.json").is_file(), site
    if when == " aggregator ":
        assert not (work / "results.sqlite-wal").exists()  # closed by its last connection (checked before we open one)
        assert _started(work / "results.sqlite")


@pytest.fixture
def fleet(broker: BrokerHandle, pki_dir: Path, tmp_path: Path) -> LiveFleet:
    return LiveFleet(broker, tmp_path, ["site1"], pki=pki_dir if broker.secure else None)


def test_agent_sigtermed_after_buffering_has_its_rows_on_disk(fleet: LiveFleet) -> None:
    watch = FleetWatch(fleet.settings(MONITOR), fleet.pki)
    agent = fleet.start_agent_process("site1")
    try:
        wait_for("the agent online", lambda: watch.site_status("site1").online, 60)
        train = replay("SYN001", None, 1, fleet.broker.host, fleet.broker.port, None, "round-robin", "train", progress=False,
                       max_engines=6, topics=fleet.topics, pki=fleet.handle.pki.root if fleet.handle.pki else None)
        wait_for("the rows labelled", lambda: watch.site_status("site1").samples == train["rows"], 60)
        agent.send_signal(signal.SIGTERM)  # at once: within the agent's 2 s between periodic saves
        assert agent.wait(20) == 0
        saved = TrainingBuffer.load(fleet.work / "state" / "site1" / "buffer.npz", 10**6)
        assert saved.rows == train["rows"] and len(saved.engines) == 6

        watch.status.pop("site1")
        agent = fleet.start_agent_process("site1")  # restarted: it says what it holds
        wait_for("the restarted agent online", lambda: watch.site_status("site1").online, 60)
        assert watch.site_status("site1").samples == train["rows"]
    finally:
        agent.terminate()
        agent.wait(20)
        watch.close()


def test_aggregator_sigtermed_closes_its_store(fleet: LiveFleet) -> None:
    aggregator = fleet.start_aggregator_process()
    store = Path(fleet.fleet.store)
    try:
        wait_for("the aggregator's 'started' event", lambda: _started(store), 60)
        aggregator.send_signal(signal.SIGTERM)
        assert aggregator.wait(20) == 0
    finally:
        if aggregator.poll() is None:
            aggregator.kill()
    assert not Path(f"{store}-wal").exists()  # the last connection closed: WAL checkpointed and removed
    assert _started(store)
