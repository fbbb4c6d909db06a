"""Start an MQTT broker for development, demos and tests: Mosquitto, else embedded amqtt.

Either broker runs in its own process so it never shares the caller's event loop or
GIL, and so stopping it is the same for both. ``start_broker`` returns only once the
broker answers an MQTT CONNECT, so callers can connect immediately.

With a fleet identity folder (``pki``, see turbofed.deploy.identities) Mosquitto runs the
secure setup of broker_config/mosquitto.conf: TLS, client certificates, the fleet's ACL
and CRL; the readiness probe is then a TLS CONNECT as the aggregator. Without one it is
an anonymous, loopback-only development broker, and says so loudly. The embedded amqtt
broker cannot enforce client certificates and ACLs: it is always such a development
broker, and refuses any address but loopback.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import turbofed.broker_config
from turbofed.config import TLS_PORT, BrokerSettings
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities, client_settings
from turbofed.envelope import MAX_PAYLOAD_BYTES
from turbofed.errors import TurbofedError
from turbofed.simulation.children import spawn

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
# The security lines: pointed at the identity folder, or dropped for the insecure dev broker.
_SECURITY = {"allow_anonymous", "acl_file", "password_file", "cafile", "capath", "certfile", "keyfile", "crlfile",
             "require_certificate", "use_identity_as_username", "use_subject_as_username", "tls_version",
             "ciphers", "ciphers_tls1.3", "psk_hint", "psk_file"}
INSECURE_WARNING = ("INSECURE DEVELOPMENT BROKER: anonymous clients, no TLS, no ACL; anyone who reaches "
                    "{address} can read, forge and wipe the fleet's models and data. Loopback only; never use it "
                    "for a real fleet (give it the fleet's identities: --pki DIR).")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the only addresses an insecure broker may bind."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    pki: FleetIdentities | None = None  # the secure setup (TLS, certificates, ACL) when set

    @property
    def address(self) -> str:
        """``host:port``, the form the CLI's ``--broker`` options take."""
        return f"{self.host}:{self.port}"

    @property
    def secure(self) -> bool:
        return self.pki is not None

    def settings(self, identity: str | None = None, **fields: Any) -> BrokerSettings:
        """Client settings for this broker: TLS as `identity` on a secure broker (required
        there), plain MQTT on a development broker (the identity is then ignored)."""
        base = BrokerSettings(host=_probe_host(self.host), port=self.port, **fields)
        if self.pki is None:
            return base
        if identity is None:
            raise BrokerError(f"the broker on {self.address} requires a client identity (TLS certificate)")
        return client_settings(self.pki, identity, base)

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: Mosquitto reloads its ACL and CRL (checked on 2.0.11: a certificate revoked
        since start is then refused at connect). Returns once the broker has logged the reload,
        so connections made after this see the new rules."""
        if self.kind != "mosquitto" or not self.running():
            raise BrokerError(f"only a running Mosquitto reloads its ACL and CRL ({self.kind} on {self.address})")
        seen = self.log_text(limit=10**9).count("Reloading config.")
        self.process.send_signal(signal.SIGHUP)
        if self.log_path is None:
            return  # logs go to the terminal: nothing to wait on
        deadline = time.monotonic() + timeout
        while self.log_text(limit=10**9).count("Reloading config.") <= seen:
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto on {self.address} did not reload within {timeout:.0f} s")
            time.sleep(0.02)

    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self, limit: int = 4000) -> str:
        """Tail of the broker's log (empty when its output went to the terminal)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]

    def halt(self, timeout: float = 10.0) -> None:
        """Terminate the broker process but keep its folder (config, persistence, log), so
        `start_again` can bring the same broker back: what an outage looks like to clients."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s broker on %s did not stop in %.0fs; killing it", self.kind, self.address, timeout)
                self.process.kill()
                self.process.wait(5)

    def start_again(self, timeout: float = 20.0) -> None:
        """Start a halted broker again on the same port with the same config and persistence
        (Mosquitto saved its database at SIGTERM: retained messages and persistent sessions
        are back). Returns once it accepts MQTT connections."""
        if self.running():
            raise BrokerError(f"the {self.kind} broker on {self.address} is still running")
        self.process, self.log_path = _spawn(self.kind, self.host, self.port, self.workdir, self.log_path is None, self.pki)
        _live.add(self)
        probe = probe_tls_context(self.pki) if self.pki is not None else None
        deadline = time.monotonic() + timeout
        while not mqtt_ping(self.host, self.port, tls=probe):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BrokerError(f"{self.kind} broker on {self.address} did not come back. Its output:\n{self.log_text().strip()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker (SIGTERM: Mosquitto saves its database), then kill if stuck."""
        self.halt(timeout)
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


def _pki_paths(pki: FleetIdentities) -> dict[str, str]:
    """Where each security line of the base config points, in this identity folder."""
    return {"acl_file": str(pki.acl.resolve()), "cafile": str(pki.ca_cert.resolve()),
            "certfile": str(pki.broker_cert.resolve()), "keyfile": str(pki.broker_key.resolve()),
            "crlfile": str(pki.crl.resolve())}


