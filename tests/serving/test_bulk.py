"""The stream's bulk writer and key reader store and read exactly what SQLAlchemy's own statements do."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.mysql import pymysql as mysql_pymysql

from cardpipe.domain.records import STREAM_COLUMNS, TRANSACTION_COLUMNS
from cardpipe.serving import schema
from cardpipe.serving.bulk import BulkWriter, KeyReader
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.stream_store import DECISION_COLUMNS
from cardpipe.stream.processing import DecisionRow

DIALECTS = {"sqlite": sqlite.dialect(), "mysql": mysql_pymysql.dialect()}


def sqlalchemy_params(dialect, table, columns, row):
    """What SQLAlchemy binds for ``row``: each column type's own bind processor."""
    out = []
    for name, value in zip(columns, row, strict=True):
        proc = table.c[name].type._cached_bind_processor(dialect)
        out.append(proc(value) if proc is not None and value is not None else value)
    return tuple(out)


datetimes = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)),
    st.datetimes(timezones=st.just(timezone(timedelta(hours=5)))),
)
money = st.integers(-(10**12) + 1, 10**12 - 1).map(lambda c: D(c).scaleb(-2))
rows = st.tuples(
    st.integers(1, 2**63 - 1),
    st.integers(1, 2**63 - 1),
    st.text(max_size=5),
    datetimes,
    money,
    st.text(max_size=5),
    st.sampled_from(["purchase", "refund"]),
    st.one_of(st.none(), st.integers(1, 2**63 - 1)),
    st.sampled_from(["pending", "declined", "rejected"]),
    st.one_of(st.none(), money),
    st.one_of(st.none(), st.just("over_credit_limit")),
).map(DecisionRow)


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@settings(max_examples=100, deadline=None)
@given(batch=st.lists(rows, max_size=12))
def test_params_are_what_sqlalchemy_binds(dialect, batch):
    d = DIALECTS[dialect]
    writer = BulkWriter(d, schema.stream_transactions, STREAM_COLUMNS)
    params = writer.params(batch)
    assert params == [sqlalchemy_params(d, schema.stream_transactions, STREAM_COLUMNS, r) for r in batch]
    assert all(type(p) is tuple for p in params)  # plain tuples: the DBAPI binds them without Python callbacks
    assert [writer.prepare(r) for r in batch] == params


def test_columns_of_unequal_length_or_number_are_refused():
    writer = BulkWriter(DIALECTS["sqlite"], schema.stream_transactions, STREAM_COLUMNS)
    with pytest.raises(ValueError, match="11 columns of one length"):
        writer.write_columns(None, [[1]] * 10)  # type: ignore[arg-type]  # refused before any connection is used
    with pytest.raises(ValueError, match="11 columns of one length"):
        writer.write_columns(None, [[1]] * 10 + [[1, 2]])  # type: ignore[arg-type]


def test_rows_of_the_wrong_length_are_prepared_one_by_one_as_before():
    writer = BulkWriter(DIALECTS["sqlite"], schema.stream_transactions, STREAM_COLUMNS)
    too_long = (1, 2, "m", datetime(2025, 4, 1), D("1.00"), "l", "t", None, "pending", None, None, "extra")
    assert writer.params([too_long]) == [writer.prepare(too_long)]  # the database then says what is wrong
    assert len(writer.params([too_long, too_long[:11]])[0]) == 12


def test_decision_rows_read_by_name_and_convert_to_dicts():
    row = DecisionRow((1, 2, "m", datetime(2025, 4, 1), D("1.00"), "l", "t", None, "pending", D("1.00"), None))
    assert row["status"] == "pending" and row[8] == "pending" and row[:2] == (1, 2)
    assert dict(row) == dict(zip(STREAM_COLUMNS, row, strict=True))
    assert dict(row, transaction_id=5)["transaction_id"] == 5
    assert row == tuple(row) and "pending" in repr(row)
    import pickle

    assert pickle.loads(pickle.dumps(row)) == row and type(pickle.loads(pickle.dumps(row))) is DecisionRow


