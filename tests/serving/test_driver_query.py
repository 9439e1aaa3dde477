"""``DriverQuery``: a Core statement run on the driver's own cursor, on both backends: every row streamed in
chunks as the driver gives it, a cursor abandoned midway closed (the connection still serves the next query),
and a driver error raised as SQLAlchemy's ``DBAPIError``."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, bindparam, select
from sqlalchemy.exc import DBAPIError

from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.driver_query import DriverQuery


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    create_clean_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            schema.credit_card_types.insert(),
            [
                {
                    "card_type_id": i,
                    "name": f"type {i}",
                    "credit_score_min": 300 + i,
                    "credit_score_max": 850,
                    "credit_limit_min": 100,
                    "credit_limit_max": 1000,
                    "annual_fee": 0,
                    "rewards_rate": 0,
                }
                for i in range(1, 8)
            ],
        )
    yield engine
    engine.dispose()


def test_rows_are_streamed_in_chunks_in_the_statements_order(engine) -> None:
    t = schema.credit_card_types
    query = DriverQuery(
        select(t.c.card_type_id, t.c.name).where(t.c.card_type_id >= bindparam("low")).order_by(t.c.card_type_id.desc())
    )
    with engine.connect() as conn:
        rows = list(query.rows(conn, {"low": 2}, chunk=2))  # four chunks, the last one short
    assert [tuple(row) for row in rows] == [(i, f"type {i}") for i in range(7, 1, -1)]


def test_a_cursor_left_midway_is_closed_and_the_connection_serves_the_next_query(engine) -> None:
    t = schema.credit_card_types
    query = DriverQuery(select(t.c.card_type_id).order_by(t.c.card_type_id))
    with engine.connect() as conn:
        rows = query.rows(conn, chunk=2)
        assert next(rows)[0] == 1
        rows.close()
        assert conn.execute(select(t.c.name).where(t.c.card_type_id == 3)).scalar_one() == "type 3"
        assert query.first(conn) == {"card_type_id": 1}


def test_a_driver_error_is_raised_as_sqlalchemys(engine) -> None:
    missing = Table("no_such_table", MetaData(), Column("x", Integer))
    query = DriverQuery(select(missing.c.x))
    with engine.connect() as conn:
        with pytest.raises(DBAPIError, match="no_such_table"):
            list(query.rows(conn, chunk=10))
        with pytest.raises(DBAPIError, match="no_such_table"):
            query.first(conn)
        assert (
            conn.execute(
                select(schema.credit_card_types.c.name).where(schema.credit_card_types.c.card_type_id == 7)
            ).scalar_one()
            == "type 7"
        )
