"""The versioned envelope around every weights message, and JSON helpers for the rest.

Wire layout of a weights message (``tfl/v1/global``, ``tfl/v1/sites/<site>/update``)::

    offset  size  field
    0       3     magic b"TFW"
    3       1     envelope version (1)
    4       4     header length H, unsigned big-endian
    8       H     header: UTF-8 JSON object (compact, sorted keys)
    8+H     N     body: the ONNX model bytes, N == header["body_len"]

Header keys: kind ("update" | "global" | "skip" | "partial"), site, round, model_version, samples, sha256
(hex of body), body_len, sig (the sender's Ed25519 signature, base64, or null when the fleet
runs unsigned), and optionally fleet (the fleet id the signature is for).

Decoding never trusts the sender: every check failure raises a subclass of
:class:`EnvelopeError` whose ``reason`` is the :class:`~turbofed.refusals.Refusal` to log and count.
Checks on the ONNX content itself (names, shapes, finite values) belong to
``turbofed.codec``; checks against protocol state (sender == topic site, current
round, one update per site per round) belong to the aggregator.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal

from turbofed.errors import Refused
from turbofed.refusals import Refusal
from turbofed.topics import TopicError, validate_site

MAGIC: Final = b"TFW"
VERSION: Final = 1
# Largest MQTT payload turbofed sends or accepts. Models are ~30-200 KB; 4 MiB leaves
# ample room. broker_config/mosquitto.conf sets max_packet_size a little above this.
MAX_PAYLOAD_BYTES: Final = 4 * 1024 * 1024
MAX_HEADER_BYTES: Final = 4096
MAX_JSON_BYTES: Final = 1024 * 1024
MAX_SIG_CHARS: Final = 2048
_PREFIX = struct.Struct(">3sBI")  # magic, version, header length
PREFIX_LEN: Final = _PREFIX.size  # 8
_MAX_INT: Final = 2**53 - 1  # exact in every JSON implementation

Kind = Literal["update", "global", "skip", "partial"]
# skip: on the update topic, a site with too few samples sits the round out (empty body).
# partial: a regional aggregator's sum of its sites' updates (aggregator/regional.py; `site` is the region).
KINDS: Final[tuple[str, ...]] = ("update", "global", "skip", "partial")
_HEADER_KEYS: Final = ("kind", "site", "round", "model_version", "samples", "sha256", "body_len", "sig")
_OPTIONAL_KEYS: Final = ("fleet",)  # written only when set, so an unsigned envelope is unchanged
MAX_FLEET_CHARS: Final = 128


class EnvelopeError(Refused):
    """A message failed to decode (or encode); ``reason`` is its Refusal."""

    reason = Refusal.BAD_ENVELOPE

    def __str__(self) -> str:
        return f"{self.reason}: {super().__str__()}"


class TooLargeError(EnvelopeError):
    """Payload above the size limit: refused before any parsing."""

    reason = Refusal.TOO_LARGE


class BadMagicError(EnvelopeError):
    """Not a turbofed envelope at all (wrong topic, wrong sender, garbage)."""

    reason = Refusal.BAD_MAGIC


class UnknownVersionError(EnvelopeError):
    """An envelope version this build does not understand (sender is newer or broken)."""

    reason = Refusal.UNKNOWN_VERSION


class TruncatedError(EnvelopeError):
    """The payload ends before the fixed prefix or the declared header does."""

    reason = Refusal.TRUNCATED


class BadHeaderError(EnvelopeError):
    """Header is not UTF-8 JSON, misses a key, or a field has the wrong type or range."""

    reason = Refusal.BAD_HEADER


class SizeMismatchError(EnvelopeError):
    """Body length differs from the header's ``body_len``."""

    reason = Refusal.SIZE_MISMATCH


class HashMismatchError(EnvelopeError):
    """Body SHA-256 differs from the header's ``sha256``: corrupted or tampered."""

    reason = Refusal.HASH_MISMATCH


class BadJsonError(EnvelopeError):
    """A JSON (non-weights) message is not a UTF-8 JSON object."""

    reason = Refusal.BAD_JSON


@dataclass(frozen=True)
class Envelope:
    """A decoded, integrity-checked weights message. ``body`` is the ONNX bytes."""

    kind: str
    site: str
    round: int
    model_version: int
    samples: int
    sha256: str
    body_len: int
    sig: str | None
    body: bytes
    version: int = VERSION
    fleet: str | None = None

    def header(self) -> dict[str, Any]:
        """The header fields (for logging and storage), without the body."""
        return {k: getattr(self, k) for k in _HEADER_KEYS + _OPTIONAL_KEYS}


