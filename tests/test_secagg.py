"""Secure aggregation (turbofed/secagg, Bonawitz et al. 2017): the sum is exact to fixed-point
precision, dropouts after masking are recovered, fewer than t shares unmask nothing, masked
vectors look uniform, hostile payloads are refused with a reason, Shamir is t-of-n."""

from __future__ import annotations

import itertools
import random
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from turbofed.messages.signed import Sealer, Verifier
from turbofed.refusals import Refusal
from turbofed.secagg import (
    AdvertiseKeys,
    AggregatorState,
    KeyEntry,
    MaskedInput,
    NotEnoughShares,
    Params,
    Quantizer,
    Roster,
    RoundRefused,
    SecaggError,
    SecaggMessageError,
    Shares,
    SiteClient,
    UnmaskReply,
    UnmaskRequest,
    shamir,
)
from turbofed.secagg.crypto import prg
from turbofed.secagg.messages import KINDS, MAX_SITES, SHARE_CIPHERTEXT
from turbofed.secagg.neighbours import neighbourhoods
from turbofed.secagg.quant import QuantError
from turbofed.secagg.wire import open_frame, seal_frame
from turbofed.signing import SignatureError, SigningKey, TrustedKeys


class Round:
    """n sites and the aggregator through one round, in process; drops on request."""

    def __init__(self, n: int, dim: int, *, round_: int = 1, threshold: int | None = None, max_weight: int = 1,
                 quantizer: Quantizer | None = None, neighbours: int = 0) -> None:
        self.params = Params(round=round_, dim=dim, threshold=threshold or Params.majority(n), max_weight=max_weight,
                             quantizer=quantizer or Quantizer(), neighbours=neighbours)
        self.clients = {i: SiteClient(i, self.params) for i in range(1, n + 1)}
        self.server = AggregatorState(self.params)

    def setup(self) -> dict[int, Shares]:
        for c in self.clients.values():
            self.server.receive_keys(c.advertise())
        roster = self.server.roster()
        for c in self.clients.values():
            self.server.receive_shares(c.share_keys(roster))
        return self.server.inboxes()

    def masked(self, inputs: dict[int, np.ndarray], weights: dict[int, int] | None = None,
               skip: frozenset[int] = frozenset()) -> UnmaskRequest:
        inboxes = self.setup()
        for i, c in self.clients.items():
            if i not in skip:
                self.server.receive_masked(c.mask(inboxes[i], inputs[i], (weights or {}).get(i, 1)))
        return self.server.unmask_request()

    def run(self, inputs: dict[int, np.ndarray], weights: dict[int, int] | None = None, *,
            drop_before_mask: frozenset[int] = frozenset(), drop_after_mask: frozenset[int] = frozenset()):  # noqa: ANN201
        request = self.masked(inputs, weights, drop_before_mask)
        for i in request.survivors:
            if i not in drop_after_mask:
                self.server.receive_unmask(self.clients[i].unmask(request))
        return self.server.result()


def _inputs(n: int, dim: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-0.9, 0.9, dim) for i in range(1, n + 1)}


def _quantised_sum(q: Quantizer, inputs: dict[int, np.ndarray], sites, weights=None) -> np.ndarray:  # noqa: ANN001
    return sum((weights or {}).get(i, 1) * np.rint(inputs[i] * q.scale) for i in sites) / q.scale


@pytest.mark.parametrize(("n", "dim"), [(4, 1000), (20, 500), (100, 16)])
def test_sum_is_exact_to_fixed_point_precision(n: int, dim: int) -> None:
    rnd = Round(n, dim)
    inputs = _inputs(n, dim)
    result = rnd.run(inputs)
    q = rnd.params.quantizer
    np.testing.assert_array_equal(result.weighted_sum, _quantised_sum(q, inputs, inputs))  # exact in the ring
    assert np.abs(result.weighted_sum - sum(inputs.values())).max() <= n * 0.5 * q.step
    assert result.total_weight == n and result.dropped == ()


