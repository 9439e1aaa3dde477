"""The transactions to publish, read from the serving database: ``messages_from_database`` encodes the driver's
values directly (MySQL/MariaDB: the server renders them), and must give exactly the bytes ``encode_transaction``
gives for ``transactions_from_database``'s objects, in the same order, on both backends."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest
from sqlalchemy import URL, text

from cardpipe.serving import schema, transaction_source
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.mysql_client import CLIENT_ENV, client_rows
from cardpipe.serving.transaction_source import (
    CardShare,
    messages_from_database,
    shares_supported,
    transactions_from_database,
)
from cardpipe.stream.codec import encode_transaction

AMOUNTS = [
    D("0.00"),
    D("-0.00"),
    D("0.01"),
    D("-0.01"),
    D("0.10"),
    D("100.00"),
    D("-100.00"),
    D("5000.00"),
    D("397.18"),
    D("9999999999.99"),
    D("-9999999999.99"),
    D("1234567.89"),
]
TEXTS = [
    "plain",
    'a "quote"',
    "a, comma",
    "Zoë ✓ 東京 😀",
    "back\\slash",
    "tab\there",
    "9004 Harris Viaduct, NY 14845",
    "slash/and 'single' \u2028 line separator",
    "ends in a backslash\\",
    '\\"',
]


def transaction_rows(count: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    start = datetime(2025, 4, 1)
    rows = []
    for i in range(count):
        amount = AMOUNTS[i] if i < len(AMOUNTS) else D(rng.randint(-(10**12) + 1, 10**12 - 1)).scaleb(-2)
        if i % 5 == 0 and i >= len(AMOUNTS):
            amount = D(rng.randint(-(10**10), 10**10))  # whole: SQLite stores it as an INTEGER
        stamp = start + timedelta(seconds=rng.randint(0, 10**7))
        if i == 3:
            stamp = datetime(999, 2, 3, 4, 5, 6)  # a year of three digits
        if i == 4:
            stamp = datetime(2025, 4, 1, 0, 0, 1, 999_999)  # a fraction of a second: not on the topic
        rows.append(
            {
                "transaction_id": 1_000_000 - i * 37,
                "card_id": 1 + i % 11,
                "merchant_name": TEXTS[i % len(TEXTS)],
                "timestamp": stamp if i % 13 else start,  # ties on the timestamp: ordered by id
                "amount": amount,
                "location": TEXTS[(i * 3) % len(TEXTS)],
                "transaction_type": "purchase" if i % 3 else "refund",
                "related_transaction_id": None if i % 4 else 2**62 + i,
            }
        )
    return rows


def test_messages_are_the_encoded_transactions_in_the_same_order(database_url, monkeypatch) -> None:
    """On MySQL/MariaDB both ways: read by the server's command-line client, and on the driver's cursor."""
    read_by_client: list[bool] = []

    def spied(*args: Any) -> Any:
        rows = client_rows(*args)
        read_by_client.append(rows is not None)
        return rows

    monkeypatch.setattr(transaction_source, "client_rows", spied)
    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        rows = transaction_rows(3_000)
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text("PRAGMA foreign_keys = OFF"))
            else:
                conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
            conn.execute(schema.transactions.insert(), rows)
            decided = rows[::7]
            conn.execute(
                schema.stream_transactions.insert(),
                [
                    {**r, "status": "declined", "pending_balance": D("0"), "kafka_partition": 0, "checkpoint_seq": 1}
                    for r in decided
                ],
            )
        clients = ("auto",) if engine.dialect.name == "sqlite" else ("auto", "off")
        for client in clients:
            monkeypatch.setenv(CLIENT_ENV, client)
            for only_undecided in (True, False):
                expected = [
                    encode_transaction(tx) for tx in transactions_from_database(engine, only_undecided=only_undecided)
                ]
                got = list(messages_from_database(engine, only_undecided=only_undecided, chunk=500))
                assert got == expected
                assert len(got) == len(rows) - (len(decided) if only_undecided else 0)
        if engine.dialect.name != "sqlite":
            assert read_by_client == [True, True, False, False]
        assert any(b'"amount":"-9999999999.99"' in value for _, value in got)
        assert any(b'"timestamp":"0999-02-03 04:05:06"' in value for _, value in got)
    finally:
        engine.dispose()


def test_without_sqlites_json_functions_python_encodes_the_same_bytes(tmp_path, monkeypatch) -> None:
    """SQLite before 3.38 has no built-in JSON functions: the messages are then encoded in Python, the same."""
    from cardpipe.serving import transaction_source

    engine = make_engine(URL.create("sqlite", database=str(tmp_path / "cardpipe.db")))
    try:
        create_clean_schema(engine)
        with engine.begin() as conn:
            conn.execute(text("PRAGMA foreign_keys = OFF"))
            conn.execute(schema.transactions.insert(), transaction_rows(500))
        by_sqlite = list(messages_from_database(engine, only_undecided=False))
        monkeypatch.setattr(transaction_source, "_SQLITE_JSON", False)
        assert transaction_source._rendered_by_database("sqlite") is None
        in_python = list(messages_from_database(engine, only_undecided=False))
        assert in_python == by_sqlite == [encode_transaction(tx) for tx in transactions_from_database(engine)]
    finally:
        engine.dispose()


def test_a_share_of_the_cards_is_their_messages_in_order_and_the_others_the_rest(database_url) -> None:
    """Publishing in parts (``produce --processes``): a share reads the messages of its cards, the other share of
    every card but them, in the same order as all of them; only SQLite reads shares (MySQL/MariaDB: an error)."""
    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text("PRAGMA foreign_keys = OFF"))  # cards 1-11 are in no ``cards`` row
            else:
                conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
            conn.execute(schema.transactions.insert(), transaction_rows(1_000))
        share = CardShare((2, 5, 11))
        if not shares_supported(engine):
            with pytest.raises(ValueError, match="SQLite"):
                list(messages_from_database(engine, share=share))
            return
        every = list(messages_from_database(engine, only_undecided=False))
        mine = list(messages_from_database(engine, only_undecided=False, share=share, chunk=100))
        rest = list(messages_from_database(engine, only_undecided=False, share=CardShare((2, 5, 11), others=True)))
        assert mine == [m for m in every if int(m[0]) in share.card_ids]
        assert rest == [m for m in every if int(m[0]) not in share.card_ids]
        assert len(mine) > 0 and len(rest) > len(mine)
        assert list(messages_from_database(engine, only_undecided=False, share=CardShare(()))) == []
    finally:
        engine.dispose()
