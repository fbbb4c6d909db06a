"""Fleet identities: the certificate authority, the broker's certificate, one TLS client
identity per site, gateway and aggregator, the signing keys, the broker's ACL and CRL.

Why both TLS identities and signing keys: the broker (Mosquitto, `require_certificate` and
`use_identity_as_username`) admits only clients with a certificate from the fleet's CA and
its ACL lets each identity publish only its own topics; independently of the broker, the
aggregator and each site sign what they send (Ed25519, `turbofed.signing`), so a broker
operator or a mistaken ACL still cannot forge a model or an update.

Everything is built with `cryptography` (X.509 with ECDSA P-256, which every TLS stack
speaks; Ed25519 for message signatures). Private keys are written 0600 and never logged.
The folder (default `pki/` beside fleet.toml) is laid out as:

    fleet.json                fleet id, identities and their roles, revoked serials
    ca.crt  ca.key            the fleet's CA (keep ca.key offline once the fleet is set up)
    crl.pem                   revoked client certificates (Mosquitto `crlfile`)
    acl                       Mosquitto `acl_file`, generated from fleet.toml's sites
    broker/broker.crt  .key   the broker's TLS identity
    identities/<name>/client.crt  client.key     TLS identity (CN = name = MQTT username)
    identities/<name>/signing.key signing.pub    Ed25519 keys (aggregator and sites)

Roles: aggregator, site, gateway (`gateway-<site>`: publishes that site's sensor rows),
monitor (read-only, for dashboards and the demo's watcher) and region (a regional
aggregator and its broker's bridge to the central broker: aggregator/regional.py).

`turbofed fleet init|add|revoke|acl` (run_cli) drives it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from turbofed.config import BrokerSettings, load_fleet_config
from turbofed.files import write_atomic
from turbofed.pki import IdentityError, IdentityFolder, Role
from turbofed.topics import Topics, validate_id

log = logging.getLogger("turbofed.identities")

ROLES: tuple[Role, ...] = ("aggregator", "site", "gateway", "monitor", "region")
AGGREGATOR = "aggregator"
MONITOR = "monitor"  # read-only: dashboards, the demo's watcher
CERT_DAYS = 3 * 365
CA_DAYS = 10 * 365


def gateway_name(site: str) -> str:
    """The identity a site's sensor gateway (or the replay acting as one) connects as."""
    return f"gateway-{site}"


def client_settings(ids: FleetIdentities, name: str, broker: BrokerSettings) -> BrokerSettings:
    """`broker` with TLS as identity `name` of this folder (its certificate, key and the CA)."""
    if name not in ids.identities():
        raise IdentityError(f"{ids.root}: no active identity {name!r}")
    return replace(broker, tls=True, ca=str(ids.ca_cert), cert=str(ids.client_cert(name)), key=str(ids.client_key(name)))


# --------------------------------------------------------------------------- files

