"""CSV in and out of the serving database: typed, validated, all-or-nothing, atomic files.

Column types come from the schema (one source of truth): a CSV cell becomes the Python value its
column needs, or an :class:`~cardpipe.errors.InputFileError` naming file, line and column.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Connection, Date, DateTime, Integer, Numeric, String, Table

from cardpipe.domain.money import MoneyError, parse_money_lenient
from cardpipe.domain.records import TIMESTAMP_FORMAT
from cardpipe.errors import InputFileError

Converter = Callable[[str], Any]
CHUNK_ROWS = 20_000


def _to_int(text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        # Integers written by float-based tools ("685.0").
        value = Decimal(text)
        if value != value.to_integral_value():
            raise ValueError(f"{text!r} is not an integer") from None
        return int(value)


def _to_timestamp(text: str) -> datetime:
    return datetime.strptime(text.strip(), TIMESTAMP_FORMAT)


def _to_date(text: str) -> date:
    return date.fromisoformat(text.strip())


def _to_decimal(scale: int) -> Converter:
    if scale == 2:
        return parse_money_lenient
    quantum = Decimal(1).scaleb(-scale)

    def convert(text: str) -> Decimal:
        value = Decimal(text.strip())
        if not value.is_finite():
            raise ValueError(f"{text!r} is not finite")
        return value.quantize(quantum)

    return convert


def _to_string(length: int | None) -> Converter:
    def convert(text: str) -> str:
        if length is not None and len(text) > length:
            raise ValueError(f"longer than {length} characters")
        return text

    return convert


def converter_for(column_type: Any) -> Converter:
    """The CSV-cell parser for a schema column type."""
    if isinstance(column_type, Integer | BigInteger):
        return _to_int
    if isinstance(column_type, Numeric):
        return _to_decimal(column_type.scale or 0)
    if isinstance(column_type, DateTime):
        return _to_timestamp
    if isinstance(column_type, Date):
        return _to_date
    if isinstance(column_type, String):
        return _to_string(column_type.length)
    raise TypeError(f"no CSV converter for {column_type!r}")


def read_typed_rows(path: Path, table: Table, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the rows of ``path`` as dicts typed for ``table``.

    ``columns`` (default: all of the table's) must be in the header; extra CSV columns are ignored.
    """
    wanted = list(columns or table.columns.keys())
    if not path.is_file():
        raise InputFileError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise InputFileError(f"{path}: empty file (expected a header: {', '.join(wanted)})") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputFileError(f"{path}, line 1: unreadable header ({exc})") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise InputFileError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        plan = [
            (name, header.index(name), converter_for(table.c[name].type), table.c[name].nullable)
            for name in wanted
        ]
        width = len(header)
        line = 1
        try:
            for line, cells in enumerate(reader, start=2):  # noqa: B007 - line used in errors
                if not cells:
                    continue
                if len(cells) != width:
                    raise InputFileError(f"{path}, line {line}: {len(cells)} fields, header has {width}")
                row: dict[str, Any] = {}
                for name, index, convert, nullable in plan:
                    cell = cells[index]
                    if cell == "" and (nullable or not isinstance(table.c[name].type, String)):
                        if not nullable:
                            raise InputFileError(f"{path}, line {line}, column {name}: empty value")
                        row[name] = None
                        continue
                    try:
                        row[name] = convert(cell)
                    except (ValueError, InvalidOperation, MoneyError) as exc:
                        raise InputFileError(
                            f"{path}, line {line}, column {name}: invalid value {cell[:40]!r} ({exc})"
                        ) from None
                yield row
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputFileError(f"{path}, line {line + 1}: malformed CSV ({exc})") from None


def insert_rows(conn: Connection, table: Table, rows: Iterable[dict[str, Any]],
                progress: Callable[[int], None] | None = None) -> int:
    """Insert ``rows`` in chunks on ``conn`` (the caller owns the transaction). Returns the count."""
    total = 0
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK_ROWS:
            conn.execute(table.insert(), chunk)
            total += len(chunk)
            chunk = []
            if progress:
                progress(total)
    if chunk:
        conn.execute(table.insert(), chunk)
        total += len(chunk)
    return total


def format_cell(value: Any) -> str:
    """A value as the output files write it: money with two decimals, timestamps without 'T'."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return f"{value:.2f}" if value.as_tuple().exponent >= -2 else str(value)
    if isinstance(value, datetime):
        return value.strftime(TIMESTAMP_FORMAT)
    return str(value)


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Write a CSV to a temporary name and rename it onto ``path``. Returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            for row in rows:
                writer.writerow([format_cell(v) for v in row])
                count += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def export_table(conn: Connection, table: Table, path: Path, columns: Sequence[str] | None = None) -> int:
    """Write ``table`` to ``path`` sorted by its primary key (streamed, atomic)."""
    names = list(columns or table.columns.keys())
    query = table.select().with_only_columns(*[table.c[n] for n in names]).order_by(*table.primary_key.columns)
    result = conn.execution_options(stream_results=True, yield_per=20_000).execute(query)
    return write_csv_atomic(path, names, result)
