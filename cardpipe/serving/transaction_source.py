"""Transactions to publish, in timestamp order (ties by id): from the serving database or from a CSV file."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from typing import cast as cast_type

from sqlalchemy import (
    CHAR,
    Engine,
    LargeBinary,
    Select,
    String,
    Text,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    type_coerce,
)
from sqlalchemy.dialects.mysql import BINARY
from sqlalchemy.types import NullType

from cardpipe.domain.records import TRANSACTION_COLUMNS, Transaction
from cardpipe.serving import schema
from cardpipe.serving.csv_io import exported_text, read_typed_rows
from cardpipe.serving.driver_query import DriverQuery
from cardpipe.serving.mysql_client import client_rows
from cardpipe.stream.codec import encode_fields


@dataclass(frozen=True)
class CardShare:
    """The transactions of some cards only: those of ``card_ids``, or with ``others`` those of every other card
    (so that the shares of a publication in parts leave no transaction out, whatever card it names)."""

    card_ids: tuple[int, ...]
    others: bool = False

    def param(self) -> str:
        """The ids as the one value the query binds (a JSON array)."""
        return json.dumps(self.card_ids)


def _in_publish_order(*columns: Any, only_undecided: bool, share: CardShare | None = None) -> Select[Any]:
    """``columns`` of the transactions to publish, in timestamp order (ties by id); with ``only_undecided``
    those not in ``stream_transactions`` yet; with ``share`` those of its cards (SQLite: the ids bound as one
    JSON array, ``cards``, read by ``json_each``)."""
    t, s = schema.transactions, schema.stream_transactions
    query = select(*columns)
    if only_undecided:
        query = query.outerjoin(s, s.c.transaction_id == t.c.transaction_id).where(s.c.transaction_id.is_(None))
    if share is not None:
        cards = select(func.json_each(bindparam("cards", type_=String)).table_valued("value").c.value)
        query = query.where(t.c.card_id.not_in(cards) if share.others else t.c.card_id.in_(cards))
    return query.order_by(t.c.timestamp, t.c.transaction_id)


def transactions_from_database(
    engine: Engine, *, only_undecided: bool = True, chunk: int = 20_000
) -> Iterator[Transaction]:
    """Stream the ``transactions`` table in timestamp order (ties by id) without loading it all.

    With ``only_undecided`` (the default) transactions already in ``stream_transactions`` are
    skipped, so a re-run publishes only what is missing.
    """
    query = _in_publish_order(*schema.transactions.columns, only_undecided=only_undecided)
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=chunk).execute(query):
            yield Transaction(*row)


def _timestamp_text(stored: str | datetime) -> str:
    """A stored timestamp as the message writes it (``YYYY-MM-DD HH:MM:SS``): SQLite keeps SQLAlchemy's text,
    ``YYYY-MM-DD HH:MM:SS.ffffff``, whose first 19 characters it is; MySQL's driver gives a ``datetime``."""
    return stored[:19] if type(stored) is str else stored.isoformat(" ", "seconds")  # type: ignore[union-attr]


def _money_text(stored: float | int | Decimal) -> str:
    """A stored amount as the message writes it, two decimals: SQLite keeps a NUMERIC as REAL or INTEGER, which
    SQLAlchemy reads as ``Decimal("%.2f" % value)`` (the same text); MySQL's driver gives the exact Decimal."""
    return str(stored) if type(stored) is Decimal else f"{stored:.2f}"


#: SQLite has its JSON functions built in from 3.38 on.
_SQLITE_JSON = tuple(int(part) for part in sqlite3.sqlite_version.split(".")[:2]) >= (3, 38)


def _rendered_by_database(dialect: str) -> tuple[Any, Any] | None:
    """The (key, value) of each transaction's message as bytes rendered by the database, the text
    :func:`~cardpipe.stream.codec.encode_fields` writes: the CSV's columns in order, compact separators, money and
    timestamp as the output files write them (:func:`~cardpipe.serving.csv_io.exported_text`), texts quoted by the
    database's JSON functions, which escape as orjson does what the checks let into a text. The driver then hands
    over two values per row instead of eight, and Python builds no message. None where the database cannot."""
    t = schema.transactions
    raw = NullType()  # no result processor: the driver's bytes

    def text_of(column: Any) -> Any:
        exported = exported_text(column, dialect)
        return getattr(exported, "element", exported)  # the expression, not its label

    def value_of(name: str) -> Any:
        return text_of(t.c[name]) if name in ("timestamp", "amount") else t.c[name]

    if dialect == "sqlite":
        if not _SQLITE_JSON:
            return None
        pairs: list[Any] = []
        for name in TRANSACTION_COLUMNS:
            pairs += [literal_column(f"'{name}'"), value_of(name)]
        key: Any = cast(cast(t.c.card_id, Text), LargeBinary)
        return type_coerce(key, raw), type_coerce(cast(func.json_object(*pairs), LargeBinary), raw)
    if dialect not in ("mysql", "mariadb"):
        return None
    parts: list[Any] = []
    for name in TRANSACTION_COLUMNS:
        parts.append(("{" if not parts else ",") + f'"{name}":')
        if name in ("transaction_id", "card_id"):
            parts.append(t.c[name])
        elif name == "related_transaction_id":
            parts.append(func.coalesce(cast(t.c[name], CHAR), "null"))
        else:
            parts.append(func.json_quote(value_of(name)))
    parts.append("}")
    key = type_coerce(cast(t.c.card_id, BINARY()), raw)
    value = type_coerce(cast(func.concat(*parts), BINARY()), raw)
    return key, value


