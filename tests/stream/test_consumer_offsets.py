"""Finding a partition's log end on the real embedded broker (Tansu's ListOffsets under-reports it)."""

import pytest
from confluent_kafka import Producer

from cardpipe.stream.broker import broker_session, ensure_topic
from cardpipe.stream.consumer import log_end_offsets

pytestmark = pytest.mark.kafka


def test_log_end_offsets_counts_every_batch(tmp_path):
    with broker_session(None, tmp_path) as broker:
        ensure_topic(broker.bootstrap_servers, "t", 2)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True})
        for round_ in range(3):  # three separate record batches per partition
            for i in range(7):
                producer.produce("t", value=f"{round_}-{i}".encode(), partition=i % 2)
            producer.flush(10)
        assert log_end_offsets(broker.bootstrap_servers, "t") == {0: 12, 1: 9}
        ensure_topic(broker.bootstrap_servers, "empty", 3)
        assert log_end_offsets(broker.bootstrap_servers, "empty") == {0: 0, 1: 0, 2: 0}
