#!/usr/bin/env bash
# The project's test command: installs what is missing, starts the private MariaDB,
# runs ruff (lint and format), mypy and pytest against it, stops MariaDB again.
#
#   scripts/test.sh                         the whole suite
#   scripts/test.sh tests/serving -k foo    any pytest arguments
#
# Exits non-zero when ruff, mypy or pytest fails, and when pytest collected no test (its exit 5).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh --test

# Several test runs may share one server (same state dir). Each run holds a lease while it
# runs; the last run to finish stops the server if a test run started it (a server that was
# already running for other reasons is left alone), so one run's end never pulls the server
# from under another.
STATE_DIR="${CARDPIPE_MARIADB_DIR:-/tmp/cardpipe-mariadb}"
LEASE_DIR="$STATE_DIR/leases"
STARTED_MARK="$STATE_DIR/.started-by-test-sh"
mkdir -p "$LEASE_DIR"
exec 8>"$STATE_DIR/.lease-lock"
flock -w 60 8
touch "$LEASE_DIR/$$"
if ! bash scripts/mariadb.sh status >/dev/null 2>&1; then
    touch "$STARTED_MARK"
fi
flock -u 8

cleanup() {
    local rc=$? lease others=0 pid
    flock -w 60 8 || true
    rm -f "$LEASE_DIR/$$"
    for lease in "$LEASE_DIR"/*; do
        [ -e "$lease" ] || continue
        pid="${lease##*/}"
        if kill -0 "$pid" 2>/dev/null; then
            others=1
        else
            rm -f "$lease" # a run that died without cleaning up
        fi
    done
    if [ "$others" = 0 ] && [ -e "$STARTED_MARK" ]; then
        bash scripts/mariadb.sh stop 8>&- || true
        rm -f "$STARTED_MARK"
    fi
    flock -u 8 || true
    exit "$rc"
}
trap cleanup EXIT

bash scripts/mariadb.sh start 8>&-
eval "$(bash scripts/mariadb.sh env)"
export DB_HOST DB_PORT DB_USER DB_PASSWORD DB_NAME
export CARDPIPE_TEST_MYSQL=1

lint_rc=0
echo "== ruff check ."
.venv/bin/ruff check . || lint_rc=$?
echo "== ruff format --check ."
.venv/bin/ruff format --check . || lint_rc=$?
echo "== mypy (pyproject.toml: the domain core and the stream layer strict)"
.venv/bin/mypy || lint_rc=$?

echo "== pytest"
pytest_rc=0
.venv/bin/python -m pytest -q "$@" || pytest_rc=$?
if [ "$pytest_rc" = 5 ]; then
    echo "test.sh: pytest collected no tests: counting that as a failure" >&2
    pytest_rc=1
fi

if [ "$lint_rc" != 0 ]; then
    echo "test.sh: ruff check, ruff format --check or mypy failed (see above)" >&2
fi
if [ "$pytest_rc" != 0 ]; then
    exit "$pytest_rc"
fi
exit "$lint_rc"
