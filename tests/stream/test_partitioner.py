"""Kafka's default partitioner, as cardpipe computes it to split ``produce`` by partition: the Java client's
murmur2 test vectors, and the partitions librdkafka's ``murmur2_random`` (the producer's setting) gives keys on a
real (embedded) broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from hypothesis import given
from hypothesis import strategies as st

from cardpipe.stream.broker import broker_session, ensure_topic
from cardpipe.stream.partitioner import murmur2, partition_of, split_by_partition
from cardpipe.stream.producer import PRODUCER_DEFAULTS

#: ``org.apache.kafka.common.utils.UtilsTest.testMurmur2``: the Java client's hashes, as signed 32-bit ints.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "signed"), JAVA_MURMUR2.items())
def test_murmur2_is_the_java_clients(key: bytes, signed: int) -> None:
    assert murmur2(key) == signed % 2**32


@given(st.lists(st.integers(min_value=1, max_value=10**12), unique=True), st.integers(1, 64), st.integers(1, 9))
def test_each_partition_s_cards_fall_in_one_group_and_none_is_lost(cards: list[int], partitions: int, groups: int):
    split = split_by_partition(cards, partitions, groups)
    assert len(split) == groups
    assert sorted(card for group in split for card in group) == sorted(cards)
    for k, group in enumerate(split):
        assert {partition_of(str(c).encode(), partitions) % groups for c in group} <= {k}


def test_a_topic_without_partitions_or_no_group_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        partition_of(b"1", 0)
    with pytest.raises(ValueError, match="at least one group"):
        split_by_partition([1], 8, 0)


@pytest.mark.kafka
def test_librdkafka_puts_each_key_in_the_partition_computed_here(tmp_path: Path) -> None:
    keys = [str(card).encode() for card in range(1, 3_000)] + [b"", b"card-\xff", str(10**15).encode()]
    landed: dict[bytes, int] = {}
    with broker_session(None, tmp_path / "broker") as broker:
        topic = f"partitioned-{time.time_ns()}"
        ensure_topic(broker.bootstrap_servers, topic, partitions=7)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, **PRODUCER_DEFAULTS})
        for key in keys:
            producer.produce(
                topic, b"{}", key, on_delivery=lambda err, msg: landed.__setitem__(msg.key(), msg.partition())
            )
        assert producer.flush(30) == 0
    assert len(landed) == len(keys)
    assert {key: partition_of(key, 7) for key in keys} == landed
