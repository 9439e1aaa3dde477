"""Fast multi-row writes and keyed reads on the DBAPI cursor of a SQLAlchemy connection (the stream's hot path).

SQLAlchemy's per-row parameter processing costs more than SQLite's own insert; here each column's
bind processor (the dialect's own value conversion, so stored values are identical) is applied column by
column, only to the columns that have one, and the rows go to ``cursor.executemany`` as plain tuples.
Reads by key apply the columns' result processors the same way. Identifiers come from the schema.

On MySQL/MariaDB (PyMySQL), ``executemany`` of an ``INSERT … VALUES`` sends multi-row statements whose
values PyMySQL escapes one by one in Python: most of a checkpoint's CPU. :class:`_MySQLStatements`
renders the very same statements (PyMySQL's literals, its row format, its statement size limit) a column
at a time with C-level ``map`` for the value types the stream writes, each renderer checked against
PyMySQL's own ``escape`` on the connection before use; other values go through ``escape`` itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from itertools import chain, repeat
from operator import attrgetter, is_
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Table, select
from sqlalchemy.dialects.sqlite.base import DATETIME as SQLITE_DATETIME
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine

log = logging.getLogger(__name__)

Processor = Callable[[Any], Any]
#: Bound parameters every SQLite build takes in one statement (``SQLITE_MAX_VARIABLE_NUMBER`` before 3.32).
_SQLITE_MIN_VARIABLES = 999


def _none_safe(proc: Processor) -> bool:
    """Whether ``proc`` maps None to None itself (SQLAlchemy's processors do), so it can be mapped blindly."""
    try:
        return proc(None) is None
    except Exception:
        return False


_DATETIME_SAMPLES = (
    datetime(1, 1, 1),
    datetime(999, 2, 3, 4, 5, 6, 7),
    datetime(2025, 4, 1, 1, 21, 9),
    datetime(2024, 2, 29, 23, 59, 59, 999999),
    datetime(9999, 12, 31, 23, 59, 59),
)


class _SQLiteDatetimeText:
    """SQLite DATETIME's bind processor in its default storage format, faster: a naive ``datetime`` is formatted
    as ``isoformat`` with a space and microseconds does (what SQLAlchemy's processor writes), anything else by
    SQLAlchemy's own processor; :meth:`column` formats a whole column of naive datetimes at C speed."""

    def __init__(self, slow: Processor) -> None:
        self.slow = slow

    def __call__(self, value: Any) -> Any:
        if type(value) is datetime and value.tzinfo is None:
            return value.isoformat(" ", "microseconds")
        return self.slow(value)

    def column(self, values: Sequence[Any]) -> list[Any] | None:
        """Every value of ``values`` converted, when all are naive datetimes; else None."""
        if set(map(type, values)) != {datetime} or any(map(_tzinfo, values)):
            return None
        return list(map(datetime.isoformat, values, repeat(" "), repeat("microseconds")))


def _bind_processor(type_: TypeEngine[Any], dialect: Dialect) -> Processor | None:
    """The column type's bind processor, or a faster one with the same output where there is one: SQLite's
    DATETIME in its default storage format (:class:`_SQLiteDatetimeText`, checked on samples here, a value at a
    time and as a column; else SQLAlchemy's own processor)."""
    proc = type_._cached_bind_processor(dialect)  # noqa: SLF001
    impl = type_.dialect_impl(dialect)
    if proc is None or not isinstance(impl, SQLITE_DATETIME) or impl._storage_format != SQLITE_DATETIME._storage_format:  # noqa: SLF001
        return proc
    fast = _SQLiteDatetimeText(proc)
    expected = [proc(v) for v in _DATETIME_SAMPLES]
    agrees = [fast(v) for v in _DATETIME_SAMPLES] == expected and fast.column(_DATETIME_SAMPLES) == expected
    return fast if agrees else proc


@contextmanager
def _dbapi_cursor(conn: Connection, sql: str) -> Iterator[Any]:
    """A raw cursor of ``conn``, whose DBAPI errors come out as SQLAlchemy's (IntegrityError, OperationalError…)."""
    cursor = conn.connection.cursor()
    try:
        yield cursor
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect) from exc
    finally:
        cursor.close()


