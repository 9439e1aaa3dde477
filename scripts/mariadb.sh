#!/usr/bin/env bash
# A private MariaDB server on loopback for tests and local development.
#
#   scripts/mariadb.sh start    start it (idempotent), print the connection env (password masked)
#   scripts/mariadb.sh stop     shut it down (exit 0 when nothing runs)
#   scripts/mariadb.sh status   exit 0 when it runs and answers, 1 otherwise
#   scripts/mariadb.sh env      print `export DB_HOST=... DB_PASSWORD=...` lines (eval them)
#
# Installs nothing: scripts/install.sh --test installs Debian's mariadb-server.
# Settings (environment):
#   CARDPIPE_MARIADB_DIR       state dir: datadir, socket, pid file, log (default /tmp/cardpipe-mariadb)
#   CARDPIPE_MARIADB_PORT      TCP port on 127.0.0.1 (default 3307)
#   CARDPIPE_MARIADB_PASSWORD  password of the `cardpipe` user (default cardpipe-test-pw)
set -euo pipefail

STATE_DIR="${CARDPIPE_MARIADB_DIR:-/tmp/cardpipe-mariadb}"
PORT="${CARDPIPE_MARIADB_PORT:-3307}"
PASSWORD="${CARDPIPE_MARIADB_PASSWORD:-cardpipe-test-pw}"
DB_USER=cardpipe
DB_NAME=cardpipe
HOST=127.0.0.1

DATADIR="$STATE_DIR/data"
SOCKET="$STATE_DIR/mariadb.sock"
PIDFILE="$STATE_DIR/mariadb.pid"
LOGFILE="$STATE_DIR/mariadb.log"
INSTALLED_MARK="$STATE_DIR/.installed"
LOCKFILE="$STATE_DIR/.lock"
START_TIMEOUT=30
STOP_TIMEOUT=30

# Debian puts the server in /usr/sbin, which is not on every PATH.
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "mariadb.sh: $*" >&2; }

need() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            log "'$tool' not found: run 'bash scripts/install.sh --test' (installs mariadb-server)"
            exit 1
        fi
    done
}

server_pid() {
    # Prints the pid of the running server of this state dir, if any.
    local pid
    [ -s "$PIDFILE" ] || return 1
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A zombie (dead, not yet reaped) is not a server.
    case "$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/$pid/stat" 2>/dev/null)" in
        Z | X | "") return 1 ;;
    esac
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
        mariadbd | mysqld) echo "$pid" ;;
        *) return 1 ;;
    esac
}

ping_server() {
    mariadb-admin --no-defaults --socket="$SOCKET" --user=root --connect-timeout=2 ping \
        >/dev/null 2>&1
}

is_running() { server_pid >/dev/null && ping_server; }

print_env() {
    # $1 = "full" prints the password, anything else masks it.
    local pw='***'
    if [ "${1:-}" = full ]; then
        pw="$(printf '%q' "$PASSWORD")"
    fi
    echo "export DB_HOST=$HOST DB_PORT=$PORT DB_USER=$DB_USER DB_PASSWORD=$pw DB_NAME=$DB_NAME"
}

sql_quote() {
    # SQL single-quoted string literal.
    local s="${1//\\/\\\\}"
    s="${s//\'/\\\'}"
    printf "'%s'" "$s"
}

lock() {
    mkdir -p "$STATE_DIR"
    exec 9>"$LOCKFILE"
    if ! flock -w 120 9; then
        log "could not lock $LOCKFILE (another start/stop hangs?)"
        exit 1
    fi
}

show_log_tail() {
    if [ -f "$LOGFILE" ]; then
        log "last lines of $LOGFILE:"
        tail -n 30 "$LOGFILE" >&2
    fi
}

