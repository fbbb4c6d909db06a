"""Signed messages: how every turbofed message carries its sender's Ed25519 signature, and
how a receiver checks it. One module, used by the agent and the aggregator alike.

Why: the broker is a relay its operator controls and an ACL can be wrong; a signature made
with a key only the aggregator (or one site) holds lets a receiver check who produced a
message whatever path it took (docs/protocol.md, "Signed messages").

- JSON messages travel inside a wrapper object that signs EXACT bytes: the message's own
  JSON text is a string field, so nothing is re-canonicalised after parsing::

      {"fleet": F, "signer": S, "round": R, "version": V, "sig": B64, "signed": "<message JSON>"}

  `sig` signs `signing.statement(fleet=F, kind=<message kind>, signer=S, round=R, version=V,
  body_sha256=sha256(UTF-8 of the signed text))`. R and V are the round and model version
  the message speaks of (0 where it speaks of none); the receiver checks them against the
  parsed message (`Opened.expect`).
- Weights envelopes carry the signature in the header's `sig` and the fleet id in `fleet`;
  the statement binds kind, site (the signer), round, model version, body SHA-256, samples
  and the fleet epoch.

A receiver refuses (SignatureError, a Refused): no signature (`unsigned`), another fleet
(`wrong_fleet`), a signer other than the topic's site (`wrong_sender`), a signer it has no
key for (`unknown_signer`: unknown or revoked), a signature that does not verify
(`bad_signature`).

`insecure_unsigned = true` in a config gives `Unsigned`: messages go out as the bare JSON
or an envelope with `sig` null and nothing is verified. It exists for the development
broker and tests of unrelated things, and says so loudly when a process starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from turbofed import envelope
from turbofed.envelope import Envelope, encode_json
from turbofed.errors import ConfigError
from turbofed.messages._check import json_body, required, whole
from turbofed.pki import IdentityError, IdentityFolder
from turbofed.refusals import Refusal
from turbofed.signing import KeyFileError, SignatureError, SigningKey, TrustedKeys, body_digest, load_public_key, statement

log = logging.getLogger("turbofed.signed")

AGGREGATOR: Final = "aggregator"  # the aggregator's signer name (and the `site` of its envelopes)

# The statement `kind` of each JSON message (weights envelopes use their envelope kind).
ROUND: Final = "round"
STATS_REQUEST: Final = "stats_request"
STATS: Final = "stats"
STATUS: Final = "status"
METRICS: Final = "metrics"
EVALUATION: Final = "evaluation"
PREDICTIONS: Final = "predictions"
TELEMETRY: Final = "telemetry"

def warn_if_unsigned(sealer: "Sealer | Unsigned", who: str) -> None:
    """The loud start-up warning of `insecure_unsigned` (after the process's own checks passed)."""
    if not sealer.signed:
        log.warning(INSECURE_WARNING, who)


INSECURE_WARNING: Final = (
    "INSECURE: %s runs with insecure_unsigned = true: messages are neither signed nor verified, so any client "
    "of the broker can forge rounds, models, updates and reports. Use it only with the development broker."
)


@dataclass(frozen=True)
class Opened:
    """A message whose signature checked out (or, unsigned mode, was not asked for)."""

    signer: str
    round: int
    version: int
    body: bytes  # the message's JSON bytes, exactly as signed
    signed: bool = True

    def expect(self, *, round: int, version: int) -> None:  # noqa: A002 - the protocol's name
        """The parsed message must speak of the round and version its signature binds."""
        if self.signed and (round, version) != (self.round, self.version):
            raise SignatureError(
                f"signed for round {self.round} v{self.version}, but the message says round {round} v{version}",
                Refusal.BAD_SIGNATURE,
            )


class Sealer:
    """Signs what one identity sends in one fleet."""

    signed = True

    def __init__(self, fleet: str, key: SigningKey) -> None:
        self.fleet, self.key = fleet, key

    @property
    def name(self) -> str:
        return self.key.name

    def seal(self, kind: str, body: bytes, *, round: int = 0, version: int = 0) -> bytes:  # noqa: A002
        """A JSON message (`body`, from `to_payload()`) wrapped with its signature."""
        sig = self.key.sign(statement(fleet=self.fleet, kind=kind, signer=self.name, round=round, version=version,
                                      body_sha256=body_digest(body)))
        return encode_json({"fleet": self.fleet, "signer": self.name, "round": round, "version": version, "sig": sig,
                            "signed": body.decode("utf-8")})

    def envelope(self, *, kind: str, round: int, model_version: int, samples: int, body: bytes, epoch: int = 0) -> bytes:  # noqa: A002
        """A weights envelope signed in its `sig` header field."""
        sig = self.key.sign(statement(fleet=self.fleet, kind=kind, signer=self.name, round=round, version=model_version,
                                      body_sha256=body_digest(body), samples=samples, epoch=epoch))
        return envelope.encode(kind=kind, site=self.name, round=round, model_version=model_version, samples=samples,
                               body=body, sig=sig, fleet=self.fleet)


class Verifier:
    """Checks messages of one fleet against the keys this receiver trusts."""

    signed = True

    def __init__(self, fleet: str, trusted: TrustedKeys) -> None:
        self.fleet, self.trusted = fleet, trusted

    def open(self, kind: str, payload: bytes, *, signer: str) -> Opened:
        """Unwrap a signed JSON message from `signer` (the topic's site, or the aggregator)."""
        what = f"{kind} from {signer}"
        wrapper = json_body(payload, what)
        if "sig" not in wrapper or "signed" not in wrapper:
            raise SignatureError(f"{what} is not signed", Refusal.UNSIGNED)
        if wrapper.get("fleet") != self.fleet:
            raise SignatureError(f"{what} is signed for fleet {wrapper.get('fleet')!r:.60}, not this fleet", Refusal.WRONG_FLEET)
        named = required(wrapper, "signer", what)
        if named != signer:
            raise SignatureError(f"{what} is signed by {named!r:.60}", Refusal.WRONG_SENDER)
        text, sig = wrapper["signed"], wrapper["sig"]
        if not isinstance(text, str) or not (sig is None or isinstance(sig, str)):
            raise SignatureError(f"{what}: 'signed' must be the message text and 'sig' a string", Refusal.BAD_SIGNATURE)
        number = whole(required(wrapper, "round", what), f"{what} round")
        version = whole(required(wrapper, "version", what), f"{what} version")
        body = text.encode("utf-8", errors="surrogatepass")
        self.trusted.verify(signer, sig, statement(fleet=self.fleet, kind=kind, signer=signer, round=number,
                                                   version=version, body_sha256=body_digest(body)))
        return Opened(signer, number, version, body)

    def check_envelope(self, env: Envelope, *, signer: str, epoch: int = 0) -> None:
        """A decoded weights envelope must carry `signer`'s signature for this fleet."""
        what = f"{env.kind} envelope from {env.site}"
        if env.sig is None:
            raise SignatureError(f"{what} is not signed", Refusal.UNSIGNED)
        if env.fleet != self.fleet:
            raise SignatureError(f"{what} is signed for fleet {env.fleet!r:.60}, not this fleet", Refusal.WRONG_FLEET)
        if env.site != signer:
            raise SignatureError(f"{what} arrived as {signer!r}'s", Refusal.WRONG_SENDER)
        self.trusted.verify(signer, env.sig, statement(fleet=self.fleet, kind=env.kind, signer=signer, round=env.round,
                                                       version=env.model_version, body_sha256=env.sha256,
                                                       samples=env.samples, epoch=epoch))


class Unsigned:
    """`insecure_unsigned = true`: the Sealer's and Verifier's interface, signing and checking nothing."""

    signed = False

    def __init__(self, name: str) -> None:
        self.name = name

    def seal(self, kind: str, body: bytes, *, round: int = 0, version: int = 0) -> bytes:  # noqa: A002, ARG002
        return body

    def envelope(self, *, kind: str, round: int, model_version: int, samples: int, body: bytes, epoch: int = 0) -> bytes:  # noqa: A002, ARG002
        return envelope.encode(kind=kind, site=self.name, round=round, model_version=model_version, samples=samples, body=body)

    def open(self, kind: str, payload: bytes, *, signer: str) -> Opened:  # noqa: ARG002
        return Opened(signer, 0, 0, bytes(payload), signed=False)

    def check_envelope(self, env: Envelope, *, signer: str, epoch: int = 0) -> None:  # noqa: ARG002
        return None


# --- keys from configs -------------------------------------------------------------------


def site_keys(site: str, fleet_id: str | None, signing_key: str | None, aggregator_key: str | None
              ) -> tuple[Sealer | Unsigned, Verifier | Unsigned]:
    """An agent's sealer (its own key) and verifier (the pinned aggregator key); both
    `Unsigned` when the site config has no [identity] (insecure_unsigned, checked at load)."""
    if fleet_id is None or signing_key is None or aggregator_key is None:
        return Unsigned(site), Unsigned(site)
    try:
        trusted = TrustedKeys({AGGREGATOR: load_public_key(aggregator_key)})
        return Sealer(fleet_id, SigningKey.load(site, signing_key)), Verifier(fleet_id, trusted)
    except KeyFileError as exc:
        raise ConfigError(f"site {site} [identity]: {exc}") from None


@dataclass(frozen=True)
class FleetKeys:
    """What the aggregator reads from the fleet's identity folder (docs/protocol.md): the
    fleet id, its own signing key and every active site's public key (revoked sites are
    absent from fleet.json's identities, so their signatures are refused)."""

    fleet_id: str
    aggregator: SigningKey
    sites: TrustedKeys

    @classmethod
    def load(cls, pki: str | Path) -> "FleetKeys":
        """Read `pki` (laid out by `turbofed fleet init`, turbofed/deploy/identities.py)."""
        folder = IdentityFolder(Path(pki))
        try:
            doc = folder.read_manifest()
            own = SigningKey.load(AGGREGATOR, folder.signing_key(AGGREGATOR))
            sites = {name: load_public_key(folder.signing_pub(name)) for name, role in doc["identities"].items() if role == "site"}
        except (IdentityError, KeyFileError) as exc:
            raise ConfigError(str(exc)) from None
        return cls(doc["fleet_id"], own, TrustedKeys(sites))


@dataclass(frozen=True)
class RegionKeys:
    """What a regional aggregator reads from (a copy of) the fleet's identity folder: the
    fleet id, its own signing key, the aggregator's public key (round announcements, global
    models) and every active site's public key (updates); no private key but its own."""

    fleet_id: str
    region: SigningKey
    aggregator: TrustedKeys
    sites: TrustedKeys

    @classmethod
    def load(cls, pki: str | Path, region: str) -> "RegionKeys":
        folder = IdentityFolder(Path(pki))
        try:
            doc = folder.read_manifest()
            if doc["identities"].get(region) != "region":
                raise ConfigError(f"{folder.root}: no active identity {region!r} with role region "
                                  f"(turbofed fleet add {region} --role region)")
            own = SigningKey.load(region, folder.signing_key(region))
            aggregator = TrustedKeys({AGGREGATOR: load_public_key(folder.signing_pub(AGGREGATOR))})
            sites = {name: load_public_key(folder.signing_pub(name)) for name, role in doc["identities"].items() if role == "site"}
        except (IdentityError, KeyFileError) as exc:
            raise ConfigError(str(exc)) from None
        return cls(doc["fleet_id"], own, aggregator, TrustedKeys(sites))


def region_keys(pki: str | None, region: str) -> tuple[Sealer | Unsigned, Verifier | Unsigned, Verifier | Unsigned]:
    """A regional aggregator's sealer (its partials), its verifier of the aggregator's
    messages and its verifier of site updates; all `Unsigned` without `pki`."""
    if pki is None:
        return Unsigned(region), Unsigned(region), Unsigned(region)
    keys = RegionKeys.load(pki, region)
    return (Sealer(keys.fleet_id, keys.region), Verifier(keys.fleet_id, keys.aggregator),
            Verifier(keys.fleet_id, keys.sites))


def partial_verifier(pki: str | None, regions: list[str]) -> Verifier | Unsigned:
    """The top aggregator's verifier of regional partials: each region's public key, from
    identities of role region (a region the folder does not hold is a ConfigError)."""
    if pki is None:
        return Unsigned(AGGREGATOR)
    folder = IdentityFolder(Path(pki))
    try:
        doc = folder.read_manifest()
        missing = [r for r in regions if doc["identities"].get(r) != "region"]
        if missing:
            raise ConfigError(f"{folder.root}: no active identity with role region for {', '.join(missing)} "
                              f"(turbofed fleet add NAME --role region)")
        keys = {r: load_public_key(folder.signing_pub(r)) for r in regions}
    except (IdentityError, KeyFileError) as exc:
        raise ConfigError(str(exc)) from None
    return Verifier(doc["fleet_id"], TrustedKeys(keys))


def aggregator_keys(pki: str | None) -> tuple[Sealer | Unsigned, Verifier | Unsigned]:
    """The aggregator's sealer and its verifier of site messages; `Unsigned` without `pki`
    (insecure_unsigned, checked at load)."""
    if pki is None:
        return Unsigned(AGGREGATOR), Unsigned(AGGREGATOR)
    keys = FleetKeys.load(pki)
    return Sealer(keys.fleet_id, keys.aggregator), Verifier(keys.fleet_id, keys.sites)


__all__ = [
    "AGGREGATOR", "METRICS", "PREDICTIONS", "ROUND", "STATS", "STATS_REQUEST", "STATUS", "TELEMETRY", "FleetKeys",
    "Opened", "RegionKeys", "Sealer", "SignatureError", "TrustedKeys", "Unsigned", "Verifier", "aggregator_keys", "partial_verifier", "region_keys", "site_keys", "warn_if_unsigned",
]
