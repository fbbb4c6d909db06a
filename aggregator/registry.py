"""The model registry: every global model version, checkpointed so the aggregator resumes.

One folder holds `registry.sqlite` (one row per version: round, SHA-256, file, creation
time, and as JSON the fleet statistics, feature spec, strategy name and parameters) and `models/v00001.onnx` with `models/v00001.npz` (the
strategy's server-side optimiser state) beside it.

Crash consistency: files are written first (temp file, fsync, os.replace, so a file is
either whole or absent) and the row is inserted last, in one transaction. The row is
the commit point: a crash in between leaves a stray file that nothing refers to, and
`latest()` still returns the previous checkpoint; the next save of that version simply
replaces the stray file. Reads verify the SHA-256 recorded in the row, so a corrupted
or swapped file is reported rather than served to the fleet.

A corrupted newest checkpoint is not fatal: `latest()` falls back to the newest intact one
(with a WARNING naming the file and version), and the aggregator re-does the lost version.
Saving over a corrupted row moves its files aside as `*.corrupt` (kept for forensics) and
replaces the row. The registry also remembers the fleet epoch (`epoch()`), so a reset
(`turbofed aggregator --reset`) survives restarts without editing fleet.toml.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sqlite3
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from turbofed.aggregator.diskspace import disk_problem
from turbofed.envelope import json_default
from turbofed.errors import TurbofedError
from turbofed.files import write_atomic

log = logging.getLogger("turbofed.aggregator.registry")

SCHEMA_VERSION = 1  # `meta` (the epoch) was added with CREATE IF NOT EXISTS: older registries gain it on open
REGISTRY_DB = "registry.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY, round INTEGER NOT NULL, sha256 TEXT NOT NULL,
    path TEXT NOT NULL, state_path TEXT NOT NULL, state_sha256 TEXT NOT NULL,
    created REAL NOT NULL, fleet TEXT NOT NULL);
"""


class RegistryError(TurbofedError):
    """A checkpoint is missing, corrupted, or a save would go backwards."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything the aggregator needs to resume: the global model and its context."""

    version: int
    round: int
    model: bytes
    strategy_state: dict[str, np.ndarray]
    fleet: dict[str, Any]
    sha256: str


