"""Fixed-point quantisation into the ring Z_{2^bits} (Bonawitz et al. 2017 sum inputs that are
vectors over Z_R).

Weighting (our choice): weights are integers in [1, max_weight] and secret. A site clips its
float vector to [-clip, clip], rounds it to integers at `scale` steps per unit, multiplies
it by its weight, and appends the weight as one more element, all before masking. The sum
therefore carries Σ w·x and Σ w, and the aggregator learns the weighted mean but no site's
weight. Negative values are two's complement in the ring. The sum is exact (no wrap) while
n_sites · max_weight · round(clip·scale) < 2^(bits-1); `Quantizer.check_headroom` refuses
a setting that could wrap. A fleet maps its sample counts onto weights (for example
min(samples, max_weight)) before calling `encode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from turbofed.secagg.crypto import DTYPES


class QuantError(ValueError):
    """A setting that could overflow the ring, or an input outside what was agreed."""


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point settings every site of a round shares."""

    bits: int = 32
    scale: float = 2.0**16
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in DTYPES:
            raise QuantError(f"bits must be one of {sorted(DTYPES)}, got {self.bits}")
        if not (self.scale > 0 and self.clip > 0) or not np.isfinite(self.scale * self.clip):
            raise QuantError("scale and clip must be positive and finite")

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.bits].newbyteorder("=")

    @property
    def step(self) -> float:
        """Precision of one element: half a step is the rounding error per site."""
        return 1.0 / self.scale

    def check_headroom(self, n_sites: int, max_weight: int) -> None:
        """Refuse settings whose sum could wrap around the ring (see the module docstring)."""
        top = int(round(self.clip * self.scale))
        worst = n_sites * max_weight * max(top, 1)
        if worst >= 2 ** (self.bits - 1):
            raise QuantError(f"{n_sites} sites x weight {max_weight} x {top} steps = {worst} does not fit "
                             f"{self.bits}-bit signed sums: lower scale, clip or max_weight, or use 64 bits")

    def encode(self, values: np.ndarray, weight: int = 1) -> np.ndarray:
        """weight · round(clip(values) · scale), then the weight, as ring words (length dim + 1)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise QuantError(f"weight must be a positive integer, got {weight!r}")
        x = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise QuantError("values must be finite")
        q = np.rint(np.clip(x, -self.clip, self.clip) * self.scale).astype(np.int64) * weight
        return np.concatenate([q, [weight]]).astype(np.int64).astype(self.dtype)  # two's complement wrap

    def decode(self, words: np.ndarray) -> tuple[np.ndarray, int]:
        """(Σ w·x as floats, Σ w) from the unmasked ring sum."""
        signed = np.asarray(words, dtype=self.dtype).view(np.int32 if self.bits == 32 else np.int64)
        total_weight = int(signed[-1])
        return signed[:-1].astype(np.float64) / self.scale, total_weight
