"""Errors of secure aggregation: refused input (counted under a Refusal) and protocol aborts."""

from __future__ import annotations

from turbofed.errors import Refused, TurbofedError
from turbofed.refusals import Refusal


class SecaggError(TurbofedError):
    """The protocol cannot go on (Bonawitz et al. 2017, §5: "abort"); the message says why."""


class NotEnoughShares(SecaggError):
    """Fewer than t sites are left, or fewer than t shares arrived: nothing is unmasked."""


class RoundRefused(Refused):
    """A well-formed message that does not fit the round's state (unknown site, repeat, wrong round)."""

    reason = Refusal.WRONG_FIELDS


def refuse(what: str, reason: Refusal) -> RoundRefused:
    return RoundRefused(what, reason)