class ModelRegistry:
    """Model versions in `folder`; safe to share between the aggregator's threads."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.models = self.folder / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db_path = self.folder / REGISTRY_DB
        self.read_only = False
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if disk_problem(exc) is None:
                raise RegistryError(f"cannot open model registry {self.db_path}: {exc}") from None
            # A full or read-only disk: reading is enough to resume; save() tries to reopen.
            log.warning("model registry %s opened read-only: %s", self.db_path, disk_problem(exc))
            self._db = self._connect_read_only()
            self.read_only = True

    def _connect(self) -> sqlite3.Connection:
        """Open read-write, creating the schema. Rollback journal, not WAL: a WAL database
        cannot even be opened for reading on a full disk (it must create its -shm file)."""
        db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            db.row_factory = sqlite3.Row
            try:
                db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.OperationalError:
                pass  # a registry made in WAL mode on a full disk: stays WAL until there is room
            db.execute("PRAGMA synchronous=FULL")  # a checkpoint row survives power loss
            db.execute("BEGIN IMMEDIATE")  # two processes opening a fresh registry: one creates it
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                elif row["version"] > SCHEMA_VERSION:
                    raise RegistryError(f"model registry {self.db_path} has schema {row['version']}; this turbofed "
                                        f"reads up to {SCHEMA_VERSION}: upgrade turbofed")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        """Open for reading only (`immutable`: no lock or journal file is created)."""
        try:
            db = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False,
                                 isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"cannot open model registry {self.db_path} even read-only: {exc}") from None
        return db

    def _writable(self) -> None:
        """Before a write: a registry opened read-only (disk was full) reopens read-write now."""
        if self.read_only:
            db = self._connect()  # raises (disk still full) and leaves the read-only connection in place
            self._db.close()
            self._db, self.read_only = db, False
            log.info("model registry %s is writable again", self.db_path)

    def save(self, version: int, round: int, model: bytes, strategy_state: dict[str, np.ndarray],
             fleet: dict[str, Any]) -> Path:
        """Checkpoint global model `version` (produced by `round`); returns the ONNX path.
        Only an intact checkpoint blocks a version: corrupted rows at or above it are
        quarantined (files renamed *.corrupt) and replaced."""
        with self._lock:
            self._writable()
            for row in self._db.execute("SELECT * FROM checkpoints WHERE version >= ? ORDER BY version", (version,)).fetchall():
                if self._problem(row) is None:
                    raise RegistryError(f"model version {version} is not newer than the latest checkpoint {row['version']}")
            path = self.models / f"v{version:05d}.onnx"
            state_path = path.with_suffix(".npz")
            state = _npz_bytes(strategy_state)
            fleet_json = json.dumps(fleet, default=json_default, sort_keys=True)
            self._quarantine(version)
            write_atomic(path, model, mode=0o600)
            write_atomic(state_path, state, mode=0o600)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM checkpoints WHERE version >= ?", (version,))
                self._db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (version, round, _sha256(model), path.name, state_path.name,
                                  _sha256(state), time.time(), fleet_json))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return path

    def _quarantine(self, version: int) -> None:
        """Rename the files of every (corrupted) row at or above `version` to *.corrupt, kept for forensics."""
        for row in self._db.execute("SELECT path, state_path FROM checkpoints WHERE version >= ?", (version,)).fetchall():
            for name in (row["path"], row["state_path"]):
                source = self.models / name
                if source.exists():
                    source.replace(source.with_name(source.name + ".corrupt"))

    def latest(self) -> Checkpoint | None:
        """The newest intact checkpoint (files verified), or None for a fresh registry. A
        corrupted newer one is skipped with a WARNING; if none is intact, RegistryError."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM checkpoints ORDER BY version DESC").fetchall()
        first_problem = None
        for row in rows:
            try:
                return self._load(row)
            except RegistryError as exc:
                first_problem = first_problem or exc
                log.warning("checkpoint v%d (%s) is unusable: %s; falling back to an older checkpoint",
                            row["version"], self.models / row["path"], exc)
        if first_problem is not None:
            raise RegistryError(f"no intact checkpoint in {self.folder}: {first_problem}")
        return None

    def _load(self, row: sqlite3.Row) -> Checkpoint:
        state_bytes = self._read_verified(row["state_path"], row["state_sha256"])
        try:
            with np.load(io.BytesIO(state_bytes), allow_pickle=False) as npz:
                state = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise RegistryError(f"checkpoint file {self.models / row['state_path']} cannot be read: {exc}") from None
        return Checkpoint(version=row["version"], round=row["round"],
                          model=self._read_verified(row["path"], row["sha256"]), strategy_state=state,
                          fleet=json.loads(row["fleet"]), sha256=row["sha256"])

    def _problem(self, row: sqlite3.Row) -> RegistryError | None:
        """What is wrong with a row's files, or None when both match their SHA-256."""
        try:
            self._read_verified(row["path"], row["sha256"])
            self._read_verified(row["state_path"], row["state_sha256"])
        except RegistryError as exc:
            return exc
        return None

    def epoch(self) -> int | None:
        """The fleet epoch this registry recorded (None: it never recorded one)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return int(row["value"]) if row is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Remember the fleet epoch (written at creation and by a reset)."""
        with self._lock:
            self._writable()
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(int(epoch)),))

    def fleet_of(self, version: int) -> dict[str, Any] | None:
        """The fleet JSON of one checkpoint row (None if there is no such row)."""
        with self._lock:
            row = self._db.execute("SELECT fleet FROM checkpoints WHERE version = ?", (version,)).fetchone()
        return json.loads(row["fleet"]) if row is not None else None

    def get(self, version: int) -> bytes:
        """The ONNX bytes of one model version, verified."""
        with self._lock:
            row = self._db.execute("SELECT path, sha256 FROM checkpoints WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise RegistryError(f"no model version {version} in registry {self.folder}")
        return self._read_verified(row["path"], row["sha256"])

    def versions(self) -> list[dict[str, Any]]:
        """Every checkpoint's metadata, oldest first (paths absolute)."""
        with self._lock:
            rows = self._db.execute("SELECT version, round, sha256, path, created FROM checkpoints "
                                    "ORDER BY version").fetchall()
        return [{**dict(r), "path": str(self.models / r["path"])} for r in rows]

    def _read_verified(self, name: str, sha256: str) -> bytes:
        path = self.models / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"checkpoint file {path} is missing") from None
        actual = _sha256(data)
        if actual != sha256:
            raise RegistryError(f"checkpoint file {path} is corrupted: SHA-256 {actual} does not match "
                                f"the registry's {sha256}")
        return data

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ModelRegistry":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (what np.savez writes) built entry by entry, so any array name works
    (np.savez(**arrays) breaks on a name such as "file")."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)
            zf.writestr(f"{name}.npy", entry.getvalue())
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

