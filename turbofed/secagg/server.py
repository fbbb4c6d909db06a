"""The aggregator's side of a secure-aggregation round (Bonawitz et al. 2017, §5, Figure 4).

    server = AggregatorState(params)
    server.receive_keys(msg) ...; roster = server.roster()          # end of round 0
    server.receive_shares(msg) ...; inboxes = server.inboxes()      # end of round 1
    server.receive_masked(msg) ...; request = server.unmask_request()  # end of round 2
    server.receive_unmask(msg) ...; result = server.result()        # round 4

Each `receive_*` refuses (RoundRefused, with a Refusal) a message from a site outside the
set of the previous round, a repeat, or a message for another round; each phase end raises
NotEnoughShares when fewer than t sites are left. `result` reconstructs b_u of every
survivor and s_v^SK of every dropped site from t shares, checks each s_v^SK against the
public key s_v^PK the site advertised, removes the masks and returns the exact ring sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from turbofed.refusals import Refusal
from turbofed.secagg import crypto, shamir
from turbofed.secagg.errors import NotEnoughShares, SecaggError, refuse
from turbofed.secagg.masking import pairwise_mask, self_mask
from turbofed.secagg.messages import AdvertiseKeys, KeyEntry, MaskedInput, Roster, Shares, UnmaskReply, UnmaskRequest
from turbofed.secagg.neighbours import roster_graph
from turbofed.secagg.params import Params


@dataclass(frozen=True)
class Result:
    """The unmasked sum: Σ w·x over the survivors, Σ w, and who is in it."""

    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean Σ w·x / Σ w."""
        return self.weighted_sum / self.total_weight


