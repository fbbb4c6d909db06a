"""Shared pytest fixtures: a real broker (Mosquitto with TLS, client certificates and the
fleet's ACL; amqtt as the insecure development broker), the session's fleet identities
and the C-MAPSS folder."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from turbofed.deploy.identities import FleetIdentities
from turbofed.simulation.broker import BrokerHandle, find_mosquitto, start_broker

REPO = Path(__file__).resolve().parent.parent

# With CI=true a skipped test fails the run (tests/ci_gate.py).
pytest_plugins = ["tests.ci_gate"]


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetIdentities:
    """One set of fleet identities for the whole session (CA, broker, aggregator, monitor,
    site1..site4 and their gateways, ACL, CRL): `fleet init` once, not per test."""
    from tests.livefleet import make_session_pki

    return make_session_pki(tmp_path_factory.mktemp("fleet-pki"))


@pytest.fixture(scope="session", params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A broker on a free loopback port, started once per session for each kind: Mosquitto
    runs the secure setup with the session's identities (connect with
    `broker.settings(identity)`), amqtt the insecure development broker.

    Tests share it: use topics and client ids unique to the test; a test fleet's topic roots
    go into the ACL with `tests.livefleet.admit_topics`.
    """
    kind = request.param
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (not on PATH, /usr/sbin or /usr/local/sbin)")
    if kind == "amqtt":
        pytest.importorskip("amqtt", reason="amqtt is not installed: pip install 'turbofed[broker]'")
    pki = request.getfixturevalue("fleet_pki") if kind == "mosquitto" else None
    with start_broker(embedded=(kind == "amqtt"), workdir=tmp_path_factory.mktemp(f"broker-{kind}"), pki=pki) as handle:
        yield handle


@pytest.fixture(scope="session")
def cmapss_dir() -> Path:
    """The C-MAPSS folder: $TURBOFED_TEST_CMAPSS, default <repo>/../shared/data/cmapss."""
    path = Path(os.environ.get("TURBOFED_TEST_CMAPSS") or REPO.parent / "shared" / "data" / "cmapss")
    if not path.is_dir():
        pytest.skip(f"C-MAPSS data not found at {path} (set TURBOFED_TEST_CMAPSS to the folder)")
    return path


@pytest.fixture(scope="session")
def pki_dir(fleet_pki: FleetIdentities) -> Path:
    """The session's identity folder as a path (what `pki = ...` in a fleet config names)."""
    return fleet_pki.root


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs) that fills up, unmounted afterwards. Mounting needs
    root, which CI has (and under CI=true a skip fails the run)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path) -> Path:
    """Take every free byte of the filesystem holding `folder`; the filler file (delete it to free them)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler

