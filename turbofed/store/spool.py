"""A bounded on-disk queue for line protocol that InfluxDB could not take yet.

Why on disk: an outage of the time-series database must not cost the fleet its round
results, and must not grow the aggregator's memory without bound. Two lanes:

- ``protected``: round results, participants, metrics, status, truth, rejections, events.
  Never dropped (they are small: a few points per round or report).
- ``telemetry``: sensor rows and predictions. When the spool reaches its bound, the oldest
  telemetry segment is deleted and its points counted as dropped.

Each lane is a series of append-only segment files of whole lines. The drainer reads the
oldest segment from its committed offset, writes it, then commits. A chunk written but
not committed when the process dies is sent again after a restart; that is harmless,
because a point with the same series and timestamp replaces itself in InfluxDB.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from turbofed.errors import TurbofedError

log = logging.getLogger("turbofed.spool")

PROTECTED = "protected"
TELEMETRY = "telemetry"
LANES = (PROTECTED, TELEMETRY)  # drain order: round results before telemetry
_NAME = re.compile(r"^(protected|telemetry)-(\d{12})\.lp$")


class SpoolError(TurbofedError):
    """The spool folder is unusable (in use by another process, not writable)."""


@dataclass
class _Segment:
    lane: str
    seq: int
    path: Path
    size: int  # bytes in the file
    offset: int  # bytes already delivered (committed)
    points: int  # lines after offset
    fd: int | None = None  # open for appending while this is the lane's active segment


@dataclass(frozen=True)
class Chunk:
    """Whole lines read from one segment, to be committed once the server has them."""

    lane: str
    seq: int
    start: int
    end: int
    data: bytes
    points: int


class Spool:
    """Bounded FIFO of line-protocol lines in two lanes; thread-safe; one process per folder."""

    def __init__(self, folder: str | Path, max_bytes: int = 512 * 2**20, segment_bytes: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes or min(max(self.max_bytes // 16, 64 * 2**10), 16 * 2**20))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot use spool folder {self.folder}: {exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(f"spool folder {self.folder} is in use by another process: give each writer its own") from None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._segments: dict[str, deque[_Segment]] = {lane: deque() for lane in LANES}
        self._next_seq = 1
        self._bytes = 0
        self._warned_full = False
        self.dropped_points = 0
        self.dropped_bytes = 0
        self._closed = False
        self._load()

    # --- start-up ---------------------------------------------------------------------

    def _load(self) -> None:
        """Pick up segments a previous run left, cutting a torn last line (crash mid-append)."""
        found = sorted((int(m.group(2)), m.group(1), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name)))
        for seq, lane, path in found:
            data = path.read_bytes()
            offset = _read_offset(path)
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("spool %s: dropping a torn last line (%d bytes)", path.name, len(data) - end)
                os.truncate(path, end)
                data = data[:end]
            offset = min(offset, end)
            if offset >= end:
                _remove(path)
                continue
            seg = _Segment(lane, seq, path, end, offset, data.count(b"\n", offset))
            self._segments[lane].append(seg)
            self._bytes += end - offset
            self._next_seq = max(self._next_seq, seq + 1)
        if self._bytes:
            log.info("spool %s: %d points (%d bytes) left by a previous run", self.folder, self.pending_points(), self._bytes)

    # --- writing ----------------------------------------------------------------------

    def append(self, lane: str, data: bytes, points: int) -> int:
        """Append whole lines (``data`` ends with a newline); returns telemetry points dropped
        to stay within the bound (0 almost always)."""
        if lane not in LANES:
            raise ValueError(f"unknown spool lane {lane!r}")
        if not data:
            return 0
        if not data.endswith(b"\n"):
            data += b"\n"
        with self._lock:
            if self._closed:
                raise SpoolError(f"spool {self.folder} is closed")
            seg = self._active(lane)
            _write_all(seg.fd, data)
            seg.size += len(data)
            seg.points += points
            self._bytes += len(data)
            if seg.size >= self.segment_bytes:
                self._seal(seg)
            dropped = self._enforce_bound()
            self._changed.notify_all()
            return dropped

    def _active(self, lane: str) -> _Segment:
        queue = self._segments[lane]
        if queue and queue[-1].fd is not None:
            return queue[-1]
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        path = self.folder / f"{lane}-{seq:012d}.lp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        seg = _Segment(lane, seq, path, 0, 0, 0, fd)
        queue.append(seg)
        return seg

    @staticmethod
    def _seal(seg: _Segment) -> None:
        """Stop appending to a segment: from now on it is only read (and deleted)."""
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None

    def _enforce_bound(self) -> int:
        """Drop the oldest telemetry segments until the spool fits; never protected ones."""
        dropped = 0
        telemetry = self._segments[TELEMETRY]
        while self._bytes > self.max_bytes and telemetry:
            seg = telemetry.popleft()
            self._seal(seg)
            self._bytes -= seg.size - seg.offset
            self.dropped_points += seg.points
            self.dropped_bytes += seg.size - seg.offset
            dropped += seg.points
            _remove(seg.path)
        if self._bytes > self.max_bytes and not self._warned_full:
            self._warned_full = True
            log.warning("spool %s holds %d bytes of round results and events, over its bound of %d: "
                        "keeping them (they are never dropped)", self.folder, self._bytes, self.max_bytes)
        if dropped:
            log.warning("spool %s full: dropped the oldest %d telemetry points", self.folder, dropped)
        return dropped

    # --- draining ---------------------------------------------------------------------

    def peek(self, max_bytes: int = 1 << 20) -> Chunk | None:
        """The oldest undelivered lines (protected lane first), or None when empty."""
        while True:
            with self._lock:
                seg = self._oldest()
                if seg is None:
                    return None
                self._seal(seg)  # the drainer reads only sealed files: no read/append race
                lane, seq, path, start, size = seg.lane, seg.seq, seg.path, seg.offset, seg.size
            try:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(min(max_bytes, size - start))
                    if not data.endswith(b"\n"):
                        cut = data.rfind(b"\n") + 1
                        if cut:
                            data = data[:cut]
                        else:  # one line longer than max_bytes: read to its end
                            data += handle.readline(size - start - len(data))
            except FileNotFoundError:
                continue  # dropped for space meanwhile: take the next oldest
            return Chunk(lane, seq, start, start + len(data), data, data.count(b"\n"))

    def _oldest(self) -> _Segment | None:
        for lane in LANES:
            queue = self._segments[lane]
            while queue:
                seg = queue[0]
                if seg.offset < seg.size:
                    return seg
                if seg.fd is not None:  # the active segment, fully delivered: nothing more yet
                    break
                queue.popleft()
                _remove(seg.path)
        return None

    def commit(self, chunk: Chunk) -> None:
        """The server has `chunk`: advance past it (delete the segment once fully delivered)."""
        with self._lock:
            seg = next((s for s in self._segments[chunk.lane] if s.seq == chunk.seq), None)
            if seg is None or seg.offset != chunk.start:
                return  # dropped for space while it was in flight, or already committed
            seg.offset = chunk.end
            seg.points -= chunk.points
            self._bytes -= chunk.end - chunk.start
            if seg.offset >= seg.size and seg.fd is None:
                self._segments[chunk.lane].remove(seg)
                _remove(seg.path)
            else:
                _write_offset(seg.path, seg.offset)
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Sleep until something is appended or committed (or `timeout` seconds)."""
        with self._lock:
            self._changed.wait(timeout)

    # --- state ------------------------------------------------------------------------

    def pending_points(self) -> int:
        with self._lock:
            return sum(s.points for q in self._segments.values() for s in q)

    def pending_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for queue in self._segments.values():
                for seg in queue:
                    self._seal(seg)
            self._changed.notify_all()
        os.close(self._lock_fd)  # releases the flock


def _write_all(fd: int | None, data: bytes) -> None:
    assert fd is not None
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _offset_path(path: Path) -> Path:
    return path.with_suffix(".offset")


def _read_offset(path: Path) -> int:
    try:
        return int(_offset_path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_offset(path: Path, offset: int) -> None:
    """Atomically: a crash leaves the old offset (a re-send), never a torn number."""
    tmp = _offset_path(path).with_suffix(".offset.tmp")
    tmp.write_text(str(offset))
    os.replace(tmp, _offset_path(path))


def _remove(path: Path) -> None:
    for p in (path, _offset_path(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
