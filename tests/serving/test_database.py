"""The serving layer on SQLite and on a real MariaDB: schema, typed loads, bad input, exports."""

import csv
import shutil
from datetime import datetime
from decimal import Decimal as D

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import URL

from cardpipe.errors import ConfigError, DatabaseUnavailable, InputFileError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import export_table
from cardpipe.serving.database import check_connection, create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    create_clean_schema(engine)
    yield engine
    engine.dispose()


def _count(engine, table):
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_clean_schema_has_every_table(engine):
    assert set(inspect(engine).get_table_names()) >= set(schema.TABLES_BY_NAME)


def test_load_is_typed_and_exact(engine, seed_dataset):
    summary = load_inputs(engine, seed_dataset / "input")
    assert summary.rows == {"credit_card_types": 5, "customers": 30, "cards": 54, "transactions": 400}
    with engine.connect() as conn:
        row = conn.execute(select(schema.transactions).where(schema.transactions.c.transaction_id == 2)).one()
        card = conn.execute(select(schema.cards).where(schema.cards.c.card_id == 1)).one()
    assert row.amount == D("-232.74") and isinstance(row.amount, D)
    assert row.timestamp == datetime(2025, 4, 1, 1, 38, 24)
    assert row.related_transaction_id is None
    assert card.credit_limit == D("2500.00") and card.current_balance == D("120.67")


def test_reload_replaces_rather_than_duplicates(engine, seed_dataset):
    load_inputs(engine, seed_dataset / "input")
    load_inputs(engine, seed_dataset / "input")
    assert _count(engine, schema.transactions) == 400


