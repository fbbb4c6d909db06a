"""Differential privacy arithmetic shared by sites and the aggregator (no room imports):
clipping a delta to an L2 norm, a site's own noise for distributed DP-FedAvg (McMahan et
al., ICLR 2018; docs/privacy.md), and an unseeded generator for noise nobody can replay."""

from __future__ import annotations

import os

import numpy as np

from turbofed.codec import Weights, flatten, unflatten


def unseeded_rng() -> np.random.Generator:
    """numpy's Generator seeded with 16 bytes from os.urandom: noise nobody can replay."""
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def clip(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """`delta` scaled down to L2 norm `clip_norm` if longer; with the factor used (<= 1)."""
    norm = float(np.linalg.norm(delta))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return delta * scale, scale


def noised_delta(current: Weights, weights: Weights, clip_norm: float, noise_std: float, rng: np.random.Generator) -> Weights:
    """A site's side of distributed DP: `weights - current` clipped to `clip_norm` plus
    N(0, noise_std^2) per coordinate, returned as weights (current + that)."""
    names = list(current)
    base = flatten(current, names)
    delta, _ = clip(flatten(weights, names) - base, clip_norm)
    return unflatten(base + delta + rng.normal(0.0, noise_std, delta.shape), current)
