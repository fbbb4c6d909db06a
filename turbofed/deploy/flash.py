"""`turbofed flash`: an offline install bundle for one edge device, and its delivery.

Edge devices (Raspberry Pi class computers next to the engines) often have no route to a
package index, so a bundle carries everything the agent needs::

    <out>/
      wheels/                   turbofed and every runtime dependency, as wheels for the
                                target platform and Python version (nothing to compile)
      config/edge.toml          the site's config: broker address from the fleet config,
                                site id, engines, state folder under /var/lib/turbofed/<site>,
                                TLS paths (identity/..., relative to the config), a
                                placeholder install.sh fills with an optional broker login
      config/identity/          the site's identity from the fleet's identity folder
                                (`turbofed fleet init`): client.crt, client.key (0600),
                                ca.crt, signing.key (0600), aggregator.pub; install.sh
                                places it beside the config, keys 0600 owned by the
                                service user
      systemd/turbofed-edge.service
                                restart on failure, unprivileged user `turbofed`,
                                StateDirectory=turbofed, ExecStart from the venv (the
                                unit the aggregator shares: turbofed.deploy.units)
      install.sh                user, venv under /opt/turbofed, `pip install --no-index
                                --find-links wheels`, config, unit, enable + start
      bundle.json               what was built, for what, from what (and the pip commands)
      SHA256SUMS                checked by install.sh before it changes anything
      build.log                 pip's output while building

The dependency set is the core (numpy, onnx, onnxruntime, paho-mqtt, tqdm) plus, for the
training profile, the `train` extra (scikit-learn, skl2onnx): pip resolves it from the
turbofed wheel's own metadata, so it always matches pyproject.toml. Foreign platforms
(e.g. 64-bit Raspberry Pi OS: `--platform linux_aarch64`) are resolved with pip's
`--platform/--python-version/--implementation/--only-binary=:all:` options, and the
finished bundle is checked by resolving it again offline (`pip install --dry-run
--no-index`) for the same target.

`--host user@address` copies the bundle over ssh (scp) and runs install.sh there;
`--dry-run` prints every command instead of running it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from turbofed.config import BrokerSettings, load_fleet_config
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities, IdentityError
from turbofed.deploy.units import EDGE_CONFIG, EDGE_UNIT, SERVICE_USER, STATE_ROOT, VENV, edge_unit, render
from turbofed.errors import TurbofedError
from turbofed.topics import TopicError, validate_engine, validate_site

UNIT = EDGE_UNIT
CONFIG = EDGE_CONFIG
PROFILES = {"training": "[train]", "inference": ""}  # profile -> extras of the turbofed wheel
# Newest glibc a foreign-platform bundle may need: Raspberry Pi OS 12 (bookworm) has 2.36.
# Name a manylinux tag instead (--platform manylinux_2_31_aarch64) for an older system.
DEFAULT_GLIBC_MINOR = 36
OLDEST_MANYLINUX_MINOR = 17  # manylinux2014
BUNDLE_FILES = ("wheels", "config", "systemd", "install.sh", "bundle.json", "SHA256SUMS", "build.log")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")
# What pip prints when it cannot talk to the index at all (as opposed to "no such wheel").
_NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
    "Max retries exceeded",
    "Could not fetch URL",
    "connection broken by",
)


class FlashError(TurbofedError):
    """A bundle could not be built or delivered; the message says what and why."""


class IndexUnreachableError(FlashError):
    """pip could not reach the package index (needed to fetch the wheels)."""


Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- target


@dataclass(frozen=True)
class Target:
    """What the wheels are for: pip platform tags (empty: this machine) and a Python."""

    python_version: str  # "3.11"
    platforms: tuple[str, ...] = ()
    arch: str = "any"  # machine name install.sh checks against `uname -m`
    label: str = "native"

    @property
    def native(self) -> bool:
        return not self.platforms

    def pip_options(self) -> list[str]:
        opts = ["--only-binary=:all:", "--python-version", self.python_version, "--implementation", "cp"]
        for tag in self.platforms:
            opts += ["--platform", tag]
        return opts


def _host_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _manylinux(arch: str, newest_minor: int) -> tuple[str, ...]:
    """Every tag a glibc-2.<newest_minor> Linux on `arch` runs: manylinux_2_17.._2_N, legacy names."""
    tags = [f"manylinux_2_{m}_{arch}" for m in range(newest_minor, OLDEST_MANYLINUX_MINOR - 1, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686"):
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    tags.append(f"linux_{arch}")
    return tuple(tags)


# What a bundle can serve: install.sh is bash, the agent a systemd service, the wheels manylinux (glibc).
LINUX_ONLY = "a bundle installs on glibc Linux only (bash, systemd, manylinux wheels)"

_ARCH_ALIASES = {"arm64": "aarch64", "aarch64": "aarch64", "amd64": "x86_64", "x86_64": "x86_64", "armv7l": "armv7l", "armhf": "armv7l"}


def resolve_target(platform: str | None, python_version: str | None) -> Target:
    """`--platform` and `--python-version` as pip options. Accepts linux_aarch64 (also
    aarch64, arm64), linux_x86_64, linux_armv7l, or a manylinux_2_N_<arch> tag (N: the
    newest glibc to allow); None means this machine."""
    version = python_version or _host_python()
    if not re.fullmatch(r"3\.\d{1,2}", version):
        raise FlashError(f"--python-version must look like 3.11, got {version!r}")
    if tuple(int(p) for p in version.split(".")) < (3, 11):
        raise FlashError(f"turbofed needs Python 3.11 or newer; --python-version {version} cannot run it")
    if platform is None or platform.strip().lower() == "native":
        if not sys.platform.startswith("linux"):
            raise FlashError(f"this machine is {sysconfig.get_platform()}: {LINUX_ONLY}; name the device's with --platform")
        machine = os.uname().machine if hasattr(os, "uname") else "any"
        arch = _ARCH_ALIASES.get(machine, machine)
        return Target(version, (), arch, f"native ({sysconfig.get_platform()})")
    name = platform.strip().lower()
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", name)
    if m:
        arch, newest = _ARCH_ALIASES.get(m.group(2), m.group(2)), int(m.group(1))
        if newest < OLDEST_MANYLINUX_MINOR:
            raise FlashError(f"--platform {platform}: glibc 2.{newest} is older than manylinux2014 (2.17)")
        return Target(version, _manylinux(arch, newest), arch, f"{platform} (manylinux_2_{OLDEST_MANYLINUX_MINOR}..2_{newest})")
    bare = name.removeprefix("linux_").removeprefix("linux-")
    if bare in _ARCH_ALIASES:
        arch = _ARCH_ALIASES[bare]
        return Target(version, _manylinux(arch, DEFAULT_GLIBC_MINOR), arch, f"linux_{arch} (manylinux_2_{OLDEST_MANYLINUX_MINOR}..2_{DEFAULT_GLIBC_MINOR})")
    if not re.fullmatch(r"[a-z0-9_.]+", name):
        raise FlashError(f"--platform: {platform!r} is not a platform tag (try linux_aarch64 or linux_x86_64)")
    if not name.startswith(("linux_", "manylinux")):  # win_amd64, macosx_14_0_arm64, musllinux_1_2_x86_64, any, ...
        raise FlashError(f"--platform {platform}: {LINUX_ONLY} (try linux_aarch64 or linux_x86_64)")
    arch = next((a for a in _ARCH_ALIASES if name.endswith(a)), "any")  # another glibc Linux tag: passed as is
    return Target(version, (name,), _ARCH_ALIASES.get(arch, "any"), name)


# --------------------------------------------------------------------------- wheels


def wheel_tags(filename: str) -> tuple[str, str, str, str]:
    """(distribution, python tags, abi tags, platform tags) of a wheel file name."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {filename}")
    return parts[0], parts[-3], parts[-2], parts[-1]


