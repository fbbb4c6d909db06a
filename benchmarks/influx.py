"""Points per second the recorder writes to a server speaking the InfluxDB v2 write API.

Why: a real fleet's aggregator records every site's predictions (and, where sites share
them, raw sensor rows) as they arrive; the store must keep up with that without ever
blocking the recorder. The figure is end to end: from the first record_* call until
every point is acknowledged by the server (InfluxStore.flush), then checked by reading
the points back through VictoriaMetrics's export API.

The server is Debian's victoria-metrics, started here on loopback in a temporary folder
(no InfluxDB 2 server installs on this machine); --url points at another server instead.

    python -m turbofed.benchmarks.influx --json OUT [--points 1000000] [--seed 0]

This module also holds `VictoriaMetrics`, the throwaway server the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from turbofed.benchmarks import emit, machine_info
from turbofed.layout import N_SENSORS

VM_BINARY = "victoria-metrics"
EXPORT_AHEAD_S = 7 * 86_400  # export end: this far past now (see VictoriaMetrics.export)


def find_victoria_metrics() -> str | None:
    """The victoria-metrics binary (Debian installs it in /usr/bin), or None."""
    return shutil.which(VM_BINARY) or next((p for p in ("/usr/bin/victoria-metrics",) if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VictoriaMetrics:
    """A victoria-metrics process on 127.0.0.1: start (bounded wait), stop, restart on the
    same storage path and port, and read points back through /api/v1/export."""

    def __init__(self, data_dir: str | Path, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_victoria_metrics()
        if self.binary is None:
            raise FileNotFoundError("victoria-metrics is not installed (apt-get install -y victoria-metrics)")
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 20.0) -> "VictoriaMetrics":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, f"-storageDataPath={self.data_dir}", f"-httpListenAddr=127.0.0.1:{self.port}",
             "-search.disableCache", "-loggerLevel=WARN"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"victoria-metrics did not answer on {self.url} within {timeout:.0f}s: {self._log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful (SIGTERM: it flushes to disk), then SIGKILL if it takes too long."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every raw sample of the series matching `match` (a series selector), flushed first.

        `end` is always given: without it victoria-metrics ends the export at the current
        time *rounded down to the whole second* (searchutils.GetTime, so that Grafana panels
        line up), which silently leaves out every sample stamped in the second the export
        runs in, e.g. the last predictions of a replay read back right after flush().
        Ingestion refuses samples more than 2 days ahead, so a week ahead covers them all."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30).read()
        query = urllib.parse.urlencode({"match[]": match, "start": "0", "end": str(int(time.time()) + EXPORT_AHEAD_S)})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=120) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]

    def __enter__(self) -> "VictoriaMetrics":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _machine() -> dict[str, Any]:
    """The machine, and the client and server versions the figures belong to."""
    vm_version = ""
    if find_victoria_metrics():
        try:
            vm_version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "victoria-metrics"], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return {**machine_info("influxdb-client"), "victoria_metrics": vm_version}


def _batches(kind: str, points: int, sites: int, engines: int, cycles_per_report: int,
             rng: np.random.Generator) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Reports as the recorder receives them: per site, `engines` engines x `cycles_per_report`
    cycles. A prediction row is 2 points (local, federated); a sensor row is 1 point of 25 fields."""
    per_row = 2 if kind == "predictions" else 1
    rows_needed = -(-points // per_row)
    per_site = [f"engine-{e}" for e in range(engines)]
    out: list[tuple[str, list[tuple[Any, ...]]]] = []
    cycle = 1
    while rows_needed > 0:
        for s in range(sites):
            rows: list[tuple[Any, ...]] = []
            for engine in per_site:
                for c in range(cycle, cycle + cycles_per_report):
                    if kind == "predictions":
                        local, fed = rng.uniform(0, 125, 2).tolist()
                        rows.append((engine, c, local, fed))
                    else:  # C-MAPSS precision: settings to 4 decimals, sensors to 2
                        rows.append((engine, c, np.round(rng.normal(0, 0.002, 3), 4).tolist(),
                                     np.round(rng.normal(500, 50, N_SENSORS), 2).tolist()))
            rows = rows[:rows_needed]
            rows_needed -= len(rows)
            if rows:
                out.append((f"site-{s + 1}", rows))
            if rows_needed <= 0:
                break
        cycle += cycles_per_report
    return out


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process (all threads) or of `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_phase(store: Any, kind: str, batches: list[tuple[str, list[tuple[Any, ...]]]],
              server_pid: int | None) -> dict[str, Any]:
    """Feed the reports through the recorder as fast as it takes them; time until acknowledged."""
    record = store.record_predictions if kind == "predictions" else store.record_sensors
    points = sum(len(rows) for _, rows in batches) * (2 if kind == "predictions" else 1)
    fields_per_point = 2 if kind == "predictions" else 25
    at = time.time()
    cpu0, server0 = _cpu_seconds(), _cpu_seconds(server_pid) if server_pid else float("nan")
    started = time.perf_counter()
    for i, (site, rows) in enumerate(batches):
        record(site, rows, at + i / 1000)  # each report its own millisecond, as from distinct messages
    submitted = time.perf_counter()
    if not store.flush(timeout=600):
        raise RuntimeError(f"points not acknowledged within 600 s: {store.write_stats()}")
    done = time.perf_counter()
    server_cpu = (_cpu_seconds(server_pid) - server0) if server_pid else float("nan")
    return {"points": points, "fields_per_point": fields_per_point, "reports": len(batches),
            "submit_seconds": round(submitted - started, 3), "seconds": round(done - started, 3),
            "points_per_s": round(points / (done - started)),
            "fields_per_s": round(points * fields_per_point / (done - started)),
            "recorder_call_us_per_point": round((submitted - started) / points * 1e6, 3),
            "client_cpu_seconds": round(_cpu_seconds() - cpu0, 2),
            "server_cpu_seconds": None if server_cpu != server_cpu else round(server_cpu, 2)}


def run_benchmark(points: int, seed: int, url: str | None, sites: int, engines: int, cycles_per_report: int,
                  verify: bool, settings: dict[str, Any]) -> dict[str, Any]:
    from turbofed.store.influx_write import LINES_PER_ITEM, InfluxSettings, InfluxStore

    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews the figures
    rng = np.random.default_rng(seed)
    work = {kind: _batches(kind, points, sites, engines, cycles_per_report, rng) for kind in ("predictions", "sensors")}
    with tempfile.TemporaryDirectory(prefix="turbofed-bench-influx-") as tmp:
        server = None if url else VictoriaMetrics(Path(tmp) / "vm").start()
        try:
            config = InfluxSettings(url=url or server.url, org="bench", bucket="bench",
                                    token=os.environ.get("TURBOFED_INFLUX_TOKEN", ""),
                                    spool_dir=str(Path(tmp) / "spool"), **settings)
            results: dict[str, Any] = {}
            with InfluxStore(config) as store:
                for kind, batches in work.items():
                    results[kind] = run_phase(store, kind, batches, server.proc.pid if server and server.proc else None)
                results["write_stats"] = store.write_stats()
            if verify and server is not None:
                for kind, field in (("predictions", "predictions_rul"), ("sensors", "sensors_cycle")):
                    series = server.export(field)
                    results[kind]["verified_points"] = sum(len(s["values"]) for s in series)
                    if results[kind]["verified_points"] != results[kind]["points"]:
                        raise RuntimeError(f"{kind}: wrote {results[kind]['points']} points, server has "
                                           f"{results[kind]['verified_points']}")
        finally:
            if server is not None:
                server.stop()
    return {
        "benchmark": "influx_write",
        "server": url or "victoria-metrics (InfluxDB v2 write API) on 127.0.0.1",
        "seed": seed,
        "settings": {"points_per_phase": points, "sites": sites, "engines_per_site": engines,
                     "cycles_per_report": cycles_per_report, "lines_per_item": LINES_PER_ITEM,
                     **dataclass_settings(config)},
        "results": results,
        # Per kind of point: a prediction point has 2 fields, a sensor-row point 25.
        "points_per_s": {kind: results[kind]["points_per_s"] for kind in work},
        "goal_points_per_s": 50_000,
        "machine": {**_machine(), "load_average_at_start": load_at_start},
    }


def dataclass_settings(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    values = asdict(config)
    for secret in ("token", "spool_dir", "url"):
        values.pop(secret, None)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbofed.benchmarks.influx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", help="also write the JSON result here")
    parser.add_argument("--points", type=int, default=1_000_000, help="points per phase (predictions, then sensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--engines", type=int, default=100, help="engines per site")
    parser.add_argument("--cycles-per-report", type=int, default=5)
    parser.add_argument("--url", help="an existing server (default: start victoria-metrics on loopback)")
    parser.add_argument("--batch-items", type=int, help="WriteApi batch size (default: InfluxSettings')")
    parser.add_argument("--flush-interval-ms", type=int, help="default: InfluxSettings'")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the points back")
    args = parser.parse_args(argv)
    result = run_benchmark(args.points, args.seed, args.url, args.sites, args.engines, args.cycles_per_report,
                           not args.no_verify, {k: v for k, v in (("batch_items", args.batch_items),
                                                                  ("flush_interval_ms", args.flush_interval_ms))
                                                if v is not None})
    emit(result, args.json_out)
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """For `turbofed bench influx` (args as main() parses them)."""
    argv = ["--points", str(getattr(args, "points", 1_000_000)), "--seed", str(getattr(args, "seed", 0))]
    if getattr(args, "json_out", None):
        argv += ["--json", args.json_out]
    if getattr(args, "url", None):
        argv += ["--url", args.url]
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
