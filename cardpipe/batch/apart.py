"""DuckDB's work on a SQLite serving file, in processes of their own.

DuckDB reads a SQLite file through its own copy of the SQLite library. Two SQLite libraries in one process do
not see each other's POSIX locks (locks never conflict within a process): one may re-initialise the WAL index
the other has mapped (the process dies of SIGBUS), checkpoint pages past the other's read snapshot, or,
closing its file, drop the other's locks. So DuckDB never opens the file in a process that uses it through
Python's ``sqlite3`` (every cardpipe command does: claims, heartbeats, checkpoints, the service's API):

- :class:`SettleProcess` runs the embedded settlement in a child process, which the caller may start ahead
  (``cardpipe batch`` does, before its own imports): it imports DuckDB and the engine while the caller gets
  ready, then settles the one job it is given; its progress lines and settled rows are passed on to the
  caller, which stores them meanwhile (:func:`settle_embedded_apart` starts one and gives it its job at once);
- :class:`ExportProcess` writes ``stream_transactions.csv`` in a child process started ahead, while the stream
  runs: by the time the topic is drained it has imported DuckDB and copied the decisions committed so far
  (:class:`~cardpipe.batch.embedded.FollowedTable`), so only the last ones are read before the file is written.

On MySQL/MariaDB there is no such sharing (a server owns the files): the embedded engine runs in place.

This module is light to import (no DuckDB, no SQLAlchemy): a command starts these processes before its own
imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cardpipe.batch.outputs import EMBEDDED_DIR_PREFIX, SettledRows, SettlementSummary
from cardpipe.childprocs import (
    CONTEXT,
    ChildProcess,
    prepare_child,
    remove_orphaned_dirs,
    report_to_parent,
    worker_context,
)
from cardpipe.errors import CardpipeError

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.engine import URL

Progress = Callable[[str], None]
log = logging.getLogger(__name__)

#: How long a settlement process is given to stop (SIGTERM) when its caller gives up, before SIGKILL.
_STOP_GRACE_SECONDS = 10.0


def settle_embedded_apart(
    database_url: URL,
    watermark: Mapping[int, int],
    out_dir: Path,
    *,
    progress: Progress | None = None,
    on_settled: Callable[[SettledRows], None] | None = None,
    process: SettleProcess | None = None,
) -> SettlementSummary:
    """:func:`~cardpipe.batch.embedded.settle_embedded` in a child process (see the module's docstring): its
    progress lines and settled rows are passed on here, in this process (``on_settled`` runs here, while the
    child writes the files, which it renames into place only once ``on_settled`` has returned: what it raises
    leaves them unpublished, as in place); its :class:`~cardpipe.errors.CardpipeError` is raised here as it was
    raised. ``process``: one started ahead (stopped here, used or not), else one is started now."""
    return (process or SettleProcess()).settle(
        database_url, watermark, out_dir, progress=progress, on_settled=on_settled
    )


class SettleProcess:
    """The embedded settlement's process, started at once: it imports DuckDB and the engine, then waits for
    the one job :meth:`settle` gives it. :meth:`stop` it when it is not wanted after all (harmless after)."""

    def __init__(self) -> None:
        level = logging.getLogger("cardpipe").getEffectiveLevel()
        jobs, self._jobs = CONTEXT.Pipe(duplex=False)
        self._child = ChildProcess(_settle_main, jobs, level, name="cardpipe-settle-embedded")
        jobs.close()  # the child holds the reading end: it sees EOF once this process closes or dies

    @property
    def pid(self) -> int:
        return self._child.pid

    def settle(
        self,
        database_url: URL,
        watermark: Mapping[int, int],
        out_dir: Path,
        *,
        progress: Progress | None = None,
        on_settled: Callable[[SettledRows], None] | None = None,
    ) -> SettlementSummary:
        """Settle in the process (see :func:`settle_embedded_apart`); the process ends with it (stopped when
        this returns or raises). Once only."""
        if self._jobs.closed:
            raise ValueError("this settlement process was stopped or has settled already")
        child = self._child
        settled: SettledRows | None = None
        try:
            try:
                self._jobs.send((database_url, dict(watermark), Path(out_dir), progress is not None))
            except OSError:  # the process is gone
                child.join(_STOP_GRACE_SECONDS)
                raise CardpipeError(f"the embedded settlement's process {child.describe_exit()}") from None
            while True:
                wait(child.handles)
                for kind, payload in child.receive():
                    if kind == "progress" and progress is not None:
                        progress(payload)
                    elif kind == "settled":
                        settled = payload
                        if on_settled is not None:
                            on_settled(payload)
                        self._stored()
                    elif kind == "done":
                        if isinstance(payload, CardpipeError):
                            raise payload
                        return dataclasses.replace(payload, settled=settled)
                    elif kind == "error":
                        raise CardpipeError(f"embedded settlement failed: {payload}")
                if not child.open:  # the child is gone without a result
                    child.join(_STOP_GRACE_SECONDS)
                    raise CardpipeError(f"the embedded settlement's process {child.describe_exit()}")
        finally:
            self.stop()
            remove_orphaned_dirs(Path(out_dir), EMBEDDED_DIR_PREFIX)  # the child's, if stopped before its end

    def _stored(self) -> None:
        """Tell the child that the settled rows are stored: it may rename its files into place."""
        with contextlib.suppress(OSError):  # the process is gone: the loop sees how it ended
            self._jobs.send("stored")

    def stop(self) -> None:
        """Stop the process (at once if it waits for its job); harmless when it has ended."""
        if not self._jobs.closed:
            self._jobs.close()  # EOF: a child waiting for its job ends by itself
        self._child.stop(_STOP_GRACE_SECONDS)


def _settle_main(conn: Connection, jobs: Connection, log_level: int) -> None:
    """The settlement process: import the engine, wait for the job; then ("progress", line)…, ("settled",
    rows), then ("done", the summary without its rows, which went ahead, or the CardpipeError that stopped
    it). The files are renamed into place only once the caller has said it stored the rows ("stored" on
    ``jobs``). Ends without a word when the caller closes its end first (it did not need the process)."""
    prepare_child(log_level, "cardpipe: %(message)s")
    from cardpipe.batch.embedded import settle_embedded

    try:
        database_url, watermark, out_dir, tell_progress = jobs.recv()
    except EOFError:  # not wanted after all (or the caller is gone)
        jobs.close()
        sys.exit(0)

    def hand_over(rows: SettledRows) -> None:
        conn.send(("settled", rows))
        try:
            jobs.recv()  # "stored"
        except EOFError:  # the caller failed to store them (and stops this process), or is gone
            raise CardpipeError("the settled rows were not stored") from None

    def settle() -> Any:
        try:
            summary = settle_embedded(
                database_url,
                watermark,
                out_dir,
                progress=(lambda line: conn.send(("progress", line))) if tell_progress else None,
                on_settled=hand_over,
            )
        except CardpipeError as exc:
            return exc
        finally:
            jobs.close()
        return dataclasses.replace(summary, settled=None)

    report_to_parent(conn, settle)


class ExportProcess:
    """Writes tables of a SQLite serving file as CSV (:func:`~cardpipe.batch.embedded.export_table_csv`) in a
    child process started ahead: it imports DuckDB and attaches the file while the caller works (a process of
    its own: the file's locks hold between the two), then writes each file it is asked for, in order.

    ``follow``: an insert-only table, its columns and its key, to copy while the caller writes it
    (:class:`~cardpipe.batch.embedded.FollowedTable`, every :data:`FOLLOW_SECONDS`, in a folder beside the
    file), so that writing it out when asked (with those columns, ordered by that key) reads only its last rows."""

    def __init__(self, database_url: URL, follow: tuple[str, Sequence[str], str] | None = None) -> None:
        level = logging.getLogger("cardpipe").getEffectiveLevel()
        # Forked from the consumer workers' server when it runs (it imports this process's modules too), else
        # spawned: beside workers on every core, an interpreter importing its modules would take their CPU.
        context = worker_context()
        jobs, self._jobs = context.Pipe(duplex=False)
        followed = (follow[0], tuple(follow[1]), follow[2]) if follow is not None else None
        self._child = ChildProcess(
            _export_main, jobs, database_url, level, followed, name="cardpipe-export", context=context
        )
        jobs.close()  # the child holds the reading end: it sees EOF once this process closes or dies
        self._pending: list[str] = []  # the tables asked for, whose result is not read yet
        self._folder = _follow_folder(database_url)

    @property
    def pid(self) -> int:
        return self._child.pid

    def begin(self, table: str, columns: Sequence[str], key: str, path: Path) -> None:
        """Ask for ``table`` to be written to ``path`` (:func:`~cardpipe.batch.embedded.export_table_csv`); at once.
        The file is written aside and renamed, so a later request for the same path replaces it whole."""
        try:
            self._jobs.send((table, tuple(columns), key, Path(path)))
        except OSError:  # the process is gone
            self._child.join(_STOP_GRACE_SECONDS)
            raise CardpipeError(f"exporting {table}: the export's process {self._child.describe_exit()}") from None
        self._pending.append(table)

    def last_job(self) -> None:
        """No file is asked for after those asked so far: the process ends once it has written them (its exit then
        overlaps the caller's wait for the results instead of following it)."""
        if not self._jobs.closed:
            self._jobs.close()

    def result(self) -> int:
        """Wait for every file asked for; the row count of the last one. Raises the first one's error."""
        if not self._pending:
            raise ValueError("no export was asked for")
        count = 0
        while self._pending:
            table = self._pending[0]
            payload = self._next(table)
            self._pending.pop(0)
            if isinstance(payload, CardpipeError):
                self._pending.clear()
                raise payload
            count = int(payload)
        return count

    def export_table_csv(self, table: str, columns: Sequence[str], key: str, path: Path) -> int:
        """:meth:`begin` then :meth:`result`."""
        self.begin(table, columns, key, path)
        return self.result()

    def _next(self, table: str) -> Any:
        while True:
            for kind, payload in self._child.receive():
                if kind == "exported":
                    return payload
                raise CardpipeError(f"exporting {table} failed: {payload}")
            if not self._child.open:
                self._child.join(_STOP_GRACE_SECONDS)
                raise CardpipeError(f"exporting {table}: the export's process {self._child.describe_exit()}")
            wait(self._child.handles)

    def stop(self) -> None:
        """Stop the child (at once if it waits for a job); harmless when it has ended."""
        if not self._jobs.closed:
            self._jobs.close()  # EOF: a child waiting for a job ends by itself
        self._child.stop(_STOP_GRACE_SECONDS)
        remove_orphaned_dirs(self._folder, FOLLOW_DIR_PREFIX)  # the child's, if killed before its end


#: How often the export process copies the rows of the table it follows.
FOLLOW_SECONDS = 0.2


#: The name prefix of the folders export processes keep their copies in (followed by the process's pid).
FOLLOW_DIR_PREFIX = ".cardpipe-follow-"


def _follow_folder(database_url: URL) -> Path:
    """Where the export process of the SQLite file ``database_url`` keeps its copy: beside the file."""
    return Path(database_url.database or ".").parent


def _export_main(
    conn: Connection,
    jobs: Connection,
    database_url: URL,
    log_level: int,
    follow: tuple[str, tuple[str, ...], str] | None = None,
) -> None:
    """The export process: attach the database (and follow a table, :class:`ExportProcess`), then for each job
    ("exported", its row count or its CardpipeError); ends when the caller closes its end."""
    prepare_child(log_level, "cardpipe: %(message)s")
    import os
    import tempfile

    from cardpipe.batch.embedded import FollowedTable, connect_for_export, export_table_csv

    def serve_jobs() -> None:
        duck: Any = None
        failed: CardpipeError | None = None
        followed: FollowedTable | None = None
        work: Path | None = None
        try:
            duck = connect_for_export(database_url)
            if follow is not None:
                folder = _follow_folder(database_url)
                remove_orphaned_dirs(folder, FOLLOW_DIR_PREFIX)
                work = Path(tempfile.mkdtemp(prefix=f"{FOLLOW_DIR_PREFIX}{os.getpid()}-", dir=folder))
                followed = FollowedTable(duck, *follow, work)
        except CardpipeError as exc:  # reported for each job (the caller may never ask for one)
            failed = exc
        except Exception as exc:  # following is a speed-up: without it, each job reads the table whole
            log.debug("not following %s: %s", follow, exc)
        try:
            while True:
                while followed is not None and not jobs.poll(FOLLOW_SECONDS):
                    followed.catch_up()
                try:
                    table, columns, key, path = jobs.recv()
                except EOFError:  # the caller is done (or gone)
                    return
                try:
                    if failed is not None:
                        raise failed
                    if followed is not None and (table, tuple(columns), key) == (
                        followed.table,
                        followed.columns,
                        followed.key,
                    ):
                        result: Any = followed.export_csv(path, database_url)
                    else:
                        result = export_table_csv(database_url, table, columns, key, path, conn=duck)
                except CardpipeError as exc:
                    result = exc
                conn.send(("exported", result))
        finally:
            if duck is not None:
                duck.close()
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    report_to_parent(conn, serve_jobs)
