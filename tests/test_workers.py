"""Shared-subscription ingestion workers (aggregator/regional.py, RegionConfig.shared_group):
each worker checks the updates the broker gives it and sends batch partials; the top
aggregator takes several a round per worker, counts each site once, and refuses a batch
naming a site it already counted. In process: the real Aggregator and RegionalAggregator
code, no broker (the live round on Mosquitto is tests/test_workers_live.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.inprocess import (
    SETTINGS,
    SPEC,
    RecordingClient,
    deliver,
    global_vector,
    sealer,
    site_updates,
    top_aggregator,
)
from turbofed.aggregator.regional import MAX_BATCH, Delivery, PartialSite, RegionalAggregator, encode_partial
from turbofed.aggregator.service import Aggregator
from turbofed.benchmarks.scale import make_identities
from turbofed.codec import flatten, replace_weights
from turbofed.config import RegionConfig
from turbofed.messages import RoundAnnouncement
from turbofed.refusals import Refusal
from turbofed.topics import DEFAULT_TOPICS as T

SITES = tuple(f"s{i}" for i in range(1, 9))
WORKERS = ("w1", "w2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_identities(tmp_path_factory.mktemp("pki") / "pki", SITES, WORKERS).root


def _top(tmp_path: Path, pki: Path, workers: tuple[str, ...] = WORKERS) -> Aggregator:
    aggregator = top_aggregator(tmp_path, pki, SITES, workers=workers, max_site_share=1.0)
    aggregator.open_round(1, 0.0).deadline = 1e12
    return aggregator


@pytest.fixture()
def top(tmp_path: Path, pki: Path):  # noqa: ANN201
    aggregator = _top(tmp_path, pki)
    yield aggregator
    aggregator.store.close()
    aggregator.registry.close()


class AckClient(RecordingClient):
    """Stands in for a worker's MQTT client (no broker in these tests): keeps what it
    publishes under a message id, and which update messages it acked."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[int, str, bytes]] = []
        self.acked: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> object:
        mid = 1000 + len(self.sent)
        self.sent.append((mid, topic, payload))
        return type("Info", (), {"mid": mid})()

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def _worker(pki: Path, top: Aggregator | None, name: str, batch: int = 3) -> RegionalAggregator:
    """A worker following `top`'s open round, as it would from the retained round and global."""
    worker = RegionalAggregator(RegionConfig(name, SITES, pki=str(pki), shared_group="ingest", batch=batch, flush_s=0.5))
    worker.client = AckClient()
    if top is not None:
        _follow(worker, top)
    return worker


def _follow(worker: RegionalAggregator, top: Aggregator) -> None:
    r = top.round
    ann = RoundAnnouncement(r.number, SPEC, announce_id=r.announce_id, model_version=r.model_version, deadline=r.deadline,
                            settings=SETTINGS, strategy="fedavg", epoch=top.epoch)
    worker.receive(Delivery(T.global_model, top.sealer.envelope(kind="global", round=top.version, model_version=top.version,
                                                                samples=0, body=top.model.SerializeToString(), epoch=top.epoch)))
    worker.receive(Delivery(T.round, top.sealer.seal("round", ann.to_payload(), round=ann.round, version=ann.version)))


def _update(pki: Path, top: Aggregator, site: str, weights: dict, claim: int, kind: str = "update") -> bytes:
    body = replace_weights(top.model, weights).SerializeToString() if kind == "update" else b""
    return sealer(pki, site).envelope(kind=kind, round=top.round.number, model_version=top.version, samples=claim, body=body,
                                       epoch=top.epoch)


def _forward(worker: RegionalAggregator, top: Aggregator) -> list[int]:
    """The worker's partials so far, delivered to the top; the broker's PUBACK for each. Returns their mids."""
    mids = []
    for mid, topic, payload in worker.client.sent:
        deliver(top, topic, payload)
        worker._published.put(mid)
        mids.append(mid)
    worker.client.sent.clear()
    worker.pump(0.0)  # releases the acks
    return mids


