"""The aggregator's own round code in the test process, without a broker: a registry with a
checkpoint, a client that only records what would be published, and updates handed to
`_on_update` as if they had arrived (unsigned fleet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from turbofed import envelope
from turbofed.aggregator.registry import ModelRegistry
from turbofed.aggregator.service import Aggregator
from turbofed.codec import Weights, flatten, read_weights, replace_weights
from turbofed.config import FleetConfig, ModelSettings, StrategySettings
from turbofed.graph import reference_model
from turbofed.messages.signed import Sealer
from turbofed.signing import SigningKey
from turbofed.spec import FeatureSpec, FleetStats

SPEC, SETTINGS = FeatureSpec((0, 1), 30, (0.5,) * 9, (2.0,) * 9), ModelSettings(seed=3)
SITES = ("site1", "site2")


def checkpoint_fleet() -> dict:
    return {"spec": SPEC.to_dict(), "stats": FleetStats(count=10.0).to_dict(), "strategy": "fedavg", "strategy_params": {}}


def save_versions(folder: Path, versions: range) -> None:
    """Checkpoints of the reference model, one per version (round = version)."""
    with ModelRegistry(folder) as reg:
        for v in versions:
            reg.save(v, v, reference_model(SPEC, SETTINGS).SerializeToString(), {}, checkpoint_fleet())


def config(tmp_path: Path, **fields: object) -> FleetConfig:
    return FleetConfig(sites=SITES, store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"),
                       model=SETTINGS, insecure_unsigned=True, **fields)


class RecordingClient:
    """Stands in for the MQTT client: keeps each global model the aggregator publishes, decoded."""

    def __init__(self) -> None:
        self.published: list[envelope.Envelope] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> object:
        if topic.endswith("/global"):
            self.published.append(envelope.decode(payload))
        return type("Info", (), {"wait_for_publish": lambda self, t=None: None})()


def run_round(aggregator: Aggregator, updates: dict[str, tuple[Weights, int]]) -> None:
    """Round version+1, opened as the service opens it (streamed for the FedAvg family): each
    site's (weights, claimed samples) arrives, then the round closes by quorum."""
    number = aggregator.version + 1
    aggregator.open_round(number, 0.0).deadline = 1e12
    for site, (weights, claim) in updates.items():
        body = replace_weights(aggregator.model, weights).SerializeToString()
        aggregator._on_update(site, envelope.encode(kind="update", site=site, round=number, model_version=aggregator.version,
                                                    samples=claim, body=body))
    aggregator._close_round("quorum")


# --- two-level fleets and workers (tests/test_regional.py, tests/test_workers.py) ----------


def sealer(pki: Path, name: str, key_of: str | None = None) -> Sealer:
    """`name`'s sealer from the fleet identity folder `pki` (with `key_of`'s key: a forgery)."""
    fleet = json.loads((pki / "fleet.json").read_text())["fleet_id"]
    return Sealer(fleet, SigningKey.load(name, pki / "identities" / (key_of or name) / "signing.key"))


def site_updates(model, sites: tuple[str, ...], seed: int) -> dict[str, tuple[dict, int]]:  # noqa: ANN001
    """Each site's weights (the model's, nudged) and its sample count, seeded."""
    base, rng = read_weights(model), np.random.default_rng(seed)
    return {s: ({k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in base.items()}, int(rng.integers(150, 260)))
            for s in sites}


def deliver(top: Aggregator, topic: str, payload: bytes) -> None:
    """As if the broker delivered it: through the aggregator's inbox and `pump`."""
    top.inbox.put((topic, payload))
    top.pump(0.0)


def global_vector(top: Aggregator) -> np.ndarray:
    """The aggregator's current global model as one flat vector."""
    weights = read_weights(top.model)
    return flatten(weights, list(weights))


def top_aggregator(tmp_path: Path, pki: Path, sites: tuple[str, ...], **fields: object) -> Aggregator:
    """The top aggregator of a signed FedAvg fleet over `sites` (fields: regions, workers, ...),
    with v0 in its registry and a client that only records what it publishes."""
    with ModelRegistry(tmp_path / "registry") as reg:
        reg.save(0, 0, reference_model(SPEC, SETTINGS).SerializeToString(), {}, checkpoint_fleet())
    cfg = FleetConfig(sites=sites, store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"),
                      model=SETTINGS, pki=str(pki), strategy=StrategySettings("fedavg"), **fields)
    aggregator = Aggregator(cfg)
    aggregator.client = RecordingClient()
    return aggregator
