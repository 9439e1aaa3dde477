"""CSV cells: fast paths agree with the reference parsers; the domain's value rules refuse what no issuer
would write, with file, physical line, column and value (issue 12)."""

import csv
import random
import re
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from cardpipe.domain.records import TIMESTAMP_FORMAT
from cardpipe.errors import InputFileError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import _to_timestamp, normalised_batches, read_typed_rows
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from tests.reference import PEER_DATASETS_DIR

SAMPLE = Path(__file__).resolve().parents[2] / "cardpipe" / "sample_data"


def _reference(text: str) -> datetime | str:
    if not text.isascii():  # strptime's \d takes other scripts' digits: plain ASCII only
        return "invalid"
    try:
        return datetime.strptime(text.strip(), TIMESTAMP_FORMAT)
    except ValueError:
        return "invalid"


def _fast(text: str) -> datetime | str:
    try:
        return _to_timestamp(text)
    except ValueError:
        return "invalid"


@pytest.mark.parametrize(
    "text",
    [
        "2024-02-29 23:59:59",
        "2023-02-29 10:00:00",
        "2024-13-01 00:00:00",
        "2024-00-10 00:00:00",
        "2024-04-31 00:00:00",
        "2024-01-01 24:00:00",
        "2024-01-01 23:60:00",
        "2024-01-01 23:59:60",
        "0001-01-01 00:00:00",
        "0000-01-01 00:00:00",
        "9999-12-31 23:59:59",
        " 2024-01-05 01:02:03 ",
        "2024-1-5 1:2:3",
        "2024-01-05T01:02:03",
        "2024-01-05 01:02:03.5",
        "2024-01-05",
        "\uff12024-01-05 01:02:03",
        "2024-01-05 01:02:03+01:00",
        "",
    ],
)
def test_timestamp_fast_path_agrees_with_strptime_on_edges(text):
    assert _fast(text) == _reference(text)


def test_timestamp_fast_path_agrees_with_strptime_on_random_canonical_texts():
    rnd = random.Random(11)
    texts = []
    for _ in range(20_000):
        y, mo, d, h, mi, s = (rnd.randrange(n) for n in (10_000, 14, 33, 26, 62, 62))
        texts.append(f"{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}")
    results = [(_fast(t), _reference(t)) for t in texts]
    assert all(fast == ref for fast, ref in results)
    assert sum(ref != "invalid" for _, ref in results) > 1_000  # both kinds are exercised