@pytest.mark.parametrize("by_columns", [False, True], ids=["rows", "columns"])
def test_written_rows_read_back_as_sqlalchemy_reads_them(database_url, by_columns):
    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        t = schema.stream_transactions
        writer = BulkWriter(engine.dialect, t, DECISION_COLUMNS)
        reader = KeyReader(engine.dialect, t, TRANSACTION_COLUMNS, "transaction_id", chunk=700)
        base = datetime(2025, 4, 1, 1, 2, 3)
        batch = [
            DecisionRow(
                (
                    i,
                    i % 7 + 1,
                    f"Shop {i} ✓",
                    base + timedelta(seconds=i),
                    D(i).scaleb(-2) - 5,
                    f"x, NY {10000 + i}",
                    "purchase",
                    i - 1 if i % 2 else None,
                    "pending" if i % 3 else "declined",
                    D(i % 50) if i % 5 else None,
                    None if i % 3 else "over_credit_limit",
                )
            )
            for i in range(1, 2001)
        ]
        with engine.begin() as conn:
            rows = [(*row, D(1000), i % 4, i) for i, row in enumerate(batch)]
            if by_columns:
                writer.write_columns(conn, list(zip(*rows, strict=True)))
            else:
                writer.write(conn, rows)
        with engine.connect() as conn:
            stored = {r.transaction_id: tuple(r) for r in conn.execute(select(*(t.c[c] for c in STREAM_COLUMNS)))}
            wanted = list(range(0, 2500, 3))  # more ids than one chunk, some not stored
            read = {r[0]: r for r in reader.read(conn, wanted)}
        assert stored == {r[0]: tuple(r) for r in batch}
        assert read == {i: stored[i][: len(TRANSACTION_COLUMNS)] for i in wanted if i in stored}
    finally:
        engine.dispose()


# --- MariaDB: the fast statements are the very bytes PyMySQL's executemany sends --------------------------------

TEXTS = st.text(
    st.one_of(st.sampled_from(list("'\"\\\x00\x01\n\r\x1a\t%é✓😀")), st.characters(codec="utf-8")), max_size=12
)
ANY_VALUE = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    TEXTS,
    money,
    datetimes,
    st.booleans(),
    st.binary(max_size=6),
    st.sampled_from([D("1E+3"), D("5E-7"), D("-0.00"), D("12.345")]),
)


class Recorder:
    """A cursor that records the statements it is given instead of running them."""

    def __init__(self, db, max_stmt_length):
        self.connection, self.max_stmt_length, self.statements = db, max_stmt_length, []

    def execute(self, sql, args=None):
        assert args is None
        self.statements.append(bytes(sql))


def pymysql_statements(db, sql, rows, max_stmt_length):
    import pymysql

    statements = []

    class Cursor(pymysql.cursors.Cursor):
        def execute(self, query, args=None):
            if args is not None:
                return super().execute(query, args)
            statements.append(bytes(query))
            return 0

    cursor = Cursor(db)
    cursor.max_stmt_length = max_stmt_length
    cursor.executemany(sql, rows)
    return statements


@pytest.fixture
def pymysql_connection(mysql_database):
    engine = make_engine(mysql_database)
    conn = engine.connect()
    try:
        yield conn.connection.dbapi_connection
    finally:
        conn.invalidate()
        conn.close()
        engine.dispose()


COLUMN_KINDS = [TEXTS, money, st.integers(-(2**63), 2**63 - 1), datetimes, ANY_VALUE]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(st.sampled_from(range(len(COLUMN_KINDS))), min_size=1, max_size=4),
    data=st.data(),
    max_stmt_length=st.sampled_from([60, 300, 1024000]),
    no_backslash_escapes=st.booleans(),
    upsert=st.booleans(),
)
def test_mysql_statements_are_pymysqls(pymysql_connection, kinds, data, max_stmt_length, no_backslash_escapes, upsert):
    db = pymysql_connection
    names = list(STREAM_COLUMNS[: len(kinds)])
    values = [st.one_of(st.none(), COLUMN_KINDS[k]) if data.draw(st.booleans()) else COLUMN_KINDS[k] for k in kinds]
    rows = data.draw(st.lists(st.tuples(*values), min_size=1, max_size=8))
    writer = BulkWriter(
        DIALECTS["mysql"],
        schema.stream_transactions,
        names,
        upsert_keys=names[:1] if upsert and len(names) > 1 else None,
    )
    saved = db.server_status
    try:
        if no_backslash_escapes:
            db.server_status |= 512  # SERVER_STATUS_NO_BACKSLASH_ESCAPES, as the server reports it
        recorder = Recorder(db, max_stmt_length)
        try:
            writer._mysql.execute(recorder, rows)
        except Exception as exc:  # noqa: BLE001  PyMySQL must fail the same way (a NaN, a lone surrogate)
            with pytest.raises(type(exc)):
                pymysql_statements(db, writer.sql, rows, max_stmt_length)
            return
        assert recorder.statements == pymysql_statements(db, writer.sql, rows, max_stmt_length)
    finally:
        db.server_status = saved