def test_weighted_mean_with_secret_weights() -> None:
    n, dim = 6, 50
    q = Quantizer(bits=32, scale=2.0**12, clip=1.0)
    rnd = Round(n, dim, max_weight=1000, quantizer=q)
    inputs, weights = _inputs(n, dim, 1), {i: 100 * i for i in range(1, n + 1)}
    result = rnd.run(inputs, weights)
    assert result.total_weight == sum(weights.values())
    np.testing.assert_array_equal(result.weighted_sum, _quantised_sum(q, inputs, inputs, weights))
    plain = sum(weights[i] * inputs[i] for i in inputs) / sum(weights.values())
    assert np.abs(result.mean - plain).max() <= 0.5 * q.step


def test_ten_percent_dropouts_after_masking_are_recovered() -> None:
    n, dim = 20, 300
    rnd = Round(n, dim)
    inputs = _inputs(n, dim, 2)
    # Two sites (10%) drop after computing their masks, before their masked input arrives;
    # one more sends its input and then never answers the unmask request.
    gone, silent = frozenset({3, 17}), frozenset({8})
    result = rnd.run(inputs, drop_before_mask=gone, drop_after_mask=silent)
    survivors = [i for i in inputs if i not in gone]
    assert result.survivors == tuple(survivors) and result.dropped == tuple(sorted(gone))
    np.testing.assert_array_equal(result.weighted_sum, _quantised_sum(rnd.params.quantizer, inputs, survivors))
    assert result.total_weight == len(survivors)


@pytest.mark.parametrize("k", [4, 7])
def test_secagg_plus_neighbourhoods_sum_exactly_with_dropouts(k: int) -> None:
    n, dim = 30, 64
    rnd = Round(n, dim, threshold=3, neighbours=k)
    inputs = _inputs(n, dim, 3)
    inboxes = rnd.setup()
    graph = rnd.server.graph
    assert all(len(graph[u]) == k + k % 2 for u in graph) and all(u in graph[v] for u in graph for v in graph[u])
    # The graph is random, so pick dropouts that leave every neighbourhood (a site and its
    # neighbours) at least t sites; small k with clustered dropouts aborts (NotEnoughShares).
    spare = {v: len(graph[v]) + 1 - rnd.params.threshold for v in graph}
    apart: list[int] = []
    for u in sorted(graph):
        hit = graph[u] | {u}
        if len(apart) < 4 and all(spare[v] > 0 for v in hit):
            apart.append(u)
            for v in hit:
                spare[v] -= 1
    gone, silent = frozenset(apart[:3]), apart[3]
    for i, c in rnd.clients.items():
        if i not in gone:
            rnd.server.receive_masked(c.mask(inboxes[i], inputs[i]))
    request = rnd.server.unmask_request()
    for i in request.survivors:
        if i != silent:
            rnd.server.receive_unmask(rnd.clients[i].unmask(request))
    result = rnd.server.result()
    survivors = [i for i in inputs if i not in gone]
    np.testing.assert_array_equal(result.weighted_sum, _quantised_sum(rnd.params.quantizer, inputs, survivors))
    assert all(len(rnd.clients[i].held) <= k + k % 2 + 1 for i in survivors)  # shares held only for neighbours


def test_neighbourhoods_are_the_full_graph_for_k_0_or_large_k() -> None:
    full = {u: frozenset(range(1, 6)) - {u} for u in range(1, 6)}
    assert neighbourhoods(range(1, 6), 0, b"s") == full == neighbourhoods(range(1, 6), 4, b"s")
    assert neighbourhoods(range(1, 30), 4, b"a") != neighbourhoods(range(1, 30), 4, b"b")  # the seed orders the ring


