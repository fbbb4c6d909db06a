"""The SQLite results store: every write read back, truth arithmetic, WAL concurrency."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from turbofed.store import ResultsStore, StoreError, open_store
from turbofed.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "deep" / "results.sqlite") as s:  # parent folder created
        yield s


def test_open_store_path_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "results.sqlite"
    with open_store(path) as s:
        assert isinstance(s, ResultsStore) and isinstance(s, SqliteStore)
        assert set(s.counts().values()) == {0}
    with open_store(f"sqlite://{path}") as s:  # reopening keeps the schema
        assert s.counts()["rounds"] == 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(9,)]
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        open_store(path)
    with pytest.raises(StoreError, match="unsupported"):
        open_store("influxdb://localhost:8086")
    with pytest.raises(StoreError, match="folder"):
        open_store(tmp_path)


def test_rounds(store: SqliteStore) -> None:
    store.record_round(2, 2, 20.0, 25.0, [{"site": "s1", "samples": 10, "update_bytes": 100}],
                       3.5, "fedavg", "deadline")
    store.record_round(1, 1, 10.0, 12.0, [{"site": "s10", "samples": 7, "update_bytes": 70},
                                          {"site": "s2", "samples": 5, "update_bytes": 50}],
                       1.25, "fedavgm", "quorum", {"server_lr": 1.0, "momentum": 0.9})
    rounds = store.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0] == {"round": 1, "model_version": 1, "started": 10.0, "closed": 12.0, "aggregate_ms": 1.25,
                         "strategy": "fedavgm", "strategy_params": {"server_lr": 1.0, "momentum": 0.9},
                         "closed_by": "quorum", "samples": 12, "regions": [],
                         "participants": [{"site": "s2", "samples": 5, "update_bytes": 50},
                                          {"site": "s10", "samples": 7, "update_bytes": 70}]}
    # Re-recording a round replaces it, participants included.
    store.record_round(2, 2, 20.0, 26.0, [], 1.0, "fedavg", "deadline")
    assert store.rounds()[1]["participants"] == [] and store.rounds()[1]["closed"] == 26.0
    assert store.rounds()[1]["strategy_params"] == {}  # none given
    assert store.counts()["round_participants"] == 2


SUMMED = {"site": "s3", "samples": 0, "update_bytes": 0, "norm": None, "cosine": None, "action": "summed in region east"}
EAST = {"sites": 2, "samples": 300, "update_bytes": 9000, "claimed": 310, "norm_max": 1.5}  # a summary partial's totals


def test_a_round_counts_the_regions_that_sent_summary_partials(store: SqliteStore) -> None:
    """A two-level round's summed sites carry no weight; its regions' totals are stored with
    it and counted in its samples, re-recording replaces them, and the archive keeps them."""
    store.record_round(1, 1, 10.0, 12.0, [{"site": "s1", "samples": 40, "update_bytes": 4000}, SUMMED,
                                          {**SUMMED, "site": "s4"}], 1.0, "fedavg", "quorum", None, {"east": EAST})
    r = store.rounds()[0]
    assert r["regions"] == [{"region": "east", "sites": 2, "samples": 300, "update_bytes": 9000}]
    assert r["samples"] == 340 and [p["site"] for p in r["participants"]] == ["s1", "s3", "s4"]
    store.record_round(1, 1, 10.0, 13.0, [{"site": "s1", "samples": 40, "update_bytes": 4000}], 1.0, "fedavg", "quorum")
    assert store.rounds()[0]["regions"] == [] and store.rounds()[0]["samples"] == 40
    store.record_round(2, 2, 20.0, 22.0, [SUMMED], 1.0, "fedavg", "quorum", None, {"r10": EAST, "r2": {**EAST, "samples": 5}})
    assert [(g["region"], g["samples"]) for g in store.rounds()[1]["regions"]] == [("r2", 5), ("r10", 300)]  # natural order
    assert store.archive_rounds(1) == 2
    assert store.rounds() == [] and store.archived_rounds(1)[1]["samples"] == 305
    store.record_round(1, 1, 30.0, 31.0, [], 1.0, "fedavg", "quorum")  # the new epoch's round 1: no region left over
    assert store.rounds()[0]["regions"] == []


def test_schema_8_store_gains_the_regions_table(tmp_path: Path) -> None:
    """A store written before regions' totals were kept opens, upgraded: its rounds read as
    before (no regions), new rounds keep theirs."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_round(1, 1, 10.0, 12.0, [{"site": "s1", "samples": 5, "update_bytes": 50}], 1.0, "fedavg", "quorum")
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE round_regions; UPDATE schema_version SET version = 8;")
    db.close()
    with open_store(path) as s:
        assert [(r["samples"], r["regions"]) for r in s.rounds()] == [(5, [])]
        s.record_round(2, 2, 20.0, 22.0, [SUMMED], 1.0, "fedavg", "quorum", None, {"east": EAST})
        assert s.rounds()[1]["samples"] == 300
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(9,)]
    db.close()


