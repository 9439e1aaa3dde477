"""CSV in and out of the serving database: typed, validated, all-or-nothing, atomic files.

Column types come from the schema (one source of truth), the domain's value rules from
:mod:`cardpipe.domain.checks` (one definition, which the topic's decoder uses too): a CSV cell becomes the
Python value its column needs, or an :class:`~cardpipe.errors.InputFileError` naming file, physical line
(the header and quoted line breaks counted), column and value. :func:`read_typed_rows` yields Python values;
:func:`normalised_batches` accepts exactly the same cells and yields them as canonical text (what the server
stores, for ``LOAD DATA``), several times faster.

Files are read as UTF-8 with ``surrogateescape``: a byte that is not UTF-8 reaches its cell, which the text
rule refuses with the line it is on (a decoding error would name the line the reader's buffer had reached).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from operator import itemgetter
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import (
    CHAR,
    BigInteger,
    Column,
    Connection,
    Date,
    DateTime,
    Integer,
    Numeric,
    Select,
    String,
    Table,
    case,
    cast,
    func,
    type_coerce,
)

from cardpipe.domain import checks
from cardpipe.domain.checks import CheckError, Rule
from cardpipe.domain.money import parse_money_lenient
from cardpipe.domain.records import TIMESTAMP_FORMAT
from cardpipe.errors import InputFileError
from cardpipe.serving import mysql_client
from cardpipe.serving.bulk import BulkWriter
from cardpipe.serving.driver_query import DriverQuery

log = logging.getLogger(__name__)

Converter = Callable[[str], Any]
Normaliser = Callable[[str], str]
CHUNK_ROWS = 20_000
#: Signed ranges of the integer columns (MySQL INT and BIGINT; SQLite's INTEGER is 64-bit).
INT_RANGES = {"int": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: What a cell's message says when a converter raised something other than a CheckError (never its text).
_INVALID = "not a valid value"


def _int_range(column_type: Any) -> tuple[int, int]:
    return INT_RANGES["bigint" if isinstance(column_type, BigInteger) else "int"]


def _rule_of(column: Column[Any]) -> Rule | None:
    return checks.COLUMN_RULES.get(column.table.name, {}).get(column.name)


def _is_id(column: Column[Any]) -> bool:
    return column.name in checks.ID_COLUMNS and isinstance(column.type, Integer | BigInteger)


def _with_rule(convert: Converter, rule: Rule | None) -> Converter:
    if rule is None:
        return convert
    check = rule.check
    return lambda text: check(convert(text))


def _to_int(low: int, high: int, is_id: bool) -> Converter:
    parse = checks.parse_id if is_id else checks.parse_integer

    def convert(text: str) -> int:
        value = parse(text)
        if not low <= value <= high:
            raise CheckError(f"out of range [{low}, {high}]")
        return value

    return convert


def _to_decimal(scale: int, precision: int | None) -> Converter:
    if scale == 2:  # money, DECIMAL(12,2)
        return parse_money_lenient
    quantum = Decimal(1).scaleb(-scale)
    digits = (precision or 38) - scale
    limit = Decimal(10) ** digits

    def convert(text: str) -> Decimal:
        value = checks.parse_decimal(text)
        if value and value.adjusted() >= digits:  # before quantize: 1e999999 would not fit its context
            raise CheckError(f"out of range for DECIMAL({precision},{scale})")
        value = value.quantize(quantum)
        if abs(value) >= limit:
            raise CheckError(f"out of range for DECIMAL({precision},{scale})")
        return value

    return convert


def _to_timestamp(text: str) -> datetime:
    """``TIMESTAMP_FORMAT`` as ``strptime`` reads it (one-digit fields too), in ASCII digits only."""
    return checks.parse_timestamp(text, lenient=True)


def _to_string(length: int | None) -> Converter:
    check_text = checks.check_text

    def convert(text: str) -> str:
        if length is not None and len(text) > length:
            raise CheckError(f"longer than {length} characters")
        return check_text(text)

    return convert


def converter_for(column: Column[Any]) -> Converter:
    """The CSV-cell parser of a schema column: its type's conversion, then the column's domain rule."""
    kind = column.type
    if isinstance(kind, Integer | BigInteger):
        convert = _to_int(*_int_range(kind), _is_id(column))
    elif isinstance(kind, Numeric):
        convert = _to_decimal(kind.scale or 0, kind.precision)
    elif isinstance(kind, DateTime):
        convert = _to_timestamp
    elif isinstance(kind, Date):
        convert = checks.parse_date
    elif isinstance(kind, String):
        convert = _to_string(kind.length)
    else:
        raise TypeError(f"no CSV converter for {kind!r}")
    return _with_rule(convert, _rule_of(column))


@dataclass(frozen=True)
class _Column:
    name: str
    index: int  # in the CSV's header
    convert: Converter
    nullable: bool
    is_string: bool


def plan_column(column: Column[Any], index: int) -> _Column:
    """How the cells of ``column`` (at ``index`` in the header) are read."""
    return _Column(column.name, index, converter_for(column), bool(column.nullable), isinstance(column.type, String))


def _shown(cell: str) -> str:
    """A cell as an error message shows it: quoted, escapes for control characters, at most 40 characters."""
    return repr(_SURROGATE.sub("\ufffd", cell[:40])) + ("..." if len(cell) > 40 else "")


def cell_error(path: Path, line: int, column: str, cell: str, exc: Exception) -> InputFileError:
    """The error of a refused cell: file, line, column, the value and the rule's reason (never a Python
    exception's own text)."""
    reason = exc.reason if isinstance(exc, CheckError) else _INVALID
    if _SURROGATE.search(cell):  # a byte that is not UTF-8: say so, whatever the column
        reason = checks.text_problem(cell) or reason
    return InputFileError(f"{path}, line {line}, column {column}: invalid value {_shown(cell)} ({reason})")


