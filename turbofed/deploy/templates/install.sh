#!/usr/bin/env bash
# Install the turbofed edge agent for site @@SITE@@ (@@PROFILE@@ profile) from this bundle.
#
# Written by `turbofed flash` (turbofed @@VERSION@@, for @@PLATFORM@@, Python @@PY_VERSION@@).
# Needs no network: every package comes from wheels/ (pip --no-index).
#
#   sudo bash install.sh                          asks for the broker login, installs, starts
#   sudo bash install.sh --credentials FILE       login from FILE (lines username=... password=...)
#   bash install.sh --no-systemd --prefix DIR --etc DIR --no-credentials
#                                                 venv + config only (containers, tests)
set -euo pipefail

SITE="@@SITE@@"
PROFILE="@@PROFILE@@"
EXTRAS="@@EXTRAS@@"
TURBOFED_WHEEL="@@WHEEL@@"
TARGET_PYTHON="@@PY_VERSION@@"
TARGET_ARCH="@@ARCH@@"
UNIT="@@UNIT@@"
SERVICE_USER="@@USER@@"
DEFAULT_VENV="@@VENV@@"
DEFAULT_CONFIG="@@CONFIG@@"

BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX="$(dirname "$DEFAULT_VENV")"
ETC="$(dirname "$DEFAULT_CONFIG")"
PYTHON="python3"
CREDENTIALS=""
NO_CREDENTIALS=0
STATE_DIR=""
SYSTEMD=1
START=1

usage() {
    cat <<EOF
Usage: install.sh [options]

Installs the turbofed edge agent for site $SITE ($PROFILE profile): a virtual
environment under PREFIX/venv from the bundled wheels (no network), the site config
under ETC, and the systemd service $UNIT running as user $SERVICE_USER.

Options:
  --credentials FILE  broker login from FILE: lines 'username=...' and 'password=...'
                      (default: ask on the terminal; an empty username means no login)
  --no-credentials    the broker takes connections without a login
  --prefix DIR        where the virtual environment goes (default: $PREFIX)
  --etc DIR           where the site config goes (default: $ETC)
  --state-dir DIR     override the agent's state folder written in the config
  --python PYTHON     interpreter for the venv (default: python3; must be $TARGET_PYTHON)
  --no-systemd        no service user, no unit, no service: venv and config only
                      (containers, tests); prints how to start the agent by hand
  --no-start          install and enable the service, but do not start it now
  -h, --help          this text
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --credentials) [ $# -ge 2 ] || die "--credentials needs a file"; CREDENTIALS="$2"; shift 2 ;;
        --credentials=*) CREDENTIALS="${1#*=}"; shift ;;
        --no-credentials) NO_CREDENTIALS=1; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --etc) [ $# -ge 2 ] || die "--etc needs a folder"; ETC="$2"; shift 2 ;;
        --etc=*) ETC="${1#*=}"; shift ;;
        --state-dir) [ $# -ge 2 ] || die "--state-dir needs a folder"; STATE_DIR="$2"; shift 2 ;;
        --state-dir=*) STATE_DIR="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON="$2"; shift 2 ;;
        --python=*) PYTHON="${1#*=}"; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

VENV="$PREFIX/venv"
CONFIG="$ETC/edge.toml"

# --- checks before changing anything ---------------------------------------------------

if command -v sha256sum >/dev/null 2>&1 && [ -f "$BUNDLE/SHA256SUMS" ]; then
    (cd "$BUNDLE" && sha256sum --quiet --strict -c SHA256SUMS) \
        || die "the bundle is damaged or incomplete (SHA256SUMS does not match); copy it again"
fi

if [ "$SYSTEMD" = 1 ]; then
    [ "$(id -u)" -eq 0 ] || die "installing the service needs root: sudo bash $0 (or --no-systemd for a venv + config only)"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this machine does not run systemd (use --no-systemd)"
fi

