"""The MariaDB fixtures work: a fresh database, exact DECIMAL round trip, env for subprocesses."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.mysql


def test_decimal_round_trip_is_exact(mysql_database):
    engine = create_engine(mysql_database)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE amounts (id INT PRIMARY KEY, amount DECIMAL(12,2) NOT NULL)"))
            conn.execute(text("INSERT INTO amounts VALUES (1, :a)"), {"a": Decimal("0.10")})
        with engine.connect() as conn:
            amount = conn.execute(text("SELECT amount FROM amounts WHERE id = 1")).scalar_one()
            db_name = conn.execute(text("SELECT DATABASE()")).scalar_one()
    finally:
        engine.dispose()
    assert isinstance(amount, Decimal)
    assert amount == Decimal("0.10")
    assert str(amount) == "0.10"
    assert db_name == mysql_database.database
    assert db_name.startswith("cardpipe_test_")


def test_database_is_fresh_and_env_points_at_it(mysql_database, mysql_env):
    assert mysql_env["DB_NAME"] == mysql_database.database
    assert set(mysql_env) == {"DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME"}
    engine = create_engine(mysql_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW TABLES")).all() == []
    finally:
        engine.dispose()