def _meta(payload: bytes) -> dict:
    import zlib

    from turbofed import envelope

    body = envelope.decode(payload).body
    return json.loads(zlib.decompress(body[4:4 + int.from_bytes(body[:4], "big")]))


def test_two_workers_on_disjoint_halves_give_the_flat_fedavg(tmp_path: Path, pki: Path) -> None:
    flat = _top(tmp_path / "flat", pki, workers=())
    two = _top(tmp_path / "two", pki)
    try:
        updates = site_updates(flat.model, SITES, seed=11)
        updates = {s: u for s, u in updates.items() if s in SITES}
        for site, (w, claim) in updates.items():
            flat._on_update(site, _update(pki, flat, site, w, claim))
        flat._close_round("quorum")

        workers = [_worker(pki, two, name) for name in WORKERS]
        for i, site in enumerate(SITES):  # the broker alternates: s1, s3, ... to w1; s2, s4, ... to w2
            w, claim = updates[site]
            workers[i % 2].receive(Delivery(T.update(site), _update(pki, two, site, w, claim), mid=i + 1))
        # Each got 4: one full batch of 3 went at once, the fourth waits for flush_s.
        assert [len(wk.client.sent) for wk in workers] == [1, 1] and [wk.batch for wk in workers] == [["s7"], ["s8"]]
        assert [wk.close_if_due(time.time()) for wk in workers] == [None, None]  # not yet flush_s after it came
        assert all(wk.close_if_due(time.time() + 0.6) is not None for wk in workers)
        for wk in workers:
            _forward(wk, two)
        assert two.counters == {} and set(two.round.accepted) == set(SITES)
        assert two.round.complete(two.config.effective_quorum) == "quorum"
        two._close_round("quorum")

        assert flat.version == two.version == 1
        assert np.abs(global_vector(flat) - global_vector(two)).max() <= 1e-6
        expected = sum(c * flatten(w, list(w)).astype(np.float64) for w, c in updates.values()) / sum(c for _, c in updates.values())
        assert np.abs(global_vector(two) - expected).max() <= 1e-6
        rows = {p["site"]: p for p in two.store.rounds()[-1]["participants"]}
        assert set(rows) == set(SITES) and rows["s5"]["samples"] == updates["s5"][1]
    finally:
        for a in (flat, two):
            a.store.close()
            a.registry.close()


def test_updates_are_acked_only_once_their_partial_is_at_the_broker(top: Aggregator, pki: Path) -> None:
    worker = _worker(pki, top, "w1", batch=2)
    updates = site_updates(top.model, SITES, seed=2)
    worker.receive(Delivery(T.update("s1"), _update(pki, top, "s1", *updates["s1"]), mid=11))
    forged = sealer(pki, "s2", key_of="s3").envelope(kind="update", round=1, model_version=0, samples=200,
                                                      body=top.model.SerializeToString(), epoch=top.epoch)
    worker.receive(Delivery(T.update("s2"), forged, mid=12))  # refused here: acked at once, nothing to redeliver
    assert worker.client.acked == [12] and worker.counters == {Refusal.BAD_SIGNATURE.value: 1}
    worker.receive(Delivery(T.update("s3"), _update(pki, top, "s3", *updates["s3"]), mid=13))
    assert len(worker.client.sent) == 1 and worker.client.acked == [12]  # the batch went; its updates wait for the PUBACK
    (mid, _, payload), = worker.client.sent
    assert _meta(payload)["refused"] == {"bad_signature": 1}
    worker.pump(0.0)
    assert worker.client.acked == [12]
    worker._published.put(mid)  # as on_publish does from paho's network thread
    worker.pump(0.0)
    assert worker.client.acked == [12, 11, 13]


