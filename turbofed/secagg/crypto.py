"""The primitives of secure aggregation, all from `cryptography` (Bonawitz et al. 2017, §3):

- key agreement KA: X25519, its shared secret through HKDF-SHA256 with a label per use
  (mask seed or share encryption) and the round, so one agreement never keys two things;
- authenticated encryption AE (§3.3): ChaCha20-Poly1305, random 96-bit nonce, the sender,
  receiver and round bound as associated data;
- the PRG (§3.4): the ChaCha20 keystream under a 32-byte seed, read as little-endian words
  of the ring Z_{2^bits}.
"""

from __future__ import annotations

import os
import struct
from typing import Final

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DOMAIN: Final = b"turbofed/secagg/v1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MASK_LABEL: Final = b"mask"
ENCRYPT_LABEL: Final = b"encrypt"
_ZERO_NONCE: Final = bytes(16)  # a seed keys exactly one stream, so one fixed nonce is safe
DTYPES: Final = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


class DecryptError(ValueError):
    """A ciphertext that does not open under the pair's key and associated data."""


def new_private() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(own: X25519PrivateKey, peer_public: bytes, *, label: bytes, round_: int) -> bytes:
    """KA.agree then HKDF-SHA256 (§3.2, §3.3): a 32-byte key both sides of a pair derive alike."""
    try:
        secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise DecryptError(f"key agreement failed: {exc}") from None
    info = DOMAIN + b"/" + label + struct.pack(">Q", round_)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def associated_data(round_: int, sender: int, receiver: int) -> bytes:
    """What binds a share ciphertext to its round, sender and receiver (§5, round 1)."""
    return DOMAIN + struct.pack(">QHH", round_, sender, receiver)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AE.enc: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, sealed: bytes, ad: bytes) -> bytes:
    """AE.dec; raises DecryptError when the ciphertext, key or associated data do not match."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except (InvalidTag, ValueError):
        raise DecryptError("share ciphertext does not authenticate (tampered, or not for this pair and round)") from None


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """PRG(seed): `length` words of Z_{2^bits} from the ChaCha20 keystream (§3.4)."""
    dtype = DTYPES[bits]
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor().update(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="))
