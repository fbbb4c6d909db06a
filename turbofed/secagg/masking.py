"""The masks of Bonawitz et al. 2017, §5 round 2: y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_{u,v}) − Σ_{v<u} PRG(s_{u,v}).

One function computes a site's pairwise mask; the site adds it to its input, and the
aggregator adds a dropped site's (from its reconstructed s_v^SK) to cancel what that site's
peers added (round 4).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from turbofed.secagg.crypto import DTYPES, MASK_LABEL, agree, prg


def pairwise_mask(site: int, s_private: X25519PrivateKey, peers: Mapping[int, bytes], *, length: int, bits: int,
                  round_: int) -> np.ndarray:
    """Σ_v ±PRG(KA(s_site, s_v^PK)) over `peers` (id -> s_v^PK): + when site < v, − when site > v."""
    total = np.zeros(length, dtype=DTYPES[bits].newbyteorder("="))
    for peer, public in peers.items():
        if peer == site:
            continue
        stream = prg(agree(s_private, public, label=MASK_LABEL, round_=round_), length, bits)
        if site < peer:
            total += stream
        else:
            total -= stream
    return total


def self_mask(seed: bytes, *, length: int, bits: int) -> np.ndarray:
    """PRG(b_u), the self mask that hides y_u even once s_u is revealed (§5 round 2)."""
    return prg(seed, length, bits)
