"""Fuzzing the loader with bad rows (issue 12): never a traceback, never a partial load.

Each generated row breaks exactly one rule by construction (a value of the wrong kind or out of its rule's
range, a control character, a byte that is not UTF-8, a wrong field count, a card type's minimum above its
maximum) and sits among good rows of the bundled sample. Both readers (typed rows, and the bulk path's
canonical text) must refuse it with the same one-line error naming the file and its physical line; a load
through ``load_inputs`` must fail with that error and leave the tables as they were. 200 examples of 50 rows:
10,000 bad rows.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import make_url

from cardpipe.domain.checks import MAX_ID, TRANSACTION_TYPES
from cardpipe.errors import InputFileError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import normalised_batches, read_typed_rows
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs

SAMPLE = Path(__file__).resolve().parents[2] / "cardpipe" / "sample_data"
ROWS_PER_EXAMPLE = 50
EXAMPLES = 200


def _read(name: str) -> list[list[str]]:
    with (SAMPLE / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


SAMPLE_ROWS = {table.name: _read(table.name) for table in schema.INPUT_TABLES}

# Column -> kind of value it holds.
KIND = {
    "customer_id": "id",
    "card_type_id": "id",
    "card_id": "id",
    "transaction_id": "id",
    "related_transaction_id": "optional_id",
    "credit_score": "score",
    "credit_score_min": "score",
    "credit_score_max": "score",
    "annual_income": "non_negative_money",
    "annual_fee": "non_negative_money",
    "credit_limit_min": "positive_money",
    "credit_limit_max": "positive_money",
    "credit_limit": "positive_money",
    "current_balance": "money",
    "amount": "money",
    "rewards_rate": "rate",
    "timestamp": "timestamp",
    "issue_date": "date",
    "expiration_date": "expiration",
    "transaction_type": "type",
}

# Values that are not numbers of any kind in any column that holds numbers, dates or times.
ascii_letters = st.from_regex(r"[a-zA-Z][a-zA-Z0-9 ]{0,6}", fullmatch=True).filter(
    lambda t: t.strip().lower() not in ("nan", "inf", "infinity", "snan") and not t.strip().lower().startswith("e")
)
other_script_digits = st.text(
    st.characters(categories=["Nd"]).filter(lambda c: not c.isascii()), min_size=1, max_size=4
)
not_a_number = st.one_of(
    ascii_letters,
    other_script_digits,
    st.from_regex(r"[1-9]_[0-9]{3}(\.[0-9]{2})?", fullmatch=True),  # 1_000.00: int() and Decimal() take it
    st.sampled_from(["NaN", "nan", "Infinity", "-inf", "sNaN", "1,000", "$5", "1.2.3", "--1", "1e", "0x10", "½"]),
    st.tuples(st.integers(0, 999), st.characters(categories=["Cc"]), st.integers(0, 99)).map(
        lambda p: f"{p[0]}{p[1]}{p[2]}"
    ),
    st.integers(0, 999).map(lambda n: f"\udce9{n}"),  # a Latin-1 byte before the digits
)
control = st.characters(categories=["Cc"])
bad_byte = st.integers(0x80, 0xFF).map(lambda b: chr(0xDC00 + b))  # written as the raw byte (surrogateescape)
BAD: dict[str, st.SearchStrategy[str]] = {
    "id": st.one_of(
        not_a_number,
        st.integers(-(2**70), 0).map(str),
        st.integers(MAX_ID + 1, 2**80).map(str),
        st.integers(1, 10**6).map(lambda n: f"+{n}"),
        st.integers(1, 10**6).map(lambda n: f"{n}.5"),
        st.just(""),
    ),
    "score": st.one_of(
        not_a_number,
        st.integers(-(10**6), 299).map(str),
        st.integers(851, 10**15).map(str),
        st.just(""),
    ),
    "money": st.one_of(
        not_a_number,
        st.integers(10**10, 10**15).map(lambda n: str(n * (1 if n % 2 else -1))),  # beyond DECIMAL(12,2)
        st.just(""),
    ),
    "rate": st.one_of(not_a_number, st.integers(1, 10**6).map(lambda n: f"-0.{n}"), st.just("1000")),
    "timestamp": st.one_of(
        not_a_number,
        st.tuples(st.integers(13, 99), st.integers(1, 28)).map(lambda p: f"2025-{p[0]:02d}-{p[1]:02d} 00:00:00"),
        st.tuples(st.integers(1, 12), st.integers(32, 99)).map(lambda p: f"2025-{p[0]:02d}-{p[1]:02d} 10:00:00"),
        st.sampled_from(["2025-02-29 00:00:00", "2025-04-31 00:00:00", "2025-04-01 24:00:00", "2025-04-01 00:60:00"]),
        st.sampled_from(["2025-04-01T00:00:00", "2025-04-01", "2025/04/01 00:00:00", "01-04-2025 00:00:00"]),
        st.just("２０２５-04-01 00:00:00"),
        st.just(""),
    ),
    "date": st.one_of(
        not_a_number,
        st.sampled_from(["2023-02-29", "2023-13-01", "2023-00-10", "2023-04-31", "20230101", "2023-1-3", ""]),
    ),
    "expiration": st.one_of(
        st.integers(13, 99).map(lambda m: f"{m}/27"),
        st.sampled_from(["00/26", "5/26", "05-26", "0526", "", "May 26"]),
        st.tuples(st.sampled_from(["05/2", "1"]), control).map("".join),
    ),
    "type": st.one_of(
        st.text(max_size=12).filter(lambda t: t not in TRANSACTION_TYPES),
        st.sampled_from(sorted(TRANSACTION_TYPES)).map(str.upper),
        st.sampled_from(sorted(TRANSACTION_TYPES)).map(lambda t: t + " "),
    ),
}
BAD["optional_id"] = BAD["id"].filter(lambda text: text != "")
BAD["positive_money"] = st.one_of(
    BAD["money"], st.integers(-(10**11) + 1, 0).map(lambda c: f"{c // 100}.{abs(c) % 100:02d}"), st.just("-0.00")
)
BAD["non_negative_money"] = st.one_of(BAD["money"], st.integers(1, 10**11).map(lambda c: f"-{c // 100}.{c % 100:02d}"))


@st.composite
def bad_text(draw: st.DrawFn, length: int | None) -> str:
    """Text with a control character or a byte that is not UTF-8 inside, or longer than its column allows."""
    base = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cc",)), max_size=10))
    if length is not None and draw(st.booleans()):
        return base + "x" * (length + 1 - len(base)) if len(base) <= length else base
    bad = draw(st.one_of(control, bad_byte))
    at = draw(st.integers(0, len(base)))
    return base[:at] + bad + base[at:]


@dataclass
class BadRow:
    table: str
    rows: list[list[str]]  # header first; the bad record at ``position``
    position: int  # 1-based index among the records after the header
    column: str | None  # None: a record-level error (field count, malformed CSV)


@st.composite
def bad_rows(draw: st.DrawFn) -> BadRow:
    table = draw(st.sampled_from([t.name for t in schema.INPUT_TABLES]))
    header, *sample = SAMPLE_ROWS[table]
    good = draw(st.lists(st.sampled_from(sample), min_size=1, max_size=6, unique_by=lambda r: r[0]))
    good = [list(row) for row in good]
    position = draw(st.integers(1, len(good)))
    row = good[position - 1]
    how = draw(st.sampled_from(["cell"] * 8 + ["fields", "order"] * (table == "credit_card_types") + ["fields"]))
    column: str | None = None
    if how == "fields":
        extra = draw(st.integers(1, 3))
        row[:] = row[:-extra] if draw(st.booleans()) else [*row, *[""] * extra]
    elif how == "order":  # a card type's minimum above its maximum
        low, high = draw(
            st.sampled_from([("credit_score_min", "credit_score_max"), ("credit_limit_min", "credit_limit_max")])
        )
        maximum = row[header.index(high)]
        row[header.index(low)] = str(int(float(maximum)) + draw(st.integers(1, 50)))
        column = low
    else:
        column = draw(st.sampled_from(header))
        sql_type = schema.TABLES_BY_NAME[table].c[column].type
        kind = KIND.get(column, "text")
        value = draw(bad_text(getattr(sql_type, "length", None)) if kind == "text" else BAD[kind])
        row[header.index(column)] = value
    # Good rows are distinct sample rows (unique ids), so the bad value is the only fault.
    return BadRow(table, [header, *good], position, column)


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(rows)  # a lone \r too


def refusal(path: Path, table: str) -> str:
    """The readers' error for ``path``: both give the same, as an InputFileError (never another exception)."""
    with pytest.raises(InputFileError) as typed:
        list(read_typed_rows(path, schema.TABLES_BY_NAME[table]))
    with pytest.raises(InputFileError) as fast:
        list(normalised_batches(path, schema.TABLES_BY_NAME[table], batch_rows=4))
    assert str(fast.value) == str(typed.value)
    return str(typed.value)