# MySQL string literal escapes, as PyMySQL's ``escape_string`` (checked against it on each connection). Applied
# one after the other to a whole column at once, the backslash first: no replacement makes another one's target.
_MYSQL_ESCAPES = (
    ("\\", "\\\\"),
    ("\x00", "\\0"),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\x1a", "\\Z"),
    ('"', '\\"'),
    ("'", "\\'"),
)
_SEPARATOR = "\x01"  # joins a column's texts while they are escaped together (a text holding it: one by one)
_SERVER_STATUS_NO_BACKSLASH_ESCAPES = 512
_NONE = type(None)
_tzinfo = attrgetter("tzinfo")
_MYSQL_SAMPLES: dict[type, list[Any]] = {
    int: [0, 1, -7, 2**63 - 1, -(2**63)],
    str: ["", "plain", "quote ' double \" back \\ nul \x00 nl \n cr \r sub \x1a tab \t", "é ✓ 😀 中文", "%s %(x)s"],
    Decimal: [
        Decimal("0.00"),
        Decimal("-0.00"),
        Decimal("12.34"),
        Decimal("-9999999999.99"),
        Decimal("1E+3"),
        Decimal("5E-7"),
    ],
    datetime: [
        datetime(1, 1, 1),
        datetime(2025, 4, 1, 1, 21, 9),
        datetime(2024, 2, 29, 23, 59, 59, 999999),
        datetime(9999, 12, 31, 23, 59, 59, 1),
    ],
    _NONE: [None],
}


def _quoted_texts(values: list[str], quote: str, escapes: Iterable[tuple[str, str]]) -> list[str] | None:
    """Each text of ``values`` between ``quote`` s with ``escapes`` applied, the whole column joined at once (None
    when a text holds the separator: the caller renders them one by one)."""
    text = _SEPARATOR.join(values)
    if text.count(_SEPARATOR) != len(values) - 1:
        return None
    for char, escaped in escapes:
        if char in text:
            text = text.replace(char, escaped)
    return (quote + text.replace(_SEPARATOR, quote + _SEPARATOR + quote) + quote).split(_SEPARATOR)


def _decimal_texts(values: list[Any]) -> list[str] | None:
    """Finite ``Decimal`` s as plain digits (None if one is not finite)."""
    return list(map(format, values, repeat("f"))) if all(map(Decimal.is_finite, values)) else None


def _naive_datetime_texts(values: list[Any]) -> list[str] | None:
    """Naive datetimes as ``isoformat`` with a space (None if one has a time zone: PyMySQL would ignore it)."""
    if not all(map(is_, map(_tzinfo, values), repeat(None))):
        return None
    return list(map(datetime.isoformat, values, repeat(" ")))


def _around_nulls(values: list[Any], render: Callable[[list[Any]], list[str] | None]) -> list[str] | None:
    """``render`` of the values that are not None, with ``NULL`` in place of each None (None: not rendered)."""
    rendered = render([v for v in values if v is not None])
    if rendered is None:
        return None
    it = iter(rendered)
    return ["NULL" if v is None else next(it) for v in values]


def _mysql_renderers(db: Any) -> dict[type, Callable[[list[Any]], list[str] | None]]:
    """Column renderers (values of one exact type -> PyMySQL's literals; None: not for these values), each kept
    only if it agrees with ``db.escape`` (the PyMySQL connection's own) on samples."""
    escapes = (("'", "''"),) if db.server_status & _SERVER_STATUS_NO_BACKSLASH_ESCAPES else _MYSQL_ESCAPES

    def strings(values: list[Any]) -> list[str] | None:
        return _quoted_texts(values, "'", escapes)

    def integers(values: list[Any]) -> list[str] | None:
        return list(map(str, values))

    def datetimes(values: list[Any]) -> list[str] | None:
        texts = _naive_datetime_texts(values)
        return None if texts is None else list(map("'{}'".format, texts))

    def nones(values: list[Any]) -> list[str] | None:
        return ["NULL"] * len(values)

    candidates = {int: integers, str: strings, Decimal: _decimal_texts, datetime: datetimes, _NONE: nones}
    return {
        kind: render
        for kind, render in candidates.items()
        if render(_MYSQL_SAMPLES[kind]) == [db.escape(v) for v in _MYSQL_SAMPLES[kind]]
    }


