"""Bulk loads into MariaDB (LOAD DATA LOCAL INFILE, multi-row INSERT fallback) against the row path.

The row path (typed values through SQLAlchemy's executemany) is the reference: every bulk path must
leave exactly the same table contents, reject exactly the same cells with the same errors, and load
all or nothing.
"""

from __future__ import annotations

import csv
import logging
from datetime import date, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from cardpipe.domain.records import CARD_COLUMNS, CARD_TYPE_COLUMNS, CUSTOMER_COLUMNS, TRANSACTION_COLUMNS
from cardpipe.errors import CardpipeError, InputFileError
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.serving import schema
from cardpipe.serving.csv_io import _typed_cell, normalised_batches, normaliser_for, plan_column
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from tests.reference import PEER_DATASETS_DIR

pytestmark = pytest.mark.mysql

# Cells that stress the canonical text: quotes, commas, newlines, backslashes, tabs, the words NULL
# and \N, unicode beyond the BMP, float-written money and integers, lenient timestamps, BIGINT bounds.
CARD_TYPES = [
    ["1", "Basic", "580", "669", "1000", "5000", "0", "0.005"],
    ["2", 'Gold, "Plus"', "670", "739", "5000.0", "10000", "95.5", "0.01"],
    ["3", "Plätinum ☃", "740", "850", "1e4", "25000", "450", "0.022500"],
]
CUSTOMERS = [
    ["1", "Zoë O'Brien", "555-0100", '1 Main St, Apt "4", Springfield', "zoe@example.org", "700", "123456.78"],
    ["2", "NULL", "555", "line one, line two", "x@y", "650", "95.11000000000001"],
    ["3", "back\\slash tab", "+1 (555)", "\\N", "e", "685.0", "685.0"],
    ["4", "😀 emoji", "", " leading and trailing ", "f", " 720 ", "0.015"],
    ["5", "", "0", '"', "g", "300", "2.675"],
]
CARDS = [
    ["1", "1", "1", "1234-5678", "05/26", "4700.0", "159.99", "2023-01-30"],
    ["2", "2", "2", "2345", "03/27", "1E+4", "0", "2023-12-26"],
    ["3", "3", "3", '","', "12/28", "9999999999.99", "-0.00", "2024-02-29"],
    ["4", "4", "1", "4", "01/30", "2500", "-9999999999.99", "2020-01-01"],
    ["5", "5", "2", "5", "01/31", " 12.5 ", "1.005", "1999-12-31"],
]
TRANSACTIONS = [
    ["1", "1", "Frazier-Bailey", "2025-04-01 00:00:02", "98.33", "8877 Anna Crest, New York, NY 11378", "purchase", ""],
    ["2", "2", 'Café "Ünïcode", Ltd.', "2025-04-01 00:00:03", "-95.11000000000001", "Zürich, CH", "refund", "1"],
    ["3", "3", 'comma, and ""quote""', "2025-4-1 0:0:4", "1e2", "multi, line", "purchase", ""],
    ["4", "4", "NULL", "2025-12-31 23:59:59", "0.015", "\\N", "purchase", "9223372036854775807"],
    ["5", "1", "tab here", "2024-02-29 12:00:00", " 12.5 ", "back\\slash", "purchase", "3.0"],
    ["6", "2", "", " 2025-04-01 00:00:05 ", "-0", "", "p2p_transfer", "1"],
    ["9223372036854775807", "5", "x" * 255, "2025-04-02 00:00:00", "9999999999.99", "y" * 512, "cancellation", "0006"],
]


