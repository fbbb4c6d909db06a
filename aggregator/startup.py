"""Opening the model registry at start: refuse a registry that lost its history, archive
it on `--reset`, and settle the fleet epoch (docs/operations.md).

Why refuse: a missing, empty or unreadable registry.sqlite next to a results store that
holds rounds means the checkpoints (and the fleet statistics in them) are gone; starting
over silently at v0 would publish a model older than the one every site holds, which
sites refuse (no rollback). The operator decides: `turbofed aggregator --reset` moves
the old registry into an archive folder (kept, never deleted) and starts a new fleet
epoch, which signed announcements carry so the sites follow (docs/protocol.md).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from turbofed.aggregator.diskspace import disk_problem
from turbofed.aggregator.registry import REGISTRY_DB, Checkpoint, ModelRegistry, RegistryError
from turbofed.config import FleetConfig
from turbofed.store import ResultsStore

log = logging.getLogger("turbofed.aggregator")

ARCHIVE_PREFIX = "epoch-"
_EVENTS_SCANNED = 100_000


class RegistryRefused(RegistryError):
    """The registry cannot be used as it is; the message tells the operator about --reset."""


def open_registry(config: FleetConfig, store: ResultsStore, config_path: str, reset: bool
                  ) -> tuple[ModelRegistry, int, Checkpoint | None]:
    """The registry to run with, the effective fleet epoch (the registry's, config epoch as a
    floor) and the checkpoint to resume from (None: a fresh fleet)."""
    folder, config_epoch = Path(config.registry), config.epoch
    if reset:
        return (*_reset(folder, store, config_epoch, keep=Path(config.store).name), None)
    hint = f"start with `turbofed aggregator --config {config_path} --reset` to archive it and begin a new fleet epoch"
    db = folder / REGISTRY_DB
    blank = not db.exists() or db.stat().st_size == 0
    if blank:
        rounds = [r["round"] for r in store.rounds()]
        if rounds:
            what = "missing" if not db.exists() else "empty (0 bytes)"
            raise RegistryRefused(f"model registry {db} is {what} but the results store holds rounds up to "
                                  f"{max(rounds)}: the checkpoints are lost; {hint}")
    try:
        registry = ModelRegistry(folder)
    except RegistryError as exc:
        raise RegistryRefused(f"{exc}; {hint}") from None
    try:
        checkpoint = registry.latest()  # every checkpoint corrupt: refuse now, one line, not a traceback later
    except RegistryError as exc:
        registry.close()
        raise RegistryRefused(f"{exc}; {hint}") from None
    recorded = registry.epoch()
    epoch = max(config_epoch, recorded or 0)
    if recorded != epoch and not registry.read_only:
        try:
            registry.set_epoch(epoch)
        except sqlite3.DatabaseError as exc:  # a full disk: the epoch is in force all the same; a later start records it
            if disk_problem(exc) is None:
                raise
            log.warning("model registry %s: cannot record epoch %d now: %s", registry.db_path, epoch, disk_problem(exc))
    return registry, epoch, checkpoint


def _reset(folder: Path, store: ResultsStore, config_epoch: int, keep: str) -> tuple[ModelRegistry, int]:
    """Archive the registry folder's content (but the results store, if it lives there:
    names starting with `keep`), start the next epoch, record it."""
    old = max(_recorded_epoch(folder / REGISTRY_DB), _store_epoch(store), config_epoch)
    new = old + 1
    archive = _archive(folder, old, keep)
    rounds = [r["round"] for r in store.rounds()]
    store.archive_rounds(old)  # the new epoch's round n must not replace the old round n
    registry = ModelRegistry(folder)
    registry.set_epoch(new)
    detail = {"old_epoch": old, "epoch": new, "rounds_before": len(rounds),
              "last_round": max(rounds) if rounds else None, "archive": str(archive) if archive else None}
    store.record_event("fleet_reset", detail, time.time())
    log.warning("fleet reset: epoch %d -> %d; the old registry is kept in %s; starting again from fleet statistics",
                old, new, archive or "(nothing to archive)")
    return registry, new


def _archive(folder: Path, epoch: int, keep: str) -> Path | None:
    """Move everything in `folder` but earlier archives (and `keep*`) into `folder/epoch-<epoch>[-n]`."""
    if not folder.is_dir():
        return None
    content = [p for p in folder.iterdir() if not p.name.startswith((ARCHIVE_PREFIX, keep))]
    if not content:
        return None
    archive, n = folder / f"{ARCHIVE_PREFIX}{epoch}", 1
    while archive.exists():
        archive, n = folder / f"{ARCHIVE_PREFIX}{epoch}-{n}", n + 1
    archive.mkdir()
    for path in content:
        path.rename(archive / path.name)
    return archive


def _recorded_epoch(db: Path) -> int:
    """The epoch an old registry recorded, if it can still be read (0 otherwise)."""
    if not db.is_file() or db.stat().st_size == 0:
        return 0
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        finally:
            con.close()
        return int(row[0]) if row else 0
    except (sqlite3.DatabaseError, ValueError):
        return 0


def _store_epoch(store: ResultsStore) -> int:
    """The highest epoch the results store's events name (fleet resets, starts)."""
    epochs = [e["detail"].get("epoch") for e in store.events(_EVENTS_SCANNED) if isinstance(e.get("detail"), dict)]
    return max([e for e in epochs if isinstance(e, int) and not isinstance(e, bool)], default=0)
