"""A site's part in secure-aggregation sessions (Bonawitz et al., CCS 2017; the library is
turbofed/secagg, the aggregator's side aggregator/secure.py, docs/privacy.md).

A session starts when a signed round announcement or statistics request carries a
`SecureSum` naming this site: the site fixes its vector (its delta, or its statistics) and
weight, advertises fresh keys, then answers the aggregator's roster, its inbox of encrypted
shares and the unmask request, each once and in order (`SiteClient` refuses anything else).
Private keys and the self-mask seed live in memory only: an agent that restarts mid-session
has dropped out, which the protocol survives. Frames go straight to the broker, not through
the outbox: they are worthless once their phase has closed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from turbofed.messages import MessageError
from turbofed.messages.secure import SecureSum
from turbofed.messages.signed import AGGREGATOR
from turbofed.refusals import Refusal
from turbofed.secagg.client import SiteClient
from turbofed.secagg.errors import SecaggError
from turbofed.secagg.wire import open_frame, seal_frame

MAX_SESSIONS = 4  # sessions a site keeps at once (a round's and a statistics request's, and stragglers)
ANSWERS = {"secagg_roster": "secagg_shares", "secagg_shares": "secagg_masked", "secagg_unmask_request": "secagg_unmask"}


@dataclass
class Session:
    """One session: what this site adds, and what to check before it unmasks."""

    spec: SecureSum
    client: SiteClient
    vector: np.ndarray
    weight: int
    purpose: str  # "round 3", "statistics"
    before_unmask: Callable[[tuple[int, ...]], None] | None = None  # may refuse (raises Refused)
    after_unmask: Callable[[tuple[int, ...]], None] | None = None


class SecureSessions:
    """The sessions a site is in, by session id (bounded: the oldest is forgotten)."""

    def __init__(self, site: str, sealer: Any, verifier: Any, send: Callable[[str, bytes], None]) -> None:
        self.site, self.sealer, self.verifier, self.send = site, sealer, verifier, send
        self.sessions: OrderedDict[int, Session] = OrderedDict()
        self.not_ours = 0  # signed frames of sessions this site is not in (it skipped, or restarted)

    def join(self, spec: SecureSum, vector: np.ndarray, weight: int, purpose: str, *,
             before_unmask: Callable[[tuple[int, ...]], None] | None = None,
             after_unmask: Callable[[tuple[int, ...]], None] | None = None) -> None:
        """Fix this site's input and advertise its keys (phase 0)."""
        if not self.sealer.signed:
            raise MessageError(f"{purpose}: secure aggregation needs this site's signing key (identity)", Refusal.UNSIGNED)
        number = spec.id_of(self.site)
        if number is None:
            raise MessageError(f"{purpose}: the secure sum gives site {self.site} no id", Refusal.BAD_ROUND)
        vector = np.asarray(vector, dtype=np.float64).ravel()
        if vector.size != spec.dim:
            raise MessageError(f"{purpose}: the secure sum is over {spec.dim} values, this site has {vector.size}", Refusal.MISMATCH)
        session = Session(spec, SiteClient(number, spec.params()), vector, weight, purpose, before_unmask, after_unmask)
        self.sessions[spec.session] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        self._send("secagg_keys", session.client.advertise())

    def on_frame(self, kind: str, payload: bytes) -> None:
        """A roster, inbox or unmask request from the aggregator: checked, then answered."""
        msg = open_frame(self.verifier, kind, payload, signer=AGGREGATOR)
        session = self.sessions.get(msg.round)
        if session is None:
            self.not_ours += 1
            return
        try:
            if kind == "secagg_roster":
                reply = session.client.share_keys(msg)
            elif kind == "secagg_shares":
                reply = session.client.mask(msg, session.vector, session.weight)
                session.vector = np.zeros(0)  # not needed again
            else:
                if session.before_unmask is not None:
                    session.before_unmask(msg.survivors)
                reply = session.client.unmask(msg)
                del self.sessions[msg.round]
        except SecaggError as exc:
            raise MessageError(f"{session.purpose}: {kind}: {exc}", getattr(exc, "reason", Refusal.WRONG_FIELDS)) from None
        self._send(ANSWERS[kind], reply)
        if kind == "secagg_unmask_request" and session.after_unmask is not None:
            session.after_unmask(msg.survivors)

    def _send(self, kind: str, msg: Any) -> None:
        self.send(kind, seal_frame(self.sealer, kind, msg.to_payload()))
