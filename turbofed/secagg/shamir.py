"""Shamir t-of-n secret sharing over the prime field GF(2^256 + 297) (Bonawitz et al. 2017, §3.1).

A 32-byte secret (a self-mask seed b_u or an X25519 private key s_u) is one field element:
the prime is the smallest above 2^256, so every 32-byte string is a distinct element. A
share is (x, y) with x the site's index (1..65535, never 0) and y < PRIME, written as
SHARE_BYTES big-endian bytes. Any t shares give the secret back (Lagrange interpolation at
0); t-1 shares are consistent with every secret (`tests/test_secagg.py` shows it).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Final

PRIME: Final = 2**256 + 297
SHARE_BYTES: Final = 33  # ceil(log2(PRIME) / 8)
SECRET_BYTES: Final = 32


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, duplicates, out of the field)."""


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of a 32-byte `secret`, one per x in `xs`, any `threshold` of which recover it (§3.1 SS.share)."""
    xs = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and non-zero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coeffs, x) for x in xs}


def _evaluate(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def lagrange_weights(xs: Iterable[int], at: int = 0) -> dict[int, int]:
    """λ_i with f(at) = Σ λ_i·f(x_i) for any polynomial of degree < len(xs); one set serves
    every secret shared over the same points."""
    xs = list(xs)
    if not xs:
        raise ShamirError("no shares")
    if len(set(x % PRIME for x in xs)) != len(xs):
        raise ShamirError("duplicate share points")
    weights = {}
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights[xi] = num * pow(den, -1, PRIME) % PRIME
    return weights


def interpolate(shares: Mapping[int, int], at: int = 0, weights: Mapping[int, int] | None = None) -> int:
    """The value at `at` of the polynomial through `shares` (Lagrange; every share is used)."""
    weights = weights or lagrange_weights(shares, at)
    return sum(weights[x] * y for x, y in shares.items()) % PRIME


def combine(shares: Mapping[int, int], threshold: int, weights: Mapping[int, int] | None = None) -> bytes:
    """The 32-byte secret from at least `threshold` shares (§3.1 SS.recon); fewer raise ShamirError.
    The first `threshold` shares are used; `weights` are their `lagrange_weights` when known."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, the threshold is {threshold}: the secret stays hidden")
    if any(not 0 <= y < PRIME for y in shares.values()) or any(not 0 < x < PRIME for x in shares):
        raise ShamirError("a share is outside the field")
    value = interpolate(dict(list(shares.items())[:threshold]), 0, weights)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("the shares do not encode a 32-byte secret (inconsistent shares)")
    return value.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    """A share value from its SHARE_BYTES bytes; raises ShamirError when it is not a field element."""
    if len(raw) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ShamirError("share value is not below the prime")
    return y
