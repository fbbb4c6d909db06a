"""Secure-aggregation payloads signed with the fleet's Ed25519 sealers (docs/protocol.md,
"Signed messages"), in a binary frame since the payloads are not JSON:

    offset 0   4   magic b"TFSS"
    4          64  Ed25519 signature (raw)
    68         1   F, the fleet id's length;  69  F  fleet id (UTF-8)
    69+F       1   S, the signer's length;    70+F S  signer (UTF-8)
    70+F+S     ..  the secagg payload (`messages`), whose header holds the round

The signature is `Sealer.key`'s over `signing.statement(fleet, kind, signer, round,
version=0, sha256(payload))`, so a frame cannot be replayed into another fleet, kind,
signer or round. `open_frame` refuses with `SignatureError` like `Verifier.open`, then
parses the payload with the kind's `from_payload`.
"""

from __future__ import annotations

import base64
import struct
from typing import Final

from turbofed.messages.signed import Sealer, Verifier
from turbofed.refusals import Refusal
from turbofed.secagg.messages import HEADER, KINDS, SecaggMessageError
from turbofed.signing import SIGNATURE_BYTES, SignatureError, body_digest, statement

MAGIC: Final = b"TFSS"
MAX_NAME: Final = 128


def _round(payload: bytes) -> int:
    if len(payload) < HEADER.size:
        raise SecaggMessageError("secagg frame: payload shorter than its header", Refusal.TRUNCATED)
    return HEADER.unpack(payload[:HEADER.size])[3] & (2**63 - 1)


def seal_frame(sealer: Sealer, kind: str, payload: bytes) -> bytes:
    """`payload` (a secagg message's `to_payload()`) framed with `sealer`'s signature for `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown secagg kind {kind!r}")
    fleet, signer = sealer.fleet.encode(), sealer.name.encode()
    if len(fleet) > MAX_NAME or len(signer) > MAX_NAME:
        raise ValueError("fleet id or signer name too long")
    sig = base64.b64decode(sealer.key.sign(statement(fleet=sealer.fleet, kind=kind, signer=sealer.name, round=_round(payload),
                                                     version=0, body_sha256=body_digest(payload))))
    return MAGIC + sig + struct.pack(">B", len(fleet)) + fleet + struct.pack(">B", len(signer)) + signer + payload


def open_frame(verifier: Verifier, kind: str, frame: bytes, *, signer: str) -> object:
    """Check a frame from `signer` (the topic's site, or the aggregator) and parse its payload
    as `kind`; raises SignatureError or SecaggMessageError (both `Refused`)."""
    what = f"{kind} from {signer}"
    cls = KINDS.get(kind)
    if cls is None:
        raise SecaggMessageError(f"{what}: unknown secagg kind", Refusal.UNKNOWN_KIND)
    if not isinstance(frame, (bytes, bytearray)) or frame[:4] != MAGIC:
        raise SignatureError(f"{what} is not a signed secagg frame", Refusal.UNSIGNED)
    frame = bytes(frame)
    pos = 4 + SIGNATURE_BYTES
    names = []
    for _ in range(2):
        if pos >= len(frame) or pos + 1 + frame[pos] > len(frame):
            raise SecaggMessageError(f"{what}: frame truncated", Refusal.TRUNCATED)
        try:
            names.append(frame[pos + 1:pos + 1 + frame[pos]].decode("utf-8"))
        except UnicodeDecodeError:
            raise SecaggMessageError(f"{what}: names are not UTF-8", Refusal.BAD_HEADER) from None
        pos += 1 + frame[pos]
    fleet, named = names
    if fleet != verifier.fleet:
        raise SignatureError(f"{what} is signed for fleet {fleet!r:.60}, not this fleet", Refusal.WRONG_FLEET)
    if named != signer:
        raise SignatureError(f"{what} is signed by {named!r:.60}", Refusal.WRONG_SENDER)
    payload = frame[pos:]
    sig = base64.b64encode(frame[4:4 + SIGNATURE_BYTES]).decode("ascii")
    verifier.trusted.verify(signer, sig, statement(fleet=fleet, kind=kind, signer=signer, round=_round(payload), version=0,
                                                   body_sha256=body_digest(payload)))
    return cls.from_payload(payload)