def test_schema_2_store_gains_strategy_params(tmp_path: Path) -> None:
    """A store written before rounds recorded the strategy's parameters opens, upgraded."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_round(1, 1, 10.0, 12.0, [], 1.0, "fedavg", "quorum")
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE predictions DROP COLUMN out_of_range; ALTER TABLE predictions DROP COLUMN lower; ALTER TABLE predictions DROP COLUMN upper; ALTER TABLE rounds DROP COLUMN strategy_params; ALTER TABLE round_participants DROP COLUMN norm; ALTER TABLE round_participants DROP COLUMN cosine; ALTER TABLE round_participants DROP COLUMN action; DROP TABLE archived_rounds; DROP TABLE validation_metrics; DROP TABLE round_regions; UPDATE schema_version SET version = 2;")
    db.close()
    with open_store(path) as s:
        assert [(r["strategy"], r["strategy_params"]) for r in s.rounds()] == [("fedavg", {})]
        s.record_round(2, 2, 20.0, 22.0, [], 1.0, "fedadam", "quorum", {"tau": 0.001})
        assert s.rounds()[1]["strategy_params"] == {"tau": 0.001}
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(9,)]
    db.close()


def test_schema_3_store_gains_what_the_strategy_did_with_each_update(tmp_path: Path) -> None:
    """Participants of a round record their delta norm, cosine to the aggregate and action; a
    store written before that opens, upgraded, and its old rounds read as before."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_round(1, 1, 10.0, 12.0, [{"site": "s1", "samples": 5, "update_bytes": 50}], 1.0, "fedavg", "quorum")
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE predictions DROP COLUMN out_of_range; ALTER TABLE predictions DROP COLUMN lower; ALTER TABLE predictions DROP COLUMN upper; ALTER TABLE round_participants DROP COLUMN norm; ALTER TABLE round_participants DROP COLUMN cosine; ALTER TABLE round_participants DROP COLUMN action; DROP TABLE archived_rounds; DROP TABLE validation_metrics; DROP TABLE round_regions; UPDATE schema_version SET version = 3;")
    db.close()
    with open_store(path) as s:
        assert s.rounds()[0]["participants"] == [{"site": "s1", "samples": 5, "update_bytes": 50}]
        s.record_round(2, 2, 20.0, 22.0, [{"site": "s1", "samples": 5, "update_bytes": 50, "norm": 2.5, "cosine": -0.25, "action": "trimmed"},
                                          {"site": "s2", "samples": 6, "update_bytes": 60, "norm": 0.5, "cosine": None, "action": "kept"}],
                       1.0, "trimmed-mean", "quorum", {"beta": 0.2})
        assert s.rounds()[1]["participants"] == [
            {"site": "s1", "samples": 5, "update_bytes": 50, "norm": 2.5, "cosine": -0.25, "action": "trimmed"},
            {"site": "s2", "samples": 6, "update_bytes": 60, "norm": 0.5, "cosine": None, "action": "kept"}]