class AggregatorState:
    """The aggregator's state through one round; it never sees an unmasked input."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.keys: dict[int, KeyEntry] = {}  # U1
        self.shares: dict[int, Shares] = {}  # U2
        self.masked: dict[int, np.ndarray] = {}  # U3
        self.replies: dict[int, UnmaskReply] = {}  # U5
        self._phase = 0
        self._request: UnmaskRequest | None = None
        self._weights: dict[tuple[int, ...], dict[int, int]] = {}  # Lagrange weights per set of responders
        self.graph: dict[int, frozenset[int]] = {}  # each site's neighbours (SecAgg+), or the rest of U1

    def _accept(self, msg: AdvertiseKeys | Shares | MaskedInput | UnmaskReply, phase: int, site: int,
                seen: dict, allowed: object) -> None:
        if msg.round != self.params.round:
            raise refuse(f"{msg.KIND} for round {msg.round}, this is round {self.params.round}", Refusal.STALE_ROUND)
        if self._phase != phase:
            raise refuse(f"{msg.KIND} from site {site} arrived after its phase closed", Refusal.STALE_ROUND)
        if allowed is not None and site not in allowed:
            raise refuse(f"{msg.KIND} from site {site}, which is not in this phase's set", Refusal.UNKNOWN_SITE)
        if site in seen:
            raise refuse(f"{msg.KIND}: site {site} already sent one", Refusal.DUPLICATE)

    def _close(self, have: int, what: str) -> None:
        if have < self.params.threshold:
            raise NotEnoughShares(f"{have} {what}, fewer than t = {self.params.threshold}: the round aborts")
        self._phase += 1

    def receive_keys(self, msg: AdvertiseKeys) -> None:
        """Round 0: collect c_u^PK, s_u^PK (U1)."""
        self._accept(msg, 0, msg.keys.site, self.keys, None)
        used = {k for e in self.keys.values() for k in (e.c_public, e.s_public)}
        if msg.keys.c_public in used or msg.keys.s_public in used:
            raise refuse(f"site {msg.keys.site} advertises another site's key", Refusal.DUPLICATE)
        self.keys[msg.keys.site] = msg.keys

    def roster(self) -> Roster:
        """End of round 0: broadcast U1's keys (needs |U1| ≥ t)."""
        self._close(len(self.keys), "sites advertised keys")
        roster = Roster(self.params.round, self.params.threshold, tuple(self.keys[s] for s in sorted(self.keys)), self.params.neighbours)
        self.graph = roster_graph(roster)
        return roster

    def receive_shares(self, msg: Shares) -> None:
        """Round 1: one ciphertext from u to each of its neighbours (every other site of U1
        without SecAgg+), opaque to the aggregator (U2)."""
        self._accept(msg, 1, msg.site, self.shares, self.keys)
        if {peer for peer, _ in msg.entries} != self.graph[msg.site]:
            raise refuse(f"shares from site {msg.site} are not addressed to exactly its neighbours", Refusal.WRONG_FIELDS)
        self.shares[msg.site] = msg

    def inboxes(self) -> dict[int, Shares]:
        """End of round 1: per v in U2, the ciphertexts addressed to v by the other sites of U2 (needs |U2| ≥ t)."""
        self._close(len(self.shares), "sites sent shares")
        inbox: dict[int, list[tuple[int, bytes]]] = {v: [] for v in self.shares}
        for u in sorted(self.shares):
            for v, sealed in self.shares[u].entries:
                if v in inbox:
                    inbox[v].append((u, sealed))
        return {v: Shares(self.params.round, v, tuple(entries)) for v, entries in inbox.items()}

    def receive_masked(self, msg: MaskedInput) -> None:
        """Round 2: y_u from u in U2 (U3)."""
        self._accept(msg, 2, msg.site, self.masked, self.shares)
        q = self.params.quantizer
        if msg.vector.size != self.params.length or msg.vector.dtype.itemsize * 8 != q.bits:
            raise refuse(f"masked input from site {msg.site}: {msg.vector.size} words of {msg.vector.dtype.itemsize * 8} bits, "
                         f"expected {self.params.length} of {q.bits}", Refusal.MISMATCH)
        self.masked[msg.site] = msg.vector.astype(q.dtype)

    def unmask_request(self) -> UnmaskRequest:
        """End of round 2: ask U3 for b-shares of U3 and s-shares of U2 \\ U3 (needs |U3| ≥ t)."""
        self._close(len(self.masked), "masked inputs")
        dropped = tuple(sorted(set(self.shares) - set(self.masked)))
        self._request = UnmaskRequest(self.params.round, tuple(sorted(self.masked)), dropped)
        return self._request

    def receive_unmask(self, msg: UnmaskReply) -> None:
        """Round 4: one site's b-shares of every survivor and s-shares of every dropped site (U5)."""
        self._accept(msg, 3, msg.site, self.replies, self.masked)
        assert self._request is not None
        group = self.graph[msg.site] | {msg.site}
        if (tuple(v for v, _ in msg.b_shares) != tuple(v for v in self._request.survivors if v in group)
                or tuple(v for v, _ in msg.s_shares) != tuple(v for v in self._request.dropped if v in group)):
            raise refuse(f"unmask reply from site {msg.site} does not answer the request", Refusal.WRONG_FIELDS)
        self.replies[msg.site] = msg

    def _secret(self, field: str, owner: int) -> bytes:
        """Reconstruct owner's b (field 'b_shares') or s^SK ('s_shares') from t replies of its neighbourhood."""
        t = self.params.threshold
        responders = tuple(sorted(site for site in self.replies if site == owner or site in self.graph[owner])[:t])
        if len(responders) < t:
            raise NotEnoughShares(f"{len(responders)} shares of site {owner}'s secret arrived, fewer than t = {t}: refusing to unmask")
        if responders not in self._weights:
            self._weights[responders] = shamir.lagrange_weights(responders)
        weights = self._weights[responders]
        shares = {site: shamir.share_from_bytes(dict(getattr(self.replies[site], field))[owner]) for site in responders}
        try:
            return shamir.combine(shares, t, weights)
        except shamir.ShamirError as exc:
            raise SecaggError(f"cannot reconstruct site {owner}'s secret: {exc}") from None

    def result(self) -> Result:
        """Round 4 end: z = Σ_{U3} y_u − Σ_{U3} PRG(b_u) + Σ_{v dropped} (v's pairwise mask), dequantised."""
        if self._phase != 3 or self._request is None:
            raise SecaggError("result needs the unmask request first")
        if len(self.replies) < self.params.threshold:
            raise NotEnoughShares(f"unmask replies from {len(self.replies)} sites, fewer than t = {self.params.threshold}: "
                                  "refusing to unmask")
        q, length, survivors, dropped = self.params.quantizer, self.params.length, self._request.survivors, self._request.dropped
        total = np.zeros(length, dtype=q.dtype)
        for u in survivors:
            total += self.masked[u]
            total -= self_mask(self._secret("b_shares", u), length=length, bits=q.bits)
        for v in dropped:
            peers = {u: self.keys[u].s_public for u in survivors if u in self.graph[v]}
            s_private = crypto.private_from_bytes(self._secret("s_shares", v))
            if crypto.public_bytes(s_private) != self.keys[v].s_public:
                raise SecaggError(f"the s-shares of dropped site {v} do not match its advertised key (a bad share)")
            total += pairwise_mask(v, s_private, peers, length=length, bits=q.bits, round_=self.params.round)
        self._phase += 1
        weighted, weight = q.decode(total)
        return Result(weighted, weight, survivors, dropped)
