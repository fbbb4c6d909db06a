"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017), the semi-honest four-round protocol with dropouts, built only
from `cryptography` primitives (X25519, HKDF-SHA256, ChaCha20-Poly1305, the ChaCha20
keystream as PRG); Shamir sharing over GF(2^256 + 297) is protocol logic written here.

Modules: `shamir` (t-of-n sharing), `crypto` (KA, AE, PRG), `quant` (fixed point in
Z_{2^bits}, secret integer weights), `masking` (self and pairwise masks), `neighbours` (SecAgg+ graphs), `messages` (the
wire dataclasses), `params` (what a round agrees on), `client` (a site), `server` (the
aggregator), `wire` (Ed25519-signed frames), `bench` (bytes and time against plain
summation). Wired into the live system by aggregator/secure.py and edge/secure.py: docs/protocol.md, "Secure aggregation".
"""

from turbofed.secagg.client import SiteClient
from turbofed.secagg.errors import NotEnoughShares, RoundRefused, SecaggError
from turbofed.secagg.messages import (
    KINDS,
    AdvertiseKeys,
    KeyEntry,
    MaskedInput,
    Roster,
    SecaggMessageError,
    Shares,
    UnmaskReply,
    UnmaskRequest,
)
from turbofed.secagg.params import Params
from turbofed.secagg.quant import Quantizer
from turbofed.secagg.server import AggregatorState, Result

__all__ = [
    "KINDS", "AdvertiseKeys", "AggregatorState", "KeyEntry", "MaskedInput", "NotEnoughShares", "Params", "Quantizer",
    "Result", "Roster", "RoundRefused", "SecaggError", "SecaggMessageError", "Shares", "SiteClient", "UnmaskReply",
    "UnmaskRequest",
]
