"""What a round announcement or statistics request tells sites about a secure sum
(Bonawitz et al. 2017; docs/privacy.md): the session its frames are bound to, the Shamir
threshold, the fixed-point settings, the vector length, and each site's id (its Shamir
x-coordinate). The aggregator signs it inside the announcement, so every site of a session
agrees on the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from turbofed.messages._check import MessageError, finite, refused_as, required, whole
from turbofed.refusals import Refusal
from turbofed.secagg.errors import SecaggError
from turbofed.secagg.messages import MAX_DIM, MAX_SITES
from turbofed.secagg.params import Params
from turbofed.secagg.quant import QuantError, Quantizer
from turbofed.topics import TopicError, validate_site

MAX_SESSION = 2**63 - 1


@dataclass(frozen=True)
class SecureSum:
    """One secure-aggregation session: `session` is the secagg round every frame names;
    `ids` maps each site asked to take part to its id in [1, 1024]."""

    session: int
    threshold: int
    dim: int
    ids: tuple[tuple[str, int], ...]
    bits: int = 32
    scale: float = 2.0**16
    clip: float = 1.0
    max_weight: int = 1
    neighbours: int = 0
    weight_unit: int = 1  # a site weighs ceil(samples / weight_unit), at most max_weight

    def weight(self, samples: int) -> int:
        """A site's integer weight for `samples` training rows."""
        return max(1, min(self.max_weight, -(-samples // self.weight_unit)))

    def params(self) -> Params:
        """The library's round parameters (turbofed.secagg.params)."""
        return Params(self.session, self.dim, self.threshold, Quantizer(self.bits, self.scale, self.clip), self.max_weight,
                      self.neighbours)

    def id_of(self, site: str) -> int | None:
        return self._numbers.get(site)

    @cached_property
    def _numbers(self) -> dict[str, int]:
        """site -> its number, built once (every frame of a session asks)."""
        return dict(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "threshold": self.threshold, "dim": self.dim, "ids": dict(self.ids),
                "bits": self.bits, "scale": self.scale, "clip": self.clip, "max_weight": self.max_weight,
                "neighbours": self.neighbours, "weight_unit": self.weight_unit}

    @classmethod
    def from_dict(cls, value: Any, what: str) -> "SecureSum":
        """Every field checked, then the whole checked as the library's Params (headroom included)."""
        with refused_as(Refusal.BAD_ROUND, what):
            if not isinstance(value, dict):
                raise MessageError(f"{what} must be an object", Refusal.BAD_ROUND)
            ids = required(value, "ids", what)
            if not isinstance(ids, dict) or not 2 <= len(ids) <= MAX_SITES:
                raise MessageError(f"{what} ids must map 2 to {MAX_SITES} sites to their ids", Refusal.BAD_ROUND)
            pairs = []
            for site, number in ids.items():
                try:
                    validate_site(site)
                except TopicError as exc:
                    raise MessageError(f"{what} ids: {exc}", Refusal.BAD_ROUND) from None
                pairs.append((site, whole(number, f"{what} ids[{site!r}]", 1, MAX_SITES)))
            if len({n for _, n in pairs}) != len(pairs):
                raise MessageError(f"{what} ids: two sites share an id", Refusal.BAD_ROUND)
            secure = cls(
                whole(required(value, "session", what), f"{what} session", 0, MAX_SESSION),
                whole(required(value, "threshold", what), f"{what} threshold", 2, len(pairs)),
                whole(required(value, "dim", what), f"{what} dim", 1, MAX_DIM - 1),
                tuple(sorted(pairs, key=lambda p: p[1])),
                whole(required(value, "bits", what), f"{what} bits", 32, 64),
                finite(required(value, "scale", what), f"{what} scale", 0.0),
                finite(required(value, "clip", what), f"{what} clip", 0.0),
                whole(required(value, "max_weight", what), f"{what} max_weight", 1, 65_536),
                whole(value.get("neighbours", 0), f"{what} neighbours", 0, MAX_SITES),
                whole(value.get("weight_unit", 1), f"{what} weight_unit", 1, 1_000_000_000),
            )
            try:
                secure.params().quantizer.check_headroom(len(pairs), secure.max_weight)
            except (SecaggError, QuantError) as exc:
                raise MessageError(f"{what}: {exc}", Refusal.BAD_ROUND) from None
            return secure


def fixed_point(bits: int, clip: float, n_sites: int, max_weight: int) -> Quantizer:
    """The finest power-of-two scale at which `n_sites` inputs of weight up to `max_weight`,
    each within +-`clip`, cannot wrap a `bits`-bit signed sum (Quantizer.check_headroom)."""
    room = (2 ** (bits - 1) - 1) / (n_sites * max_weight * clip)
    if room < 1:
        raise QuantError(f"{n_sites} sites x weight {max_weight} x clip {clip:g} leave no room in {bits}-bit sums: "
                         "lower clip or max_weight, or use 64 bits")
    quantizer = Quantizer(bits, 2.0 ** (int(room).bit_length() - 1), clip)
    for _ in range(64):  # rounding clip * scale up can still touch the limit: halve until it cannot
        try:
            quantizer.check_headroom(n_sites, max_weight)
            return quantizer
        except QuantError:
            quantizer = Quantizer(bits, quantizer.scale / 2, clip)
    quantizer.check_headroom(n_sites, max_weight)  # raises: no scale fits
    return quantizer
