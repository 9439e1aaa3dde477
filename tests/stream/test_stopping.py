"""The consume loop's stop policy, with a fake clock: no broker, no database."""

import pytest

from cardpipe.stream.stopping import StopPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_idle_stops_only_after_the_idle_time_without_a_message():
    clock = Clock()
    stop = StopPolicy(idle_seconds=2.0, clock=clock)
    stop.watch([0, 1])
    assert not stop.done_after(decided=True)
    clock.now += 1.9
    assert not stop.done_after(decided=False)
    clock.now += 0.2
    assert stop.done_after(decided=False)


def test_until_caught_up_needs_every_partition_at_its_end_and_a_message_resets_it():
    stop = StopPolicy(until_caught_up=True, idle_seconds=60, clock=Clock())
    stop.watch([0, 1])
    stop.end_of_partition(0, 10)
    assert not stop.done_after(decided=True)
    stop.end_of_partition(1, 4)
    stop.message(0)  # more arrived on partition 0 after its EOF
    assert not stop.done_after(decided=True)
    stop.end_of_partition(0, 11)
    assert stop.done_after(decided=True)
    stop.rewound()
    assert not stop.done_after(decided=False)


def test_follow_never_stops_by_itself_but_a_request_or_should_stop_does():
    asked = []
    stop = StopPolicy(follow=True, idle_seconds=0, until_caught_up=True, should_stop=lambda: bool(asked), clock=Clock())
    stop.watch([0])
    stop.end_of_partition(0, 0)
    assert not stop.done_after(decided=False) and not stop.stop_requested()
    asked.append(True)
    assert stop.stop_requested()
    other = StopPolicy(follow=True)
    other.request()
    assert other.stop_requested()


def test_while_publishing_nothing_counts_then_the_end_offsets_decide():
    publishing = [True]
    ends = []
    stop = StopPolicy(
        until_caught_up=True,
        idle_seconds=60,
        publishing=lambda: publishing[0],
        end_offsets=lambda: ends.append(1) or {0: 5},
        clock=Clock(),
    )
    stop.watch([0])
    stop.end_of_partition(0, 3)
    assert not stop.done_after(decided=False)  # caught up and idle, but the producer is still publishing
    publishing[0] = False
    assert not stop.done_after(decided=False)  # done publishing: the end is 5, the last EOF said 3
    stop.end_of_partition(0, 5)
    assert stop.done_after(decided=True)
    assert ends == [1]  # the end offsets are read once


def test_a_failing_producer_raises_through_the_policy():
    def publishing() -> bool:
        raise RuntimeError("producer died")

    stop = StopPolicy(until_caught_up=True, publishing=publishing, end_offsets=dict, clock=Clock())
    stop.watch([0])
    with pytest.raises(RuntimeError, match="producer died"):
        stop.done_after(decided=False)
