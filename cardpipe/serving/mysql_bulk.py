"""Bulk loads into MySQL/MariaDB: ``LOAD DATA LOCAL INFILE`` of validated, canonical rows.

Every row is validated and typed in Python first (:func:`~cardpipe.serving.csv_io.normalised_batches`:
a malformed cell is an :class:`~cardpipe.errors.InputFileError` naming file, line and column) and
written as canonical text (``2025-04-01 00:00:02``, ``-95.11``; empty = NULL in nullable columns)
into a named pipe, which ONE ``LOAD DATA LOCAL INFILE`` statement per table reads while it is being
written: Python validates on one core while the server inserts on another, and nothing goes to disk
(without ``os.mkfifo`` the rows go to a temporary file first). Everything runs in the caller's
transaction, and InnoDB's ``LOAD DATA`` is transactional: an error anywhere (a bad cell stops the
pipe early) rolls the whole load back.

``LOAD DATA LOCAL`` turns duplicate keys, foreign-key failures and unstorable values into warnings and
skips the row (as ``IGNORE``), so each statement is checked: no warning, rows stored = rows sent. A
warning is an error (naming the CSV line when the server names a row) and the load rolls back.

Foreign keys between the loaded tables are checked here, against the keys of the parent tables loaded
before (an unknown id is an error naming file, line and column). That lets the load run with
``foreign_key_checks=0, unique_checks=0``, under which MariaDB (10.6+) inserts into an empty table in
bulk (sorted index builds, table-level undo): about half the server CPU, for a single statement.
Primary keys stay unique: InnoDB still reports a duplicate (as a warning, so an error here).

When the server (or the client) refuses ``LOCAL INFILE``, the same canonical rows go in as multi-row
``INSERT`` statements (PyMySQL turns an ``executemany`` into them), after one log line saying so.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import BigInteger, Column, Connection, Integer, Table
from sqlalchemy.exc import DBAPIError

from cardpipe.serving.bulk import LOCAL_INFILE_REFUSED, load_data_sql
from cardpipe.serving.csv_io import NormalisedBatch, normalised_batches

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Method = Literal["auto", "load_data", "insert"]
#: Rows per ``executemany`` of the INSERT path (PyMySQL splits them into ~1 MB statements).
INSERT_ROWS = 50_000
#: Progress is reported every this many rows.
PROGRESS_ROWS = 500_000
#: ``LoadRejected.code`` of an id missing from the parent table (MySQL's ER_NO_REFERENCED_ROW_2).
MISSING_PARENT = 1452
#: ``LoadRejected.code`` of a duplicate key (MySQL's ER_DUP_ENTRY).
DUPLICATE_KEY = 1062
_ROW_IN_MESSAGE = re.compile(r"\bat row (\d+)")
_PIPE_BYTES = 1 << 20  # a pipe buffer of 1 MB (Linux; the default is 64 KB)


class LoadRejected(Exception):
    """Rows of a table were refused: duplicate key, missing parent, a value the server would not store.

    ``code`` is the MySQL error number (0: none); ``line``/``column`` locate the row when known;
    ``parent`` names the table a missing id should be in, ``value`` the id.
    """

    def __init__(
        self,
        code: int,
        message: str,
        line: int | None = None,
        column: str | None = None,
        parent: str | None = None,
        value: int | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.line = line
        self.column = column
        self.parent = parent
        self.value = value


class LocalInfileRefused(Exception):
    """The server or the client does not allow ``LOAD DATA LOCAL INFILE``."""


class MySqlBulkLoader:
    """Loads ``tables`` (in that order, parents first) on ``conn``, a MySQL connection inside the
    caller's transaction. When it checks every foreign key itself, each ``LOAD DATA`` runs with the
    session's ``foreign_key_checks``/``unique_checks`` off (restored right after).

    ``method``: ``"auto"`` (``LOAD DATA LOCAL``, falling back to INSERTs when refused), ``"load_data"``
    (no fallback: a refusal is an error) or ``"insert"`` (multi-row INSERTs only).
    """

    def __init__(
        self, conn: Connection, tables: Sequence[Table], method: Method = "auto", *, temp_dir: Path | None = None
    ):
        if conn.dialect.name != "mysql":
            raise ValueError(f"MySqlBulkLoader needs a MySQL/MariaDB connection, not {conn.dialect.name}")
        if method not in ("auto", "load_data", "insert"):
            raise ValueError(f"unknown bulk load method {method!r}")
        self.conn = conn
        self.tables = tuple(tables)
        self.method: Method = method
        self.temp_dir = temp_dir
        #: What the rows went in with: "load_data" or "insert".
        self.used = "insert" if method == "insert" else "load_data"
        self._keys: dict[tuple[str, str], set[int]] = {}  # (table, column) -> keys loaded
        # Every foreign key points at an integer key of a table loaded earlier: all checked here.
        self.checks_foreign_keys = all(
            fk.column.table in self.tables[:position] and _is_integer(fk.column)
            for position, table in enumerate(self.tables)
            for fk in table.foreign_keys
        )

    @contextlib.contextmanager
    def _bulk_insert_mode(self) -> Iterator[None]:
        """``foreign_key_checks=0, unique_checks=0`` for one statement (when every foreign key is
        checked here), then the session's own values again."""
        if not self.checks_foreign_keys:
            yield
            return
        row = self.conn.exec_driver_sql("SELECT @@SESSION.foreign_key_checks, @@SESSION.unique_checks").one()
        restore = f"SET SESSION foreign_key_checks = {int(row[0])}, unique_checks = {int(row[1])}"
        self.conn.exec_driver_sql("SET SESSION foreign_key_checks = 0, unique_checks = 0")
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # the original error matters more (a lost connection…)
                self.conn.exec_driver_sql(restore)
            raise
        self.conn.exec_driver_sql(restore)

    def load(
        self,
        table: Table,
        path: Path,
        columns: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Append the rows of ``path`` to ``table``; returns the row count.

        Raises :class:`~cardpipe.errors.InputFileError` for a malformed row, :class:`LoadRejected` for
        rows the database refuses, :class:`LocalInfileRefused` when ``method`` is ``"load_data"`` and
        the server does not allow it.
        """
        if table not in self.tables:
            raise ValueError(f"{table.name} is not one of the tables this loader was made for")
        names = list(columns or table.columns.keys())
        if self.used == "load_data":
            try:
                return self._load_data(table, names, self._checked(table, names, path), progress)
            except LocalInfileRefused as exc:
                if self.method != "auto":
                    raise
                log.warning("the server refused LOAD DATA LOCAL INFILE (%s): loading with multi-row INSERTs", exc)
                self.used = "insert"
        return self._insert(table, names, self._checked(table, names, path), progress)

    # --- foreign keys -------------------------------------------------------------------------------

    def _checked(self, table: Table, names: Sequence[str], path: Path) -> Iterator[NormalisedBatch]:
        """The file's batches, with their foreign keys checked, keeping the keys later tables need."""
        referenced = {fk.column.name for t in self.tables for fk in t.foreign_keys if fk.column.table is table}
        collect = [
            (names.index(name), self._keys.setdefault((table.name, name), set()))
            for name in sorted(referenced)
            if name in names and _is_integer(table.c[name])
        ]
        checks = [
            (names.index(fk.parent.name), fk.parent.name, self._keys[key], key[0])
            for fk in table.foreign_keys
            if fk.parent.name in names and (key := (fk.column.table.name, fk.column.name)) in self._keys
        ]
        for batch in normalised_batches(path, table, names):
            rows = batch.rows
            for index, keys in collect:
                keys.update(map(int, filter(None, map(itemgetter(index), rows))))
            for index, name, keys, parent in checks:
                if keys.issuperset(map(int, filter(None, map(itemgetter(index), rows)))):
                    continue
                for position, row in enumerate(rows):  # find the first row with an unknown id
                    text = row[index]
                    if text != "" and int(text) not in keys:
                        raise LoadRejected(
                            MISSING_PARENT,
                            f"{name} {int(text)} is not in {parent}",
                            int(batch.lines[position]),
                            name,
                            parent,
                            int(text),
                        )
            yield batch

    # --- LOAD DATA LOCAL INFILE ---------------------------------------------------------------------

    def _load_sql(self, table: Table, names: Sequence[str]) -> str:
        quote = self.conn.dialect.identifier_preparer.quote
        targets, assignments = [], []
        for position, name in enumerate(names):
            if table.c[name].nullable:
                targets.append(f"@v{position}")
                assignments.append(f"{quote(name)} = NULLIF(@v{position}, '')")
            else:
                targets.append(quote(name))
        # Every field is quoted, quotes doubled, no escape character.
        return load_data_sql(self.conn.dialect, table, targets, assignments)

    def _load_data(
        self,
        table: Table,
        names: Sequence[str],
        batches: Iterator[NormalisedBatch],
        progress: Callable[[int], None] | None,
    ) -> int:
        # The header and the first rows are checked before the server sees anything.
        first = next(batches, None)
        if first is None:
            return 0
        batches = itertools.chain([first], batches)
        sql = self._load_sql(table, names)
        lines: list[Sequence[int]] = []
        with tempfile.TemporaryDirectory(prefix="cardpipe-load-", dir=self.temp_dir) as folder:
            path = Path(folder) / f"{table.name}.csv"
            if _make_fifo(path):
                with self._bulk_insert_mode():
                    statement, sent = self._load_through_pipe(sql, path, batches, lines, progress)
            else:
                with path.open("w", newline="", encoding="utf-8") as handle:
                    sent = _write_rows(handle, batches, lines, progress)
                statement = _Statement(self._execute_load, sql, path)
                with self._bulk_insert_mode():
                    statement.run()
        if statement.error is not None:
            raise statement.error
        stored, warnings = statement.result
        if warnings:
            _level, code, message = warnings[0][:3]
            match = _ROW_IN_MESSAGE.search(message)
            line = _line_of(lines, int(match.group(1))) if match else None
            raise LoadRejected(int(code), str(message), line)
        if stored != sent:
            raise LoadRejected(0, f"the server stored {stored} of {sent} rows")
        return sent

    def _load_through_pipe(
        self,
        sql: str,
        path: Path,
        batches: Iterable[NormalisedBatch],
        lines: list[Sequence[int]],
        progress: Callable[[int], None] | None,
    ) -> tuple[_Statement, int]:
        """Run the LOAD on a thread reading the named pipe ``path``; write the rows into it here."""
        statement = _Statement(self._execute_load, sql, path)
        statement.start()
        handle: IO[str] | None = None
        sent = 0
        broken = False
        try:
            handle = _open_pipe_for_writing(path, statement)
            if handle is not None:  # else the statement ended without reading: refused, or an error
                try:
                    sent = _write_rows(handle, batches, lines, progress)
                except BrokenPipeError:
                    broken = True  # the statement stopped reading
        finally:
            if handle is not None:
                with contextlib.suppress(BrokenPipeError):
                    handle.close()  # end of file: the statement ends (early, after an error here)
            else:
                _release_reader(path, statement)
            statement.join()
        if broken and statement.error is None:
            statement.error = LoadRejected(0, "the server stopped reading the rows")
        return statement, sent

    def _execute_load(self, sql: str, path: Path) -> tuple[int, list[Any]]:
        dbapi = self.conn.dialect.loaded_dbapi
        cursor = self.conn.connection.cursor()
        try:
            stored = cursor.execute(sql, (str(path),))
            cursor.execute("SHOW WARNINGS LIMIT 5")
            return int(stored), list(cursor.fetchall())
        except dbapi.Error as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            if code in LOCAL_INFILE_REFUSED:
                detail = exc.args[1] if len(exc.args) > 1 else exc
                raise LocalInfileRefused(f"MySQL error {code}: {detail}") from None
            # The exception types the rest of the code sees (OperationalError for a lost connection…).
            raise DBAPIError.instance(sql, None, exc, dbapi.Error, dialect=self.conn.dialect) from exc
        finally:
            cursor.close()

    # --- multi-row INSERT ---------------------------------------------------------------------------

    def _insert(
        self,
        table: Table,
        names: Sequence[str],
        batches: Iterable[NormalisedBatch],
        progress: Callable[[int], None] | None,
    ) -> int:
        dialect = self.conn.dialect
        quote = dialect.identifier_preparer.quote
        sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))})"
        )
        nullable = [i for i, name in enumerate(names) if table.c[name].nullable]
        cursor = self.conn.connection.cursor()
        total = reported = 0
        pending: list[Sequence[Any]] = []
        try:
            for batch in batches:
                if nullable:  # "" is NULL in a nullable column
                    pending.extend(_with_nulls(row, nullable) if "" in row else row for row in batch.rows)
                else:
                    pending.extend(batch.rows)
                if len(pending) >= INSERT_ROWS:
                    total += self._execute_many(cursor, sql, pending)
                    pending = []
                    if progress and total - reported >= PROGRESS_ROWS:
                        progress(reported := total)
            if pending:
                total += self._execute_many(cursor, sql, pending)
        finally:
            cursor.close()
        if progress and total != reported:
            progress(total)
        return total

    def _execute_many(self, cursor: Any, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        dbapi = self.conn.dialect.loaded_dbapi
        try:
            cursor.executemany(sql, rows)
        except dbapi.Error as exc:
            # The same exception types as the rest of the code sees (IntegrityError, OperationalError…).
            raise DBAPIError.instance(sql, None, exc, dbapi.Error, dialect=self.conn.dialect) from exc
        return len(rows)


class _Statement(threading.Thread):
    """Runs one function (the LOAD statement) and keeps its result or its exception."""

    def __init__(self, function: Callable[..., Any], *args: Any):
        super().__init__(name="cardpipe-load-data", daemon=True)
        self._function = function
        self._args = args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._function(*self._args)
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc


def _with_nulls(row: Sequence[str], nullable: Sequence[int]) -> list[str | None]:
    values: list[str | None] = list(row)
    for i in nullable:
        if values[i] == "":
            values[i] = None
    return values


def _is_integer(column: Column) -> bool:
    return isinstance(column.type, Integer | BigInteger)


def _write_rows(
    handle: IO[str],
    batches: Iterable[NormalisedBatch],
    lines: list[Sequence[int]],
    progress: Callable[[int], None] | None,
) -> int:
    sent = reported = 0
    for batch in batches:
        handle.write(_csv_text(batch.rows))
        lines.append(batch.lines)
        sent += len(batch.rows)
        if progress and sent - reported >= PROGRESS_ROWS:
            progress(reported := sent)
    handle.flush()
    if progress and sent != reported:
        progress(sent)
    return sent


def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` as CSV with every field quoted and quotes doubled (what ``csv.writer`` with
    ``QUOTE_ALL`` writes), built with ``str.join``: a quote inside a value is rare, and counted."""
    if not rows:
        return ""
    body = '"\n"'.join(map('","'.join, rows))
    if body.count('"') != 2 * len(rows) * len(rows[0]) - 2:  # a value holds a quote: double them
        body = '"\n"'.join(['","'.join([value.replace('"', '""') for value in row]) for row in rows])
    return f'"{body}"\n'


def _make_fifo(path: Path) -> bool:
    """Make a named pipe at ``path``; False where there are none (Windows, some file systems)."""
    try:
        os.mkfifo(path, 0o600)
    except (AttributeError, NotImplementedError, OSError):
        return False
    return True


def _open_pipe_for_writing(path: Path, reader: threading.Thread) -> IO[str] | None:
    """Open the named pipe once the reader has opened it; None if the reader ends without opening it."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if not reader.is_alive():
                return None
            time.sleep(0.002)
    os.set_blocking(fd, True)
    if fcntl is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    return open(fd, "w", newline="", encoding="utf-8", buffering=_PIPE_BYTES)  # noqa: SIM115 - closed by caller


def _release_reader(path: Path, reader: threading.Thread) -> None:
    """Let a reader that opens (or is opening) the pipe go on: it reads an empty file."""
    while reader.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(0.01)


def _line_of(lines: Sequence[Sequence[int]], row_number: int) -> int | None:
    """The CSV line of the statement's ``row_number``-th row (1-based, as the server counts)."""
    index = row_number - 1
    for part in lines:
        if 0 <= index < len(part):
            return int(part[index])
        index -= len(part)
    return None
