"""Secure aggregation at the aggregator: one session of the protocol of Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), run over
MQTT with the library in turbofed/secagg (docs/privacy.md, docs/protocol.md).

A session is announced with its `SecureSum` (inside the signed round announcement or
statistics request). Then:

    phase 0 keys    sites -> sites/<site>/secagg_keys      closed by the caller (quorum, all answered, deadline)
    phase 1 shares  roster -> secagg/roster;  sites -> sites/<site>/secagg_shares
    phase 2 masked  inboxes -> secagg/<site>/shares;  sites -> sites/<site>/secagg_masked
    phase 3 unmask  request -> secagg/unmask;  sites -> sites/<site>/secagg_unmask

Phases 1-3 close as soon as every site still in has answered, or once `phase_timeout_s`
has passed since the phase opened or since its latest answer (a large fleet answering
steadily is not cut short; a site that has dropped out costs one timeout); a phase left
with fewer than t sites aborts the session (`SecaggError`), and nothing is unmasked. Every frame is an Ed25519-signed secagg frame (turbofed/secagg/wire.py): a site's
is checked against the topic's site, and the site id inside it must be the one the session
gave that site.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from turbofed.aggregator.rounds import Rejected
from turbofed.messages.secure import SecureSum
from turbofed.messages.signed import Sealer, Verifier
from turbofed.refusals import Refusal
from turbofed.secagg.server import AggregatorState, Result
from turbofed.secagg.wire import open_frame, seal_frame
from turbofed.topics import Topics

PHASES = ("keys", "shares", "masked", "unmask")
SITE_KINDS = {"secagg_keys": 0, "secagg_shares": 1, "secagg_masked": 2, "secagg_unmask": 3}  # kind -> its phase


class SecureCollection:
    """The aggregator's side of one session: it never holds an unmasked input."""

    def __init__(self, spec: SecureSum, phase_timeout_s: float, sealer: Sealer, verifier: Verifier, topics: Topics,
                 publish: Callable[[str, bytes], object]) -> None:
        self.spec, self.phase_timeout_s = spec, phase_timeout_s
        self.sealer, self.verifier, self.topics, self.publish = sealer, verifier, topics, publish
        self.state = AggregatorState(spec.params())
        self.names = {number: site for site, number in spec.ids}
        self.phase = 0
        self.deadline = float("inf")  # of phases 1-3
        self.bytes: Counter[str] = Counter()  # frame bytes each site sent and was sent

    @property
    def phase_name(self) -> str:
        return PHASES[min(self.phase, 3)]

    def keyed(self) -> set[str]:
        """Sites that advertised keys (phase 0): who has something to add."""
        return {self.names[n] for n in self.state.keys}

    def receive(self, site: str, kind: str, payload: bytes) -> None:
        """One site frame; raises Rejected or another Refused (counted by the caller)."""
        number = self.spec.id_of(site)
        if number is None:
            raise Rejected(Refusal.UNKNOWN_SITE, f"{kind} from {site}: not asked to take part in secure sum {self.spec.session}")
        msg = open_frame(self.verifier, kind, payload, signer=site)
        named = msg.keys.site if kind == "secagg_keys" else msg.site
        if named != number:
            raise Rejected(Refusal.WRONG_SENDER, f"{kind} from {site} names site id {named}, the session gave {site} id {number}")
        receive = (self.state.receive_keys, self.state.receive_shares, self.state.receive_masked, self.state.receive_unmask)
        receive[SITE_KINDS[kind]](msg)
        self.bytes[site] += len(payload)
        if self.phase:  # a phase that is still hearing from sites is not over: wait from the last answer
            self.deadline = time.monotonic() + self.phase_timeout_s

    def _done(self) -> bool:
        """Has every site still in answered the open phase (1-3)?"""
        s = self.state
        return {1: len(s.shares) == len(s.keys), 2: len(s.masked) == len(s.shares), 3: len(s.replies) == len(s.masked)}[self.phase]

    def advance(self, close_keys: bool) -> Result | None:
        """Close the open phase if it is complete (phase 0: when `close_keys`) or its time is
        up, and start the next; the sum once phase 3 closes. Raises SecaggError
        (NotEnoughShares) when too few sites are left: the session is over."""
        if self.phase == 0:
            if not close_keys:
                return None
            roster = self.state.roster()
            self._send(self.topics.secagg_roster, "secagg_roster", roster.to_payload(), [e.site for e in roster.entries])
        elif not self._done() and time.monotonic() < self.deadline:
            return None
        elif self.phase == 1:
            for number, inbox in self.state.inboxes().items():
                self._send(self.topics.secagg_inbox(self.names[number]), "secagg_shares", inbox.to_payload(), [number])
        elif self.phase == 2:
            request = self.state.unmask_request()
            self._send(self.topics.secagg_unmask, "secagg_unmask_request", request.to_payload(), list(request.survivors))
        else:
            self.phase = 4
            return self.state.result()
        self.phase += 1
        self.deadline = time.monotonic() + self.phase_timeout_s
        return None

    def _send(self, topic: str, kind: str, payload: bytes, to: list[int]) -> None:
        frame = seal_frame(self.sealer, kind, payload)
        for number in to:
            self.bytes[self.names[number]] += len(frame)
        self.publish(topic, frame)

    def participants(self, result: Result) -> list[dict]:
        """The round's record: the sites in the sum, and those that dropped out after sharing
        (their masks were removed with their peers' shares); no site's update is known."""
        rows = [{"site": self.names[n], "samples": 0, "claimed": None, "update_bytes": self.bytes[self.names[n]],
                 "norm": None, "cosine": None, "action": "secure-sum"} for n in result.survivors]
        rows += [{"site": self.names[n], "samples": 0, "claimed": None, "update_bytes": self.bytes[self.names[n]],
                  "norm": None, "cosine": None, "action": "dropped (masks removed)"} for n in result.dropped]
        return rows
