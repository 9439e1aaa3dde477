"""Loading the four input CSVs into the serving database: typed, validated, all or nothing.

On MySQL/MariaDB the rows go in with ``LOAD DATA LOCAL INFILE`` (:mod:`cardpipe.serving.mysql_bulk`),
or multi-row INSERTs when the server refuses it; on SQLite with ``executemany`` in chunks. Either
way every row is validated first (:mod:`cardpipe.domain.checks`' rules), and the whole load is one
transaction. When the database refuses a duplicate id or an unknown parent id, the file is read again to
name the line and the id (only then: a load that succeeds keeps no set of keys).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy import Connection, Engine, Table, literal, select
from sqlalchemy.exc import IntegrityError

from cardpipe.errors import CardpipeError, ConfigError, InputFileError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import insert_rows, numbered_typed_rows, read_typed_rows
from cardpipe.serving.database import translated_errors
from cardpipe.serving.mysql_bulk import DUPLICATE_KEY, MISSING_PARENT, LoadRejected, LocalInfileRefused, MySqlBulkLoader

log = logging.getLogger(__name__)

INPUT_FILES = {table.name: f"{table.name}.csv" for table in schema.INPUT_TABLES}
#: How rows reach the database. ``auto``: LOAD DATA LOCAL INFILE on MySQL (INSERTs if refused),
#: executemany on SQLite. ``load_data`` / ``insert``: MySQL only, that way (no fallback).
#: ``rows``: typed rows through SQLAlchemy's executemany (SQLite's way; the reference on MySQL).
LoadMethod = Literal["auto", "load_data", "insert", "rows"]
_PARENTS = {"cards": "customers.csv or credit_card_types.csv", "transactions": "cards.csv"}


@dataclass
class LoadSummary:
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    method: str = ""


def check_data_dir(data_dir: Path) -> None:
    """Raise :class:`ConfigError` unless ``data_dir`` holds the four input files."""
    if not data_dir.is_dir():
        raise ConfigError(f"data folder {data_dir} does not exist")
    missing = [name for name in INPUT_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise ConfigError(f"data folder {data_dir} lacks {', '.join(missing)}")


def load_inputs(
    engine: Engine, data_dir: Path, progress: Callable[[str, int], None] | None = None, *, method: LoadMethod = "auto"
) -> LoadSummary:
    """Replace the input tables' contents with the CSVs of ``data_dir``, in one transaction.

    A malformed row stops the load with an error naming file, line and column, and nothing of it
    stays in the database. ``method``: see :data:`LoadMethod`; ``summary.method`` tells what was used.
    """
    check_data_dir(data_dir)
    mysql = engine.dialect.name == "mysql"
    if method in ("load_data", "insert") and not mysql:
        raise ValueError(f"load method {method!r} needs MySQL/MariaDB, not {engine.dialect.name}")
    summary = LoadSummary()
    started = time.perf_counter()
    try:
        _load_all(engine, data_dir, progress, method, summary)
    except IntegrityError as exc:  # at COMMIT: a server that checks keys only then
        located = next(filter(None, (_key_error(data_dir, table) for table in schema.INPUT_TABLES)), None)
        raise InputFileError(located or f"{data_dir}: {_integrity_message('', str(exc.orig))}") from None
    summary.seconds = time.perf_counter() - started
    return summary


def _load_all(
    engine: Engine,
    data_dir: Path,
    progress: Callable[[str, int], None] | None,
    method: LoadMethod,
    summary: LoadSummary,
) -> None:
    mysql = engine.dialect.name == "mysql"
    with translated_errors(engine), engine.begin() as conn:
        # Empty the tables (children first); an empty table is left untouched, so that MariaDB can
        # bulk-insert into it.
        for table in reversed(schema.INPUT_TABLES):
            if conn.execute(select(literal(1)).select_from(table).limit(1)).first() is not None:
                conn.execute(table.delete())
        bulk = MySqlBulkLoader(conn, schema.INPUT_TABLES, method) if mysql and method != "rows" else None
        for table in schema.INPUT_TABLES:
            summary.rows[table.name] = _load_table(conn, bulk, table, data_dir, progress)
        summary.method = bulk.used if bulk is not None else "rows"


def _load_table(
    conn: Connection,
    bulk: MySqlBulkLoader | None,
    table: Table,
    data_dir: Path,
    progress: Callable[[str, int], None] | None,
) -> int:
    path = data_dir / INPUT_FILES[table.name]
    report = (lambda n: progress(table.name, n)) if progress else None
    started = time.perf_counter()
    try:
        if bulk is not None:
            count = bulk.load(table, path, progress=report)
        else:
            count = insert_rows(conn, table, read_typed_rows(path, table), progress=report)
    except IntegrityError as exc:
        located = _key_error(data_dir, table)
        raise InputFileError(located or f"{path}: {_integrity_message(table.name, str(exc.orig))}") from None
    except LoadRejected as exc:
        located = _key_error(data_dir, table) if exc.code == DUPLICATE_KEY else None
        raise InputFileError(located or _rejection_message(table.name, path, exc)) from None
    except LocalInfileRefused as exc:
        raise CardpipeError(f"the database refused LOAD DATA LOCAL INFILE ({exc})") from None
    log.info("loaded %d rows into %s in %.1f s", count, table.name, time.perf_counter() - started)
    return count


def _key_error(data_dir: Path, table: Table) -> str | None:
    """The first duplicate id or unknown parent id of ``table``'s file, in file order, as an error message
    naming file, line, column and id (None when there is none: the database refused something else)."""
    path = data_dir / INPUT_FILES[table.name]
    key = table.primary_key.columns.values()[0].name
    parents = [
        (fk.parent.name, fk.column.table, fk.column.name)
        for fk in table.foreign_keys
        if fk.column.table.name in INPUT_FILES
    ]
    try:
        parent_keys = {
            (parent.name, name): {
                row[name] for row in read_typed_rows(data_dir / INPUT_FILES[parent.name], parent, [name])
            }
            for _, parent, name in parents
        }
    except InputFileError:
        return None
    seen: dict[object, int] = {}
    try:
        for line, row in numbered_typed_rows(path, table, [key, *(name for name, _, _ in parents)]):
            value = row[key]
            if value in seen:
                return f"{path}, line {line}, column {key}: duplicate id {value} (first on line {seen[value]})"
            seen[value] = line
            for name, parent, parent_column in parents:
                ref = row[name]
                if ref is not None and ref not in parent_keys[parent.name, parent_column]:
                    return f"{path}, line {line}, column {name}: {name} {ref} is not in {INPUT_FILES[parent.name]}"
    except InputFileError:  # a malformed row before any key error: not what the database refused
        return None
    return None


def _integrity_message(table: str, text: str) -> str:
    lowered = text.lower()
    if "foreign key" in lowered:
        return f"a row references an id that is not in {_PARENTS.get(table, '')}".rstrip()
    if "unique" in lowered or "duplicate" in lowered:
        return f"duplicate id ({text.splitlines()[0]})"
    return text.splitlines()[0]


def _rejection_message(table: str, path: Path, exc: LoadRejected) -> str:
    where = str(path)
    if exc.line is not None:
        where += f", line {exc.line}" + (f", column {exc.column}" if exc.column else "")
    if exc.code == MISSING_PARENT and exc.parent:
        parent = INPUT_FILES.get(exc.parent, exc.parent)
        if exc.column and exc.value is not None:
            return f"{where}: {exc.column} {exc.value} is not in {parent}"
        return f"{where}: a row references an id that is not in {parent} ({exc})"
    if exc.code in (1062, 1452, 1216):  # duplicate key, missing parent row
        return f"{where}: {_integrity_message(table, exc.message)}"
    return f"{where}: rejected by the database ({exc.message})"
