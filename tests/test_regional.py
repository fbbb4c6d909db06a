"""Two-level aggregation (aggregator/regional.py): regional aggregators sum their sites'
updates into one signed partial; the top aggregator merges partials into the flat FedAvg,
and refuses, with a counted reason, any partial that is forged, unsigned or malformed.
In process: the real Aggregator and RegionalAggregator code, no broker (the live
two-broker round is tests/test_regional_live.py)."""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests import inprocess
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
from turbofed.aggregator.regional import PartialSite, RegionalAggregator, encode_partial, sites_digest
from turbofed.aggregator.service import Aggregator, checkpointed_regions
from turbofed.aggregator.weights import MAX_SAMPLES
from turbofed.benchmarks.scale import make_identities
from turbofed.codec import flatten, replace_weights
from turbofed.config import FleetConfig, RegionConfig, StrategySettings
from turbofed.errors import ConfigError
from turbofed.messages import RoundAnnouncement
from turbofed.messages.signed import Sealer, Unsigned
from turbofed.refusals import Refusal
from turbofed.signing import SigningKey
from turbofed.store.sqlite import SqliteStore
from turbofed.topics import DEFAULT_TOPICS as T

REGIONS = {"east": ("s1", "s2", "s3", "s4"), "west": ("s5", "s6", "s7")}
DIRECT = ("s8",)  # in no region: sends to the top aggregator itself
SITES = (*REGIONS["east"], *REGIONS["west"], *DIRECT)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_identities(tmp_path_factory.mktemp("pki") / "pki", SITES, tuple(REGIONS)).root


def _top(tmp_path: Path, pki: Path, regions: dict | None = None, **fields: object) -> Aggregator:
    return top_aggregator(tmp_path, pki, SITES, regions=regions or {}, **fields)


def _update_payload(pki: Path, top: Aggregator, site: str, weights: dict, claim: int, number: int) -> bytes:
    body = replace_weights(top.model, weights).SerializeToString()
    return sealer(pki, site).envelope(kind="update", round=number, model_version=top.version, samples=claim, body=body,
                                       epoch=top.epoch)


class Outbox(RecordingClient):
    """Stands in for a regional aggregator's MQTT client: keeps every (topic, payload) published."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> object:
        self.sent.append((topic, payload))
        return super().publish(topic, payload, qos, retain)


def _region(pki: Path, top: Aggregator, name: str, site_records: str = "full") -> RegionalAggregator:
    """A regional aggregator following `top`'s open round, as it would over the bridge."""
    region = RegionalAggregator(RegionConfig(name, REGIONS[name], pki=str(pki), site_records=site_records))
    region.client = Outbox()
    r = top.round
    ann = RoundAnnouncement(r.number, SPEC, announce_id=r.announce_id, model_version=r.model_version, deadline=r.deadline,
                            settings=SETTINGS, strategy="fedavg", epoch=top.epoch)
    region.handle(T.global_model, top.sealer.envelope(kind="global", round=top.version, model_version=top.version,
                                                      samples=0, body=top.model.SerializeToString(), epoch=top.epoch))
    region.handle(T.round, top.sealer.seal("round", ann.to_payload(), round=ann.round, version=ann.version))
    assert region.round is not None and region.round.number == r.number
    return region


