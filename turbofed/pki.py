"""The layout of a fleet's identity folder (`turbofed fleet init` writes it; see
turbofed/deploy/identities.py), read-only: the one place that knows where each file is and
how to read the manifest. The aggregator reads its keys through it; the deploy room writes.

    fleet.json                fleet id, identities and their roles, revoked serials
    ca.crt  ca.key  crl.pem   the fleet's CA and its revocation list
    acl                       Mosquitto `acl_file`
    broker/broker.crt  .key   the broker's TLS identity
    identities/<name>/        client.crt client.key (TLS), signing.key signing.pub (Ed25519)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from turbofed.errors import TurbofedError
from turbofed.topics import validate_id

Role = Literal["aggregator", "site", "gateway", "monitor", "region"]


class IdentityError(TurbofedError):
    """The fleet's identity folder is missing, incomplete, or asked to do something unsafe."""


@dataclass(frozen=True)
class IdentityFolder:
    """A fleet's identity folder, read-only: where each file is, and the manifest."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def broker_cert(self) -> Path:
        return self.root / "broker" / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker" / "broker.key"

    @property
    def manifest(self) -> Path:
        return self.root / "fleet.json"

    def identity_dir(self, name: str) -> Path:
        if validate_id(name, "identity") in (".", ".."):
            raise IdentityError(f"invalid identity name {name!r}")
        return self.root / "identities" / name

    def client_cert(self, name: str) -> Path:
        return self.identity_dir(name) / "client.crt"

    def client_key(self, name: str) -> Path:
        return self.identity_dir(name) / "client.key"

    def signing_key(self, name: str) -> Path:
        return self.identity_dir(name) / "signing.key"

    def signing_pub(self, name: str) -> Path:
        return self.identity_dir(name) / "signing.pub"

    # --- the manifest: fleet id, identities, revocations ---
    def read_manifest(self) -> dict:
        try:
            doc = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            raise IdentityError(f"{self.manifest}: not found: no fleet identities here (run `turbofed fleet init`)") from None
        except (OSError, ValueError) as exc:
            raise IdentityError(f"{self.manifest}: unreadable: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("fleet_id"), str) or not isinstance(doc.get("identities"), dict):
            raise IdentityError(f"{self.manifest}: not a turbofed fleet manifest (fleet_id, identities)")
        doc.setdefault("revoked", [])
        return doc

    @property
    def fleet_id(self) -> str:
        return self.read_manifest()["fleet_id"]

    def identities(self) -> dict[str, Role]:
        """Active identities and their roles (revoked ones excluded)."""
        return dict(self.read_manifest()["identities"])

    def revoked(self) -> set[str]:
        """Names revoked and not issued again."""
        doc = self.read_manifest()
        return {r["name"] for r in doc["revoked"]} - set(doc["identities"])