def test_a_site_refuses_a_roster_with_other_round_settings() -> None:
    rnd = Round(6, 4, threshold=3, neighbours=2)
    for c in rnd.clients.values():
        rnd.server.receive_keys(c.advertise())
    roster = rnd.server.roster()
    with pytest.raises(RoundRefused, match="k = 2"):
        rnd.clients[1].share_keys(Roster(roster.round, roster.threshold, roster.entries, 0))
    with pytest.raises(RoundRefused, match="t = 4"):
        rnd.clients[1].share_keys(Roster(roster.round, 4, roster.entries, 2))


def test_fewer_shares_than_the_threshold_unmask_nothing() -> None:
    n, dim = 8, 20
    rnd = Round(n, dim, threshold=5)
    request = rnd.masked(_inputs(n, dim), skip=frozenset({1}))
    for i in request.survivors[:4]:  # t - 1 replies
        rnd.server.receive_unmask(rnd.clients[i].unmask(request))
    with pytest.raises(NotEnoughShares, match="fewer than t = 5: refusing to unmask"):
        rnd.server.result()
    # and too few masked inputs abort before anyone is asked for shares
    rnd = Round(n, dim, threshold=5)
    with pytest.raises(NotEnoughShares, match="masked inputs"):
        rnd.masked(_inputs(n, dim), skip=frozenset({1, 2, 3, 4}))


def test_a_bad_s_share_is_caught_against_the_advertised_key() -> None:
    n, dim = 5, 10
    rnd = Round(n, dim, threshold=3)
    request = rnd.masked(_inputs(n, dim), skip=frozenset({5}))
    for i in request.survivors:
        reply = rnd.clients[i].unmask(request)
        if i == 1:
            v, raw = reply.s_shares[0]
            reply = UnmaskReply(reply.round, reply.site, reply.b_shares, ((v, shamir.share_to_bytes(12345)),))
        rnd.server.receive_unmask(reply)
    with pytest.raises(SecaggError, match="do not match its advertised key"):
        rnd.server.result()


def test_a_site_never_reveals_both_shares_of_a_peer() -> None:
    n, dim = 5, 10
    rnd = Round(n, dim, threshold=3)
    request = rnd.masked(_inputs(n, dim), skip=frozenset({5}))
    client = rnd.clients[1]
    for survivors, dropped in (((1, 2, 3), (5,)), ((2, 3, 4), (1, 5)), ((1, 2, 3, 4), (5, 6))):  # not U2 split in two
        with pytest.raises(RoundRefused, match="does not split U2"):
            client.unmask(UnmaskRequest(request.round, survivors, dropped))
    with pytest.raises(SecaggMessageError) as err:  # a site in both lists is refused by the parser
        UnmaskRequest(request.round, (1, 2, 3, 4), (4, 5)).to_payload()
    assert err.value.reason == Refusal.DUPLICATE
    client.unmask(request)
    with pytest.raises(SecaggError, match="answers once"):
        client.unmask(request)


def test_aggregator_refuses_repeats_strangers_and_other_rounds() -> None:
    rnd = Round(4, 10, threshold=3)
    keys = rnd.clients[1].advertise()
    rnd.server.receive_keys(keys)
    for bad, reason in ((keys, Refusal.DUPLICATE), (AdvertiseKeys(9, keys.keys), Refusal.STALE_ROUND),
                        (AdvertiseKeys(1, KeyEntry(2, keys.keys.c_public, bytes(32))), Refusal.DUPLICATE)):
        with pytest.raises(RoundRefused) as err:
            rnd.server.receive_keys(bad)
        assert err.value.reason == reason
    for c in list(rnd.clients.values())[1:]:
        rnd.server.receive_keys(c.advertise())
    roster = rnd.server.roster()
    stranger = SiteClient(7, rnd.params)
    with pytest.raises(RoundRefused) as err:
        rnd.server.receive_shares(Shares(1, 7, ()))
    assert err.value.reason == Refusal.UNKNOWN_SITE
    with pytest.raises(RoundRefused):  # a roster without the site's own keys
        stranger.share_keys(roster)


