"""The aggregator at start, in process: a corrupt newest checkpoint is skipped and its version
re-done; a registry that lost its history next to a store with rounds is refused with one
line naming --reset; --reset archives it and starts the next epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.inprocess import RecordingClient, config, run_round, save_versions
from turbofed.aggregator.registry import ModelRegistry
from turbofed.aggregator.service import Aggregator
from turbofed.aggregator.startup import RegistryRefused
from turbofed.codec import read_weights


def _close(aggregator: Aggregator) -> None:
    aggregator.store.close()
    aggregator.registry.close()


def test_corrupt_newest_checkpoint_resumes_from_previous_and_redoes_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_versions(tmp_path / "registry", range(3))
    newest = tmp_path / "registry" / "models" / "v00002.onnx"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte flipped
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        aggregator = Aggregator(config(tmp_path))
    try:
        assert aggregator.version == 1
        assert any("v2" in r.getMessage() and str(newest) in r.getMessage() for r in caplog.records), caplog.text
        aggregator.client = RecordingClient()
        base = read_weights(aggregator.model)
        run_round(aggregator, {s: ({n: w + 0.5 for n, w in base.items()}, 100) for s in ("site1", "site2")})
        assert aggregator.version == 2
    finally:
        _close(aggregator)
    with ModelRegistry(tmp_path / "registry") as reg:
        assert [v["version"] for v in reg.versions()] == [0, 1, 2] and reg.latest().version == 2
    assert (tmp_path / "registry" / "models" / "v00002.onnx.corrupt").read_bytes() == bytes(data)


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_lost_registry_with_rounds_in_the_store_is_refused(tmp_path: Path, damage: str) -> None:
    save_versions(tmp_path / "registry", range(2))
    first = Aggregator(config(tmp_path))
    first.client = RecordingClient()
    try:
        base = read_weights(first.model)
        run_round(first, {s: (base, 100) for s in ("site1", "site2")})  # round 2 in the store
    finally:
        _close(first)
    db = tmp_path / "registry" / "registry.sqlite"
    if damage == "missing":
        db.unlink()
    else:
        db.write_bytes(b"" if damage == "empty" else db.read_bytes()[:1000])
    with pytest.raises(RegistryRefused, match=r"--reset") as refused:
        Aggregator(config(tmp_path), config_path="fleet.toml")
    assert "\n" not in str(refused.value)
    if damage != "truncated":
        assert "results store holds rounds up to 2" in str(refused.value)

    reset = Aggregator(config(tmp_path), reset=True)
    try:
        assert (reset.epoch, reset.version, reset.model) == (1, -1, None)
        events = [e for e in reset.store.events(100) if e["kind"] == "fleet_reset"]
        assert [(e["detail"]["old_epoch"], e["detail"]["epoch"], e["detail"]["rounds_before"]) for e in events] == [(0, 1, 1)]
    finally:
        _close(reset)
    archived = tmp_path / "registry" / "epoch-0" / "models"
    assert (archived / "v00002.onnx").is_file()
    again = Aggregator(config(tmp_path))  # a plain restart stays in epoch 1
    try:
        assert again.epoch == 1
    finally:
        _close(again)