def _record_lines(cells: Sequence[str]) -> int:
    """How many physical lines a record spans (quoted line breaks counted)."""
    return 1 + sum(len(_LINE_BREAK.findall(cell)) for cell in cells if "\n" in cell or "\r" in cell)


def _cell_line(start: int, cells: Sequence[str], index: int) -> int:
    """The physical line where ``cells[index]`` of a record starting at line ``start`` begins."""
    return start + _record_lines(cells[:index]) - 1


def _header(path: Path, reader: Any, wanted: Sequence[str]) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise InputFileError(f"{path}: empty file (expected a header: {', '.join(wanted)})") from None
    except csv.Error as exc:
        raise InputFileError(f"{path}, line 1: unreadable header (malformed CSV: {exc})") from None
    for cell in header:
        problem = checks.text_problem(cell)
        if problem is not None:
            raise InputFileError(f"{path}, line 1: unreadable header ({problem})")
    return [h.strip().lstrip("\ufeff") for h in header]


def _open_reader(path: Path, handle: Any, table: Table, wanted: Sequence[str]) -> tuple[Any, list[_Column], int]:
    """A csv reader past the header of ``path``, the plan of ``wanted`` columns and the header's width."""
    reader = csv.reader(handle, strict=True)
    header = _header(path, reader, wanted)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise InputFileError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
    plan = [plan_column(table.c[name], header.index(name)) for name in wanted]
    return reader, plan, len(header)


def _open(path: Path) -> Any:
    if not path.is_file():
        raise InputFileError(f"{path}: file not found")
    return path.open(newline="", encoding="utf-8", errors="surrogateescape")


def _row_rules(table: Table, plan: Sequence[_Column]) -> list[tuple[tuple[str, ...], Callable[..., None]]]:
    """The domain's row rules of ``table`` whose columns are all read."""
    names = {column.name for column in plan}
    return [(cols, rule) for cols, rule in checks.ROW_RULES.get(table.name, ()) if names.issuperset(cols)]


def _typed_cell(path: Path, line: int, column: _Column, cell: str) -> Any:
    """``cell`` as ``column``'s value, or the :class:`InputFileError` naming file, line and column
    (what :func:`read_typed_rows` does for each cell, inline there for speed)."""
    if cell == "" and (column.nullable or not column.is_string):
        if not column.nullable:
            raise InputFileError(f"{path}, line {line}, column {column.name}: empty value")
        return None
    try:
        return column.convert(cell)
    except (ValueError, ArithmeticError) as exc:
        raise cell_error(path, line, column.name, cell, exc) from None