def wheel_fits(filename: str, arch: str) -> bool:
    """True when a wheel is pure Python or built for `arch` ("any": anything goes)."""
    platforms = wheel_tags(filename)[3].split(".")
    return arch == "any" or all(p == "any" for p in platforms) or any(p.endswith("_" + arch) for p in platforms)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_source_tree() -> Path:
    """The turbofed checkout this code runs from (a wheel is built from it)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"turbofed"', pyproject.read_text()):
        return root
    raise FlashError(
        f"turbofed flash builds the turbofed wheel from its source checkout, and {root} is not one "
        "(no pyproject.toml naming turbofed). Run it from a checkout: pip install -e <checkout>"
    )


def _source_copy(root: Path, dest: Path) -> Path:
    """Copy what the wheel is built from (pyproject, readme, licence, packages) to `dest`.

    Building from a copy keeps the checkout clean (no build/ or *.egg-info, which also
    keep stale files between builds) and lets several builds run at once."""
    import tomllib

    meta = tomllib.loads((root / "pyproject.toml").read_text())
    folders = sorted(set(meta["tool"]["setuptools"]["package-dir"].values()))  # turbofed.edge -> edge, ...
    # Sub-folders package-data names ("templates/*", "grafana/*.json"): data, not packages, but kept.
    data_dirs = {p.split("/")[0] for patterns in meta["tool"]["setuptools"].get("package-data", {}).values() for p in patterns if "/" in p}
    dest.mkdir(parents=True)

    def ignore(folder: str, names: list[str]) -> set[str]:
        """Build inputs only: no caches, and no sub-folder that is neither a package nor
        package data (data/cmapss/ holds downloaded datasets)."""
        here = Path(folder)
        return {n for n in names if n in ("__pycache__", ".pytest_cache") or n.endswith((".pyc", ".egg-info"))
                or ((here / n).is_dir() and not (here / n / "__init__.py").is_file() and n not in data_dirs)}

    for entry in sorted(root.iterdir()):
        if entry.is_file() and (entry.name == "pyproject.toml" or entry.name.upper().startswith(("README", "LICENSE", "LICENCE", "NOTICE", "MANIFEST.IN"))):
            shutil.copy2(entry, dest / entry.name)
    for folder in folders:
        shutil.copytree(root / folder, dest / folder, ignore=ignore)
    return dest


def _pip_env() -> dict[str, str]:
    """This machine's environment, minus pip settings: checks must see only the bundle."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run_pip(args: list[str], log: Path, what: str, target: Target, progress: Progress, env: dict[str, str] | None = None) -> str:
    """Run pip, stream its output to `log` (and one line per wheel to progress)."""
    cmd = [sys.executable, "-m", "pip", *args]
    lines: list[str] = []
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env)
        except OSError as exc:
            raise FlashError(f"{what}: cannot run pip ({exc})") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            lines.append(line.rstrip("\n"))
            saved = re.match(r"\s*(?:Saved|File was already downloaded)\s+(\S+)", line)
            if saved:
                progress(f"      {Path(saved.group(1)).name}")
        code = proc.wait()
    output = "\n".join(lines)
    if code != 0:
        raise _pip_failure(output, what, target, log)
    return output