cmd_start() {
    need mariadbd mariadb-install-db mariadb-admin mariadb flock setsid
    lock
    if is_running; then
        log "already running (pid $(server_pid)) on $HOST:$PORT, state in $STATE_DIR"
        print_env masked
        return 0
    fi
    # A pid file of a dead (or hung, unanswering) server: clear it away.
    local oldpid
    if oldpid="$(server_pid)"; then
        log "server pid $oldpid does not answer; stopping it first"
        stop_pid "$oldpid"
    fi
    rm -f "$PIDFILE" "$SOCKET"

    local t0=$SECONDS
    if [ ! -f "$INSTALLED_MARK" ]; then
        log "initialising datadir $DATADIR"
        rm -rf "$DATADIR"
        mkdir -p "$DATADIR"
        if ! mariadb-install-db --no-defaults --datadir="$DATADIR" \
            --auth-root-authentication-method=normal >"$STATE_DIR/install-db.log" 2>&1; then
            log "mariadb-install-db failed:"
            tail -n 30 "$STATE_DIR/install-db.log" >&2
            exit 1
        fi
        touch "$INSTALLED_MARK"
    fi

    # setsid + nohup: the server outlives this script and its terminal/session.
    setsid nohup mariadbd --no-defaults \
        --datadir="$DATADIR" \
        --socket="$SOCKET" \
        --port="$PORT" \
        --bind-address="$HOST" \
        --user=root \
        --pid-file="$PIDFILE" \
        --log-error="$LOGFILE" \
        --character-set-server=utf8mb4 \
        --collation-server=utf8mb4_general_ci \
        </dev/null >>"$LOGFILE" 2>&1 9>&- &
    local launcher=$!

    local deadline=$((SECONDS + START_TIMEOUT)) gone=0
    until ping_server; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "server did not answer within ${START_TIMEOUT}s"
            show_log_tail
            exit 1
        fi
        # The launcher exec()s mariadbd; when it is gone (and no pid file names a live
        # server) for 2 s before answering, the server died.
        if ! kill -0 "$launcher" 2>/dev/null && ! server_pid >/dev/null; then
            gone=$((gone + 1))
            if [ "$gone" -ge 20 ]; then
                log "server exited during start-up (port $PORT in use?)"
                show_log_tail
                exit 1
            fi
        fi
        sleep 0.1
    done

    # The password goes through stdin, never on a command line or in the output.
    local pw_sql
    pw_sql="$(sql_quote "$PASSWORD")"
    if ! mariadb --no-defaults --socket="$SOCKET" --user=root --batch >>"$LOGFILE" 2>&1 <<SQL; then
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY $pw_sql;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY $pw_sql;
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY $pw_sql;
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY $pw_sql;
GRANT ALL PRIVILEGES ON *.* TO '$DB_USER'@'127.0.0.1' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO '$DB_USER'@'localhost' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS \`$DB_NAME\` CHARACTER SET utf8mb4;
FLUSH PRIVILEGES;
SQL
        log "creating user/database failed"
        show_log_tail
        exit 1
    fi
    log "started (pid $(server_pid)) on $HOST:$PORT in $((SECONDS - t0))s, state in $STATE_DIR"
    print_env masked
}

stop_pid() {
    local pid="$1" deadline
    mariadb-admin --no-defaults --socket="$SOCKET" --user=root --connect-timeout=5 shutdown \
        >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ! grep -qE '^[0-9]+ \(.*\) [ZX]' "/proc/$pid/stat" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "pid $pid still alive after ${STOP_TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
}

cmd_stop() {
    if [ ! -d "$STATE_DIR" ]; then
        log "not running"
        return 0
    fi
    lock
    local pid
    if pid="$(server_pid)"; then
        stop_pid "$pid"
        log "stopped (pid $pid)"
    else
        log "not running"
    fi
    rm -f "$PIDFILE" "$SOCKET"
}

cmd_status() {
    local pid
    if pid="$(server_pid)" && ping_server; then
        echo "running (pid $pid) on $HOST:$PORT, socket $SOCKET, state in $STATE_DIR"
        return 0
    fi
    echo "not running (state dir $STATE_DIR)"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) print_env full ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
