"""The producer against a real (embedded) broker: every message acknowledged is counted, and a message the
broker never acknowledges is an error, though librdkafka reports failed deliveries alone (no report per
message)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from cardpipe.errors import BrokerUnavailable
from cardpipe.stream import producer
from cardpipe.stream.broker import broker_session, ensure_topic, stop_broker
from cardpipe.stream.producer import publish_messages

pytestmark = pytest.mark.kafka


def _messages(count: int) -> list[tuple[bytes, bytes]]:
    return [(str(i % 7).encode(), f'{{"n":{i}}}'.encode()) for i in range(count)]


def _read_back(bootstrap_servers: str, topic: str, expected: int) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "t", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        values: list[bytes] = []
        for _ in range(200):
            values += [m.value() for m in consumer.consume(1000, timeout=0.2) if m.error() is None]
            if len(values) >= expected:
                break
        return values
    finally:
        consumer.close()


def test_every_message_is_published_and_counted(tmp_path: Path) -> None:
    with broker_session(None, tmp_path / "broker") as broker:
        ensure_topic(broker.bootstrap_servers, "produced", partitions=1)
        messages = _messages(25_000)
        summary = publish_messages(messages, broker.bootstrap_servers, "produced")
        assert (summary.published, summary.failed) == (25_000, 0)
        assert _read_back(broker.bootstrap_servers, "produced", 25_000) == [v for _, v in messages]


def test_messages_never_acknowledged_are_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(producer.PRODUCER_DEFAULTS, "message.timeout.ms", 2_000)

    def broker_gone_after_the_first(messages: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        yield messages[0]
        stop_broker(tmp_path / "broker")  # the rest can never be delivered: they time out after 2 s
        yield from messages[1:]

    with broker_session(None, tmp_path / "broker") as broker:
        ensure_topic(broker.bootstrap_servers, "lost", partitions=1)
        with pytest.raises(BrokerUnavailable, match=r"of 3000 messages were not acknowledged by the broker"):
            publish_messages(broker_gone_after_the_first(_messages(3_000)), broker.bootstrap_servers, "lost")
