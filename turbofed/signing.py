"""Message signatures: Ed25519 (RFC 8032) through `cryptography`, never hand-written.

Why signatures on top of TLS and the broker's ACL: the broker is a relay its operator
controls and an ACL can be wrong; a signature made with a key only the aggregator (or one
site) holds lets every receiver check who produced a message, whatever path it took.

What is signed is a *statement*, not the raw payload: the fleet id, the message kind, the
signer, the round, the model version and the SHA-256 of the body, each length-prefixed so
no two statements share bytes. A signature therefore cannot be replayed into another fleet,
onto another kind of message, as another signer, or for another round or version. The
statement holds no secret; the signature travels with the message (the envelope's `sig`
field), base64-encoded. Two optional tagged trailers bind what only some messages have: the
sample count of a weights envelope (FedAvg's weight, `S`) and the fleet epoch (`E`, the
signed fleet reset: docs/protocol.md); a statement without them is unchanged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from turbofed.errors import Refused, TurbofedError
from turbofed.refusals import Refusal

DOMAIN = b"turbofed/signature/v1"
SIGNATURE_BYTES = 64
_MAX_FIELD = 4096


class SignatureError(Refused):
    """A message is unsigned, mis-signed, or signed by a key this receiver does not trust.
    `reason` is the Refusal it is counted under."""

    reason = Refusal.BAD_SIGNATURE

    def __init__(self, message: str, reason: Refusal | str) -> None:
        super().__init__(message, Refusal(reason))


class KeyFileError(TurbofedError):
    """A key file is missing, unreadable or not an Ed25519 key."""


def body_digest(body: bytes) -> str:
    """Hex SHA-256 of a message body, as statements carry it."""
    return hashlib.sha256(body).hexdigest()


def statement(*, fleet: str, kind: str, signer: str, round: int, version: int, body_sha256: str,  # noqa: A002
              samples: int | None = None, epoch: int = 0) -> bytes:
    """The exact bytes that are signed for one message (see the module docstring)."""
    out = [DOMAIN]
    for text in (fleet, kind, signer, body_sha256):
        raw = text.encode("utf-8")
        if len(raw) > _MAX_FIELD:
            raise ValueError("statement field too long")
        out.append(struct.pack(">H", len(raw)) + raw)
    for number in (round, version):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**63:
            raise ValueError(f"statement round/version must be a non-negative integer, got {number!r}")
        out.append(struct.pack(">Q", number))
    for tag, number in ((b"S", samples), (b"E", epoch or None)):
        if number is not None:
            if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**63:
                raise ValueError(f"statement samples/epoch must be a non-negative integer, got {number!r}")
            out.append(tag + struct.pack(">Q", number))
    return b"".join(out)


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key and the identity it signs as."""

    name: str
    key: ed25519.Ed25519PrivateKey

    @classmethod
    def load(cls, name: str, path: str | Path) -> "SigningKey":
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: cannot read signing key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 private key")
        return cls(name, key)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.key.sign(message)).decode("ascii")

    def public_bytes(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """A PEM Ed25519 public key file (signing.pub, aggregator.pub)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


class TrustedKeys:
    """The public keys a receiver accepts, by signer name (agents: the aggregator's; the
    aggregator: every active site's)."""

    def __init__(self, keys: dict[str, ed25519.Ed25519PublicKey] | None = None) -> None:
        self.keys = dict(keys or {})

    @classmethod
    def from_files(cls, files: dict[str, str | Path]) -> "TrustedKeys":
        return cls({name: load_public_key(path) for name, path in files.items()})

    def verify(self, signer: str, signature: str | None, message: bytes) -> None:
        """Raise SignatureError unless `signature` is `signer`'s valid signature of `message`."""
        if signature is None or signature == "":
            raise SignatureError(f"message from {signer!r} is not signed", "unsigned")
        key = self.keys.get(signer)
        if key is None:
            raise SignatureError(f"no trusted key for signer {signer!r} (unknown or revoked)", "unknown_signer")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError(f"signature from {signer!r} is not base64", "bad_signature") from None
        if len(raw) != SIGNATURE_BYTES:
            raise SignatureError(f"signature from {signer!r} is {len(raw)} bytes, not {SIGNATURE_BYTES}", "bad_signature")
        try:
            key.verify(raw, message)
        except InvalidSignature:
            raise SignatureError(f"signature from {signer!r} does not match the message", "bad_signature") from None