@pytest.mark.parametrize("site_records", ["full", "summary"])
def test_two_level_fedavg_equals_flat_fedavg(tmp_path: Path, pki: Path, site_records: str) -> None:
    flat = _top(tmp_path / "flat", pki)
    two = _top(tmp_path / "two", pki, regions=REGIONS)
    try:
        updates = site_updates(flat.model, SITES, seed=7)
        flat.open_round(1, 0.0).deadline = 1e12
        for site, (w, claim) in updates.items():
            flat._on_update(site, _update_payload(pki, flat, site, w, claim, 1))
        assert flat.round.complete(flat.config.effective_quorum) == "quorum"
        flat._close_round("quorum")

        two.open_round(1, 0.0).deadline = 1e12
        for name in REGIONS:
            region = _region(pki, two, name, site_records)
            for site in REGIONS[name]:
                w, claim = updates[site]
                region.handle(T.update(site), _update_payload(pki, two, site, w, claim, 1))
            assert region.close_if_due(0.0) is not None  # all its sites answered
            (topic, payload), = region.client.sent
            deliver(two, topic, payload)
        deliver(two, T.update("s8"), _update_payload(pki, two, "s8", *updates["s8"], 1))
        assert two.counters == {} and two.round.complete(two.config.effective_quorum) == "quorum"
        two._close_round("quorum")

        assert flat.version == two.version == 1
        difference = np.abs(global_vector(flat) - global_vector(two)).max()
        assert difference <= 1e-6, difference
        expected = sum(claim * flatten(w, list(w)).astype(np.float64) for w, claim in updates.values()) / sum(c for _, c in updates.values())
        assert np.abs(global_vector(two) - expected).max() <= 1e-6
        rows = {p["site"]: p for p in two.store.rounds()[-1]["participants"]}
        assert set(rows) == set(SITES) and rows["s8"]["samples"] == updates["s8"][1]
        if site_records == "full":
            assert rows["s2"]["samples"] == updates["s2"][1] and rows["s2"]["norm"] > 0
        else:  # the top knows s2 was summed in east, not its weight or norm
            assert (rows["s2"]["samples"], rows["s2"]["norm"], rows["s2"]["action"]) == (0, None, "summed in region east")
    finally:
        for a in (flat, two):
            a.store.close()
            a.registry.close()


def test_a_round_of_summary_partials_alone_closes_on_their_weighted_mean(tmp_path: Path, pki: Path) -> None:
    """No site sent directly (s8 silent, quorum 7): every weight the top has comes from summaries."""
    top = _top(tmp_path, pki, regions=REGIONS, quorum=7)
    try:
        updates = site_updates(top.model, SITES, seed=11)
        top.open_round(1, 0.0).deadline = 1e12
        for name in REGIONS:
            region = _region(pki, top, name, "summary")
            for site in REGIONS[name]:
                region.handle(T.update(site), _update_payload(pki, top, site, *updates[site], 1))
            assert region.close_if_due(0.0) is not None
            deliver(top, *region.client.sent[0])
        assert top.counters == {} and top.round.complete(top.config.effective_quorum) == "quorum"
        top._close_round("quorum")
        summed = [updates[s] for name in REGIONS for s in REGIONS[name]]
        expected = sum(c * flatten(w, list(w)).astype(np.float64) for w, c in summed) / sum(c for _, c in summed)
        assert top.version == 1 and np.abs(global_vector(top) - expected).max() <= 1e-6
        # the global's samples header and the round's record count the regions' Σ w (their sites' rows carry none)
        assert top.global_samples == sum(c for _, c in summed)
        record = top.registry.latest().fleet["round_record"]  # the checkpoint a restart resumes from
        assert {name: r["samples"] for name, r in record["regions"].items()} == {
            name: sum(updates[s][1] for s in REGIONS[name]) for name in REGIONS}
        stored = top.store.rounds()[-1]  # and so does the results store (the dashboard's Rounds table)
        assert {g["region"]: (g["sites"], g["samples"]) for g in stored["regions"]} == {
            name: (len(REGIONS[name]), sum(updates[s][1] for s in REGIONS[name])) for name in REGIONS}
        assert stored["samples"] == top.global_samples
        # a crash between the checkpoint and the store write: the next start records it from the checkpoint
        top.store.close()
        top.store = SqliteStore(tmp_path / "after-crash.sqlite")
        top._reconcile(top.registry.latest())
        assert top.store.rounds()[-1]["regions"] == stored["regions"] and top.store.rounds()[-1]["samples"] == stored["samples"]
    finally:
        top.store.close()
        top.registry.close()


def test_a_damaged_region_total_in_the_checkpoint_is_left_out_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    east = {"sites": 2, "samples": 500, "update_bytes": 9000, "claimed": 500, "norm_max": 1.0}
    damaged = {"east": east, "west": {"sites": "2", "samples": 5, "update_bytes": 1}, "north": [1], "south": {"sites": True,
               "samples": 1, "update_bytes": 1}}
    assert checkpointed_regions(damaged, 7) == {"east": east}
    assert "round 7" in caplog.text and "north, south, west" in caplog.text
    assert checkpointed_regions("not a table", 7) is None and checkpointed_regions(None, 7) is None


