"""`turbofed dashboard [--store PATH] [--port N]`: run the Streamlit app on the results store.

A thin wrapper around `python -m streamlit run dashboard/app.py -- --store PATH`, headless and
bound to loopback by default (the dashboard has no login: expose it deliberately, e.g.
behind a reverse proxy). Streamlit runs as a child process so its own CLI, signals and exit
code behave exactly as documented; we forward Ctrl-C / SIGTERM and return its exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

from turbofed.errors import TurbofedError

APP = Path(__file__).resolve().parent / "app.py"
DEFAULT_ADDRESS = "127.0.0.1"
STOP_GRACE_S = 10.0


def command(store: str | Path, port: int, address: str = DEFAULT_ADDRESS) -> list[str]:
    """The streamlit command line (exposed for tests and for the curious)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless=true",
        f"--server.address={address}",
        f"--server.port={int(port)}",
        "--server.fileWatcherType=none",  # a deployed dashboard does not hot-reload its sources
        "--browser.gatherUsageStats=false",
        "--client.toolbarMode=minimal",
        "--",
        "--store", str(store),
    ]


def run_cli(args: argparse.Namespace) -> int:
    """Start Streamlit and wait for it; return its exit code."""
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("altair") is None:
        raise TurbofedError("the dashboard needs streamlit and altair: pip install 'turbofed[dashboard]'")
    store = str(args.store)
    address = getattr(args, "address", None) or DEFAULT_ADDRESS
    print(f"turbofed dashboard: http://{address}:{args.port}  (results store: {store})", file=sys.stderr, flush=True)
    child = subprocess.Popen(command(store, args.port, address))

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    try:
        return child.wait()
    except KeyboardInterrupt:  # Streamlit got the same Ctrl-C from the terminal; let it finish
        try:
            child.send_signal(signal.SIGINT)
            return child.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