def mosquitto_config(base: str, host: str, port: int, persistence_dir: Path, pki: FleetIdentities | None = None) -> str:
    """Derive a runnable config from ``base``: our listener, persistence folder, stderr log.

    With ``pki`` the security lines (acl_file, cafile, certfile, keyfile, crlfile) point into
    that identity folder and every file must exist; without it they are dropped and the
    broker admits anonymous clients (the insecure development broker: loopback only).
    Everything else in ``base`` (limits, queues) is kept, so tests exercise the same
    settings as ``broker_config/mosquitto.conf``.
    """
    if pki is None and not is_loopback(host):
        raise BrokerError(f"an insecure (anonymous, no TLS) broker binds loopback only, not {host!r}; "
                          "give it the fleet's identities (--pki DIR)")
    paths = _pki_paths(pki) if pki is not None else {}
    for key, value in paths.items():
        if not Path(value).is_file():
            raise BrokerError(f"{pki.root if pki else ''}: {key} {value} is missing; run `turbofed fleet init` first")
    out: list[str] = []
    seen: set[str] = set()
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
        elif key in _SECURITY:
            if pki is None:
                continue
            if key in paths:
                line = f"{key} {paths[key]}"
        seen.add(key)
        out.append(line)
    if pki is None:
        out.insert(0, "allow_anonymous true")
    else:
        required = {"allow_anonymous", "require_certificate", "use_identity_as_username", *paths}
        if required - seen or "allow_anonymous true" in out:
            raise BrokerError(f"the base mosquitto config lacks the secure settings ({', '.join(sorted(required - seen)) or 'allow_anonymous false'}); "
                              f"see {REPO_CONF}")
    if not any(line.split()[:1] == ["max_packet_size"] for line in out):
        out.insert(0, f"max_packet_size {MAX_PACKET_BYTES}")
    head = [f"persistence_location {persistence_dir.resolve()}/", "log_dest stderr"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Mosquitto drops root privileges to user "mosquitto", which cannot write our folder.
        import pwd

        head.append(f"user {pwd.getpwuid(0).pw_name}")
    if not listener_done:
        if pki is not None:
            raise BrokerError(f"the base mosquitto config has no listener for its TLS settings; see {REPO_CONF}")
        out.append(f"listener {port} {host}")
    return "\n".join(["# generated by turbofed.simulation.broker", *head, *out]) + "\n"


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def probe_tls_context(pki: FleetIdentities, identity: str = AGGREGATOR) -> ssl.SSLContext:
    """A client TLS context as `identity` of the fleet: verifies the broker against the CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert(identity)), str(pki.client_key(identity)))
    return context


def mqtt_ping(host: str, port: int, timeout: float = 1.0, tls: ssl.SSLContext | None = None) -> bool:
    """True if an MQTT 3.1.1 broker accepts a CONNECT (CONNACK code 0): anonymous, or over
    TLS with the client certificate of the `tls` context (the broker names us by its CN).

    A bare TCP connect would report ready before amqtt has loaded its plugins, and makes
    both brokers log a protocol error.
    """
    client_id = f"turbofed-probe-{uuid.uuid4().hex[:12]}".encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big") + client_id
    connect = bytes([0x10, len(var)]) + var
    target = _probe_host(host)
    try:
        with socket.create_connection((target, port), timeout=timeout) as raw:
            s = tls.wrap_socket(raw, server_hostname=target) if tls is not None else raw
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


def _spawn(kind: BrokerKind, host: str, port: int, workdir: Path, stream_logs: bool,
           pki: FleetIdentities | None, extra_conf: str = "") -> tuple[subprocess.Popen[bytes], Path | None]:
    if kind == "mosquitto":
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError("mosquitto is not installed (looked on PATH, /usr/sbin, /usr/local/sbin); "
                              "install it or use the embedded broker (--embedded)")
        base = REPO_CONF.read_text() if REPO_CONF.is_file() else _FALLBACK_CONF
        persistence = workdir / "mosquitto"
        persistence.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(mosquitto_config(base, host, port, persistence, pki) + extra_conf)
        cmd = [exe, "-c", str(conf)]
    else:
        code = "import sys; from turbofed.simulation.broker import serve_amqtt; sys.exit(serve_amqtt(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, "--host", host, "--port", str(port),
               "--max-bytes", str(MAX_PACKET_BYTES), "--parent-pid", str(os.getpid())]
    env = dict(os.environ)
    # Its own session, and SIGTERM from the kernel should we die without stopping it.
    if stream_logs:
        return spawn(cmd, env=env), None
    log_path = workdir / f"{kind}.log"
    with open(log_path, "wb") as out:  # fresh per start: errors below quote only this run
        proc = spawn(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, log_path


def start_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    embedded: bool | None = None,
    workdir: Path | None = None,
    *,
    timeout: float = 20.0,
    stream_logs: bool = False,
    pki: FleetIdentities | str | Path | None = None,
    extra_conf: str = "",
) -> BrokerHandle:
    """Start a broker and wait until it accepts MQTT connections.

    ``port=0`` picks a free port. ``embedded``: None = Mosquitto if installed, else amqtt;
    True = amqtt; False = Mosquitto or fail. ``workdir`` holds the generated config,
    the persistence folder and the log (a temporary folder when None, removed on stop).
    ``stream_logs`` sends the broker's output to this process's terminal instead.
    ``pki``: the fleet's identity folder: Mosquitto with TLS, client certificates, ACL and
    CRL (amqtt cannot do this: asking for it is an error, not a silent downgrade). Without
    it the broker is the insecure development broker: loopback only, logged as such.
    ``extra_conf``: Mosquitto lines appended after the listener (a regional broker's bridge,
    turbofed/deploy/bridge.py); Mosquitto only.
    """
    if pki is not None and not isinstance(pki, FleetIdentities):
        pki = FleetIdentities(Path(pki))
    if pki is not None:
        pki.read_manifest()  # a clear error for a folder that holds no fleet
    if embedded is None:
        kind: BrokerKind = "amqtt" if find_mosquitto() is None else "mosquitto"
    else:
        kind = "amqtt" if embedded else "mosquitto"
    if kind == "amqtt" and extra_conf:
        raise BrokerError("the embedded broker (amqtt) has no bridges; install mosquitto for a regional broker")
    if kind == "amqtt" and pki is not None:
        raise BrokerError("the embedded broker (amqtt) cannot enforce TLS client certificates and the fleet's ACL; "
                          "install mosquitto for the secure setup, or run the insecure development broker without --pki")
    if pki is None and not is_loopback(host):
        raise BrokerError(f"the insecure development broker ({kind}: anonymous, no TLS, no ACL) binds loopback only, "
                          f"not {host!r}; give it the fleet's identities (--pki DIR) to serve other machines")
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
        proc, log_path = _spawn(kind, host, chosen, workdir, stream_logs, pki, extra_conf)
        handle = BrokerHandle(host, chosen, kind, proc, workdir, log_path, tmp, pki)
        _live.add(handle)
        probe = probe_tls_context(pki) if pki is not None else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if mqtt_ping(host, chosen, tls=probe):
                if pki is None:
                    log.warning(INSECURE_WARNING.format(address=handle.address))
                else:
                    log.info("%s broker ready on %s:%d (TLS, client certificates of %s, ACL)", kind, host, chosen, pki.root)
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


def broker_pki(args: argparse.Namespace) -> FleetIdentities | None:
    """The identity folder `turbofed broker` runs with: --pki, else pki/ beside --fleet, else
    ./pki when it holds a fleet. None only with an explicit --insecure-dev (or --embedded,
    which cannot be secure): a broker never drops its security silently."""
    insecure = bool(getattr(args, "insecure_dev", False) or getattr(args, "embedded", False))
    pki_arg, fleet_arg = getattr(args, "pki", None), getattr(args, "fleet", None)
    if insecure:
        if pki_arg:
            raise BrokerError("--pki and --insecure-dev/--embedded exclude each other")
        return None
    if pki_arg:
        return FleetIdentities(Path(pki_arg))
    folder = Path(fleet_arg).resolve().parent / "pki" if fleet_arg else Path("pki")
    if (folder / "fleet.json").is_file():
        return FleetIdentities(folder)
    raise BrokerError(f"no fleet identities in {folder} (run `turbofed fleet init --fleet fleet.toml`, then "
                      "`turbofed broker --pki pki`), or run the anonymous loopback development broker with --insecure-dev")


def run_cli(args: argparse.Namespace) -> int:
    """``turbofed broker``: run a broker in the foreground until Ctrl-C.

    State (Mosquitto's database) lives in .turbofed/broker so the retained round and
    global model survive a restart.
    """
    embedded = True if getattr(args, "embedded", False) else None
    workdir = Path(getattr(args, "workdir", None) or ".turbofed/broker")
    pki = broker_pki(args)
    port = args.port if args.port is not None else (TLS_PORT if pki is not None else 1883)
    handle = start_broker(args.host, port, embedded=embedded, workdir=workdir, stream_logs=True, pki=pki)
    if pki is None:
        print(f"turbofed: {INSECURE_WARNING.format(address=handle.address)}", file=sys.stderr)
    log.info("%s broker running on %s%s; Ctrl-C to stop", handle.kind, handle.address,
             f" (TLS, identities in {pki.root})" if pki is not None else " (INSECURE development broker)")

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
    if not is_loopback(a.host):
        print(f"turbofed-amqtt: the embedded broker is for development only and binds loopback only, not {a.host!r}",
              file=sys.stderr)
        return 2
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
        log.warning(INSECURE_WARNING.format(address=f"{a.host}:{a.port}"))
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