@pytest.fixture()
def top(tmp_path: Path, pki: Path):  # noqa: ANN201
    aggregator = _top(tmp_path, pki, regions=REGIONS)
    aggregator.open_round(1, 0.0).deadline = 1e12
    yield aggregator
    aggregator.store.close()
    aggregator.registry.close()


def _partial(pki: Path, top: Aggregator, *, sealer: Sealer | Unsigned | None = None, region: str = "east",
             total: np.ndarray | None = None, sites: list[PartialSite] | None = None, missing: list[str] | None = None,
             number: int = 1) -> bytes:
    length = int(top.running.base.size)
    rows = sites if sites is not None else [PartialSite(s, 100, 100, 24_000, 0.5) for s in REGIONS[region]]
    named = {s.site for s in rows}
    return encode_partial(sealer or inprocess.sealer(pki, region), round=number, model_version=top.version, epoch=top.epoch,
                          total=np.full(length, 0.01 * len(rows) * 100) if total is None else total, sites=rows,
                          missing=[s for s in REGIONS[region] if s not in named] if missing is None else missing, refused={})


def _refused(top: Aggregator, topic: str, payload: bytes, reason: Refusal) -> None:
    before = dict(top.round.accepted)
    deliver(top, topic, payload)
    assert top.counters[reason.value] == 1, top.counters
    assert top.round.accepted == before and top.round is not None  # nothing taken, still running


@pytest.mark.parametrize("case, reason", [
    ("unsigned", Refusal.UNSIGNED),
    ("signed with another region's key", Refusal.BAD_SIGNATURE),
    ("signed with a site's key", Refusal.BAD_SIGNATURE),
    ("another region's partial on this topic", Refusal.WRONG_SENDER),
    ("unknown region", Refusal.UNKNOWN_REGION),
    ("another round", Refusal.STALE_ROUND),
    ("a site of another region", Refusal.BAD_PARTIAL),
    ("a site named twice", Refusal.BAD_PARTIAL),
    ("a sum of the wrong length", Refusal.BAD_PARTIAL),
    ("a NaN in the sum", Refusal.NON_FINITE),
    ("weights beyond the signed total", Refusal.BAD_PARTIAL),
    ("a weight above the claim", Refusal.BAD_PARTIAL),
    ("not an envelope", Refusal.BAD_MAGIC),
    ("a site list that inflates beyond its bound", Refusal.BAD_PARTIAL),
])
def test_a_bad_partial_is_refused_with_its_reason_and_counted(top: Aggregator, pki: Path, case: str, reason: Refusal) -> None:
    length, topic = int(top.running.base.size), T.partial("east")
    fleet = json.loads((pki / "fleet.json").read_text())["fleet_id"]
    if case == "unsigned":
        payload = _partial(pki, top, sealer=Unsigned("east"))
    elif case == "signed with another region's key":
        payload = _partial(pki, top, sealer=sealer(pki, "east", key_of="west"))
    elif case == "signed with a site's key":
        payload = _partial(pki, top, sealer=Sealer(fleet, SigningKey.load("east", pki / "identities" / "s1" / "signing.key")))
    elif case == "another region's partial on this topic":
        payload = _partial(pki, top, region="west")
    elif case == "unknown region":
        topic, payload = T.partial("north"), _partial(pki, top)
    elif case == "another round":
        payload = _partial(pki, top, number=2)
    elif case == "a site of another region":
        payload = _partial(pki, top, sites=[PartialSite("s5", 100, 100, 24_000, 0.5)], missing=list(REGIONS["east"]))
    elif case == "a site named twice":
        payload = _partial(pki, top, sites=[PartialSite("s1", 100, 100, 24_000, 0.5)] * 2, missing=["s2", "s3", "s4"])
    elif case == "a sum of the wrong length":
        payload = _partial(pki, top, total=np.zeros(length - 1))
    elif case == "a NaN in the sum":
        payload = _partial(pki, top, total=np.r_[np.zeros(length - 1), np.nan])
    elif case == "weights beyond the signed total":
        good = _partial(pki, top)
        from turbofed import envelope

        env = envelope.decode(good)  # the same body, signed (by east) for a smaller Σ w
        payload = sealer(pki, "east").envelope(kind="partial", round=1, model_version=top.version, samples=env.samples - 1,
                                                body=env.body, epoch=top.epoch)
    elif case == "a weight above the claim":
        payload = _partial(pki, top, sites=[PartialSite(s, 500, 100, 24_000, 0.5) for s in REGIONS["east"]])
    elif case == "a site list that inflates beyond its bound":
        from turbofed.aggregator.regional import MAX_META_BYTES

        bomb = zlib.compress(b" " * (MAX_META_BYTES + 1), 9)  # a few KB on the wire
        body = len(bomb).to_bytes(4, "big") + bomb + np.zeros(length, dtype="<f4").tobytes()
        payload = sealer(pki, "east").envelope(kind="partial", round=1, model_version=top.version, samples=0, body=body, epoch=top.epoch)
    else:
        payload = b"not a partial at all"
    _refused(top, topic, payload, reason)


