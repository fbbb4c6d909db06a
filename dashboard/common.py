"""Streamlit glue shared by the pages: which store, opening it once, the empty-store help,
auto-refresh and column formats. No number shown on a page is computed here (see `views`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from turbofed.store import ResultsStore, StoreError, open_store

DEFAULT_STORE = ".turbofed/demo/results.sqlite"
ENV_STORE = "TURBOFED_STORE"
STORE_KEY = "store_path"  # a session-state override: how tests point the app at a fixture
AUTO_KEY = "auto_refresh"
EVERY_KEY = "refresh_every_s"
REFRESH_CHOICES = (2, 5, 10, 30, 60)
DEFAULT_REFRESH_S = 5

HOW_TO = """
**Produce data** with the demo: an MQTT broker, the aggregator, four edge agents and a replay
of NASA's C-MAPSS engines, all on this machine.

```bash
turbofed data fetch                # once: download and verify C-MAPSS
turbofed demo                      # writes .turbofed/demo/results.sqlite
turbofed dashboard --store .turbofed/demo/results.sqlite
```

The dashboard can be started before or during the demo: with auto-refresh on (sidebar) the
pages fill in by themselves as sites report.
"""


def store_path_from_args(argv: Sequence[str]) -> str | None:
    """`--store PATH` from the script's arguments (`streamlit run app.py -- --store PATH`)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # "--st..." of another tool is not ours
    parser.add_argument("--store")
    known, _ = parser.parse_known_args(list(argv))
    return known.store


def resolve_store_path() -> str:
    """Session-state override (tests), then --store, then $TURBOFED_STORE, then the demo's store."""
    return str(st.session_state.get(STORE_KEY) or store_path_from_args(sys.argv[1:])
               or os.environ.get(ENV_STORE) or DEFAULT_STORE)


def local_file(path: str) -> Path | None:
    """The file behind a SQLite store name; None for a server store ("influxdb" or a URL)."""
    if path == "influxdb":
        return None
    if path.startswith("sqlite://"):
        return Path(path.removeprefix("sqlite://"))
    if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.IGNORECASE):
        return None
    return Path(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def _cached_store(path: str, identity: tuple[int, int]) -> ResultsStore:
    """One store connection per process (the SQLite store is thread-safe), reopened when
    the file behind it is replaced (identity = device and inode)."""
    return open_store(path)


def connect(path: str) -> tuple[ResultsStore | None, str | None]:
    """The store, or None and why not. A missing file is *not* created: a typo in --store
    must not leave an empty database behind and look like "no data yet"."""
    file = local_file(path)
    identity = (0, 0)
    if file is not None:
        if not file.exists():
            return None, "missing"
        if file.is_dir():
            return None, f"{file} is a folder: give the store file, e.g. {file / 'results.sqlite'}"
        stat = file.stat()
        identity = (stat.st_dev, stat.st_ino)
    try:
        return _cached_store(path, identity), None
    except StoreError as exc:
        return None, str(exc)


def how_to_produce_data(path: str, problem: str) -> None:
    """Tell the user what is wrong and how to get data, instead of a traceback."""
    if problem == "missing":
        st.info(f"No results store at `{path}` yet.", icon=":material/info:")
    elif problem == "empty":
        st.info(f"The results store `{path}` is empty: no site has reported yet.", icon=":material/info:")
    else:
        st.error(f"Cannot read the results store `{path}`: {problem}", icon=":material/error:")
    st.markdown(HOW_TO)


def ready_store() -> tuple[ResultsStore, dict[str, int]] | None:
    """The store and its row counts when it has data; otherwise show how to get some."""
    path = resolve_store_path()
    store, problem = connect(path)
    if store is None:
        how_to_produce_data(path, problem or "missing")
        return None
    try:
        counts = store.counts()
    except StoreError as exc:
        how_to_produce_data(path, str(exc))
        return None
    if not any(counts.values()):
        how_to_produce_data(path, "empty")
        return None
    return store, counts


def note_synthetic(engines: Sequence[str]) -> None:
    """Say so when the engines shown come from the synthetic fleet, not C-MAPSS or a plant."""
    from turbofed.dashboard.views import synthetic_share

    n, total = synthetic_share(engines)
    if n:
        share = "All" if n == total else f"{n} of {total}"
        st.info(f"Synthetic data: {share} engines here come from turbofed's synthetic fleet (engine ids SYN…), "
                "not from NASA's C-MAPSS or a real plant: their RUL figures show the system works, not how well "
                "it predicts real engines.", icon=":material/science:")


def waiting(what: str) -> None:
    """A page whose own data has not arrived yet (the store has other data)."""
    st.info(f"{what} The demo (`turbofed demo`) produces it as it runs; this page refreshes itself.",
            icon=":material/hourglass_empty:")


def live(body: Callable[[], None], key: str) -> None:
    """Run a page body as a fragment that reruns on its own while auto-refresh is on.

    Only the body reruns, so the sidebar's widgets keep their state and the page does
    not flicker; the body re-reads the store each time.
    """
    every = st.session_state.get(EVERY_KEY, DEFAULT_REFRESH_S) if st.session_state.get(AUTO_KEY, True) else None

    def wrapped() -> None:
        try:
            body()
        except StoreError as exc:  # e.g. the InfluxDB server went away mid-page: say so, retry next refresh
            st.error(f"Reading the results store failed: {exc}", icon=":material/error:")
        st.caption(f"Read from the store at {time.strftime('%H:%M:%S')}"
                   + (f" · refreshing every {every} s" if every else " · auto-refresh off"))

    st.fragment(wrapped, run_every=every, key=key)()


def tz() -> str:
    """The browser's time zone (UTC when unknown) for the date columns."""
    try:
        return st.context.timezone or "UTC"
    except Exception:  # outside a browser session (bare mode)
        return "UTC"


def datetime_column(label: str) -> Any:
    return st.column_config.DatetimeColumn(label, format="YYYY-MM-DD HH:mm:ss", timezone=tz())


def number_column(label: str, fmt: str = "%.1f", help: str | None = None) -> Any:
    return st.column_config.NumberColumn(label, format=fmt, help=help)