def _pip_failure(output: str, what: str, target: Target, log: Path) -> FlashError:
    """pip's failure as a message naming the package (and the target) where possible."""
    tail = [line for line in output.splitlines() if line.startswith("ERROR:")] or output.splitlines()[-3:]
    detail = " | ".join(line.strip() for line in tail[-3:])
    where = f"{target.label}, Python {target.python_version}"
    missing = re.search(r"(?:No matching distribution found for|satisfies the requirement)\s+([A-Za-z0-9_.\-]+)", output)
    if any(sign in output for sign in _NETWORK_SIGNS) and (missing is None or "from versions: none" in output):
        return IndexUnreachableError(f"{what}: the package index is unreachable ({detail}); see {log}")
    if "from versions: none" in output:  # nothing at all under that name: no wheel, or no index?
        reachable, why = index_reachable()
        if not reachable:
            return IndexUnreachableError(f"{what}: the package index is unreachable (pip cannot fetch even paho-mqtt: {why}); see {log}")
    if missing:
        package = missing.group(1)
        hint = ""
        if target.arch == "armv7l":
            hint = " (PyPI has no 32-bit ARM wheels of numpy or onnxruntime: install 64-bit Raspberry Pi OS and use --platform linux_aarch64)"
        return FlashError(f"{what}: no wheel of {package} for {where}{hint}: {detail}; see {log}")
    conflict = re.search(r"Cannot install ([^\n]+?) because", output)
    if conflict:
        return FlashError(f"{what}: conflicting requirements around {conflict.group(1)} for {where}: {detail}; see {log}")
    return FlashError(f"{what} failed for {where}: {detail}; see {log}")