def _row_error(
    path: Path, start: int, plan: Sequence[_Column], cells: Sequence[str], exc: CheckError
) -> InputFileError:
    """The error of a row rule, on the cell of the column it blames."""
    column = next(c for c in plan if c.name == exc.column)
    return cell_error(path, _cell_line(start, cells, column.index), column.name, cells[column.index], exc)


def numbered_typed_rows(
    path: Path, table: Table, columns: Sequence[str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`read_typed_rows` with the physical line each row starts on."""
    wanted = list(columns or table.columns.keys())
    with _open(path) as handle:
        reader, plan, width = _open_reader(path, handle, table, wanted)
        steps = [(c.name, c.index, c.convert, c.nullable, c.nullable or not c.is_string) for c in plan]
        row_rules = _row_rules(table, plan)
        end = reader.line_num
        try:
            for cells in reader:
                start, end = end + 1, reader.line_num
                if not cells:
                    continue
                if len(cells) != width:
                    raise InputFileError(f"{path}, line {start}: {len(cells)} fields, header has {width}")
                row: dict[str, Any] = {}
                for name, index, convert, nullable, empty_is_null in steps:
                    cell = cells[index]
                    if cell == "" and empty_is_null:
                        if not nullable:
                            line = _cell_line(start, cells, index)
                            raise InputFileError(f"{path}, line {line}, column {name}: empty value")
                        row[name] = None
                        continue
                    try:
                        row[name] = convert(cell)
                    except (ValueError, ArithmeticError) as exc:
                        raise cell_error(path, _cell_line(start, cells, index), name, cell, exc) from None
                for _names, rule in row_rules:
                    try:
                        rule(row)
                    except CheckError as exc:
                        raise _row_error(path, start, plan, cells, exc) from None
                yield start, row
        except csv.Error as exc:
            raise InputFileError(f"{path}, line {end + 1}: malformed CSV ({exc})") from None


def read_typed_rows(path: Path, table: Table, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the rows of ``path`` as dicts typed for ``table``.

    ``columns`` (default: all of the table's) must be in the header; extra CSV columns are ignored.
    """
    for _line, row in numbered_typed_rows(path, table, columns):
        yield row


# --- canonical text, for bulk loads -----------------------------------------------------------------
# A normaliser turns a CSV cell into the text the server stores for it: a canonical cell is returned as
# it is (after validation), anything else goes through the column's converter (the same one
# read_typed_rows uses, so both accept exactly the same cells) and is formatted. Empty text stands for
# NULL in nullable columns (the bulk loaders turn it back into NULL).

_ID_TEXT = re.compile(r"(?=[0-9]*[1-9])[0-9]{1,18}")  # a positive BIGINT
_INT_TEXT = re.compile(r"-?[0-9]{1,18}")  # always within BIGINT
_SMALL_INT_TEXT = re.compile(r"-?[0-9]{1,9}")  # always within INT
_MONEY_TEXT = re.compile(r"-?[0-9]{1,10}(?:\.[0-9]{1,2})?")  # DECIMAL(12,2) exactly, no rounding
_TIMESTAMP_TEXT = checks.CANONICAL_TIMESTAMP  # TIMESTAMP_FORMAT
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _values_of(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A dict row's values for ``names``, in that order, as a tuple."""
    getter = itemgetter(*names)
    return (lambda row: (getter(row),)) if len(names) == 1 else getter


def _plain_decimal(value: Decimal) -> str:
    return format(value, "f")


def _canonical_int(column: Column[Any]) -> re.Pattern[str]:
    if _is_id(column):
        return _ID_TEXT
    return _INT_TEXT if isinstance(column.type, BigInteger) else _SMALL_INT_TEXT


def normaliser_for(column: Column[Any]) -> Normaliser:
    """The CSV-cell -> canonical text function of a schema column (non-empty cells)."""
    kind = column.type
    convert = converter_for(column)
    rule = _rule_of(column)
    check: Callable[[Any], Any] = rule.check if rule is not None else (lambda value: value)
    if isinstance(kind, Integer | BigInteger):
        canonical = _canonical_int(column).fullmatch

        def normalise_int(text: str) -> str:
            if canonical(text):
                check(int(text))
                return text
            return str(convert(text))

        return normalise_int
    if isinstance(kind, Numeric) and (kind.scale or 0) == 2:
        money = _MONEY_TEXT.fullmatch

        def normalise_money(text: str) -> str:
            if money(text):
                check(Decimal(text))
                return text
            return _plain_decimal(convert(text))

        return normalise_money
    if isinstance(kind, Numeric):
        return lambda text: _plain_decimal(convert(text))
    if isinstance(kind, DateTime):
        timestamp = _TIMESTAMP_TEXT.fullmatch
        parse = checks.parse_timestamp

        def normalise_timestamp(text: str) -> str:
            if timestamp(text):
                parse(text)  # validates the date and time; equals the converter's reading of this form
                return text
            return convert(text).isoformat(" ")

        return normalise_timestamp
    if isinstance(kind, Date):
        day = _DATE_TEXT.fullmatch

        def normalise_date(text: str) -> str:
            if day(text):
                checks.parse_date(text)
                return text
            return convert(text).isoformat()

        return normalise_date
    if isinstance(kind, String):

        def normalise_string(text: str) -> str:
            convert(text)  # length, text and rule
            return text

        return normalise_string
    raise TypeError(f"no CSV normaliser for {kind!r}")


def _nullable(normalise: Normaliser) -> Normaliser:
    return lambda text: text and normalise(text)


@dataclass
class NormalisedBatch:
    """Rows of canonical text (``""`` = NULL in nullable columns) and the CSV line of each row."""

    rows: list[Sequence[str]] = field(default_factory=list)
    lines: Sequence[int] = field(default_factory=lambda: array("q"))  # a range when they follow each other


@dataclass(frozen=True)
class _Plan:
    """What :func:`_normalise_batch` needs to know about a file and its table."""

    path: Path
    width: int
    columns: Sequence[_Column]
    steps: Sequence[tuple[int, Normaliser]]
    checks: Sequence[_ColumnCheck | None]
    row_rules: Sequence[tuple[tuple[str, ...], Callable[..., None]]]


def normalised_batches(
    path: Path, table: Table, columns: Sequence[str] | None = None, batch_rows: int = 500
) -> Iterator[NormalisedBatch]:
    """The rows of ``path`` as canonical text for ``table``, in batches of ``batch_rows``.

    Accepts and rejects exactly the cells :func:`read_typed_rows` does, with the same errors (file,
    line, column), and gives the text of the values it would give.

    A batch is checked column by column first (C-level loops: a regular expression over a column,
    ``max(map(len, ...))``, one search for control characters in a column's joined text, a rule's
    ``min``/``max`` or set inclusion); only a column with an unusual cell goes through the per-cell normaliser,
    and only a batch with a bad cell (or a short, long or blank record) through the row-by-row path
    that finds the first error in file order. Small batches are faster: fewer objects alive at once
    for the garbage collector to walk.
    """
    wanted = list(columns or table.columns.keys())
    with _open(path) as handle:
        reader, columns_plan, width = _open_reader(path, handle, table, wanted)
        steps = []
        for column in columns_plan:
            normalise = normaliser_for(table.c[column.name])
            if column.nullable:
                normalise = _nullable(normalise)
            elif not column.is_string:
                normalise = _non_empty(normalise)
            steps.append((column.index, normalise))
        plan = _Plan(
            path,
            width,
            columns_plan,
            steps,
            [_column_check(table.c[column.name]) for column in columns_plan],
            _row_rules(table, columns_plan),
        )
        raw: list[list[str]] = []
        first_line = reader.line_num + 1
        try:
            for cells in reader:
                raw.append(cells)
                if len(raw) >= batch_rows:
                    batch = _normalise_batch(plan, raw, first_line, reader.line_num)
                    raw, first_line = [], reader.line_num + 1
                    if batch.rows:
                        yield batch
        except csv.Error as exc:
            _normalise_batch(plan, raw, first_line, None)  # an earlier bad cell comes first
            line = first_line + sum(map(_record_lines, raw))
            raise InputFileError(f"{path}, line {line}: malformed CSV ({exc})") from None
        if raw:
            batch = _normalise_batch(plan, raw, first_line, reader.line_num)
            if batch.rows:
                yield batch


class _Unusual(Exception):
    """A column holds a cell the column-wide check does not accept: use the per-cell normaliser."""


#: Raises (_Unusual or ValueError) unless every cell of a column is canonical and valid.
_ColumnCheck = Callable[[Sequence[str]], None]


def _regex_check(pattern: re.Pattern[str], rule: Rule | None, parse: Callable[[str], Any]) -> _ColumnCheck:
    match = pattern.fullmatch
    holds = rule.holds_for_all if rule is not None else None

    def check(values: Sequence[str]) -> None:
        if not all(map(match, values)) or holds is not None and not holds(map(parse, filter(None, values))):
            raise _Unusual

    return check


def _column_check(column: Column[Any]) -> _ColumnCheck | None:
    """The whole-column check of a column: passes when every cell is canonical and valid."""
    kind, nullable, rule = column.type, bool(column.nullable), _rule_of(column)
    optional = (lambda pattern: f"(?:{pattern})?") if nullable else (lambda pattern: pattern)
    if isinstance(kind, Integer | BigInteger):
        return _regex_check(re.compile(optional(_canonical_int(column).pattern)), rule, int)
    if isinstance(kind, Numeric) and (kind.scale or 0) == 2:
        return _regex_check(re.compile(optional(_MONEY_TEXT.pattern)), rule, Decimal)
    if isinstance(kind, DateTime | Date) and not nullable:
        shape = _TIMESTAMP_TEXT.fullmatch if isinstance(kind, DateTime) else _DATE_TEXT.fullmatch
        parse = datetime.fromisoformat if isinstance(kind, DateTime) else date.fromisoformat

        def check_time(values: Sequence[str]) -> None:
            if not all(map(shape, values)):
                raise _Unusual
            deque(map(parse, values), maxlen=0)  # validates every date and time (ValueError: unusual)

        return check_time
    if isinstance(kind, String):
        length = kind.length or 0
        forbidden = checks.FORBIDDEN_IN_TEXT.search
        holds = rule.holds_for_all if rule is not None else None

        def check_text(values: Sequence[str]) -> None:
            if (
                length
                and max(map(len, values), default=0) > length
                or forbidden("".join(values))
                or holds is not None
                and not holds(filter(None, values) if nullable else values)
            ):
                raise _Unusual

        return check_text
    return None


def _row_rules_hold(plan: _Plan, rows: Sequence[Sequence[str]]) -> bool:
    """Whether the row rules hold for ``rows`` of canonical text."""
    for names, rule in plan.row_rules:
        positions = [
            (name, i, plan.columns[i].convert) for name in names for i, c in enumerate(plan.columns) if c.name == name
        ]
        for row in rows:
            try:
                rule({name: convert(row[i]) for name, i, convert in positions})
            except (ValueError, ArithmeticError):
                return False
    return True


def _normalise_batch(plan: _Plan, raw: list[list[str]], first_line: int, last_line: int | None) -> NormalisedBatch:
    """Normalise ``raw`` (the records from physical line ``first_line`` to ``last_line``): column-wise when it
    can, else row by row."""
    width, steps = plan.width, plan.steps
    single_lines = last_line is not None and last_line - first_line + 1 == len(raw)
    if raw and single_lines and set(map(len, raw)) == {width}:
        try:
            changed: list[tuple[int, list[str]]] = []
            for position, ((index, normalise), check) in enumerate(zip(steps, plan.checks, strict=True)):
                values = list(map(itemgetter(index), raw))
                if check is not None:
                    try:
                        check(values)
                        continue
                    except (_Unusual, ValueError):
                        pass
                normalised = list(map(normalise, values))
                if normalised != values:
                    changed.append((position, normalised))
            indices = [index for index, _ in steps]
            if indices == list(range(width)):
                rows: list[Any] = raw  # the records themselves (lists): most batches change nothing
            else:
                rows = [[cells[i] for i in indices] for cells in raw]
            for position, normalised in changed:
                for row, value in zip(rows, normalised, strict=True):
                    row[position] = value
            if not plan.row_rules or _row_rules_hold(plan, rows):
                return NormalisedBatch(rows, range(first_line, first_line + len(raw)))
        except Exception:  # a bad cell: the row-by-row path below names the first one in file order
            pass
    batch = NormalisedBatch()
    lines = array("q")
    batch.lines = lines
    next_line = first_line
    for cells in raw:
        line, next_line = next_line, next_line + _record_lines(cells)
        try:
            row = [normalise(cells[index]) for index, normalise in steps]
        except Exception:  # diagnosed below (or re-raised)
            if not cells:
                continue
            if len(cells) != width:
                raise InputFileError(f"{plan.path}, line {line}: {len(cells)} fields, header has {width}") from None
            _diagnose(plan, line, cells)
            raise
        if len(cells) != width:
            raise InputFileError(f"{plan.path}, line {line}: {len(cells)} fields, header has {width}")
        if plan.row_rules and not _row_rules_hold(plan, [row]):
            _diagnose(plan, line, cells)
        batch.rows.append(row)
        lines.append(line)
    return batch


def _non_empty(normalise: Normaliser) -> Normaliser:
    def checked(text: str) -> str:
        if text == "":
            raise ValueError("empty value")
        return normalise(text)

    return checked


def _diagnose(plan: _Plan, line: int, cells: Sequence[str]) -> None:
    """Raise the :class:`InputFileError` of the first bad cell of a row the fast path refused."""
    row: dict[str, Any] = {}
    for column, (index, normalise) in zip(plan.columns, plan.steps, strict=True):
        cell = cells[index]
        # The reference: raises the same error read_typed_rows does.
        row[column.name] = _typed_cell(plan.path, _cell_line(line, cells, index), column, cell)
        try:
            normalise(cell)
        except (ValueError, ArithmeticError) as exc:
            raise cell_error(plan.path, _cell_line(line, cells, index), column.name, cell, exc) from None
    for _names, rule in plan.row_rules:
        try:
            rule(row)
        except CheckError as exc:
            raise _row_error(plan.path, line, plan.columns, cells, exc) from None


def insert_rows(
    conn: Connection, table: Table, rows: Iterable[dict[str, Any]], progress: Callable[[int], None] | None = None
) -> int:
    """Insert ``rows`` in chunks on ``conn`` (the caller owns the transaction). Returns the count.

    Every row has the keys of the first (as :func:`read_typed_rows` yields them); the chunks go to
    :class:`~cardpipe.serving.bulk.BulkWriter` as tuples (the dialect's own value conversion, a column at
    a time), about 3x less CPU than SQLAlchemy's per-row parameter processing.
    """
    total = 0
    writer: BulkWriter | None = None
    values: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        if values is None:
            names = tuple(row)
            writer = BulkWriter(conn.dialect, table, names)
            values = _values_of(names)
        chunk.append(values(row))
        if len(chunk) >= CHUNK_ROWS:
            writer.write(conn, chunk)  # type: ignore[union-attr]
            total += len(chunk)
            chunk = []
            if progress:
                progress(total)
    if chunk:
        writer.write(conn, chunk)  # type: ignore[union-attr]
        total += len(chunk)
    return total


def _format_decimal(value: Decimal) -> str:
    return f"{value:.2f}" if value.as_tuple().exponent >= -2 else str(value)  # type: ignore[operator]


def _format_datetime(value: datetime) -> str:
    # isoformat is several times faster than strftime and gives the same text from year 1000 on.
    return value.isoformat(" ", "seconds") if value.year >= 1000 else value.strftime(TIMESTAMP_FORMAT)


def _format_none(_value: None) -> str:
    return ""


#: Exact type -> formatter: one dict lookup per cell instead of a chain of isinstance checks.
_FORMATTERS: dict[type, Callable[[Any], str]] = {
    type(None): _format_none,
    Decimal: _format_decimal,
    datetime: _format_datetime,
    int: str,
    str: str,
}


def format_cell(value: Any) -> str:
    """A value as the output files write it: money with two decimals, timestamps without 'T'."""
    formatter = _FORMATTERS.get(type(value))
    if formatter is not None:
        return formatter(value)
    if isinstance(value, Decimal):
        return _format_decimal(value)
    if isinstance(value, datetime):
        return value.strftime(TIMESTAMP_FORMAT)
    return str(value)


_WRITE_CHUNK = 10_000
_WRITTEN_AS_IS = frozenset({int, str, type(None)})  # the csv module writes these as format_cell would


def _write_chunk(writer: Any, rows: list[Sequence[Any]]) -> int:
    """Format ``rows`` a column at a time (only columns that need it) and write them."""
    if not rows:
        return 0
    columns: list[Iterable[Any]] = []
    for column in zip(*rows, strict=True):
        if set(map(type, column)) <= _WRITTEN_AS_IS:
            columns.append(column)
        else:
            columns.append(map(format_cell, column))
    writer.writerows(zip(*columns, strict=True))
    return len(rows)


def write_csv_atomic(
    path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]], *, chunks: Iterable[Sequence[Sequence[Any]]] = ()
) -> int:
    """Write a CSV to a temporary name and rename it onto ``path``. Returns the row count.

    ``rows`` are formatted by :func:`format_cell` where needed; ``chunks`` (lists of rows, written after
    ``rows``) must hold only ``int``, ``str`` and ``None`` cells, which go to the CSV writer as they are.
    """
    count = 0
    with _written_atomically(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        chunk: list[Sequence[Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == _WRITE_CHUNK:
                count += _write_chunk(writer, chunk)
                chunk = []
        count += _write_chunk(writer, chunk)
        for ready in chunks:
            writer.writerows(ready)
            count += len(ready)
    return count


@contextmanager
def _written_atomically(path: Path) -> Iterator[TextIO]:
    """A text file (UTF-8, no newline translation) written under a temporary name and renamed onto ``path`` when
    the block ends without an error; removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_table(conn: Connection, table: Table, path: Path, columns: Sequence[str] | None = None) -> int:
    """Write ``table`` to ``path`` sorted by its primary key (streamed, atomic).

    Money and timestamps are formatted by the database (:func:`exported_text`) as :func:`format_cell` would:
    no Decimal or datetime is built per cell only to be turned back into text (about half the time of
    exporting a million stream results). When every column then reads as an integer or a text, the
    fetched rows go to the CSV writer a whole ``fetchmany`` at a time, untouched (a fifth less time again).
    """
    names = list(columns or table.columns.keys())
    selected = [exported_text(table.c[n], conn.dialect.name) for n in names]
    query = table.select().with_only_columns(*selected).order_by(*table.primary_key.columns)
    result = conn.execution_options(stream_results=True, yield_per=_WRITE_CHUNK).execute(query)
    if all(isinstance(column.type, Integer | String) for column in selected):
        return write_csv_atomic(path, names, (), chunks=result.partitions())
    return write_csv_atomic(path, names, result)


#: The characters that make a CSV field quoted (a bracket expression both MariaDB and MySQL 8 read alike).
_NEEDS_QUOTES = '[,"\r\n]'


def export_table_lines(conn: Connection, table: Table, path: Path, columns: Sequence[str] | None = None) -> int:
    """MySQL/MariaDB: :func:`export_table` with every line of the file rendered by the server, in the format of
    the embedded engine's CSV writer (:func:`cardpipe.batch.embedded.csv_field`): free text quoted when it holds a
    comma, a double quote or a line break (a carriage return too), the rules' codes
    (:data:`~cardpipe.domain.records.CODE_COLUMNS`) as they are, money and timestamps as :func:`exported_text` writes
    them, NULL empty. The server's command-line client writes the lines where it can
    (:func:`~cardpipe.serving.mysql_client.write_lines`: ranges of the key at once); else Python fetches one
    text per row, unbuffered, on the driver's cursor (no ``Row`` each,
    :class:`~cardpipe.serving.driver_query.DriverQuery`), and writes it. Either is several times faster than
    fetching the columns (the driver parses every value in Python) or than DuckDB's MySQL scanner.
    """
    names = list(columns or table.columns.keys())
    statement, key = _lines_statement(conn, table, names)
    if key is not None:
        written = mysql_client.write_lines(conn, statement, key, path, (",".join(names) + "\n").encode())
        if written is not None:
            return written
    query = DriverQuery(statement)
    count = 0
    with _written_atomically(path) as handle:
        handle.write(",".join(names) + "\n")
        for chunk in query.chunks(conn, chunk=_WRITE_CHUNK):
            handle.write("\n".join([row[0] for row in chunk]))
            handle.write("\n")
            count += len(chunk)
    return count


def _lines_statement(conn: Connection, table: Table, names: Sequence[str]) -> tuple[Select[Any], Any]:
    """The statement of :func:`export_table_lines` (one rendered line per row, ordered by the primary key), and
    that key when it is one integer column (else None: the command-line client is not used, it reads ranges of
    the key)."""
    from cardpipe.domain.records import CODE_COLUMNS

    dialect = conn.dialect.name
    fields = []
    for name in names:
        column = table.c[name]
        # The server's work per row is the file's cost: no CAST where CONCAT_WS converts a value to the same text
        # itself (a DECIMAL(p,2) and a DATETIME on MySQL/MariaDB, as exported_text's CAST AS CHAR does), no
        # COALESCE of a column that is never NULL, one regular expression per text, not an INSTR per character.
        value = column if dialect in ("mysql", "mariadb") else exported_text(column, dialect)
        if isinstance(column.type, String) and name not in CODE_COLUMNS:
            needs_quotes = value.regexp_match(_NEEDS_QUOTES)
            value = case((needs_quotes, func.concat('"', func.replace(value, '"', '""'), '"')), else_=value)
        fields.append(func.coalesce(value, "") if column.nullable else value)  # CONCAT_WS skips NULLs: empty instead
    line = type_coerce(func.concat_ws(",", *fields), String).label("line")
    statement = table.select().with_only_columns(line).order_by(*table.primary_key.columns)
    key = list(table.primary_key.columns)
    return statement, key[0] if len(key) == 1 and isinstance(key[0].type, Integer) else None


def exported_text(column: Any, dialect: str) -> Any:
    """``column`` as text in the output files' format, computed in SQL, where the dialect allows it:

    * money, DECIMAL(p,2): two decimals. MySQL's CAST of a DECIMAL(p,2) to CHAR is that text. SQLite keeps
      such a value as an INTEGER or a REAL (NUMERIC affinity); ``printf('%.2f')`` of the nearest double
      gives the exact cents for every amount DECIMAL(12,2) holds (at most 15 significant digits);
    * DATETIME: ``YYYY-MM-DD HH:MM:SS``. MySQL's CAST of a DATETIME(0) to CHAR is that text; SQLite keeps
      SQLAlchemy's ``YYYY-MM-DD HH:MM:SS.ffffff``, whose first 19 characters it is.

    NULL stays NULL (an empty cell). Other columns and dialects are read as they are and formatted by
    :func:`format_cell`.
    """
    kind = column.type
    text: Any
    if isinstance(kind, Numeric) and not isinstance(kind, (Integer, BigInteger)) and kind.scale == 2:
        if dialect == "sqlite":
            text = case((column.is_(None), None), else_=func.printf("%.2f", column))
        elif dialect in ("mysql", "mariadb"):
            text = cast(column, CHAR)
        else:
            return column
    elif isinstance(kind, DateTime):
        if dialect == "sqlite":
            text = func.substr(column, 1, 19)
        elif dialect in ("mysql", "mariadb") and not getattr(kind, "fsp", None):
            text = cast(column, CHAR)
        else:
            return column
    else:
        return column
    return type_coerce(text, String).label(column.name)
