"""The embedded SQLite results store (the default): see `interface.py` for what it holds."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from turbofed.envelope import json_default
from turbofed.store.interface import MODELS, PredictionRow, ResultsStore, StoreError, full_row, out_of_range_flag, round_total
from turbofed.topics import natural_key

SCHEMA_VERSION = 9


# Raw sensor rows a site chose to share (record_sensors), added in schema v2: settings and
# sensors as JSON arrays (null = non-finite); a re-sent row replaces the first copy.
_SENSORS_TABLE = """
CREATE TABLE sensors (
    site TEXT NOT NULL, engine TEXT NOT NULL, cycle INTEGER NOT NULL, settings TEXT NOT NULL,
    sensors TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (site, engine, cycle)) WITHOUT ROWID;
"""
# The strategy's parameters of each round (a JSON object), added in schema v3.
_ROUND_PARAMS = "ALTER TABLE rounds ADD COLUMN strategy_params TEXT NOT NULL DEFAULT '{}';"
# What the strategy did with each site's update (norm, cosine to the aggregate, action), added in v4.
_PARTICIPANT_REPORT = ("ALTER TABLE round_participants ADD COLUMN norm REAL; "
                       "ALTER TABLE round_participants ADD COLUMN cosine REAL; "
                       "ALTER TABLE round_participants ADD COLUMN action TEXT;")
# Rounds of earlier fleet epochs (archive_rounds, at a fleet reset), added in v5: each round
# with its participants as the JSON object rounds() returns.
_ARCHIVED_ROUNDS = """
CREATE TABLE archived_rounds (
    epoch INTEGER NOT NULL, round INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (epoch, round));
"""
# The federated prediction's conformal interval (turbofed/conformal.py), added in v6: lower
# and upper RUL on the federated row, NULL without an interval (and on the local row).
_PREDICTION_INTERVALS = "ALTER TABLE predictions ADD COLUMN lower REAL; ALTER TABLE predictions ADD COLUMN upper REAL;"
# Each site's RMSE of its local and the federated model on its validation engines, per round
# (record_validation: the learning curve, issue #17), added in v7.
_VALIDATION_TABLE = """
CREATE TABLE validation_metrics (
    site TEXT NOT NULL, round INTEGER NOT NULL, model TEXT NOT NULL, model_version INTEGER,
    engines INTEGER, rmse REAL, at REAL NOT NULL,
    PRIMARY KEY (site, round, model)) WITHOUT ROWID;
"""
# Whether each prediction's input lay outside its model's training range (1/0; NULL when the
# site did not say: agents before it, and rows stored before v8), added in v8.
_PREDICTION_OUT_OF_RANGE = "ALTER TABLE predictions ADD COLUMN out_of_range INTEGER;"
# The totals of each region that sent a summary partial (two-level fleets: its sites' rows
# carry no weight), added in v9.
_ROUND_REGIONS = """
CREATE TABLE round_regions (
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE, region TEXT NOT NULL,
    sites INTEGER NOT NULL, samples INTEGER NOT NULL, update_bytes INTEGER NOT NULL,
    PRIMARY KEY (round, region));
"""
_SCHEMA = """
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, started REAL NOT NULL,
    closed REAL NOT NULL, aggregate_ms REAL NOT NULL, strategy TEXT NOT NULL,
    closed_by TEXT NOT NULL, strategy_params TEXT NOT NULL DEFAULT '{}');
CREATE TABLE round_participants (
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE, site TEXT NOT NULL,
    samples INTEGER NOT NULL, update_bytes INTEGER NOT NULL, norm REAL, cosine REAL, action TEXT,
    PRIMARY KEY (round, site));
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY, round INTEGER, site TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX rejections_round ON rejections (round);
CREATE TABLE site_status (
    site TEXT PRIMARY KEY, online INTEGER NOT NULL, at REAL NOT NULL, last_seen REAL,
    agent_version TEXT, model_version INTEGER, samples INTEGER);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY, site TEXT NOT NULL, round INTEGER, model_version INTEGER,
    model TEXT NOT NULL, engines INTEGER, rmse REAL, score REAL, at REAL NOT NULL);