class _MySQLStatements:
    """The statements PyMySQL's ``executemany`` sends for an ``INSERT … VALUES (%s, …)``, rendered faster."""

    def __init__(self, sql: str, width: int):
        from pymysql.cursors import RE_INSERT_VALUES

        match = RE_INSERT_VALUES.match(sql)
        if match is None or match.group(2).rstrip() != "(" + ", ".join(["%s"] * width) + ")":
            raise ValueError(f"not a plain multi-row insert: {sql}")
        self.prefix = match.group(1) % ()
        self.postfix = (match.group(3) or "") % ()
        self._renderers: dict[tuple[int, int], dict[type, Callable[[list[Any]], list[str] | None]]] = {}

    def renderers(self, db: Any) -> dict[type, Callable[[list[Any]], list[str] | None]]:
        # Per connection and escaping mode (the server's sql_mode may turn backslash escapes off).
        key = (id(db), db.server_status & _SERVER_STATUS_NO_BACKSLASH_ESCAPES)
        renderers = self._renderers.get(key)
        if renderers is None:
            renderers = _mysql_renderers(db)
            self._renderers = {key: renderers}
        return renderers

    def literals(self, db: Any, column: Sequence[Any]) -> list[str]:
        """PyMySQL's literal of every value of ``column``."""
        renderers = self.renderers(db)
        kinds = set(map(type, column))
        values = column if isinstance(column, list) else list(column)
        if len(kinds) == 1:
            render = renderers.get(kinds.pop())
            rendered = render(values) if render is not None else None
            if rendered is not None:
                return rendered
        elif len(kinds) == 2 and _NONE in kinds:  # a nullable column
            kinds.discard(_NONE)
            render = renderers.get(kinds.pop())
            rendered = _around_nulls(values, render) if render is not None else None
            if rendered is not None:
                return rendered
        return list(map(db.escape, values))

    def execute(self, cursor: Any, rows: Sequence[Sequence[Any]]) -> None:
        """Send ``rows`` (tuples in the statement's column order)."""
        self.execute_columns(cursor, list(zip(*rows, strict=True)))

    def execute_columns(self, cursor: Any, values: Sequence[Sequence[Any]]) -> None:
        """Send the rows whose columns are ``values`` (one sequence per column, in the statement's order)."""
        db = cursor.connection
        columns = [self.literals(db, column) for column in values]
        encoding = db.encoding
        prefix, postfix = self.prefix.encode(encoding), self.postfix.encode(encoding)
        limit = cursor.max_stmt_length - len(postfix) - 1
        sql = bytearray(prefix)
        first = True
        for values in map("({})".format, map(", ".join, zip(*columns, strict=True))):
            row = values.encode(encoding)
            if first:
                first = False
            elif len(sql) + len(row) > limit:  # PyMySQL's split: len(sql) + len(v) + len(postfix) + 1 > max
                cursor.execute(sql + postfix)
                sql = bytearray(prefix)
            else:
                sql += b","
            sql += row
        cursor.execute(sql + postfix)


#: Server/client errors meaning "LOAD DATA LOCAL is not allowed here".
LOCAL_INFILE_REFUSED = {
    1148,  # ER_NOT_ALLOWED_COMMAND (MariaDB, MySQL 5.x: local_infile off on the server or the client)
    2068,  # CR_LOAD_DATA_LOCAL_INFILE_REJECTED (C clients)
    3948,  # ER_CLIENT_LOCAL_FILES_DISABLED (MySQL 8)
    4166,  # ER_LOAD_INFILE_CAPABILITY_DISABLED (MariaDB 10.5+)
}
#: Fewer rows than this go as INSERTs even where :class:`_MySQLLoad` could load them (a file and a savepoint
#: per statement cost more than they save on a few rows).
LOAD_MIN_ROWS = 500
_LOAD_SAVEPOINT = "cardpipe_load"
_CSV_QUOTE = '"'


def load_data_sql(dialect: Dialect, table: Table, targets: Sequence[str], assignments: Sequence[str] = ()) -> str:
    """``LOAD DATA LOCAL INFILE %s`` into ``table``: ``targets`` (quoted column names or ``@`` variables) from CSV
    lines ending with ``\\n``, fields quoted with ``"`` (quotes doubled), no escape character, then the ``SET``
    ``assignments``. No backslash in the statement, so it means the same under ``NO_BACKSLASH_ESCAPES``."""
    sql = (
        f"LOAD DATA LOCAL INFILE %s INTO TABLE {dialect.identifier_preparer.quote(table.name)} CHARACTER SET utf8mb4 "
        f"FIELDS TERMINATED BY ',' ENCLOSED BY '\"' ESCAPED BY '' ({', '.join(targets)})"
    )
    return sql + (" SET " + ", ".join(assignments) if assignments else "")