def test_upserts_in_multi_row_statements_apply_row_by_row_in_order(database_url):
    """A key repeated within one multi-row statement (SQLite) and across statements: the balance is the last row's,
    the counter the sum of every row's, as one statement per row gives."""
    from cardpipe.serving.stream_store import card_states_writer

    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        writer = card_states_writer(engine.dialect)
        rows = [(1 + i % 10, D(i).scaleb(-2), 1 + i % 3) for i in range(1000)]
        assert len(rows) % writer.rows_per_statement or writer.rows_per_statement == 1  # a remainder, too
        with engine.begin() as conn:
            writer.write(conn, rows)
            writer.write(conn, rows[:5])
        expected = {}
        for card_id, balance, count in rows + rows[:5]:
            expected[card_id] = (balance, expected.get(card_id, (0, 0))[1] + count)
        cs = schema.card_states
        with engine.connect() as conn:
            stored = {
                c: (D(b), n) for c, b, n in conn.execute(select(cs.c.card_id, cs.c.pending_balance, cs.c.pending_count))
            }
        assert stored == expected
    finally:
        engine.dispose()


# --- MariaDB: decisions loaded with LOAD DATA LOCAL INFILE store what the INSERTs store ----------------------------

LOADED_TEXTS = st.text(
    st.one_of(st.sampled_from(list("'\",\\\x01\n\r\t%é✓😀N")), st.characters(codec="utf-8")),
    max_size=12,
)


def _stored(conn, columns):
    t = schema.stream_transactions
    return conn.execute(select(*(t.c[c] for c in columns)).order_by(t.c.transaction_id)).all()


@pytest.fixture
def mysql_engine(mysql_database):
    engine = make_engine(mysql_database)
    try:
        create_clean_schema(engine)
        yield engine
    finally:
        engine.dispose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(LOADED_TEXTS, st.sampled_from(["NULL", '"NULL"', "", ",", '"'])),
            st.one_of(st.none(), LOADED_TEXTS, st.just("NULL")),
            st.one_of(st.none(), money, st.sampled_from([D("-0.00"), D("1E+3"), D("0.005")])),
            st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
        ),
        min_size=1,
        max_size=30,
    ),
    as_text=st.booleans(),
)
def test_loaded_rows_are_the_inserted_rows(mysql_engine, monkeypatch, rows, as_text):
    """Any texts (quotes, commas, line ends, the word NULL), NULLs, money and timestamps, as the per-message path's
    values or as the column path's texts: LOAD DATA stores exactly what the INSERTs store, or leaves them to it."""
    monkeypatch.setattr("cardpipe.serving.bulk.LOAD_MIN_ROWS", 1)
    columns = ("transaction_id", "merchant_name", "decline_reason", "pending_balance", "timestamp", "card_id", "amount")
    values = [
        list(range(1, len(rows) + 1)),
        *map(list, zip(*rows, strict=True)),
        [7] * len(rows),
        [D("1.25")] * len(rows),
    ]
    if as_text:
        values[3] = [None if v is None else format(v, "f") for v in values[3]]
        values[4] = [v.isoformat(" ") for v in values[4]]
    writes = {}
    for load in (False, True):
        writer = BulkWriter(
            mysql_engine.dialect, schema.stream_transactions, columns + tuple(_REQUIRED), load_data=load
        )
        with mysql_engine.connect() as conn:  # begins by itself; rolled back
            writer.write_columns(conn, [*values, *([_REQUIRED[c]] * len(rows) for c in _REQUIRED)])
            writes[load] = _stored(conn, columns)
            conn.rollback()
    assert writes[True] == writes[False]


