"""`turbofed bench soak`, briefly: its JSON has every figure, and "lost" is what the store
really holds against what the replay really published (the memory figures belong to the
benchmark's own run, benchmarks/results/soak.json, not to this test)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def test_short_soak_reports_memory_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "turbofed.cli", "bench", "soak", "--minutes", "0.3", "--sites", "2", "--max-engines", "6",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert out.is_file(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    try:
        assert done.returncode == (0 if result["growth_goal_met"] else 1), done.stderr[-3000:]
        assert {"machine", "settings", "seed", "seconds", "warmup_s", "passes", "rounds_completed", "rss", "messages"} <= set(result)
        assert result["seconds"] >= 18 and result["passes"] >= 1 and result["rounds_completed"] >= 1
        assert set(result["rss"]) == {"site1", "site2", "aggregator", "broker"}
        for figures in result["rss"].values():
            assert set(figures) == {"start_mb", "end_mb", "max_mb", "growth_pct"} and figures["max_mb"] >= figures["start_mb"] > 0
        messages = result["messages"]
        # Counted again here: every soak row (engines "s<pass>-...") has its federated prediction in the store.
        with closing(sqlite3.connect(Path(result["workdir"]) / "results.sqlite")) as db:
            in_store = db.execute("SELECT COUNT(*) FROM predictions WHERE model = 'federated' AND engine GLOB 's[0-9]*-*'").fetchone()[0]
        assert messages["published"] == result["passes"] * result["rows_per_pass"] == sum(p["published"] for p in messages["per_pass"])
        assert messages["stored"] == in_store == messages["published"]
        assert messages["lost"] == 0
        assert messages["agent_readings"] == messages["setup_rows"] + messages["published"]  # the agents' own count
        assert "lost 0" in done.stderr and "growth %" in done.stderr
    finally:
        shutil.rmtree(result["workdir"], ignore_errors=True)
