"""Transactions to publish, in timestamp order (ties by id): from the serving database or from a CSV file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, func, select

from cardpipe.domain.records import Transaction
from cardpipe.serving import schema
from cardpipe.serving.csv_io import read_typed_rows


def transactions_from_database(
    engine: Engine, *, only_undecided: bool = True, chunk: int = 20_000
) -> Iterator[Transaction]:
    """Stream the ``transactions`` table in timestamp order (ties by id) without loading it all.

    With ``only_undecided`` (the default) transactions already in ``stream_transactions`` are
    skipped, so a re-run publishes only what is missing.
    """
    t, s = schema.transactions, schema.stream_transactions
    query = select(*t.columns)
    if only_undecided:
        query = query.outerjoin(s, s.c.transaction_id == t.c.transaction_id).where(s.c.transaction_id.is_(None))
    query = query.order_by(t.c.timestamp, t.c.transaction_id)
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=chunk).execute(query):
            yield Transaction(*row)


def count_undecided(engine: Engine) -> int:
    """How many transactions of the ``transactions`` table have no decision in ``stream_transactions`` yet."""
    t, s = schema.transactions, schema.stream_transactions
    query = (
        select(func.count())
        .select_from(t.outerjoin(s, s.c.transaction_id == t.c.transaction_id))
        .where(s.c.transaction_id.is_(None))
        # MySQL/MariaDB would read transactions through a secondary index, so look the decisions up in random
        # order (7x slower at 500k once they outgrow the buffer pool): in primary-key order both are read in order.
        .with_hint(t, "FORCE INDEX (PRIMARY)", dialect_name="mysql")
        .with_hint(t, "FORCE INDEX (PRIMARY)", dialect_name="mariadb")
    )
    with engine.connect() as conn:
        if conn.execute(select(s.c.transaction_id).limit(1)).first() is None:  # nothing decided: no join
            return int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        return int(conn.execute(query).scalar_one())


def transactions_from_csv(path: Path) -> list[Transaction]:
    """Read a transactions CSV (validated like a load) and sort it by timestamp, then id."""
    rows = [Transaction(**row) for row in read_typed_rows(path, schema.transactions)]
    rows.sort(key=lambda tx: (tx.timestamp, tx.transaction_id))
    return rows
