"""When a consumer stops: one small object, told what each poll brought, asked whether to go on.

Stop conditions: a stop request (a signal handler, or the caller's ``should_stop``), and unless following
the stream, running out of work: every partition read to its end (``until_caught_up``) or nothing for
``idle_seconds``. While a producer is still publishing (``publishing``) neither counts; once it is done, the
partitions' end offsets are read once and the consumer is caught up only when a partition-EOF event's offset
reaches them (an EOF event may predate the last messages).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class StopPolicy:
    """The consume loop's stop decision (follow, idle, until caught up, publishing, stop requests)."""

    def __init__(
        self,
        *,
        follow: bool = False,
        idle_seconds: float = 5.0,
        until_caught_up: bool = False,
        should_stop: Callable[[], bool] | None = None,
        publishing: Callable[[], bool] | None = None,
        end_offsets: Callable[[], dict[int, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.follow = follow
        self.idle_seconds = idle_seconds
        self.until_caught_up = until_caught_up
        self.should_stop = should_stop
        self.publishing = publishing
        self.end_offsets = end_offsets
        self.clock = clock
        self.requested = False
        self.partitions: frozenset[int] = frozenset()
        self.at_end: dict[int, int] = {}  # partition -> offset of its last EOF event, no message since
        self.stream_end: dict[int, int] | None = None  # the end offsets, once the producer is done
        self.last_message = clock()

    def request(self) -> None:
        """Stop after the current batch (from a signal handler: sets a flag only)."""
        self.requested = True

    def watch(self, partitions: Iterable[int]) -> None:
        """The partitions this consumer reads (those it must reach the end of)."""
        self.partitions = frozenset(partitions)

    def stop_requested(self) -> bool:
        return self.requested or (self.should_stop is not None and self.should_stop())

    def message(self, partition: int) -> None:
        self.at_end.pop(partition, None)

    def end_of_partition(self, partition: int, offset: int) -> None:
        self.at_end[partition] = offset

    def rewound(self) -> None:
        """The consumer went back to its last checkpoint: what it knew of partition ends is stale."""
        self.at_end.clear()

    def done_after(self, decided: bool) -> bool:
        """Whether to stop after a poll that ``decided`` messages (or brought none)."""
        now = self.clock()
        if decided:
            self.last_message = now
        if self.follow:
            return False
        caught_up = self.at_end.keys() >= self.partitions
        if (
            self.publishing is not None
            and self.stream_end is None
            and (caught_up or not decided)
            and not self.publishing()
        ):
            assert self.end_offsets is not None, "publishing given without end_offsets"
            self.stream_end = self.end_offsets()
        if self.publishing is not None and self.stream_end is None:
            return False  # more is coming
        end = self.stream_end
        if (
            self.until_caught_up
            and caught_up
            and (end is None or all(self.at_end[p] >= end.get(p, 0) for p in self.partitions))
        ):
            return True
        return not decided and now - self.last_message >= self.idle_seconds
