"""One site's side of a secure-aggregation round (Bonawitz et al. 2017, §5, the semi-honest
protocol of Figure 4 with the keys signed through the fleet's Ed25519 messages).

    client = SiteClient(site_id, params)
    keys = client.advertise()                 # round 0 -> secagg_keys
    shares = client.share_keys(roster)        # round 1 -> secagg_shares
    masked = client.mask(inbox, delta, w)     # round 2 -> secagg_masked
    reply = client.unmask(request)            # round 4 -> secagg_unmask

A client keeps its private keys and b_u in memory only and refuses any step out of order.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from turbofed.refusals import Refusal
from turbofed.secagg import crypto, shamir
from turbofed.secagg.errors import NotEnoughShares, SecaggError, refuse
from turbofed.secagg.masking import pairwise_mask, self_mask
from turbofed.secagg.messages import (
    SHARE_PLAINTEXT,
    AdvertiseKeys,
    KeyEntry,
    MaskedInput,
    Roster,
    Shares,
    UnmaskReply,
    UnmaskRequest,
)
from turbofed.secagg.neighbours import roster_graph
from turbofed.secagg.params import Params


def pack_shares(sender: int, receiver: int, s_share: int, b_share: int) -> bytes:
    """The plaintext of one encrypted share: u || v || share of s_u^SK || share of b_u (§5 round 1)."""
    return struct.pack(">HH", sender, receiver) + shamir.share_to_bytes(s_share) + shamir.share_to_bytes(b_share)


class SiteClient:
    """The state of one site through one round."""

    def __init__(self, site: int, params: Params) -> None:
        self.site, self.params = site, params
        self.c_key, self.s_key = crypto.new_private(), crypto.new_private()
        self.roster: dict[int, KeyEntry] = {}
        self.group: frozenset[int] = frozenset()  # this site and its neighbours (SecAgg+), or all of U1
        self.held: dict[int, tuple[int, int]] = {}  # v -> (share of s_v^SK, share of b_v) this site holds
        self.u2: frozenset[int] = frozenset()
        self._b: bytes | None = None
        self._answered = False
        self._pair_keys: dict[int, bytes] = {}

    def _pair_key(self, peer: int) -> bytes:
        """The AE key shared with `peer`: HKDF(KA(c_u, c_v^PK)), derived once per round."""
        if peer not in self._pair_keys:
            self._pair_keys[peer] = crypto.agree(self.c_key, self.roster[peer].c_public, label=crypto.ENCRYPT_LABEL,
                                                 round_=self.params.round)
        return self._pair_keys[peer]

    def _check_round(self, msg: object, what: str) -> None:
        if getattr(msg, "round", None) != self.params.round:
            raise refuse(f"{what} is for round {getattr(msg, 'round', None)}, this is round {self.params.round}",
                         Refusal.STALE_ROUND)

    def advertise(self) -> AdvertiseKeys:
        """Round 0 (AdvertiseKeys): the site's two fresh public keys c_u^PK and s_u^PK."""
        return AdvertiseKeys(self.params.round, KeyEntry(self.site, crypto.public_bytes(self.c_key),
                                                           crypto.public_bytes(self.s_key)))

    def share_keys(self, roster: Roster) -> Shares:
        """Round 1 (ShareKeys): Shamir-share s_u^SK and a fresh b_u t-of-|U1|, and encrypt each
        peer's pair of shares under KA(c_u, c_v) with (round, u, v) as associated data."""
        self._check_round(roster, "roster")
        if self.roster:
            raise SecaggError("share_keys called twice")
        entries = {e.site: e for e in roster.entries}
        own = entries.get(self.site)
        if own is None or own != self.advertise().keys:
            raise refuse(f"roster does not carry site {self.site}'s own keys", Refusal.WRONG_FIELDS)
        if (roster.threshold, roster.neighbours) != (self.params.threshold, self.params.neighbours):
            raise refuse(f"roster has t = {roster.threshold}, k = {roster.neighbours}; this site's round has "
                         f"t = {self.params.threshold}, k = {self.params.neighbours}", Refusal.OUT_OF_RANGE)
        self.group = roster_graph(roster)[self.site] | {self.site}
        if len(self.group) < self.params.threshold:
            raise NotEnoughShares(f"{len(self.group)} sites to share with, fewer than t = {self.params.threshold}")
        self.roster = entries
        self._b = os.urandom(shamir.SECRET_BYTES)
        s_shares = shamir.split(crypto.private_bytes(self.s_key), self.params.threshold, sorted(self.group))
        b_shares = shamir.split(self._b, self.params.threshold, sorted(self.group))
        self.held[self.site] = (s_shares[self.site], b_shares[self.site])
        out = []
        for v in sorted(self.group):
            if v == self.site:
                continue
            key = self._pair_key(v)
            plaintext = pack_shares(self.site, v, s_shares[v], b_shares[v])
            out.append((v, crypto.seal(key, plaintext, crypto.associated_data(self.params.round, self.site, v))))
        return Shares(self.params.round, self.site, tuple(out))

    def _receive(self, inbox: Shares) -> None:
        """Decrypt the shares addressed to this site; U2 is their senders and this site."""
        if inbox.site != self.site:
            raise refuse(f"shares addressed to site {inbox.site}, not {self.site}", Refusal.WRONG_SENDER)
        for sender, sealed in inbox.entries:
            if sender not in self.group:
                raise refuse(f"shares from site {sender}, not a neighbour in the roster", Refusal.UNKNOWN_SITE)
            key = self._pair_key(sender)
            try:
                plain = crypto.open_sealed(key, sealed, crypto.associated_data(self.params.round, sender, self.site))
            except crypto.DecryptError as exc:
                raise refuse(f"shares from site {sender}: {exc}", Refusal.BAD_SIGNATURE) from None
            if len(plain) != SHARE_PLAINTEXT or struct.unpack(">HH", plain[:4]) != (sender, self.site):
                raise refuse(f"shares from site {sender} name another pair", Refusal.WRONG_SENDER)
            try:
                pair = (shamir.share_from_bytes(plain[4:4 + shamir.SHARE_BYTES]), shamir.share_from_bytes(plain[4 + shamir.SHARE_BYTES:]))
            except shamir.ShamirError as exc:
                raise refuse(f"shares from site {sender}: {exc}", Refusal.OUT_OF_RANGE) from None
            self.held[sender] = pair
        self.u2 = frozenset(self.held)

    def mask(self, inbox: Shares, values: np.ndarray, weight: int = 1) -> MaskedInput:
        """Round 2 (MaskedInputCollection): y_u = x_u + PRG(b_u) + Σ±PRG(s_{u,v}) over v in U2."""
        self._check_round(inbox, "shares")
        if self._b is None or self.u2:
            raise SecaggError("mask needs share_keys first, and runs once")
        if weight > self.params.max_weight:
            raise SecaggError(f"weight {weight} is above max_weight {self.params.max_weight}")
        self._receive(inbox)
        if len(self.u2) < self.params.threshold:
            raise NotEnoughShares(f"shares from {len(self.u2)} sites (this one included), fewer than t = {self.params.threshold}")
        x = self.params.quantizer.encode(values, weight)
        if x.size != self.params.length:
            raise SecaggError(f"input has {x.size - 1} values, the round's dim is {self.params.dim}")
        bits, length = self.params.quantizer.bits, self.params.length
        peers = {v: self.roster[v].s_public for v in self.u2}
        y = x + self_mask(self._b, length=length, bits=bits) + pairwise_mask(
            self.site, self.s_key, peers, length=length, bits=bits, round_=self.params.round)
        return MaskedInput(self.params.round, self.site, y)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Round 4 (Unmasking): shares of b_v for each survivor v and of s_v^SK for each dropped v
        among the sites it holds shares of (its U2: all of U2, or its SecAgg+ neighbours in U2).
        Refused unless the request splits its U2 into survivors (itself among them, at least t)
        and dropped sites; answered only once: a site never reveals both shares of one peer
        (that would unmask its input)."""
        self._check_round(request, "unmask request")
        if not self.u2 or self._answered:
            raise SecaggError("unmask needs mask first, and answers once")
        if not set(request.survivors + request.dropped) <= set(self.roster):
            raise refuse("unmask request names sites outside the roster: it does not split U2", Refusal.UNKNOWN_SITE)
        survivors, dropped = frozenset(request.survivors) & self.group, frozenset(request.dropped) & self.group
        if self.site not in survivors or survivors | dropped != self.u2:
            raise refuse("unmask request does not split U2 into survivors and dropped sites", Refusal.WRONG_FIELDS)
        if len(survivors) < self.params.threshold:
            raise NotEnoughShares(f"{len(survivors)} survivors, fewer than t = {self.params.threshold}")
        self._answered = True
        b = tuple((v, shamir.share_to_bytes(self.held[v][1])) for v in sorted(survivors))
        s = tuple((v, shamir.share_to_bytes(self.held[v][0])) for v in sorted(dropped))
        return UnmaskReply(self.params.round, self.site, b, s)