def test_schema_4_store_gains_the_round_archive(tmp_path: Path) -> None:
    """Rounds of an earlier fleet epoch are archived (fleet reset); a store written before the
    archive table existed opens, upgraded, and archives its rounds without losing one."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_round(1, 1, 10.0, 12.0, [{"site": "s1", "samples": 5, "update_bytes": 50}], 1.0, "fedavg", "quorum")
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE predictions DROP COLUMN out_of_range; ALTER TABLE predictions DROP COLUMN lower; ALTER TABLE predictions DROP COLUMN upper; DROP TABLE archived_rounds; DROP TABLE validation_metrics; DROP TABLE round_regions; UPDATE schema_version SET version = 4;")
    db.close()
    with open_store(path) as s:
        before = s.rounds()
        assert s.archive_rounds(7) == 1 and s.rounds() == [] and s.archived_rounds(7) == before


def test_schema_5_store_gains_prediction_intervals(tmp_path: Path) -> None:
    """Predictions carry the federated RUL's conformal interval from schema 6; a store written
    before opens, upgraded: its old rows read with no interval, new rows keep theirs."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_predictions("s1", [("e1", 1, 100.0, 90.0)], 1.0)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE predictions DROP COLUMN out_of_range; ALTER TABLE predictions DROP COLUMN lower; ALTER TABLE predictions DROP COLUMN upper; DROP TABLE validation_metrics; DROP TABLE round_regions; UPDATE schema_version SET version = 5;")
    db.close()
    with open_store(path) as s:
        s.record_predictions("s1", [("e1", 2, 99.0, 89.0, 80.0, 100.0)], 2.0)
        assert [(p["federated"], p["lower"], p["upper"]) for p in s.engine_trajectory("s1", "e1")] == [(90.0, None, None), (89.0, 80.0, 100.0)]


def test_rejections(store: SqliteStore) -> None:
    store.record_rejection(3, "s1", "hash", "sha256 mismatch", 5.0)
    store.record_rejection(None, "s2", "envelope", "unknown version 9", 4.0)
    store.record_rejection(4, "s1", "stale", "round 4 closed", 6.0)
    assert [(r["site"], r["reason"], r["round"]) for r in store.rejections()] == [
        ("s2", "envelope", None), ("s1", "hash", 3), ("s1", "stale", 4)]
    only = store.rejections(3)
    assert len(only) == 1 and only[0]["detail"] == "sha256 mismatch" and only[0]["at"] == 5.0


def test_status_upsert_and_last_seen(store: SqliteStore) -> None:
    store.record_status("s2", True, 10.0, "0.1.0", 3, 500)
    store.record_status("s1", True, 11.0, "0.1.0", 2, 100)
    store.record_status("s2", False, 20.0, None, None, None)  # bare last will
    store.record_status("s2", True, 15.0, "0.0.9", 1, 1)  # late redelivery of an older status: ignored
    rows = store.site_status()
    assert [r["site"] for r in rows] == ["s1", "s2"]
    s2 = rows[1]
    assert s2 == {"site": "s2", "online": False, "at": 20.0, "last_seen": 10.0,
                  "agent_version": "0.1.0", "model_version": 3, "samples": 500}
    store.record_status("s2", True, 30.0, "0.2.0", 4, 900)
    store.record_metrics("s2", 4, 4, {"engines": 1, "local": {"rmse": 1.0, "score": 1.0}}, 35.0)
    s2 = store.site_status()[1]
    assert s2["online"] is True and s2["agent_version"] == "0.2.0" and s2["last_seen"] == 35.0
    assert store.counts()["site_status"] == 2