if [ "$TARGET_ARCH" != "any" ]; then
    machine="$(uname -m)"
    case "$machine" in arm64) machine=aarch64 ;; amd64) machine=x86_64 ;; esac
    [ "$machine" = "$TARGET_ARCH" ] \
        || die "this bundle holds $TARGET_ARCH wheels but this machine is $machine; build one with: turbofed flash --platform linux_$machine ..."
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (install Python $TARGET_PYTHON, or pass --python)"
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$pyver" = "$TARGET_PYTHON" ] \
    || die "the bundle was built for Python $TARGET_PYTHON but $PYTHON is $pyver; rebuild with: turbofed flash --python-version $pyver ... (or pass --python python$TARGET_PYTHON)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON cannot create virtual environments; install them first: sudo apt install python3-venv"

# --- the broker login (asked first, so the rest runs unattended) -----------------------

BROKER_USER=""
BROKER_PASS=""
if [ -n "$CREDENTIALS" ]; then
    [ -r "$CREDENTIALS" ] || die "credentials file $CREDENTIALS not found or not readable"
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%$'\r'}"
        case "$line" in
            ''|'#'*) ;;
            username=*) BROKER_USER="${line#username=}" ;;
            password=*) BROKER_PASS="${line#password=}" ;;
            *) die "$CREDENTIALS: expected lines 'username=...' and 'password=...', got: ${line%%=*}=..." ;;
        esac
    done < "$CREDENTIALS"
    [ -n "$BROKER_USER" ] || die "$CREDENTIALS has no 'username=' line"
elif [ "$NO_CREDENTIALS" = 1 ]; then
    :
elif [ -t 0 ]; then
    read -r -p "MQTT username for site $SITE (empty: the broker needs no login): " BROKER_USER
    if [ -n "$BROKER_USER" ]; then
        read -r -s -p "MQTT password for $BROKER_USER: " BROKER_PASS
        echo >&2
    fi
else
    die "no broker login given and no terminal to ask on: pass --credentials FILE (lines username=... and password=...) or --no-credentials"
fi

# --- service user ----------------------------------------------------------------------

if [ "$SYSTEMD" = 1 ] && ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    say "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir /var/lib/turbofed --no-create-home \
        --shell /usr/sbin/nologin --comment "turbofed edge agent" "$SERVICE_USER"
fi

# --- virtual environment from the bundled wheels ---------------------------------------

mkdir -p "$PREFIX" || die "cannot create $PREFIX (run as root, or pass --prefix)"
fresh=1
if [ -x "$VENV/bin/python" ]; then
    fresh=0
    venv_py="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)"
    venv_profile="$(cat "$PREFIX/profile" 2>/dev/null || echo unknown)"
    if [ "$venv_py" != "$TARGET_PYTHON" ] || [ "$venv_profile" != "$PROFILE" ]; then
        say "replacing $VENV (Python $venv_py, $venv_profile profile -> Python $TARGET_PYTHON, $PROFILE profile)"
        rm -rf "$VENV"
        fresh=1
    fi
fi
if [ "$fresh" = 1 ]; then
    say "creating the virtual environment $VENV (Python $pyver)"
    "$PYTHON" -m venv "$VENV"
fi

# Only the bundle's wheels: no index, and no pip settings from this machine (a find-links
# or constraint in pip.conf must not change what gets installed).
for var in $(compgen -e); do
    case "$var" in PIP_*) unset "$var" ;; esac
done
export PIP_CONFIG_FILE=/dev/null
pip_install() {
    "$VENV/bin/python" -m pip install --no-index --find-links "$BUNDLE/wheels" \
        --disable-pip-version-check --no-cache-dir --progress-bar off "$@"
}

say "installing turbofed ($PROFILE profile) from $BUNDLE/wheels, offline"
pip_install --upgrade "$BUNDLE/wheels/$TURBOFED_WHEEL$EXTRAS" \
    || die "pip could not install the bundled wheels (see the pip error above); the bundle may be for another device"
if [ "$fresh" = 0 ]; then
    # A rebuilt bundle may carry new code under the same version number.
    pip_install --no-deps --force-reinstall "$BUNDLE/wheels/$TURBOFED_WHEEL" >/dev/null
