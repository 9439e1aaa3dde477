"""The cyclic collector's youngest generation is collected less often while a consumer runs, and put back after."""

import gc

import pytest

from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.consumer import YOUNG_COLLECTION_THRESHOLD, ConsumeOptions, collections_spaced
from tests.stream.helpers import consume_sample


@pytest.fixture
def default_thresholds():
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_the_youngest_threshold_is_raised_inside_and_put_back_after(default_thresholds) -> None:
    with collections_spaced(5_000):
        assert gc.get_threshold() == (5_000, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_higher_threshold_is_kept_and_a_change_made_meanwhile_is_left(default_thresholds) -> None:
    gc.set_threshold(90_000, 10, 10)
    with collections_spaced(5_000):
        assert gc.get_threshold() == (90_000, 10, 10)
    assert gc.get_threshold() == (90_000, 10, 10)
    gc.set_threshold(700, 10, 10)
    with collections_spaced(5_000):
        gc.set_threshold(1_234, 5, 5)  # another part of the process chose its own meanwhile
    assert gc.get_threshold() == (1_234, 5, 5)


def test_the_thresholds_are_put_back_when_the_block_fails(default_thresholds) -> None:
    with pytest.raises(RuntimeError), collections_spaced(5_000):
        raise RuntimeError("boom")
    assert gc.get_threshold() == (700, 10, 10)


class RecordingThresholds(StreamStore):
    """Records the collector's thresholds whenever a batch is about to be decided (it reads the settlement first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int, int]] = []

    def settlement_in_force(self, **kwargs):
        self.seen.append(gc.get_threshold())
        return super().settlement_in_force(**kwargs)


@pytest.mark.kafka
def test_a_consumer_decides_with_collections_spaced_and_puts_the_thresholds_back(tmp_path, default_thresholds) -> None:
    summary, store, rows, published = consume_sample(
        tmp_path,
        lambda engine, topic: RecordingThresholds(engine, topic),
        ConsumeOptions(until_caught_up=True, batch_size=50),
    )
    assert summary.messages == published == len(rows) > 0
    during = [seen for seen in store.seen if seen[0] >= YOUNG_COLLECTION_THRESHOLD]
    assert len(during) >= published // 50  # every batch
    assert gc.get_threshold() == (700, 10, 10)
