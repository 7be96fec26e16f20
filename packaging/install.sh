#!/usr/bin/env bash
# Install nixd on Debian/Ubuntu or macOS: a virtualenv under /opt/nixd with the package
# and its dependencies from pip, the links /usr/local/bin/nixd and nixd-server, the
# service files (systemd units on Linux, the LaunchDaemon on macOS) and a commented
# default /etc/nixd/config.toml if there is none. Safe to run again: it upgrades in place,
# keeps the config and restarts the daemon (the socket units keep its ports open).
#
#   sudo packaging/install.sh                  # from this source tree
#   sudo packaging/install.sh --wheel nixd-0.1.0-py3-none-any.whl --extras aws
#   sudo packaging/install.sh --server --extras postgres,s3   # the cache server's units too
#   sudo packaging/install.sh --uninstall      # config and state stay
#
# Run with --help for every option.
set -euo pipefail

PROG="nixd-install"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TREE="$(dirname "$HERE")" # the source tree this script belongs to

PREFIX="/opt/nixd"
BINDIR="/usr/local/bin"
ROOT=""
SOURCE=""
WHEEL=""
EXTRAS=""
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
UNINSTALL=0
START=1
SERVER=0
PIP_ARGS=()

usage() {
    cat <<EOF
Usage: $0 [options]

Installs nixd into a virtualenv, links its commands, installs the service files and a
default config. Needs root, except with --root or --dry-run.

  --source DIR     build nixd from this source tree (default: $TREE)
  --wheel FILE     install this wheel instead of building one
  --extras LIST    optional dependency groups to install too, comma-separated: aws,
                   postgres (PostgreSQL metadata), s3 (S3 blobs)
  --server         also install the cache server's units (nixd-server.socket and
                   .service, Linux only), make its system user nixd-server and its
                   state directory /var/lib/nixd-server; it is started only once that
                   directory holds a server (nixd-server init), and restarted on upgrade
  --python PATH    the Python (3.11 or later) for the virtualenv (default: python3)
  --prefix DIR     the virtualenv (default: /opt/nixd)
  --bindir DIR     where the nixd and nixd-server links go (default: /usr/local/bin)
  --root DIR       install below DIR instead of /, for images and tests: nothing is
                   started, no systemctl or launchctl runs, and the links point into DIR
                   (the virtualenv works only where it was made); the service files name
                   the final paths (--bindir without DIR)
  --no-start       install, but enable and start nothing; print how to start
  --pip-arg ARG    pass ARG to pip, repeatable (e.g. --pip-arg=--index-url=URL)
  --dry-run        print what would be done and change nothing
  --uninstall      stop nixd, remove the virtualenv, the links and the service files;
                   /etc/nixd and the state in /var/lib/nixd, /var/cache/nixd stay
  -h, --help       this text
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
# what was done (in a dry run `run` has already said what would be)
did() { ((DRY_RUN)) || say "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
# Every change goes through `run`, so --dry-run shows them all and does none.
run() {
    if ((DRY_RUN)); then
        printf '%s: would run:' "$PROG"
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

while (($#)); do
    case "$1" in
    --source) SOURCE="${2:?--source needs a directory}" && shift ;;
    --source=*) SOURCE="${1#*=}" ;;
    --wheel) WHEEL="${2:?--wheel needs a file}" && shift ;;
    --wheel=*) WHEEL="${1#*=}" ;;
    --extras) EXTRAS="${2:?--extras needs a list}" && shift ;;
    --extras=*) EXTRAS="${1#*=}" ;;
    --python) PYTHON="${2:?--python needs a path}" && shift ;;
    --python=*) PYTHON="${1#*=}" ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}" && shift ;;
    --prefix=*) PREFIX="${1#*=}" ;;
    --bindir) BINDIR="${2:?--bindir needs a directory}" && shift ;;
    --bindir=*) BINDIR="${1#*=}" ;;
    --root) ROOT="${2:?--root needs a directory}" && shift ;;
    --root=*) ROOT="${1#*=}" ;;
    --pip-arg) PIP_ARGS+=("${2:?--pip-arg needs an argument}") && shift ;;
    --pip-arg=*) PIP_ARGS+=("${1#*=}") ;;
    --no-start) START=0 ;;
    --server) SERVER=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --uninstall) UNINSTALL=1 ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

