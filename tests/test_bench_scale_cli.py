"""`turbofed bench scale`'s arguments are checked before any broker or process starts: an unknown
topology is refused naming it and the known ones (workers among them), as is `--workers 0`."""

from __future__ import annotations

import pytest

from turbofed.benchmarks.scale import TOPOLOGIES
from turbofed.cli import main


def test_workers_is_a_topology_and_an_unknown_one_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert list(TOPOLOGIES) == ["flat", "two-level", "workers"]
    assert main(["bench", "scale", "--sites", "1", "--topology", "workers,ring"]) == 2
    assert "--topology: unknown ring; known: flat, two-level, workers" in capsys.readouterr().err


def test_zero_workers_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "scale", "--sites", "1", "--topology", "workers", "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