def _write(path: Path, header, rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def tricky_data(tmp_path) -> Path:
    data = tmp_path / "tricky"
    data.mkdir()
    _write(data / "credit_card_types.csv", CARD_TYPE_COLUMNS, CARD_TYPES)
    _write(data / "customers.csv", CUSTOMER_COLUMNS, CUSTOMERS)
    _write(data / "cards.csv", CARD_COLUMNS, CARDS)
    _write(data / "transactions.csv", TRANSACTION_COLUMNS, TRANSACTIONS)
    return data


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """25,000 transactions: many batches through one LOAD statement."""
    path = tmp_path_factory.mktemp("generated") / "data"
    generate_dataset(path, GeneratorConfig(transactions=25_000, customers=500, seed=3))
    return path


@pytest.fixture
def engine(mysql_database):
    engine = make_engine(mysql_database)
    create_clean_schema(engine)
    yield engine
    engine.dispose()


def _snapshot(engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {
            table.name: [tuple(row) for row in conn.execute(select(table).order_by(*table.primary_key.columns))]
            for table in schema.INPUT_TABLES
        }


def _counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in schema.INPUT_TABLES}


def _copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("credit_card_types", "customers", "cards", "transactions"):
        (target / f"{name}.csv").write_bytes((source / f"{name}.csv").read_bytes())
    return target


def _replace_line(path: Path, line: int, edit) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("".join(lines), encoding="utf-8")


EMPTY = {"credit_card_types": 0, "customers": 0, "cards": 0, "transactions": 0}


def test_every_bulk_path_stores_exactly_what_the_row_path_stores(engine, tricky_data):
    reference = load_inputs(engine, tricky_data, method="rows")
    expected = _snapshot(engine)
    assert reference.rows == {"credit_card_types": 3, "customers": 5, "cards": 5, "transactions": 7}
    for method in ("insert", "load_data"):
        create_clean_schema(engine)  # empty tables: the LOAD runs in MariaDB's bulk mode
        summary = load_inputs(engine, tricky_data, method=method)
        assert summary.method == method and summary.rows == reference.rows
        assert _snapshot(engine) == expected, method
    # Reloading over existing rows (DELETE, no bulk mode) gives the same again.
    assert load_inputs(engine, tricky_data).method == "load_data"
    assert _snapshot(engine) == expected
    by_id = {row[0]: row for row in expected["transactions"]}
    assert by_id[2][4] == D("-95.11") and by_id[3][3] == datetime(2025, 4, 1, 0, 0, 4) and by_id[3][4] == D("100.00")
    assert by_id[1][7] is None and by_id[4][7] == 2**63 - 1 and by_id[6][7] == 1 and by_id[5][7] == 3
    assert by_id[3][2] == 'comma, and ""quote""' and by_id[3][5] == "multi, line" and by_id[4][5] == "\\N"
    assert by_id[4][2] == "NULL" and by_id[6][2] == "" and by_id[4][4] == D("0.02")
    customers = {row[0]: row for row in expected["customers"]}
    assert customers[2][3] == "line one, line two" and customers[3][1] == "back\\slash tab"
    assert customers[4][1] == "😀 emoji" and customers[5][6] == D("2.68") and customers[3][5] == 685
    cards = {row[0]: row for row in expected["cards"]}
    assert cards[3][3] == '","' and cards[3][6] == D("0.00") and cards[3][7] == date(2024, 2, 29)
    assert expected["credit_card_types"][2][7] == D("0.02250")


def test_seed_and_peer_datasets_are_identical_through_load_data(engine, seed_dataset):
    peers = PEER_DATASETS_DIR
    folders = [seed_dataset / "input", *sorted(p for p in peers.iterdir() if p.is_dir())]
    assert len(folders) > 1, f"no peer datasets in {peers}"
    for folder in folders:  # float-written money and the like, from other implementations
        create_clean_schema(engine)
        load_inputs(engine, folder, method="rows")
        expected = _snapshot(engine)
        create_clean_schema(engine)
        assert load_inputs(engine, folder).method == "load_data"
        assert _snapshot(engine) == expected, folder.name


def test_generated_dataset_is_identical_through_load_data(engine, generated):
    load_inputs(engine, generated, method="rows")
    expected = _snapshot(engine)
    create_clean_schema(engine)
    progress: list[tuple[str, int]] = []
    summary = load_inputs(engine, generated, lambda table, n: progress.append((table, n)))
    assert summary.method == "load_data" and summary.rows["transactions"] == 25_000
    assert ("transactions", 25_000) in progress
    assert _snapshot(engine) == expected
    with engine.connect() as conn:  # the session's checks are back on for whoever gets the connection
        assert tuple(conn.exec_driver_sql("SELECT @@foreign_key_checks, @@unique_checks").one()) == (1, 1)


def test_malformed_row_deep_in_the_file_names_it_and_loads_nothing(engine, generated, tmp_path):
    data = _copy(generated, tmp_path / "bad")
    # Line 20,001: the LOAD statement has been reading rows for a while when the bad one comes.
    _replace_line(data / "transactions.csv", 20_001, lambda text: text.replace("2025-", "2025-13-", 1))
    with pytest.raises(InputFileError, match=r"transactions\.csv, line 20001, column timestamp: invalid value"):
        load_inputs(engine, data)
    assert _counts(engine) == EMPTY


def test_malformed_row_keeps_the_previous_load(engine, generated, tmp_path):
    load_inputs(engine, generated)
    before = _counts(engine)
    data = _copy(generated, tmp_path / "bad")
    _replace_line(data / "cards.csv", 7, lambda text: ",".join([*text.split(",")[:5], "a lot", *text.split(",")[6:]]))
    with pytest.raises(InputFileError, match=r"cards\.csv, line 7, column credit_limit: invalid value 'a lot'"):
        load_inputs(engine, data)
    assert _counts(engine) == before


def test_unknown_card_names_line_and_column_and_loads_nothing(engine, generated, tmp_path):
    data = _copy(generated, tmp_path / "bad")
    _replace_line(
        data / "transactions.csv", 15_000, lambda text: ",".join([text.split(",")[0], "999999", *text.split(",")[2:]])
    )
    with pytest.raises(
        InputFileError,
        match=r"transactions\.csv, line 15000, column card_id: card_id 999999 is not in cards\.csv$",
    ):
        load_inputs(engine, data)
    assert _counts(engine) == EMPTY


def test_duplicate_id_is_refused_and_loads_nothing(engine, generated, tmp_path):
    data = _copy(generated, tmp_path / "dup")
    path = data / "transactions.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[18_000] = "12," + lines[18_000].split(",", 1)[1]  # transaction_id 12 again, far from the first
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(
        InputFileError,
        match=r"transactions\.csv, line 18001, column transaction_id: duplicate id 12 \(first on line 13\)$",
    ):
        load_inputs(engine, data)
    assert _counts(engine) == EMPTY


def test_without_named_pipes_the_rows_go_through_a_temporary_file(engine, tricky_data, monkeypatch):
    from cardpipe.serving import mysql_bulk

    load_inputs(engine, tricky_data, method="rows")
    expected = _snapshot(engine)
    create_clean_schema(engine)
    monkeypatch.setattr(mysql_bulk, "_make_fifo", lambda path: False)
    assert load_inputs(engine, tricky_data, method="load_data").method == "load_data"
    assert _snapshot(engine) == expected


def test_refused_local_infile_falls_back_to_inserts(mysql_database, tricky_data, caplog):
    engine = make_engine(mysql_database)
    create_clean_schema(engine)
    load_inputs(engine, tricky_data, method="rows")
    expected = _snapshot(engine)
    engine.dispose()
    # A client that does not offer LOCAL INFILE: the server refuses the statement (MariaDB's error 4166;
    # 1148 or 3948 elsewhere), exactly as a server started with local_infile=OFF does.
    plain = create_engine(mysql_database)
    try:
        create_clean_schema(plain)
        with caplog.at_level(logging.WARNING, logger="cardpipe.serving.mysql_bulk"):
            summary = load_inputs(plain, tricky_data)
        assert summary.method == "insert"
        refusals = [r for r in caplog.records if "refused LOAD DATA LOCAL INFILE" in r.getMessage()]
        assert len(refusals) == 1 and "4166" in refusals[0].getMessage()
        assert _snapshot(plain) == expected
        with pytest.raises(CardpipeError, match="refused LOAD DATA LOCAL INFILE"):
            load_inputs(plain, tricky_data, method="load_data")
        assert _snapshot(plain) == expected  # the failed load changed nothing
    finally:
        plain.dispose()


def test_insert_path_reports_errors_like_the_others(engine, tricky_data):
    path = tricky_data / "customers.csv"
    _replace_line(path, 2, lambda text: text.replace(",700,", ",six,", 1))
    with pytest.raises(InputFileError, match=r"customers\.csv, line 2, column credit_score: invalid value 'six'"):
        load_inputs(engine, tricky_data, method="insert")
    assert _counts(engine) == EMPTY


# --- the canonical text against the typed values (no database) ----------------------------------------

ODD_CELLS = {
    "transaction_id": [
        "1",
        "-5",
        "0007",
        " 8 ",
        "+9",
        "1_000",
        "685.0",
        "1e3",
        "1.5",
        "x",
        "",
        "nan",
        "inf",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775809",
        "1e999999999",
        "٣",
        "9" * 5000,
    ],
    "credit_score": ["720", "2147483647", "2147483648", "-2147483649", "12.0"],
    "amount": [
        "98.33",
        "4700.0",
        "-0",
        "-0.00",
        "1e2",
        ".5",
        "5.",
        " 1.5 ",
        "-95.11000000000001",
        "0.005",
        "0.015",
        "9999999999.99",
        "9999999999.994",
        "9999999999.995",
        "10000000000",
        "1_0",
        "abc",
        "NaN",
        "-Infinity",
        "",
        "١",
        "1e-7",
    ],
    "rewards_rate": ["0.005", "0.0225", "1e-5", "999.99999", "1000", "0.000005", "0.000015", "x"],
    "timestamp": [
        "2025-04-01 00:00:02",
        "2025-4-1 0:0:2",
        " 2025-04-01 00:00:02 ",
        "2025-04-01T00:00:02",
        "2025-02-29 00:00:00",
        "2024-02-29 23:59:59",
        "2025-04-01 24:00:00",
        "2025-04-01 00:00:60",
        "0000-01-01 00:00:00",
        "2025-04-01",
        "2025-04-01 00:00:02.5",
        "",
        "２０２５-04-01 00:00:02",
    ],
    "issue_date": ["2023-01-30", "2023-02-30", " 2023-01-30 ", "20230130", "2023-1-3", ""],
    "merchant_name": ["", "a" * 255, "a" * 256, "é" * 255, "NULL"],
    "related_transaction_id": ["", "3", "3.0", "x"],
}
COLUMN_TABLE = {
    "transaction_id": schema.transactions,
    "credit_score": schema.customers,
    "amount": schema.transactions,
    "rewards_rate": schema.credit_card_types,
    "timestamp": schema.transactions,
    "issue_date": schema.cards,
    "merchant_name": schema.transactions,
    "related_transaction_id": schema.transactions,
}


def _canonical(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(" ")
    if isinstance(value, D):
        return format(value, "f")
    return str(value)


@pytest.mark.parametrize("name", sorted(ODD_CELLS))
def test_normalised_text_accepts_what_the_typed_reader_accepts(name):
    table = COLUMN_TABLE[name]
    column = table.c[name]
    typed = plan_column(column, 0)
    normalise = normaliser_for(column)
    for cell in ODD_CELLS[name]:
        try:
            expected = _canonical(_typed_cell(Path("f.csv"), 2, typed, cell))
        except InputFileError as exc:
            expected = f"error: {exc}"
        try:
            got = "" if cell == "" and column.nullable else normalise(cell)
            if cell == "" and not column.nullable and not typed.is_string:
                got = "error: f.csv, line 2, column " + name + ": empty value"
        except Exception as exc:  # noqa: BLE001 - compared below
            got = f"error: f.csv, line 2, column {name}: invalid value {cell[:40]!r} ({exc})"
        if expected.startswith("error") or got.startswith("error"):
            assert got.startswith("error") and expected.startswith("error"), (cell, expected, got)
        else:
            # Canonical text may keep the cell's own spelling ("0007", "4700.0"): the server reads the
            # same value from it. Compare what it means.
            assert _canonical(_typed_cell(Path("f.csv"), 2, typed, got)) == expected, (cell, expected, got)


def test_normalised_batches_report_the_same_errors_as_read_typed_rows(tmp_path):
    from cardpipe.serving.csv_io import read_typed_rows

    path = tmp_path / "transactions.csv"
    bad_rows = [
        ["1", "1", "m", "2025-04-01 00:00:02", "1.00", "l", "refund"],  # a field short
        ["1", "1", "m", "2025-04-01 00:00:02", "1.00", "l", "refund", "", "extra"],
        ["1", "", "m", "2025-04-01 00:00:02", "1.00", "l", "refund", ""],
        ["1", "1", "m", "2025-04-31 00:00:02", "1.00", "l", "refund", ""],
        ["1", "1", "m", "2025-04-01 00:00:02", "1.001.0", "l", "refund", ""],
        ["1", "1", "m" * 300, "2025-04-01 00:00:02", "1.00", "l", "refund", ""],
        ["1", "1", "m", "2025-04-01 00:00:02", "1.00", "l", "teleport", ""],
        ["-3", "1", "m", "2025-04-01 00:00:02", "1.00", "l", "refund", ""],
        ["1", "1", "m\x07", "2025-04-01 00:00:02", "1.00", "l", "refund", ""],
        ["1", "1", "m", "2025-04-01 00:00:02", "1_000.00", "l", "refund", ""],
    ]
    good = ["1", "1", "m", "2025-04-01 00:00:02", "1.00", "l", "refund", ""]
    for bad in bad_rows:
        _write(path, TRANSACTION_COLUMNS, [good, [], good, bad])
        with pytest.raises(InputFileError) as typed:
            list(read_typed_rows(path, schema.transactions))
        with pytest.raises(InputFileError) as fast:
            list(normalised_batches(path, schema.transactions))
        assert str(fast.value) == str(typed.value) and ", line 5" in str(fast.value)


def test_server_row_numbers_map_to_csv_lines():
    from array import array

    from cardpipe.serving.mysql_bulk import _line_of

    lines = [array("q", [2, 3, 5]), array("q", [6, 9])]  # line 4 blank, lines 7-8 one multi-line record
    assert [_line_of(lines, n) for n in range(1, 7)] == [2, 3, 5, 6, 9, None]


def test_column_wise_batches_equal_the_typed_rows_whatever_the_header_order(tmp_path):
    from cardpipe.serving.csv_io import read_typed_rows

    header = ["extra", *reversed(TRANSACTION_COLUMNS)]
    path = tmp_path / "transactions.csv"
    rows = [["x", *reversed(row)] for row in TRANSACTIONS * 3]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows[:5])
        handle.write("\n")  # a blank line: skipped, and the lines after it keep their numbers
        writer.writerows(rows[5:])
    typed = list(read_typed_rows(path, schema.transactions))
    for batch_rows in (1, 4, 10_000):
        batches = list(normalised_batches(path, schema.transactions, batch_rows=batch_rows))
        got = [row for batch in batches for row in batch.rows]
        lines = [line for batch in batches for line in batch.lines]
        assert len(got) == len(typed) == 21 and lines[4:6] == [6, 8]
        columns = [plan_column(schema.transactions.c[name], i) for i, name in enumerate(TRANSACTION_COLUMNS)]
        for text_row, typed_row in zip(got, typed, strict=True):
            assert [_canonical(_typed_cell(path, 0, c, text)) for c, text in zip(columns, text_row, strict=True)] == [
                _canonical(typed_row[c.name]) for c in columns
            ]


def test_pipe_text_is_what_csv_writer_writes():
    import io

    from cardpipe.serving.mysql_bulk import _csv_text

    for rows in (TRANSACTIONS, CUSTOMERS, CARDS, [["a"]], [['"']], [["", ""]], [['x"', '"y', '""'], ["1", "2", "3"]]):
        expected = io.StringIO()
        csv.writer(expected, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
        assert _csv_text(rows) == expected.getvalue()
