"""The authorizing consumer: poll a batch, decide it, checkpoint it, repeat.

Partitions are assigned explicitly (``assign()``, no consumer-group join) and offsets live in the
serving database, committed in the same transaction as the decisions: after a crash the consumer
resumes exactly after the last committed batch. Rejected messages also go to the dead-letter topic
(flushed before the database commit: at least once there; the table is the record of truth).
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from sqlalchemy.exc import IntegrityError

from cardpipe.childprocs import signal_handled
from cardpipe.config import DEFAULT_CONSUMER_BATCH_SIZE
from cardpipe.errors import BrokerLost, BrokerUnavailable, SettlementChanged
from cardpipe.faults import crash_point
from cardpipe.stream.checkpoints import CheckpointBatch, CheckpointStore
from cardpipe.stream.clients import client_config
from cardpipe.stream.columnar import ColumnarDecider
from cardpipe.stream.processing import RawBatch, RawMessage, StreamProcessor
from cardpipe.stream.producer import make_producer
from cardpipe.stream.stopping import StopPolicy

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection refused while a broker restarts…); cardpipe reports problems itself.
CLIENT_LOG = logging.getLogger("cardpipe.librdkafka")
MAX_LATENCY_SAMPLES = 1_000_000
#: Checkpoints in a row that may hit a transaction id another consumer committed meanwhile (each one
#: restarts from the last checkpoint); more means the conflict is not a race, and it is raised.
MAX_CHECKPOINT_CONFLICTS = 5
#: The first batch a consumer takes is at most this large, and each next one at most twice the last, up to
#: ``batch_size``: one that starts on a backlog commits its first decisions at once, then runs on full batches.
FIRST_BATCH_SIZE = 500
#: While a consumer runs, the cyclic collector's youngest generation is collected after this many new container
#: objects at the least (Python's default is 700). A batch makes tens of thousands that live as long as it does:
#: collected every 700, they were scanned again and again, and promoted to be scanned by the older collections.
YOUNG_COLLECTION_THRESHOLD = 50_000


@dataclass(frozen=True)
class ConsumeOptions:
    """How long to run and how much to take at once."""

    follow: bool = False  # run until interrupted
    idle_seconds: float = 5.0  # otherwise stop after this long without a message...
    until_caught_up: bool = False  # ...or as soon as every partition is read to its end
    batch_size: int = DEFAULT_CONSUMER_BATCH_SIZE
    # How long one poll waits for the first message when none is ready. A batch never waits to be filled:
    # it is whatever has arrived (up to batch_size), so batches grow with the load and shrink with it.
    max_wait_seconds: float = 0.1
    partitions: tuple[int, ...] | None = None  # default: every partition of the topic
    progress_every: float = 5.0  # seconds between progress reports (the first comes with the first checkpoint)
    #: Offer each batch to the column-by-column path (cardpipe.stream.columnar, needs pyarrow); None: not here,
    #: and ``commands.consume`` sets it from the settings (CARDPIPE_COLUMNAR).
    columnar: bool | None = None
    #: Commit each full batch's checkpoint (a backlog) on a thread of its own while the next batch is polled and
    #: decided (the database's work beside the consumer's); that next batch is committed only after this one,
    #: and decided again from the last checkpoint when this one fails. A smaller batch (the consumer keeps up)
    #: is committed in place before the next poll: its latency does not wait on the next batch. False: every
    #: checkpoint is committed in place. None (the consumer: on) ``commands.consume`` sets: on while a core is
    #: left beside the consumer processes (with one on every core, the thread's turns at the interpreter lock
    #: cost more than the overlap gives).
    pipelined: bool | None = None


@dataclass
class ConsumeSummary:
    counts: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: Each decision's latency (publish CreateTime -> committed), up to :data:`MAX_LATENCY_SAMPLES`: doubles in one
    #: block (8 bytes a sample, and a worker hands them over pickled as bytes, not as that many float objects).
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: ConsumeSummary) -> None:
        """Fold in the summary of a later leg of the same consume (after a recovery)."""
        self.counts.update(other.counts)
        self.messages += other.messages
        self.batches += other.batches
        self.seconds += other.seconds
        self.latencies_ms.extend(other.latencies_ms[: max(0, MAX_LATENCY_SAMPLES - len(self.latencies_ms))])


def stop_on_sigterm(stop: Callable[[], None]) -> AbstractContextManager[None]:
    """SIGTERM finishes the current batch and stops, like Ctrl-C."""
    return signal_handled(signal.SIGTERM, lambda *_: stop())


def consume(
    bootstrap_servers: str,
    topic: str,
    store: CheckpointStore,
    *,
    group_id: str = "cardpipe",
    dead_letter_topic: str | None = None,
    options: ConsumeOptions = ConsumeOptions(),
    progress: Callable[[ConsumeSummary], None] | None = None,
    broker_alive: Callable[[], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
    publishing: Callable[[], bool] | None = None,
) -> ConsumeSummary:
    """Authorize the topic's transactions into ``store`` until drained (or interrupted).

    ``progress`` gets the summary so far with the first checkpoint, then every ``options.progress_every``
    seconds. ``broker_alive`` (for a broker cardpipe runs itself) is checked after every poll; when it says
    no, :class:`BrokerLost` is raised after the last complete checkpoint. ``should_stop`` is checked
    before every poll: when it says yes, the consumer stops as on SIGTERM (after a complete checkpoint);
    with it, signals are the caller's business (no SIGTERM handler is installed).

    ``publishing`` says whether a producer is still publishing the stream (it raises when the producer
    failed): while it does, ``until_caught_up`` and ``idle_seconds`` wait for more; once it is done, the
    consumer reads the partitions' end offsets and stops when it has read up to them (proof by the offset
    of a partition-EOF event, never by an event that may predate the last messages).

    Several consumers may share a database, each with its own partitions (``cardpipe consume --workers``).
    A transaction id that comes twice with different card ids can then reach two of them at once; the
    second commit fails on the primary key, and that consumer resumes from its last checkpoint, where
    the other's row is seen and its own copy rejected as ``duplicate_conflict``.

    Idempotency: a batch's transaction ids are looked up before it is decided, except at first. A batch the
    column-by-column path takes is decided without that look-up until a commit fails on the decisions' primary
    key (a redelivered id, or one just committed by another consumer). The consumer then resumes from its last
    checkpoint and looks every batch's ids up from then on, so a redelivery is told apart as before (a
    ``duplicate_ignored``, or a ``duplicate_conflict``). A stream without redeliveries skips the look-ups.
    """
    consumer = Consumer(
        client_config(
            bootstrap_servers,
            {
                "logger": CLIENT_LOG,
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10,
                "queued.max.messages.kbytes": 262_144,
            },
        )
    )
    dlq = make_producer(bootstrap_servers) if dead_letter_topic else None
    group = GroupOffsets(bootstrap_servers, group_id, topic)
    summary = ConsumeSummary()
    try:
        partitions = store.acquire(_topic_partitions(consumer, topic, options.partitions))
        stop = StopPolicy(
            follow=options.follow,
            idle_seconds=options.idle_seconds,
            until_caught_up=options.until_caught_up,
            should_stop=should_stop,
            publishing=publishing,
            end_offsets=lambda: log_end_offsets(bootstrap_servers, topic, partitions),
        )
        stop.watch(partitions)

        # Batches are decided without looking their ids up first until a redelivery is caught (see the docstring).
        look_up_first = False

        def resume() -> StreamProcessor:
            return _resume(
                consumer,
                bootstrap_servers,
                store,
                topic,
                partitions,
                columnar=bool(options.columnar),
                look_up_first=look_up_first,
            )

        processor = resume()
        checkpoints = _Checkpoints(store, dlq, dead_letter_topic, pipelined=options.pipelined is not False)
        conflicts = 0
        batch_limit = min(FIRST_BATCH_SIZE, options.batch_size)
        frozen_at = 0  # processor.cards_loaded when the collector last froze what was alive
        started = last_progress = time.monotonic()
        reported_first = False

        def report() -> None:
            nonlocal last_progress, reported_first
            assert progress is not None
            last_progress = time.monotonic()
            summary.seconds = last_progress - started
            progress(summary)
            reported_first = True

        def finish(*, rewind: bool = True) -> bool:
            """Wait for the checkpoint in flight: True once it is committed (or none was), False when it failed
            and the consumer was rewound to the last checkpoint (``rewind``; else the failure is let go)."""
            nonlocal processor, frozen_at, conflicts, look_up_first
            in_flight = checkpoints.in_flight
            try:
                done = checkpoints.wait()
            except SettlementChanged:
                if not rewind:
                    return False
                # Published between the check before deciding and the commit: decide the batch again with the
                # new limits, from the last checkpoint.
                summary.counts["settlement_changes"] += 1
            except IntegrityError:
                if not rewind:
                    return False
                # Not this batch committed before (commit_durably checks): one of its transaction ids was decided
                # before it (a redelivery, in a batch decided without the lookup), or by another consumer after our
                # lookup (or the batch before, in flight, held it). Start over from the last checkpoint, looking
                # the ids up from now on: this time the lookup finds that row.
                conflicts += 1
                if conflicts > MAX_CHECKPOINT_CONFLICTS:
                    raise
                log.warning(
                    "partition(s) %s: a transaction id of this batch was decided %s; resuming from the last "
                    "checkpoint%s",
                    ", ".join(map(str, sorted(in_flight.next_offsets if in_flight is not None else ()))),
                    "meanwhile by another consumer" if look_up_first else "before (redelivered) or by another consumer",
                    "" if look_up_first else ", looking each batch's ids up from now on",
                )
                look_up_first = True
                summary.counts["checkpoint_conflicts"] += 1
            else:
                if done is not None:
                    batch, messages, committed_at = done
                    conflicts = 0
                    crash_point("consume.committed")
                    group.commit(batch.next_offsets)
                    _account(summary, batch, messages, committed_at)
                    if progress and not reported_first:  # the first report comes with the first checkpoint
                        report()
                return True
            processor = resume()
            frozen_at = 0
            stop.rewound()
            return False

        try:
            with stop_on_sigterm(stop.request) if should_stop is None else nullcontext(), collections_spaced():
                while not stop.stop_requested():
                    polled = poll_ready(consumer, batch_limit, options.max_wait_seconds)
                    if broker_alive is not None and not broker_alive():
                        finish(rewind=False)  # a commit in flight goes to the database, not the broker
                        summary.seconds = time.monotonic() - started
                        lost = BrokerLost(f"the broker at {bootstrap_servers} stopped while consuming {topic!r}")
                        lost.summary = summary  # type: ignore[attr-defined]  # what was committed before
                        raise lost
                    raw = _messages(polled, stop)
                    if raw:
                        crash_point("consume.polled")
                        settlement_id = store.settlement_in_force()
                        if settlement_id != processor.settlement_id:
                            if not finish():  # the cards are loaded again below: the last checkpoint first
                                continue
                            processor.adopt(settlement_id)  # its cards are loaded again, with the new limits
                            log.info("deciding with the credit limits of settlement %s from now on", settlement_id)
                        batch = processor.process(raw)
                        if processor.cards_loaded > 2 * frozen_at:
                            # The per-card state lives as long as the consumer: keep the cyclic collector from
                            # re-scanning it on every collection (about a tenth of the loop's CPU). Once more each
                            # time the cards loaded have doubled: a few times, however many cards there are.
                            gc.collect()
                            gc.freeze()
                            frozen_at = processor.cards_loaded
                        batch.lag_messages = _lag(consumer, topic, partitions)
                        crash_point("consume.decided")
                        if not finish():  # this batch was decided on the one in flight, which failed
                            continue
                        # Only a full batch (a backlog) is left in flight: a smaller one means the consumer keeps up
                        # with the stream, and its decisions are committed before anything else is done.
                        background = options.pipelined is not False and len(raw) >= batch_limit
                        checkpoints.submit(batch, len(raw), background=background)
                        if not background and not finish():
                            continue
                        batch_limit = min(options.batch_size, 2 * batch_limit)
                    elif checkpoints.in_flight is None or checkpoints.committed():  # else poll on meanwhile
                        if not finish():
                            continue
                        store.keep_leases()
                    if progress and reported_first and time.monotonic() - last_progress >= options.progress_every:
                        report()
                    if stop.done_after(bool(raw)):
                        if not finish():
                            continue
                        break
                finish(rewind=False)  # stopped on request: the batch in flight is committed, or decided next time
        finally:
            checkpoints.close()
        summary.seconds = time.monotonic() - started
        group.flush()
        return summary
    finally:
        consumer.close()
        store.release()
        if dlq is not None:
            dlq.flush(10)


@contextmanager
def collections_spaced(threshold: int = YOUNG_COLLECTION_THRESHOLD) -> Iterator[None]:
    """Collect the youngest generation of cyclic garbage after ``threshold`` new container objects at the least
    while the block runs, then put the thresholds back (unless someone else changed them meanwhile)."""
    before = gc.get_threshold()
    spaced = (max(before[0], threshold), *before[1:])
    gc.set_threshold(*spaced)
    try:
        yield
    finally:
        if gc.get_threshold() == spaced:
            gc.set_threshold(*before)


def _lag(consumer: Consumer, topic: str, partitions: list[int]) -> int | None:
    """Messages on ``partitions`` after what this consumer has read, from the high watermarks of the last fetch
    responses (no request to the broker); None until every partition has reported one."""
    total = 0
    for tp in consumer.position([TopicPartition(topic, p) for p in partitions]):
        low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high < 0:
            return None
        if tp.offset < 0:  # nothing read from it yet: known only when empty
            if high != low:
                return None
            continue
        total += max(0, high - tp.offset)
    return total


def poll_ready(consumer: Consumer, batch_size: int, max_wait_seconds: float) -> list[Message]:
    """Up to ``batch_size`` messages (or events) that are ready, without waiting for more: when none is,
    wait up to ``max_wait_seconds`` for the first one, then take whatever else is ready with it.

    Batching this way costs a decision no latency at a light load (a batch of one is decided as it
    arrives) and no throughput under a backlog (every poll returns a full batch).
    """
    ready = consumer.consume(num_messages=batch_size, timeout=0)
    if ready:
        return ready
    first = consumer.poll(max_wait_seconds)
    if first is None:
        return []
    return [first, *consumer.consume(num_messages=batch_size - 1, timeout=0)] if batch_size > 1 else [first]


def _topic_partitions(consumer: Consumer, topic: str, wanted: tuple[int, ...] | None) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=15)
    except Exception as exc:  # confluent raises KafkaException with a KafkaError inside
        raise BrokerUnavailable(f"cannot read metadata of topic {topic!r}: {exc}") from None
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise BrokerUnavailable(f"topic {topic!r} does not exist on the broker")
    available = sorted(info.partitions)
    if wanted is None:
        return available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise BrokerUnavailable(f"topic {topic!r} has no partition(s) {missing}")
    return sorted(wanted)


def _resume(
    consumer: Consumer,
    bootstrap_servers: str,
    store: CheckpointStore,
    topic: str,
    partitions: list[int],
    *,
    columnar: bool = False,
    look_up_first: bool = True,
) -> StreamProcessor:
    """A processor deciding with the limits of the settlement in force, and ``consumer`` positioned right after
    the last checkpoint. The processor loads each card (with its balance of that checkpoint) the first time one
    of its transactions comes: the first decisions do not wait for every card to be read. ``look_up_first``:
    see :class:`StreamProcessor`."""
    positions = _start_positions(bootstrap_servers, store, topic, partitions, store.restore_offsets())
    consumer.unassign()  # drops whatever was fetched past the checkpoint
    consumer.assign(positions)
    settlement_id = store.settlement_in_force()
    return StreamProcessor(
        topic,
        {},
        {},
        store.lookup_decided,
        settlement_id=settlement_id,
        load_cards=store.load_cards,
        # Arrow is imported on a thread meanwhile: the first batches do not wait for it.
        columnar=ColumnarDecider(background=True) if columnar else False,
        look_up_first=look_up_first,
    )


def _start_positions(
    bootstrap_servers: str, store: CheckpointStore, topic: str, partitions: list[int], offsets: dict[int, int]
) -> list[TopicPartition]:
    """Resume after the last checkpoint; start over on a partition the broker no longer has that far."""
    ends = log_end_offsets(bootstrap_servers, topic, [p for p in partitions if p in offsets])
    positions = []
    reset = []
    for p in partitions:
        stored = offsets.get(p)
        if stored is not None and stored > ends[p]:
            # The topic was recreated (e.g. an in-memory broker restarted): read it again from the
            # start; transaction ids already decided are recognised and skipped.
            log.warning(
                "partition %d: checkpoint offset %d is past the end of the log (%d); reading it "
                "again from the beginning",
                p,
                stored,
                ends[p],
            )
            reset.append(p)
            stored = None
        positions.append(TopicPartition(topic, p, OFFSET_BEGINNING if stored is None else stored))
    if reset:
        store.reset_offsets(reset)
    return positions


def _messages(polled: list[Message], stop: StopPolicy) -> RawBatch:
    """The messages of a poll, telling ``stop`` of each partition that has more and of each that reached its end,
    in order; a fatal error raises :class:`BrokerUnavailable`, another is logged."""
    if not any(map(Message.error, polled)):  # messages only (the common case): made column by column, in C
        partitions = list(map(Message.partition, polled))
        for partition in set(partitions):
            stop.message(partition)  # type: ignore[arg-type]
        stamps = [ts if kind else None for kind, ts in map(Message.timestamp, polled)]
        offsets, keys, values = (list(map(column, polled)) for column in (Message.offset, Message.key, Message.value))
        return RawBatch(partitions, offsets, keys, values, stamps)  # type: ignore[arg-type]
    raw: list[RawMessage] = []
    for msg in polled:
        err = msg.error()
        if err is None:
            raw.append(_raw(msg))
            stop.message(msg.partition())  # type: ignore[arg-type]  # a partition's message
        elif err.code() == KafkaError._PARTITION_EOF:
            stop.end_of_partition(msg.partition(), msg.offset())  # type: ignore[arg-type]
        elif err.fatal():
            raise BrokerUnavailable(f"consumer failed: {err.str()}")
        else:
            log.warning("consumer: %s", err.str())
    return RawBatch.of(raw)


def _raw(msg: Message) -> RawMessage:
    ts_type, ts = msg.timestamp()
    # confluent-kafka types partition and offset as optional: they are set on every message from a partition.
    return RawMessage(msg.partition(), msg.offset(), msg.key(), msg.value(), ts if ts_type else None)  # type: ignore[arg-type]


def _checkpoint(store: CheckpointStore, batch: CheckpointBatch, dlq, dead_letter_topic: str | None) -> None:  # type: ignore[no-untyped-def]
    if dlq is not None and dead_letter_topic and batch.rejected:
        for row in batch.rejected:
            dlq.produce(
                dead_letter_topic,
                value=row["message_value"],
                key=row["message_key"],
                headers=[
                    ("reason", row["reason"].encode()),
                    ("detail", row["detail"].encode("utf-8", "replace")),
                    ("source", f"{row['topic']}/{row['kafka_partition']}/{row['kafka_offset']}".encode()),
                ],
            )
        dlq.flush(30)
    store.commit_durably(batch)


class GroupOffsets:
    """The consumer group's view of this consumer's offsets, for Kafka's own tools (``kafka-consumer-groups``, lag
    exporters): after each database checkpoint (the source of truth) its offsets are committed to the group too.

    Committed by an admin client (the consumer is no group member: it assigns its partitions itself), at most
    every :attr:`EVERY` seconds and once more at the end, never waited for on the hot path: a broker that went
    away costs a stale view in those tools, never a hang (a consumer's own asynchronous commits would make its
    ``close()`` wait for a broker that is gone).
    """

    EVERY = 0.5

    def __init__(self, bootstrap_servers: str, group_id: str, topic: str) -> None:
        self.group_id, self.topic = group_id, topic
        self.admin = AdminClient(client_config(bootstrap_servers, {"logger": CLIENT_LOG}))
        self.pending: dict[int, int] = {}
        self.sent_at = 0.0
        self.futures: list[Any] = []

    def commit(self, next_offsets: Mapping[int, int]) -> None:
        """Record a checkpoint's offsets; send them when the last sending is :attr:`EVERY` seconds old."""
        self.pending.update(next_offsets)
        if time.monotonic() - self.sent_at >= self.EVERY:
            self._send()

    def flush(self, timeout: float = 2.0) -> None:
        """Send what is pending and wait up to ``timeout`` for the broker's answers (a clean stop)."""
        self._send()
        for future in self.futures:
            try:
                future.result(timeout=timeout)
            except Exception as exc:  # a failure costs the tools' view only
                log.debug("offsets not committed to consumer group %s: %s", self.group_id, exc)
        self.futures.clear()

    def _send(self) -> None:
        if not self.pending:
            return
        offsets = [TopicPartition(self.topic, p, o) for p, o in sorted(self.pending.items())]
        self.pending.clear()
        self.sent_at = time.monotonic()
        self.futures = [f for f in self.futures if not f.done()]
        try:
            request = ConsumerGroupTopicPartitions(self.group_id, offsets)
            self.futures.extend(self.admin.alter_consumer_group_offsets([request], request_timeout=5).values())
        except KafkaException as exc:
            log.debug("offsets not committed to consumer group %s: %s", self.group_id, exc)


