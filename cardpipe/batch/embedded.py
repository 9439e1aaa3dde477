"""The embedded batch engine: settle (SPEC §4, §9) with DuckDB, reading the serving database directly.

DuckDB attaches the serving database read-only through its scanner extension, loaded from the file its
wheel ships (never downloaded): ``sqlite_scanner`` for the SQLite file, ``mysql_scanner`` (the optional extra
``cardpipe[mysql]``) for MySQL/MariaDB. One SQL pipeline then

1. reads the decisions at or below the watermark (``checkpoint_seq <= W[kafka_partition]``) once, into a
   temporary table, with their status settled (pending becomes approved);
2. sums the approved amounts per card, adds them to the ORIGINAL cards' balances, totals balances and
   limits per customer and applies the rules of :mod:`cardpipe.batch.rules_sql` (exact DECIMAL arithmetic);
3. writes the three CSV files with ``COPY … TO`` into temporary names, on connections of their own (the
   transactions' file as soon as the decisions are read, beside steps 2 and 4), then renames them into place;
4. hands the settled cards and customers over to the caller, who stores them meanwhile (money and dates as
   text: :class:`~cardpipe.batch.outputs.FetchedRows`).

The files are those the Spark job writes: header line, money with two decimals, ``YYYY-MM-DD HH:MM:SS``
timestamps, ``YYYY-MM-DD`` dates, NULL as an empty field, ``\\n`` line ends, text quoted as Python's csv
module quotes it (``QUOTE_MINIMAL``: a field holding a comma, a double quote or a line break is enclosed
in double quotes, inner quotes doubled): by DuckDB's own writer when no text holds a ``#`` and none is
empty (which it would quote), else in SQL (:func:`csv_field`).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cardpipe.batch import rules_sql as rules
from cardpipe.batch.outputs import (
    BATCH_TRANSACTIONS,
    CARDS_UPDATED,
    CUSTOMERS_UPDATED,
    DATE,
    EMBEDDED_DIR_PREFIX,
    MONEY,
    OUTPUTS,
    FetchedRows,
    SettledRows,
    SettlementSummary,
    timed,
    work_dir_prefix,
)
from cardpipe.childprocs import remove_orphaned_dirs
from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    APPROVED,
    CARD_COLUMNS,
    CODE_COLUMNS,
    CUSTOMER_COLUMNS,
    DECLINED,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    PENDING,
    REJECTED,
    STREAM_COLUMNS,
    UNKNOWN_CARD,
)
from cardpipe.errors import CardpipeError, ConfigError, DatabaseUnavailable, first_line
from cardpipe.serving.settlement_source import watermark_sql

if TYPE_CHECKING:  # pragma: no cover
    import duckdb
    from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

#: Backend → (wheel package shipping the extension, extension name, pip requirement naming it).
SCANNERS = {
    "sqlite": ("duckdb_extension_sqlite_scanner", "sqlite_scanner", "cardpipe"),
    "mysql": ("duckdb_extension_mysql_scanner", "mysql_scanner", "cardpipe[mysql]"),
}
#: DuckDB's memory budget when it exports ``stream_transactions`` at the end of a consume (it spills beyond).
EXPORT_MEMORY_LIMIT = "256MB"
#: The catalog the serving database is attached as.
SERVING = "serving"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
DATE_FORMAT = "%Y-%m-%d"


def _column_kinds() -> tuple[frozenset[str], frozenset[str]]:
    """(money columns, text columns) of the tables the outputs come from, from the schema: money is read as
    exact DECIMAL(12,2) (:func:`~cardpipe.batch.rules_sql.money`), free text is quoted for the CSV files where
    needed (codes, :data:`~cardpipe.domain.records.CODE_COLUMNS`, never need it)."""
    from sqlalchemy import Integer, Numeric, String

    from cardpipe.serving import schema

    money, text = set(), set()
    for table in (schema.stream_transactions, schema.cards, schema.customers):
        for column in table.columns:
            if isinstance(column.type, String):
                if column.name not in CODE_COLUMNS:
                    text.add(column.name)
            elif isinstance(column.type, Numeric) and not isinstance(column.type, Integer) and column.type.scale == 2:
                money.add(column.name)
    return frozenset(money), frozenset(text)


_MONEY_COLUMNS, _TEXT_COLUMNS = _column_kinds()


# --------------------------------------------------------------------------------------------- connecting


def extension_path(backend: str) -> Path:
    """The scanner extension file shipped in the wheel for ``backend`` (``sqlite`` or ``mysql``), matching the
    installed DuckDB's version. :class:`ConfigError` when the wheel is missing or of another version."""
    import duckdb

    package, name, requirement = SCANNERS[backend]
    install = f"pip install '{requirement}'"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"the embedded batch engine needs the {package} package on {backend}: {install}") from None
    version = duckdb.__version__
    path = Path(module.__file__ or "").parent / "extensions" / f"v{version}" / f"{name}.duckdb_extension"
    if not path.is_file():
        raise ConfigError(
            f"{package} has no {name} extension for DuckDB {version} ({path} missing): "
            f"install the version equal to duckdb's ({install})"
        )
    return path