def test_metrics_and_latest(store: SqliteStore) -> None:
    store.record_metrics("s1", 1, 1, {"engines": 10, "local": {"rmse": 30.0, "score": 900.0},
                                      "federated": {"rmse": 25.0, "score": None}}, 100.0)
    store.record_metrics("s1", 2, 2, {"engines": 12, "local": {"rmse": 28.0, "score": 800.0},
                                      "federated": {"rmse": 20.0, "score": 400.0}}, 200.0)
    store.record_metrics("s2", None, None, {"engines": 3, "local": {"rmse": float("nan"), "score": None}}, 150.0)
    rows = store.metrics()
    assert len(rows) == 5 and [r["at"] for r in rows] == [100.0, 100.0, 150.0, 200.0, 200.0]
    assert rows[2]["rmse"] is None  # non-finite stored as unknown
    s1 = store.metrics("s1")
    assert len(s1) == 4 and {r["round"] for r in s1} == {1, 2}
    first_fed = [r for r in s1 if r["model"] == "federated" and r["round"] == 1][0]
    assert (first_fed["rmse"], first_fed["score"], first_fed["engines"], first_fed["model_version"]) == (25.0, None, 10, 1)
    latest = store.latest_metrics()
    assert [(r["site"], r["model"], r["round"], r["rmse"]) for r in latest] == [
        ("s1", "local", 2, 28.0), ("s1", "federated", 2, 20.0), ("s2", "local", None, None)]


def test_predictions_latest_and_truth(store: SqliteStore) -> None:
    store.record_predictions("s1", [("e2", 1, 100.0, 110.0), ("e2", 2, 99.0, 108.0), ("e10", 1, 50.0, None)], 1.0)
    store.record_predictions("s1", [("e2", 3, 97.0, None), ("e10", 2, None, 45.0)], 2.0)
    store.record_predictions("s0", [("e1", 5, None, None)], 2.0)  # nothing predicted: no rows
    assert store.counts()["predictions"] == 7
    latest = store.latest_predictions()
    assert [(r["site"], r["engine"], r["cycle"], r["local"], r["federated"], r["true_rul"]) for r in latest] == [
        ("s1", "e2", 3, 97.0, None, None), ("s1", "e10", 2, None, 45.0, None)]

    # e2 failed at cycle 5: its truth at cycle c is 5 - c.
    store.record_truth("s1", "e2", 5, 0.0, 3.0)
    assert store.latest_predictions()[0]["true_rul"] == 2.0
    traj = store.engine_trajectory("s1", "e2")
    none = {"lower": None, "upper": None, "out_of_range": None}  # no conformal interval, no range check sent
    assert traj == [{"cycle": 1, "local": 100.0, "federated": 110.0, "true_rul": 4.0, **none},
                    {"cycle": 2, "local": 99.0, "federated": 108.0, "true_rul": 3.0, **none},
                    {"cycle": 3, "local": 97.0, "federated": None, "true_rul": 2.0, **none}]
    # e10 is a test engine stopped at cycle 2 whose truth (RUL 40 there) is revealed.
    store.record_truth("s1", "e10", 2, 40.0, 4.0)
    assert [p["true_rul"] for p in store.engine_trajectory("s1", "e10")] == [41.0, 40.0]
    # A prediction after the truth cycle has no known truth.
    store.record_predictions("s1", [("e10", 3, 30.0, 31.0)], 5.0)
    assert store.engine_trajectory("s1", "e10")[-1] == {"cycle": 3, "local": 30.0, "federated": 31.0, "true_rul": None, **none}
    # A re-sent prediction replaces the first copy.
    store.record_predictions("s1", [("e10", 3, 33.0, None)], 6.0)
    assert store.engine_trajectory("s1", "e10")[-1]["local"] == 33.0

    engines = store.engines_with_truth()
    assert [(e["site"], e["engine"], e["truth_cycle"], e["truth_rul"], e["failed"]) for e in engines] == [
        ("s1", "e2", 5, 0.0, True), ("s1", "e10", 2, 40.0, False)]
    assert engines[0]["predictions"] == traj
    assert [p["cycle"] for p in engines[1]["predictions"]] == [1, 2, 3]
    assert store.engine_trajectory("s1", "nope") == []