def test_a_restarted_worker_holds_redeliveries_until_it_has_the_round(top: Aggregator, pki: Path) -> None:
    """Mosquitto resends a session's unacked messages before the retained round and global
    arrive again: they wait, and are not refused as if no round were open."""
    updates = site_updates(top.model, SITES, seed=4)
    worker = _worker(pki, None, "w1", batch=4)
    worker.receive(Delivery(T.update("s1"), _update(pki, top, "s1", *updates["s1"]), mid=21, dup=True))
    worker.receive(Delivery(T.update("s2"), _update(pki, top, "s2", *updates["s2"]), mid=22))
    assert len(worker.held) == 2 and worker.counters == {} and not worker.client.acked
    _follow(worker, top)
    assert not worker.held and worker.counters == {}
    assert len(worker.client.sent) == 1 and worker.batch == ["s2"]  # the redelivered s1 went alone
    _forward(worker, top)
    worker.close_if_due(time.time() + 1.0)
    _forward(worker, top)
    assert set(top.round.accepted) == {"s1", "s2"} and top.counters == {}
    assert sorted(worker.client.acked) == [21, 22]


def test_a_batch_naming_a_counted_site_is_refused_whole_and_a_singleton_duplicate_drops_only_itself(top: Aggregator, pki: Path) -> None:
    updates = site_updates(top.model, SITES, seed=5)
    first = _worker(pki, top, "w1", batch=2)
    for i, site in enumerate(("s1", "s2")):
        first.receive(Delivery(T.update(site), _update(pki, top, site, *updates[site]), mid=30 + i))
    _forward(first, top)
    assert set(top.round.accepted) == {"s1", "s2"}

    # Why redeliveries go alone: a batch holding an already counted site is refused whole.
    other = _worker(pki, top, "w2", batch=2)
    for i, site in enumerate(("s2", "s3")):
        other.receive(Delivery(T.update(site), _update(pki, top, site, *updates[site]), mid=40 + i))
    _forward(other, top)
    assert top.counters == {Refusal.DUPLICATE.value: 1} and set(top.round.accepted) == {"s1", "s2"}

    # w1 dies after its partial is out but before it acked: the broker redelivers s2 (dup)
    # to the restarted w1, with s4 that it never saw. s2 goes alone and only it is refused.
    restarted = _worker(pki, top, "w1", batch=2)
    restarted.receive(Delivery(T.update("s2"), _update(pki, top, "s2", *updates["s2"]), mid=31, dup=True))
    restarted.receive(Delivery(T.update("s4"), _update(pki, top, "s4", *updates["s4"]), mid=50))
    assert [_meta(p)["sites"][0][0] for _, _, p in restarted.client.sent] == ["s2"]
    restarted.close_if_due(time.time() + 1.0)
    mids = _forward(restarted, top)
    assert len(mids) == 2 and top.counters == {Refusal.DUPLICATE.value: 2}
    assert set(top.round.accepted) == {"s1", "s2", "s4"}
    assert sorted(restarted.client.acked) == [31, 50]  # both acked: nothing left for the broker to send again


def test_skip_notices_travel_in_a_batch_and_count_toward_the_round(top: Aggregator, pki: Path) -> None:
    worker = _worker(pki, top, "w1", batch=2)
    updates = site_updates(top.model, SITES, seed=6)
    worker.receive(Delivery(T.update("s1"), _update(pki, top, "s1", *updates["s1"]), mid=61))
    worker.receive(Delivery(T.update("s2"), _update(pki, top, "s2", {}, 0, kind="skip"), mid=62))
    (_, _, payload), = worker.client.sent
    assert _meta(payload)["missing"] == ["s2"]
    _forward(worker, top)
    assert set(top.round.accepted) == {"s1"} and set(top.round.skipped) == {"s2"} and top.counters == {}