def test_tampered_or_misrouted_share_ciphertexts_are_refused() -> None:
    rnd = Round(4, 10, threshold=3)
    inboxes = rnd.setup()
    inbox = inboxes[2]
    sender, sealed = inbox.entries[0]
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(RoundRefused) as err:
        rnd.clients[2].mask(Shares(1, 2, ((sender, flipped),) + inbox.entries[1:]), np.zeros(10))
    assert err.value.reason == Refusal.BAD_SIGNATURE
    with pytest.raises(RoundRefused) as err:  # site 3's ciphertexts delivered to site 2
        rnd.clients[2].mask(Shares(1, 2, inboxes[3].entries), np.zeros(10))
    assert err.value.reason in (Refusal.BAD_SIGNATURE, Refusal.BAD_ID)


# --- masked vectors look uniform -------------------------------------------------------


def _chi2_pvalue(words: np.ndarray) -> float:
    counts = np.bincount(np.frombuffer(words.tobytes(), dtype=np.uint8), minlength=256)
    top = np.bincount((words >> 24).astype(np.int64), minlength=256)  # the high byte of each word
    return min(stats.chisquare(counts).pvalue, stats.chisquare(top).pvalue)


def test_prg_with_a_fixed_seed_is_uniform() -> None:
    words = prg(bytes(range(32)), 50_000, 32)
    assert _chi2_pvalue(words) > 1e-3
    np.testing.assert_array_equal(words, prg(bytes(range(32)), 50_000, 32))  # deterministic


def test_masked_vector_of_a_constant_input_is_uniform_and_differs_across_rounds() -> None:
    dim = 20_000
    vectors = []
    for round_ in (1, 2):
        rnd = Round(3, dim, round_=round_, threshold=2)
        inboxes = rnd.setup()
        constant = np.full(dim, 0.25)
        vectors.append(rnd.clients[1].mask(inboxes[1], constant).vector)
    for v in vectors:
        assert _chi2_pvalue(v[:-1]) > 1e-6
    assert np.mean(vectors[0] == vectors[1]) < 0.001


# --- Shamir ----------------------------------------------------------------------------


def test_shamir_recovers_from_any_t_shares() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    assert shamir.combine({x: shares[x] for x in (5, 1, 2, 4)}, 3) == secret
    top = b"\xff" * 32  # the largest 32-byte secret is a field element too
    assert shamir.combine(shamir.split(top, 2, [1, 9]), 2) == top


def test_shamir_t_minus_1_shares_are_consistent_with_every_secret() -> None:
    t, xs = 4, list(range(1, 8))
    shares = shamir.split(b"\x01" * 32, t, xs)
    known = {x: shares[x] for x in xs[:t - 1]}
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.combine(known, t)
    for candidate in (bytes(32), b"\x42" * 32, b"\xff" * 32):
        # a polynomial of degree t-1 through the t-1 known shares and (0, candidate) exists,
        # so the known shares plus completions at the other points reveal `candidate`
        points = {0: int.from_bytes(candidate, "big"), **known}
        completed = {**known, **{x: shamir.interpolate(points, at=x) for x in xs[t - 1:]}}
        assert shamir.combine(dict(list(completed.items())[-t:]), t) == candidate


def test_shamir_refuses_bad_input() -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), 3, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), 2, [0, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)


# --- quantiser -------------------------------------------------------------------------


def test_quantiser_clips_rounds_and_refuses_overflowing_settings() -> None:
    q = Quantizer(bits=32, scale=4.0, clip=2.0)
    words = q.encode(np.array([-5.0, -0.3, 0.0, 0.4, 7.0]), weight=3)
    total, weight = q.decode(words)
    np.testing.assert_array_equal(total, [-6.0, -0.75, 0.0, 1.5, 6.0])
    assert weight == 3
    Quantizer().check_headroom(100, 300)
    with pytest.raises(QuantError, match="does not fit"):
        Quantizer().check_headroom(100, 400)
    Quantizer(bits=64).check_headroom(1000, 10**6)
    with pytest.raises(QuantError):
        q.encode(np.array([np.nan]))
    with pytest.raises(QuantError):
        Quantizer(bits=16)


