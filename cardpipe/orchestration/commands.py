"""The pipeline's commands: each layer on its own, and ``run`` for all of them end to end.

Every command takes a :class:`~cardpipe.config.Settings` and returns a summary; printing is the CLI's. Each is
a short composition over a :class:`~cardpipe.orchestration.runtime.Runtime` (engine, broker, topics, child
processes): its own, or the one given as ``runtime=`` (``run`` passes one runtime to every step).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SAWarning

from cardpipe.config import Settings
from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS
from cardpipe.errors import BrokerLost, ConfigError, first_line
from cardpipe.faults import crash_point
from cardpipe.orchestration.publisher import PublisherProcess, StreamStopped
from cardpipe.orchestration.runtime import Runtime, open_stream_store
from cardpipe.serving import results as serving_results
from cardpipe.serving import schema
from cardpipe.serving.csv_io import read_typed_rows
from cardpipe.serving.loader import LoadSummary, check_data_dir, load_inputs
from cardpipe.serving.settlements import COUNT_COLUMNS
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import transactions_from_csv, transactions_from_database
from cardpipe.stream.broker import BrokerHandle, is_alive
from cardpipe.stream.consumer import ConsumeOptions, ConsumeSummary, log_end_offsets
from cardpipe.stream.consumer import consume as consume_topic
from cardpipe.stream.producer import PublishSummary, publish

log = logging.getLogger("cardpipe")

# SQLite stores DECIMAL as numbers; SQLAlchemy converts them back to exact 2-decimal Decimals.
warnings.filterwarnings("ignore", message=r".*does \*not\* support Decimal objects natively", category=SAWarning)

Progress = Callable[[str], None]

#: How many times one consume replaces a dead embedded broker before giving up.
MAX_BROKER_RECOVERIES = 3

#: Where ``batch`` writes its three result files (``<this>-<settlement id>``) until the settlement is published.
BATCH_STAGING_DIR = ".batch-staging"


@contextmanager
def _runtime(settings: Settings, runtime: Runtime | None, broker: BrokerHandle | None = None) -> Iterator[Runtime]:
    """``runtime`` if given (left open: its owner closes it), else a runtime of this command's own (on ``broker``)."""
    if runtime is not None:
        if broker is not None and broker != runtime.broker:
            raise ValueError("give a broker or a runtime, not both")
        yield runtime
        return
    with Runtime(settings, broker=broker) as own:
        yield own


def setup(settings: Settings, *, runtime: Runtime | None = None) -> None:
    """(Re)create a clean schema, like the seed's ``db_setup.py``."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    with _runtime(settings, runtime) as rt:
        rt.clean_schema()


def load(settings: Settings, progress: Progress | None = None, *, runtime: Runtime | None = None) -> LoadSummary:
    """Load the four input CSVs of ``settings.data_dir`` into the serving database."""
    check_data_dir(settings.data_dir)
    with _runtime(settings, runtime) as rt:
        report = (lambda table, n: progress(f"loading {table}: {n:,} rows")) if progress else None
        return load_inputs(rt.ensure_schema(), settings.data_dir, report)


def produce(
    settings: Settings,
    *,
    from_csv: Path | None = None,
    republish_all: bool = False,
    broker: BrokerHandle | None = None,
    progress: Progress | None = None,
    runtime: Runtime | None = None,
) -> PublishSummary:
    """Publish transactions (from the database, or a CSV) to the topic in timestamp order."""
    with _runtime(settings, runtime, broker) as rt:
        if from_csv is not None:
            transactions: Any = transactions_from_csv(from_csv)
        else:
            transactions = transactions_from_database(rt.ensure_schema(), only_undecided=not republish_all)
        rt.ensure_topics()
        report = (lambda n: progress(f"published {n:,} transactions")) if progress else None
        return publish(transactions, rt.broker.bootstrap_servers, settings.kafka_topic, progress=report)


def stream_broker(runtime: Runtime) -> BrokerHandle:
    """The runtime's broker, for consuming. When this call starts a new embedded broker (it keeps messages in
    memory only, so its log is empty), every transaction not yet decided is published to it again."""
    fresh = not runtime.has_broker
    broker = runtime.broker
    if fresh and broker.started_here and runtime.settings.uses_embedded_broker:
        republish_undecided(runtime.settings, runtime.stream_store(), runtime=runtime)
    return broker


def republish_undecided(
    settings: Settings, store: StreamStore, broker: BrokerHandle | None = None, *, runtime: Runtime | None = None
) -> int:
    """After losing the broker's log: forget its offsets and publish again what is not decided yet (how many)."""
    with _runtime(settings, runtime, broker) as rt:
        rt.ensure_topics()
        store.reset_offsets()
        summary = produce(settings, runtime=rt)
        if summary.published:
            log.info("published the %d undecided transactions to %s", summary.published, rt.broker.bootstrap_servers)
        return summary.published