def shares_supported(engine: Engine) -> bool:
    """Whether :func:`messages_from_database` can read a :class:`CardShare` of the transactions from ``engine``:
    SQLite (3.38 or later, for its JSON functions)."""
    return engine.dialect.name == "sqlite" and _SQLITE_JSON


def messages_from_database(
    engine: Engine, *, only_undecided: bool = True, chunk: int = 20_000, share: CardShare | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """The topic's (key, value) of :func:`transactions_from_database`'s transactions, in its order, encoded
    from the values as the driver gives them: no Transaction, Decimal or datetime per row, the same bytes as
    :func:`~cardpipe.stream.codec.encode_transaction` of each (tested on both backends). The database renders
    them where it can (:func:`_rendered_by_database`). ``share``: only those of its cards (where
    :func:`shares_supported`)."""
    t = schema.transactions
    raw = NullType()  # no result processor: the driver's own value
    rendered_columns = _rendered_by_database(engine.dialect.name)
    if share is not None:
        if not shares_supported(engine) or rendered_columns is None:
            raise ValueError(f"a share of the transactions is read from SQLite 3.38 or later, not {engine.url}")
        query = DriverQuery(_in_publish_order(*rendered_columns, only_undecided=only_undecided, share=share))
        with engine.connect() as conn:
            yield from query.rows(conn, {"cards": share.param()}, chunk=chunk)
        return
    if rendered_columns is not None:
        statement = _in_publish_order(*rendered_columns, only_undecided=only_undecided)
        # MySQL/MariaDB: read by the server's command-line client where it can (a key and a JSON text hold no tab
        # and no line break); else on the driver's cursor.
        by_client = client_rows(engine, statement)
        if by_client is not None:
            for rows in by_client:
                yield from cast_type(list[tuple[bytes, bytes]], rows)
            return
        with engine.connect() as conn:
            yield from DriverQuery(statement).rows(conn, chunk=chunk)  # rows of two bytes values
        return
    columns = [type_coerce(c, raw) if c.name in ("timestamp", "amount") else c for c in t.columns]
    query = DriverQuery(_in_publish_order(*columns, only_undecided=only_undecided))
    with engine.connect() as conn:
        for tid, cid, merchant, stamp, amount, location, kind, related in query.rows(conn, chunk=chunk):
            yield encode_fields(
                tid, cid, merchant, _timestamp_text(stamp), _money_text(amount), location, kind, related
            )


def _undecided(*columns: Any) -> Select[Any]:
    """``columns`` of the transactions of the ``transactions`` table with no decision in ``stream_transactions``."""
    t, s = schema.transactions, schema.stream_transactions
    return (
        select(*columns)
        .select_from(t.outerjoin(s, s.c.transaction_id == t.c.transaction_id))
        .where(s.c.transaction_id.is_(None))
        # MySQL/MariaDB would read transactions through a secondary index, so look the decisions up in random
        # order (7x slower at 500k once they outgrow the buffer pool): in primary-key order both are read in order.
        .with_hint(t, "FORCE INDEX (PRIMARY)", dialect_name="mysql")
        .with_hint(t, "FORCE INDEX (PRIMARY)", dialect_name="mariadb")
    )


def count_undecided(engine: Engine) -> int:
    """How many transactions of the ``transactions`` table have no decision in ``stream_transactions`` yet."""
    t, s = schema.transactions, schema.stream_transactions
    with engine.connect() as conn:
        if conn.execute(select(s.c.transaction_id).limit(1)).first() is None:  # nothing decided: no join
            return int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        return int(conn.execute(_undecided(func.count())).scalar_one())


def undecided_ids(engine: Engine, *, chunk: int = 20_000) -> list[int]:
    """The ids :func:`count_undecided` counts, in id order."""
    query = DriverQuery(_undecided(schema.transactions.c.transaction_id).order_by(schema.transactions.c.transaction_id))
    with engine.connect() as conn:
        return [row[0] for rows in query.chunks(conn, chunk=chunk) for row in rows]


def still_undecided(engine: Engine, ids: Sequence[int], *, chunk: int = 20_000) -> list[int]:
    """Those of ``ids`` that have no decision in ``stream_transactions``, in id order: what :func:`undecided_ids`
    gave earlier, looked up again (decisions are only ever added while the stream runs). MySQL/MariaDB: the ids
    go to the server as one JSON array per ``chunk`` (``JSON_TABLE``, MariaDB 10.6 and MySQL 8.0 on) and only
    the undecided come back; elsewhere an ``IN`` list per chunk."""
    s = schema.stream_transactions
    left: list[int] = []
    with engine.connect() as conn:
        if conn.dialect.name in ("mysql", "mariadb"):
            table = conn.dialect.identifier_preparer.format_table(s)
            key = conn.dialect.identifier_preparer.quote(s.c.transaction_id.name)
            sql = (
                "SELECT j.id FROM JSON_TABLE(%s, '$[*]' COLUMNS (id BIGINT PATH '$')) AS j "
                f"LEFT JOIN {table} AS s ON s.{key} = j.id WHERE s.{key} IS NULL"
            )
            for start in range(0, len(ids), chunk):
                array = "[" + ",".join(map(str, ids[start : start + chunk])) + "]"
                left += conn.exec_driver_sql(sql, (array,)).scalars()
            return sorted(left)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            decided = set(conn.execute(select(s.c.transaction_id).where(s.c.transaction_id.in_(part))).scalars())
            left += [i for i in part if i not in decided]
    return sorted(left)


def transactions_from_csv(path: Path) -> list[Transaction]:
    """Read a transactions CSV (validated like a load) and sort it by timestamp, then id."""
    rows = [Transaction(**row) for row in read_typed_rows(path, schema.transactions)]
    rows.sort(key=lambda tx: (tx.timestamp, tx.transaction_id))
    return rows