def _check_int(header: dict[str, Any], key: str) -> int:
    value = header[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadHeaderError(f"header field {key!r} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= _MAX_INT:
        raise BadHeaderError(f"header field {key!r} out of range: {value}")
    return value


def _check_header(header: Any) -> dict[str, Any]:
    """Validate header types and ranges; shared by encode and decode."""
    if not isinstance(header, dict):
        raise BadHeaderError(f"header must be a JSON object, got {type(header).__name__}")
    missing = [k for k in _HEADER_KEYS if k not in header]
    if missing:
        raise BadHeaderError(f"header misses {', '.join(missing)}")
    if header["kind"] not in KINDS:
        raise BadHeaderError(f"header kind must be one of {KINDS}, got {header['kind']!r}")
    try:
        validate_site(header["site"])
    except TopicError as exc:
        raise BadHeaderError(f"header site: {exc}") from None
    for key in ("round", "model_version", "samples", "body_len"):
        _check_int(header, key)
    if header["kind"] == "skip" and header["body_len"] != 0:
        raise BadHeaderError("a 'skip' envelope must have an empty body")
    digest = header["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise BadHeaderError("header sha256 must be 64 lowercase hex characters")
    sig = header["sig"]
    if sig is not None and not (isinstance(sig, str) and 0 < len(sig) <= MAX_SIG_CHARS):
        raise BadHeaderError(f"header sig must be null or a string of at most {MAX_SIG_CHARS} characters")
    fleet = header.get("fleet")
    if fleet is not None and not (isinstance(fleet, str) and 0 < len(fleet) <= MAX_FLEET_CHARS and fleet.isprintable()):
        raise BadHeaderError(f"header fleet must be null or printable text of at most {MAX_FLEET_CHARS} characters")
    return header


def encode(
    *,
    kind: Kind | str,
    site: str,
    round: int,  # noqa: A002 - the protocol's name for it
    model_version: int,
    samples: int,
    body: bytes,
    sig: str | None = None,
    fleet: str | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> bytes:
    """Wrap ONNX bytes in a versioned, hashed envelope ready to publish.

    Raises the same EnvelopeError subclasses as :func:`decode` so a bad field is caught
    at the sender rather than rejected by every receiver.
    """
    body = bytes(body)
    header = _check_header({
        "kind": kind,
        "site": site,
        "round": round,
        "model_version": model_version,
        "samples": samples,
        "sha256": hashlib.sha256(body).hexdigest(),
        "body_len": len(body),
        "sig": sig,
        **({"fleet": fleet} if fleet is not None else {}),
    })
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise BadHeaderError(f"header is {len(raw)} bytes, limit {MAX_HEADER_BYTES}")
    total = PREFIX_LEN + len(raw) + len(body)
    if total > max_bytes:
        raise TooLargeError(f"envelope would be {total} bytes, limit {max_bytes}")
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(raw)), raw, body))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _loads(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys (no ambiguity to exploit)."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def decode(payload: bytes | bytearray | memoryview, max_bytes: int = MAX_PAYLOAD_BYTES) -> Envelope:
    """Parse and verify a weights message; raises an EnvelopeError subclass on any defect.

    Checks, in order (cheapest first, nothing parsed before its size is known):
    too_large, bad_magic, unknown_version, truncated, bad_header, size_mismatch,
    hash_mismatch.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise BadMagicError(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload).cast("B")
    size = view.nbytes
    if size > max_bytes:
        raise TooLargeError(f"payload is {size} bytes, limit {max_bytes}")
    if bytes(view[:3]) != MAGIC:
        raise BadMagicError(f"payload does not start with {MAGIC!r}: {bytes(view[:3])!r}")
    if size < PREFIX_LEN:
        raise TruncatedError(f"payload is {size} bytes, shorter than the {PREFIX_LEN}-byte prefix")
    _, version, header_len = _PREFIX.unpack(view[:PREFIX_LEN])
    if version != VERSION:
        raise UnknownVersionError(f"envelope version {version}, this build reads version {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise BadHeaderError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if PREFIX_LEN + header_len > size:
        raise TruncatedError(f"header length {header_len} runs past the end of a {size}-byte payload")
    try:
        header = _loads(bytes(view[PREFIX_LEN:PREFIX_LEN + header_len]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadHeaderError(f"header is not valid UTF-8 JSON: {exc}") from None
    _check_header(header)
    body = bytes(view[PREFIX_LEN + header_len:])
    if len(body) != header["body_len"]:
        raise SizeMismatchError(f"body is {len(body)} bytes, header says {header['body_len']}")
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise HashMismatchError("body SHA-256 does not match the header")
    return Envelope(body=body, version=version, fleet=header.get("fleet"), **{k: header[k] for k in _HEADER_KEYS})


def encode_json(obj: Any, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """Serialise a non-weights message (round, status, metrics, predictions, stats).

    Compact UTF-8 JSON; NaN/Infinity are refused (convert them to null first) because
    other JSON readers choke on them.
    """
    try:
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise BadJsonError(f"cannot encode message as JSON: {exc}") from None
    if len(raw) > max_bytes:
        raise TooLargeError(f"JSON message is {len(raw)} bytes, limit {max_bytes}")
    return raw


def decode_json(
    payload: bytes | bytearray | memoryview, what: str, max_bytes: int = MAX_JSON_BYTES
) -> dict[str, Any]:
    """Parse a non-weights message into a dict; ``what`` names it in the error message."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise BadJsonError(f"{what}: payload must be bytes, got {type(payload).__name__}")
    raw = bytes(payload)
    if len(raw) > max_bytes:
        raise TooLargeError(f"{what}: payload is {len(raw)} bytes, limit {max_bytes}")
    try:
        obj = _loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadJsonError(f"{what}: not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadJsonError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays (via .tolist); anything else is refused."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