def index_reachable(timeout: float = 60.0) -> tuple[bool, str]:
    """Can pip fetch a wheel from the configured index? (True, "") or (False, why)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
               "--timeout", "10", "--retries", "1", "--progress-bar", "off", "paho-mqtt"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"pip download did not finish within {timeout:.0f} s"
        if proc.returncode == 0:
            return True, ""
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")]
        return False, (errors or ["pip download failed"])[-1]


# --------------------------------------------------------------------------- bundle


def parse_engines(engines: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """"*" (or None) -> None: every engine; "e1,e2" -> ("e1", "e2"), each a valid id."""
    if engines is None or engines == "*" or engines == ["*"]:
        return None
    items = [e.strip() for e in (engines.split(",") if isinstance(engines, str) else engines)]
    items = [e for e in items if e]
    if not items:
        raise FlashError("--engines: give comma-separated engine ids, or * for every engine of the site")
    for e in items:
        try:
            validate_engine(e)
        except TopicError as exc:
            raise FlashError(f"--engines: {exc}") from None
    return tuple(dict.fromkeys(items))


IDENTITY_DIR = "identity"  # beside edge.toml, in the bundle's config/ and in /etc/turbofed on the device
# (file in the bundle, where it comes from in the identity folder, private?)
IDENTITY_FILES = (("client.crt", "client_cert", False), ("client.key", "client_key", True), ("ca.crt", "ca_cert", False),
                  ("signing.key", "signing_key", True), ("aggregator.pub", "aggregator_pub", False))


def identity_sources(pki: FleetIdentities, site: str) -> dict[str, Path]:
    """The site's identity files in the fleet's identity folder; a missing one is an error
    that says how to issue it."""
    sources = {"client.crt": pki.client_cert(site), "client.key": pki.client_key(site), "ca.crt": pki.ca_cert,
               "signing.key": pki.signing_key(site), "aggregator.pub": pki.signing_pub(AGGREGATOR)}
    try:
        if pki.identities().get(site) != "site":
            raise FlashError(f"{pki.root}: no active site identity {site!r}; issue one: turbofed fleet add --fleet FLEET {site}")
    except IdentityError as exc:
        raise FlashError(f"{exc}; the bundle carries the site's identity") from None
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise FlashError(f"{pki.root}: the identity of site {site!r} is incomplete (missing {', '.join(missing)})")
    return sources


def site_config_toml(site: str, broker: BrokerSettings, engines: tuple[str, ...] | None, fleet: str,
                     fleet_id: str | None = None) -> str:
    """The site TOML the bundle installs; `#@credentials@` is where install.sh writes the login.
    With `fleet_id` it has an [identity] table naming the signing keys in identity/; without,
    the site runs unsigned (`insecure_unsigned = true`), which only a development fleet wants."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = [
        f"# turbofed edge agent for site {site}, written by `turbofed flash` from {Path(fleet).name}.",
        f"# install.sh installs it as {CONFIG} and writes the site's broker login below.",
        f"site = {q(site)}",
        f"state_dir = {q(f'{STATE_ROOT}/{site}')}",
        f"engines = {q('*') if engines is None else '[' + ', '.join(q(e) for e in engines) + ']'}",
        "",
        "[broker]",
        f"host = {q(broker.host)}",
        f"port = {int(broker.port)}",
        f"topic_root = {q(broker.topic_root)}",
        f"plant_root = {q(broker.plant_root)}",
        f"keepalive = {int(broker.keepalive)}",
        "# TLS: the fleet's CA and this site's client certificate (the broker knows the site by",
        "# its CN); relative to this file: install.sh places identity/ beside it.",
        f"ca = {q(IDENTITY_DIR + '/ca.crt')}",
        f"cert = {q(IDENTITY_DIR + '/client.crt')}",
        f"key = {q(IDENTITY_DIR + '/client.key')}",
        "# An optional broker login on top of the certificate: install.sh writes `username` and",
        "# `password` here when given --credentials FILE.",
        "#@credentials@",
        "",
    ]
    if fleet_id is None:
        lines[5:5] = ["insecure_unsigned = true  # no fleet identity: nothing is signed"]
    else:
        lines += ["# Signatures: this site signs with its own key and trusts only the aggregator's.",
                  "[identity]", f"fleet_id = {q(fleet_id)}", f"signing_key = {q(IDENTITY_DIR + '/signing.key')}",
                  f"aggregator_key = {q(IDENTITY_DIR + '/aggregator.pub')}", ""]
    return "\n".join(lines)


