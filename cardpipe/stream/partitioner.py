"""Which partition a keyed message goes to: Kafka's default partitioner, as librdkafka's ``murmur2_random``
(the producer's setting), the Java client and kafka-python compute it. Pure.

Publishing in several processes (:func:`cardpipe.orchestration.publisher.publish_in_processes`) gives each
process the cards of its own partitions, so that every partition is still written by one producer, in
timestamp order.
"""

from __future__ import annotations

from collections.abc import Iterable

#: librdkafka's partitioners that place a keyed message where :func:`partition_of` says (the producer's setting is
#: ``murmur2_random``; a client setting from the environment may name another).
MURMUR2_PARTITIONERS = frozenset({"murmur2", "murmur2_random"})

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 hash of ``data`` (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a message keyed ``key`` in a topic of ``partitions`` partitions."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def split_by_partition(card_ids: Iterable[int], partitions: int, groups: int) -> list[list[int]]:
    """``card_ids`` in ``groups`` lists, each the cards of its own partitions (partition ``p`` in group
    ``p % groups``): the messages of one partition all come from one group. A card's key is its id's text."""
    if groups < 1:
        raise ValueError(f"at least one group, not {groups}")
    split: list[list[int]] = [[] for _ in range(groups)]
    for card_id in card_ids:
        split[partition_of(str(card_id).encode(), partitions) % groups].append(card_id)
    return split