def _csv_fields(values: list[Any]) -> list[str] | None:
    """Each value of one column as :func:`load_data_sql`'s CSV field (None: a value this does not render, the
    rows then go as INSERTs): integers and naive datetimes as their text, finite ``Decimal`` s as plain digits,
    texts quoted, None as the bare word ``NULL`` (which the server reads as NULL, unlike ``"NULL"``)."""
    kinds = set(map(type, values))
    if _NONE in kinds:
        kinds.discard(_NONE)
        if not kinds:
            return ["NULL"] * len(values)
        return _around_nulls(values, _csv_fields) if len(kinds) == 1 else None
    if kinds == {str}:
        return _quoted_texts(values, _CSV_QUOTE, ((_CSV_QUOTE, _CSV_QUOTE * 2),))
    if kinds == {int}:
        return list(map(str, values))
    if kinds == {Decimal}:
        return _decimal_texts(values)
    if kinds == {datetime}:
        return _naive_datetime_texts(values)
    return None


class _MySQLLoad:
    """A plain insert's rows as one ``LOAD DATA LOCAL INFILE`` (PyMySQL): the server stores them with about half
    the work of multi-row INSERTs. Only kept when checked: every row stored and no warning. ``LOAD DATA LOCAL``
    turns what an INSERT refuses (a duplicate key, a value the server would not store) into a warning and skips
    or alters the row; then the load is undone to a savepoint and the caller sends INSERTs, which raise the error
    as before. A server that refuses ``LOCAL INFILE`` is told once and not asked again."""

    def __init__(self, dialect: Dialect, table: Table, columns: Sequence[str]):
        quote = dialect.identifier_preparer.quote
        self.sql = load_data_sql(dialect, table, [quote(c) for c in columns])
        self.table = table.name
        self.refused = False
        self._folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

    def execute_columns(self, cursor: Any, values: Sequence[Sequence[Any]]) -> bool:
        """Store the rows whose columns are ``values``; False when nothing was stored and they must go as INSERTs."""
        count = len(values[0])
        if self.refused or count < LOAD_MIN_ROWS:
            return False
        fields = [_csv_fields(column if isinstance(column, list) else list(column)) for column in values]
        if any(column is None for column in fields):
            return False
        try:
            data = ("\n".join(map(",".join, zip(*fields, strict=True))) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: the INSERT's own error
            return False
        fd, path = tempfile.mkstemp(prefix="cardpipe-load-", suffix=".csv", dir=self._folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            cursor.execute(f"SAVEPOINT {_LOAD_SAVEPOINT}")
            try:
                stored = cursor.execute(self.sql, (path,))
            except cursor.connection.Error as exc:
                code = exc.args[0] if exc.args else None
                if code not in LOCAL_INFILE_REFUSED:
                    raise
                self.refused = True
                log.warning(
                    "the database refuses LOAD DATA LOCAL INFILE (%s); %s rows go as multi-row INSERTs",
                    exc.args[1] if len(exc.args) > 1 else code,
                    self.table,
                )
                stored = -1
            if stored == count and cursor.warning_count == 0:
                return True
            cursor.execute(f"ROLLBACK TO SAVEPOINT {_LOAD_SAVEPOINT}")
            return False
        finally:
            os.unlink(path)


class BulkWriter:
    """Insert (or upsert) tuples into ``table``'s ``columns`` in the caller's transaction.

    With ``upsert_keys``, a row whose keys exist updates it: each other column takes the new value, except the
    ``add_columns``, to which the new value is added (running counters). ``load_data``: on MySQL/MariaDB,
    :meth:`write_columns` of many rows (a plain insert) loads them with ``LOAD DATA LOCAL INFILE``
    (:class:`_MySQLLoad`) where the server allows it.
    """

    def __init__(
        self,
        dialect: Dialect,
        table: Table,
        columns: Sequence[str],
        *,
        upsert_keys: Sequence[str] | None = None,
        add_columns: Sequence[str] = (),
        load_data: bool = False,
    ):
        self.columns = tuple(columns)
        quote = dialect.identifier_preparer.quote
        names = ", ".join(quote(c) for c in self.columns)
        marks = ", ".join(["?" if dialect.paramstyle == "qmark" else "%s"] * len(self.columns))
        head, values, tail = f"INSERT INTO {quote(table.name)} ({names}) VALUES ", f"({marks})", ""
        if upsert_keys:
            updates = [c for c in self.columns if c not in upsert_keys]
            table_name = quote(table.name)
            if dialect.name == "mysql":
                tail = " ON DUPLICATE KEY UPDATE " + ", ".join(
                    f"{quote(c)} = {quote(c) + ' + ' if c in add_columns else ''}VALUES({quote(c)})" for c in updates
                )
            else:
                tail = f" ON CONFLICT ({', '.join(quote(k) for k in upsert_keys)}) DO UPDATE SET " + ", ".join(
                    f"{quote(c)} = {table_name + '.' + quote(c) + ' + ' if c in add_columns else ''}excluded.{quote(c)}"
                    for c in updates
                )
        self.sql = sql = head + values + tail
        # SQLite: rows go :attr:`rows_per_statement` at a time in one multi-row INSERT (one statement step instead
        # of one per row), within the parameter limit of every SQLite build (999).
        self.rows_per_statement = max(1, _SQLITE_MIN_VARIABLES // len(self.columns)) if dialect.name == "sqlite" else 1
        self.multi_sql = head + ", ".join([values] * self.rows_per_statement) + tail
        self.processors: list[tuple[int, Processor]] = [
            (i, proc)
            for i, name in enumerate(self.columns)
            if (proc := _bind_processor(table.c[name].type, dialect)) is not None
        ]
        self._none_safe = [_none_safe(proc) for _, proc in self.processors]
        self._mysql = (
            _MySQLStatements(sql, len(self.columns))
            if dialect.name == "mysql" and dialect.driver == "pymysql" and not self.processors
            else None
        )
        loadable = self._mysql is not None and load_data and not upsert_keys
        self._mysql_load = _MySQLLoad(dialect, table, self.columns) if loadable else None

    def prepare(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """One row's parameters (see :meth:`params` for many)."""
        if not self.processors:
            return tuple(row)
        values = list(row)
        for index, proc in self.processors:
            if values[index] is not None:
                values[index] = proc(values[index])
        return tuple(values)

    def params(self, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """The parameters of ``rows``: plain tuples, each processed value converted, column by column."""
        if not self.processors:
            return [r if type(r) is tuple else tuple(r) for r in rows]
        try:
            columns: list[Any] = list(zip(*rows, strict=True))
        except ValueError:  # rows of unequal length: the database says what is wrong
            return [self.prepare(r) for r in rows]
        if len(columns) != len(self.columns):
            return [self.prepare(r) for r in rows]
        return list(zip(*self._processed(columns), strict=True))

    def _processed(self, columns: Sequence[Sequence[Any]]) -> list[Any]:
        """``columns`` (one per column of ``columns``) with each processed value converted."""
        converted: list[Any] = list(columns)
        for (index, proc), none_safe in zip(self.processors, self._none_safe, strict=True):
            column = converted[index]
            whole = proc.column(column) if isinstance(proc, _SQLiteDatetimeText) else None
            if whole is not None:
                converted[index] = whole
            elif none_safe:
                converted[index] = list(map(proc, column))
            else:
                converted[index] = [None if v is None else proc(v) for v in column]
        return converted

    def write(self, conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
        """Write ``rows`` (tuples in ``columns`` order) on ``conn``'s current transaction."""
        if not rows:
            return
        if self._mysql is not None and len(set(map(len, rows))) == 1 and len(rows[0]) == len(self.columns):
            with _dbapi_cursor(conn, self.sql) as cursor:
                self._mysql.execute(cursor, rows)
            return
        self._execute(conn, self.params(rows))

    def write_columns(self, conn: Connection, values: Sequence[Sequence[Any]], *, converted: bool = False) -> None:
        """:meth:`write` of the rows whose columns are ``values`` (one equally long sequence per column, in
        ``columns`` order): no row is built before the values are converted. ``converted``: the values are the
        driver's already (no bind processor is applied)."""
        if len(values) != len(self.columns) or len(set(map(len, values))) != 1:
            raise ValueError(f"{len(self.columns)} columns of one length expected")
        if not values[0]:
            return
        if self._mysql is not None:
            with _dbapi_cursor(conn, self.sql) as cursor:
                if self._mysql_load is None or not self._mysql_load.execute_columns(cursor, values):
                    self._mysql.execute_columns(cursor, values)
            return
        columns = values if converted else self._processed(values)
        if self.rows_per_statement == 1:
            self._execute(conn, list(zip(*columns, strict=True)))
            return
        # The multi-row statements' parameters, row after row, straight from the columns: one slice assignment
        # per column instead of a tuple per row chained again.
        width, count = len(columns), len(columns[0])
        flat: list[Any] = [None] * (width * count)
        for index, column in enumerate(columns):
            flat[index::width] = column
        step = self.rows_per_statement * width
        whole = count // self.rows_per_statement * step
        with _dbapi_cursor(conn, self.sql) as cursor:
            for start in range(0, whole, step):
                cursor.execute(self.multi_sql, flat[start : start + step])
            if whole < len(flat):
                cursor.executemany(self.sql, [flat[i : i + width] for i in range(whole, len(flat), width)])

    def _execute(self, conn: Connection, params: list[tuple[Any, ...]]) -> None:
        per_statement = self.rows_per_statement
        whole = len(params) // per_statement * per_statement if per_statement > 1 else 0
        with _dbapi_cursor(conn, self.sql) as cursor:
            for start in range(0, whole, per_statement):
                cursor.execute(self.multi_sql, list(chain.from_iterable(params[start : start + per_statement])))
            if whole < len(params):
                cursor.executemany(self.sql, params[whole:])


class KeyReader:
    """Read ``table``'s ``columns`` for many values of its integer ``key`` column, a chunk of keys per query
    (:meth:`of_select`: the columns of any SELECT without a WHERE clause, joins included)."""

    def __init__(self, dialect: Dialect, table: Table, columns: Sequence[str], key: str, *, chunk: int = 900):
        self._prepare(dialect, select(*(table.c[c] for c in columns)), table.c[key], chunk)

    @classmethod
    def of_select(
        cls, dialect: Dialect, statement: Select[Any], key: ColumnElement[Any], *, chunk: int = 900
    ) -> KeyReader:
        """Read ``statement``'s columns for many values of ``key`` (one of its FROM clause's integer columns).
        Its own values (not the keys) are compiled into the SQL: integers only."""
        reader = cls.__new__(cls)
        reader._prepare(dialect, statement, key, chunk)
        return reader

    def _prepare(self, dialect: Dialect, statement: Select[Any], key: ColumnElement[Any], chunk: int) -> None:
        if statement.whereclause is not None:
            raise ValueError("a KeyReader's statement has a WHERE clause of its own")
        self.columns = tuple(str(column.key) for column in statement.selected_columns)
        self.chunk = chunk  # SQLite: stays under its bound-parameter limit
        compiled = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        self._select = f"{compiled} WHERE {key.compile(dialect=dialect)} IN "
        self._mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._dialect = dialect
        self._types = [column.type for column in statement.selected_columns]
        # PyMySQL inlines parameters as literals anyway; integers it writes as str(n): so do we, faster.
        self._inline_ints = dialect.name == "mysql" and dialect.driver == "pymysql"

    def read(self, conn: Connection, keys: Sequence[int]) -> Iterator[tuple[Any, ...]]:
        """The rows (result-processed, as SQLAlchemy would return them) whose key is in ``keys``."""
        inline = self._inline_ints and set(map(type, keys)) <= {int}
        for start in range(0, len(keys), self.chunk):
            chunk = tuple(keys[start : start + self.chunk])
            if inline:
                sql, params = f"{self._select}({', '.join(map(str, chunk))})", None
            else:
                sql, params = f"{self._select}({', '.join([self._mark] * len(chunk))})", chunk
            with _dbapi_cursor(conn, sql) as cursor:
                cursor.execute(sql, params)
                rows = cursor.fetchall()
                if not rows:
                    continue
                procs = [
                    (i, proc)
                    for i, (type_, desc) in enumerate(zip(self._types, cursor.description, strict=True))
                    if (proc := type_._cached_result_processor(self._dialect, desc[1])) is not None  # noqa: SLF001
                ]
            if not procs:
                yield from rows
                continue
            columns: list[Iterable[Any]] = list(zip(*rows, strict=True))
            for index, proc in procs:  # a column at a time, at C speed
                columns[index] = map(proc, columns[index])
            yield from zip(*columns, strict=True)