@pytest.mark.parametrize("case", ["too many sites", "a skip that is also an update", "a site of no one", "a region's partial"])
def test_a_bad_batch_is_refused_with_its_reason(top: Aggregator, pki: Path, case: str) -> None:
    length = int(top.running.base.size)
    rows = [PartialSite("s1", 100, 100, 24_000, 0.5)]
    missing: list[str] = []
    if case == "too many sites":
        rows = [PartialSite(s, 100, 100, 24_000, 0.5) for s in SITES]
        missing = [f"x{i}" for i in range(MAX_BATCH)]
    elif case == "a skip that is also an update":
        missing = ["s1"]
    elif case == "a site of no one":
        rows = [PartialSite("s99", 100, 100, 24_000, 0.5)]
    payload = encode_partial(sealer(pki, "w1"), round=1, model_version=top.version, epoch=top.epoch,
                             total=np.full(length, 0.01 * 100 * len(rows)), sites=rows, missing=missing, refused={})
    topic = T.partial("w1")
    if case == "a region's partial":
        topic, payload = T.partial("east"), payload  # not a worker (nor a region) of this fleet
    deliver(top, topic, payload)
    reason = Refusal.UNKNOWN_REGION if case == "a region's partial" else Refusal.BAD_PARTIAL
    assert top.counters == {reason.value: 1} and not top.round.accepted


def test_with_workers_a_site_sending_to_the_top_directly_is_refused(top: Aggregator, pki: Path) -> None:
    w, claim = site_updates(top.model, SITES, seed=1)["s1"]
    deliver(top, T.update("s1"), _update(pki, top, "s1", w, claim))
    assert top.counters == {Refusal.WRONG_ROUTE.value: 1} and not top.round.accepted


def test_the_example_worker_config_loads_once_the_fleet_has_its_identities(tmp_path: Path) -> None:
    from turbofed.config import load_fleet_config, load_region_config
    from turbofed.deploy.identities import init_from_fleet

    examples = Path(__file__).resolve().parent.parent / "examples"
    (tmp_path / "fleet.toml").write_text('sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\n'
                                         'insecure_unsigned = true\nmax_site_share = 1\nworkers = ["w1", "w2"]\n')
    assert load_fleet_config(tmp_path / "fleet.toml").workers == WORKERS
    init_from_fleet(tmp_path / "fleet.toml")  # issues w1 and w2 (role region)
    (tmp_path / "worker.toml").write_text((examples / "worker.toml").read_text())
    config = load_region_config(tmp_path / "worker.toml")
    assert config.worker and config.shared_group == "ingest" and config.batch == 16 and config.broker.tls
    worker = RegionalAggregator(config)
    assert worker.sealer.signed and worker.sealer.name == "w1"
    acl = (tmp_path / "pki" / "acl").read_text()
    assert "user w1\n" in acl and "topic read tfl/v1/sites/+/update" in acl and "topic write tfl/v1/regions/w1/partial" in acl


@pytest.mark.parametrize("line, message", [
    ("batch = 17", r"batch must be an integer in 1..16, got 17"),
    ("flush_s = 0", r"flush_s must be a number > 0 and <= 60, got 0"),
    ('shared_group = "a/b"', r"shared_group"),
])
def test_worker_config_errors_name_file_and_key(tmp_path: Path, line: str, message: str) -> None:
    import re

    from turbofed.config import load_region_config
    from turbofed.errors import ConfigError

    path = tmp_path / "worker.toml"
    path.write_text(f'region = "w1"\nsites = ["a"]\ninsecure_unsigned = true\n{line}\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_region_config(path)


def test_a_redelivery_after_a_reconnect_is_acked_once_with_its_batch(top: Aggregator, pki: Path) -> None:
    """The connection drops and comes back (the same process): the broker sends an update
    still in the open batch again, with the same message id. It is refused here as a
    duplicate, and its id is acked once, when the batch's partial is at the broker."""
    worker = _worker(pki, top, "w1", batch=4)
    w, claim = site_updates(top.model, SITES, seed=8)["s1"]
    payload = _update(pki, top, "s1", w, claim)
    worker.receive(Delivery(T.update("s1"), payload, mid=7))
    worker.receive(Delivery(T.update("s1"), payload, mid=7, dup=True))
    assert worker.counters == {Refusal.DUPLICATE.value: 1} and len(worker.client.sent) == 1 and not worker.client.acked
    _forward(worker, top)
    assert worker.client.acked == [7] and set(top.round.accepted) == {"s1"} and top.counters == {}