def _write_private(path: Path, data: bytes) -> None:
    """A private key: 0600 from the moment it exists."""
    write_atomic(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --------------------------------------------------------------------------- the folder

@dataclass(frozen=True)
class FleetIdentities(IdentityFolder):
    """A fleet's identity folder, with what creating and changing it needs (the layout and the
    manifest reading are `turbofed.pki.IdentityFolder`'s)."""

    def _write_manifest(self, doc: dict) -> None:
        _write_public(self.manifest, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def site_signing_keys(self) -> dict[str, bytes]:
        """Each active site's Ed25519 public key (raw 32 bytes): what the aggregator trusts."""
        return {name: load_public_key_bytes(self.signing_pub(name))
                for name, role in self.identities().items() if role == "site"}


def load_public_key_bytes(path: Path) -> bytes:
    """An Ed25519 public key file (PEM) as its raw 32 bytes."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path}: not a readable public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IdentityError(f"{path}: not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------- certificates

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "turbofed fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_ca(ids: FleetIdentities) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ids.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(ids.ca_key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise IdentityError(f"{exc.filename}: missing; the CA is needed to issue or revoke identities") from None
    except ValueError as exc:
        raise IdentityError(f"{ids.root}: CA certificate or key unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{ids.ca_key}: not an EC private key")
    return cert, key


def _issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *, server_hosts: list[str] | None = None
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server_hosts is not None:
        names: list[x509.GeneralName] = []
        for host in server_hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_crl(ids: FleetIdentities, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, serials: list[int]) -> None:
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CERT_DAYS)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    _write_public(ids.crl, builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


# --------------------------------------------------------------------------- operations

def init_fleet(root: Path, broker_hosts: list[str]) -> FleetIdentities:
    """A new CA, CRL and broker certificate in an empty (or new) folder. Refuses to touch a
    folder that already holds a fleet: keys are never overwritten."""
    ids = FleetIdentities(Path(root))
    if ids.manifest.exists() or ids.ca_key.exists():
        raise IdentityError(f"{ids.root}: already holds fleet identities; refusing to overwrite them")
    if not broker_hosts:
        raise IdentityError("the broker certificate needs at least one host name or address")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("turbofed fleet CA")).issuer_name(_name("turbofed fleet CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(ids.ca_key, _pem_key(ca_key))
    _write_public(ids.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    broker_cert, broker_key = _issue(ca_cert, ca_key, "turbofed broker", server_hosts=list(broker_hosts))
    _write_private(ids.broker_key, _pem_key(broker_key))
    _write_public(ids.broker_cert, broker_cert.public_bytes(serialization.Encoding.PEM))
    _write_crl(ids, ca_cert, ca_key, [])
    ids._write_manifest({"fleet_id": secrets.token_hex(16), "identities": {}, "revoked": [], "serials": {}})
    log.info("fleet identities created in %s (broker hosts: %s)", ids.root, ", ".join(broker_hosts))
    return ids


def add_identity(ids: FleetIdentities, name: str, role: Role) -> Path:
    """Issue a TLS client identity (CN = `name`) and, for the aggregator and sites, an
    Ed25519 signing key pair. Returns the identity's folder."""
    if role not in ROLES:
        raise IdentityError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    validate_id(name, "identity")
    doc = ids.read_manifest()
    if name in doc["identities"]:
        raise IdentityError(f"identity {name!r} exists already; revoke it first to replace it")
    if ids.identity_dir(name).exists():  # a revoked identity's files: keep them for audit
        os.replace(ids.identity_dir(name), ids.identity_dir(name).with_name(f"{name}.revoked-{_now():%Y%m%dT%H%M%S}"))
    ca_cert, ca_key = _load_ca(ids)
    cert, key = _issue(ca_cert, ca_key, name)
    folder = ids.identity_dir(name)
    _write_private(ids.client_key(name), _pem_key(key))
    _write_public(ids.client_cert(name), cert.public_bytes(serialization.Encoding.PEM))
    _write_public(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    if role in ("aggregator", "site", "region"):
        signing = ed25519.Ed25519PrivateKey.generate()
        _write_private(ids.signing_key(name), _pem_key(signing))
        _write_public(ids.signing_pub(name), signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if role in ("site", "region") and ids.signing_pub(AGGREGATOR).is_file():
        _write_public(folder / "aggregator.pub", ids.signing_pub(AGGREGATOR).read_bytes())
    doc["identities"][name] = role
    doc.setdefault("serials", {})[name] = cert.serial_number
    ids._write_manifest(doc)
    log.info("issued identity %s (%s)", name, role)
    return folder


def revoke_identity(ids: FleetIdentities, name: str) -> None:
    """Revoke `name`: its certificate goes on the CRL (the broker refuses it at connect), its
    signing key stops being trusted, and it leaves the ACL. The name may be issued again later
    (a replaced device): the new certificate has a new serial and a new signing key."""
    doc = ids.read_manifest()
    if name not in doc["identities"]:
        raise IdentityError(f"no active identity {name!r} (known: {', '.join(sorted(doc['identities'])) or 'none'})")
    role = doc["identities"].pop(name)
    doc["revoked"].append({"name": name, "role": role, "serial": doc.get("serials", {}).pop(name, None), "at": _now().isoformat()})
    ca_cert, ca_key = _load_ca(ids)
    _write_crl(ids, ca_cert, ca_key, [r["serial"] for r in doc["revoked"] if r.get("serial") is not None])
    ids._write_manifest(doc)
    log.info("revoked identity %s (%s)", name, role)


def acl_text(ids: FleetIdentities, sites: list[str], topics: Topics | Sequence[Topics],
             regions: dict[str, tuple[str, ...]] | None = None, workers: Sequence[str] = ()) -> str:
    """The Mosquitto ACL: a site publishes only under its own sites/<site>/ and reads only the
    round, the global model, the stats request, the secure-sum roster and unmask request, the
    shares addressed to it, and its own plant topics; a site's gateway
    publishes only plant/<site>/...; only the aggregator publishes round, global and stats
    request and reads the sites' topics; the monitor only reads. Revoked identities are
    absent (no access at all). Several topic roots (fleets sharing one broker) each get
    the same rules. A region (`regions`: region -> its sites) is both a regional aggregator
    and its broker's bridge to the central broker: it reads the round, global model, stats
    request and its sites' topics, publishes its partial, and relays its sites' reports (each
    signed by its site) to the central broker. An ingestion worker (`workers`, role region)
    reads the round, global model and every site's update, stats and status (its update
    subscription is shared, `$share/<group>/...`: Mosquitto 2.0.11 grants it with this read
    rule) and publishes its partial."""
    roots = [topics] if isinstance(topics, Topics) else list(topics)
    active = ids.identities()
    lines = ["# Generated by `turbofed fleet` from fleet.toml and the identity folder. Do not edit:",
             "# regenerate it, then reload Mosquitto (SIGHUP).", ""]

    def user(name: str, rules: list[str]) -> None:
        lines.extend([f"user {name}", *rules, ""])

    if active.get(AGGREGATOR) == "aggregator":
        user(AGGREGATOR, [f"topic readwrite {t.root}/#" for t in roots])
    if active.get(MONITOR) == "monitor":
        user(MONITOR, [f"topic read {t.root}/#" for t in roots])
    for site in sites:
        if active.get(site) == "site":
            user(site, [rule for t in roots for rule in (
                f"topic write {t.root}/sites/{site}/#",
                f"topic read {t.round}", f"topic read {t.global_model}", f"topic read {t.stats_request}",
                f"topic read {t.secagg_roster}", f"topic read {t.secagg_unmask}", f"topic read {t.secagg_inbox(site)}",
                f"topic read {t.plant_root}/{site}/#")])
        gateway = gateway_name(site)
        if active.get(gateway) == "gateway":
            user(gateway, [f"topic write {t.plant_root}/{site}/#" for t in roots])
    for region, members in (regions or {}).items():
        if active.get(region) == "region":
            user(region, [rule for t in roots for rule in (
                f"topic read {t.round}", f"topic read {t.global_model}", f"topic read {t.stats_request}",
                f"topic write {t.partial(region)}",
                *(f"topic readwrite {t.root}/sites/{site}/#" for site in members))])
    for worker in workers:
        if active.get(worker) == "region":
            user(worker, [rule for t in roots for rule in (
                f"topic read {t.round}", f"topic read {t.global_model}", f"topic write {t.partial(worker)}",
                *(f"topic read {t.all_sites(kind)}" for kind in ("update", "stats", "status")))])
    return "\n".join(lines)


def write_acl(ids: FleetIdentities, sites: list[str], topics: Topics | Sequence[Topics],
              regions: dict[str, tuple[str, ...]] | None = None, workers: Sequence[str] = ()) -> Path:
    """Write the ACL file the broker's `acl_file` names (reload the broker to apply it)."""
    _write_public(ids.acl, acl_text(ids, sites, topics, regions, workers).encode())
    return ids.acl


def init_from_fleet(fleet_toml: Path, root: Path | None = None, broker_hosts: list[str] | None = None) -> FleetIdentities:
    """`turbofed fleet init`: CA, broker certificate, the aggregator, every site of fleet.toml and
    its gateway, every region of its [regions], and the ACL, in `root` (default: pki/ beside fleet.toml)."""
    config = load_fleet_config(fleet_toml, keys=False)  # the keys are what we are about to create
    root = root or Path(fleet_toml).resolve().parent / "pki"
    hosts = broker_hosts or sorted({config.broker.host, "127.0.0.1", "localhost"})
    topics = Topics(config.broker.topic_root, config.broker.plant_root)
    ids = init_for_sites(root, list(config.sites), topics, hosts)
    if config.regions or config.workers:
        for region in (*config.regions, *config.workers):
            add_identity(ids, region, "region")
        write_acl(ids, list(config.sites), topics, config.regions, config.workers)
    return ids


def init_for_sites(root: Path, sites: list[str], topics: Topics, broker_hosts: list[str]) -> FleetIdentities:
    """A new identity folder: CA, broker certificate, aggregator, monitor, each site and its
    gateway, and the ACL (what `fleet init` does once it has read fleet.toml)."""
    ids = init_fleet(root, broker_hosts)
    add_identity(ids, AGGREGATOR, "aggregator")
    add_identity(ids, MONITOR, "monitor")
    for site in sites:
        add_identity(ids, site, "site")
        add_identity(ids, gateway_name(site), "gateway")
    write_acl(ids, sites, topics)
    return ids


def run_cli(args: argparse.Namespace) -> int:
    fleet_toml = Path(args.fleet)
    root = Path(args.pki) if args.pki else fleet_toml.resolve().parent / "pki"
    config = load_fleet_config(fleet_toml, keys=False)
    topics = Topics(config.broker.topic_root, config.broker.plant_root)
    if args.fleet_command == "init":
        ids = init_from_fleet(fleet_toml, root, args.broker_host or None)
        print(f"fleet identities for {len(config.sites)} site(s) written to {ids.root} (fleet id {ids.fleet_id}); "
              f"keep {ids.ca_key} offline once every device is set up")
        return 0
    ids = FleetIdentities(root)
    if args.fleet_command == "add":
        if args.name not in config.sites and args.role == "site":
            raise IdentityError(f"site {args.name!r} is not in {fleet_toml}'s sites: add it there first")
        if args.name not in config.regions and args.name not in config.workers and args.role == "region":
            raise IdentityError(f"region {args.name!r} is not in {fleet_toml}'s [regions] or workers: add it there first")
        folder = add_identity(ids, args.name, args.role)
        if args.role == "site" and gateway_name(args.name) not in ids.identities():
            add_identity(ids, gateway_name(args.name), "gateway")
        print(f"identity {args.name} written to {folder}")
    elif args.fleet_command == "revoke":
        revoke_identity(ids, args.name)
        print(f"revoked {args.name}; reload the broker (SIGHUP, or restart it) so the CRL and ACL take effect")
    write_acl(ids, list(config.sites), topics, config.regions, config.workers)
    return 0
