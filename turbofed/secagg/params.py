"""What every party of one secure-aggregation round agrees on before it starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from turbofed.secagg.errors import SecaggError
from turbofed.secagg.messages import MAX_DIM, MAX_SITES
from turbofed.secagg.quant import Quantizer


@dataclass(frozen=True)
class Params:
    """One round: its number, the vector length, the Shamir threshold t (the fewest sites
    that must be left, and shares needed, to unmask), fixed-point settings and the largest
    weight a site may give its input. `neighbours` is SecAgg+'s k (0: every site is every
    site's neighbour, Bonawitz et al.); with k > 0, t counts within a site's neighbourhood
    of k + 1 and must not exceed it."""

    round: int
    dim: int
    threshold: int
    quantizer: Quantizer = field(default_factory=Quantizer)
    max_weight: int = 1
    neighbours: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.dim < MAX_DIM:
            raise SecaggError(f"dim must be in [1, {MAX_DIM - 1}] (one word carries the weight)")
        if not 2 <= self.threshold <= MAX_SITES:
            raise SecaggError(f"threshold must be in [2, {MAX_SITES}], got {self.threshold}")
        if not 0 <= self.round < 2**63 or self.max_weight < 1:
            raise SecaggError("round must be in [0, 2^63) and max_weight at least 1")
        if not 0 <= self.neighbours <= MAX_SITES or (self.neighbours and self.threshold > self.neighbours + 1):
            raise SecaggError(f"neighbours must be in [0, {MAX_SITES}] and at least t - 1 = {self.threshold - 1}")

    @property
    def length(self) -> int:
        """Ring words per input: the vector and its weight."""
        return self.dim + 1

    @staticmethod
    def majority(n_sites: int) -> int:
        """t = ⌊n/2⌋ + 1 of the n sites a site shares with. The aggregator colluding with fewer
        than t sites learns only the sum (Bonawitz et al. 2017, §6, honest-but-curious); the
        paper's actively secure variant needs t > 2n/3."""
        return n_sites // 2 + 1