# --- hostile payloads ------------------------------------------------------------------


def _samples() -> list:  # noqa: ANN202
    entry = KeyEntry(3, b"\x01" * 32, b"\x02" * 32)
    return [
        AdvertiseKeys(5, entry),
        Roster(5, 2, (entry, KeyEntry(4, b"\x03" * 32, b"\x04" * 32)), 1),
        Shares(5, 3, ((1, b"\x05" * SHARE_CIPHERTEXT), (2, b"\x06" * SHARE_CIPHERTEXT))),
        MaskedInput(5, 3, np.arange(10, dtype=np.uint32)),
        UnmaskRequest(5, (1, 2, 3), (4,)),
        UnmaskReply(5, 3, ((1, b"\x07" * 33),), ((4, b"\x08" * 33),)),
    ]


def _same(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, MaskedInput):
        return (a.round, a.site) == (b.round, b.site) and np.array_equal(a.vector, b.vector) and a.vector.dtype == b.vector.dtype
    return a == b


@pytest.mark.parametrize("msg", _samples(), ids=lambda m: m.KIND)
def test_truncated_extended_and_foreign_payloads_are_refused_with_a_reason(msg) -> None:  # noqa: ANN001
    cls, payload = type(msg), msg.to_payload()
    assert _same(cls.from_payload(payload), msg)
    cases = {
        Refusal.TRUNCATED: payload[:-1],
        Refusal.SIZE_MISMATCH: payload + b"\x00",  # too_large where the size is fixed
        Refusal.BAD_MAGIC: b"XXXX" + payload[4:],
        Refusal.UNKNOWN_VERSION: payload[:4] + b"\x09" + payload[5:],
        Refusal.BAD_KIND: payload[:5] + bytes([payload[5] % 6 + 1]) + payload[6:],
    }
    for reason, bad in cases.items():
        with pytest.raises(SecaggMessageError) as err:
            cls.from_payload(bad)
        assert err.value.reason in ({reason, Refusal.TOO_LARGE} if reason == Refusal.SIZE_MISMATCH else {reason}), str(err.value)
    with pytest.raises(SecaggMessageError) as err:
        cls.from_payload(payload + bytes(10_000_000))
    assert err.value.reason == Refusal.TOO_LARGE


def test_out_of_range_fields_are_refused() -> None:
    for bad in (UnmaskRequest(1, (0, 2), ()), UnmaskRequest(1, (MAX_SITES + 1,), ()), Shares(1, 3, ((3, bytes(SHARE_CIPHERTEXT)),)),
                Roster(1, 3, (KeyEntry(1, b"\x01" * 32, b"\x02" * 32),)), KeyEntry(1, b"\x01" * 32, b"\x01" * 32)):
        with pytest.raises(SecaggMessageError):
            bad.to_payload() if not isinstance(bad, KeyEntry) else bad.pack("entry")
    payload = bytearray(MaskedInput(1, 3, np.zeros(4, dtype=np.uint32)).to_payload())
    payload[16] = 16  # 16-bit words
    with pytest.raises(SecaggMessageError) as err:
        MaskedInput.from_payload(bytes(payload))
    assert err.value.reason == Refusal.OUT_OF_RANGE


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(KINDS)), st.binary(max_size=400))
def test_parsers_only_ever_refuse_with_a_reason(kind: str, junk: bytes) -> None:
    cls = KINDS[kind]
    header = struct.pack(">4sBBQ", b"TFSA", 1, cls.CODE, 1)
    for payload in (junk, header + junk):
        try:
            msg = cls.from_payload(payload)
        except SecaggMessageError as exc:
            assert isinstance(exc.reason, Refusal)
        else:
            assert _same(cls.from_payload(msg.to_payload()), msg)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(range(6)), st.integers(0, 10_000), st.integers(0, 255), st.booleans())