case "$PREFIX$BINDIR" in *[[:space:]]*) die "--prefix and --bindir must not contain spaces" ;; esac
[[ "$PREFIX" == /* && "$BINDIR" == /* ]] || die "--prefix and --bindir must be absolute paths"
[[ "$PREFIX" != "/" ]] || die "--prefix / would put the virtualenv over the whole system"
if [ -n "$ROOT" ]; then
    [[ "$ROOT" == /* ]] || ROOT="$PWD/$ROOT"
    ROOT="${ROOT%/}"
    [ -n "$ROOT" ] || die "--root / is the default; leave it out"
    START=0
fi
if [ -n "$SOURCE" ] && [ -n "$WHEEL" ]; then die "give --source or --wheel, not both"; fi
if [ -n "$EXTRAS" ] && ! [[ "$EXTRAS" =~ ^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$ ]]; then
    die "--extras is a comma-separated list of names, e.g. aws"
fi

case "$(uname -s)" in
Linux) OS=linux ;;
Darwin) OS=macos ;;
*) die "$(uname -s) is not supported: this script knows Debian/Ubuntu and macOS" ;;
esac
if ((SERVER)) && [ "$OS" != linux ]; then
    die "--server installs systemd units: Linux only (on macOS run nixd-server serve yourself)"
fi
if [ "$OS" = linux ] && ((!UNINSTALL)); then
    if ! grep -qsE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; then
        warn "this is not Debian or Ubuntu; going on, but only those are tested"
    fi
fi

if [ -z "$ROOT" ] && ((!DRY_RUN)) && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0 ...), or use --root DIR or --dry-run"
fi

VENV="$ROOT$PREFIX"
LINKDIR="$ROOT$BINDIR"
CONF="$ROOT/etc/nixd/config.toml"
if [ "$OS" = linux ]; then
    UNITDIR="$ROOT/etc/systemd/system"
    UNITS=(nixd.socket nixd-proxy.socket nixd.service)
    SERVER_UNITS=(nixd-server.socket nixd-server.service)
    SERVER_STATE="$ROOT/var/lib/nixd-server"
else
    PLIST="$ROOT/Library/LaunchDaemons/org.nixd.daemon.plist"
fi
TMP="$(mktemp -d "${TMPDIR:-/tmp}/nixd-install.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# -- uninstall ---------------------------------------------------------------------------

uninstall() {
    local removed=0 b link
    if ((START)) && [ -x "$VENV/bin/nixd" ] && [ -S /run/nixd/nixd.sock ]; then
        say "logging out, so nixd's include leaves nix.conf"
        run "$VENV/bin/nixd" logout ||
            warn "nixd logout failed: remove nixd's !include line from /etc/nix/nix.conf by hand"
    fi
    if [ "$OS" = linux ]; then
        local present=()
        for u in "${UNITS[@]}" "${SERVER_UNITS[@]}"; do
            if [ -e "$UNITDIR/$u" ]; then present+=("$u"); fi
        done
        if ((START)) && systemd_running && ((${#present[@]})); then
            run systemctl disable --now "${present[@]}" || warn "systemctl disable failed (units not loaded?)"
        fi
        for u in "${UNITS[@]}" "${SERVER_UNITS[@]}"; do
            if [ -e "$UNITDIR/$u" ]; then
                run rm -f "$UNITDIR/$u" && removed=1 && did "removed $UNITDIR/$u"
            fi
        done
        if ((START && removed)) && systemd_running; then run systemctl daemon-reload; fi
    else
        if ((START)) && [ -e "$PLIST" ]; then
            run launchctl bootout system/org.nixd.daemon 2>/dev/null || true
        fi
        if [ -e "$PLIST" ]; then run rm -f "$PLIST" && removed=1 && did "removed $PLIST"; fi
    fi
    for b in nixd nixd-server; do
        link="$LINKDIR/$b"
        if [ -L "$link" ]; then
            if [ "$(readlink "$link")" = "$VENV/bin/$b" ]; then
                run rm -f "$link" && removed=1 && did "removed $link"
            else
                warn "$link points to $(readlink "$link"), not into $PREFIX: left alone"
            fi
        elif [ -e "$link" ]; then
            warn "$link is not a link made by this script: left alone"
        fi
    done
    if [ -e "$VENV" ]; then
        if [ -f "$VENV/pyvenv.cfg" ]; then
            run rm -rf "$VENV" && removed=1 && did "removed the virtualenv $VENV"
        else
            warn "$VENV is not a virtualenv: left alone"
        fi
    fi
    ((removed)) || say "nothing to remove: nixd is not installed here"
    say "kept $ROOT/etc/nixd (config) and the state in $ROOT/var/lib/nixd, $ROOT/var/cache/nixd (and a server's in $ROOT/var/lib/nixd-server, with its user nixd-server); remove them by hand if you want"
}

if ((UNINSTALL)); then
    uninstall
    exit 0
fi

# -- install -----------------------------------------------------------------------------

command -v "$PYTHON" >/dev/null || die "no $PYTHON: install Python 3.11 or later (or give --python)"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    die "$("$PYTHON" --version 2>&1) is too old: nixd needs Python 3.11 or later (give one with --python)"
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$OS" = linux ]; then
        die "$PYTHON cannot make virtualenvs: apt-get install python3-venv"
    fi
    die "$PYTHON cannot make virtualenvs (no venv/ensurepip module)"
fi

if [ -n "$WHEEL" ]; then
    [ -f "$WHEEL" ] || die "no wheel at $WHEEL"
    case "$WHEEL" in *.whl) ;; *) die "$WHEEL is not a wheel (.whl)" ;; esac
    WHEEL="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"
    FILES="$TREE"
else
    SOURCE="${SOURCE:-$TREE}"
    [ -f "$SOURCE/pyproject.toml" ] || die "$SOURCE has no pyproject.toml: give --source DIR or --wheel FILE"
    SOURCE="$(cd "$SOURCE" && pwd)"
    FILES="$SOURCE"
fi
[ -f "$FILES/packaging/config.toml" ] || die "$FILES/packaging/config.toml is missing"
if [ "$OS" = linux ]; then
    if ((SERVER)); then UNITS+=("${SERVER_UNITS[@]}"); fi
    for u in "${UNITS[@]}"; do
        [ -f "$FILES/systemd/$u" ] || die "$FILES/systemd/$u is missing"
    done
else
    [ -f "$FILES/launchd/org.nixd.daemon.plist" ] || die "$FILES/launchd/org.nixd.daemon.plist is missing"
fi

# Refuse before changing anything what this script would have to overwrite.
if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    die "$VENV exists and is not a virtualenv: move it away or choose another --prefix"
fi
for b in nixd nixd-server; do
    if [ -e "$LINKDIR/$b" ] && [ ! -L "$LINKDIR/$b" ]; then
        die "$LINKDIR/$b exists and is not a link: move it away or choose another --bindir"
    fi
done

# 1. the virtualenv (kept when it works; made again when its Python is gone)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "using the virtualenv $VENV"
elif [ -e "$VENV" ]; then
    say "the virtualenv $VENV no longer works: making it again"
    run "$PYTHON" -m venv --clear "$VENV"
else
    say "making the virtualenv $VENV ($("$PYTHON" --version 2>&1))"
    run mkdir -p "$(dirname "$VENV")"
    run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 2. the wheel: given, or built from a copy of the source (the tree is not written to)
if [ -z "$WHEEL" ]; then
    say "building nixd from $SOURCE"
    if ((DRY_RUN)); then
        WHEEL="$TMP/nixd-VERSION-py3-none-any.whl"
        run "${PIP[@]}" wheel --no-deps --wheel-dir "$TMP/dist" "$SOURCE"
    else
        mkdir -p "$TMP/src" "$TMP/dist"
        (cd "$SOURCE" && tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' .) |
            (cd "$TMP/src" && tar -xf -)
        "${PIP[@]}" wheel -q --no-deps --wheel-dir "$TMP/dist" ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$TMP/src" ||
            die "building the wheel failed (see pip's message above)"
        WHEEL="$(ls "$TMP"/dist/nixd-*.whl)"
    fi
fi

# 3. the package and its dependencies; then the package again, so the same version
#    number rebuilt from newer source still replaces the old files
SPEC="$WHEEL"
[ -z "$EXTRAS" ] || SPEC="${WHEEL}[${EXTRAS}]"
say "installing $(basename "$WHEEL")${EXTRAS:+ with [$EXTRAS]} and its dependencies"
HINT=""
if [ "$OS" = linux ]; then
    HINT="; a dependency built from source needs a compiler: apt-get install gcc pkg-config python3-dev libsystemd-dev"
fi
run "${PIP[@]}" install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$SPEC" ||
    die "pip could not install nixd (see its message above)$HINT"
run "${PIP[@]}" install -q --no-deps --force-reinstall ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$WHEEL" ||
    die "pip could not install nixd (see its message above)"
if ((!DRY_RUN)); then
    VERSION="$("$VENV/bin/nixd" --version)" || die "the installed $VENV/bin/nixd does not run"
    say "installed $VERSION in $VENV"
fi

# 4. the links
run mkdir -p "$LINKDIR"
for b in nixd nixd-server; do
    link="$LINKDIR/$b"
    target="$VENV/bin/$b"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
        continue
    fi
    run ln -sfn "$target" "$link"
    did "linked $link -> $target"
done

# 5. the service files, naming the linked binary
install_file() { # SOURCE-TEXT-FILE DEST MODE
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "$2 is up to date"
        return
    fi
    run mkdir -p "$(dirname "$2")"
    run install -m "$3" "$1" "$2"

    did "installed $2"
}
if [ "$OS" = linux ]; then
    for u in "${UNITS[@]}"; do
        sed -E -e "s#^ExecStart=[^ ]*/nixd #ExecStart=$BINDIR/nixd #" \
            -e "s#^ExecStart=[^ ]*/nixd-server #ExecStart=$BINDIR/nixd-server #" \
            "$FILES/systemd/$u" >"$TMP/$u"
        install_file "$TMP/$u" "$UNITDIR/$u" 0644
    done
    # the server's static user (see systemd/nixd-server.service for why not DynamicUser)
    if ((SERVER)); then
        if [ -n "$ROOT" ]; then
            say "--root: the user nixd-server is not made; on the machine: useradd --system --home-dir /var/lib/nixd-server --shell /usr/sbin/nologin nixd-server"
        elif getent passwd nixd-server >/dev/null; then
            say "the user nixd-server exists"
        else
            run useradd --system --home-dir /var/lib/nixd-server --shell /usr/sbin/nologin nixd-server
            did "made the system user nixd-server"
        fi
        if [ -z "$ROOT" ] && [ ! -d "$SERVER_STATE" ]; then
            run install -d -o nixd-server -g nixd-server -m 0700 "$SERVER_STATE"
            did "made $SERVER_STATE (owner nixd-server, 0700)"
        fi
    fi
else
    sed -E "s#<string>[^<]*/nixd</string>#<string>$BINDIR/nixd</string>#" \
        "$FILES/launchd/org.nixd.daemon.plist" >"$TMP/org.nixd.daemon.plist"
    install_file "$TMP/org.nixd.daemon.plist" "$PLIST" 0644
    if [ -z "$ROOT" ]; then run chown root:wheel "$PLIST"; fi
fi

# 6. a default config, only if there is none
if [ -e "$CONF" ]; then
    say "kept the existing $CONF"
else
    run mkdir -p "$(dirname "$CONF")"
    run install -m 0644 "$FILES/packaging/config.toml" "$CONF"
    did "wrote a default $CONF (every key commented out: nixd runs on its defaults)"
fi

# 7. start (or restart: the sockets stay open, Nix's requests wait)
if ((START)); then
    if [ "$OS" = linux ]; then
        if systemd_running; then
            run systemctl daemon-reload
            run systemctl enable --now nixd.socket nixd-proxy.socket
            run systemctl enable nixd.service
            run systemctl restart nixd.service
            say "nixd is running: systemctl status nixd"
            if ((SERVER)) && [ -f "$SERVER_STATE/config.toml" ]; then
                run systemctl enable --now nixd-server.socket
                run systemctl enable nixd-server.service
                run systemctl restart nixd-server.service
                say "nixd-server is running: systemctl status nixd-server"
            elif ((SERVER)); then
                say "the server is installed, not started: $SERVER_STATE holds no server yet"
            fi
        else
            warn "systemd is not running here: the units are installed but nothing was started"
        fi
    else
        run launchctl bootout system/org.nixd.daemon 2>/dev/null || true
        run launchctl bootstrap system "$PLIST"
        say "nixd is running: sudo launchctl print system/org.nixd.daemon"
    fi
else
    if [ "$OS" = linux ]; then
        say "not started; to start: systemctl daemon-reload && systemctl enable --now nixd.socket nixd-proxy.socket nixd.service"
    else
        say "not started; to start: launchctl bootstrap system /Library/LaunchDaemons/org.nixd.daemon.plist"
    fi
fi
if ((SERVER)) && [ ! -f "$SERVER_STATE/config.toml" ]; then
    say "server next: runuser -u nixd-server -- $BINDIR/nixd-server init /var/lib/nixd-server --org ORG, then systemctl enable --now nixd-server.socket nixd-server.service"
fi
say "next: sudo nixd login --server https://YOUR-CACHE (or edit $CONF first), then nixd status"
