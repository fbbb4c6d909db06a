"""Signatures bind fleet, kind, signer, round, version and body; every change is refused."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from turbofed.deploy.identities import AGGREGATOR, add_identity, init_fleet
from turbofed.signing import SignatureError, SigningKey, TrustedKeys, body_digest, statement


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, SigningKey, TrustedKeys]:
    ids = init_fleet(tmp_path_factory.mktemp("pki") / "pki", ["127.0.0.1"])
    add_identity(ids, AGGREGATOR, "aggregator")
    add_identity(ids, "site1", "site")
    aggregator = SigningKey.load(AGGREGATOR, ids.signing_key(AGGREGATOR))
    site = SigningKey.load("site1", ids.signing_key("site1"))
    trusted = TrustedKeys.from_files({AGGREGATOR: ids.signing_pub(AGGREGATOR)})
    return aggregator, site, trusted


BASE = dict(fleet="f" * 32, kind="global", signer=AGGREGATOR, round=3, version=3, body_sha256=body_digest(b"model"))


def test_a_valid_signature_verifies(keys) -> None:
    aggregator, _, trusted = keys
    trusted.verify(AGGREGATOR, aggregator.sign(statement(**BASE)), statement(**BASE))


@pytest.mark.parametrize("field, value", [
    ("fleet", "e" * 32), ("kind", "round"), ("round", 4), ("version", 2**53 - 1), ("body_sha256", body_digest(b"other")),
])
def test_any_changed_field_is_refused(keys, field: str, value) -> None:
    aggregator, _, trusted = keys
    sig = aggregator.sign(statement(**BASE))
    with pytest.raises(SignatureError) as err:
        trusted.verify(AGGREGATOR, sig, statement(**{**BASE, field: value}))
    assert err.value.reason == "bad_signature"


def test_another_key_unknown_signer_and_no_signature_are_refused(keys) -> None:
    _, site, trusted = keys
    forged = site.sign(statement(**BASE))  # a site's own key, claiming to be the aggregator
    with pytest.raises(SignatureError) as err:
        trusted.verify(AGGREGATOR, forged, statement(**BASE))
    assert err.value.reason == "bad_signature"
    with pytest.raises(SignatureError) as err:
        trusted.verify("site1", forged, statement(**{**BASE, "signer": "site1"}))
    assert err.value.reason == "unknown_signer"
    for missing in (None, ""):
        with pytest.raises(SignatureError) as err:
            trusted.verify(AGGREGATOR, missing, statement(**BASE))
        assert err.value.reason == "unsigned"
    for junk in ("not base64!", base64.b64encode(b"x" * 63).decode()):
        with pytest.raises(SignatureError) as err:
            trusted.verify(AGGREGATOR, junk, statement(**BASE))
        assert err.value.reason == "bad_signature"


def test_statements_are_unambiguous() -> None:
    """Moving a character from one field to the next changes the signed bytes."""
    a = statement(**{**BASE, "fleet": "ab", "kind": "c"})
    b = statement(**{**BASE, "fleet": "a", "kind": "bc"})
    assert a != b


def test_an_unreadable_signing_key_is_a_clear_error(keys, tmp_path: Path) -> None:
    bad = tmp_path / "signing.key"
    bad.write_text("not a key")
    from turbofed.signing import KeyFileError

    with pytest.raises(KeyFileError, match="signing.key: cannot read signing key"):
        SigningKey.load("site1", bad)
