"""The aggregator's secure rounds (docs/privacy.md): the part of `Aggregator` that opens a
secure-sum session for a round or for the fleet statistics, drives it to its sum
(aggregator/secure.py runs the protocol's phases) and merges what the sum gives.

A mixin of `turbofed.aggregator.service.Aggregator`, kept apart so the service reads as
plain rounds; it uses the service's round, store, strategy and commit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Callable

from turbofed.aggregator.faults import kill_point
from turbofed.aggregator.rounds import Rejected
from turbofed.aggregator.secure import SecureCollection
from turbofed.aggregator.strategies import SiteUpdate
from turbofed.codec import flatten, read_weights, replace_weights, unflatten
from turbofed.messages import StatsRequest, signed
from turbofed.messages.secure import SecureSum, fixed_point
from turbofed.refusals import Refusal
from turbofed.secagg.errors import SecaggError
from turbofed.secagg.server import Result
from turbofed.spec import FleetStats

log = logging.getLogger("turbofed.aggregator")

STATS_SECURE_CLIP = 2.0**46  # a secure statistics sum takes per-site values up to this (64-bit words)


class SecureRounds:
    """Secure-sum sessions for `Aggregator` (which sets `secure_settings`, `site_ids`,
    `secure` and `last_secure`)."""

    def _new_session(self, dim: int, quantizer_clip: float, bits: int, max_weight: int, weight_unit: int = 1) -> SecureSum:
        """A fresh session over every site of the fleet (fresh random id: frames of an earlier
        attempt cannot be replayed into it)."""
        cfg, n = self.secure_settings, len(self.site_ids)
        q = fixed_point(bits, quantizer_clip, n, max_weight)
        group = min(cfg.neighbours + 1, n) if cfg.neighbours else n  # who a site shares with, itself included
        return SecureSum(int.from_bytes(os.urandom(8), "big") >> 1, cfg.threshold or group // 2 + 1, dim,
                         tuple(self.site_ids.items()), q.bits, q.scale, q.clip, max_weight, cfg.neighbours, weight_unit)

    def _round_sum(self) -> SecureSum:
        """A round's session: sites add their deltas, weighted (weight 1 under DP, each delta
        clipped to C and noised at its site, so the quantiser's range is C plus 10 noise sigmas)."""
        cfg = self.secure_settings
        dim = flatten(read_weights(self.model), list(read_weights(self.model))).size
        if self.dp is not None:
            noise = self.dp.site_noise()
            spec = self._new_session(dim, noise.clip_norm + 10 * noise.noise_std, cfg.bits, 1)
        else:
            spec = self._new_session(dim, cfg.clip, cfg.bits, cfg.max_weight, cfg.weight_unit)
        self.secure = SecureCollection(spec, cfg.phase_timeout_s, self.sealer, self.verifier, self.topics, self._publish_secure)
        return spec

    def _publish_secure(self, topic: str, frame: bytes) -> None:
        self.client.publish(topic, frame, qos=1)

    def _on_secure(self, site: str, payload: bytes, kind: str) -> None:
        if self.secure is None:
            raise Rejected(Refusal.STALE_ROUND, f"{kind} from {site}: no secure sum is open")
        self.secure.receive(site, kind, payload)

    def _secure_result(self, stop: threading.Event, keys_closed: Callable[[], str | None]) -> tuple[Result | None, str]:
        """Drive the open session to its sum: (result, what closed phase 0), or (None, why)
        when stopped or aborted (too few sites left: nothing is unmasked)."""
        closed_by = None
        s = self.last_secure = self.secure
        while not stop.is_set():
            if closed_by is None:
                closed_by = keys_closed()
            try:
                result = s.advance(closed_by is not None)
            except SecaggError as exc:
                log.warning("secure sum %d aborted in phase %s: %s", s.spec.session, s.phase_name, exc)
                self._event("secure_sum_aborted", {"session": s.spec.session, "phase": s.phase_name, "reason": str(exc)[:500]})
                self.secure = None
                return None, f"secure sum aborted in phase {s.phase_name}"
            if result is not None:
                self.secure = None
                return result, closed_by
            self.pump(0.05 if s.phase else 0.2)
        self.secure = None
        return None, "stopped"

    def _run_secure_round(self, number: int, stop: threading.Event) -> None:
        """Phase 0 closes like a plain round (quorum of keys, every site answered, deadline);
        the sum of the survivors' weighted deltas then goes through the strategy."""
        r, quorum = self.round, self.config.effective_quorum

        def keys_closed() -> str | None:
            keyed = self.secure.keyed()
            if len(keyed) >= quorum:
                return "quorum"
            if keyed | set(r.skipped) >= r.members:
                return "all answered"
            return "deadline" if time.time() >= r.deadline else None

        result, closed_by = self._secure_result(stop, keys_closed)
        if stop.is_set():
            return
        if result is None:
            self._empty_round(number, closed_by, stop)
            return
        self._close_secure_round(result, closed_by)

    def _close_secure_round(self, result: Result, closed_by: str) -> None:
        r, self.round = self.round, None
        last_update = time.time()
        participants = self.last_secure.participants(result)
        verdict = self.guard.judge(self.version)
        if verdict.bad:
            self._roll_back(r, verdict, last_update)
            return
        current = read_weights(self.model)
        if self.dp is not None:
            weights = self.dp.aggregate_sum(current, result.weighted_sum, result.total_weight)
        else:
            mean = flatten(current, list(current)) + result.weighted_sum / result.total_weight
            weights = self.strategy.aggregate(current, [SiteUpdate("secure-sum", unflatten(mean, current), result.total_weight)])
        model = replace_weights(self.model, weights)
        kill_point("after_merge", r.number)
        if not self._commit(r.number, model, r.started, participants, last_update, closed_by):
            return
        log.info("round %d closed by %s: secure sum of %d sites (%d dropped after sharing, masks removed), global v%d "
                 "published", r.number, closed_by, len(result.survivors), len(result.dropped), self.version)
        self._round_closed(r.number, len(result.survivors))

    def _collect_secure_stats(self, stop: threading.Event) -> None:
        """The statistics through a secure sum: sites ready to answer advertise keys; phase 0
        closes at a quorum of them, or at the round deadline once at least t have; the
        aggregator learns only the total. A session that aborts is started again, fresh."""
        template = FleetStats(window=self.config.model.window)
        while not stop.is_set():
            spec = self._new_session(template.to_vector().size, STATS_SECURE_CLIP, 64, 1)
            self.secure = SecureCollection(spec, self.secure_settings.phase_timeout_s, self.sealer, self.verifier, self.topics,
                                           self._publish_secure)
            self.stats_request_id = uuid.uuid4().hex
            request = StatsRequest(self.stats_request_id, self.config.min_samples, self.config.model.window, secagg=spec)
            self.client.publish(self.topics.stats_request, self.sealer.seal(signed.STATS_REQUEST, request.to_payload()), qos=1, retain=True)
            log.info("asked sites for fleet statistics through a secure sum (session %d, t = %d)", spec.session, spec.threshold)
            give_up = time.time() + self.config.round_deadline_s

            def keys_closed() -> str | None:
                keyed = len(self.secure.keyed())
                if keyed >= self.config.effective_quorum:
                    return "quorum"
                return "deadline" if time.time() >= give_up and keyed >= spec.threshold else None

            result, _ = self._secure_result(stop, keys_closed)
            if result is not None:
                stats = FleetStats.from_vector(result.weighted_sum, template)
                self._fleet_stats(stats, sorted(self.last_secure.names[n] for n in result.survivors), secure=True)
                return
            self._wait(self.config.stats_retry_s, stop)
