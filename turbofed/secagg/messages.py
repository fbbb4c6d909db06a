"""The secure-aggregation messages as frozen dataclasses with compact binary payloads.

Every payload starts with a 14-byte header: magic b"TFSA", version 1, a kind byte, and the
round (u64 big-endian); then the body, all integers big-endian, all lists length-prefixed
and bounded (MAX_SITES entries, MAX_DIM words). `from_payload` is the only way in: every
payload is hostile until it returns, and it raises `SecaggMessageError` (a `Refused` with
a `Refusal` reason) for anything else, trailing bytes included. Wire layouts and sizes:
docs/protocol.md, "Secure aggregation". Site ids are Shamir x-coordinates
in [1, MAX_SITES].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np

from turbofed.errors import Refused
from turbofed.refusals import Refusal
from turbofed.secagg.crypto import DTYPES, KEY_BYTES, NONCE_BYTES, TAG_BYTES
from turbofed.secagg.shamir import SHARE_BYTES

MAGIC: Final = b"TFSA"
VERSION: Final = 1
HEADER: Final = struct.Struct(">4sBBQ")
MAX_SITES: Final = 1024
MAX_DIM: Final = 1_000_000  # words: 4 MB at 32 bits, under the 4 MiB MQTT payload limit
SHARE_PLAINTEXT: Final = 4 + 2 * SHARE_BYTES  # sender u16, receiver u16, share of s_u, share of b_u
SHARE_CIPHERTEXT: Final = NONCE_BYTES + SHARE_PLAINTEXT + TAG_BYTES


class SecaggMessageError(Refused):
    """A secure-aggregation payload that is malformed; `reason` says how."""


class _Reader:
    """Bounded reads from a payload; each failure names the message and what was missing."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.raw, self.pos, self.what = payload, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.raw):
            raise SecaggMessageError(f"{self.what}: truncated at byte {self.pos} (wanted {n} more)", Refusal.TRUNCATED)
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def site(self) -> int:
        value = self.uint(">H")
        if not 1 <= value <= MAX_SITES:
            raise SecaggMessageError(f"{self.what}: site id {value} outside [1, {MAX_SITES}]", Refusal.BAD_ID)
        return value

    def count(self) -> int:
        value = self.uint(">H")
        if value > MAX_SITES:
            raise SecaggMessageError(f"{self.what}: {value} entries, at most {MAX_SITES}", Refusal.TOO_MANY_ROWS)
        return value

    def sites(self) -> tuple[int, ...]:
        ids = tuple(self.site() for _ in range(self.count()))
        if len(set(ids)) != len(ids):
            raise SecaggMessageError(f"{self.what}: repeated site id", Refusal.DUPLICATE)
        return ids

    def end(self) -> None:
        if self.pos != len(self.raw):
            raise SecaggMessageError(f"{self.what}: {len(self.raw) - self.pos} trailing bytes", Refusal.SIZE_MISMATCH)


