"""One federated round: who may send what, and the checks every update must pass.

Decoding never trusts the sender. An update is refused, with a reason that is logged,
counted and recorded, when its envelope is malformed (see turbofed.envelope), when the
envelope's site is not the topic's site, when it does not carry that site's valid signature
(turbofed.messages.signed), when it is for another round, when the site already sent one
this round, when the site is not in the fleet, or when its ONNX model is not exactly the
current global model's graph with other finite weights in it (see turbofed.codec.check_graph;
the global model is the reference graph of turbofed.graph). Only the weights of an accepted
update are used, never its bytes: nothing refused, and nothing but numbers, ever reaches the
global model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from turbofed import envelope
from turbofed.codec import Weights, load_compatible
from turbofed.errors import Refused, WeightsError
from turbofed.messages.signed import Unsigned, Verifier
from turbofed.refusals import Refusal


class Rejected(Refused):
    """A message the aggregator refuses for protocol state; `reason` is the Refusal it is counted under."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(detail, reason)


@dataclass
class Accepted:
    """An update that passed every check: its weights only (the bytes it came in are not kept)."""

    site: str
    samples: int
    weights: Weights | None  # None once folded into the round's running sums (aggregator/streaming.py)
    wire_bytes: int
    received: float
    staleness: int = 0  # buffered rounds: how many global versions older its starting model is


@dataclass
class Round:
    """What the aggregator collects for one round until quorum or deadline."""

    number: int
    model_version: int  # the global model sites start from
    announce_id: str
    started: float
    deadline: float
    sites: tuple[str, ...]
    accepted: dict[str, Accepted] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    plain: bool = True  # False under secure aggregation: updates travel masked, only 'skip' comes here
    # Called with each accepted update: the aggregator rebases stale ones and, when it streams
    # (Aggregator.streaming; a region always does), folds them into running sums.
    on_accept: Callable[[Accepted], None] | None = field(default=None, compare=False)
    max_staleness: int = 0  # buffered rounds: updates for up to this many earlier rounds are taken
    buffer_size: int = 0  # buffered rounds: close once this many updates are in (0: by quorum)
    # The sites as a set, for O(1) membership per update (a fleet of thousands checks every update).
    members: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.members = frozenset(self.sites)

    def responded(self) -> set[str]:
        return set(self.accepted) | set(self.skipped)

    def check(self, topic_site: str, payload: bytes, reference: onnx.ModelProto, max_bytes: int,
              verifier: Verifier | Unsigned, epoch: int = 0) -> Accepted | None:
        """Validate one update against the global model it started from (`reference`); returns
        it (None for a 'skip' notice) or raises Rejected (or SignatureError, a Refused, for a
        signature that does not check out)."""
        if topic_site not in self.members:
            raise Rejected(Refusal.UNKNOWN_SITE, f"site {topic_site!r} is not in the fleet config")
        try:
            env = envelope.decode(payload, max_bytes=max_bytes)
        except envelope.EnvelopeError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        if env.site != topic_site:
            raise Rejected(Refusal.WRONG_SENDER, f"envelope names site {env.site!r} but arrived on {topic_site!r}'s topic")
        if env.kind not in ("update", "skip"):
            raise Rejected(Refusal.BAD_KIND, f"a site may send 'update' or 'skip', not {env.kind!r}")
        verifier.check_envelope(env, signer=topic_site, epoch=epoch)
        if env.kind == "update" and not self.plain:
            raise Rejected(Refusal.BAD_KIND, f"secure aggregation is on: {topic_site}'s update must travel masked "
                                             "(secagg_masked), not in the clear")
        staleness = self.model_version - env.model_version
        late = env.round < self.number and self.number - env.round <= self.max_staleness and 0 <= staleness <= self.max_staleness
        if env.round != self.number and not late:
            raise Rejected(Refusal.STALE_ROUND, f"update for round {env.round}, the open round is {self.number}"
                                                f"{f' (updates up to {self.max_staleness} rounds late are taken)' if self.max_staleness else ''}")
        if staleness < 0 or (not late and staleness):
            raise Rejected(Refusal.STALE_ROUND, f"update trained from global v{env.model_version}, round {self.number} "
                                                f"started from v{self.model_version}")
        if topic_site in self.accepted or topic_site in self.skipped:
            raise Rejected(Refusal.DUPLICATE, f"site {topic_site!r} already answered round {self.number}")
        if env.kind == "skip":
            self.skipped[topic_site] = env.samples
            return None
        if env.samples < 1:
            raise Rejected(Refusal.NO_SAMPLES, "an update must say how many samples it was trained on")
        try:
            weights = load_compatible(env.body, reference, max_bytes)
        except WeightsError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        accepted = Accepted(topic_site, env.samples, weights, len(payload), time.time(), staleness)
        if self.on_accept is not None:
            self.on_accept(accepted)
        self.accepted[topic_site] = accepted
        return accepted

    def complete(self, quorum: int) -> str | None:
        """Why the round may close now ('buffer full', 'quorum', 'all answered'), or None."""
        if self.buffer_size and len(self.accepted) >= self.buffer_size:
            return "buffer full"
        if len(self.accepted) >= quorum:
            return "quorum"
        # Counting first: the set comparison runs only once every site may have answered.
        if len(self.accepted) + len(self.skipped) >= len(self.members) and self.responded() >= self.members:
            return "all answered"
        return None

