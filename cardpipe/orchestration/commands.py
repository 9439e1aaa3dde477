"""The pipeline's commands: each layer on its own, and ``run`` for all of them end to end.

Every command takes a :class:`~cardpipe.config.Settings` and returns a summary; printing is the CLI's.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SAWarning

from cardpipe.config import Settings
from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS
from cardpipe.errors import BrokerLost, ConfigError, first_line
from cardpipe.faults import crash_point
from cardpipe.orchestration.publisher import PublisherProcess, StreamStopped
from cardpipe.serving import results as serving_results
from cardpipe.serving import schema
from cardpipe.serving.csv_io import read_typed_rows
from cardpipe.serving.database import check_connection, create_clean_schema, ensure_schema, make_engine
from cardpipe.serving.loader import LoadSummary, check_data_dir, load_inputs
from cardpipe.serving.settlements import COUNT_COLUMNS
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import transactions_from_csv, transactions_from_database
from cardpipe.stream.broker import BrokerHandle, ensure_broker, ensure_topic, is_alive, stop_broker
from cardpipe.stream.consumer import ConsumeOptions, ConsumeSummary, log_end_offsets
from cardpipe.stream.consumer import consume as consume_topic
from cardpipe.stream.producer import PublishSummary, publish

log = logging.getLogger("cardpipe")

# SQLite stores DECIMAL as numbers; SQLAlchemy converts them back to exact 2-decimal Decimals.
warnings.filterwarnings("ignore", message=r".*does \*not\* support Decimal objects natively", category=SAWarning)

Progress = Callable[[str], None]


def _engine(settings: Settings) -> Engine:
    engine = make_engine(settings.database_url)
    check_connection(engine)
    return engine


def setup(settings: Settings) -> None:
    """(Re)create a clean schema, like the seed's ``db_setup.py``."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    engine = _engine(settings)
    try:
        create_clean_schema(engine)
    finally:
        engine.dispose()


def load(settings: Settings, progress: Progress | None = None) -> LoadSummary:
    """Load the four input CSVs of ``settings.data_dir`` into the serving database."""
    check_data_dir(settings.data_dir)
    engine = _engine(settings)
    try:
        ensure_schema(engine)
        report = (lambda table, n: progress(f"loading {table}: {n:,} rows")) if progress else None
        return load_inputs(engine, settings.data_dir, report)
    finally:
        engine.dispose()


def _broker(settings: Settings) -> BrokerHandle:
    handle = ensure_broker(settings.kafka_bootstrap_servers, settings.results_dir)
    if handle.started_here:
        log.info("started the embedded broker at %s (stop it with: cardpipe broker stop --results-dir %s)",
                 handle.bootstrap_servers, settings.results_dir)
    return handle


def produce(settings: Settings, *, from_csv: Path | None = None, republish_all: bool = False,
            broker: BrokerHandle | None = None, progress: Progress | None = None) -> PublishSummary:
    """Publish transactions (from the database, or a CSV) to the topic in timestamp order."""
    if from_csv is not None:
        transactions: Any = transactions_from_csv(from_csv)
        engine = None
    else:
        engine = _engine(settings)
        ensure_schema(engine)
        transactions = transactions_from_database(engine, only_undecided=not republish_all)
    try:
        broker = broker or _broker(settings)
        ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
        report = (lambda n: progress(f"published {n:,} transactions")) if progress else None
        return publish(transactions, broker.bootstrap_servers, settings.kafka_topic, progress=report)
    finally:
        if engine is not None:
            engine.dispose()


#: How many times one consume replaces a dead embedded broker before giving up.
MAX_BROKER_RECOVERIES = 3


def consume(settings: Settings, options: ConsumeOptions | None = None, *,
            broker: BrokerHandle | None = None, progress: Progress | None = None,
            workers: int = 1, publishing: Callable[[], bool] | None = None,
            should_stop: Callable[[], bool] | None = None) -> ConsumeSummary:
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
    options = options or ConsumeOptions(idle_seconds=settings.consumer_idle_seconds,
                                        batch_size=settings.consumer_batch_size)
    engine = _engine(settings)
    try:
        ensure_schema(engine)
        store = StreamStore(engine, settings.kafka_topic)
        started_now = broker is None
        broker = broker or _broker(settings)
        if started_now and settings.uses_embedded_broker and broker.started_here:
            # A new in-memory broker holds nothing: whatever is still undecided must be published again.
            republish_undecided(settings, store, broker)

        def report(summary: ConsumeSummary) -> None:
            if progress:
                progress(f"decided {total.messages + summary.messages:,} messages ({summary.rate:,.0f}/s)")

        total = ConsumeSummary()
        try:
            if workers > 1:
                return _consume_with_workers(settings, options, broker, workers, progress, publishing, should_stop)
            while True:
                _ensure_topics(settings, broker)
                alive = (lambda pid=broker.pid: is_alive(pid)) if broker.pid is not None else None
                try:
                    total.add(consume_topic(
                        broker.bootstrap_servers, settings.kafka_topic, store, group_id=settings.kafka_group_id,
                        dead_letter_topic=settings.dead_letter_topic, options=options, progress=report,
                        broker_alive=alive, publishing=publishing, should_stop=should_stop,
                    ))
                    break
                except BrokerLost as lost:
                    total.add(lost.summary)  # type: ignore[attr-defined]
                    if not settings.uses_embedded_broker or total.counts["broker_recoveries"] >= MAX_BROKER_RECOVERIES:
                        raise
                    total.counts["broker_recoveries"] += 1
                    log.warning("the embedded broker died mid-stream; starting a new one and re-publishing "
                                "every transaction not yet decided")
                    broker = ensure_broker(None, settings.results_dir)
                    total.counts["republished"] += republish_undecided(settings, store, broker)
                    # That is the whole rest of the stream: a producer still publishing lost its broker too.
                    publishing = None
        finally:
            # Also on Ctrl-C, and when a worker failed: what was committed is exported.
            serving_results.export_stream_results(engine, settings.results_dir)
        return total
    finally:
        engine.dispose()