class _Checkpoints:
    """A consumer's checkpoints in flight: at most one, committed on a thread of its own (``pipelined``) or at once.

    :meth:`wait` gives the committed checkpoint (its batch, its message count, when it was committed) or raises
    what its commit raised. The thread's database work leaves the interpreter's lock to the deciding thread
    while the server (or SQLite's own code) works.
    """

    def __init__(self, store: CheckpointStore, dlq: Any, dead_letter_topic: str | None, *, pipelined: bool) -> None:
        self.store, self.dlq, self.dead_letter_topic = store, dlq, dead_letter_topic
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cardpipe-checkpoint") if pipelined else None
        self._in_flight: tuple[Future[float], CheckpointBatch, int] | None = None

    def submit(self, batch: CheckpointBatch, messages: int, *, background: bool) -> None:
        """Commit ``batch`` (``messages`` polled) on the thread (``background``, when pipelined) or at once; the one
        before must have been waited for."""
        assert self._in_flight is None, "one checkpoint in flight at a time"
        if self._pool is not None and background:
            future = self._pool.submit(self._commit, batch)
        else:
            future = Future()
            try:
                future.set_result(self._commit(batch))
            except BaseException as exc:  # raised again by wait(), as the thread's would be
                future.set_exception(exc)
        self._in_flight = (future, batch, messages)

    def wait(self) -> tuple[CheckpointBatch, int, float] | None:
        """The checkpoint in flight once committed (None: there was none); raises what its commit raised."""
        if self._in_flight is None:
            return None
        future, batch, messages = self._in_flight
        self._in_flight = None
        return batch, messages, future.result()

    def committed(self) -> bool:
        """Whether the commit in flight has ended (:meth:`wait` then returns at once)."""
        return self._in_flight is not None and self._in_flight[0].done()

    @property
    def in_flight(self) -> CheckpointBatch | None:
        """The batch being committed, if any."""
        return None if self._in_flight is None else self._in_flight[1]

    def close(self) -> None:
        """Let a commit in flight end (a database transaction is not abandoned halfway); stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _commit(self, batch: CheckpointBatch) -> float:
        _checkpoint(self.store, batch, self.dlq, self.dead_letter_topic)
        return time.time()


def _account(summary: ConsumeSummary, batch: CheckpointBatch, messages: int, committed_at: float) -> None:
    summary.messages += messages
    summary.batches += 1
    summary.counts.update(batch.counts)
    if batch.publish_times_ms:
        decided_ms = committed_at * 1000
        if len(summary.latencies_ms) < MAX_LATENCY_SAMPLES:  # bounded memory on long runs
            summary.latencies_ms.extend(map(decided_ms.__sub__, batch.publish_times_ms))  # decided_ms - t, in C


def log_end_offsets(
    bootstrap_servers: str, topic: str, partitions: list[int] | None = None, timeout: float = 30.0
) -> dict[int, int]:
    """Each partition's log end offset (where a message published now would go).

    Measured by fetching, not by a ListOffsets query: Tansu 0.6 answers ListOffsets(latest) with the
    base offset of the last record batch + 1, not the log end. Reading starts at that (never too high)
    answer and goes on to the end, whose offset every fetch response reports correctly.
    """
    if partitions is not None and not partitions:
        return {}
    consumer = Consumer(
        client_config(
            bootstrap_servers,
            {
                "group.id": "cardpipe-offsets",
                "logger": CLIENT_LOG,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                # An empty fetch answers at once instead of after the broker's default wait.
                "fetch.wait.max.ms": 10,
            },
        )
    )
    try:
        wanted = _topic_partitions(consumer, topic, None if partitions is None else tuple(partitions))
        if not wanted:
            return {}
        starts = [
            TopicPartition(
                topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            )
            for p in wanted
        ]
        consumer.assign(starts)
        ends: dict[int, int] = {}
        # ``timeout`` without progress: a long way to the end (a broker's stale answer on a large topic) is
        # read as long as messages keep coming.
        deadline = time.monotonic() + timeout
        while len(ends) < len(wanted):
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"could not find the end of topic {topic!r}: nothing read from it for {timeout:.0f} s"
                )
            for msg in poll_ready(consumer, 10_000, 0.05):  # what is ready: consume(n) would wait for n
                err = msg.error()
                partition, offset = cast(int, msg.partition()), cast(int, msg.offset())
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    ends[partition] = offset
                elif err is None:
                    ends.pop(partition, None)
                    deadline = time.monotonic() + timeout
        return ends
    finally:
        consumer.close()