CREATE INDEX metrics_site_model ON metrics (site, model, at);
CREATE TABLE predictions (
    site TEXT NOT NULL, engine TEXT NOT NULL, cycle INTEGER NOT NULL, model TEXT NOT NULL,
    rul REAL NOT NULL, at REAL NOT NULL, lower REAL, upper REAL, out_of_range INTEGER,
    PRIMARY KEY (site, engine, cycle, model)) WITHOUT ROWID;
CREATE TABLE truth (
    site TEXT NOT NULL, engine TEXT NOT NULL, cycle INTEGER NOT NULL, rul REAL NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (site, engine));
CREATE TABLE events (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
""" + _SENSORS_TABLE + _ARCHIVED_ROUNDS + _VALIDATION_TABLE + _ROUND_REGIONS
# Schema changes: _MIGRATIONS[v] is the SQL that upgrades a version-v store to v + 1.
_MIGRATIONS: dict[int, str] = {1: _SENSORS_TABLE, 2: _ROUND_PARAMS, 3: _PARTICIPANT_REPORT, 4: _ARCHIVED_ROUNDS,
                               5: _PREDICTION_INTERVALS, 6: _VALIDATION_TABLE, 7: _PREDICTION_OUT_OF_RANGE,
                               8: _ROUND_REGIONS}
_TABLES = ("rounds", "round_participants", "rejections", "site_status", "metrics",
           "predictions", "truth", "events", "sensors", "validation_metrics")  # what counts() reports (not archived_rounds)

# Pivot the two models of one cycle into one row, with the truth at that cycle.
_TRAJECTORY = """
SELECT p.site, p.engine, p.cycle,
       MAX(CASE WHEN p.model = 'local' THEN p.rul END) AS local,
       MAX(CASE WHEN p.model = 'federated' THEN p.rul END) AS federated,
       MAX(CASE WHEN p.model = 'federated' THEN p.lower END) AS lower,
       MAX(CASE WHEN p.model = 'federated' THEN p.upper END) AS upper,
       MAX(p.out_of_range) AS out_of_range,
       CASE WHEN p.cycle <= t.cycle THEN t.rul + (t.cycle - p.cycle) END AS true_rul
FROM predictions p {join} truth t ON t.site = p.site AND t.engine = p.engine
"""


class SqliteStore(ResultsStore):
    """SQLite in WAL mode: the dashboard (another process) reads while the aggregator writes.

    One connection shared by the aggregator's threads (paho's network thread and its main
    thread) behind a lock; every write is one transaction.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"results store {self.path} is a folder: give a file, e.g. {self.path / 'results.sqlite'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so transactions are explicit.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open results store {self.path}: {exc}") from None

    def _migrate(self) -> None:
        """Create the schema, or bring an older store up to SCHEMA_VERSION."""
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                # Statement by statement: executescript() would COMMIT our transaction first.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                return
            version = row["version"]
            if version > SCHEMA_VERSION:
                raise StoreError(f"results store {self.path} has schema {version}; this turbofed reads "
                                 f"up to {SCHEMA_VERSION}: upgrade turbofed")
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v].split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock. Writes take the write lock up front (IMMEDIATE)
        so two writers wait on busy_timeout instead of deadlocking; reads get a snapshot."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._tx(write=False) as db:
            return [dict(r) for r in db.execute(sql, tuple(args))]

    def _touch(self, db: sqlite3.Connection, site: str, at: float) -> None:
        """A site that sends metrics or predictions is alive: move its last_seen forward."""
        db.execute("UPDATE site_status SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE site = ?", (at, site))

    # --- write side ---
    def record_round(self, round: int, model_version: int, started: float, closed: float,
                     participants: list[dict[str, Any]], aggregate_ms: float, strategy: str,
                     closed_by: str, strategy_params: dict[str, Any] | None = None,
                     regions: dict[str, dict[str, Any]] | None = None) -> None:
        # Re-recording a round (an aggregator that resumed mid-round) replaces it.
        params = json.dumps(strategy_params or {}, default=json_default, sort_keys=True)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO rounds (round, model_version, started, closed, aggregate_ms, strategy, "
                       "closed_by, strategy_params) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (round, model_version, started, closed, aggregate_ms, strategy, closed_by, params))
            db.execute("DELETE FROM round_participants WHERE round = ?", (round,))
            db.executemany("INSERT INTO round_participants (round, site, samples, update_bytes, norm, cosine, action) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(round, p["site"], int(p["samples"]), int(p["update_bytes"]), _finite(p.get("norm")),
                             _finite(p.get("cosine")), p.get("action")) for p in participants])
            db.execute("DELETE FROM round_regions WHERE round = ?", (round,))
            db.executemany("INSERT INTO round_regions (round, region, sites, samples, update_bytes) VALUES (?, ?, ?, ?, ?)",
                           [(round, name, int(t["sites"]), int(t["samples"]), int(t["update_bytes"]))
                            for name, t in (regions or {}).items()])

    def record_rejection(self, round: int | None, site: str, reason: str, detail: str, at: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO rejections (round, site, reason, detail, at) VALUES (?, ?, ?, ?, ?)",
                       (round, site, reason, detail, at))

    def record_status(self, site: str, online: bool, at: float, agent_version: str | None,
                      model_version: int | None, samples: int | None) -> None:
        # Older messages (a QoS 1 redelivery) never overwrite newer ones; a status without
        # versions (a bare last will) keeps the versions last reported; last_seen moves
        # only when the site itself spoke (online).
        with self._tx() as db:
            db.execute(
                """INSERT INTO site_status VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (site) DO UPDATE SET
                     online = excluded.online, at = excluded.at,
                     last_seen = COALESCE(MAX(site_status.last_seen, excluded.last_seen),
                                         site_status.last_seen, excluded.last_seen),
                     agent_version = COALESCE(excluded.agent_version, site_status.agent_version),
                     model_version = COALESCE(excluded.model_version, site_status.model_version),
                     samples = COALESCE(excluded.samples, site_status.samples)
                   WHERE excluded.at >= site_status.at""",
                (site, int(bool(online)), at, at if online else None, agent_version, model_version, samples))

    def record_metrics(self, site: str, round: int | None, model_version: int | None,
                       metrics: dict[str, Any], at: float) -> None:
        engines = metrics.get("engines")
        rows = [(site, round, model_version, model, engines,
                 _finite(metrics[model].get("rmse")), _finite(metrics[model].get("score")), at)
                for model in MODELS if isinstance(metrics.get(model), dict)]
        with self._tx() as db:
            db.executemany("INSERT INTO metrics (site, round, model_version, model, engines, rmse, score, at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._touch(db, site, at)

    def record_validation(self, site: str, round: int, model_version: int | None, metrics: dict[str, Any], at: float) -> None:
        rows = [(site, int(round), model, model_version, metrics.get("engines"), _finite(metrics[model].get("rmse")), at)
                for model in MODELS if isinstance(metrics.get(model), dict)]
        with self._tx() as db:  # a round's report sent again (the outbox after a restart) replaces the first
            db.executemany("INSERT OR REPLACE INTO validation_metrics (site, round, model, model_version, engines, rmse, at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self._touch(db, site, at)

    def record_predictions(self, site: str, rows: Sequence[PredictionRow], at: float) -> None:
        # A prediction re-sent (the agent's outbox after a reconnect) replaces the first copy.
        flat = [(site, str(engine), int(cycle), model, value, at, *((lower, upper) if model == "federated" else (None, None)),
                 out_of_range_flag(outside, model))
                for engine, cycle, local, federated, lower, upper, outside in map(full_row, rows)
                for model, value in (("local", _finite(local)), ("federated", _finite(federated)))
                if value is not None]
        with self._tx() as db:
            db.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                           "SET rul = excluded.rul, at = excluded.at, lower = excluded.lower, upper = excluded.upper, "
                           "out_of_range = excluded.out_of_range", flat)
            self._touch(db, site, at)

    def record_sensors(self, site: str, rows: list[tuple[str, int, list[float], list[float]]], at: float) -> None:
        # A row re-sent (outbox after a reconnect) replaces the first copy, as predictions do.
        flat = [(site, str(engine), int(cycle), json.dumps([_finite(v) for v in settings]),
                 json.dumps([_finite(v) for v in sensors]), at) for engine, cycle, settings, sensors in rows]
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO sensors VALUES (?, ?, ?, ?, ?, ?)", flat)
            self._touch(db, site, at)

    def record_truth(self, site: str, engine: str, cycle: int, rul: float, at: float) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO truth VALUES (?, ?, ?, ?, ?)",
                       (site, str(engine), int(cycle), float(rul), at))

    def record_event(self, kind: str, detail: dict[str, Any], at: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO events (kind, detail, at) VALUES (?, ?, ?)",
                       (kind, json.dumps(detail, default=json_default), at))

    # --- read side ---
    def rounds(self) -> list[dict[str, Any]]:
        """Rounds in order, each with its participants (by site), the totals of regions that
        sent summary partials, and total samples (both)."""
        with self._tx(write=False) as db:
            rounds = [dict(r) for r in db.execute("SELECT * FROM rounds ORDER BY round")]
            parts: dict[int, list[dict[str, Any]]] = {}
            for r in db.execute("SELECT * FROM round_participants"):
                part = {k: r[k] for k in ("site", "samples", "update_bytes")}
                if r["action"] is not None:  # what the strategy did with it, where the aggregator reported it
                    part.update(norm=r["norm"], cosine=r["cosine"], action=r["action"])
                parts.setdefault(r["round"], []).append(part)
            regions: dict[int, list[dict[str, Any]]] = {}
            for r in db.execute("SELECT * FROM round_regions"):
                regions.setdefault(r["round"], []).append({k: r[k] for k in ("region", "sites", "samples", "update_bytes")})
        for r in rounds:
            r["strategy_params"] = json.loads(r["strategy_params"])
            r["participants"] = sorted(parts.get(r["round"], []), key=lambda p: natural_key(p["site"]))
            r["regions"] = sorted(regions.get(r["round"], []), key=lambda g: natural_key(g["region"]))
            r["samples"] = round_total(r, "samples")
        return rounds

    def archive_rounds(self, epoch: int) -> int:
        """Move every current round (and its participants) to archived_rounds under `epoch`, in one transaction."""
        current = self.rounds()
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO archived_rounds (epoch, round, record) VALUES (?, ?, ?)",
                           [(int(epoch), r["round"], json.dumps(r, default=json_default)) for r in current])
            db.execute("DELETE FROM round_participants")
            db.execute("DELETE FROM round_regions")
            db.execute("DELETE FROM rounds")
            db.execute("DELETE FROM validation_metrics")  # the new epoch's rounds start a new learning curve
        return len(current)

    def archived_rounds(self, epoch: int) -> list[dict[str, Any]]:
        """The rounds `archive_rounds(epoch)` kept, in order."""
        with self._tx(write=False) as db:
            rows = db.execute("SELECT record FROM archived_rounds WHERE epoch = ? ORDER BY round", (int(epoch),)).fetchall()
        return [json.loads(r["record"]) for r in rows]

    def rejections(self, round: int | None = None) -> list[dict[str, Any]]:
        """Rejections in the order they happened (optionally of one round)."""
        if round is None:
            return self._rows("SELECT * FROM rejections ORDER BY at, id")
        return self._rows("SELECT * FROM rejections WHERE round = ? ORDER BY at, id", (round,))

    def site_status(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM site_status")
        for r in rows:
            r["online"] = bool(r["online"])
        return sorted(rows, key=lambda r: natural_key(r["site"]))

    def metrics(self, site: str | None = None) -> list[dict[str, Any]]:
        """Every metrics row (one per site, report and model), oldest first."""
        where, args = ("WHERE site = ?", (site,)) if site is not None else ("", ())
        return self._rows(f"SELECT * FROM metrics {where} ORDER BY at, id", args)

    def validation_metrics(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM validation_metrics ORDER BY round, site, model")

    def latest_metrics(self) -> list[dict[str, Any]]:
        """The newest metrics row per (site, model)."""
        rows = self._rows("""SELECT * FROM metrics WHERE id IN (
                               SELECT id FROM (SELECT id, ROW_NUMBER() OVER (
                                 PARTITION BY site, model ORDER BY at DESC, id DESC) AS n FROM metrics)
                               WHERE n = 1)""")
        return sorted(rows, key=lambda r: (natural_key(r["site"]), MODELS.index(r["model"])))

    def latest_predictions(self) -> list[dict[str, Any]]:
        """Per (site, engine): the latest predicted cycle, both models' RUL there, and the
        true RUL at that cycle where known."""
        rows = self._rows(
            _TRAJECTORY.format(join="LEFT JOIN")
            + """JOIN (SELECT site, engine, MAX(cycle) AS cycle FROM predictions GROUP BY site, engine) last
                   ON last.site = p.site AND last.engine = p.engine AND last.cycle = p.cycle
                 GROUP BY p.site, p.engine, p.cycle""")
        return sorted(rows, key=lambda r: (natural_key(r["site"]), natural_key(r["engine"])))

    def engine_trajectory(self, site: str, engine: str) -> list[dict[str, Any]]:
        """Per cycle of one engine: local, federated and (where known) true RUL."""
        rows = self._rows(_TRAJECTORY.format(join="LEFT JOIN")
                          + "WHERE p.site = ? AND p.engine = ? GROUP BY p.cycle ORDER BY p.cycle",
                          (site, str(engine)))
        return [{k: r[k] for k in ("cycle", "local", "federated", "lower", "upper", "out_of_range", "true_rul")} for r in rows]

    def engines_with_truth(self) -> list[dict[str, Any]]:
        """Per engine whose truth is known: truth cycle and RUL (failed: RUL 0 there) and its
        predictions at every cycle (the input of maintenance-policy economics)."""
        with self._tx(write=False) as db:
            engines = {(t["site"], t["engine"]): {"site": t["site"], "engine": t["engine"], "truth_cycle": t["cycle"],
                                                  "truth_rul": t["rul"], "failed": t["rul"] == 0, "predictions": []}
                       for t in db.execute("SELECT * FROM truth")}
            for r in db.execute(_TRAJECTORY.format(join="JOIN")
                                + "GROUP BY p.site, p.engine, p.cycle ORDER BY p.site, p.engine, p.cycle"):
                engines[(r["site"], r["engine"])]["predictions"].append(
                    {k: r[k] for k in ("cycle", "local", "federated", "lower", "upper", "out_of_range", "true_rul")})
        return sorted(engines.values(), key=lambda e: (natural_key(e["site"]), natural_key(e["engine"])))

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` events, newest first, detail decoded."""
        rows = self._rows("SELECT * FROM events ORDER BY at DESC, id DESC LIMIT ?", (int(limit),))
        for r in rows:
            r["detail"] = json.loads(r["detail"])
        return rows

    def counts(self) -> dict[str, int]:
        with self._tx(write=False) as db:
            return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in _TABLES}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SqliteStore":
        return self


def _finite(value: float | None) -> float | None:
    """None for a missing or non-finite number (SQLite would turn NaN into NULL anyway)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
