"""The `turbofed` command: one front door, many subcommands.

Each subcommand names the module that runs it; the module is imported only when that
subcommand runs, so `turbofed edge` on an inference-only device never imports
scikit-learn and `turbofed --help` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from turbofed import __version__

Handler = str  # "package.module:function", the function takes the parsed Namespace


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="C-MAPSS folder (default: $TURBOFED_DATA_DIR, else data/cmapss/)",
    )


def _data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="fetch or generate turbofan data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    fetch = dsub.add_parser("fetch", help="download NASA's C-MAPSS archive and verify it")
    _add_data_dir(fetch)
    fetch.add_argument("--url", help="archive URL (default: the one in data/manifest.toml)")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")
    fetch.set_defaults(handler="turbofed.data.fetch:run_cli")
    synth = dsub.add_parser("synth", help="write a synthetic fleet in C-MAPSS format")
    synth.add_argument("--out", default="data/synthetic", help="folder to write into")
    synth.add_argument("--engines", type=int, default=100, help="train (and test) engines (default 100)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the fleet (default 0)")
    synth.add_argument("--fault-modes", type=int, choices=(1, 2), default=1,
                       help="1: HPC degradation only (like FD001); 2: HPC or fan degradation (like FD003)")
    synth.add_argument("--name", default="SYN001", help="subset name used in file names")
    synth.set_defaults(handler="turbofed.data.synthetic:run_cli")


def _bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="accuracy and system benchmarks (print JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    acc = bsub.add_parser("accuracy", help="federated vs local vs central, in process")
    _add_data_dir(acc)
    acc.add_argument("--dataset", default="FD001", help="FD001..FD004, subsets joined by + (FD001+FD002+FD003+FD004), or SYN")
    acc.add_argument("--sites", type=int, default=4, help="sites the training engines are split over (default 4)")
    acc.add_argument("--rounds", type=int, default=None, help="default: from the model settings")
    acc.add_argument("--local-epochs", type=int, default=None, help="epochs per round")
    acc.add_argument("--seed", type=int, default=0, help="seed of weights, shuffles and the site split (default 0)")
    acc.add_argument("--strategy", default=None,
                     help='default: the fleet default (filtered-fedavg); also fedavg, fedavgm, fedadam, median, trimmed-mean, multi-krum, '
                          'clipped-fedavg, "package.module:ClassName" or an installed entry point')
    acc.add_argument("--strategy-param", action="append", default=[], metavar="KEY=VALUE",
                     help="a strategy parameter, as in fleet.toml's [strategy] (repeat: --strategy-param momentum=0.9)")
    acc.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                     help="a model setting, as in fleet.toml's [model] (repeat: --model batch_size=128 --model hidden=[128,64])")
    acc.add_argument("--validation", action="store_true",
                     help="score on a fifth of each site's training engines held out (for tuning), not on the official test")
    acc.add_argument("--holdout", type=float, default=0.0, metavar="SHARE",
                     help="share of each site's training engines held out of training to calibrate conformal RUL "
                          "intervals, as a site's holdout_share does (default 0: every engine trains, no intervals; "
                          "the intervals' figures use 0.2)")
    acc.add_argument("--coverage", type=float, default=0.9, help="the intervals' nominal coverage (default 0.9)")
    acc.add_argument("--average-last", type=int, default=0, metavar="K",
                     help="validation trial: the federated model is the mean of the last K rounds' global weights (default 0: the last)")
    acc.add_argument("--lr-final", type=float, default=1.0, metavar="RATIO",
                     help="validation trial: cosine decay of the sites' rate over the rounds down to RATIO x the rate (default 1: constant)")
    acc.add_argument("--min-correlation", type=float, default=0.2, metavar="R",
                     help="validation trial: choose sensors with |corr(sensor, capped RUL)| >= R (default 0.2)")
    acc.add_argument("--json", dest="json_out", help="write the result JSON here too")
    acc.set_defaults(handler="turbofed.benchmarks.accuracy:run_cli")
    attack = bsub.add_parser("attack", help="compromised sites vs aggregation strategies, in process")
    _add_data_dir(attack)
    attack.add_argument("--dataset", default="FD001", help="FD001..FD004, or SYN for the synthetic fleet")
    attack.add_argument("--sites", type=int, default=5, help="sites in the federation (default 5)")
    attack.add_argument("--malicious", type=int, default=1, help="how many of them are compromised (default 1)")
    attack.add_argument("--attack", action="append", help="scale, sign-flip, noise, inflated-samples, label-flip, "
                        "little-is-enough (repeat; default: all); the clean run is always included")
    attack.add_argument("--strategy", action="append", help="strategy name (repeat; default: fedavg, median, "
                        "trimmed-mean, multi-krum, clipped-fedavg)")
    attack.add_argument("--rounds", type=int, default=None, help="default: from the model settings")
    attack.add_argument("--seed", type=int, default=0, help="seed of weights, shuffles, hold-out and noise")
    attack.add_argument("--json", dest="json_out", help="write the result JSON here too")
    attack.set_defaults(handler="turbofed.benchmarks.attack:run_cli")
    priv = bsub.add_parser("privacy", help="RMSE under client-level differential privacy at epsilon inf, 8, 4, 1")
    _add_data_dir(priv)
    priv.add_argument("--synthetic-sites", type=int, action="append", default=None,
                      help="synthetic fleet sizes (repeat; default 100 and 1000)")
    priv.add_argument("--engines-per-site", type=int, default=2, help="training engines per synthetic site (default 2)")
    priv.add_argument("--clip-norm", type=float, default=20.0, help="C, the L2 bound of each site's delta (default 20)")
    priv.add_argument("--rounds", type=int, default=10, help="rounds at every epsilon (default 10)")
    priv.add_argument("--seed", type=int, default=0, help="seed of weights, hold-out and noise")
    priv.add_argument("--json", dest="json_out", help="write the result JSON here too")
    priv.set_defaults(handler="turbofed.benchmarks.privacy:run_cli")
    sec = bsub.add_parser("secure", help="secure aggregation vs plain FedAvg on a live fleet: round time, bytes, RMSE")
    _add_data_dir(sec)
    sec.add_argument("--synthetic-sites", type=int, action="append", default=None,
                     help="synthetic fleet sizes (repeat; default 20 and 100); FD001 always runs with 4 sites")
    sec.add_argument("--engines-per-site", type=int, default=2, help="training engines per synthetic site (default 2)")
    sec.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    sec.add_argument("--phase-timeout", type=float, default=2.0,
                     help="seconds each secure phase waits for sites that dropped out (default 2)")
    sec.add_argument("--seed", type=int, default=0, help="seed of weights, data split and hold-out")
    sec.add_argument("--json", dest="json_out", help="write the result JSON here too")
    sec.set_defaults(handler="turbofed.benchmarks.secure:run_cli")
    scale = bsub.add_parser("scale", help="N simulated sites on Mosquitto, flat, two-level or workers: close latency, RSS, CPU, bytes")
    scale.add_argument("--sites", default="100,1000,5000", help="comma-separated fleet sizes (default 100,1000,5000)")
    scale.add_argument("--rounds", type=int, default=3, help="rounds per fleet size (default 3)")
    scale.add_argument("--rate", type=float, default=500.0, help="updates sent a second, spread over the sites (default 500)")
    scale.add_argument("--topology", default="flat", help="comma-separated: flat (one broker, one aggregator) and/or "
                       "two-level (4 regional brokers bridged to a central one, 4 regional aggregators) and/or workers "
                       "(one broker, ingestion workers on a shared subscription; default flat)")
    scale.add_argument("--workers", type=int, default=2, help="workers: ingestion worker processes (default 2)")
    scale.add_argument("--site-records", choices=("full", "summary"), default="summary",
                       help="two-level: what a region's partial tells the top of each site (region.toml's site_records, "
                       "default summary)")
    scale.add_argument("--json", dest="json_out", help="write the result JSON here too")
    scale.set_defaults(handler="turbofed.benchmarks.scale:run_cli")
    system = bsub.add_parser("system", help="aggregation time, update size, replay rate")
    system.add_argument("--sites", type=int, default=50, help="edge agents on the real broker (default 50)")
    system.add_argument("--rounds", type=int, default=3, help="federated rounds to time (default 3)")
    system.add_argument("--json", dest="json_out", help="write the result JSON here too")
    system.set_defaults(handler="turbofed.benchmarks.system:run_cli")
    soak = bsub.add_parser("soak", help="memory growth and messages lost under sustained load, rounds running")
    _add_data_dir(soak)
    soak.add_argument("--minutes", type=float, default=10.0, help="how long to replay at full rate (the first 20%% is warm-up)")
    soak.add_argument("--dataset", default="SYN001", help="SYN001 (synthetic fleet, default) or a C-MAPSS subset such as FD001")
    soak.add_argument("--sites", type=int, default=4, help="edge agents (default 4)")
    soak.add_argument("--max-engines", type=int, default=None, help="only the first N engines of each part (a small fleet)")
    soak.add_argument("--seed", type=int, default=0, help="seed of the synthetic fleet and hold-out (default 0)")
    soak.add_argument("--json", dest="json_out", help="write the result JSON here too")
    soak.set_defaults(handler="turbofed.benchmarks.soak:run_cli")
    influx = bsub.add_parser("influx", help="points per second written to an InfluxDB-API server")
    influx.add_argument("--points", type=int, default=1_000_000, help="points to write (default 1,000,000)")
    influx.add_argument("--seed", type=int, default=0, help="seed of the generated values (default 0)")
    influx.add_argument("--url", help="server to write to (default: start victoria-metrics)")
    influx.add_argument("--json", dest="json_out", help="write the result JSON here too")
    influx.set_defaults(handler="turbofed.benchmarks.influx:run_cli")
    edge_bench = bsub.add_parser("edge", help="agent memory, prediction latency, CPU per cycle")
    edge_bench.add_argument("--engines", type=int, default=100,
                            help="engines replayed through each profile (default 100: the FD001 training engines when present)")
    edge_bench.add_argument("--json", dest="json_out", help="write the result JSON here too")
    edge_bench.set_defaults(handler="turbofed.benchmarks.edge:run_cli")


def _services(sub: argparse._SubParsersAction) -> None:
    broker = sub.add_parser("broker", help="run Mosquitto (or the embedded broker)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    broker.add_argument("--port", type=int, default=None, help="default: 8883 (TLS), 1883 with --insecure-dev")
    broker.add_argument("--pki", help="fleet identity folder (turbofed fleet init): TLS, client certificates, ACL, CRL "
                        "(default: pki/ beside --fleet, else ./pki)")
    broker.add_argument("--fleet", help="fleet TOML whose pki/ folder to use")
    broker.add_argument("--insecure-dev", action="store_true",
                        help="anonymous plain-MQTT broker on loopback, for development only")
    broker.add_argument("--embedded", action="store_true",
                        help="use amqtt even if Mosquitto is installed (always insecure, loopback only)")
    broker.set_defaults(handler="turbofed.simulation.broker:run_cli")
    edge = sub.add_parser("edge", help="run one site's edge agent")
    edge.add_argument("--config", required=True, help="site TOML file")
    edge.add_argument(
        "--profile",
        choices=("training", "inference"),
        default="training",
        help="inference: predict and follow the global model only (no scikit-learn needed)",
    )
    edge.set_defaults(handler="turbofed.edge.agent:run_cli")
    agg = sub.add_parser("aggregator", help="run the aggregator")
    agg.add_argument("--config", required=True, help="fleet TOML file")
    agg.add_argument("--reset", action="store_true",
                     help="archive the model registry (kept in <registry>/epoch-N/) and start a new fleet epoch: "
                          "after a lost or unreadable registry (docs/operations.md)")
    agg.set_defaults(handler="turbofed.aggregator.service:run_cli")
    region = sub.add_parser("region", help="run a regional aggregator (sums its sites' updates, sends the top one partial) or, with shared_group, an ingestion worker")
    region.add_argument("--config", required=True, help="region TOML file (docs/scaling.md)")
    region.set_defaults(handler="turbofed.aggregator.regional:run_cli")
    replay = sub.add_parser("replay", help="publish C-MAPSS rows as live sensor traffic")
    _add_data_dir(replay)
    replay.add_argument("--dataset", default="FD001", help="C-MAPSS subset FD001..FD004 (several: FD001+FD003), or SYN for the synthetic fleet (default FD001)")
    replay.add_argument("--sites", type=int, default=4, help="sites the engines are spread over, site1..siteN (default 4)")
    replay.add_argument("--rate", default="2000", help="rows per second, or 'max' (default 2000)")
    replay.add_argument("--assign", choices=("contiguous", "round-robin", "subset"), default="round-robin",
                        help="how engines are given to sites (default round-robin)")
    replay.add_argument("--broker", default="127.0.0.1:1883", help="host:port")
    replay.add_argument("--part", choices=("train", "test", "both"), default="both",
                        help="training engines (run to failure), test engines (truth revealed at the end) or both (default)")
    replay.add_argument("--seed", type=int, default=0, help="seed of hold-out and synthetic data")
    replay.add_argument("--max-engines", type=int, help="only the first N engines of each part")
    replay.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    replay.add_argument("--pki", help="fleet identity folder: connect over TLS as each site's gateway (gateway-<site>)")
    replay.add_argument("--gateway", action="append", metavar="FILE",
                        help="a gateway TOML (examples/gateway.toml): publish as that site's gateway, on its broker "
                             "(repeat: one per site of --sites; overrides --broker)")
    replay.set_defaults(handler="turbofed.simulation.replay:run_cli")
    demo = sub.add_parser("demo", help="broker, aggregator, 4 agents and a replay, in one command")
    _add_data_dir(demo)
    demo.add_argument("--dataset", default="FD001", help="C-MAPSS subset FD001..FD004 (several: FD001+FD003), or SYN for the synthetic fleet (default FD001)")
    demo.add_argument("--sites", type=int, default=4, help="edge agents, one per site (default 4)")
    demo.add_argument("--rounds", type=int, default=None, help="federated rounds (default: from the model settings)")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights, hold-out and synthetic data (default 0)")
    demo.add_argument("--workdir", help="where the store and state go (default: .turbofed/demo)")
    demo.add_argument("--embedded-broker", action="store_true", help="use amqtt even if Mosquitto is installed")
    demo.add_argument("--store", choices=("sqlite", "influxdb"), default="sqlite",
                      help="where the aggregator records results: sqlite (in the workdir, default) or influxdb "
                           "(TURBOFED_INFLUX_URL, _TOKEN, _ORG, _BUCKET)")
    demo.add_argument("--json", dest="json_out", help="write the result JSON here too")
    demo.set_defaults(handler="turbofed.simulation.demo:run_cli")
    status = sub.add_parser("status", help="the fleet in the terminal: rounds, sites online, last updates, refusals by reason")
    status.add_argument("--store", help="results store: a SQLite file, or influxdb (TURBOFED_INFLUX_* settings) "
                        "(default: fleet.toml's with --config, else the demo's .turbofed/demo/results.sqlite)")
    status.add_argument("--config", help="fleet TOML: its store, and its sites (those never heard from are listed too)")
    status.add_argument("--json", dest="json_out", action="store_true", help="print JSON instead of tables")
    status.add_argument("--live", action="store_true", help="ask the broker, not the store: the retained round announcement and "
                        "site statuses, as the fleet's monitor identity, checked against the fleet's keys (needs --config)")
    status.add_argument("--pki", help="with --live: the fleet's identity folder (default: fleet.toml's pki)")
    status.add_argument("--seconds", type=float, default=5.0, help="with --live: wait at most this long for every site's status (default 5)")
    status.set_defaults(handler="turbofed.simulation.livestatus:run_cli")
    dash = sub.add_parser("dashboard", help="open the Streamlit dashboard")
    dash.add_argument("--store", default=".turbofed/demo/results.sqlite",
                      help="results store: a SQLite file, or influxdb (TURBOFED_INFLUX_* settings) (default: the demo's)")
    dash.add_argument("--port", type=int, default=8501, help="HTTP port on 127.0.0.1 (default 8501)")
    dash.set_defaults(handler="turbofed.dashboard.launch:run_cli")
    flash = sub.add_parser("flash", help="build an offline install bundle for one edge device")
    flash.add_argument("--site", required=True, help="site id, as listed in the fleet TOML")
    flash.add_argument("--fleet", required=True, help="fleet TOML (broker address, sites)")
    flash.add_argument("--pki", help="fleet identity folder holding the site's identity (default: pki/ beside --fleet)")
    flash.add_argument("--out", required=True, help="bundle folder")
    flash.add_argument("--platform", default=None,
                       help="Linux target: linux_aarch64, linux_x86_64 or manylinux_2_N_<arch> (default: this machine)")
    flash.add_argument("--python-version", default=None, help="target Python, e.g. 3.11 (default: this one)")
    flash.add_argument("--profile", choices=("training", "inference"), default="training",
                       help="inference: predict only, no scikit-learn in the bundle (default training)")
    flash.add_argument("--engines", default="*", help="comma-separated engine ids, or * for all")
    flash.add_argument("--host", help="user@address: copy the bundle over ssh and install it there")
    flash.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    flash.set_defaults(handler="turbofed.deploy.flash:run_cli")


def _fleet(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="fleet identities: CA, TLS client identities, signing keys, broker ACL")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    for name, text in (("init", "create the CA, the broker certificate and every identity fleet.toml names"),
                       ("add", "issue an identity (a new site and its gateway, say)"),
                       ("revoke", "revoke an identity: the broker refuses it, its signatures stop counting")):
        p = fsub.add_parser(name, help=text)
        p.add_argument("--fleet", required=True, help="fleet TOML (its sites and broker address)")
        p.add_argument("--pki", help="identity folder (default: pki/ beside the fleet TOML)")
        if name == "init":
            p.add_argument("--broker-host", action="append", help="host name or address the broker certificate is "
                           "valid for (repeat; default: the fleet's broker host, 127.0.0.1 and localhost)")
        else:
            p.add_argument("name", help="identity name: a site id, 'aggregator', 'monitor' or 'gateway-<site>'")
        if name == "add":
            p.add_argument("--role", choices=("site", "gateway", "aggregator", "monitor", "region"), default="site",
                           help="what the identity may do (default: site)")
        p.set_defaults(handler="turbofed.deploy.identities:run_cli")
    bridge = fsub.add_parser("bridge", help="print the Mosquitto bridge of a regional broker to the central one")
    bridge.add_argument("--fleet", required=True, help="fleet TOML (its [regions] and topic root)")
    bridge.add_argument("--pki", help="identity folder holding the region's TLS identity (default: pki/ beside the fleet TOML)")
    bridge.add_argument("--region", required=True, help="region id, as in the fleet TOML's [regions]")
    bridge.add_argument("--central", required=True, help="the central broker, HOST:PORT (its TLS port)")
    bridge.add_argument("--out", help="write it to this file instead of printing it")
    bridge.add_argument("--insecure-plain", action="store_true",
                        help="plain MQTT to the central broker, no TLS (loopback development only)")
    bridge.set_defaults(handler="turbofed.deploy.bridge:run_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbofed",
        description="Federated predictive maintenance for turbofan fleets.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_data, _bench, _services, _fleet):
        add(sub)
    return parser


def _resolve(handler: Handler) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = handler.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from turbofed.errors import TurbofedError

    try:
        return int(_resolve(args.handler)(args) or 0)
    except TurbofedError as exc:
        print(f"turbofed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbofed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
