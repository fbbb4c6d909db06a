"""SecAgg+ neighbourhoods (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020): each site shares keys and masks with k
neighbours instead of every site, so its shares and keys cost O(k), not O(n).

The graph is a Harary graph H(k, n) over a pseudo-random order of the sites: the order is
SHA-256(seed || site) with the seed the hash of the round's roster (every party computes the
same graph; no one picks it alone once keys are fresh). k = 0, or k ≥ n − 1, is the full
graph of Bonawitz et al. 2017.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from turbofed.secagg.messages import Roster


def neighbourhoods(sites: Iterable[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each site's neighbours (itself excluded) in H(k, n): the ⌈k/2⌉ sites before and after it on the ring."""
    ids = sorted(set(sites))
    n = len(ids)
    if k <= 0 or k >= n - 1:
        return {u: frozenset(ids) - {u} for u in ids}
    ring = sorted(ids, key=lambda u: hashlib.sha256(seed + struct.pack(">H", u)).digest())
    half = (k + 1) // 2
    return {u: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0) for i, u in enumerate(ring)}


def roster_graph(roster: Roster) -> dict[int, frozenset[int]]:
    """The neighbourhoods of a round, seeded by the SHA-256 of its roster payload."""
    return neighbourhoods((e.site for e in roster.entries), roster.neighbours, hashlib.sha256(roster.to_payload()).digest())