def test_mutated_payloads_parse_or_are_refused(which: int, where: int, value: int, cut: bool) -> None:
    msg = _samples()[which]
    payload = bytearray(msg.to_payload())
    where %= len(payload)
    mutated = bytes(payload[:where]) if cut else bytes(payload[:where]) + bytes([value]) + bytes(payload[where + 1:])
    try:
        type(msg).from_payload(mutated)
    except SecaggMessageError as exc:
        assert isinstance(exc.reason, Refusal)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, MAX_SITES), unique=True, max_size=40), st.integers(0, 40), st.integers(0, 2**63 - 1))
def test_unmask_request_round_trips(ids: list[int], split: int, round_: int) -> None:
    msg = UnmaskRequest(round_, tuple(ids[:split]), tuple(ids[split:]))
    assert UnmaskRequest.from_payload(msg.to_payload()) == msg


# --- signed frames ---------------------------------------------------------------------


def test_signed_frames_open_only_for_their_fleet_signer_and_bytes() -> None:
    key = SigningKey("site-a", ed25519.Ed25519PrivateKey.generate())
    sealer, verifier = Sealer("fleet1", key), Verifier("fleet1", TrustedKeys({"site-a": key.key.public_key()}))
    msg = UnmaskRequest(7, (1, 2), (3,))
    frame = seal_frame(sealer, msg.KIND, msg.to_payload())
    assert open_frame(verifier, msg.KIND, frame, signer="site-a") == msg
    flipped = bytearray(frame)
    flipped[-1] ^= 1
    cases = [(bytes(flipped), "site-a", msg.KIND, Refusal.BAD_SIGNATURE), (frame, "site-b", msg.KIND, Refusal.WRONG_SENDER),
             (frame, "site-a", "secagg_unmask", Refusal.BAD_SIGNATURE), (msg.to_payload(), "site-a", msg.KIND, Refusal.UNSIGNED),
             (seal_frame(Sealer("fleet2", key), msg.KIND, msg.to_payload()), "site-a", msg.KIND, Refusal.WRONG_FLEET)]
    for payload, signer, kind, reason in cases:
        with pytest.raises((SignatureError, SecaggMessageError)) as err:
            open_frame(verifier, kind, payload, signer=signer)
        assert err.value.reason == reason
    with pytest.raises(SecaggMessageError) as err:
        open_frame(verifier, msg.KIND, frame[:70], signer="site-a")
    assert err.value.reason == Refusal.TRUNCATED


def test_the_full_round_through_signed_frames() -> None:
    """Every message of a round survives seal -> open (what the MQTT wiring will do)."""
    n, dim = 4, 8
    rnd = Round(n, dim, threshold=3)
    keys = {i: SigningKey(f"site-{i}", ed25519.Ed25519PrivateKey.generate()) for i in rnd.clients}
    verifier = Verifier("f", TrustedKeys({k.name: k.key.public_key() for k in keys.values()}))

    def through(i: int, msg):  # noqa: ANN001, ANN202
        return open_frame(verifier, msg.KIND, seal_frame(Sealer("f", keys[i]), msg.KIND, msg.to_payload()), signer=keys[i].name)

    for i, c in rnd.clients.items():
        rnd.server.receive_keys(through(i, c.advertise()))
    roster = rnd.server.roster()
    for i, c in rnd.clients.items():
        rnd.server.receive_shares(through(i, c.share_keys(Roster.from_payload(roster.to_payload()))))
    inboxes = rnd.server.inboxes()
    inputs = _inputs(n, dim, 5)
    for i, c in rnd.clients.items():
        rnd.server.receive_masked(through(i, c.mask(Shares.from_payload(inboxes[i].to_payload()), inputs[i])))
    request = UnmaskRequest.from_payload(rnd.server.unmask_request().to_payload())
    for i in random.sample(list(request.survivors), 3):
        rnd.server.receive_unmask(through(i, rnd.clients[i].unmask(request)))
    np.testing.assert_array_equal(rnd.server.result().weighted_sum, _quantised_sum(rnd.params.quantizer, inputs, inputs))
