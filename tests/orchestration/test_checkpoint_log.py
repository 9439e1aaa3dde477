"""The stream's history: one ``stream_checkpoint_log`` row per committed checkpoint, written in its transaction,
whose counts add up to the decisions in ``stream_transactions`` (what the report, dashboard and metrics read)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sqlalchemy import func, select

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.serving.database import make_engine

pytestmark = [pytest.mark.kafka]


def test_the_checkpoint_log_adds_up_to_the_decisions(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=6_000, customers=300, seed=515))
    settings = Settings.from_env(env={"CONSUMER_BATCH_SIZE": "500"}, results_dir=tmp_path / "results", data_dir=data)
    commands.run(settings)
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            log = [r._asdict() for r in conn.execute(select(schema.stream_checkpoint_log))]
            st = schema.stream_transactions
            by_status = dict(conn.execute(select(st.c.status, func.count()).group_by(st.c.status)).all())
            declines = dict(
                conn.execute(
                    select(st.c.decline_reason, func.count())
                    .where(st.c.status == "declined")
                    .group_by(st.c.decline_reason)
                ).all()
            )
            rejections = dict(
                conn.execute(
                    select(schema.rejected_transactions.c.reason, func.count()).group_by(
                        schema.rejected_transactions.c.reason
                    )
                ).all()
            )
    finally:
        engine.dispose()
    assert len(log) >= 6_000 // 500, "one row per checkpoint (batches of at most 500)"
    assert sum(r["pending"] for r in log) == by_status.get("pending", 0) > 0
    assert sum(r["declined"] for r in log) == by_status.get("declined", 0) > 0
    assert sum(r["messages"] for r in log) == 6_000
    reasons: Counter[str] = Counter()
    for r in log:
        reasons.update(json.loads(r["reasons"]))
    assert {k.split(":", 1)[1]: n for k, n in reasons.items() if k.startswith("declined:")} == declines
    assert {k.split(":", 1)[1]: n for k, n in reasons.items() if k.startswith("rejected:")} == rejections
    committed = [r["committed_ms"] for r in log]
    assert committed == sorted(committed)
    for r in log:
        assert 0 <= r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"] < 120_000
        assert sum(json.loads(r["latency_buckets"])) >= r["pending"] + r["declined"]
        assert r["newest_publish_ms"] <= r["committed_ms"]
    assert log[-1]["lag_messages"] == 0, "drained: nothing left on the topic after the last checkpoint"
    assert all(r["lag_messages"] is None or r["lag_messages"] >= 0 for r in log)


def test_the_consumer_group_sees_the_databases_offsets(tmp_path):
    """After each database checkpoint the same offsets are committed to the consumer group: Kafka's own tools
    (here kafka-python's admin client, an independent implementation) see what the database holds."""
    from kafka import KafkaAdminClient

    from cardpipe.stream.broker import broker_session
    from cardpipe.stream.consumer import ConsumeOptions

    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=3_000, customers=200, seed=516))
    results = tmp_path / "results"
    with broker_session(None, tmp_path / "broker") as broker:
        settings = Settings.from_env(
            env={"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "KAFKA_GROUP_ID": "cardpipe-test-group"},
            results_dir=results,
            data_dir=data,
        )
        commands.setup(settings)
        commands.load(settings)
        commands.produce(settings)
        commands.consume(settings, ConsumeOptions(until_caught_up=True, batch_size=400))
        engine = make_engine(settings.database_url)
        try:
            with engine.connect() as conn:
                so = schema.stream_offsets
                in_database = {
                    p: o
                    for p, o in conn.execute(
                        select(so.c.kafka_partition, so.c.next_offset).where(so.c.topic == settings.kafka_topic)
                    )
                    if o is not None
                }
        finally:
            engine.dispose()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        try:
            committed = admin.list_group_offsets("cardpipe-test-group")["cardpipe-test-group"]
        finally:
            admin.close()
    in_group = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == settings.kafka_topic}
    assert sum(in_database.values()) == 3_000
    assert in_group == in_database