@dataclass
class Plan:
    """Everything `flash` decided before touching the disk; `commands` for --dry-run."""

    site: str
    fleet: str
    out: Path
    target: Target
    profile: str
    engines: tuple[str, ...] | None
    broker: BrokerSettings
    version: str
    identity: dict[str, Path] = field(default_factory=dict)  # bundle file name -> source file
    fleet_id: str | None = None  # the fleet the site's signatures are bound to
    warnings: list[str] = field(default_factory=list)

    @property
    def extras(self) -> str:
        return PROFILES[self.profile]

    @property
    def wheel_name(self) -> str:
        return f"turbofed-{self.version}-py3-none-any.whl"


def _source_version(root: Path) -> str:
    import tomllib

    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


def plan_bundle(site: str, fleet: str, out: str | Path, platform: str | None = None, python_version: str | None = None,
                profile: str = "training", engines: str | Sequence[str] | None = "*", pki: str | Path | None = None) -> Plan:
    """Check the inputs (site in the fleet, its identity in `pki` (default pki/ beside the
    fleet config), platform, profile, engines) and decide the bundle."""
    if profile not in PROFILES:
        raise FlashError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    try:
        validate_site(site)
    except TopicError as exc:
        raise FlashError(f"--site: {exc}") from None
    config = load_fleet_config(fleet)
    if site not in config.sites:
        raise FlashError(f"site {site!r} is not in the fleet config {fleet} (its sites: {', '.join(config.sites)})")
    target = resolve_target(platform, python_version)
    broker = BrokerSettings(host=config.broker.host, port=config.broker.port, topic_root=config.broker.topic_root,
                            plant_root=config.broker.plant_root, keepalive=config.broker.keepalive)
    ids = FleetIdentities(Path(pki) if pki else Path(fleet).resolve().parent / "pki")
    identity = identity_sources(ids, site)
    plan = Plan(site, str(fleet), Path(out), target, profile, parse_engines(engines), broker, _source_version(find_source_tree()),
                identity, fleet_id=ids.fleet_id)
    if broker.host in LOOPBACK:
        plan.warnings.append(
            f"the fleet config's broker host is {broker.host!r}: the device will look for the broker on itself. "
            f"Set [broker] host in {fleet} to the address devices reach, or edit {CONFIG} on the device."
        )
    return plan


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise FlashError(f"--out {out} exists and is not a folder")
        entries = list(out.iterdir())
        ours = (out / "bundle.json").is_file() or all(e.name in BUNDLE_FILES for e in entries)  # a bundle, or a failed build
        if entries and not ours:
            raise FlashError(f"--out {out} is not empty and holds no turbofed bundle; choose an empty or new folder")
        for entry in entries:  # an older bundle: replace its parts, leave anything else alone
            if entry.name in BUNDLE_FILES:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (out / "wheels").mkdir(parents=True, exist_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_commands(plan: Plan, source: str = "<checkout>") -> dict[str, list[str]]:
    """The pip commands a build runs (without `python -m pip`), by step."""
    wheels = plan.out / "wheels"
    req = f"{wheels / plan.wheel_name}{plan.extras}"
    opts = plan.target.pip_options()
    return {
        "wheel": ["wheel", "--no-deps", "--progress-bar", "off", "--wheel-dir", str(wheels), source],
        "download": ["download", "--dest", str(wheels), "--progress-bar", "off", *opts, req],
        "check": ["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(wheels), *opts,
                  "--target", str(plan.out / ".check"), "--quiet", "--report", str(plan.out / ".check-report.json"), req],
    }


def write_identity(plan: Plan, folder: Path) -> None:
    """Copy the site's identity into the bundle: private keys 0600 from the start, the folder 0700."""
    folder.mkdir(mode=0o700)
    private = {name for name, _, secret in IDENTITY_FILES if secret}
    for name, source in plan.identity.items():
        mode = 0o600 if name in private else 0o644
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(source.read_bytes())
        os.chmod(folder / name, mode)


def build_bundle(plan: Plan, progress: Progress = _stderr) -> dict:
    """Build the bundle `plan` describes; returns its manifest (also in bundle.json)."""
    started = time.perf_counter()
    out = plan.out
    _prepare_out(out)
    log = out / "build.log"
    log.write_text(f"turbofed flash: site {plan.site}, {plan.profile} profile, {plan.target.label}, Python {plan.target.python_version}\n")
    root = find_source_tree()
    cmds = pip_commands(plan)
    steps = 6

    progress(f"[1/{steps}] building the turbofed {plan.version} wheel from {root}")
    with tempfile.TemporaryDirectory(prefix="turbofed-flash-") as tmp:
        source = _source_copy(root, Path(tmp) / "src")
        cmd = pip_commands(plan, str(source))["wheel"]
        _run_pip(cmd, log, "building the turbofed wheel", plan.target, progress)
    built = sorted((out / "wheels").glob("turbofed-*.whl"))
    if [w.name for w in built] != [plan.wheel_name]:
        raise FlashError(f"building the turbofed wheel gave {[w.name for w in built]}, expected {plan.wheel_name}; see {log}")

    what = "core" + (" + train extra" if plan.extras else "")
    progress(f"[2/{steps}] downloading the runtime dependencies ({what}) for {plan.target.label}, Python {plan.target.python_version}")
    _run_pip(cmds["download"], log, "downloading the dependencies", plan.target, progress)

    progress(f"[3/{steps}] checking the wheels install offline for the target (pip --no-index --dry-run)")
    try:
        _run_pip(cmds["check"], log, "checking the bundle resolves offline", plan.target, progress, env=_pip_env())
        report = json.loads((out / ".check-report.json").read_text())
    finally:
        (out / ".check-report.json").unlink(missing_ok=True)
        shutil.rmtree(out / ".check", ignore_errors=True)
    packages = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    foreign = [w for w in wheels if not wheel_fits(w, plan.target.arch)]
    if foreign:
        raise FlashError(f"the bundle holds wheels that are not for {plan.target.arch}: {', '.join(foreign)}")
    unused = [w for w in wheels if canonical(wheel_tags(w)[0]) not in packages]
    for w in unused:  # e.g. an extra pip picked up along the way: not installed, not shipped
        (out / "wheels" / w).unlink()
    wheels = [w for w in wheels if w not in unused]

    progress(f"[4/{steps}] writing config/edge.toml (broker {plan.broker.host}:{plan.broker.port}, engines {'all' if plan.engines is None else ','.join(plan.engines)})")
    (out / "config").mkdir()
    (out / "config" / "edge.toml").write_text(site_config_toml(plan.site, plan.broker, plan.engines, plan.fleet, plan.fleet_id))
    write_identity(plan, out / "config" / IDENTITY_DIR)

    progress(f"[5/{steps}] writing systemd/{UNIT} and install.sh")
    values = {
        "SITE": plan.site, "PROFILE": plan.profile, "EXTRAS": plan.extras, "WHEEL": plan.wheel_name,
        "PY_VERSION": plan.target.python_version, "ARCH": plan.target.arch, "UNIT": UNIT, "USER": SERVICE_USER,
        "VENV": VENV, "CONFIG": CONFIG, "STATE_DIR": f"{STATE_ROOT}/{plan.site}", "VERSION": plan.version,
        "PLATFORM": plan.target.label,
    }
    (out / "systemd").mkdir()
    (out / "systemd" / UNIT).write_text(edge_unit(plan.site, plan.profile, CONFIG, SERVICE_USER, VENV))
    (out / "install.sh").write_text(render("install.sh", values))
    (out / "install.sh").chmod(0o755)

    progress(f"[6/{steps}] writing bundle.json and SHA256SUMS")
    size = sum(p.stat().st_size for p in (out / "wheels").glob("*.whl"))
    manifest = {
        "turbofed": plan.version,
        "site": plan.site,
        "profile": plan.profile,
        "requirement": f"turbofed{plan.extras}",
        "platform": plan.target.label,
        "pip_platforms": list(plan.target.platforms),
        "arch": plan.target.arch,
        "python": plan.target.python_version,
        "broker": {"host": plan.broker.host, "port": plan.broker.port, "topic_root": plan.broker.topic_root, "tls": True},
        "identity": sorted(f"config/{IDENTITY_DIR}/{name}" for name in plan.identity),
        "engines": "*" if plan.engines is None else list(plan.engines),
        "packages": dict(sorted(packages.items())),
        "wheels": wheels,
        "wheels_mb": round(size / 1e6, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "built_on": {"platform": sysconfig.get_platform(), "python": sys.version.split()[0]},
        "pip": {step: shlex.join(["python", "-m", "pip", *c]) for step, c in cmds.items()},
        "install": {"venv": VENV, "config": CONFIG, "unit": f"/etc/systemd/system/{UNIT}", "state_dir": f"{STATE_ROOT}/{plan.site}", "user": SERVICE_USER},
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "build.log"))
    (out / "SHA256SUMS").write_text("".join(f"{_sha256(p)}  {p.relative_to(out).as_posix()}\n" for p in files))
    progress(f"bundle ready: {out} ({len(wheels)} wheels, {manifest['wheels_mb']} MB) in {time.perf_counter() - started:.0f} s")
    return manifest


# --------------------------------------------------------------------------- delivery


def remote_dir(site: str) -> str:
    return f"turbofed-bundle-{site}"  # in the remote user's home


def deploy_commands(bundle: Path, host: str, site: str) -> list[list[str]]:
    """Copy the bundle to `host` over ssh and run its installer there (with sudo unless root)."""
    if not re.fullmatch(r"(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._:\-\[\]]+", host):
        raise FlashError(f"--host must be user@address (or an address), got {host!r}")
    remote = remote_dir(site)
    sudo = "" if host.startswith("root@") else "sudo "
    return [
        ["ssh", host, f"rm -rf {shlex.quote(remote)}"],
        ["scp", "-r", "-q", str(bundle), f"{host}:{remote}"],
        ["ssh", "-t", host, f"{sudo}bash {shlex.quote(remote)}/install.sh"],
    ]


def deploy(bundle: Path, host: str, site: str, progress: Progress = _stderr) -> None:
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise FlashError(f"--host needs {tool}, which is not installed here (apt install openssh-client)")
    steps = deploy_commands(bundle, host, site)
    labels = ("clearing an older copy on", "copying the bundle to", "running install.sh on")
    for i, (cmd, label) in enumerate(zip(steps, labels), 1):
        progress(f"[deploy {i}/{len(steps)}] {label} {host}: {shlex.join(cmd)}")
        code = subprocess.call(cmd)
        if code != 0:
            raise FlashError(f"{label} {host} failed (exit {code}): {shlex.join(cmd)}")


# The broker login install.sh takes (or asks for on a terminal); templates/install.sh --help.
CREDENTIALS_HINT = "--credentials FILE (lines username=... and password=...) or --no-credentials"


def dry_run_lines(plan: Plan, host: str | None) -> list[str]:
    """The commands (and files) a real run would run (and write), as shell lines."""
    cmds = pip_commands(plan, str(find_source_tree()))
    py = [sys.executable, "-m", "pip"]
    out = plan.out
    lines = [
        f"# turbofed flash --dry-run: site {plan.site}, {plan.profile} profile, {plan.target.label}, Python {plan.target.python_version}",
        shlex.join([*py, *cmds["wheel"]]) + "   # from a copy of the checkout",
        shlex.join([*py, *cmds["download"]]),
        "PIP_CONFIG_FILE=/dev/null " + shlex.join([*py, *cmds["check"]]),
        f"# write {out / 'config' / 'edge.toml'}  (broker {plan.broker.host}:{plan.broker.port}, TLS, state {STATE_ROOT}/{plan.site})",
        f"# copy the site's identity into {out / 'config' / IDENTITY_DIR} (keys 0600): "
        + ", ".join(f"{name} <- {source}" for name, source in plan.identity.items()),
        f"# write {out / 'systemd' / UNIT}, {out / 'install.sh'}, {out / 'bundle.json'}, {out / 'SHA256SUMS'}",
    ]
    if host:
        lines += [shlex.join(c) for c in deploy_commands(out, host, plan.site)]
        lines.append(f"# install.sh asks for the broker login on {host}'s terminal; to install unattended, run it there with {CREDENTIALS_HINT}")
    else:
        lines.append(f"# then on the device: sudo bash {remote_dir(plan.site)}/install.sh {CREDENTIALS_HINT}  (or use --host user@address)")
    return lines


def run_cli(args: argparse.Namespace) -> int:
    plan = plan_bundle(args.site, args.fleet, args.out, getattr(args, "platform", None), getattr(args, "python_version", None),
                       getattr(args, "profile", "training"), getattr(args, "engines", "*"), getattr(args, "pki", None))
    for warning in plan.warnings:
        _stderr(f"turbofed flash: warning: {warning}")
    host = getattr(args, "host", None)
    if getattr(args, "dry_run", False):
        print("\n".join(dry_run_lines(plan, host)))
        return 0
    build_bundle(plan)
    if host:
        deploy(plan.out, host, plan.site)
        _stderr(f"installed on {host}: ssh {host} systemctl status {UNIT}")
    else:
        _stderr(
            "next: copy the folder to the device and run its installer, e.g.\n"
            f"  scp -r {shlex.quote(str(plan.out))} pi@raspberrypi.local:{remote_dir(plan.site)}\n"
            f"  ssh -t pi@raspberrypi.local sudo bash {remote_dir(plan.site)}/install.sh {CREDENTIALS_HINT}\n"
            f"(or run flash again with --host pi@raspberrypi.local)"
        )
    print(json.dumps({"bundle": str(plan.out), "site": plan.site, "profile": plan.profile, "platform": plan.target.label,
                      "python": plan.target.python_version}))
    return 0
