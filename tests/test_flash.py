"""`turbofed flash`: offline bundles for edge devices.

Fast tests check the pieces (target platforms, config, unit, installer guards, dry run).
Slow tests build real bundles (pip fetches the wheels from the configured package index:
they skip with the reason when it is unreachable), install the native one into a fresh
virtual environment with the bundle's install.sh --no-systemd (pip --no-index; inside a
network namespace without network when `unshare -rn` works here), run the installed
agent against the test broker with the real aggregator in this process (on Mosquitto: a
broker with the bundle's fleet identities, the agent connecting with the identity the
bundle installed), and check the aarch64 bundle holds only aarch64 or pure-Python wheels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from turbofed import envelope
from turbofed.config import FleetConfig, ModelSettings, load_site_config
from turbofed.deploy import flash
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities, gateway_name, init_from_fleet, write_acl
from turbofed.messages import EngineEvent, RoundAnnouncement, SensorReading, Status, signed
from turbofed.mqtt import connect, make_client
from turbofed.simulation.broker import BrokerHandle, start_broker
from turbofed.topics import Topics

REPO = Path(__file__).resolve().parent.parent
SITE = "pi-hangar-1"
RUNTIME = {"numpy", "onnx", "onnxruntime", "paho-mqtt", "tqdm"}
TRAIN = {"scikit-learn", "skl2onnx", "scipy"}


def write_fleet(folder: Path, host: str = "10.20.0.5", port: int = 1883) -> Path:
    """A fleet config and its identities (`turbofed fleet init`: pki/ beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fleet.toml"
    path.write_text(
        f'sites = ["{SITE}", "pi-hangar-2"]\nstore = "results.sqlite"\nregistry = "registry"\npki = "pki"\n\n'
        f'[broker]\nhost = "{host}"\nport = {port}\nusername = "aggregator"\npassword = "not-for-sites"\n'
    )
    if not (folder / "pki").exists():
        init_from_fleet(path)
    return path


def fake_bundle(tmp: Path, profile: str = "training", platform: str | None = None) -> Path:
    """Config, unit and installer of a bundle, without wheels (for tests that stop before pip)."""
    plan = flash.plan_bundle(SITE, str(write_fleet(tmp)), tmp / "bundle", platform, None, profile, "*")
    out = plan.out
    (out / "config").mkdir(parents=True)
    (out / "systemd").mkdir()
    (out / "config" / "edge.toml").write_text(flash.site_config_toml(SITE, plan.broker, None, plan.fleet, plan.fleet_id))
    flash.write_identity(plan, out / "config" / flash.IDENTITY_DIR)
    values = {"SITE": SITE, "PROFILE": profile, "EXTRAS": plan.extras, "WHEEL": plan.wheel_name, "PY_VERSION": plan.target.python_version,
              "ARCH": plan.target.arch, "UNIT": flash.UNIT, "USER": flash.SERVICE_USER, "VENV": flash.VENV, "CONFIG": flash.CONFIG,
              "STATE_DIR": f"/var/lib/turbofed/{SITE}", "VERSION": plan.version, "PLATFORM": plan.target.label}
    (out / "systemd" / flash.UNIT).write_text(flash.edge_unit(SITE, profile))
    (out / "install.sh").write_text(flash.render("install.sh", values))
    return out


# --------------------------------------------------------------------------- fast


def test_aarch64_target_covers_manylinux_up_to_bookworm() -> None:
    target = flash.resolve_target("linux_aarch64", "3.11")
    assert target.arch == "aarch64"
    assert {"manylinux_2_17_aarch64", "manylinux_2_28_aarch64", "manylinux_2_36_aarch64", "manylinux2014_aarch64", "linux_aarch64"} <= set(target.platforms)
    assert "manylinux_2_37_aarch64" not in target.platforms
    opts = target.pip_options()
    assert opts[:5] == ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    assert flash.resolve_target("arm64", "3.11").platforms == target.platforms
    older = flash.resolve_target("manylinux_2_31_aarch64", "3.12")
    assert "manylinux_2_31_aarch64" in older.platforms and "manylinux_2_32_aarch64" not in older.platforms
    assert flash.resolve_target(None, None).native


@pytest.mark.parametrize("platform, version, message", [("linux_aarch64", "3.10", "3.11 or newer"), ("linux_aarch64", "three", "look like 3.11"), ("../x", "3.11", "not a platform")])
def test_bad_targets_are_refused(platform: str, version: str, message: str) -> None:
    with pytest.raises(flash.FlashError, match=message):
        flash.resolve_target(platform, version)


def test_wheel_fits() -> None:
    assert flash.wheel_fits("numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl", "aarch64")
    assert flash.wheel_fits("paho_mqtt-2.2.0-py3-none-any.whl", "aarch64")
    assert not flash.wheel_fits("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "aarch64")


def test_unknown_site_and_bad_engines_are_clear_errors(tmp_path: Path) -> None:
    fleet = str(write_fleet(tmp_path))
    with pytest.raises(flash.FlashError, match=r"site 'pi-9' is not in the fleet config .*pi-hangar-1, pi-hangar-2"):
        flash.plan_bundle("pi-9", fleet, tmp_path / "b")
    with pytest.raises(flash.FlashError, match="--engines"):
        flash.plan_bundle(SITE, fleet, tmp_path / "b", engines="e1,bad/engine")
    assert flash.plan_bundle(SITE, fleet, tmp_path / "b", engines="e1, e2,e1").engines == ("e1", "e2")
    loopback = flash.plan_bundle(SITE, str(write_fleet(tmp_path / "lo", host="127.0.0.1")), tmp_path / "b")
    assert any("look for the broker on itself" in w for w in loopback.warnings)


def test_site_config_is_a_loadable_site_toml_without_the_aggregators_login(tmp_path: Path) -> None:
    out = fake_bundle(tmp_path)
    text = (out / "config" / "edge.toml").read_text()
    assert "#@credentials@" in text and "not-for-sites" not in text
    assert not [line for line in text.splitlines() if line.startswith(("username", "password"))]
    config = load_site_config(out / "config" / "edge.toml")
    assert config.site == SITE and config.state_dir == f"/var/lib/turbofed/{SITE}" and config.engines is None
    pki = tmp_path / "pki"  # the bundle carries this site's signing key and pins the aggregator's key
    assert config.identity is not None and config.identity.fleet_id == json.loads((pki / "fleet.json").read_text())["fleet_id"]
    assert Path(config.identity.signing_key).read_bytes() == (pki / "identities" / SITE / "signing.key").read_bytes()
    assert Path(config.identity.aggregator_key).read_bytes() == (pki / "identities" / "aggregator" / "signing.pub").read_bytes()
    assert (config.broker.host, config.broker.port, config.broker.username) == ("10.20.0.5", 1883, None)
    # the site's own identity, from the fleet's identity folder, keys 0600
    identity = out / "config" / "identity"
    assert config.broker.tls and config.broker.cert == str(identity / "client.crt") and config.broker.identity == SITE
    pki = FleetIdentities(tmp_path / "pki")
    assert (identity / "client.key").read_bytes() == pki.client_key(SITE).read_bytes()
    assert (identity / "aggregator.pub").read_bytes() == pki.signing_pub(AGGREGATOR).read_bytes()
    assert (identity / "signing.key").read_bytes() == pki.signing_key(SITE).read_bytes()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in identity.iterdir()} == {
        "client.crt": 0o644, "client.key": 0o600, "ca.crt": 0o644, "signing.key": 0o600, "aggregator.pub": 0o644}


def test_a_site_without_an_identity_gets_no_bundle(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path)
    from turbofed.deploy.identities import revoke_identity

    revoke_identity(FleetIdentities(tmp_path / "pki"), SITE)
    with pytest.raises(flash.FlashError, match=f"no active site identity '{SITE}'; issue one: turbofed fleet add"):
        flash.plan_bundle(SITE, str(fleet), tmp_path / "b")
    with pytest.raises(flash.FlashError, match="no fleet identities here"):
        flash.plan_bundle(SITE, str(fleet), tmp_path / "b", pki=tmp_path / "elsewhere")


def verify_unit(unit: str, name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit (when systemd is here),
    with its ExecStart pointed at a stub."""
    if shutil.which("systemd-analyze") is None:
        return
    stub = tmp_path / "venv" / "bin" / "turbofed"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    checked = tmp_path / name
    checked.write_text(unit.replace("/opt/turbofed/venv/", f"{tmp_path}/venv/"))
    proc = subprocess.run(["systemd-analyze", "verify", str(checked)], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if name in line]
    assert not complaints, "\n".join(complaints)


def test_unit_runs_the_venv_agent_unprivileged_and_restarts(tmp_path: Path) -> None:
    out = fake_bundle(tmp_path, profile="inference")
    unit = (out / "systemd" / flash.UNIT).read_text()
    for line in ("Restart=on-failure", "User=turbofed", "StateDirectory=turbofed", "WantedBy=multi-user.target",
                 "ExecStart=/opt/turbofed/venv/bin/turbofed edge --config /etc/turbofed/edge.toml --profile inference",
                 "Description=turbofed edge agent (site pi-hangar-1, inference profile)", "KillSignal=SIGTERM"):
        assert line in unit.splitlines(), line
    verify_unit(unit, flash.UNIT, tmp_path)


def test_aggregator_unit_is_the_agents_with_its_own_command(tmp_path: Path) -> None:
    from turbofed.deploy import units

    unit = units.aggregator_unit()
    edge = units.edge_unit(SITE, "training").splitlines()
    own = {"ExecStart=/opt/turbofed/venv/bin/turbofed aggregator --config /etc/turbofed/fleet.toml",
           "Description=turbofed aggregator", "After=network-online.target mosquitto.service"}
    assert own <= set(unit.splitlines())
    # Everything that is not a comment, the description or the command is the same unit.
    def same(lines: list[str]) -> list[str]:
        return [x for x in lines if not x.startswith(("#", "Description=", "ExecStart=", "After="))]

    assert same(unit.splitlines()) == same(edge)
    printed = subprocess.run([sys.executable, "-m", "turbofed.deploy.units", "aggregator", "--venv", "/srv/tf"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ExecStart=/srv/tf/bin/turbofed aggregator --config /etc/turbofed/fleet.toml" in printed.splitlines()
    verify_unit(unit, units.AGGREGATOR_UNIT, tmp_path)


def test_installer_is_valid_bash_and_refuses_before_changing_anything(tmp_path: Path) -> None:
    out = fake_bundle(tmp_path, platform="linux_aarch64")
    subprocess.run(["bash", "-n", str(out / "install.sh")], check=True)
    usage = subprocess.run(["bash", str(out / "install.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--no-systemd" in usage.stdout and "--credentials" in usage.stdout
    wrong = subprocess.run(["bash", str(out / "install.sh"), "--no-systemd", "--prefix", str(tmp_path / "p")], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if os.uname().machine not in ("aarch64", "arm64"):
        assert wrong.returncode != 0 and "holds aarch64 wheels but this machine is" in wrong.stderr
    assert not (tmp_path / "p").exists()
    native = fake_bundle(tmp_path / "n")
    no_login = subprocess.run(["bash", str(native / "install.sh"), "--no-systemd", "--prefix", str(tmp_path / "q")], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert no_login.returncode != 0 and "--credentials FILE" in no_login.stderr
    assert not (tmp_path / "q").exists()


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path)
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "turbofed.cli", "flash", "--site", SITE, "--fleet", str(fleet), "--out", str(out),
         "--platform", "linux_aarch64", "--profile", "inference", "--host", "pi@10.0.0.7", "--dry-run"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "pip download" in text and "--platform manylinux_2_28_aarch64" in text and "--python-version" in text
    assert "turbofed-0.1.0-py3-none-any.whl" in text and "[train]" not in text  # inference: core only
    assert f"scp -r -q {out} pi@10.0.0.7:turbofed-bundle-{SITE}" in text
    assert f"ssh -t pi@10.0.0.7 'sudo bash turbofed-bundle-{SITE}/install.sh'" in text
    assert not out.exists()
    bad = subprocess.run([sys.executable, "-m", "turbofed.cli", "flash", "--site", "nope", "--fleet", str(fleet), "--out", str(out), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not in the fleet config" in bad.stderr


def test_root_host_needs_no_sudo_and_bad_hosts_are_refused(tmp_path: Path) -> None:
    cmds = flash.deploy_commands(tmp_path, "root@10.0.0.7", SITE)
    assert cmds[-1] == ["ssh", "-t", "root@10.0.0.7", f"bash turbofed-bundle-{SITE}/install.sh"]
    with pytest.raises(flash.FlashError, match="user@address"):
        flash.deploy_commands(tmp_path, "pi@host; rm -rf /", SITE)


def test_pip_failures_name_the_package(tmp_path: Path) -> None:
    target = flash.resolve_target("linux_armv7l", "3.11")
    output = ("ERROR: Could not find a version that satisfies the requirement onnxruntime<2,>=1.18 (from turbofed) (from versions: 1.0)\n"
              "ERROR: No matching distribution found for onnxruntime<2,>=1.18")
    error = flash._pip_failure(output, "downloading the dependencies", target, tmp_path / "build.log")
    assert "no wheel of onnxruntime" in str(error) and "linux_armv7l" in str(error) and "64-bit" in str(error)
    offline = flash._pip_failure("WARNING: Retrying ... NewConnectionError ...\nERROR: Could not find a version that satisfies the requirement numpy (from versions: none)\nERROR: No matching distribution found for numpy", "x", target, tmp_path / "log")
    assert isinstance(offline, flash.IndexUnreachableError)


# --------------------------------------------------------------------------- slow: real bundles


@pytest.fixture(scope="session")
def index() -> None:
    ok, why = flash.index_reachable()
    if not ok:
        pytest.skip(f"the package index is unreachable, so no bundle can be built: {why}")


def _build(tmp: Path, platform: str | None, profile: str) -> tuple[Path, dict]:
    plan = flash.plan_bundle(SITE, str(write_fleet(tmp)), tmp / "bundle", platform, None, profile, "*")
    try:
        manifest = flash.build_bundle(plan, progress=lambda m: None)
    except flash.IndexUnreachableError as exc:
        pytest.skip(f"the package index became unreachable while building: {exc}")
    return plan.out, manifest


def _no_network_prefix() -> list[str]:
    """`unshare -rn` (a network namespace with no network) when this machine allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


def _install(bundle: Path, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    python = getattr(sys, "_base_executable", None) or sys.executable
    cmd = [*_no_network_prefix(), "bash", str(bundle / "install.sh"), "--no-systemd", "--prefix", str(prefix / "opt"),
           "--etc", str(prefix / "etc"), "--state-dir", str(prefix / "state"), "--python", python, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def installed(index: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A native training bundle, installed offline into a fresh venv (install.sh --no-systemd).

    Session scope: pytest interleaves modules by broker kind, and a module fixture would be
    built twice."""
    tmp = tmp_path_factory.mktemp("flash-native")
    started = time.perf_counter()
    bundle, manifest = _build(tmp, None, "training")
    built = time.perf_counter()
    proc = _install(bundle, tmp / "root", "--no-credentials")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"bundle": bundle, "manifest": manifest, "root": tmp / "root", "venv": tmp / "root" / "opt" / "venv", "pki": tmp / "pki",
            "config": tmp / "root" / "etc" / "edge.toml", "isolated": bool(_no_network_prefix()),
            "build_s": built - started, "install_s": time.perf_counter() - built}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_native_bundle_is_complete_and_installs_offline(installed: dict) -> None:
    manifest, bundle = installed["manifest"], installed["bundle"]
    assert RUNTIME | TRAIN | {"turbofed"} <= set(manifest["packages"])
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    assert {"install.sh", "config/edge.toml", f"systemd/{flash.UNIT}", "bundle.json"} <= listed
    assert {f"wheels/{w}" for w in manifest["wheels"]} <= listed
    freeze = subprocess.run([str(installed["venv"] / "bin" / "python"), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, timeout=120)
    have = {flash.canonical(p["name"]): p["version"] for p in json.loads(freeze.stdout)}
    for name, version in manifest["packages"].items():
        assert have.get(name) == version, name
    config = load_site_config(installed["config"])
    assert config.site == SITE and config.broker.username is None and config.state_dir == str(installed["root"] / "state")
    assert "config/identity/client.key" in listed and "config/identity/aggregator.pub" in listed
    identity = installed["root"] / "etc" / "identity"
    assert config.broker.key == str(identity / "client.key") and config.broker.identity == SITE
    assert config.identity is not None and Path(config.identity.signing_key) == identity / "signing.key"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o700
    for key in ("client.key", "signing.key"):
        assert stat.S_IMODE((identity / key).stat().st_mode) == 0o600, key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reinstall_reads_the_login_from_a_file_and_keeps_the_old_config(installed: dict, tmp_path: Path) -> None:
    creds = tmp_path / "login"
    creds.write_text('# site login\nusername=pi-hangar-1\npassword=s3cr"et\\ #1\n')
    before = installed["config"].read_text()
    proc = _install(installed["bundle"], installed["root"], "--credentials", str(creds))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = load_site_config(installed["config"])
    assert (config.broker.username, config.broker.password) == ("pi-hangar-1", 's3cr"et\\ #1')
    assert oct(installed["config"].stat().st_mode & 0o777) == "0o600"
    backups = sorted(installed["config"].parent.glob("edge.toml.*.bak"))
    assert backups and backups[-1].read_text() == before
    installed["config"].write_text(before)  # the round test runs without a login


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_installed_agent_takes_part_in_a_round(installed: dict, broker: BrokerHandle, tmp_path: Path) -> None:
    """The agent from the bundle's venv, the real aggregator in this process: fleet
    statistics, then global v0 (built by the aggregator: the site sends nothing for it) and
    round 1 (trained from v0), which gets the site's update. On Mosquitto the round is secure:
    a broker with the bundle's fleet identities (TLS, ACL), the agent with the identity
    install.sh placed, the others with theirs."""
    from turbofed.aggregator.service import Aggregator
    from turbofed.data.synthetic import generate_fleet

    tag = uuid.uuid4().hex[:8]
    topics = Topics(f"fl{tag}/v1", f"plantfl{tag}")
    own_broker = None
    if broker.secure:  # the session broker knows another CA: one with the bundle's fleet
        ids = FleetIdentities(installed["pki"])
        write_acl(ids, [SITE, "pi-hangar-2"], topics)
        broker = own_broker = start_broker(embedded=False, workdir=tmp_path / "broker", pki=ids)
    as_ = lambda identity: broker.settings(identity, topic_root=topics.root, plant_root=topics.plant_root)  # noqa: E731
    settings = as_(AGGREGATOR)
    raw = tomllib.loads(installed["config"].read_text())
    raw["broker"].update(host=settings.host, port=settings.port, topic_root=settings.topic_root, plant_root=settings.plant_root)
    for name in ("ca", "cert", "key"):  # the installed identity, relative to the installed config
        raw["broker"][name] = str(installed["config"].parent / raw["broker"][name])
        if not broker.secure:
            del raw["broker"][name]  # the development broker speaks no TLS
    config = tmp_path / "edge.toml"
    ident = {k: v if k == "fleet_id" else str(installed["config"].parent / v) for k, v in raw["identity"].items()}  # the installed keys
    config.write_text(
        f'site = "{raw["site"]}"\nstate_dir = "{tmp_path / "state"}"\nengines = "*"\npredictions_every_s = 0.5\n\n[broker]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in raw["broker"].items())
        + "\n[identity]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ident.items())
    )
    pki = installed["bundle"].parent / "pki"
    site_messages = signed.aggregator_keys(str(pki))[1]  # the site's signatures, as the aggregator checks them
    aggregator_messages = signed.site_keys(SITE, ident["fleet_id"], ident["signing_key"], ident["aggregator_key"])[1]
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    watcher = make_client(f"t-flash-{tag}", settings)
    watcher.on_message = lambda c, u, msg: seen.put((msg.topic, msg.payload))
    connect(watcher, settings)
    for topic in (topics.update(SITE), topics.status(SITE), topics.round):
        watcher.subscribe(topic, qos=1)
    log = open(tmp_path / "agent.log", "w+")
    agent = subprocess.Popen([str(installed["venv"] / "bin" / "turbofed"), "edge", "--config", str(config), "--profile", "training"],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    stop = threading.Event()
    thread: threading.Thread | None = None
    updates: list[tuple[int, str, int]] = []
    status: dict = {}
    done = False

    def pump(what: str, until, timeout: float = 90.0) -> None:
        nonlocal done
        deadline = time.monotonic() + timeout
        while not until():
            if agent.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the installed agent exited ({agent.returncode}) while waiting for {what}:\n{log.read()[-3000:]}")
            if time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; agent log:\n{log.read()[-3000:]}")
            try:
                topic, payload = seen.get(timeout=0.2)
            except queue.Empty:
                continue
            if not payload:
                continue
            if topic == topics.update(SITE):
                env = envelope.decode(payload)
                site_messages.check_envelope(env, signer=SITE)
                updates.append((env.round, env.kind, env.samples))
            elif topic == topics.status(SITE):
                body = site_messages.open(signed.STATUS, payload, signer=SITE).body
                status.update(dataclasses.asdict(Status.from_payload(body, site=SITE)))
            elif topic == topics.round:
                body = aggregator_messages.open(signed.ROUND, payload, signer=signed.AGGREGATOR).body
                done = done or RoundAnnouncement.from_payload(body).done

    try:
        pump("the installed agent to come online", lambda: status.get("online") is True, timeout=60)
        runs = generate_fleet(n_train=5, n_test=0, seed=1).train  # a site shares statistics over >= 5 engines (min_stats_engines)
        rows = sum(len(r) for r in runs)
        gateway = as_(gateway_name(SITE))
        publisher = make_client(f"t-flash-pub-{tag}", gateway)
        connect(publisher, gateway)
        for k, run in enumerate(runs):
            for t in range(len(run)):
                reading = SensorReading(int(run.cycles[t]), tuple(run.settings[t]), tuple(run.sensors[t]))
                publisher.publish(topics.sensors(SITE, f"e{k}"), reading.to_payload(), qos=1)
            publisher.publish(topics.events(SITE, f"e{k}"), EngineEvent("failure", int(run.cycles[-1])).to_payload(), qos=1).wait_for_publish(30)
        publisher.disconnect()
        publisher.loop_stop()
        pump(f"the site to label {rows} rows", lambda: (status.get("samples") or 0) >= rows)

        fleet = FleetConfig(sites=(SITE,), store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"),
                            model=ModelSettings(hidden=(16,), rounds=1, local_epochs=1), min_samples=50,
                            round_deadline_s=60.0, stats_retry_s=0.5, broker=settings, pki=str(pki))
        aggregator = Aggregator(fleet)
        aggregator.start()
        thread = threading.Thread(target=aggregator.run, args=(stop,), daemon=True)
        thread.start()
        pump("global v0 and round 1 to finish", lambda: done, timeout=180)
        pump("the site to load global v1", lambda: status.get("model_version") == 1, timeout=60)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for topic in (topics.round, topics.global_model, topics.status(SITE), topics.stats_request):
            watcher.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        watcher.disconnect()
        watcher.loop_stop()
        log.close()
        if own_broker is not None:
            own_broker.stop()
    assert [(r, kind) for r, kind, _ in updates] == [(1, "update")]
    assert updates[0][2] == rows
    assert agent.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inference_bundle_has_no_training_packages(index: None, tmp_path: Path) -> None:
    bundle, manifest = _build(tmp_path, None, "inference")
    assert RUNTIME | {"turbofed"} <= set(manifest["packages"])
    assert not (TRAIN | {"joblib", "threadpoolctl"}) & set(manifest["packages"])
    assert not [w for w in manifest["wheels"] if w.lower().startswith(("scikit_learn", "skl2onnx", "scipy"))]
    proc = _install(bundle, tmp_path / "root", "--no-credentials")
    assert proc.returncode == 0, proc.stderr[-3000:]
    python = str(tmp_path / "root" / "opt" / "venv" / "bin" / "python")
    check = subprocess.run([python, "-c", "import importlib.util as u, json; print(json.dumps([n for n in ('sklearn', 'skl2onnx', 'scipy') if u.find_spec(n)]))"],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(check.stdout) == []
    agent = subprocess.run([str(tmp_path / "root" / "opt" / "venv" / "bin" / "turbofed"), "edge", "--help"], capture_output=True, text=True, timeout=60)
    assert agent.returncode == 0 and "inference" in agent.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_aarch64_bundle_holds_only_aarch64_or_pure_python_wheels(index: None, tmp_path: Path) -> None:
    bundle, manifest = _build(tmp_path, "linux_aarch64", "training")
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    assert wheels == manifest["wheels"]
    foreign = [w for w in wheels if not flash.wheel_fits(w, "aarch64")]
    assert not foreign, foreign
    names = {flash.canonical(flash.wheel_tags(w)[0]) for w in wheels}
    assert RUNTIME | TRAIN | {"turbofed"} <= names
    native = [w for w in wheels if "aarch64" in flash.wheel_tags(w)[3]]
    assert {"numpy", "onnxruntime", "scikit-learn"} <= {flash.canonical(flash.wheel_tags(w)[0]) for w in native}
    assert manifest["arch"] == "aarch64" and manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert 'TARGET_ARCH="aarch64"' in (bundle / "install.sh").read_text()
