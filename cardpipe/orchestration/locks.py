"""Who may use a results folder and its database at the same time, and whether they are ready for a command.

``cardpipe run``, ``setup`` and ``load`` wipe or rewrite tables: each holds its results folder and its database
**exclusively**; every other command (``consume``, ``produce``, ``batch``, ``persist``, ``serve``) holds them
**shared**. A command that cannot have its lock refuses at once, naming the holder.

- The folder: ``flock`` on ``<results>/.cardpipe.lock`` (released by the kernel when the holder dies, so a killed
  run's lock is taken over by the next command), and one small file per holder in ``<results>/.cardpipe.lock.d``
  saying who it is (files of dead processes are removed when seen).
- A MySQL/MariaDB schema (shared by folders): the named lock ``GET_LOCK('cardpipe:<schema>')``, held on a
  connection of its own by the exclusive holder (the server frees it when that connection ends); a shared
  holder only checks that it is free. Before wiping, an exclusive holder also refuses while a live consumer
  holds partition leases or a live settlement runs on that database.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, func, inspect, select, text
from sqlalchemy.exc import DBAPIError

from cardpipe.errors import CardpipeError
from cardpipe.serving import schema
from cardpipe.serving.owners import holder_is_dead, process_owner
from cardpipe.serving.settlements import STALE_SECONDS

LOCK_FILE = ".cardpipe.lock"
HOLDERS_DIR = ".cardpipe.lock.d"
SHARED, EXCLUSIVE = "shared", "exclusive"


class PipelineBusy(CardpipeError):
    """The results folder or the database is in use by another cardpipe command that excludes this one."""


class NotReady(CardpipeError):
    """A command was run before the one it needs (nothing set up, nothing loaded)."""


# --------------------------------------------------------------------------------------------- the folder


@dataclass
class _Held:
    fd: int
    mode: str
    count: int
    holder_file: Path


_held: dict[Path, _Held] = {}  # results folder -> this process's lock on it (nested runtimes share it)
_held_guard = threading.Lock()


def default_command() -> str:
    """How this process is named in a lock: ``cardpipe <subcommand>`` when run from the command line."""
    args = sys.argv[1:]
    sub = next((a for a in args if not a.startswith("-")), None)
    return f"cardpipe {sub}" if sub and sub.isalpha() else "cardpipe"


class FolderLock:
    """This process's hold on a results folder (``mode`` shared or exclusive); :meth:`release` once per acquire."""

    def __init__(self, folder: Path, mode: str, command: str | None = None):
        if mode not in (SHARED, EXCLUSIVE):
            raise ValueError(f"unknown lock mode {mode!r}")
        self.folder = Path(folder)
        self.mode = mode
        self.command = command or default_command()
        self._acquired = False

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`PipelineBusy` naming the holder(s)."""
        key = self.folder.resolve()
        with _held_guard:
            held = _held.get(key)
            if held is not None:
                if held.mode == SHARED and self.mode == EXCLUSIVE:
                    self._flock(held.fd, EXCLUSIVE)  # upgrade (same open file): raises if others share it
                    held.mode = EXCLUSIVE
                    _write_holder(held.holder_file, self.command, EXCLUSIVE)
                held.count += 1
                self._acquired = True
                return self
            key.mkdir(parents=True, exist_ok=True)
            fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                self._flock(fd, self.mode)
                holders = key / HOLDERS_DIR
                holders.mkdir(exist_ok=True)
                describe_holders(key)  # removes the records of dead holders (a killed run's)
                holder_file = holders / f"{socket.gethostname()}-{os.getpid()}.json"
                _write_holder(holder_file, self.command, self.mode)
            except BaseException:
                os.close(fd)
                raise
            _held[key] = _Held(fd, self.mode, 1, holder_file)
            self._acquired = True
            return self

    def _flock(self, fd: int, mode: str) -> None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if mode == EXCLUSIVE else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise PipelineBusy(
                f"results folder {self.folder} is in use by {describe_holders(self.folder)}: wait for it to "
                f"finish, or stop it, then run `{self.command}` again"
            ) from None

    def release(self) -> None:
        """Give the lock back (the last release of this process unlocks the file); idempotent."""
        if not self._acquired:
            return
        self._acquired = False
        key = self.folder.resolve()
        with _held_guard:
            held = _held.get(key)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del _held[key]
            with contextlib.suppress(OSError):
                held.holder_file.unlink()
            os.close(held.fd)  # unlocks


def _write_holder(path: Path, command: str, mode: str) -> None:
    record = {"owner": process_owner(), "command": command, "mode": mode, "since": datetime.now().isoformat("T")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def describe_holders(folder: Path) -> str:
    """The live holders recorded in ``folder`` (``cardpipe run (pid 12, since 10:02:03)``); dead ones' records
    are removed."""
    found = []
    for path in sorted((Path(folder) / HOLDERS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            owner = str(record["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if holder_is_dead(owner):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if owner == process_owner():
            continue
        found.append(_describe_record(owner, str(record.get("command") or "cardpipe"), record.get("since")))
    return ", ".join(found) if found else "another cardpipe command"


def _describe_record(owner: str, command: str, since: object) -> str:
    host, _, pid = owner.partition(":")
    where = f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"
    when = ""
    if isinstance(since, str):
        with contextlib.suppress(ValueError):
            when = f", since {datetime.fromisoformat(since):%H:%M:%S}"
    return f"`{command}` ({where}{when})"


# --------------------------------------------------------------------------------------------- the database


def mysql_lock_name(engine: Engine) -> str:
    """The server-wide named lock of this schema (at most 64 characters)."""
    name = f"cardpipe:{engine.url.database}"
    return name if len(name) <= 64 else "cardpipe:" + hashlib.sha1(name.encode()).hexdigest()


class DatabaseLock:
    """The exclusive named lock of a MySQL/MariaDB schema on a connection of its own, or (shared) the check that
    no exclusive holder has it. On SQLite (a file in the results folder, covered by :class:`FolderLock`) the
    exclusive holder only checks for live consumers and settlements."""

    def __init__(self, engine: Engine, mode: str, command: str, where: str):
        self.engine = engine
        self.mode = mode
        self.command = command
        self.where = where
        self._conn: Connection | None = None

    def acquire(self) -> DatabaseLock:
        if self.engine.dialect.name == "mysql":
            name = mysql_lock_name(self.engine)
            if self.mode == EXCLUSIVE:
                conn = self.engine.connect()
                try:
                    got = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar()
                    conn.commit()
                    if got != 1:
                        raise PipelineBusy(self._busy(conn, name))
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            else:
                with self.engine.connect() as conn:
                    if conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": name}).scalar() is not None:
                        raise PipelineBusy(self._busy(conn, name))
        if self.mode == EXCLUSIVE:
            try:
                check_no_live_users(self.engine, self.where, self.command)
            except BaseException:
                self.release()
                raise
        return self

    def _busy(self, conn: Connection, name: str) -> str:
        holder = conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": name}).scalar()
        detail = ""
        if holder is not None:
            detail = f" (MariaDB connection {holder}"
            with contextlib.suppress(DBAPIError):
                row = conn.execute(
                    text("SELECT HOST, TIME FROM information_schema.PROCESSLIST WHERE ID = :id"), {"id": holder}
                ).first()
                if row is not None:
                    detail += f" from {row[0]}, connected {row[1]} s ago"
            detail += ")"
        return (
            f"database {self.where} is in use by another `cardpipe run`, `setup` or `load`{detail}: wait for it "
            f"to finish, or stop it, then run `{self.command}` again"
        )

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # the server may be gone: the lock went with the connection
            conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": mysql_lock_name(self.engine)})
        with contextlib.suppress(Exception):
            conn.close()


def check_no_live_users(engine: Engine, where: str, command: str) -> None:
    """Refuse (:class:`PipelineBusy`) while a live consumer holds partition leases, or a live settlement runs,
    on this database: ``command`` would wipe the tables under it."""
    tables = set(inspect(engine).get_table_names())
    now = time.time()
    with engine.connect() as conn:
        users: list[str] = []
        if schema.stream_leases.name in tables:
            sl = schema.stream_leases
            owners = conn.execute(
                select(sl.c.owner, sl.c.topic, func.count())
                .where(sl.c.expires_at > now)
                .group_by(sl.c.owner, sl.c.topic)
                .order_by(sl.c.owner, sl.c.topic)
            ).all()
            users += [
                f"a consumer ({owner}, {n} partition(s) of {lease_topic!r})"
                for owner, lease_topic, n in owners
                if not holder_is_dead(owner) and not owner.startswith(process_owner() + ":")
            ]
        if schema.settlements.name in tables:
            st = schema.settlements
            running = conn.execute(
                select(st.c.settlement_id, st.c.owner).where(
                    st.c.status == schema.SETTLEMENT_RUNNING, st.c.heartbeat_at > now - STALE_SECONDS
                )
            ).all()
            users += [f"settlement {sid} ({owner})" for sid, owner in running if not holder_is_dead(owner)]
    if users:
        raise PipelineBusy(
            f"database {where} is in use by {', '.join(users)}: stop it or let it finish, then run `{command}` again"
        )


# --------------------------------------------------------------------------------------------- readiness

#: What to run first, by what is missing.
RUN_SETUP = "run `cardpipe run` for every layer, or `cardpipe setup` then `cardpipe load` first"
RUN_LOAD = "run `cardpipe load` first (or `cardpipe run` for every layer)"


def require_loaded(engine: Engine, where: str, command: str) -> None:
    """Raise :class:`NotReady` unless the database holds the cardpipe tables with cards and transactions loaded."""
    tables = set(inspect(engine).get_table_names())
    if not {schema.cards.name, schema.transactions.name} <= tables:
        raise NotReady(f"{command}: no cardpipe schema in {where}: {RUN_SETUP}")
    with engine.connect() as conn:
        for table in (schema.cards, schema.transactions):
            if conn.execute(select(func.count()).select_from(table.select().limit(1).subquery())).scalar_one() == 0:
                raise NotReady(f"{command}: no {table.name} loaded in {where}: {RUN_LOAD}")
