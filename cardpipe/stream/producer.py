"""Publishing transactions to the topic: timestamp order (ties by id), keyed by card_id.

confluent-kafka's idempotent producer (acks=all), batched by librdkafka: no flush per message, no
sleep. Keys are partitioned with murmur2, as Java and kafka-python producers do, so every producer
of the topic sends a card's transactions to the same partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from cardpipe.domain.records import Transaction
from cardpipe.errors import BrokerUnavailable
from cardpipe.faults import armed, crash_point
from cardpipe.stream.clients import client_config
from cardpipe.stream.codec import encode_transaction

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS = {
    "enable.idempotence": True,
    "acks": "all",
    # A batch waits at most 10 ms for company: the linger with the lowest publish -> fetched p99 among those
    # measured (bench/latency_bench.py; the figures are in bench/README.md).
    "linger.ms": 10,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "partitioner": "murmur2_random",
    "message.timeout.ms": 120_000,
}


@dataclass
class PublishSummary:
    published: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def producer_setting(name: str, client_settings: Mapping[str, str]) -> Any:
    """What a producer of :func:`make_producer` runs with for the librdkafka key ``name``, in a process given
    ``client_settings``: theirs when they set it (:func:`~cardpipe.stream.clients.client_config`), else
    :data:`PRODUCER_DEFAULTS`' (None when neither does)."""
    return client_config("", PRODUCER_DEFAULTS, client_settings).get(name)


def make_producer(bootstrap_servers: str, **overrides: object) -> Producer:
    return Producer(
        client_config(
            bootstrap_servers, {"logger": logging.getLogger("cardpipe.librdkafka"), **PRODUCER_DEFAULTS, **overrides}
        )
    )


def publish(
    transactions: Iterable[Transaction],
    bootstrap_servers: str,
    topic: str,
    *,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 100_000,
    should_stop: Callable[[], bool] | None = None,
) -> PublishSummary:
    """Publish ``transactions`` in the given order (:func:`publish_messages` of their encoding)."""
    return publish_messages(
        map(encode_transaction, transactions),
        bootstrap_servers,
        topic,
        progress=progress,
        progress_every=progress_every,
        should_stop=should_stop,
    )


def publish_messages(
    messages: Iterable[tuple[bytes, bytes]],
    bootstrap_servers: str,
    topic: str,
    *,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 100_000,
    should_stop: Callable[[], bool] | None = None,
) -> PublishSummary:
    """Publish the (key, value) ``messages`` in the given order; returns when every one is acknowledged.

    ``should_stop`` is asked every 10,000 messages: when it says yes, no more are published (what was
    sent is still flushed and counted).
    """
    summary = PublishSummary()
    errors: list[KafkaError] = []

    acknowledged = 0

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        nonlocal acknowledged
        if err is not None:
            errors.append(err)
            return
        acknowledged += 1
        if acknowledged % 1_000 == 0:
            crash_point("produce.acked")

    # A delivery report per message costs a Python call each: the broker's acknowledgements are only counted
    # when a crash test counts them; otherwise librdkafka reports the failed messages alone.
    count_acks = armed("produce.acked")
    if count_acks:
        producer = make_producer(bootstrap_servers)
        send = partial(producer.produce, topic, on_delivery=on_delivery)
    else:
        producer = make_producer(bootstrap_servers, on_delivery=on_delivery, **{"delivery.report.only.error": True})
        send = partial(producer.produce, topic)
    started = time.perf_counter()
    try:
        # Asking for the topic's metadata first gets the idempotent producer its id at once: otherwise the
        # first messages wait for librdkafka's next metadata round.
        producer.list_topics(topic, timeout=15)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {bootstrap_servers}: {exc.args[0].str()}") from None
    sent = 0
    for key, value in messages:
        while True:
            try:
                send(value, key)  # positional: the C call parses keywords more slowly (docs/performance.md, stop 34)
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: serve delivery reports, then retry
            except KafkaException as exc:
                raise BrokerUnavailable(f"cannot publish to {topic!r}: {exc.args[0].str()}") from None
        sent += 1
        if sent % 1_000 == 0:
            crash_point("produce.sent")
            if sent % 10_000 == 0:
                producer.poll(0)
                if should_stop is not None and should_stop():
                    log.warning("publishing stopped after %d messages", sent)
                    break
        if progress and sent % progress_every == 0:
            progress(sent)
    remaining = producer.flush(60)
    while remaining > 0:
        log.warning("waiting for the broker to acknowledge %d messages", remaining)
        remaining = producer.flush(60)
        if errors:
            break
    summary.seconds = time.perf_counter() - started
    summary.failed = len(errors)
    summary.published = sent - summary.failed
    if errors:
        raise BrokerUnavailable(
            f"{len(errors)} of {sent} messages were not acknowledged by the broker: {errors[0].str()}"
        )
    return summary