_REQUIRED = {
    "location": "City",
    "transaction_type": "purchase",
    "status": "pending",
    "kafka_partition": 0,
    "checkpoint_seq": 1,
}


def _decisions(ids, *, timestamp="2025-04-01 00:00:02"):
    n = len(ids)
    return [
        list(ids),
        [7] * n,
        ['Shop, "x"\n'] * n,
        [timestamp] * n,
        ["1.25"] * n,
        ["City"] * n,
        ["purchase"] * n,
        [None] * n,
        ["pending"] * n,
        ["1.25"] * n,
        [None] * n,
        ["100.00"] * n,
        [0] * n,
        [1] * n,
    ]


def test_a_load_that_the_server_would_refuse_as_an_insert_raises_the_inserts_error(mysql_engine):
    """A duplicate key or an impossible date is a warning to LOAD DATA LOCAL (the row skipped or zeroed): the load is
    undone and the INSERTs raise the error, leaving the transaction as it was."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    writer = BulkWriter(mysql_engine.dialect, schema.stream_transactions, DECISION_COLUMNS, load_data=True)
    with mysql_engine.begin() as conn:
        writer.write_columns(conn, _decisions(range(1, 1001)), converted=True)
    with mysql_engine.connect() as conn:
        assert len(_stored(conn, ["transaction_id"])) == 1000
        with pytest.raises(IntegrityError, match="Duplicate entry '1000'"):
            writer.write_columns(conn, _decisions(range(1000, 2000)), converted=True)
        assert len(_stored(conn, ["transaction_id"])) == 1000  # nothing of the load is left
        conn.rollback()
        with pytest.raises(OperationalError, match="Incorrect datetime value"):
            writer.write_columns(conn, _decisions(range(3000, 4000), timestamp="2025-02-30 00:00:00"), converted=True)
        assert len(_stored(conn, ["transaction_id"])) == 1000
        conn.rollback()
    assert not writer._mysql_load.refused


def test_a_client_without_local_infile_inserts_after_one_warning(mysql_database, caplog):
    from sqlalchemy import create_engine

    engine = create_engine(mysql_database, connect_args={"local_infile": False})
    try:
        create_clean_schema(engine)
        writer = BulkWriter(engine.dialect, schema.stream_transactions, DECISION_COLUMNS, load_data=True)
        with caplog.at_level("WARNING", logger="cardpipe.serving.bulk"):
            for start in (1, 1001):
                with engine.begin() as conn:
                    writer.write_columns(conn, _decisions(range(start, start + 1000)), converted=True)
        with engine.connect() as conn:
            assert [r[0] for r in _stored(conn, ["transaction_id"])] == list(range(1, 2001))
        assert writer._mysql_load.refused
        told = [r.getMessage() for r in caplog.records if "LOAD DATA LOCAL INFILE" in r.getMessage()]
        assert len(told) == 1 and told[0].endswith("stream_transactions rows go as multi-row INSERTs")
    finally:
        engine.dispose()


def test_decisions_are_loaded_when_there_are_many(mysql_engine, monkeypatch):
    """The checkpoint's decisions go through LOAD DATA from LOAD_MIN_ROWS rows on, as INSERTs below."""
    from cardpipe.serving import bulk

    writer = BulkWriter(mysql_engine.dialect, schema.stream_transactions, DECISION_COLUMNS, load_data=True)
    loaded = []
    real = bulk._MySQLLoad.execute_columns
    monkeypatch.setattr(
        bulk._MySQLLoad, "execute_columns", lambda self, *a: loaded.append(real(self, *a)) or loaded[-1]
    )
    with mysql_engine.begin() as conn:
        writer.write_columns(conn, _decisions(range(1, bulk.LOAD_MIN_ROWS)), converted=True)
        writer.write_columns(conn, _decisions(range(10_000, 10_000 + bulk.LOAD_MIN_ROWS)), converted=True)
    assert loaded == [False, True]
    with mysql_engine.connect() as conn:
        assert len(_stored(conn, ["transaction_id"])) == 2 * bulk.LOAD_MIN_ROWS - 1
