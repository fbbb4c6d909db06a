"""The results store: one interface (`interface.py`), two backends.

- `sqlite.py`: the embedded default, zero set-up.
- `influx_write.py` (+ `spool.py`, its disk buffer) and `influx_read.py`: InfluxDB, for real
  fleets; influxdb-client is imported only when an InfluxDB store is opened.

Writers (the aggregator) and readers (the dashboard, the demo) import from here only:
`open_store`, `ResultsStore`, `StoreError`, `MODELS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from turbofed.store.interface import MODELS, ResultsStore, StoreError

__all__ = ["MODELS", "ResultsStore", "StoreError", "open_store"]


def open_store(path_or_url: str | Path, *, spool_dir: str | Path | None = None,
               influx: Mapping[str, Any] | None = None) -> ResultsStore:
    """Open the store named in configuration:

    - a file path (or sqlite:///path) -> SQLite;
    - "influxdb" -> InfluxDB, settings from TURBOFED_INFLUX_URL/_TOKEN/_ORG/_BUCKET;
    - "influxdb+http(s)://host:port/?org=..&bucket=.." -> InfluxDB there (token from
      TURBOFED_INFLUX_TOKEN).

    For InfluxDB, `spool_dir` is where points wait while the server is away and `influx`
    (the fleet config's [influx] table) overrides any setting; see influx_write.py.
    """
    text = str(path_or_url)
    if text == "influxdb" or text.startswith(("influxdb+http://", "influxdb+https://")):
        from turbofed.store.influx_write import (
            open_influx,  # lazy: influxdb-client is optional
        )

        return open_influx(text, spool_dir=spool_dir, overrides=influx)
    if text.startswith("sqlite://"):
        from turbofed.store.sqlite import SqliteStore

        return SqliteStore(text.removeprefix("sqlite://"))
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
        raise StoreError(f"unsupported results store {text!r}: give a file path (SQLite), \"influxdb\" or "
                         "influxdb+http(s)://host:port/?org=..&bucket=.. (InfluxDB)")
    from turbofed.store.sqlite import SqliteStore

    return SqliteStore(path_or_url)