# --- issue 12: values no issuer would write ------------------------------------------------------------------


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _write(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def _both_readers_refuse(path: Path, table) -> str:
    """The error of both readers (the typed rows and the bulk path's canonical text): the same one line."""
    with pytest.raises(InputFileError) as typed:
        list(read_typed_rows(path, table))
    for batch_rows in (500, 3):
        with pytest.raises(InputFileError) as fast:
            list(normalised_batches(path, table, batch_rows=batch_rows))
        assert str(fast.value) == str(typed.value)
    message = str(typed.value)
    assert "\n" not in message and "decimal." not in message and "Conversion" not in message
    return message


# (file, data row index, column, bad value, expected reason): the issue's list and the rules' neighbours.
ISSUE_VALUES = [
    ("cards", 5, "credit_limit", "-5000.00", "not above 0"),
    ("cards", 5, "credit_limit", "0", "not above 0"),
    ("customers", 3, "credit_score", "-700", r"not within 300\.\.850"),
    ("customers", 3, "credit_score", "851", r"not within 300\.\.850"),
    ("credit_card_types", 1, "credit_limit_min", "6000", "above credit_limit_max 5000"),
    ("transactions", 7, "transaction_id", "-3", "not a positive integer"),
    ("transactions", 7, "card_id", "0", "not a positive integer"),
    ("transactions", 7, "transaction_type", "teleport", "not one of atm_withdrawal, "),
    ("transactions", 7, "amount", "1_000.00", "not a plain decimal number"),
    ("transactions", 7, "amount", "\u0661\u0660\u0660.00", "not a plain decimal number"),
    ("transactions", 7, "transaction_id", "\u0663\u0663", "not a positive integer"),
    ("transactions", 7, "merchant_name", "Bell\x07 Inc", "not plain text: control character U\\+0007"),
    ("customers", 3, "address", "1 Main St\x1b[0m, NY 10001", "not plain text: control character U\\+001B"),
    ("transactions", 7, "amount", "99999999999.00", r"out of range for DECIMAL\(12,2\)"),
    ("transactions", 7, "timestamp", "2025-02-29 10:00:00", "not a real date and time"),
    ("cards", 5, "issue_date", "2023-02-30", "not a real date"),
    ("cards", 5, "expiration_date", "13/27", "not MM/YY"),
    ("credit_card_types", 2, "rewards_rate", "abc", "not a plain decimal number"),
]


@pytest.mark.parametrize("name, index, column, value, reason", ISSUE_VALUES)
def test_values_no_issuer_would_write_are_refused_naming_file_line_column_and_value(
    tmp_path, name, index, column, value, reason
):
    rows = _rows(SAMPLE / f"{name}.csv")
    rows[index][rows[0].index(column)] = value
    path = tmp_path / f"{name}.csv"
    _write(path, rows)
    message = _both_readers_refuse(path, schema.TABLES_BY_NAME[name])
    expected = rf"{re.escape(str(path))}, line {index + 1}, column {column}: invalid value {re.escape(repr(value))} "
    assert re.fullmatch(expected + rf"\({reason}.*\)", message), message


def test_line_numbers_are_physical_lines_with_quoted_newlines_and_the_header(tmp_path):
    rows = _rows(SAMPLE / "transactions.csv")
    rows[0][rows[0].index("merchant_name")] = "merchant\nname"  # a header over two lines (no rule on headers)
    header = ["note", *rows[0]]
    body = [["", *row] for row in rows[1:]]
    body[2][0] = "a note\nover\r\nthree lines"  # an extra column, not loaded: may hold line breaks
    body[10][0] = "two\nlines"
    _write(tmp_path / "transactions.csv", [header, *body])
    path = tmp_path / "transactions.csv"
    text = path.read_text(encoding="utf-8").replace("merchant\nname", "merchant_name", 1)
    path.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    bad = next(i for i, line in enumerate(lines, start=1) if line.startswith(",12,"))  # the row of id 12
    lines[bad - 1] = lines[bad - 1].replace(",12,", ",-12,", 1)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = _both_readers_refuse(path, schema.transactions)
    assert message.startswith(f"{path}, line {bad}, column transaction_id: invalid value '-12'"), (bad, message)


def test_a_byte_that_is_not_utf8_is_reported_on_its_own_line(tmp_path):
    path = tmp_path / "transactions.csv"
    lines = (SAMPLE / "transactions.csv").read_bytes().split(b"\n")
    cells = lines[84].split(b",", 3)  # line 85: a Latin-1 byte in the merchant's name
    cells[2] = cells[2][:1] + b"\xe9" + cells[2][1:]
    lines[84] = b",".join(cells)
    path.write_bytes(b"\n".join(lines))
    message = _both_readers_refuse(path, schema.transactions)
    assert re.match(
        rf"{re.escape(str(path))}, line 85, column merchant_name: invalid value '.*\ufffd.*' "
        r"\(not UTF-8 text: byte 0xE9\)$",
        message,
    ), message


def test_a_quote_left_open_at_the_end_is_malformed_csv_not_a_value(tmp_path):
    path = tmp_path / "customers.csv"
    text = (SAMPLE / "customers.csv").read_text(encoding="utf-8")
    path.write_text(text + '41,"Open Quote,555,"x, NY 10001",e@x,700,1000.0', encoding="utf-8")
    message = _both_readers_refuse(path, schema.customers)
    assert message.startswith(f"{path}, line {text.count(chr(10)) + 1}: malformed CSV"), message


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = make_engine(make_url(f"sqlite:///{tmp_path}/serving.db"))
    create_clean_schema(engine)
    yield engine
    engine.dispose()


def _contents(engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
            for t in schema.INPUT_TABLES
        }


@pytest.mark.parametrize(
    "name, index, column, value, expected",
    [
        (
            "transactions",
            30,
            "transaction_id",
            "12",
            "line 31, column transaction_id: duplicate id 12 (first on line 13)",
        ),
        ("customers", 9, "customer_id", "3", "line 10, column customer_id: duplicate id 3 (first on line 4)"),
        ("transactions", 40, "card_id", "999", "line 41, column card_id: card_id 999 is not in cards.csv"),
        ("cards", 4, "customer_id", "77", "line 5, column customer_id: customer_id 77 is not in customers.csv"),
        (
            "cards",
            4,
            "card_type_id",
            "9",
            "line 5, column card_type_id: card_type_id 9 is not in credit_card_types.csv",
        ),
    ],
)
def test_duplicate_and_unknown_ids_name_file_line_and_id_and_load_nothing(
    tmp_path, sqlite_engine, name, index, column, value, expected
):
    load_inputs(sqlite_engine, SAMPLE)
    before = _contents(sqlite_engine)
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    rows = _rows(data / f"{name}.csv")
    rows[index][rows[0].index(column)] = value
    _write(data / f"{name}.csv", rows)
    with pytest.raises(InputFileError) as refused:
        load_inputs(sqlite_engine, data)
    assert str(refused.value) == f"{data / f'{name}.csv'}, {expected}"
    assert _contents(sqlite_engine) == before


def test_sample_seed_and_peer_datasets_pass_every_rule(sqlite_engine, seed_dataset):
    peers = sorted(p for p in PEER_DATASETS_DIR.iterdir() if p.is_dir())
    assert len(peers) == 5
    for folder in [SAMPLE, seed_dataset / "input", *peers]:
        summary = load_inputs(sqlite_engine, folder)
        assert summary.rows["transactions"] >= 400, folder
        for table in schema.INPUT_TABLES:  # the bulk path's reader accepts them too
            assert (
                sum(len(b.rows) for b in normalised_batches(folder / f"{table.name}.csv", table))
                == summary.rows[table.name]
            )
