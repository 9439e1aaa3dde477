"""Idempotency without a lookup per batch: the consumer decides the batches the column-by-column path takes without
looking their ids up, until a commit fails on the decisions' primary key. A redelivered transaction is caught
there; the consumer resumes from its last checkpoint and looks every batch's ids up from then on, so the results
are those of a stream without the redelivery, the copy counted as a duplicate ignored."""

import pytest

from cardpipe.config import SAMPLE_DATA_DIR
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import transactions_from_csv
from cardpipe.stream import columnar
from cardpipe.stream.consumer import ConsumeOptions
from cardpipe.stream.producer import publish
from tests.stream.helpers import consume_sample

pytestmark = pytest.mark.kafka

REDELIVERED = 20


class RecordingStore(StreamStore):
    """Records, in order, when the consumer resumes from its checkpoint, decides a batch (each one checks the
    settlement in force first) and looks ids up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[str] = []

    def restore_offsets(self):
        self.events.append("resume")
        return super().restore_offsets()

    def settlement_in_force(self):
        self.events.append("batch")
        return super().settlement_in_force()

    def lookup_decided(self, transaction_ids, **kwargs):
        self.events.append("lookup")
        return super().lookup_decided(transaction_ids, **kwargs)


def run(tmp_path, name, *, redeliver: int):
    def publish_again(bootstrap_servers: str, topic: str) -> None:
        """The first transactions published again: each after the rest of its card's partition."""
        publish(transactions_from_csv(SAMPLE_DATA_DIR / "transactions.csv")[:redeliver], bootstrap_servers, topic)

    summary, store, rows, _ = consume_sample(
        tmp_path / name,
        RecordingStore,
        ConsumeOptions(until_caught_up=True, batch_size=10, columnar=True),
        after_produce=publish_again,
    )
    return summary, store.events, rows


def test_a_redelivery_is_caught_at_the_commit_and_the_ids_are_looked_up_from_then_on(tmp_path):
    columnar.load()  # Arrow imported: every well-formed batch goes the column-by-column path
    clean, clean_events, expected = run(tmp_path, "clean", redeliver=0)
    assert "lookup" not in clean_events and clean.counts["checkpoint_conflicts"] == 0
    assert clean_events.count("batch") >= 10  # batches of up to 10 messages of the 400, decided unlooked-up

    summary, events, rows = run(tmp_path, "redelivered", redeliver=REDELIVERED)
    assert rows == expected
    assert summary.counts["duplicate_ignored"] == REDELIVERED
    assert summary.counts["checkpoint_conflicts"] == 1
    assert summary.messages == len(expected) + REDELIVERED
    # No lookup before the failed commit; after the consumer resumed (which checks the settlement too), every
    # batch looked its ids up.
    resumed = [i for i, e in enumerate(events) if e == "resume"]
    assert len(resumed) == 2 and "lookup" not in events[: resumed[1]]
    assert events[resumed[1] + 1] == "batch"
    after = events[resumed[1] + 2 :]
    batches = [i for i, e in enumerate(after) if e == "batch"]
    assert batches, after
    for start, end in zip(batches, [*batches[1:], len(after)], strict=True):
        assert "lookup" in after[start:end], after
