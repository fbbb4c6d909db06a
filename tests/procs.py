"""Processes seen through /proc (Linux): a process tree, and whether a process is still the
same one and alive (a pid can be reused; a zombie is dead)."""

from __future__ import annotations

import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> dict[tuple[int, int], str]:
    """Every process below `root`: (pid, start time) -> command line."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found: dict[tuple[int, int], str] = {}
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        found[(pid, starts[pid])] = cmdline(pid)
        todo += parents.get(pid, [])
    return found


def alive(key: tuple[int, int]) -> bool:
    """True while the process (pid, start time) exists and is not a zombie."""
    stat = _stat(key[0])
    return stat is not None and stat[2] == key[1] and stat[1] not in ("Z", "X")


def wait_all_dead(keys: list[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    """Wait up to `timeout` seconds for every process to be gone; those still alive."""
    deadline = time.monotonic() + timeout
    while (left := [k for k in keys if alive(k)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