def _check_site(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SITES:
        raise SecaggMessageError(f"{what}: site id {value!r} outside [1, {MAX_SITES}]", Refusal.BAD_ID)


def _check_unique(ids: list[int] | tuple[int, ...], what: str) -> None:
    if len(ids) > MAX_SITES:
        raise SecaggMessageError(f"{what}: {len(ids)} entries, at most {MAX_SITES}", Refusal.TOO_MANY_ROWS)
    for i in ids:
        _check_site(i, what)
    if len(set(ids)) != len(ids):
        raise SecaggMessageError(f"{what}: repeated site id", Refusal.DUPLICATE)


class _Message:
    """Header handling shared by every message: subclasses set KIND, CODE and the body."""

    KIND: ClassVar[str]
    CODE: ClassVar[int]
    round: int

    def _header(self) -> bytes:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not 0 <= self.round < 2**63:
            raise SecaggMessageError(f"{self.KIND}: round must be in [0, 2^63), got {self.round!r}", Refusal.BAD_ROUND)
        return HEADER.pack(MAGIC, VERSION, self.CODE, self.round)

    @classmethod
    def _open(cls, payload: bytes, max_bytes: int) -> tuple[_Reader, int]:
        what = cls.KIND
        if not isinstance(payload, (bytes, bytearray)):
            raise SecaggMessageError(f"{what}: payload is not bytes", Refusal.BAD_MAGIC)
        if len(payload) > max_bytes:
            raise SecaggMessageError(f"{what}: {len(payload)} bytes, at most {max_bytes}", Refusal.TOO_LARGE)
        reader = _Reader(bytes(payload), what)
        magic, version, code, round_ = HEADER.unpack(reader.take(HEADER.size))
        if magic != MAGIC:
            raise SecaggMessageError(f"{what}: not a secure-aggregation message", Refusal.BAD_MAGIC)
        if version != VERSION:
            raise SecaggMessageError(f"{what}: version {version}, this build reads {VERSION}", Refusal.UNKNOWN_VERSION)
        if code != cls.CODE:
            raise SecaggMessageError(f"{what}: kind byte {code}, expected {cls.CODE}", Refusal.BAD_KIND)
        if round_ >= 2**63:
            raise SecaggMessageError(f"{what}: round {round_} out of range", Refusal.BAD_ROUND)
        return reader, round_


@dataclass(frozen=True)
class KeyEntry:
    """One site's two X25519 public keys (§5 round 0: c_u^PK for shares, s_u^PK for masks)."""

    site: int
    c_public: bytes
    s_public: bytes

    SIZE: ClassVar[int] = 2 + 2 * KEY_BYTES

    def pack(self, what: str) -> bytes:
        _check_site(self.site, what)
        if len(self.c_public) != KEY_BYTES or len(self.s_public) != KEY_BYTES:
            raise SecaggMessageError(f"{what}: public keys are {KEY_BYTES} bytes", Refusal.WRONG_FIELDS)
        if self.c_public == self.s_public:
            raise SecaggMessageError(f"{what}: site {self.site} uses one key for both roles", Refusal.WRONG_FIELDS)
        return struct.pack(">H", self.site) + self.c_public + self.s_public

    @classmethod
    def unpack(cls, reader: _Reader) -> "KeyEntry":
        entry = cls(reader.site(), reader.take(KEY_BYTES), reader.take(KEY_BYTES))
        entry.pack(reader.what)  # the same checks as on the way out
        return entry


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Site -> aggregator, §5 round 0 (AdvertiseKeys). Kind `secagg_keys`; 80 bytes."""

    KIND: ClassVar[str] = "secagg_keys"
    CODE: ClassVar[int] = 1
    round: int
    keys: KeyEntry

    def to_payload(self) -> bytes:
        return self._header() + self.keys.pack(self.KIND)

    @classmethod
    def from_payload(cls, payload: bytes) -> "AdvertiseKeys":
        reader, round_ = cls._open(payload, HEADER.size + KeyEntry.SIZE)
        msg = cls(round_, KeyEntry.unpack(reader))
        reader.end()
        return msg


@dataclass(frozen=True)
class Roster(_Message):
    """Aggregator -> sites, end of §5 round 0: the keys of U1, the threshold t and the SecAgg+
    neighbourhood size k (0: the full graph). Kind `secagg_roster`; 20 + 66·|U1| bytes."""

    KIND: ClassVar[str] = "secagg_roster"
    CODE: ClassVar[int] = 2
    round: int
    threshold: int
    entries: tuple[KeyEntry, ...]
    neighbours: int = 0

    def to_payload(self) -> bytes:
        _check_unique([e.site for e in self.entries], self.KIND)
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or not 0 <= self.neighbours <= MAX_SITES:
            raise SecaggMessageError(f"{self.KIND}: neighbours {self.neighbours!r} not in [0, {MAX_SITES}]", Refusal.OUT_OF_RANGE)
        if not 1 <= self.threshold <= len(self.entries):
            raise SecaggMessageError(f"{self.KIND}: threshold {self.threshold} not in [1, {len(self.entries)}]",
                                     Refusal.OUT_OF_RANGE)
        keys = [k for e in self.entries for k in (e.c_public, e.s_public)]
        if len(set(keys)) != len(keys):
            raise SecaggMessageError(f"{self.KIND}: public keys are not distinct", Refusal.DUPLICATE)
        body = b"".join(e.pack(self.KIND) for e in self.entries)
        return self._header() + struct.pack(">HHH", self.threshold, self.neighbours, len(self.entries)) + body

    @classmethod
    def from_payload(cls, payload: bytes) -> "Roster":
        reader, round_ = cls._open(payload, HEADER.size + 6 + MAX_SITES * KeyEntry.SIZE)
        threshold, neighbours = reader.uint(">H"), reader.uint(">H")
        entries = tuple(KeyEntry.unpack(reader) for _ in range(reader.count()))
        reader.end()
        msg = cls(round_, threshold, entries, neighbours)
        msg.to_payload()  # distinct sites and keys, threshold in range
        return msg


@dataclass(frozen=True)
class Shares(_Message):
    """§5 round 1 (ShareKeys): encrypted shares. Site -> aggregator: `site` is the sender and
    each entry's `peer` the receiver; aggregator -> site, the same shape: `site` is the
    receiver and `peer` the sender. Kind `secagg_shares`; 18 + 168·entries bytes."""

    KIND: ClassVar[str] = "secagg_shares"
    CODE: ClassVar[int] = 3
    round: int
    site: int
    entries: tuple[tuple[int, bytes], ...]

    def to_payload(self) -> bytes:
        _check_site(self.site, self.KIND)
        _check_unique([peer for peer, _ in self.entries], self.KIND)
        if any(peer == self.site for peer, _ in self.entries):
            raise SecaggMessageError(f"{self.KIND}: site {self.site} shares with itself", Refusal.BAD_ID)
        if any(len(ct) != SHARE_CIPHERTEXT for _, ct in self.entries):
            raise SecaggMessageError(f"{self.KIND}: ciphertexts are {SHARE_CIPHERTEXT} bytes", Refusal.WRONG_FIELDS)
        body = b"".join(struct.pack(">H", peer) + ct for peer, ct in self.entries)
        return self._header() + struct.pack(">HH", self.site, len(self.entries)) + body

    @classmethod
    def from_payload(cls, payload: bytes) -> "Shares":
        reader, round_ = cls._open(payload, HEADER.size + 4 + MAX_SITES * (2 + SHARE_CIPHERTEXT))
        site = reader.site()
        entries = tuple((reader.site(), reader.take(SHARE_CIPHERTEXT)) for _ in range(reader.count()))
        reader.end()
        msg = cls(round_, site, entries)
        msg.to_payload()
        return msg


@dataclass(frozen=True)
class MaskedInput(_Message):
    """Site -> aggregator, §5 round 2 (MaskedInputCollection): y_u in Z_{2^bits}^dim.
    Kind `secagg_masked`; 21 + dim·bits/8 bytes."""

    KIND: ClassVar[str] = "secagg_masked"
    CODE: ClassVar[int] = 4
    round: int
    site: int
    vector: np.ndarray  # uint32 or uint64

    def to_payload(self) -> bytes:
        _check_site(self.site, self.KIND)
        vec = np.asarray(self.vector)
        bits = vec.dtype.itemsize * 8
        if vec.ndim != 1 or vec.dtype.kind != "u" or bits not in DTYPES or not 1 <= vec.size <= MAX_DIM:
            raise SecaggMessageError(f"{self.KIND}: a vector of 1..{MAX_DIM} uint32/uint64 words", Refusal.WRONG_FIELDS)
        return self._header() + struct.pack(">HBI", self.site, bits, vec.size) + vec.astype(DTYPES[bits]).tobytes()

    @classmethod
    def from_payload(cls, payload: bytes) -> "MaskedInput":
        reader, round_ = cls._open(payload, HEADER.size + 7 + MAX_DIM * 8)
        site, bits, dim = reader.site(), reader.uint(">B"), reader.uint(">I")
        if bits not in DTYPES or not 1 <= dim <= MAX_DIM:
            raise SecaggMessageError(f"{cls.KIND}: {bits}-bit words x {dim}", Refusal.OUT_OF_RANGE)
        dtype = DTYPES[bits]
        vector = np.frombuffer(reader.take(dim * dtype.itemsize), dtype=dtype).astype(dtype.newbyteorder("="))
        reader.end()
        return cls(round_, site, vector)


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Aggregator -> sites, §5 round 4 (Unmasking): U3 (sites whose masked input arrived)
    and the dropped sites of U2 \\ U3. Kind `secagg_unmask_request`; 18 + 2·(|U3| + |dropped|) bytes."""

    KIND: ClassVar[str] = "secagg_unmask_request"
    CODE: ClassVar[int] = 5
    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_payload(self) -> bytes:
        _check_unique(list(self.survivors) + list(self.dropped), self.KIND)  # disjoint, too
        ids = [struct.pack(">H", len(group)) + b"".join(struct.pack(">H", i) for i in group)
               for group in (self.survivors, self.dropped)]
        return self._header() + b"".join(ids)

    @classmethod
    def from_payload(cls, payload: bytes) -> "UnmaskRequest":
        reader, round_ = cls._open(payload, HEADER.size + 4 + 2 * MAX_SITES)
        msg = cls(round_, reader.sites(), reader.sites())
        reader.end()
        msg.to_payload()
        return msg


@dataclass(frozen=True)
class UnmaskReply(_Message):
    """Site -> aggregator, §5 round 4: its shares of b_v for v in U3 and of s_v^SK for the
    dropped v. Kind `secagg_unmask`; 20 + 35·(|U3| + |dropped|) bytes."""

    KIND: ClassVar[str] = "secagg_unmask"
    CODE: ClassVar[int] = 6
    round: int
    site: int
    b_shares: tuple[tuple[int, bytes], ...]
    s_shares: tuple[tuple[int, bytes], ...]

    def to_payload(self) -> bytes:
        _check_site(self.site, self.KIND)
        _check_unique([v for v, _ in self.b_shares] + [v for v, _ in self.s_shares], self.KIND)
        if any(len(raw) != SHARE_BYTES for _, raw in self.b_shares + self.s_shares):
            raise SecaggMessageError(f"{self.KIND}: shares are {SHARE_BYTES} bytes", Refusal.WRONG_FIELDS)
        groups = [struct.pack(">H", len(g)) + b"".join(struct.pack(">H", v) + raw for v, raw in g)
                  for g in (self.b_shares, self.s_shares)]
        return self._header() + struct.pack(">H", self.site) + b"".join(groups)

    @classmethod
    def from_payload(cls, payload: bytes) -> "UnmaskReply":
        reader, round_ = cls._open(payload, HEADER.size + 6 + MAX_SITES * (2 + SHARE_BYTES))
        site = reader.site()
        groups = [tuple((reader.site(), reader.take(SHARE_BYTES)) for _ in range(reader.count())) for _ in range(2)]
        reader.end()
        msg = cls(round_, site, groups[0], groups[1])
        msg.to_payload()
        return msg


KINDS: Final = {m.KIND: m for m in (AdvertiseKeys, Roster, Shares, MaskedInput, UnmaskRequest, UnmaskReply)}