def _copy_dataset(seed_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(seed_dataset / "input", data)
    return data


def test_missing_column_is_named(engine, seed_dataset, tmp_path):
    data = _copy_dataset(seed_dataset, tmp_path)
    rows = list(csv.reader((data / "cards.csv").open()))
    with (data / "cards.csv").open("w", newline="") as f:
        csv.writer(f).writerows([r[:5] + r[6:] for r in rows])  # drop credit_limit
    with pytest.raises(InputFileError, match=r"cards\.csv: missing column\(s\) credit_limit"):
        load_inputs(engine, data)


def test_malformed_row_names_file_line_and_column_and_loads_nothing(engine, seed_dataset, tmp_path):
    load_inputs(engine, seed_dataset / "input")
    data = _copy_dataset(seed_dataset, tmp_path)
    lines = (data / "transactions.csv").read_text().splitlines()
    lines[7] = lines[7].replace("2025-04-01", "2025-04-99", 1)
    (data / "transactions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputFileError, match=r"transactions\.csv, line 8, column timestamp: invalid value"):
        load_inputs(engine, data)
    # All or nothing: the previous load is intact.
    assert _count(engine, schema.transactions) == 400 and _count(engine, schema.cards) == 54


def test_unknown_card_reference_is_a_clear_error(engine, seed_dataset, tmp_path):
    data = _copy_dataset(seed_dataset, tmp_path)
    text = (data / "transactions.csv").read_text().replace("\n1,26,", "\n1,9999,", 1)
    (data / "transactions.csv").write_text(text)
    with pytest.raises(
        InputFileError, match=r"transactions\.csv, line 2, column card_id: card_id 9999 is not in cards\.csv"
    ):
        load_inputs(engine, data)


def test_missing_data_folder(engine, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_inputs(engine, tmp_path / "nope")


def test_export_writes_sorted_csv_with_two_decimals(engine, seed_dataset, tmp_path):
    load_inputs(engine, seed_dataset / "input")
    with engine.connect() as conn:
        export_table(conn, schema.cards, tmp_path / "cards.csv")
    rows = list(csv.DictReader((tmp_path / "cards.csv").open()))
    assert [int(r["card_id"]) for r in rows] == list(range(1, 55))
    assert rows[0]["credit_limit"] == "2500.00" and rows[0]["issue_date"] == "2022-11-18"


EDGE_AMOUNTS = [
    D("0.00"),
    D("-0.01"),
    D("0.10"),
    D("-95.11"),
    D("12.30"),
    D("1000000.00"),
    D("9999999999.99"),
    D("-9999999999.99"),
    D("123456789.05"),
    D("7"),
]


def test_export_formats_money_and_timestamps_in_sql_as_format_cell_does(engine, tmp_path):
    """Exports format money and timestamps in the database; the text equals format_cell's for every edge."""
    from cardpipe.serving.csv_io import format_cell
    from cardpipe.serving.results import STREAM_COLUMNS

    rows = []
    for i, amount in enumerate(EDGE_AMOUNTS, start=1):
        rows.append(
            {
                "transaction_id": i,
                "card_id": i,
                "merchant_name": f'Shop, "{i}"',
                "location": "Town 00501",
                "timestamp": datetime(2024, 2, 29, 23, 59, 59, 999999) if i % 2 else datetime(1999, 1, 1, 0, 0, i),
                "amount": amount,
                "transaction_type": "refund" if amount < 0 else "purchase",
                "related_transaction_id": i - 1 if i % 3 == 0 else None,
                "status": "declined" if i % 4 == 0 else "pending",
                "pending_balance": None if i % 4 == 0 else abs(amount),
                "decline_reason": "over_limit" if i % 4 == 0 else None,
                "kafka_partition": i % 3,
                "checkpoint_seq": i,
            }
        )
    with engine.begin() as conn:
        conn.execute(schema.stream_transactions.insert(), rows)
    with engine.connect() as conn:
        export_table(conn, schema.stream_transactions, tmp_path / "s.csv", STREAM_COLUMNS)
    with (tmp_path / "s.csv").open(newline="", encoding="utf-8") as handle:
        written = list(csv.reader(handle))
    assert written[0] == list(STREAM_COLUMNS)
    expected = []
    for row in rows:
        stored = {**row, "timestamp": row["timestamp"].replace(microsecond=0)}  # DATETIME keeps whole seconds
        expected.append([format_cell(stored[c]) for c in STREAM_COLUMNS])
    assert written[1:] == expected
    amounts = [r[STREAM_COLUMNS.index("amount")] for r in written[1:]]
    assert amounts[6:8] == ["9999999999.99", "-9999999999.99"] and amounts[-1] == "7.00"
    assert written[1][STREAM_COLUMNS.index("timestamp")] == "2024-02-29 23:59:59"


@pytest.mark.mysql
def test_wrong_password_is_a_one_line_error_without_the_password(mysql_database):
    bad = mysql_database.set(password="definitely-wrong-pw")
    engine = make_engine(bad, create_database=False)
    with pytest.raises(DatabaseUnavailable) as info:
        check_connection(engine)
    message = str(info.value)
    assert "access denied" in message and "definitely-wrong-pw" not in message and "\n" not in message


def test_unreachable_database_is_a_one_line_error():
    url = URL.create("mysql+pymysql", username="u", password="secret-pw", host="127.0.0.1", port=1, database="x")
    with pytest.raises(DatabaseUnavailable) as info:
        make_engine(url)
    assert "cannot connect" in str(info.value) and "secret-pw" not in str(info.value)


def test_missing_mysql_database_is_created(mysql_url):
    """`cardpipe setup` against a server without the configured database creates it."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"cardpipe_autocreate_{uuid.uuid4().hex[:12]}"
    engine = make_engine(mysql_url.set(database=name))
    try:
        create_clean_schema(engine)
        assert "stream_transactions" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
        admin = create_engine(mysql_url)
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


def test_a_database_of_an_older_cardpipe_is_refused_with_what_to_run(engine):
    """A table without a column this version writes (card_states before its pending_count): one line naming
    the table, the column and the commands that recreate the schema; no table is changed."""
    from sqlalchemy import text

    from cardpipe.serving.database import ensure_schema

    create_clean_schema(engine)
    ensure_schema(engine)  # a current schema passes
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE card_states"))
        conn.execute(text("CREATE TABLE card_states (card_id BIGINT PRIMARY KEY, pending_balance NUMERIC(12, 2))"))
    with pytest.raises(ConfigError, match=r"older cardpipe \(table card_states has no column pending_count\).*setup"):
        ensure_schema(engine)
    assert "pending_count" not in {c["name"] for c in inspect(engine).get_columns("card_states")}


def test_sqlite_binds_none_as_null_through_its_registered_adapter(tmp_path):
    """make_engine registers an adapter for None (binding it skips sqlite3's search for __adapt__/__conform__):
    None is still stored as NULL, through the driver's multi-row and single-row statements and through SQLAlchemy."""
    import sqlite3

    engine = make_engine(URL.create("sqlite", database=str(tmp_path / "nulls.db")))
    try:
        assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)](None) is None
        with engine.begin() as conn:
            driver = conn.connection.driver_connection
            driver.execute("CREATE TABLE t (a INTEGER, b TEXT, c REAL)")
            driver.execute("INSERT INTO t VALUES (?, ?, ?), (?, ?, ?)", [1, None, None, None, "x", 2.5])
            driver.executemany("INSERT INTO t VALUES (?, ?, ?)", [(None, None, None)])
            conn.execute(text("INSERT INTO t VALUES (:a, :b, :c)"), {"a": None, "b": "y", "c": None})
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            rows = driver.execute("SELECT a, typeof(a), b, typeof(b), c, typeof(c) FROM t ORDER BY rowid").fetchall()
    finally:
        engine.dispose()
    assert rows == [
        (1, "integer", None, "null", None, "null"),
        (None, "null", "x", "text", 2.5, "real"),
        (None, "null", None, "null", None, "null"),
        (None, "null", "y", "text", None, "null"),
    ]
