"""Drive a headless Chromium against a running dashboard: load pages, read the DOM, screenshot.

Streamlit renders in the browser over a websocket, so `chromium --dump-dom` returns only the
app's skeleton; instead we speak the Chrome DevTools protocol over a websocket with the
`websockets` package (a Streamlit dependency: nothing new to install) and poll the live
DOM until the page has rendered. Used by the browser test and by

    python -m turbofed.dashboard.browser --store results.sqlite --out screenshots/

which starts `turbofed dashboard` on a free loopback port and saves one PNG per page (the
README's screenshot of "Federated vs local" comes from a demo run's store this way).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")
# Page title (the h1 each page shows) -> URL path under the dashboard's root.
PAGE_PATHS = {"Fleet": "", "Federated vs local": "federated", "Rounds": "rounds",
              "Maintenance economics": "economics"}

# What the test and the screenshot tool need to know about a rendered Streamlit page.
_STATE_JS = """(() => { const main = document.querySelector('[data-testid="stMain"]') || document.body;
if (!main) return JSON.stringify({h1: [], exceptions: [], running: true, skeleton: true, charts: 0, tables: 0,
                                  text: "", height: 0});
return JSON.stringify({
  h1: Array.from(document.querySelectorAll('h1')).map(e => e.innerText.trim()),
  exceptions: Array.from(document.querySelectorAll('[data-testid="stException"]')).map(e => e.innerText),
  running: !!document.querySelector('[data-testid="stStatusWidget"]'),
  skeleton: !!document.querySelector('[data-testid="stAppSkeleton"]'),
  charts: document.querySelectorAll('.vega-embed').length,
  tables: document.querySelectorAll('[data-testid="stDataFrame"]').length,
  text: main.innerText.slice(0, 20000),
  height: main.scrollHeight
}); })()"""


class BrowserError(RuntimeError):
    """Chromium did not start, or a page did not render in time."""


def find_chromium() -> str | None:
    """Debian's chromium (or another Chrome on PATH), None when there is none."""
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless Chromium with one tab, driven over the DevTools protocol."""

    def __init__(self, binary: str, user_data_dir: str | Path, window: tuple[int, int] = (1400, 1000),
                 timeout: float = 30.0) -> None:
        self.binary, self.user_data_dir, self.window, self.timeout = binary, Path(user_data_dir), window, timeout
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None

    def __enter__(self) -> "Chromium":
        from websockets.sync.client import connect

        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.user_data_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.user_data_dir}", "--remote-debugging-port=0",
             f"--window-size={self.window[0]},{self.window[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + self.timeout
            while True:  # Chromium writes "<port>\n<path>" once its DevTools server listens
                text = port_file.read_text() if port_file.exists() else ""
                if len(text.split()) >= 2:
                    break
                if self._proc.poll() is not None:
                    raise BrowserError(f"{self.binary} exited with {self._proc.returncode} before DevTools started")
                if time.monotonic() > deadline:
                    raise BrowserError(f"{self.binary}: no DevTools port after {self.timeout:.0f} s")
                time.sleep(0.05)
            port = int(text.split()[0])
            with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as resp:
                targets = json.load(resp)
            page = next(t for t in targets if t.get("type") == "page")
            self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout)
            self.call("Page.enable")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events arriving meanwhile are dropped."""
        i = next(self._ids)
        self._ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"DevTools {method}: no answer in {self.timeout:.0f} s")
            message = json.loads(self._ws.recv(timeout=left))
            if message.get("id") == i:
                if "error" in message:
                    raise BrowserError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def page_state(self) -> dict[str, Any]:
        """Titles, exception boxes, whether Streamlit is still running, and the page's text."""
        return json.loads(self.evaluate(_STATE_JS))

    def wait_rendered(self, title: str, timeout: float = 30.0, settle: float = 1.5) -> dict[str, Any]:
        """Wait until the page shows `title` and Streamlit has been idle for `settle` seconds
        (charts are drawn client-side after the script finishes)."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                state = self.page_state()
            except BrowserError:  # the document is being replaced mid-navigation
                time.sleep(0.2)
                continue
            done = title in state["h1"] and not state["running"] and not state["skeleton"]
            if done or state["exceptions"]:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= settle or state["exceptions"]:
                    return self.page_state()
            else:
                idle_since = None
            time.sleep(0.2)
        raise BrowserError(f"page {title!r} did not render in {timeout:.0f} s; it shows {state.get('h1')} "
                           f"and {str(state.get('text', ''))[:300]!r}")

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """A PNG of the page; full_page grows the viewport to the app's scroll height first."""
        path = Path(path)
        if full_page:
            height = int(min(max(self.page_state()["height"] + 120, self.window[1]), 8000))
            self.call("Emulation.setDeviceMetricsOverride", width=self.window[0], height=height,
                      deviceScaleFactor=1, mobile=False)
            time.sleep(0.8)  # let Streamlit re-lay out charts for the new size
        data = self.call("Page.captureScreenshot", format="png")["data"]
        if full_page:
            self.call("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=5)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def turbofed_command() -> list[str]:
    """How to run `turbofed`: the console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("turbofed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "turbofed.cli"]


@contextlib.contextmanager
def serve(store: str | Path, port: int | None = None, timeout: float = 60.0,
          log: Path | None = None) -> Iterator[str]:
    """`turbofed dashboard --store STORE --port PORT` in its own process group; yields its URL
    once Streamlit answers its health check, and always stops the whole group."""
    port = port or free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([*turbofed_command(), "dashboard", "--store", str(store), "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise BrowserError(f"turbofed dashboard exited with {proc.returncode}"
                                   + (f"; see {log}" if log else ""))
            with contextlib.suppress(URLError, OSError):
                with urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.read().strip() == b"ok":
                        break
            if time.monotonic() > deadline:
                raise BrowserError(f"the dashboard did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if log:
            out.close()  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot every dashboard page against a results store.")
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", default="screenshots", help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        print("no chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as profile, serve(args.store) as url, \
            Chromium(binary, profile, window=(args.width, 1000)) as browser:
        for title, path in PAGE_PATHS.items():
            browser.navigate(f"{url}/{path}")
            state = browser.wait_rendered(title, timeout=60)
            shot = browser.screenshot(out / f"{path or 'fleet'}.png")
            print(json.dumps({"page": title, "screenshot": str(shot), "exceptions": len(state["exceptions"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
