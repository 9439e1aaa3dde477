#!/usr/bin/env bash
# Installs what cardpipe needs; idempotent and quick when everything is already there.
#
#   scripts/install.sh          Java (for Spark) and .venv with `pip install -e .`
#   scripts/install.sh --test   also Debian's mariadb-server and libmariadb-java (JDBC driver),
#                               chromium and chromium-driver (report tests), and `pip install -e '.[test,spark,mysql,fast]'`
#
# Runs from any working directory. Debian packages are installed with apt-get (run it as
# root); `apt-get update` runs only when something has to be installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

WITH_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1 ;;
        -h | --help)
            sed -n '2,9p' "$0"
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument '$arg' (usage: scripts/install.sh [--test])" >&2
            exit 2
            ;;
    esac
done

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "install.sh: $*" >&2; }

have_deb() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# --- Debian packages --------------------------------------------------------------------
missing=()
if ! java -version >/dev/null 2>&1; then
    missing+=(default-jre-headless)
fi
if [ "$WITH_TEST" = 1 ]; then
    if ! have_deb mariadb-server || ! command -v mariadbd >/dev/null 2>&1 \
        || ! command -v mariadb-install-db >/dev/null 2>&1; then
        missing+=(mariadb-server)
    fi
    if ! have_deb libmariadb-java || [ ! -f /usr/share/java/mariadb-java-client.jar ]; then
        missing+=(libmariadb-java)
    fi
    # The report's browser tests: headless chromium driven by selenium.
    if ! have_deb chromium || ! command -v chromium >/dev/null 2>&1; then
        missing+=(chromium)
    fi
    if ! have_deb chromium-driver || ! command -v chromedriver >/dev/null 2>&1; then
        missing+=(chromium-driver)
    fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        SUDO=(sudo -n)
    fi
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    # The package's own service is not needed: scripts/mariadb.sh runs a private server.
fi

if ! java -version >/dev/null 2>&1; then
    log "java still not available after installing default-jre-headless"
    exit 1
fi

# --- Python virtualenv ------------------------------------------------------------------
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ]; then
    # Also when an interrupted earlier run left a venv without pip.
    log "creating .venv"
    rm -rf .venv
    python3 -m venv .venv
fi

if [ "$WITH_TEST" = 1 ]; then
    target='.[test,spark,mysql,fast]'
else
    target='.'
fi

# Skip pip when the same pyproject.toml was already installed with these extras
# (a --test install also covers a plain one).
stamp=.venv/.cardpipe-install
pyproject_hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
want_stamps=("$pyproject_hash test")
if [ "$WITH_TEST" = 0 ]; then
    want_stamps+=("$pyproject_hash plain")
fi
up_to_date=0
if [ -f "$stamp" ] && .venv/bin/python -c 'import cardpipe' >/dev/null 2>&1; then
    for want in "${want_stamps[@]}"; do
        if [ "$(cat "$stamp")" = "$want" ]; then
            up_to_date=1
        fi
    done
fi

if [ "$up_to_date" = 0 ]; then
    log "pip install -e '$target' into .venv"
    rm -f "$stamp"
    .venv/bin/pip install -q -e "$target"
    if [ "$WITH_TEST" = 1 ]; then
        echo "$pyproject_hash test" >"$stamp"
    else
        echo "$pyproject_hash plain" >"$stamp"
    fi
fi
log "ok"
