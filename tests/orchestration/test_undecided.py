"""What the stream leaves undecided, counted ahead (``cardpipe.orchestration.undecided``): the ids listed and looked up
again on both backends, the count prepared while a stand-in consumer writes decisions and checkpoint log rows equal
to the anti-join's, the fallback when the stream ends first or a read fails, and on MariaDB with the real broker a
transaction missing from the topic found after the drain and published again."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import text

from cardpipe.orchestration import undecided as undecided_module
from cardpipe.orchestration.undecided import UndecidedAhead
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.transaction_source import count_undecided, still_undecided, undecided_ids

TOPIC = "transactions"


def _without_foreign_keys(conn) -> None:
    if conn.dialect.name == "sqlite":
        conn.execute(text("PRAGMA foreign_keys = OFF"))
    else:
        conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))


def _transaction(tid: int) -> dict:
    return {
        "transaction_id": tid,
        "card_id": 1 + tid % 5,
        "merchant_name": "m",
        "timestamp": datetime(2025, 4, 1) + timedelta(seconds=tid),
        "amount": Decimal("1.50"),
        "location": "l",
        "transaction_type": "purchase",
        "related_transaction_id": None,
    }


def _decide(engine, ids, seq: int = 1) -> None:
    with engine.begin() as conn:
        _without_foreign_keys(conn)
        conn.execute(
            schema.stream_transactions.insert(),
            [
                {**_transaction(t), "status": "pending", "pending_balance": Decimal("1.50")}
                | {"kafka_partition": 0, "checkpoint_seq": seq}
                for t in ids
            ],
        )


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    create_clean_schema(engine)
    with engine.begin() as conn:
        _without_foreign_keys(conn)
        conn.execute(schema.transactions.insert(), [_transaction(t) for t in range(1, 2_001)])
    yield engine
    engine.dispose()


def test_the_undecided_listed_then_looked_up_again(engine) -> None:
    _decide(engine, [*range(3, 2_001, 3), 99_999])  # a decision of a transaction the table does not hold
    listed = undecided_ids(engine, chunk=100)
    assert listed == [t for t in range(1, 2_001) if t % 3] and count_undecided(engine) == len(listed)
    _decide(engine, range(2, 1_500, 3), seq=2)
    assert still_undecided(engine, listed, chunk=70) == [
        t for t in range(1, 2_001) if t % 3 == 1 or t > 1_500 and t % 3
    ]
    assert still_undecided(engine, listed, chunk=70) == undecided_ids(engine)
    assert still_undecided(engine, []) == []


def _log_row(messages: int, lag: int | None, owner: str = "host:1:0") -> dict:
    return {
        "topic": TOPIC,
        "owner": owner,
        "committed_ms": int(time.time() * 1000),
        "messages": messages,
        "pending": messages,
        "declined": 0,
        "rejected": 0,
        "duplicates": 0,
        "reasons": "{}",
        "lag_messages": lag,
    }


@pytest.mark.parametrize("lag_known", [True, False])
def test_counted_ahead_while_deciding_equals_the_count_after(engine, monkeypatch, lag_known: bool) -> None:
    """A stand-in consumer decides 1,990 of the 2,000 transactions, 50 a checkpoint: the ids are listed once the
    messages left are few (its lag, or when it does not know it, the transactions less what it decided), looked up
    again meanwhile, and the count after equals the anti-join's."""
    monkeypatch.setattr(undecided_module, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(undecided_module, "LEAD_SECONDS", 0.3)
    monkeypatch.setattr(undecided_module, "LEAD_SECONDS_PER_TRANSACTION", 0.0)
    ahead = UndecidedAhead(engine, TOPIC, count_undecided(engine))
    listed_with: list[int] = []
    real_listing = undecided_module.undecided_ids
    monkeypatch.setattr(
        undecided_module, "undecided_ids", lambda e: listed_with.append(count_undecided(e)) or real_listing(e)
    )
    ahead.start()
    order = [t for t in range(1, 2_001) if t % 200]  # 1,990: every 200th is never decided
    for i in range(0, len(order), 50):
        _decide(engine, order[i : i + 50], seq=i // 50 + 1)
        with engine.begin() as conn:
            lag = len(order) - i - 50 if lag_known else None
            conn.execute(schema.stream_checkpoint_log.insert(), [_log_row(50, lag)])
        time.sleep(0.02)
    time.sleep(0.1)  # the last checkpoint read
    assert ahead.count() == count_undecided(engine) == 10
    assert listed_with and 10 <= listed_with[0] < 2_000, "listed ahead, near the end"


def test_a_stream_that_ends_first_is_counted_afresh(engine) -> None:
    ahead = UndecidedAhead(engine, TOPIC, 2_000)
    ahead.start()
    _decide(engine, range(1, 1_001))
    assert ahead.count() == count_undecided(engine) == 1_000  # no checkpoint logged: nothing listed


def test_a_failed_read_falls_back_to_the_count(engine, monkeypatch, caplog) -> None:
    monkeypatch.setattr(undecided_module, "POLL_SECONDS", 0.01)

    def broken(_engine):
        raise RuntimeError("the server went away")

    monkeypatch.setattr(undecided_module, "undecided_ids", broken)
    ahead = UndecidedAhead(engine, TOPIC, 2_000)
    with caplog.at_level(logging.DEBUG, logger="cardpipe"):
        ahead.start()
        for _ in range(2):  # two checkpoints, nothing left: the ids are listed
            time.sleep(0.05)
            with engine.begin() as conn:
                conn.execute(schema.stream_checkpoint_log.insert(), [_log_row(100, 0)])
        deadline = time.monotonic() + 10
        while "the server went away" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "the server went away" in caplog.text
    assert ahead.count() == 2_000


@pytest.mark.mysql
@pytest.mark.kafka
def test_transactions_missing_from_the_topic_are_found_after_the_drain(
    tmp_path, mysql_env, caplog, monkeypatch
) -> None:
    """MariaDB and the embedded broker: three transactions loaded after ``produce`` ran (so not on the topic), and
    three messages of transactions the table does not hold: ``consume`` finishing the stream lists the undecided
    ahead, finds the three after the drain and publishes them again."""
    from cardpipe.config import Settings
    from cardpipe.domain.records import STREAM_COLUMNS, Transaction
    from cardpipe.generate import GeneratorConfig, generate_dataset
    from cardpipe.orchestration import commands
    from cardpipe.serving.csv_io import export_table_lines
    from cardpipe.stream.broker import broker_session
    from cardpipe.stream.codec import encode_transaction
    from cardpipe.stream.consumer import ConsumeOptions
    from cardpipe.stream.producer import publish_messages

    monkeypatch.setattr(undecided_module, "LEAD_SECONDS", 60.0)  # listed at the first checkpoints, however slow
    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=30_000, seed=31))
    settings = Settings.from_env(env=mysql_env, results_dir=tmp_path / "results", data_dir=data)
    commands.setup(settings)
    commands.load(settings)
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            card_id = conn.execute(text("SELECT card_id FROM transactions ORDER BY transaction_id LIMIT 1")).scalar()
        late = datetime(2030, 1, 1)

        def transaction(tid: int, offset: int) -> Transaction:
            return Transaction(tid, card_id, "m", late + timedelta(seconds=offset), Decimal("1.00"), "l", "purchase")

        added = [transaction(10_000_000 + i, i) for i in range(3)]  # in the table, not on the topic
        strangers = [transaction(20_000_000 + i, 10 + i) for i in range(3)]  # on the topic, not in the table
        with broker_session(None, settings.results_dir) as broker:
            assert commands.produce(settings, broker=broker).published == 30_000
            with engine.begin() as conn:
                conn.execute(schema.transactions.insert(), [dataclasses.asdict(tx) for tx in added])
            publish_messages(
                [encode_transaction(tx) for tx in strangers], broker.bootstrap_servers, settings.kafka_topic
            )
            with caplog.at_level(logging.DEBUG, logger="cardpipe"):
                summary = commands.consume(
                    settings, ConsumeOptions(until_caught_up=True, batch_size=1_000), broker=broker
                )
        assert "undecided ids listed ahead" in caplog.text
        assert summary.counts["republished"] == len(added)
        whole = tmp_path / "whole.csv"
        with engine.connect() as conn:
            assert export_table_lines(conn, schema.stream_transactions, whole, STREAM_COLUMNS) == 30_006
        assert (settings.results_dir / "stream_transactions.csv").read_bytes() == whole.read_bytes()
        assert count_undecided(engine) == 0
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM stream_transactions")).scalar() == 30_006
    finally:
        engine.dispose()
