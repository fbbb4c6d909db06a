"""Shared pytest fixtures: a real broker (Mosquitto and amqtt) and the C-MAPSS folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from turbofed.simulation.broker import BrokerHandle, find_mosquitto, start_broker

REPO = Path(__file__).resolve().parent.parent

# With CI=true a skipped test fails the run (tests/ci_gate.py).
pytest_plugins = ["tests.ci_gate"]


@pytest.fixture(scope="session", params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A broker on a free loopback port, started once per session for each kind.

    Tests share it: use topics and client ids unique to the test.
    """
    kind = request.param
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (not on PATH, /usr/sbin or /usr/local/sbin)")
    if kind == "amqtt":
        pytest.importorskip("amqtt", reason="amqtt is not installed: pip install 'turbofed[broker]'")
    with start_broker(embedded=(kind == "amqtt"), workdir=tmp_path_factory.mktemp(f"broker-{kind}")) as handle:
        yield handle


@pytest.fixture(scope="session")
def cmapss_dir() -> Path:
    """The C-MAPSS folder: $TURBOFED_TEST_CMAPSS, default <repo>/../shared/data/cmapss."""
    path = Path(os.environ.get("TURBOFED_TEST_CMAPSS") or REPO.parent / "shared" / "data" / "cmapss")
    if not path.is_dir():
        pytest.skip(f"C-MAPSS data not found at {path} (set TURBOFED_TEST_CMAPSS to the folder)")
    return path


PKI_SITES = ("site1", "site2", "site3", "site4")  # the sites tests run fleets of


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fleet identity folder for the session (`turbofed fleet init` on a fleet.toml of
    PKI_SITES): the aggregator's and every site's signing keys, the fleet id. Key generation
    is cheap, but one folder keeps the suite fast and every fleet of a test on real keys."""
    from turbofed.deploy.identities import init_from_fleet

    work = tmp_path_factory.mktemp("fleet-pki")
    fleet_toml = work / "fleet.toml"
    sites = ", ".join(f'"{s}"' for s in PKI_SITES)
    fleet_toml.write_text(f'sites = [{sites}]\nstore = "results.sqlite"\nregistry = "registry"\n')
    return init_from_fleet(fleet_toml).root