def test_prediction_intervals_are_stored_with_the_federated_rul(store: SqliteStore) -> None:
    store.record_predictions("s1", [("e1", 1, 100.0, 90.0, 70.0, 110.0), ("e1", 2, 99.0, 88.0, None, None),
                                    ("e2", 1, None, 20.0, 12.5, 31.0)], 1.0)
    traj = store.engine_trajectory("s1", "e1")
    assert [(p["federated"], p["lower"], p["upper"]) for p in traj] == [(90.0, 70.0, 110.0), (88.0, None, None)]
    latest = {r["engine"]: r for r in store.latest_predictions()}
    assert (latest["e2"]["lower"], latest["e2"]["upper"]) == (12.5, 31.0) and latest["e1"]["lower"] is None
    store.record_truth("s1", "e2", 1, 0.0, 2.0)
    assert [(p["lower"], p["upper"]) for p in store.engines_with_truth()[0]["predictions"]] == [(12.5, 31.0)]
    store.record_predictions("s1", [("e2", 1, None, 21.0, 13.0, 29.0)], 3.0)  # re-sent: the new interval wins
    assert (store.engine_trajectory("s1", "e2")[0]["lower"], store.engine_trajectory("s1", "e2")[0]["upper"]) == (13.0, 29.0)


def test_events(store: SqliteStore) -> None:
    store.record_event("started", {"strategy": "fedavg"}, 1.0)
    store.record_event("stats computed", {"count": np.int64(3), "mean": np.array([1.0, 2.0])}, 2.0)
    store.record_event("round announced", {"round": 1}, 3.0)
    events = store.events()
    assert [e["kind"] for e in events] == ["round announced", "stats computed", "started"]  # newest first
    assert events[1]["detail"] == {"count": 3, "mean": [1.0, 2.0]}
    assert [e["kind"] for e in store.events(limit=1)] == ["round announced"]


def test_bulk_predictions(store: SqliteStore) -> None:
    rows = [(f"engine-{e}", c, float(300 - c), float(301 - c)) for e in range(100) for c in range(1, 301)]
    store.record_predictions("s1", rows, 1.0)
    assert store.counts()["predictions"] == 60_000
    latest = store.latest_predictions()
    assert len(latest) == 100 and [r["engine"] for r in latest[:3]] == ["engine-0", "engine-1", "engine-2"]
    assert all(r["cycle"] == 300 and r["local"] == 0.0 and r["federated"] == 1.0 for r in latest)
    assert len(store.engine_trajectory("s1", "engine-42")) == 300


def test_reader_while_writer(tmp_path: Path) -> None:
    """WAL: a second connection (the dashboard) reads a consistent snapshot while the
    first is inside a write transaction, and sees the commit afterwards."""
    path = tmp_path / "results.sqlite"
    with SqliteStore(path) as writer, SqliteStore(path) as reader:
        writer.record_truth("s1", "e1", 10, 0.0, 1.0)
        writer._db.execute("BEGIN IMMEDIATE")  # hold the write lock mid-transaction
        writer._db.execute("INSERT INTO truth VALUES ('s1', 'e2', 5, 0.0, 2.0)")
        assert reader.counts()["truth"] == 1  # not blocked, uncommitted row invisible
        writer._db.execute("COMMIT")
        assert reader.counts()["truth"] == 2


def test_threads_share_one_store(store: SqliteStore) -> None:
    """The aggregator writes from paho's network thread and its main thread at once."""
    def write(site: str) -> None:
        for i in range(50):
            store.record_predictions(site, [("e1", i, 1.0, 2.0)], float(i))
            store.record_event("tick", {"site": site}, float(i))

    threads = [threading.Thread(target=write, args=(f"s{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.counts()["predictions"] == 4 * 50 * 2 and store.counts()["events"] == 200


def test_validation_metrics_one_row_per_site_round_and_model(store: SqliteStore) -> None:
    """The learning curve (issue #17): each round's validation report per site, the same
    round sent again replaces it, test metrics stay apart, a fleet reset starts a new curve."""
    for rnd in (1, 2, 3):
        for site in ("s2", "s1"):
            store.record_validation(site, rnd, rnd, {"engines": 4, "local": {"rmse": 30.0 - rnd, "score": None},
                                                     "federated": {"rmse": 20.0 - rnd, "score": None}}, float(rnd))
    store.record_validation("s1", 3, 3, {"engines": 5, "local": {"rmse": 1.0}, "federated": {"rmse": float("nan")}}, 9.0)
    rows = store.validation_metrics()
    assert [(r["round"], r["site"], r["model"]) for r in rows] == [
        (rnd, site, model) for rnd in (1, 2, 3) for site in ("s1", "s2") for model in ("federated", "local")]
    last = {r["model"]: r for r in rows if (r["site"], r["round"]) == ("s1", 3)}
    assert last["local"]["rmse"] == 1.0 and last["federated"]["rmse"] is None and last["local"]["engines"] == 5
    assert store.metrics() == [] and store.latest_metrics() == []
    assert store.counts()["validation_metrics"] == 12
    store.archive_rounds(1)
    assert store.validation_metrics() == []


def test_out_of_range_is_stored_per_model_and_read_as_either(store: SqliteStore) -> None:
    """Each model's flag is its own row's column; the engine reads flagged if any model's input
    was outside its training range, 0 if each that said was inside, None where no site said."""
    store.record_predictions("s1", [("e1", 1, 100.0, 90.0, None, None, ()), ("e1", 2, 99.0, 88.0, 70.0, 110.0, ("federated",)),
                                    ("e2", 1, 50.0, 40.0, None, None, ("local",)), ("e3", 1, 30.0, 20.0)], 1.0)
    assert [(p["cycle"], p["out_of_range"], p["lower"]) for p in store.engine_trajectory("s1", "e1")] == [(1, 0, None), (2, 1, 70.0)]
    latest = {r["engine"]: r["out_of_range"] for r in store.latest_predictions()}
    assert latest == {"e1": 1, "e2": 1, "e3": None}
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT model, out_of_range FROM predictions WHERE engine = 'e2' ORDER BY model").fetchall() == [("federated", 0), ("local", 1)]
    db.close()
    store.record_predictions("s1", [("e1", 2, 99.0, 88.0, 70.0, 110.0, ())], 2.0)  # re-sent: the new flag wins
    assert store.engine_trajectory("s1", "e1")[1]["out_of_range"] == 0
    store.record_truth("s1", "e2", 1, 0.0, 3.0)
    assert [p["out_of_range"] for p in store.engines_with_truth()[0]["predictions"]] == [1]


def test_schema_7_store_gains_the_out_of_range_column(tmp_path: Path) -> None:
    """A store written before the flag opens, upgraded to 8: its old rows read None (not
    known), new rows keep their flag."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_predictions("s1", [("e1", 1, 100.0, 90.0, 80.0, 100.0)], 1.0)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE predictions DROP COLUMN out_of_range; DROP TABLE round_regions; UPDATE schema_version SET version = 7;")
    db.close()
    with open_store(path) as s:
        s.record_predictions("s1", [("e1", 2, 99.0, 89.0, None, None, ("local", "federated"))], 2.0)
        assert [(p["lower"], p["out_of_range"]) for p in s.engine_trajectory("s1", "e1")] == [(80.0, None), (None, 1)]
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(9,)]
    db.close()


def test_schema_6_store_gains_the_validation_table(tmp_path: Path) -> None:
    """Per-round validation metrics have their own table from schema 7."""
    path = tmp_path / "results.sqlite"
    with open_store(path) as s:
        s.record_metrics("s1", 1, 1, {"engines": 2, "local": {"rmse": 3.0}}, 1.0)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE predictions DROP COLUMN out_of_range; DROP TABLE validation_metrics; DROP TABLE round_regions; UPDATE schema_version SET version = 6;")
    db.close()
    with open_store(path) as s:
        s.record_validation("s1", 1, 1, {"engines": 2, "local": {"rmse": 4.0}}, 2.0)
        assert [r["rmse"] for r in s.validation_metrics()] == [4.0] and len(s.metrics()) == 1
