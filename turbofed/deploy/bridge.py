"""The Mosquitto bridge of a regional broker (broker_config/bridge.conf.template), rendered
for one region: the topics that cross and which way, and TLS to the central broker as the
region's identity (CN = region id, so the central broker's ACL applies to it).

`turbofed fleet bridge --fleet fleet.toml --region R --central HOST:PORT` prints it (or
writes it with --out); `render_bridge` is what the CLI, the live test and `turbofed bench
scale --topology two-level` use. docs/scaling.md shows a whole two-level set-up.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

import turbofed.broker_config
from turbofed.config import load_fleet_config
from turbofed.errors import ConfigError
from turbofed.pki import IdentityFolder
from turbofed.topics import Topics, validate_id

TEMPLATE = Path(turbofed.broker_config.__file__).resolve().parent / "bridge.conf.template"


@dataclass(frozen=True)
class BridgeTLS:
    """The region's TLS identity towards the central broker (files of the fleet's identity folder)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, pki: IdentityFolder, region: str) -> "BridgeTLS":
        return cls(pki.ca_cert.resolve(), pki.client_cert(region).resolve(), pki.client_key(region).resolve())


def render_bridge(region: str, central_host: str, central_port: int, topics: Topics, tls: BridgeTLS | None) -> str:
    """The bridge section for `region`'s broker. `tls` None: plain MQTT to the central broker,
    for a loopback development set-up and the benchmark only (said so in the output)."""
    validate_id(region, "region id")
    if tls is None:
        lines = "# INSECURE: plain MQTT to the central broker (loopback development and benchmarks only)"
    else:
        for path in (tls.ca, tls.cert, tls.key):
            if not Path(path).is_file():
                raise ConfigError(f"bridge for region {region}: {path} does not exist (turbofed fleet add {region} --role region)")
        lines = "\n".join(["# TLS to the central broker as the region's identity (its CN is the ACL's user)",
                           f"bridge_cafile {tls.ca}", f"bridge_certfile {tls.cert}", f"bridge_keyfile {tls.key}",
                           "bridge_tls_version tlsv1.2", "bridge_insecure false"])
    return Template(TEMPLATE.read_text()).substitute(region=region, central_host=central_host, central_port=central_port,
                                                     root=topics.root, tls=lines)


def run_cli(args: argparse.Namespace) -> int:
    fleet_toml = Path(args.fleet)
    config = load_fleet_config(fleet_toml, keys=False)
    if args.region not in config.regions:
        raise ConfigError(f"{fleet_toml}: [regions] has no region {args.region!r} (known: {', '.join(config.regions) or 'none'})")
    host, _, port = args.central.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--central must be HOST:PORT, got {args.central!r}")
    pki = IdentityFolder(Path(args.pki) if args.pki else fleet_toml.resolve().parent / "pki")
    tls = None if args.insecure_plain else BridgeTLS.of(pki, args.region)
    text = render_bridge(args.region, host, int(port), Topics(config.broker.topic_root, config.broker.plant_root), tls)
    if args.out:
        Path(args.out).write_text(text)
        print(f"bridge for region {args.region} written to {args.out}: append it to that region's mosquitto.conf", file=sys.stderr)
    else:
        print(text)
    return 0