def check_message(message: str, path: Path, bad: BadRow) -> None:
    line = 1 + bad.position  # single-line records before it: quoted line breaks only occur in bad cells
    assert "\n" not in message and "Traceback" not in message and "decimal." not in message, message
    if bad.column is None:
        assert message.startswith(f"{path}, line {line}: "), message
        assert "fields, header has" in message, message
    else:
        assert message.startswith(f"{path}, line {line}, column {bad.column}: "), message
        assert ": invalid value " in message or message.endswith(": empty value"), message


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Any:
    """A SQLite serving database holding the sample, and a data folder to spoil one file of."""
    folder = tmp_path_factory.mktemp("fuzz")
    engine = make_engine(make_url(f"sqlite:///{folder}/serving.db"))
    create_clean_schema(engine)
    data = folder / "data"
    shutil.copytree(SAMPLE, data)
    load_inputs(engine, data)
    yield engine, data, contents(engine)
    engine.dispose()


def contents(engine: Any) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
            for t in schema.INPUT_TABLES
        }


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(bad_rows(), min_size=ROWS_PER_EXAMPLE, max_size=ROWS_PER_EXAMPLE))
def test_bad_rows_are_refused_with_their_line_and_never_load_partially(loaded, tmp_path_factory, batch):
    engine, data, before = loaded
    work = tmp_path_factory.mktemp("rows", numbered=True)
    for number, bad in enumerate(batch):
        path = work / f"{number}-{bad.table}.csv"
        write_rows(path, bad.rows)
        check_message(refusal(path, bad.table), path, bad)
    # The first of them through a whole load: the same error, and the tables as they were.
    bad = batch[0]
    target = data / f"{bad.table}.csv"
    write_rows(target, bad.rows)
    try:
        with pytest.raises(InputFileError) as refused:
            load_inputs(engine, data)
        check_message(str(refused.value), target, bad)
        assert contents(engine) == before
    finally:
        shutil.copy(SAMPLE / f"{bad.table}.csv", target)
    shutil.rmtree(work)
