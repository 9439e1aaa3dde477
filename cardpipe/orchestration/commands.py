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
from cardpipe.errors import BrokerLost, ConfigError
from cardpipe.faults import crash_point
from cardpipe.orchestration.publisher import PublisherProcess, StreamStopped
from cardpipe.serving import results as serving_results
from cardpipe.serving.database import check_connection, create_clean_schema, ensure_schema, make_engine
from cardpipe.serving.loader import LoadSummary, check_data_dir, load_inputs
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.broker import BrokerHandle, ensure_broker, ensure_topic, is_alive, stop_broker
from cardpipe.stream.consumer import ConsumeOptions, ConsumeSummary, log_end_offsets
from cardpipe.stream.consumer import consume as consume_topic
from cardpipe.stream.producer import PublishSummary, publish, transactions_from_csv, transactions_from_database

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
            workers: int = 1, publishing: Callable[[], bool] | None = None) -> ConsumeSummary:
    """Authorize the topic's transactions, then write ``stream_transactions.csv`` from the database.

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
            _republish_undecided(settings, store, broker)

        def report(summary: ConsumeSummary) -> None:
            if progress:
                progress(f"decided {total.messages + summary.messages:,} messages ({summary.rate:,.0f}/s)")

        total = ConsumeSummary()
        try:
            if workers > 1:
                return _consume_with_workers(settings, options, broker, workers, progress, publishing)
            while True:
                _ensure_topics(settings, broker)
                alive = (lambda pid=broker.pid: is_alive(pid)) if broker.pid is not None else None
                try:
                    total.add(consume_topic(
                        broker.bootstrap_servers, settings.kafka_topic, store, group_id=settings.kafka_group_id,
                        dead_letter_topic=settings.dead_letter_topic, options=options, progress=report,
                        broker_alive=alive, publishing=publishing,
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
                    total.counts["republished"] += _republish_undecided(settings, store, broker)
                    # That is the whole rest of the stream: a producer still publishing lost its broker too.
                    publishing = None
        finally:
            # Also on Ctrl-C, and when a worker failed: what was committed is exported.
            serving_results.export_stream_results(engine, settings.results_dir)
        return total
    finally:
        engine.dispose()


def _consume_with_workers(settings: Settings, options: ConsumeOptions, broker: BrokerHandle, workers: int,
                          progress: Progress | None, publishing: Callable[[], bool] | None) -> ConsumeSummary:
    from cardpipe.stream.workers import consume_with_workers

    count = ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
    ensure_topic(broker.bootstrap_servers, settings.dead_letter_topic, 1)
    partitions = options.partitions if options.partitions is not None else tuple(range(count))
    return consume_with_workers(settings, broker.bootstrap_servers, partitions, workers, options,
                                broker_pid=broker.pid, progress=progress, publishing=publishing)


def _ensure_topics(settings: Settings, broker: BrokerHandle) -> None:
    ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
    ensure_topic(broker.bootstrap_servers, settings.dead_letter_topic, 1)


def _republish_undecided(settings: Settings, store: StreamStore, broker: BrokerHandle) -> int:
    """After losing the broker's log: forget its offsets and publish again what is not decided yet (how many)."""
    _ensure_topics(settings, broker)
    store.reset_offsets()
    summary = produce(settings, broker=broker)
    if summary.published:
        log.info("published the %d undecided transactions to %s", summary.published, broker.bootstrap_servers)
    return summary.published


@dataclass
class BatchResult:
    summary: Any
    seconds: float
    persisted: dict[str, int] = field(default_factory=dict)


#: Where ``batch`` writes its three result files; they replace the previous ones together with the tables.
BATCH_STAGING_DIR = ".batch-staging"


def batch(settings: Settings, progress: Progress | None = None, *, stream_results_current: bool = False) -> BatchResult:
    """Settle the stream results with Spark; write the three CSVs and tables.

    The results are computed aside (staging tables on MySQL, ``BATCH_STAGING_DIR`` for the files) and
    only then swapped in: a batch killed before that leaves the previous tables and files as they were.

    ``stream_results_current``: the results folder's ``stream_transactions.csv`` holds the table as it is
    now (``run`` has just exported it), so on SQLite Spark reads that file rather than a new export.
    """
    from cardpipe.batch.settlement_job import read_csv_inputs, read_jdbc_inputs, run_settlement
    from cardpipe.batch.spark import build_spark_session, jdbc_options_from_url

    started = time.perf_counter()
    engine = _engine(settings)
    staging = settings.results_dir / ".staging"
    staged = settings.results_dir / BATCH_STAGING_DIR
    try:
        ensure_schema(engine)
        shutil.rmtree(staged, ignore_errors=True)  # what a killed batch left
        if progress:
            progress(f"starting Spark ({settings.spark_master})")
        spark = build_spark_session(settings.spark_master, shuffle_partitions=settings.spark_shuffle_partitions)
        try:
            if settings.is_mysql:
                options = jdbc_options_from_url(settings.database_url)
                inputs = read_jdbc_inputs(spark, options, partitions=_jdbc_partitions(settings))
                tables = serving_results.prepare_staging_tables(engine)
                summary = run_settlement(spark, inputs, staged, jdbc_options=options, jdbc_tables=tables)
                crash_point("batch.staged")
                serving_results.swap_in_staging_tables(engine)
                persisted: dict[str, int] = {}
            else:
                current = settings.results_dir / serving_results.STREAM_RESULTS_FILE if stream_results_current else None
                paths = serving_results.export_for_batch(engine, staging, stream_results=current)
                inputs = read_csv_inputs(spark, paths["stream_transactions"], paths["cards"], paths["customers"])
                summary = run_settlement(spark, inputs, staged)
                crash_point("batch.staged")
                persisted = serving_results.persist_batch_results(engine, staged)
            # Right after the tables: three renames, no window worth the name between them and the tables.
            for file_name, _columns in serving_results.BATCH_OUTPUTS.values():
                os.replace(staged / file_name, settings.results_dir / file_name)
        finally:
            spark.stop()
        return BatchResult(summary, time.perf_counter() - started, persisted)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)
        engine.dispose()


def _jdbc_partitions(settings: Settings) -> int:
    from cardpipe.batch.spark import local_cores

    return max(2, 2 * (local_cores(settings.spark_master) or 2))


def persist(settings: Settings) -> dict[str, int]:
    """Load the batch result CSVs into their tables (the seed's ``serving_processor.py updated``)."""
    engine = _engine(settings)
    try:
        ensure_schema(engine)
        return serving_results.persist_batch_results(engine, settings.results_dir)
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
    say("batch: settling with Spark")
    settled = batch(settings, progress, stream_results_current=True)  # the stream layer has just exported them
    return RunSummary(loaded, published, consumed, settled, time.perf_counter() - started)