fi
printf '%s\n' "$PROFILE" > "$PREFIX/profile"
"$VENV/bin/turbofed" --help >/dev/null || die "the installed turbofed command does not start"

# --- site config -----------------------------------------------------------------------

mkdir -p "$ETC"
if [ -f "$CONFIG" ]; then
    backup="$CONFIG.$(date +%Y%m%d-%H%M%S).bak"
    cp -p "$CONFIG" "$backup"
    say "kept the previous config as $backup"
fi
say "writing $CONFIG"
umask 077
TF_USER="$BROKER_USER" TF_PASS="$BROKER_PASS" TF_STATE_DIR="$STATE_DIR" \
    "$VENV/bin/python" - "$BUNDLE/config/edge.toml" "$CONFIG.new" <<'PY'
import json, os, sys

source, target = sys.argv[1], sys.argv[2]
user, password, state_dir = os.environ["TF_USER"], os.environ["TF_PASS"], os.environ["TF_STATE_DIR"]
out = []
for line in open(source, encoding="utf-8").read().splitlines():
    if line.strip() == "#@credentials@":
        if user:  # a JSON string is a valid TOML basic string
            out += [f"username = {json.dumps(user)}", f"password = {json.dumps(password)}"]
        else:
            out.append("# no broker login (install.sh was given none)")
    elif state_dir and line.startswith("state_dir = "):
        out.append(f"state_dir = {json.dumps(os.path.abspath(state_dir))}")
    else:
        out.append(line)
with open(target, "w", encoding="utf-8") as handle:
    handle.write("\n".join(out) + "\n")
PY
for key in signing.key aggregator.pub; do  # the site's identity, named by the config's [identity]
    if [ -f "$BUNDLE/config/$key" ]; then
        cp "$BUNDLE/config/$key" "$ETC/$key"
        chmod 0600 "$ETC/$key"
        if [ "$SYSTEMD" = 1 ]; then chown "$SERVICE_USER:$SERVICE_USER" "$ETC/$key"; fi
    fi
done
"$VENV/bin/python" -c 'import sys; from turbofed.config import load_site_config; load_site_config(sys.argv[1])' "$CONFIG.new" \
    || die "the written config $CONFIG.new does not load (see above)"
if [ "$SYSTEMD" = 1 ]; then
    chown "root:$SERVICE_USER" "$CONFIG.new"
    chmod 0640 "$CONFIG.new"
fi
mv -f "$CONFIG.new" "$CONFIG"
umask 022

# --- the service -----------------------------------------------------------------------

RUN="$VENV/bin/turbofed edge --config $CONFIG --profile $PROFILE"
if [ "$SYSTEMD" = 0 ]; then
    say "installed (no service). Start the agent with:"
    printf '    %s\n' "$RUN" >&2
    exit 0
fi

say "installing /etc/systemd/system/$UNIT"
sed -e "s|$DEFAULT_VENV/|$VENV/|g" -e "s|$DEFAULT_CONFIG|$CONFIG|g" "$BUNDLE/systemd/$UNIT" > "/etc/systemd/system/$UNIT.new"
chmod 0644 "/etc/systemd/system/$UNIT.new"
mv -f "/etc/systemd/system/$UNIT.new" "/etc/systemd/system/$UNIT"
systemctl daemon-reload || die "systemctl daemon-reload failed (is systemd running here? use --no-systemd in containers)"
systemctl enable "$UNIT" >/dev/null
if [ "$START" = 0 ]; then
    say "enabled $UNIT; it starts at the next boot (or: sudo systemctl start $UNIT)"
    exit 0
fi
systemctl restart "$UNIT"
sleep 3
if systemctl is-active --quiet "$UNIT"; then
    say "$UNIT is running. Logs: journalctl -u $UNIT -f"
else
    systemctl --no-pager --lines=20 status "$UNIT" >&2 || true
    die "$UNIT did not stay up; see: journalctl -u $UNIT"
fi
