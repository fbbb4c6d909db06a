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
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from turbofed.envelope import json_default
from turbofed.errors import TurbofedError
from turbofed.files import write_atomic

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
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
        db_path = self.folder / "registry.sqlite"
        try:
            self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a checkpoint row survives power loss
            self._db.execute("BEGIN IMMEDIATE")  # two processes opening a fresh registry: one creates it
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                row = self._db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                elif row["version"] > SCHEMA_VERSION:
                    raise RegistryError(f"model registry {db_path} has schema {row['version']}; this turbofed "
                                        f"reads up to {SCHEMA_VERSION}: upgrade turbofed")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"cannot open model registry {db_path}: {exc}") from None

    def save(self, version: int, round: int, model: bytes, strategy_state: dict[str, np.ndarray],
             fleet: dict[str, Any]) -> Path:
        """Checkpoint global model `version` (produced by `round`); returns the ONNX path."""
        with self._lock:
            latest = self._db.execute("SELECT MAX(version) FROM checkpoints").fetchone()[0]
            if latest is not None and version <= latest:
                raise RegistryError(f"model version {version} is not newer than the latest checkpoint {latest}")
            path = self.models / f"v{version:05d}.onnx"
            state_path = path.with_suffix(".npz")
            state = _npz_bytes(strategy_state)
            write_atomic(path, model, mode=0o600)
            write_atomic(state_path, state, mode=0o600)
            fleet_json = json.dumps(fleet, default=json_default, sort_keys=True)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (version, round, _sha256(model), path.name, state_path.name,
                                  _sha256(state), time.time(), fleet_json))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return path

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, files verified, or None for a fresh registry."""
        with self._lock:
            row = self._db.execute("SELECT * FROM checkpoints ORDER BY version DESC LIMIT 1").fetchone()
        if row is None:
            return None
        state_bytes = self._read_verified(row["state_path"], row["state_sha256"])
        with np.load(io.BytesIO(state_bytes), allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
        return Checkpoint(version=row["version"], round=row["round"],
                          model=self._read_verified(row["path"], row["sha256"]), strategy_state=state,
                          fleet=json.loads(row["fleet"]), sha256=row["sha256"])

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

