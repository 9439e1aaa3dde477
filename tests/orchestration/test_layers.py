"""Acceptance: layer by layer on the real broker and MariaDB, against pure-Python computations.

A generated dataset of 20,000 transactions with the hard cases (exact-half-limit amounts, short zips,
refunds, timestamp ties, a customer with no card) goes through each layer separately.
"""

import json
from collections import defaultdict
from decimal import Decimal

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from sqlalchemy import create_engine, select, text

from cardpipe.config import Settings
from cardpipe.domain.authorization import zip_of
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.stream.broker import broker_session
from cardpipe.stream.consumer import ConsumeOptions
from tests.orchestration.helpers import (
    assert_results_match_reference,
    cardpipe,
    env_without_services,
    read_csv_rows,
    reference_results,
)

pytestmark = [pytest.mark.mysql, pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]
N_TRANSACTIONS = 20_000


def read_topic(bootstrap: str, topic: str) -> dict[int, list]:
    """Every message of every partition, read independently of cardpipe's consumer."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "test-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        by_partition: dict[int, list] = defaultdict(list)
        done: set[int] = set()
        while done != set(partitions):
            for msg in consumer.consume(10_000, timeout=1):
                if msg.error() is None:
                    by_partition[msg.partition()].append(msg)
                    done.discard(msg.partition())
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
        return by_partition
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("generated")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=2026))
    return data


def test_generated_dataset_has_the_hard_cases(dataset):
    cards = {r["card_id"]: r for r in read_csv_rows(dataset / "cards.csv")}
    txs = read_csv_rows(dataset / "transactions.csv")
    assert len(txs) == N_TRANSACTIONS
    half = [t for t in txs if abs(Decimal(t["amount"])) * 2 == Decimal(cards[t["card_id"]]["credit_limit"])]
    short_zips = [t for t in txs if len(zip_of(t["location"]) or "") < 5]
    refunds = [t for t in txs if Decimal(t["amount"]) < 0]
    stamps: dict[str, int] = defaultdict(int)
    for t in txs:
        stamps[t["timestamp"]] += 1
    with_cards = {c["customer_id"] for c in cards.values()}
    no_card = [c for c in read_csv_rows(dataset / "customers.csv") if c["customer_id"] not in with_cards]
    assert half and short_zips and refunds and no_card
    assert max(stamps.values()) > 1


def test_each_layer_against_mariadb_and_the_broker(dataset, tmp_path, mysql_env, mysql_database):
    results = tmp_path / "results"
    settings = Settings.from_env(env=mysql_env, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    all_ids = sorted(int(t["transaction_id"]) for t in read_csv_rows(dataset / "transactions.csv"))

    with broker_session(None, results) as broker:
        # Producer: every transaction exactly once, keyed by card, in timestamp order per card.
        published = commands.produce(settings, broker=broker)
        assert published.published == N_TRANSACTIONS
        by_partition = read_topic(broker.bootstrap_servers, settings.kafka_topic)
        assert len(by_partition) > 1, "the topic is partitioned"
        seen_ids = []
        card_partition: dict[int, int] = {}
        for partition, msgs in by_partition.items():
            last_per_card: dict[int, tuple] = {}
            for msg in msgs:
                value = json.loads(msg.value())
                card = value["card_id"]
                assert msg.key() == str(card).encode()
                assert card_partition.setdefault(card, partition) == partition, "a card spans partitions"
                order = (value["timestamp"], value["transaction_id"])
                assert order > last_per_card.get(card, ("", 0)), "out of order within a card"
                last_per_card[card] = order
                seen_ids.append(value["transaction_id"])
        assert sorted(seen_ids) == all_ids

        # Consumer: decisions equal the pure domain rules applied in order.
        summary = commands.consume(settings, ConsumeOptions(until_caught_up=True, batch_size=2000), broker=broker)
        assert summary.messages == N_TRANSACTIONS and summary.counts["rejected"] == 0

    decisions, settlement = reference_results(dataset)
    assert {v[1] for v in decisions.values()} == {"pending", "declined"}
    engine = create_engine(mysql_database)
    try:
        with engine.connect() as conn:
            stream = {
                r.transaction_id: (r.status, r.pending_balance, r.decline_reason)
                for r in conn.execute(select(schema.stream_transactions))
            }
        assert stream == {k: v[1:] for k, v in decisions.items()}

        # Batch, in its own process as a user runs it: equal to the pure-Python settlement.
        cardpipe(["batch", "--results-dir", str(results)], env_without_services(**mysql_env))
        assert_results_match_reference(results, dataset)
        with engine.connect() as conn:
            cards = {
                r.card_id: (r.credit_limit, r.current_balance)
                for r in conn.execute(text("SELECT card_id, credit_limit, current_balance FROM cards_updated"))
            }
            scores = dict(conn.execute(text("SELECT customer_id, credit_score FROM customers_updated")).all())
    finally:
        engine.dispose()
    assert cards == {c.card_id: (c.credit_limit, c.current_balance) for c in settlement.cards}
    assert scores == {c.customer_id: c.credit_score for c in settlement.customers}
