"""systemd units for turbofed's long-running services, from one template.

The edge agent (written into every `turbofed flash` bundle) and the aggregator get the same
unit, `templates/turbofed.service`: unprivileged user, state in /var/lib/turbofed (the only
writable folder), restart on failure, SIGTERM with 30 s to save state, the same hardening.
Only what differs is filled in, so a fix to one service's unit reaches the other.

The aggregator's unit, for a server with turbofed installed in a virtual environment:

    python -m turbofed.deploy.units aggregator --config /etc/turbofed/fleet.toml > /etc/systemd/system/turbofed-aggregator.service
    systemctl daemon-reload && systemctl enable --now turbofed-aggregator

Its fleet.toml must put `store` and `registry` under /var/lib/turbofed (absolute paths):
everything else is read-only to the service.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from turbofed.errors import TurbofedError

TEMPLATES = Path(__file__).resolve().parent / "templates"
SERVICE_USER = "turbofed"
VENV = "/opt/turbofed/venv"
EDGE_UNIT = "turbofed-edge.service"
AGGREGATOR_UNIT = "turbofed-aggregator.service"
EDGE_CONFIG = "/etc/turbofed/edge.toml"
FLEET_CONFIG = "/etc/turbofed/fleet.toml"
STATE_ROOT = "/var/lib/turbofed"


class TemplateError(TurbofedError):
    """A template placeholder had no value."""


def render(template: str, values: dict[str, str]) -> str:
    """Fill @@NAME@@ placeholders of a file in templates/; every placeholder must be known."""
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    left = sorted(set(re.findall(r"@@([A-Z_]+)@@", text)))
    if left:
        raise TemplateError(f"template {template}: no value for {', '.join(left)}")
    return text


def _unit(name: str, what: str, role: str, args: str, state_note: str, on_stop: str, written_by: str,
          after: str = "network-online.target", user: str = SERVICE_USER, venv: str = VENV) -> str:
    return render("turbofed.service", {
        "UNIT": name, "WHAT": what, "ROLE": role, "ARGS": args, "STATE_NOTE": state_note, "ON_STOP": on_stop,
        "WRITTEN_BY": written_by, "AFTER": after, "USER": user, "VENV": venv,
    })


def edge_unit(site: str, profile: str, config: str = EDGE_CONFIG, user: str = SERVICE_USER, venv: str = VENV) -> str:
    """The edge agent's unit, as `turbofed flash` writes it into a bundle."""
    return _unit(EDGE_UNIT, f"edge agent (site {site}, {profile} profile)", "agent",
                 f"edge --config {config} --profile {profile}",
                 f"the agent keeps its state (training buffer, models, engine histories) under {STATE_ROOT}/{site}.",
                 "saves its state", "`turbofed flash`; installed by the bundle's install.sh", user=user, venv=venv)


def aggregator_unit(config: str = FLEET_CONFIG, user: str = SERVICE_USER, venv: str = VENV) -> str:
    """The aggregator's unit; it starts after a Mosquitto on the same machine, if there is one."""
    return _unit(AGGREGATOR_UNIT, "aggregator", "aggregator", f"aggregator --config {config}",
                 f"the fleet config's store and registry (checkpoints) must be under {STATE_ROOT}.",
                 "closes its results store and registry", "`python -m turbofed.deploy.units aggregator`",
                 after="network-online.target mosquitto.service", user=user, venv=venv)


def main(argv: list[str] | None = None) -> int:
    """Print a unit: `python -m turbofed.deploy.units aggregator|edge [options]`."""
    p = argparse.ArgumentParser(prog="python -m turbofed.deploy.units", description="print a turbofed systemd unit")
    p.add_argument("service", choices=("aggregator", "edge"), help="which service the unit runs")
    p.add_argument("--config", help=f"config file (default {FLEET_CONFIG} or {EDGE_CONFIG})")
    p.add_argument("--venv", default=VENV, help="virtual environment holding turbofed")
    p.add_argument("--user", default=SERVICE_USER, help=f"system user the service runs as (default {SERVICE_USER})")
    p.add_argument("--site", help="edge: the site id")
    p.add_argument("--profile", choices=("training", "inference"), default="training",
                   help="edge: inference predicts only, no scikit-learn (default training)")
    a = p.parse_args(argv)
    if a.service == "aggregator":
        print(aggregator_unit(a.config or FLEET_CONFIG, a.user, a.venv), end="")
    elif not a.site:
        p.error("edge needs --site")
    else:
        print(edge_unit(a.site, a.profile, a.config or EDGE_CONFIG, a.user, a.venv), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
