"""Start an MQTT broker for development, demos and tests: Mosquitto, else embedded amqtt.

Either broker runs in its own process so it never shares the caller's event loop or
GIL, and so stopping it is the same for both. ``start_broker`` returns only once the
broker answers an MQTT CONNECT, so callers can connect immediately.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import turbofed.broker_config
from turbofed.envelope import MAX_PAYLOAD_BYTES
from turbofed.errors import TurbofedError

log = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "amqtt"]
# Packet limit for both brokers: the largest payload plus room for topic and framing.
MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
REPO_CONF = Path(turbofed.broker_config.__file__).resolve().parent / "mosquitto.conf"
_FALLBACK_CONF = f"""\
allow_anonymous true
persistence true
max_packet_size {MAX_PACKET_BYTES}
max_queued_messages 200000
max_queued_bytes 536870912
listener 1883 127.0.0.1
"""
# Keys start_broker sets itself; the copies in the base config are dropped.
_OVERRIDDEN = {"port", "bind_address", "persistence_location", "log_dest", "pid_file", "user", "include_dir"}


class BrokerError(TurbofedError):
    """The broker could not be found, started or reached; the message says why."""


@dataclass(eq=False)
class BrokerHandle:
    """A running broker process. Use as a context manager or call ``stop()``."""

    host: str
    port: int
    kind: BrokerKind
    process: subprocess.Popen[bytes] = field(repr=False)
    workdir: Path
    log_path: Path | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port``, the form the CLI's ``--broker`` options take."""
        return f"{self.host}:{self.port}"

    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self, limit: int = 4000) -> str:
        """Tail of the broker's log (empty when its output went to the terminal)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker (SIGTERM: Mosquitto saves its database), then kill if stuck."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s broker on %s did not stop in %.0fs; killing it", self.kind, self.address, timeout)
                self.process.kill()
                self.process.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        _live.discard(self)

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_live: set[BrokerHandle] = set()


@atexit.register
def _stop_all() -> None:
    """Do not leave brokers behind when the caller exits without stopping them."""
    for handle in list(_live):
        try:
            handle.stop(timeout=3)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: $TURBOFED_MOSQUITTO, PATH, then /usr/sbin and /usr/local/sbin."""
    explicit = os.environ.get("TURBOFED_MOSQUITTO")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the broker binds it right after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_config(base: str, host: str, port: int, persistence_dir: Path) -> str:
    """Derive a runnable config from ``base``: our listener, persistence folder, stderr log.

    Everything else in ``base`` (limits, queues, auth) is kept, so tests exercise the
    same settings as ``broker_config/mosquitto.conf``.
    """
    out: list[str] = []
    listener_done = False
    for line in base.splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        if key == "listener":
            if listener_done:
                log.warning("ignoring extra listener in base mosquitto config: %s", line.strip())
                continue
            line, listener_done = f"listener {port} {host}", True
        elif key == "persistence":
            line = "persistence true"
        elif key in _OVERRIDDEN:
            continue
        out.append(line)
    if not any(line.split()[:1] == ["max_packet_size"] for line in out):
        out.insert(0, f"max_packet_size {MAX_PACKET_BYTES}")
    head = [f"persistence_location {persistence_dir.resolve()}/", "log_dest stderr"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Mosquitto drops root privileges to user "mosquitto", which cannot write our folder.
        import pwd

        head.append(f"user {pwd.getpwuid(0).pw_name}")
    if not listener_done:
        out.append(f"listener {port} {host}")
    return "\n".join(["# generated by turbofed.simulation.broker", *head, *out]) + "\n"


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def mqtt_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if an MQTT 3.1.1 broker accepts an anonymous CONNECT (CONNACK code 0).

    A bare TCP connect would report ready before amqtt has loaded its plugins, and makes
    both brokers log a protocol error.
    """
    client_id = f"turbofed-probe-{uuid.uuid4().hex[:12]}".encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big") + client_id
    connect = bytes([0x10, len(var)]) + var
    try:
        with socket.create_connection((_probe_host(host), port), timeout=timeout) as s:
            s.sendall(connect)
            ack = b""
            while len(ack) < 4:
                chunk = s.recv(4 - len(ack))
                if not chunk:
                    return False
                ack += chunk
            s.sendall(b"\xe0\x00")  # DISCONNECT
            return ack[0] == 0x20 and ack[3] == 0
    except OSError:
        return False


def _spawn(kind: BrokerKind, host: str, port: int, workdir: Path, stream_logs: bool) -> tuple[subprocess.Popen[bytes], Path | None]:
    if kind == "mosquitto":
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError("mosquitto is not installed (looked on PATH, /usr/sbin, /usr/local/sbin); "
                              "install it or use the embedded broker (--embedded)")
        base = REPO_CONF.read_text() if REPO_CONF.is_file() else _FALLBACK_CONF
        persistence = workdir / "mosquitto"
        persistence.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(mosquitto_config(base, host, port, persistence))
        cmd = [exe, "-c", str(conf)]
    else:
        code = "import sys; from turbofed.simulation.broker import serve_amqtt; sys.exit(serve_amqtt(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, "--host", host, "--port", str(port),
               "--max-bytes", str(MAX_PACKET_BYTES), "--parent-pid", str(os.getpid())]
    env = dict(os.environ)
    if stream_logs:
        return subprocess.Popen(cmd, env=env), None
    log_path = workdir / f"{kind}.log"
    with open(log_path, "wb") as out:  # fresh per start: errors below quote only this run
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log_path


def start_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    embedded: bool | None = None,
    workdir: Path | None = None,
    *,
    timeout: float = 20.0,
    stream_logs: bool = False,
) -> BrokerHandle:
    """Start a broker and wait until it accepts MQTT connections.

    ``port=0`` picks a free port. ``embedded``: None = Mosquitto if installed, else amqtt;
    True = amqtt; False = Mosquitto or fail. ``workdir`` holds the generated config,
    the persistence folder and the log (a temporary folder when None, removed on stop).
    ``stream_logs`` sends the broker's output to this process's terminal instead.
    """
    if embedded is None:
        kind: BrokerKind = "amqtt" if find_mosquitto() is None else "mosquitto"
    else:
        kind = "amqtt" if embedded else "mosquitto"
    if kind == "amqtt":
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise BrokerError("the embedded broker needs amqtt: pip install 'turbofed[broker]' "
                              "(or install mosquitto)") from None
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"turbofed-{kind}-")
        workdir = Path(tmp.name)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    attempts = 3 if port == 0 else 1
    last_error = ""
    for attempt in range(attempts):
        chosen = free_port(host) if port == 0 else port
        log.info("starting %s broker on %s:%d (workdir %s)", kind, host, chosen, workdir)
        proc, log_path = _spawn(kind, host, chosen, workdir, stream_logs)
        handle = BrokerHandle(host, chosen, kind, proc, workdir, log_path, tmp)
        _live.add(handle)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if mqtt_ping(host, chosen):
                log.info("%s broker ready on %s:%d", kind, host, chosen)
                return handle
            time.sleep(0.05)
        exited = proc.poll() is not None
        handle._tmp = None  # keep the folder (and the log) for the next attempt
        handle.stop(timeout=5)
        last_error = handle.log_text() or "(output went to the terminal)"
        why = f"exited with code {proc.returncode}" if exited else f"did not answer within {timeout:.0f}s"
        if attempt + 1 < attempts and "in use" in last_error.lower():
            log.warning("port %d was taken before %s bound it; retrying", chosen, kind)
            continue
        break
    if tmp is not None:
        tmp.cleanup()
    raise BrokerError(f"{kind} broker on {host}:{chosen} {why}. Its output:\n{last_error.strip()}")


def run_cli(args: argparse.Namespace) -> int:
    """``turbofed broker``: run a broker in the foreground until Ctrl-C.

    State (Mosquitto's database) lives in .turbofed/broker so the retained round and
    global model survive a restart.
    """
    embedded = True if getattr(args, "embedded", False) else None
    workdir = Path(getattr(args, "workdir", None) or ".turbofed/broker")
    handle = start_broker(args.host, args.port, embedded=embedded, workdir=workdir, stream_logs=True)
    log.info("%s broker running on %s; Ctrl-C to stop", handle.kind, handle.address)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # systemd/docker stop: shut down like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while handle.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping %s broker", handle.kind)
        handle.stop()
        return 0
    code = handle.process.returncode
    handle.stop()
    log.error("%s broker exited with code %s", handle.kind, code)
    return 1 if code else 0


# ---------------------------------------------------------------------------
# Embedded broker (amqtt), run in its own process by start_broker(embedded=True)
# ---------------------------------------------------------------------------

_AMQTT_AUTH_PLUGIN = f"{__name__}.AmqttAcceptAll"


def __getattr__(name: str) -> Any:
    """Build the amqtt plugin class on first use, so importing this module never imports amqtt."""
    if name == "AmqttAcceptAll":
        from amqtt.plugins.base import BaseAuthPlugin

        class AmqttAcceptAll(BaseAuthPlugin):
            """Accept every client without marking its session anonymous.

            amqtt's AnonymousAuthPlugin flags sessions anonymous, and amqtt then neither
            keeps persistent sessions nor queues QoS 1 messages for offline clients.
            """

            async def authenticate(self, *, session: Any) -> bool:
                return True

        globals()[name] = AmqttAcceptAll
        return AmqttAcceptAll
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_amqtt(argv: list[str] | None = None) -> int:
    """Entry point of the embedded-broker subprocess: amqtt on host:port until SIGTERM."""
    import asyncio

    from amqtt.broker import Broker

    p = argparse.ArgumentParser(prog="turbofed-amqtt")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--max-bytes", type=int, default=MAX_PACKET_BYTES)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transitions", "amqtt.mqtt.protocol", "amqtt.broker.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    host = f"[{a.host}]" if ":" in a.host else a.host

    class LimitedBroker(Broker):
        """amqtt has no packet size option: drop oversized publishes, as Mosquitto refuses them."""

        async def _handle_message_delivery(self, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
            msg = wait_deliver.result()
            data = getattr(msg, "data", None)
            if data is not None and len(data) > a.max_bytes:
                self.logger.warning("dropping %d-byte message from %s on %s: limit %d bytes",
                                    len(data), client_session.client_id, msg.topic, a.max_bytes)
                return True
            return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    if not hasattr(Broker, "_handle_message_delivery"):  # other amqtt versions: no guard
        LimitedBroker = Broker  # type: ignore[misc]  # noqa: N806

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{a.port}"}},
        "plugins": {_AMQTT_AUTH_PLUGIN: {}},
    }

    async def main() -> None:
        broker = LimitedBroker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await broker.start()
        log.info("amqtt broker listening on %s:%d (in-memory: no persistence across restarts)", a.host, a.port)
        while not stop.is_set():
            if a.parent_pid and os.getppid() != a.parent_pid:
                log.warning("parent process %d is gone; stopping", a.parent_pid)
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        await broker.shutdown()

    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - report startup failures (port in use) to the parent
        print(f"turbofed-amqtt: broker on {a.host}:{a.port} failed: {exc}", file=sys.stderr)
        return 1
    return 0
