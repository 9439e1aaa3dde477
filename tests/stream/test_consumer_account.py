"""What the consumer counts of each committed checkpoint (unit test, pure logic)."""

import time
from collections import Counter

from cardpipe.stream.checkpoints import CheckpointBatch, checkpoint_log_row
from cardpipe.stream.consumer import ConsumeSummary, _account


def test_latencies_are_from_publish_to_decision() -> None:
    now_ms = int(time.time() * 1000)
    batch = CheckpointBatch(counts=Counter(pending=2, declined=1), publish_times_ms=[now_ms - 1500, now_ms - 200])
    summary = ConsumeSummary()
    before = time.time() * 1000
    _account(summary, batch, 3, time.time())
    after = time.time() * 1000
    assert (summary.messages, summary.batches, summary.counts) == (3, 1, Counter(pending=2, declined=1))
    assert len(summary.latencies_ms) == 2
    first, second = summary.latencies_ms
    assert before - (now_ms - 1500) <= first <= after - (now_ms - 1500)
    assert before - (now_ms - 200) <= second <= after - (now_ms - 200)


def test_the_checkpoint_log_row_reads_latencies_from_its_commit_time() -> None:
    batch = CheckpointBatch(counts=Counter(pending=3), publish_times_ms=[9_000, 9_990, 9_500])
    row = checkpoint_log_row(batch, "t", "owner", committed_ms=10_000)
    assert (row["latency_p50_ms"], row["latency_p99_ms"], row["latency_max_ms"]) == (500.0, 1000.0, 1000.0)
    assert row["latency_sum_ms"] == 1510.0
    assert row["newest_publish_ms"] == 9_990