def _consume_with_workers(settings: Settings, options: ConsumeOptions, broker: BrokerHandle, workers: int,
                          progress: Progress | None, publishing: Callable[[], bool] | None,
                          should_stop: Callable[[], bool] | None = None) -> ConsumeSummary:
    from cardpipe.orchestration.runtime import open_stream_store
    from cardpipe.stream.workers import consume_with_workers

    count = ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
    ensure_topic(broker.bootstrap_servers, settings.dead_letter_topic, 1)
    partitions = options.partitions if options.partitions is not None else tuple(range(count))
    return consume_with_workers(settings, broker.bootstrap_servers, partitions, workers, options,
                                broker_pid=broker.pid, progress=progress, publishing=publishing,
                                should_stop=should_stop, open_store=open_stream_store)


def _ensure_topics(settings: Settings, broker: BrokerHandle) -> None:
    ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
    ensure_topic(broker.bootstrap_servers, settings.dead_letter_topic, 1)


def republish_undecided(settings: Settings, store: StreamStore, broker: BrokerHandle) -> int:
    """After losing the broker's log: forget its offsets and publish again what is not decided yet (how many)."""
    _ensure_topics(settings, broker)
    store.reset_offsets()
    summary = produce(settings, broker=broker)
    if summary.published:
        log.info("published the %d undecided transactions to %s", summary.published, broker.bootstrap_servers)
    return summary.published


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


#: Where ``batch`` writes its three result files (``<this>-<settlement id>``) until the settlement is published.
BATCH_STAGING_DIR = ".batch-staging"


def batch(settings: Settings, progress: Progress | None = None, *, engine_name: str | None = None) -> BatchResult:
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
    db = _engine(settings)
    try:
        ensure_schema(db)
        store = SettlementStore(db, settings.kafka_topic)
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
    finally:
        db.dispose()


def persist(settings: Settings) -> dict[str, int]:
    """The seed's ``serving_processor.py updated``: the batch already wrote its tables when it published its
    settlement; this checks they are there and returns their row counts."""
    engine = _engine(settings)
    try:
        ensure_schema(engine)
        return serving_results.batch_table_counts(engine)
    finally:
        engine.dispose()


@dataclass
class RunSummary:
    load: LoadSummary
    publish: PublishSummary
    consume: ConsumeSummary
    batch: BatchResult
    seconds: float


def _start_stream_here(settings: Settings, broker: BrokerHandle) -> None:
    """A fresh run decides only what it publishes: checkpoint the topic's current end offsets."""
    ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
    engine = _engine(settings)
    try:
        ends = log_end_offsets(broker.bootstrap_servers, settings.kafka_topic)
        StreamStore(engine, settings.kafka_topic).start_at(ends)
    finally:
        engine.dispose()


def stream(settings: Settings, broker: BrokerHandle, progress: Progress | None = None, *,
           workers: int = 1) -> tuple[PublishSummary, ConsumeSummary]:
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
    _ensure_topics(settings, broker)
    publisher = PublisherProcess(settings, broker.bootstrap_servers)
    try:
        consumed = consume(settings, ConsumeOptions(until_caught_up=True, idle_seconds=settings.consumer_idle_seconds,
                                                    batch_size=settings.consumer_batch_size),
                           broker=broker, progress=progress, workers=workers, publishing=publisher.publishing)
        if consumed.counts["broker_recoveries"]:  # the producer lost its broker: stopped below, not waited for
            return PublishSummary(consumed.counts["republished"], 0, time.perf_counter() - started), consumed
        if publisher.publishing():  # the consumers stopped first: SIGTERM
            raise StreamStopped(f"stopped after deciding {consumed.messages:,} transactions, before every one was "
                                "published; `cardpipe produce` then `cardpipe consume` finish the stream")
        return publisher.result(), consumed
    finally:
        publisher.stop()


def run(settings: Settings, progress: Progress | None = None, *, workers: int = 1) -> RunSummary:
    """All layers end to end: clean schema, load, publish, authorize (``workers`` consumers), settle, persist."""
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    check_data_dir(settings.data_dir)
    say(f"serving: clean schema in {settings.describe_database()}")
    setup(settings)
    say(f"serving: loading {settings.data_dir}")
    loaded = load(settings, progress)
    broker = ensure_broker(settings.kafka_bootstrap_servers, settings.results_dir)
    try:
        say(f"stream: publishing to {settings.kafka_topic!r} on {broker.bootstrap_servers} and authorizing at once")
        _start_stream_here(settings, broker)
        published, consumed = stream(settings, broker, progress, workers=workers)
    finally:
        if broker.started_here:
            stop_broker(settings.results_dir)  # the recorded one: a replacement if the first one died
    say("batch: settling")
    settled = batch(settings, progress)
    return RunSummary(loaded, published, consumed, settled, time.perf_counter() - started)