def _backend(url: URL) -> str:
    backend = url.get_backend_name()
    if backend in ("mysql", "mariadb"):
        return "mysql"
    if backend == "sqlite":
        return "sqlite"
    raise ConfigError(f"the embedded batch engine reads SQLite or MySQL/MariaDB, not {backend!r}")


def mysql_secret_options(url: URL) -> dict[str, str | int]:
    """The DuckDB MySQL secret's options (host, port, user, password, database, socket) for a SQLAlchemy
    URL. The password is only ever a bound secret option, never part of a connection string."""
    if not url.database:
        raise ConfigError("the database URL names no database")
    options: dict[str, str | int] = {
        "host": url.host or "127.0.0.1",
        "port": int(url.port or 3306),
        "user": url.username or "root",
        "database": url.database,
    }
    if url.password is not None:
        options["password"] = str(url.password)
    socket = url.query.get("unix_socket")
    if socket:
        options["socket"] = socket if isinstance(socket, str) else socket[0]
    return options


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def connect(
    database_url: URL,
    *,
    threads: int | None = None,
    temp_dir: Path | None = None,
    memory_limit: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the serving database attached read-only as ``serving``.

    ``threads``: DuckDB's worker threads (default: one per core). ``temp_dir``: where DuckDB may spill.
    ``memory_limit``: DuckDB's memory budget (e.g. ``"256MB"``; default: its own, most of the RAM).
    """
    import duckdb

    backend = _backend(database_url)
    extension = extension_path(backend)
    config: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        config["threads"] = int(threads)
    if memory_limit is not None:
        config["memory_limit"] = memory_limit
    conn = duckdb.connect(":memory:", config=config)
    secrets: tuple[str, ...] = ()
    where = database_url.render_as_string(hide_password=True)
    try:
        if temp_dir is not None:
            conn.execute(f"SET temp_directory = {rules.sql_string(str(temp_dir))}")
        conn.execute(f"LOAD {rules.sql_string(str(extension))}")
        if backend == "sqlite":
            path = Path(database_url.database or "")
            if not database_url.database or database_url.database == ":memory:" or not path.is_file():
                raise DatabaseUnavailable(f"database {where}: no SQLite file at {path}")
            conn.execute(f"ATTACH {rules.sql_string(str(path))} AS {SERVING} (TYPE sqlite, READ_ONLY)")
        else:
            options = mysql_secret_options(database_url)
            secrets = (str(options.get("password", "")),)
            listed = ", ".join(
                f"{key.upper()} {value if isinstance(value, int) else rules.sql_string(value)}"
                for key, value in options.items()
            )
            secret = f"cardpipe_serving_{uuid.uuid4().hex[:12]}"
            conn.execute(f"CREATE TEMPORARY SECRET {secret} (TYPE mysql, {listed})")
            conn.execute(f"ATTACH '' AS {SERVING} (TYPE mysql, SECRET {secret}, READ_ONLY)")
    except CardpipeError:
        conn.close()
        raise
    except duckdb.Error as exc:
        conn.close()
        message = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, secrets)
        raise DatabaseUnavailable(f"database {where}: {message}") from None
    return conn


# --------------------------------------------------------------------------------------------- the SQL


def csv_field(value: str) -> str:
    """SQL: a text value as one CSV field, quoted as Python's csv module (``QUOTE_MINIMAL``) quotes it, with
    a carriage return counted as a line break too (so the file reads back the same); NULL stays NULL."""
    needs_quotes = " OR ".join(f"contains({value}, {char})" for char in ("','", "'\"'", "chr(10)", "chr(13)"))
    return f"(CASE WHEN {needs_quotes} THEN '\"' || replace({value}, '\"', '\"\"') || '\"' ELSE {value} END)"


def _output_select(columns: tuple[str, ...], table: str) -> str:
    """SELECT the columns of ``table`` as the CSV files write them."""
    fields = []
    for column in columns:
        quoted = f'"{column}"'
        fields.append(f"{csv_field(quoted)} AS {quoted}" if column in _TEXT_COLUMNS else quoted)
    return f"SELECT {', '.join(fields)} FROM {table}"


def _source_column(column: str, *, codes_as_enums: bool = False) -> str:
    """A column read for the settlement: the settled status, money as exact DECIMAL, the rest as it is.
    ``codes_as_enums``: a code column of :data:`_CODE_TYPES` cast to its ENUM (a value outside it fails the read)."""
    expression = rules.settled_status('"status"') if column == "status" else _q(column)
    if codes_as_enums and column in _CODE_TYPES:
        return f"CAST({expression} AS {_CODE_TYPES[column][0]}) AS {_q(column)}"
    return f"{expression} AS status" if column == "status" else _exact_column(column)


def _exact_column(column: str) -> str:
    """A column as read from the serving database: money as exact DECIMAL(12,2), the rest as it is."""
    quoted = f'"{column}"'
    return f"{rules.money(quoted)} AS {quoted}" if column in _MONEY_COLUMNS else quoted


#: The codes the rules write, read as ENUMs when they are all the rules' own (one byte each instead of the 16 of a
#: string, in the decisions DuckDB holds and sorts): column -> (type name, its values).
_CODE_TYPES = {
    "status": ("cardpipe_status", (APPROVED, DECLINED, PENDING, REJECTED)),
    "decline_reason": ("cardpipe_reason", (AMOUNT_OVER_HALF_LIMIT, LOCATION_TOO_FAR, OVER_CREDIT_LIMIT, UNKNOWN_CARD)),
}


def _code_types_sql() -> list[str]:
    """The statements creating the ENUM types of :data:`_CODE_TYPES`."""
    return [
        f"CREATE TYPE {name} AS ENUM ({', '.join(rules.sql_string(v) for v in values)})"
        for name, values in _CODE_TYPES.values()
    ]


def _decisions_sql(watermark: Mapping[int, int], *, codes_as_enums: bool = False) -> str:
    """The statement reading the decisions into ``decisions``, stored in the key order of their file: the scan
    and the sort run on every thread, and the file is then written in table order, without a sort of its own.
    ``codes_as_enums``: the codes as the ENUMs of :data:`_CODE_TYPES` (a value outside them fails the statement)."""
    columns = ", ".join(_source_column(c, codes_as_enums=codes_as_enums) for c in STREAM_COLUMNS)
    key, _ = OUTPUTS[BATCH_TRANSACTIONS]
    return (
        f"CREATE TABLE decisions AS SELECT {columns} "
        f"FROM {SERVING}.stream_transactions WHERE {watermark_sql(watermark)} ORDER BY {_q(key)}"
    )


def _settle_sql() -> list[str]:
    """The statements computing ``cards_out`` and ``customers_out`` (with their old limit and score) from
    ``decisions`` and the original cards and customers."""
    approved = rules.sql_string(APPROVED)
    cards = ", ".join(_source_column(c) for c in CARD_COLUMNS)
    customers = ", ".join(_source_column(c) for c in CUSTOMER_COLUMNS)
    return [
        f"CREATE TABLE approved AS SELECT card_id, sum(amount) AS approved, count(*) AS n FROM decisions "
        f"WHERE status = {approved} GROUP BY card_id",
        f"CREATE TABLE cards_in AS SELECT {cards} FROM {SERVING}.cards",
        f"CREATE TABLE customers_in AS SELECT {customers} FROM {SERVING}.customers",
        # New balances: the original plus the approved amounts.
        f"CREATE TABLE cards_balanced AS SELECT c.* REPLACE ("
        f"CAST(c.current_balance + coalesce(a.approved, 0) AS {rules.MONEY_SUM}) AS current_balance) "
        f"FROM cards_in c LEFT JOIN approved a USING (card_id)",
        # One row per customer with cards (customers without cards keep their score).
        f"CREATE TABLE changes AS SELECT customer_id, {rules.score_change('balance', 'credit')} AS change "
        f"FROM (SELECT customer_id, CAST(sum(current_balance) AS {rules.MONEY_SUM}) AS balance, "
        f"CAST(sum(credit_limit) AS {rules.MONEY_SUM}) AS credit FROM cards_balanced GROUP BY customer_id)",
        f"CREATE TABLE cards_out AS SELECT b.* REPLACE ("
        f"{rules.new_credit_limit('b.credit_limit', rules.limit_factor('ch.change'))} AS credit_limit, "
        f"CAST(b.current_balance AS {rules.MONEY}) AS current_balance), b.credit_limit AS old_limit "
        f"FROM cards_balanced b LEFT JOIN changes ch USING (customer_id)",
        f"CREATE TABLE customers_out AS SELECT cu.* REPLACE ("
        f"CASE WHEN ch.change IS NULL THEN cu.credit_score "
        f"ELSE {rules.new_credit_score('cu.credit_score', 'ch.change')} END AS credit_score), "
        f"cu.credit_score AS old_score FROM customers_in cu LEFT JOIN changes ch USING (customer_id)",
    ]


_SUMMARY_SQL = f"""
SELECT
    (SELECT count(*) FROM decisions) AS transactions,
    (SELECT count(*) FROM decisions WHERE status = {rules.sql_string(APPROVED)}) AS approved,
    (SELECT count(*) FROM decisions WHERE status = {rules.sql_string(DECLINED)}) AS declined,
    (SELECT count(*) FROM decisions WHERE status = {rules.sql_string(REJECTED)}) AS rejected,
    (SELECT count(*) FROM cards_out) AS cards,
    (SELECT count(*) FROM customers_out) AS customers,
    (SELECT count(*) FROM customers_out WHERE credit_score < old_score) AS customers_score_down,
    (SELECT count(*) FROM cards_out WHERE credit_limit < old_limit) AS cards_limit_lowered
"""

_TABLES = {BATCH_TRANSACTIONS: "decisions", CARDS_UPDATED: "cards_out", CUSTOMERS_UPDATED: "customers_out"}
#: The tables stored in their file's key order (``_decisions_sql``): written as they are, without ORDER BY.
_IN_KEY_ORDER = frozenset({"decisions"})


def _copy_options(quote: str = "", *, header: bool = True) -> str:
    """The COPY options of the files; ``quote``: DuckDB's own quoting (``'"'``) or none (``''``: the fields
    are quoted in SQL, :func:`csv_field`); ``header``: the file starts with the header line."""
    return ", ".join(
        [
            "FORMAT csv",
            f"HEADER {'true' if header else 'false'}",
            "DELIMITER ','",
            f"QUOTE {rules.sql_string(quote)}",
            f"ESCAPE {rules.sql_string(quote)}",
            "NULLSTR ''",
            "NEW_LINE '\\n'",
            f"TIMESTAMPFORMAT {rules.sql_string(TIMESTAMP_FORMAT)}",
            f"DATEFORMAT {rules.sql_string(DATE_FORMAT)}",
        ]
    )


def _quoted_otherwise(column: str) -> str:
    """SQL: whether DuckDB's own quoting writes the text ``column`` otherwise than Python's csv module (it quotes
    an empty string and any text holding a ``#``; see :func:`_csv_copy`)."""
    return f"({_q(column)} = '' OR contains({_q(column)}, '#'))"


#: What a guarded COPY (:func:`_guarded`) fails with at the first text DuckDB's own quoting would write otherwise.
_QUOTED_OTHERWISE = "cardpipe: a text that DuckDB would quote otherwise"


def _guarded(columns: tuple[str, ...], source: str) -> str:
    """``source`` (a table or a subquery) as a subquery that fails the statement reading it, with
    :data:`_QUOTED_OTHERWISE`, at the first row holding a text of ``columns`` that DuckDB's own quoting would write
    otherwise than Python's csv module: a COPY of it with DuckDB's quoting writes Python's bytes or nothing, without
    a pass of its own over the texts first."""
    texts = [c for c in columns if c in _TEXT_COLUMNS]
    if not texts:
        return source
    otherwise = " OR ".join(map(_quoted_otherwise, texts))
    fail = f"error({rules.sql_string(_QUOTED_OTHERWISE)})"
    return f"(SELECT * FROM {source} WHERE CASE WHEN {otherwise} THEN {fail} ELSE true END)"


def _csv_copy(
    columns: tuple[str, ...],
    source: str,
    key: str,
    path: Path,
    *,
    native: bool,
    in_order: bool = False,
    header: bool = True,
) -> str:
    """The COPY statement writing ``columns`` of ``source`` (a table or a subquery) ordered by ``key`` to
    ``path`` in the files' format. ``in_order``: ``source`` is a table whose rows were inserted ordered by
    ``key``, written in that order (DuckDB keeps a table's insertion order: ``preserve_insertion_order``).

    DuckDB's own quoting gives Python's bytes (a field holding a comma, a quote, a line feed or a carriage return
    quoted, inner quotes doubled) except for two kinds of text, which it quotes and Python does not: the empty
    string and any text holding a ``#``. ``native``: DuckDB quotes (faster than quoting in SQL), reading ``source``
    through :func:`_guarded`, which fails the COPY at the first such text; else :func:`csv_field` quotes in SQL
    (:func:`_write_csv` runs one, then the other when needed). ``header``: the file starts with the header line.
    """
    target = rules.sql_string(str(path))
    order = "" if in_order else f" ORDER BY {_q(key)}"
    options = _copy_options(quote=chr(34) if native else "", header=header)
    if native:
        query = f"SELECT {', '.join(map(_q, columns))} FROM {_guarded(columns, source)}{order}"
        return f"COPY ({query}) TO {target} ({options})"
    return f"COPY ({_output_select(columns, source)}{order}) TO {target} ({options})"


def _write_csv(
    conn: duckdb.DuckDBPyConnection,
    columns: tuple[str, ...],
    source: str,
    key: str,
    path: Path,
    *,
    in_order: bool = False,
    header: bool = True,
) -> int:
    """Write ``columns`` of ``source`` to ``path`` with :func:`_csv_copy`: quoted by DuckDB, or, when a text needs
    Python's quoting (the guard fails the COPY), written again with the texts quoted in SQL. The row count."""
    import duckdb

    try:
        return _copied(conn, _csv_copy(columns, source, key, path, native=True, in_order=in_order, header=header))
    except duckdb.InvalidInputException as exc:
        if _QUOTED_OTHERWISE not in str(exc):
            raise
        log.debug("%s written again with its texts quoted in SQL: %s", path.name, first_line(exc))
        return _copied(conn, _csv_copy(columns, source, key, path, native=False, in_order=in_order, header=header))


def _copied(conn: duckdb.DuckDBPyConnection, copy: str) -> int:
    """Run the COPY statement ``copy``; the row count it reports."""
    row = conn.execute(copy).fetchone()
    return int(row[0]) if row else 0


#: A table in its file's key order is written in parts of at least this many rows, side by side, one per DuckDB
#: thread (DuckDB writes one file in order with about one core), and the parts are then joined in order.
MIN_PART_ROWS = 1_000_000


def _copy_in_parts(
    conn: duckdb.DuckDBPyConnection, columns: tuple[str, ...], table: str, key: str, path: Path, parts: int
) -> None:
    """Write ``table`` (stored in ``key`` order) to ``path`` as one :func:`_csv_copy` would, in up to ``parts``
    rowid ranges written at once on cursors of ``conn``, then appended to the first part in order."""
    rows, low, high = conn.execute(f"SELECT count(*), min(rowid), max(rowid) FROM {table}").fetchone() or (0, 0, 0)
    count = max(1, min(parts, int(rows) // MIN_PART_ROWS))
    if count == 1:
        _write_csv(conn, columns, table, key, path, in_order=True)
        return
    bounds = [int(low) + (int(high) + 1 - int(low)) * k // count for k in range(count + 1)]
    paths = [path] + [path.with_name(f"{path.name}.part{k}") for k in range(1, count)]
    errors: list[BaseException] = []

    def write(k: int) -> None:
        cursor = conn.cursor()
        try:
            source = f"(SELECT * FROM {table} WHERE rowid >= {bounds[k]} AND rowid < {bounds[k + 1]})"
            _write_csv(cursor, columns, source, key, paths[k], in_order=True, header=k == 0)
        except BaseException as exc:  # raised below, on the writer's own thread
            errors.append(exc)
        finally:
            cursor.close()

    writers = [
        threading.Thread(target=write, args=(k,), name=f"embedded-settlement-part-{k}", daemon=True)
        for k in range(count)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    try:
        if errors:
            raise errors[0]
        with path.open("r+b") as joined:
            for part in paths[1:]:
                with part.open("rb") as piece:
                    _append(piece, joined)
    finally:
        for part in paths[1:]:
            part.unlink(missing_ok=True)


def _append(source: BinaryIO, target: BinaryIO) -> None:
    """Append the whole of ``source`` to ``target`` (in the kernel where it can: ``copy_file_range``)."""
    size = os.fstat(source.fileno()).st_size
    offset, end = 0, os.fstat(target.fileno()).st_size
    try:
        while offset < size:
            copied = os.copy_file_range(source.fileno(), target.fileno(), size - offset, offset, end)
            if copied == 0:
                break
            offset, end = offset + copied, end + copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    if offset < size:  # no kernel copy here (or it stopped short): the rest through user space
        source.seek(offset)
        target.seek(end)
        shutil.copyfileobj(source, target, 1 << 20)


# --------------------------------------------------------------------------------------------- exports


def connect_for_export(database_url: URL) -> duckdb.DuckDBPyConnection:
    """A connection for :func:`export_table_csv`: the serving database attached, within a bounded memory budget
    (the stream's exporter must not grow with the stream: DuckDB sorts within it, spilling)."""
    return connect(database_url, memory_limit=EXPORT_MEMORY_LIMIT)


def export_table_csv(
    database_url: URL,
    table: str,
    columns: tuple[str, ...],
    key: str,
    path: Path,
    *,
    conn: duckdb.DuckDBPyConnection | None = None,
) -> int:
    """Write ``columns`` of the serving database's ``table`` to ``path``, ordered by ``key``, in the settlement
    files' format (see the module's docstring), through DuckDB; written aside, then renamed. Returns the row
    count. Reads the database only. ``conn``: one of :func:`connect_for_export` to use (left open), else one is
    opened and closed here."""
    import duckdb

    source = f'(SELECT {", ".join(_exact_column(c) for c in columns)} FROM {SERVING}."{table}")'
    spill = path.with_name(f".{path.name}.spill-{os.getpid()}")
    own = conn is None
    if conn is None:
        conn = connect_for_export(database_url)
    try:
        conn.execute(f"SET temp_directory = {rules.sql_string(str(spill))}")
        # DuckDB quotes unless a text needs Python's quoting, which SQL then gives (a second read, then).
        return _copy_to_csv(conn, table, path, lambda staged: _write_csv(conn, columns, source, key, staged))
    except duckdb.Error as exc:
        raise CardpipeError(f"exporting {table}: {first_line(exc)}") from None
    finally:
        if own:
            conn.close()
        shutil.rmtree(spill, ignore_errors=True)


def _copy_to_csv(conn: duckdb.DuckDBPyConnection, table: str, path: Path, write: Callable[[Path], int]) -> int:
    """Write ``table``'s file with ``write`` (given a staged name beside ``path``; it returns the row count), then
    rename it into place; the row count."""
    import duckdb

    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        written = write(staged)
        os.replace(staged, path)
    except duckdb.Error as exc:
        raise CardpipeError(f"exporting {table}: {first_line(exc)}") from None
    finally:
        staged.unlink(missing_ok=True)
    return written


def _csv_line(columns: tuple[str, ...], kinds: Mapping[str, str]) -> str:
    """SQL: one row of ``columns`` (of DuckDB types ``kinds``) as its line of the files, without the line end:
    each field as :func:`_csv_copy`'s COPY writes it (texts quoted by :func:`csv_field`, money with two
    decimals, timestamps and dates in the files' formats, NULL empty), joined by commas."""
    fields = []
    for column in columns:
        quoted, kind = _q(column), kinds[column].upper()
        if column in _TEXT_COLUMNS:
            field = csv_field(quoted)
        elif column in _MONEY_COLUMNS:
            field = f"CAST({rules.money(quoted)} AS VARCHAR)"
        elif kind.startswith("TIMESTAMP"):
            field = f"strftime({quoted}, {rules.sql_string(TIMESTAMP_FORMAT)})"
        elif kind == "DATE":
            field = f"strftime({quoted}, {rules.sql_string(DATE_FORMAT)})"
        else:
            field = f"CAST({quoted} AS VARCHAR)"
        fields.append(f"coalesce({field}, '')")
    return " || ',' || ".join(fields)


class FollowedTable:
    """A copy of an insert-only table of a SQLite serving file, kept up to date while the stream writes it, so
    that writing it out at the end reads only what came last (:meth:`export_csv`).

    SQLite gives a table without an integer primary key the next ``rowid`` above its largest at each insert,
    and one writer commits at a time: rows committed later have larger rowids. :meth:`catch_up` copies the
    rows above the last rowid copied (the query runs in SQLite, ``sqlite_query``; one short read each) into a
    DuckDB file in ``work``, so memory stays within the connection's budget. Each row is copied as its line of
    the file (:func:`_csv_line`) beside its ``key``: writing the file at the end only sorts the lines. The copy is
    trusted only when the table has as many rows as it, up to the same largest rowid: anything else (rows
    deleted, the table made anew, a read failed) and :meth:`export_csv` reads the table whole, as
    :func:`export_table_csv` does.
    """

    def __init__(
        self, conn: duckdb.DuckDBPyConnection, table: str, columns: tuple[str, ...], key: str, work: Path
    ) -> None:
        self.conn, self.table, self.columns, self.key = conn, table, columns, key
        self.last_rowid = 0
        self.rows = 0
        self.broken: str | None = None  # why the copy cannot be trusted
        read = tuple(dict.fromkeys((*columns, key)))
        quoted = ", ".join(_q(c) for c in read)
        raw_types = conn.execute(f"DESCRIBE SELECT {quoted} FROM {SERVING}.{_q(table)}").fetchall()
        kinds = {name: kind for name, kind, *_ in raw_types}
        self._casts = ", ".join(f"CAST({_q(name)} AS {kind}) AS {_q(name)}" for name, kind in kinds.items())
        self._line = _csv_line(columns, kinds)
        self._read = f"SELECT rowid AS rid, {quoted} FROM {_q(table)} WHERE rowid > "
        conn.execute(f"ATTACH {rules.sql_string(str(work / 'copy.duckdb'))} AS followed")
        conn.execute(f"SET temp_directory = {rules.sql_string(str(work / 'spill'))}")
        conn.execute(f"CREATE TABLE followed.copied (rid BIGINT, k {kinds[key]}, line VARCHAR)")
        # The header is a line too, keyed NULL (the key is the table's primary key: no row's is): one sort writes
        # the file. (A header joined on by UNION ALL instead kept DuckDB from spilling: out of memory at 5M rows.)
        header = rules.sql_string(",".join(columns))
        conn.execute(f"INSERT INTO followed.copied VALUES (0, NULL, {header})")

    def catch_up(self) -> int:
        """Copy the rows committed since the last call; how many. A failed read leaves the copy untrusted."""
        if self.broken is not None:
            return 0
        import duckdb

        query = rules.sql_string(self._read + str(self.last_rowid))
        try:
            self.conn.execute(
                f"INSERT INTO followed.copied SELECT rid, {_q(self.key)}, {self._line} "
                f"FROM (SELECT CAST(rid AS BIGINT) AS rid, {self._casts} "
                f"FROM sqlite_query({rules.sql_string(SERVING)}, {query}))"
            )
            count, largest = self.conn.execute(
                f"SELECT count(*), max(rid) FROM followed.copied WHERE rid > {self.last_rowid}"
            ).fetchone() or (0, None)
        except duckdb.Error as exc:
            self.broken = f"reading {self.table} failed: {first_line(exc)}"
            log.debug("following %s stopped: %s", self.table, self.broken)
            return 0
        if count:
            self.rows += int(count)
            self.last_rowid = int(largest)
        return int(count)

    def export_csv(self, path: Path, database_url: URL) -> int:
        """Catch up, then write the table to ``path`` as :func:`export_table_csv` does (ordered by the key), from
        the copy when it is whole, else from the table itself. Returns the row count."""
        import duckdb

        before = self.rows
        self.catch_up()
        if self.broken is None:
            try:
                measure = rules.sql_string(f"SELECT count(*) AS n, max(rowid) AS largest FROM {_q(self.table)}")
                in_sqlite = f"sqlite_query({rules.sql_string(SERVING)}, {measure})"
                row = self.conn.execute(f"SELECT * FROM {in_sqlite}").fetchone()
            except duckdb.Error as exc:
                self.broken = f"reading {self.table} failed: {first_line(exc)}"
            else:
                count, largest = (int(value) if value is not None else 0 for value in (row or (0, 0)))
                if (count, largest) != (self.rows, self.last_rowid):
                    self.broken = (
                        f"it holds {count} rows up to rowid {largest}, the copy {self.rows} up to {self.last_rowid}"
                    )
        if self.broken is not None:
            log.debug("%s written from the table itself: %s", self.table, self.broken)
            return export_table_csv(database_url, self.table, self.columns, self.key, path, conn=self.conn)
        log.debug("%s written from its copy: %d rows, %d read when asked", self.table, self.rows, self.rows - before)
        lines = "SELECT line FROM followed.copied ORDER BY k NULLS FIRST"  # the header first
        options = _copy_options(header=False)  # one column, unquoted: each line as it is
        written = _copy_to_csv(
            self.conn,
            self.table,
            path,
            lambda staged: _copied(self.conn, f"COPY ({lines}) TO {rules.sql_string(str(staged))} ({options})"),
        )
        return written - 1  # the header


# --------------------------------------------------------------------------------------------- the engine


class _FileWriter(threading.Thread):
    """Writes output files (names of :data:`OUTPUTS`, in order) into ``work`` on its own DuckDB connection,
    recording each file's seconds in :attr:`steps` and a DuckDB error in :attr:`error`. A table stored in key
    order is written in as many parts as DuckDB has threads (:func:`_copy_in_parts`)."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, work: Path, names: tuple[str, ...]) -> None:
        super().__init__(name="embedded-settlement-files", daemon=True)
        self.conn, self.work, self.names = conn, work, names
        threads = conn.execute("SELECT current_setting('threads')").fetchone()
        self.parts = int(threads[0]) if threads else 1
        self.steps: dict[str, float] = {}
        self.written: list[Path] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for name in self.names:
                key, columns = OUTPUTS[name]
                staged = self.work / f"{name}.csv"
                with timed(self.steps, f"csv:{name}"):
                    table = _TABLES[name]
                    if table in _IN_KEY_ORDER:
                        _copy_in_parts(self.conn, columns, table, key, staged, self.parts)
                    else:
                        _write_csv(self.conn, columns, table, key, staged)
                self.written.append(staged)
        except BaseException as exc:  # handed to the settling thread, which raises it
            self.error = exc
        finally:
            self.conn.close()


def _q(name: str) -> str:
    return f'"{name}"'


def _fetch_rows(conn: duckdb.DuckDBPyConnection, query: str) -> FetchedRows:
    """The rows of ``query``, its DECIMAL and DATE columns as text (see :class:`FetchedRows`)."""
    columns = conn.execute(f"DESCRIBE {query}").fetchall()
    names = tuple(str(c[0]) for c in columns)
    kinds = tuple(MONEY if str(c[1]).startswith("DECIMAL") else DATE if c[1] == "DATE" else None for c in columns)
    fields = (f"CAST({_q(n)} AS VARCHAR) AS {_q(n)}" if kind else _q(n) for n, kind in zip(names, kinds, strict=True))
    return FetchedRows(names, kinds, conn.execute(f"SELECT {', '.join(fields)} FROM ({query})").fetchall())


def _read_decisions(conn: duckdb.DuckDBPyConnection, watermark: Mapping[int, int]) -> None:
    """Read the decisions (:func:`_decisions_sql`), the codes as ENUMs; when the database holds a code the rules do
    not write (another writer's), they are read again as text."""
    import duckdb

    for statement in _code_types_sql():
        conn.execute(statement)
    try:
        conn.execute(_decisions_sql(watermark, codes_as_enums=True))
    except duckdb.ConversionException as exc:
        log.debug("decisions read again with their codes as text: %s", first_line(exc))
        conn.execute("DROP TABLE IF EXISTS decisions")
        conn.execute(_decisions_sql(watermark))


def settle_embedded(
    database_url: URL,
    watermark: Mapping[int, int],
    out_dir: Path,
    *,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    on_settled: Callable[[SettledRows], None] | None = None,
) -> SettlementSummary:
    """Settle the decisions at or below ``watermark`` (partition → last checkpoint_seq) of the serving
    database at ``database_url`` against its original cards and customers, and write
    ``batch_transactions.csv``, ``cards_updated.csv`` and ``customers_updated.csv`` into ``out_dir``
    (each written aside, then renamed into place). Reads the database only.

    ``threads``: DuckDB's worker threads (default: one per core). ``on_settled``: called with the settled
    rows (also in the summary) while the files are being written; what it raises fails the settlement.
    """
    import duckdb

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_orphaned_dirs(out_dir, EMBEDDED_DIR_PREFIX)
    work = out_dir / f"{work_dir_prefix(os.getpid())}{uuid.uuid4().hex[:8]}"
    work.mkdir()
    steps: dict[str, float] = {}
    written: list[Path] = []
    settled: SettledRows | None = None
    try:
        conn = connect(database_url, threads=threads, temp_dir=work / "spill")
        try:
            with timed(steps, "read", progress):
                _read_decisions(conn, watermark)
            # The files are written on connections of their own while this one settles, hands the settled rows
            # over and the caller stores them: DuckDB runs them at once (outside the GIL). The transactions'
            # file needs only the decisions: it starts at once.
            writers = [_FileWriter(conn.cursor(), work, (BATCH_TRANSACTIONS,))]
            writers[0].start()
            try:
                with timed(steps, "settle", progress):
                    for statement in _settle_sql():
                        conn.execute(statement)
                with timed(steps, "summary", progress):
                    row = conn.execute(_SUMMARY_SQL).fetchone()
                    names = [d[0] for d in conn.description or ()]
                if progress is not None:
                    progress("batch stage: csv files")
                writers.append(_FileWriter(conn.cursor(), work, (CARDS_UPDATED, CUSTOMERS_UPDATED)))
                writers[1].start()
                with timed(steps, "rows", progress):
                    settled = SettledRows(
                        _fetch_rows(
                            conn,
                            f"SELECT {', '.join(f'c.{_q(n)}' for n in CARD_COLUMNS)}, "
                            "coalesce(a.n, 0) AS settled_count FROM cards_out c LEFT JOIN approved a USING (card_id)",
                        ),
                        _fetch_rows(conn, f"SELECT {', '.join(map(_q, CUSTOMER_COLUMNS))} FROM customers_out"),
                    )
                if on_settled is not None:
                    with timed(steps, "stored", progress):
                        on_settled(settled)
            finally:
                for writer in writers:
                    writer.join()
            for writer in writers:
                steps.update(writer.steps)
                if writer.error is not None:
                    raise writer.error
                written.extend(writer.written)
        except duckdb.Error as exc:
            where = database_url.render_as_string(hide_password=True)
            secrets = (str(database_url.password),) if database_url.password else ()
            text = str(exc).strip()
            raise CardpipeError(
                _redact(
                    f"embedded settlement of {where} failed: {text.splitlines()[0] if text else type(exc).__name__}",
                    secrets,
                )
            ) from None
        finally:
            conn.close()
        for staged in written:
            os.replace(staged, out_dir / staged.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert row is not None
    counts: dict[str, Any] = {n: int(v) for n, v in zip(names, row, strict=True)}
    summary = SettlementSummary(
        **counts,
        seconds=round(time.perf_counter() - started, 3),
        steps=steps,
        settled=settled,
    )
    log.info("%s", summary.describe())
    log.debug("embedded settlement steps (s): %s", steps)
    return summary
