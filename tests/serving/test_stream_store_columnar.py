"""Batches decided column by column (cardpipe.stream.columnar) are stored as the per-message path stores them,
on SQLite and on MariaDB: every value of the stream's tables, as the driver reads it back."""

from dataclasses import replace
from datetime import datetime
from decimal import Decimal as D

from sqlalchemy import Engine

from cardpipe.domain.records import Transaction
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import transactions_from_csv
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor

STORED = {
    "stream_transactions": "transaction_id",
    "card_states": "card_id",
    "stream_offsets": "kafka_partition",
    "stream_checkpoint_log": "checkpoint_id",
}
LOG_COLUMNS = "checkpoint_id, topic, messages, pending, declined, rejected, duplicates, reasons, settlement_id"


def stored(engine: Engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {
            table: [
                tuple(row)
                for row in conn.exec_driver_sql(
                    f"SELECT {LOG_COLUMNS if table == 'stream_checkpoint_log' else '*'} FROM {table} ORDER BY {key}"
                )
            ]
            for table, key in STORED.items()
        }


def test_batches_decided_column_by_column_are_stored_as_one_by_one(database_url, seed_dataset) -> None:
    transactions = transactions_from_csv(seed_dataset / "input" / "transactions.csv")
    card = transactions[0].card_id
    extra = [  # texts to quote and escape, other scripts, negative and zero amounts, a related id
        Transaction(900001, card, "Shop 'A', \"B\" \\", datetime(2025, 4, 2), D("-0.00"), "x, NY 10001", "refund", 1),
        Transaction(900002, card, "Ünïcode ✓ 😀", datetime(2025, 4, 2, 0, 0, 1), D("0.01"), "Zürich 80331", "purchase"),
        replace(transactions[1], transaction_id=900003, amount=D("-75.25")),
    ]
    values = [encode_transaction(t)[1] for t in [*transactions, *extra]]
    engine = make_engine(database_url)
    try:
        outcome = {}
        for columnar in (False, True):
            create_clean_schema(engine)
            load_inputs(engine, seed_dataset / "input")
            store = StreamStore(engine, "topic-a")
            processor = StreamProcessor(
                store.topic, {}, {}, store.lookup_decided, load_cards=store.load_cards, columnar=columnar
            )
            for start in range(0, len(values), 97):  # batches with a card's transactions more than once
                chunk = values[start : start + 97]
                messages = [RawMessage(start % 3, start + i, None, v, None) for i, v in enumerate(chunk)]
                store.commit(processor.process(messages))
            assert processor.columnar_batches == (len(range(0, len(values), 97)) if columnar else 0)
            outcome[columnar] = stored(engine)
        assert outcome[True] == outcome[False]
        assert len(outcome[True]["stream_transactions"]) == len(values)
    finally:
        engine.dispose()