def consume(
    settings: Settings,
    options: ConsumeOptions | None = None,
    *,
    broker: BrokerHandle | None = None,
    progress: Progress | None = None,
    workers: int = 1,
    publishing: Callable[[], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
    runtime: Runtime | None = None,
) -> ConsumeSummary:
    """Authorize the topic's transactions, then write ``stream_transactions.csv`` from the database.

    ``should_stop``: asked before every poll; once it says yes, the consumers stop after their batch (signals
    are then the caller's business: ``cardpipe serve`` runs this on a thread).

    The embedded broker keeps messages in memory only. If it dies mid-stream, or this command has to
    start it (so its log is empty), every transaction not yet decided is (re-)published from the
    ``transactions`` table; the idempotency key makes the result identical to an uninterrupted run.

    ``workers`` > 1 runs that many consumer processes, worker ``i`` owning the partitions ``p`` with
    ``p % workers == i`` (see :mod:`cardpipe.stream.workers`); the results are those of one consumer.
    A broker lost mid-stream is then an error (:class:`~cardpipe.stream.workers.WorkerFailed`), not
    recovered; running ``consume`` again re-publishes what is undecided.

    ``publishing``: a producer publishes the stream meanwhile (see :func:`stream`).
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    options = options or ConsumeOptions(
        idle_seconds=settings.consumer_idle_seconds, batch_size=settings.consumer_batch_size
    )
    with _runtime(settings, runtime, broker) as rt:
        store = rt.stream_store()
        stream_broker(rt)
        try:
            if workers > 1:
                return _consume_with_workers(rt, options, workers, progress, publishing, should_stop)
            return _consume_recovering(rt, store, options, progress, publishing, should_stop)
        finally:
            # Also on Ctrl-C, and when a worker failed: what was committed is exported.
            serving_results.export_stream_results(store.engine, settings.results_dir)


def _consume_recovering(
    rt: Runtime,
    store: StreamStore,
    options: ConsumeOptions,
    progress: Progress | None,
    publishing: Callable[[], bool] | None,
    should_stop: Callable[[], bool] | None,
) -> ConsumeSummary:
    """One consumer in this process; an embedded broker that dies is replaced and the undecided re-published."""
    settings = rt.settings
    total = ConsumeSummary()

    def report(summary: ConsumeSummary) -> None:
        if progress:
            progress(f"decided {total.messages + summary.messages:,} messages ({summary.rate:,.0f}/s)")

    while True:
        rt.ensure_topics()
        broker = rt.broker
        alive = (lambda pid=broker.pid: is_alive(pid)) if broker.pid is not None else None
        try:
            total.add(
                consume_topic(
                    broker.bootstrap_servers,
                    settings.kafka_topic,
                    store,
                    group_id=settings.kafka_group_id,
                    dead_letter_topic=settings.dead_letter_topic,
                    options=options,
                    progress=report,
                    broker_alive=alive,
                    publishing=publishing,
                    should_stop=should_stop,
                )
            )
            return total
        except BrokerLost as lost:
            total.add(lost.summary)  # type: ignore[attr-defined]
            if not settings.uses_embedded_broker or total.counts["broker_recoveries"] >= MAX_BROKER_RECOVERIES:
                raise
            total.counts["broker_recoveries"] += 1
            log.warning(
                "the embedded broker died mid-stream; starting a new one and re-publishing "
                "every transaction not yet decided"
            )
            rt.replace_broker()
            total.counts["republished"] += republish_undecided(settings, store, runtime=rt)
            # That is the whole rest of the stream: a producer still publishing lost its broker too.
            publishing = None


def _consume_with_workers(
    rt: Runtime,
    options: ConsumeOptions,
    workers: int,
    progress: Progress | None,
    publishing: Callable[[], bool] | None,
    should_stop: Callable[[], bool] | None,
) -> ConsumeSummary:
    from cardpipe.stream.workers import consume_with_workers

    count = rt.ensure_topics()
    partitions = options.partitions if options.partitions is not None else tuple(range(count))
    return consume_with_workers(
        rt.settings,
        rt.broker.bootstrap_servers,
        partitions,
        workers,
        options,
        broker_pid=rt.broker.pid,
        progress=progress,
        publishing=publishing,
        should_stop=should_stop,
        open_store=open_stream_store,
    )


@dataclass
class BatchResult:
    """What one ``cardpipe batch`` did: the settlement it published (``summary`` None and ``nothing_new``
    True when no decision was committed after the watermark of the one in force)."""

    summary: Any
    seconds: float
    settlement_id: int | None = None
    engine: str | None = None
    watermark: dict[int, int] = field(default_factory=dict)
    nothing_new: bool = False


def batch(
    settings: Settings,
    progress: Progress | None = None,
    *,
    engine_name: str | None = None,
    runtime: Runtime | None = None,
) -> BatchResult:
    """Settle every decision committed so far (SPEC §4 and §9) and publish the settlement.

    Safe beside a running consumer: the watermark is fixed at the start, the engine settles exactly the
    decisions at or below it from the original cards and customers, the settled rows are written aside
    (keyed by the new settlement's id, the CSVs in a staging folder) and the settlement is published by one
    UPDATE, after which the CSVs are moved into the results folder. Killed before that, the settlement in
    force stays; the next one cleans up what was left.
    """
    from cardpipe.batch.engines import choose_engine, run_engine
    from cardpipe.serving.owners import process_owner
    from cardpipe.serving.settlements import NothingNew, SettlementStore

    started = time.perf_counter()
    name = choose_engine(engine_name or settings.batch_engine, settings.spark_master, settings.spark_remote)
    with _runtime(settings, runtime) as rt:
        store = SettlementStore(rt.ensure_schema(), settings.kafka_topic)
        claim = store.claim(process_owner(), name)
        if isinstance(claim, NothingNew):
            return BatchResult(None, time.perf_counter() - started, claim.settlement_id, name, nothing_new=True)
        settlement_id = claim.settlement_id
        staged = settings.results_dir / f"{BATCH_STAGING_DIR}-{settlement_id}"
        for left in settings.results_dir.glob(f"{BATCH_STAGING_DIR}-*"):
            shutil.rmtree(left, ignore_errors=True)  # of settlements killed before (none other runs now)
        try:
            with store.beating(settlement_id):
                shutil.rmtree(staged, ignore_errors=True)
                if progress:
                    progress(f"settlement {settlement_id}: settling with the {name} engine")
                summary = run_engine(name, settings, claim.watermark, staged, progress=progress)
                crash_point("batch.computed")
                store.store_rows(
                    settlement_id,
                    read_typed_rows(staged / "cards_updated.csv", schema.settled_cards, CARD_COLUMNS),
                    read_typed_rows(staged / "customers_updated.csv", schema.settled_customers, CUSTOMER_COLUMNS),
                )
                crash_point("batch.staged")
                store.publish(settlement_id, {k: getattr(summary, k) for k in COUNT_COLUMNS})
        except BaseException as exc:
            store.fail(settlement_id, first_line(exc))
            raise
        try:
            # The settlement is in force: its files replace the previous ones.
            for file_name, _columns in serving_results.BATCH_OUTPUTS.values():
                os.replace(staged / file_name, settings.results_dir / file_name)
            store.prune()
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return BatchResult(summary, time.perf_counter() - started, settlement_id, name, claim.watermark)


def persist(settings: Settings, *, runtime: Runtime | None = None) -> dict[str, int]:
    """The seed's ``serving_processor.py updated``: the batch already wrote its tables when it published its
    settlement; this checks they are there and returns their row counts."""
    with _runtime(settings, runtime) as rt:
        return serving_results.batch_table_counts(rt.ensure_schema())


@dataclass
class RunSummary:
    load: LoadSummary
    publish: PublishSummary
    consume: ConsumeSummary
    batch: BatchResult
    seconds: float


def _start_stream_here(rt: Runtime) -> None:
    """A fresh run decides only what it publishes: checkpoint the topic's current end offsets."""
    rt.ensure_topics()
    ends = log_end_offsets(rt.broker.bootstrap_servers, rt.settings.kafka_topic)
    rt.stream_store().start_at(ends)


#: Up to this many undecided transactions, ``stream`` publishes them in-process and then decides them: a
#: producer process (spawned, importing cardpipe again) costs more than it overlaps.
IN_PROCESS_PUBLISH_MAX = 10_000


def _undecided_at_most(runtime: Runtime, limit: int) -> bool:
    """Whether at most ``limit`` transactions are not decided yet (counted on the tables, an upper bound)."""
    engine = runtime.ensure_schema()
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(schema.transactions)).scalar_one()
        if total <= limit:
            return True
        decided = conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one()
    return total - decided <= limit


def stream(
    settings: Settings,
    broker: BrokerHandle | None = None,
    progress: Progress | None = None,
    *,
    workers: int = 1,
    runtime: Runtime | None = None,
) -> tuple[PublishSummary, ConsumeSummary]:
    """Publish the undecided transactions and authorize them at the same time, until every one published
    is decided: the producer runs in its own process (:class:`~cardpipe.orchestration.publisher.PublisherProcess`)
    while ``workers`` consumers decide what has arrived. Then ``stream_transactions.csv`` is written.

    A producer that fails stops the consumers after their current batch (what they committed stays) and
    raises :class:`~cardpipe.orchestration.publisher.PublisherFailed`; SIGTERM stops the consumers after
    their current batch and the producer at once (:class:`~cardpipe.orchestration.publisher.StreamStopped`).
    An embedded broker that dies is replaced by :func:`consume` (one worker), which re-publishes every
    undecided transaction to the new one: the producer, whose broker is gone, is then stopped, and the
    summary counts what was re-published.
    """
    started = time.perf_counter()
    with _runtime(settings, runtime, broker) as rt:
        rt.ensure_topics()
        options = ConsumeOptions(
            until_caught_up=True,
            idle_seconds=settings.consumer_idle_seconds,
            batch_size=settings.consumer_batch_size,
        )
        if _undecided_at_most(rt, IN_PROCESS_PUBLISH_MAX):
            # A small stream: publishing it here takes less than starting a producer process.
            published = produce(settings, runtime=rt)
            return published, consume(settings, options, progress=progress, workers=workers, runtime=rt)
        publisher = rt.start(lambda: PublisherProcess(settings, rt.broker.bootstrap_servers))
        try:
            consumed = consume(
                settings, options, progress=progress, workers=workers, publishing=publisher.publishing, runtime=rt
            )
            if consumed.counts["broker_recoveries"]:  # the producer lost its broker: stopped below, not waited for
                return PublishSummary(consumed.counts["republished"], 0, time.perf_counter() - started), consumed
            if publisher.publishing():  # the consumers stopped first: SIGTERM
                raise StreamStopped(
                    f"stopped after deciding {consumed.messages:,} transactions, before every one "
                    "was published; `cardpipe produce` then `cardpipe consume` finish the stream"
                )
            return publisher.result(), consumed
        finally:
            rt.release(publisher)


def run(settings: Settings, progress: Progress | None = None, *, workers: int = 1) -> RunSummary:
    """All layers end to end over one runtime: clean schema, load, publish and authorize (``workers``
    consumers), settle, persist. The embedded broker it starts is stopped once the stream is decided."""
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    check_data_dir(settings.data_dir)
    with Runtime(settings, stop_broker_on_exit=True) as rt:
        say(f"serving: clean schema in {settings.describe_database()}")
        setup(settings, runtime=rt)
        say(f"serving: loading {settings.data_dir}")
        loaded = load(settings, progress, runtime=rt)
        say(f"stream: publishing to {settings.kafka_topic!r} on {rt.broker.bootstrap_servers} and authorizing at once")
        _start_stream_here(rt)
        published, consumed = stream(settings, progress=progress, workers=workers, runtime=rt)
        rt.close_broker()  # its messages are decided: free it before settling
        say("batch: settling")
        settled = batch(settings, progress, runtime=rt)
    return RunSummary(loaded, published, consumed, settled, time.perf_counter() - started)