def test_a_good_partial_counts_its_sites_once(top: Aggregator, pki: Path) -> None:
    payload = _partial(pki, top, sites=[PartialSite("s1", 100, 120, 24_000, 0.5)])  # s2..s4 missing
    deliver(top, T.partial("east"), payload)
    assert set(top.round.accepted) == {"s1"} and set(top.round.skipped) == {"s2", "s3", "s4"}
    deliver(top, T.partial("east"), payload)  # again: every site of it has answered already
    assert top.counters[Refusal.DUPLICATE.value] == 1 and set(top.round.accepted) == {"s1"}


def test_a_regional_site_sending_to_the_top_directly_is_refused(top: Aggregator, pki: Path) -> None:
    w, claim = site_updates(top.model, SITES, seed=1)["s1"]
    deliver(top, T.update("s1"), _update_payload(pki, top, "s1", w, claim, 1))
    assert top.counters[Refusal.WRONG_ROUTE.value] == 1 and not top.round.accepted


def test_regions_with_a_strategy_that_needs_every_update_are_refused(tmp_path: Path, pki: Path) -> None:
    cfg = FleetConfig(sites=SITES, store=str(tmp_path / "r.sqlite"), registry=str(tmp_path / "reg"), model=SETTINGS,
                      pki=str(pki), regions=REGIONS)
    with pytest.raises(ConfigError, match=r"\[regions\] needs a FedAvg-family strategy"):
        Aggregator(replace(cfg, strategy=StrategySettings("median")))


def test_the_example_region_config_loads_once_the_fleet_has_its_identities(tmp_path: Path) -> None:
    from turbofed.config import load_region_config
    from turbofed.deploy.identities import init_from_fleet

    examples = Path(__file__).resolve().parent.parent / "examples"
    (tmp_path / "fleet.toml").write_text('sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\n'
                                         'insecure_unsigned = true\n[regions]\neast = ["site1", "site2"]\n')
    init_from_fleet(tmp_path / "fleet.toml")  # issues region east with the sites
    (tmp_path / "region.toml").write_text((examples / "region.toml").read_text())
    config = load_region_config(tmp_path / "region.toml")
    assert config.region == "east" and config.sites == ("site1", "site2") and config.broker.tls
    region = RegionalAggregator(config)  # its keys load: its own signing key, the aggregator's and the sites' public keys
    assert region.sealer.signed and region.sealer.name == "east"
    acl = (tmp_path / "pki" / "acl").read_text()
    assert "user east\n" in acl and "topic write tfl/v1/regions/east/partial" in acl


def test_region_config_errors_name_file_and_key(tmp_path: Path) -> None:
    from turbofed.config import load_region_config

    path = tmp_path / "region.toml"
    path.write_text('region = "east"\nsites = ["a"]\ninsecure_unsigned = true\nclose_before_s = -1\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: close_before_s must be a number in 0..1000000, got -1"):
        load_region_config(path)


def test_the_bridge_template_renders_the_topics_each_way_with_tls(pki: Path) -> None:
    from turbofed.deploy.bridge import BridgeTLS, render_bridge
    from turbofed.deploy.identities import FleetIdentities

    text = render_bridge("east", "central.example", 8883, T, BridgeTLS.of(FleetIdentities(pki), "east"))
    lines = set(text.splitlines())
    assert {"address central.example:8883", "topic tfl/v1/round in 1", "topic tfl/v1/global in 1",
            "topic tfl/v1/regions/east/partial out 1", "topic tfl/v1/sites/+/stats out 1"} <= lines
    assert f"bridge_certfile {(pki / 'identities' / 'east' / 'client.crt').resolve()}" in lines
    assert not any("update" in line for line in lines if line.startswith("topic "))  # updates stay in the region
    assert "$" not in text  # every placeholder filled


def test_the_region_checks_updates_as_the_top_does_and_reports_its_refusals(tmp_path: Path, pki: Path) -> None:
    top = _top(tmp_path, pki, regions=REGIONS)
    try:
        top.open_round(1, 0.0).deadline = 1e12
        region = _region(pki, top, "west")
        updates = site_updates(top.model, SITES, seed=3)
        forged = sealer(pki, "s5", key_of="s6").envelope(kind="update", round=1, model_version=0, samples=200,
                                                          body=top.model.SerializeToString(), epoch=top.epoch)
        region.handle(T.update("s5"), forged)  # s6's key on s5's update
        region.handle(T.update("s1"), _update_payload(pki, top, "s1", *updates["s1"], 1))  # not a site of west
        region.handle(T.update("s6"), _update_payload(pki, top, "s6", *updates["s6"], 1))
        assert region.counters == {Refusal.BAD_SIGNATURE.value: 1, Refusal.UNKNOWN_SITE.value: 1}
        assert region.close_if_due(1e12 - 5.1) is None and not region.client.sent  # s5, s7 still due
        assert region.close_if_due(1e12 - 5.0) is not None  # close_before_s of the deadline: s5 and s7 missing
        (topic, payload), = region.client.sent
        deliver(top, topic, payload)
        assert top.counters == {} and set(top.round.accepted) == {"s6"} and set(top.round.skipped) == {"s5", "s7"}
        from turbofed import envelope

        body = envelope.decode(payload).body
        meta = json.loads(zlib.decompress(body[4:4 + int.from_bytes(body[:4], "big")]))
        assert meta["refused"] == {"bad_signature": 1, "unknown_site": 1} and meta["missing"] == ["s5", "s7"]
    finally:
        top.store.close()
        top.registry.close()


def _summary_partial(pki: Path, top: Aggregator, *, weight: int, missing: list[str], summary: dict) -> bytes:
    """East's partial with a hand-made summary (what a faulty or hostile region could send)."""
    length = int(top.running.base.size)
    meta = zlib.compress(json.dumps({"summary": summary, "missing": missing, "refused": {}, "length": length}).encode())
    body = len(meta).to_bytes(4, "big") + meta + np.full(length, 0.01, dtype="<f4").tobytes()
    return sealer(pki, "east").envelope(kind="partial", round=1, model_version=top.version, samples=weight, body=body,
                                        epoch=top.epoch)


GOOD_SUMMARY = {"sites": 3, "digest": sites_digest(["s1", "s2", "s3"]), "claimed": 300, "update_bytes": 72_000, "norm_max": 0.5}


@pytest.mark.parametrize("case, weight, missing, summary", [
    ("counts a site it lists as missing", 300, ["s4"], {**GOOD_SUMMARY, "sites": 4}),
    ("a weight above the claims", 301, ["s4"], GOOD_SUMMARY),
    ("fewer weight than sites", 2, ["s4"], GOOD_SUMMARY),
    ("a missing site of another region", 300, ["s5"], GOOD_SUMMARY),
    ("a non-finite norm", 300, ["s4"], {**GOOD_SUMMARY, "norm_max": float("nan")}),
    ("a field short", 300, ["s4"], {k: v for k, v in GOOD_SUMMARY.items() if k != "norm_max"}),
    ("other sites than the top's [regions] has (region.toml disagrees)", 300, ["s4"],
     {**GOOD_SUMMARY, "digest": sites_digest(["s1", "s2", "s5"])}),
    ("a norm too large for a float", 300, ["s4"], {**GOOD_SUMMARY, "norm_max": 10**400}),
    ("a string for a count", 300, ["s4"], {**GOOD_SUMMARY, "claimed": "300"}),
    ("a bool for a count", 300, ["s4"], {**GOOD_SUMMARY, "sites": True}),
    ("a negative norm", 300, ["s4"], {**GOOD_SUMMARY, "norm_max": -1.0}),
    ("no bytes", 300, ["s4"], {**GOOD_SUMMARY, "update_bytes": 0}),
    ("claims beyond the samples a site can have", 300, ["s4"], {**GOOD_SUMMARY, "claimed": 3 * MAX_SAMPLES + 1}),
])
def test_a_summary_partial_that_does_not_hold_together_is_refused(top: Aggregator, pki: Path, case: str, weight: int,
                                                                  missing: list[str], summary: dict) -> None:
    _refused(top, T.partial("east"), _summary_partial(pki, top, weight=weight, missing=missing, summary=summary),
             Refusal.BAD_PARTIAL)


def test_a_good_summary_partial_counts_the_regions_sites_less_missing(top: Aggregator, pki: Path) -> None:
    deliver(top, T.partial("east"), _summary_partial(pki, top, weight=300, missing=["s4"], summary=GOOD_SUMMARY))
    assert top.counters == {} and set(top.round.accepted) == {"s1", "s2", "s3"} and set(top.round.skipped) == {"s4"}
    assert top.running.weight == 300 and top.running.summed == dict.fromkeys(("s1", "s2", "s3"), "east")
    assert top.running.regions == {"east": {"samples": 300, "sites": 3, "claimed": 300, "update_bytes": 72_000, "norm_max": 0.5}}


def test_a_summary_partial_stays_the_size_of_the_sum_however_many_sites() -> None:
    """What `site_records = "summary"` is for: a region's partial does not grow with its sites
    (a full one carries a record per site)."""
    from turbofed.aggregator.regional import read_partial
    from turbofed.aggregator.rounds import Rejected

    total = np.random.default_rng(0).normal(size=6_000)
    sizes = {}
    for n in (4, 1_250):
        sites = [PartialSite(f"site{i:05d}", 100 + i % 37, 100 + i % 37, 24_000 + i % 11, 0.5 + i / 997) for i in range(n)]
        members = frozenset(s.site for s in sites) | {"silent"}
        for records in ("full", "summary"):
            payload = encode_partial(Unsigned("east"), round=1, model_version=0, epoch=0, total=total * len(sites) * 100,
                                     sites=sites, missing=["silent"], refused={}, summary=records == "summary")
            p = read_partial(payload, "east", members, Unsigned("east"), round=1, model_version=0, length=total.size)
            assert p.weight == sum(s.weight for s in sites) and p.missing == ("silent",)
            assert len(p.sites) + len(p.summed) == n and (records == "summary") == (not p.sites)
            np.testing.assert_allclose(p.total / p.weight, total * len(sites) * 100 / p.weight, rtol=1e-6)
            sizes[records, n] = len(payload)
            if records == "summary":  # a worker's batch must name its sites
                with pytest.raises(Rejected, match="either sites or summary"):
                    read_partial(payload, "east", members, Unsigned("east"), round=1, model_version=0, length=total.size, batch=True)
    assert sizes["summary", 1_250] - sizes["summary", 4] <= 16  # a few digits of the totals
    assert sizes["full", 1_250] - sizes["full", 4] > 2 * 1_250  # a record per site, compressed


def test_a_worker_cannot_send_summary_partials(tmp_path: Path) -> None:
    from turbofed.config import load_region_config

    path = tmp_path / "worker.toml"
    path.write_text('region = "w1"\nsites = ["a"]\ninsecure_unsigned = true\nshared_group = "ingest"\nsite_records = "summary"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: site_records must be \"full\" for a worker"):
        load_region_config(path)
    path.write_text('region = "w1"\nsites = ["a"]\ninsecure_unsigned = true\nshared_group = "ingest"\n')
    config = load_region_config(path)  # the default (summary) is for regions; a worker's batches name their sites
    assert config.worker and config.site_records == "full"
    path.write_text('region = "r1"\nsites = ["a"]\ninsecure_unsigned = true\nsite_records = "some"\n')
    with pytest.raises(ConfigError, match=r"site_records must be one of 'full', 'summary', got 'some'"):
        load_region_config(path)
