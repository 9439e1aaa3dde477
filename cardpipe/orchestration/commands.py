"""The pipeline's commands: each layer on its own, and ``run`` for all of them end to end.

Every command takes a :class:`~cardpipe.config.Settings` and returns a summary; printing is the CLI's. Each is
a short composition over a :class:`~cardpipe.orchestration.runtime.Runtime` (engine, broker, topics, child
processes): its own, or the one given as ``runtime=`` (``run`` passes one runtime to every step).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import replace as replace_options
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SAWarning, SQLAlchemyError

from cardpipe.batch.apart import ExportProcess, SettleProcess
from cardpipe.childprocs import signal_handled, usable_cores, worker_context
from cardpipe.config import Settings
from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS, STREAM_COLUMNS
from cardpipe.errors import BrokerLost, BrokerUnavailable, CardpipeError, ConfigError, first_line
from cardpipe.faults import crash_point
from cardpipe.orchestration.locks import EXCLUSIVE, SHARED
from cardpipe.orchestration.publisher import PublisherProcess, StreamStopped, publish_in_processes
from cardpipe.orchestration.runtime import Runtime, open_stream_store
from cardpipe.orchestration.undecided import UndecidedAhead
from cardpipe.progress import Reporter, Stage, stage_of
from cardpipe.serving import results as serving_results
from cardpipe.serving import schema
from cardpipe.serving.csv_io import export_table_lines, read_typed_rows
from cardpipe.serving.loader import INPUT_FILES, LoadSummary, check_data_dir, load_inputs
from cardpipe.serving.settlements import COUNT_COLUMNS
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import (
    CardShare,
    count_undecided,
    messages_from_database,
    shares_supported,
    transactions_from_csv,
)
from cardpipe.stream import columnar
from cardpipe.stream.broker import BrokerHandle, is_alive
from cardpipe.stream.clients import client_config
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.consumer import CLIENT_LOG, ConsumeOptions, ConsumeSummary, log_end_offsets
from cardpipe.stream.consumer import consume as consume_topic
from cardpipe.stream.partitioner import MURMUR2_PARTITIONERS, split_by_partition
from cardpipe.stream.producer import PublishSummary, producer_setting, publish_messages

log = logging.getLogger("cardpipe")

# SQLite stores DECIMAL as numbers; SQLAlchemy converts them back to exact 2-decimal Decimals.
warnings.filterwarnings("ignore", message=r".*does \*not\* support Decimal objects natively", category=SAWarning)

Progress = Callable[[str], None]

#: How many times one consume replaces a dead embedded broker before giving up.
MAX_BROKER_RECOVERIES = 3

#: Where ``batch`` writes its three result files (``<this>-<settlement id>``) until the settlement is published.
BATCH_STAGING_DIR = ".batch-staging"

#: How many times one ``consume`` publishes again, and decides, transactions that are neither decided nor on
#: the topic once it is drained (each time the rest of them; a second time only if the first did not finish).
MAX_FINISH_ROUNDS = 2


class StreamIncomplete(CardpipeError):
    """A stream stopped with transactions of the database not decided (the command to finish it is named)."""


@contextmanager
def _runtime(
    settings: Settings,
    runtime: Runtime | None,
    broker: BrokerHandle | None = None,
    *,
    lock: str = SHARED,
    command: str | None = None,
) -> Iterator[Runtime]:
    """``runtime`` if given (left open: its owner closes it), else a runtime of this command's own (on ``broker``),
    holding the results folder and the database as ``lock`` says (see :mod:`cardpipe.orchestration.locks`)."""
    if runtime is not None:
        if broker is not None and broker != runtime.broker:
            raise ValueError("give a broker or a runtime, not both")
        yield runtime
        return
    with Runtime(settings, broker=broker, lock=lock, command=command) as own:
        if lock == EXCLUSIVE:
            own.hold()  # at once; a shared hold comes with the engine (after checking there is a database)
        yield own


def setup(settings: Settings, *, runtime: Runtime | None = None) -> None:
    """(Re)create a clean schema, like the seed's ``db_setup.py``; refused while another command uses the folder
    or the database."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    with _runtime(settings, runtime, lock=EXCLUSIVE, command="cardpipe setup") as rt:
        rt.clean_schema()


def _data_lines(path: Path) -> int | None:
    """Lines after the header of a CSV (its rows, unless a quoted cell holds a line break): a progress total."""
    try:
        with path.open("rb") as handle:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return None
    return max(lines - 1, 0)


def load(settings: Settings, progress: Progress | None = None, *, runtime: Runtime | None = None) -> LoadSummary:
    """Load the four input CSVs of ``settings.data_dir`` into the serving database (refused while another
    command uses the folder or the database: it replaces their rows)."""
    check_data_dir(settings.data_dir)
    with _runtime(settings, runtime, lock=EXCLUSIVE, command="cardpipe load") as rt:
        stages: dict[str, Stage] = {}

        def stage(table: str) -> Stage:
            if table not in stages:
                for done in stages.values():
                    done.done()
                describe = lambda k, t=table: f"loading {t}: {k:,} rows"  # noqa: E731
                total = _data_lines(settings.data_dir / INPUT_FILES[table])
                stages[table] = stage_of(progress, f"loading {table}", describe, total=total, unit="rows")
            return stages[table]

        summary = load_inputs(
            rt.ensure_schema(), settings.data_dir, (lambda t, n: stage(t).update(n)) if progress else None
        )
        if progress:
            for table, rows in summary.rows.items():
                stage(table).update(rows)
                stage(table).done()
        return summary


def produce(
    settings: Settings,
    *,
    from_csv: Path | None = None,
    republish_all: bool = False,
    processes: int | None = 1,
    broker: BrokerHandle | None = None,
    progress: Progress | None = None,
    runtime: Runtime | None = None,
) -> PublishSummary:
    """Publish transactions (from the database, or a CSV) to the topic in timestamp order (the database set up
    and loaded first: :class:`~cardpipe.orchestration.locks.NotReady` otherwise). ``processes``: how many
    publish at once from a SQLite database, each the cards of its own partitions (None: as many as the usable
    cores, at most one per partition); one elsewhere."""
    with _runtime(settings, runtime, broker, command="cardpipe produce") as rt:
        engine = rt.loaded_engine("cardpipe produce") if runtime is None else rt.ensure_schema()
        partitions = rt.ensure_topics()
        count = settings.publishing_processes(processes, usable_cores())
        if from_csv is not None and processes is not None and processes > 1:
            log.info("publishing %s in one process: only the database is read in shares", from_csv)
        shares = _publishing_shares(settings, engine, count, partitions) if from_csv is None else []
        total, every = None, 100_000
        if isinstance(progress, Reporter):  # a bar: its total, and updates often enough to move
            every = 5_000
            if from_csv is None:
                total = _transactions_loaded(engine) if republish_all else count_undecided(engine)
        stage = stage_of(progress, "produce", lambda n: f"published {n:,} transactions", total=total, unit="msgs")
        if shares:
            log.info("publishing in %d processes, each the cards of its own partitions", len(shares))
            summary = publish_in_processes(
                rt.start,
                settings,
                rt.broker.bootstrap_servers,
                shares,
                republish_all=republish_all,
                context=worker_context(),
                progress=stage.update if progress else None,
            )
        else:
            if from_csv is not None:
                messages: Iterable[tuple[bytes, bytes]] = map(encode_transaction, transactions_from_csv(from_csv))
            else:
                messages = messages_from_database(engine, only_undecided=not republish_all)
            summary = publish_messages(
                messages,
                rt.broker.bootstrap_servers,
                settings.kafka_topic,
                progress=stage.update if progress else None,
                progress_every=every,
            )
        stage.update(summary.published)
        stage.done()
        return summary


def _publishing_shares(settings: Settings, engine: Engine, processes: int, partitions: int) -> list[CardShare]:
    """The shares of the cards that many publishing processes take, at most one per partition (none: publish in
    this process), each the cards of its own partitions; the last takes every card the others do not, known or
    not."""
    wanted = min(processes, partitions)
    if wanted < 2:
        return []
    if not shares_supported(engine):
        log.info("publishing in one process: only a SQLite database is read in shares")
        return []
    partitioner = producer_setting("partitioner", settings.kafka_client_in_use)
    if partitioner not in MURMUR2_PARTITIONERS:
        log.info("publishing in one process: the client's partitioner %r is not murmur2", partitioner)
        return []
    with engine.connect() as conn:
        card_ids = conn.execute(select(schema.cards.c.card_id)).scalars().all()
    groups = split_by_partition(card_ids, partitions, wanted)
    named = [CardShare(tuple(group)) for group in groups[:-1]]
    return [*named, CardShare(tuple(card for share in named for card in share.card_ids), others=True)]


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

    **Finishing the stream** (not following, no producer, no ``should_stop``: ``cardpipe consume``): the database
    is the record of what must be decided. When its undecided transactions outnumber the messages left on the
    topic after the committed offsets (a run killed while publishing), they are all published again first; and
    when the topic is drained with some still undecided (and others decided: a topic of other transactions than
    the database's is left alone), they are published and decided again (up to :data:`MAX_FINISH_ROUNDS` times).
    Re-published duplicates are absorbed by the idempotency key, and a card's transactions stay in order (its
    earliest undecided ones come first, on its partition). A consume that stops with transactions undecided
    (SIGTERM, or they never got decided) raises :class:`StreamIncomplete`, naming how many and the command to
    run; one whose partitions other live consumers share leaves the rest to them.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    options = options or ConsumeOptions(
        idle_seconds=settings.consumer_idle_seconds, batch_size=settings.consumer_batch_size
    )
    if options.columnar is None:
        options = replace_options(options, columnar=columnar.wanted(settings.stream_columnar))
    spare_core = workers < usable_cores()  # a core left beside the consumer processes
    if options.pipelined is None:
        options = replace_options(options, pipelined=spare_core)
    finishing = publishing is None and should_stop is None and not options.follow and options.partitions is None
    with _runtime(settings, runtime, broker, command="cardpipe consume") as rt:
        # On SQLite the file is written by a process of its own (see cardpipe.batch.apart), started ahead so that
        # it is ready when the topic is drained; while a core is left beside the consumer processes it copies the
        # decisions as they are committed (it reads only the last ones then), otherwise the copying would slow
        # the consumers more than it shortens the end. A consumer that follows starts it only when it stops.
        # On MySQL/MariaDB a thread of its own writes it as soon as the topic is drained (:class:`_LinesAhead`).
        sqlite = settings.database_url.get_backend_name() == "sqlite"
        copied = ("stream_transactions", STREAM_COLUMNS, "transaction_id") if spare_core else None
        ahead: ExportProcess | None = None
        export_apart = sqlite and not options.follow

        def start_ahead() -> None:
            nonlocal ahead
            if ahead is None and export_apart:
                ahead = rt.start(lambda: ExportProcess(settings.database_url, follow=copied))

        # Workers on every core start it once the first of them has committed a checkpoint: its own start (an
        # interpreter importing DuckDB) would otherwise share the cores with theirs and delay the first decision.
        deciding = start_ahead if export_apart and workers > 1 and copied is None else None
        if deciding is None:
            start_ahead()
        stream_path = settings.results_dir / serving_results.STREAM_RESULTS_FILE
        lines_ahead: _LinesAhead | None = None
        asked_when_drained = False  # the file was asked for when the topic was last drained
        finished = False  # ... and no leg of the stream ran after that

        def drained() -> None:
            """The topic is drained (before counting what is undecided): the export can start meanwhile."""
            nonlocal asked_when_drained, lines_ahead
            start_ahead()  # no worker committed a checkpoint (nothing was left to decide): started now
            if ahead is not None:
                ahead.begin("stream_transactions", STREAM_COLUMNS, "transaction_id", stream_path)
                asked_when_drained = True
            elif not sqlite:
                lines_ahead = lines_ahead or _LinesAhead(store.engine, stream_path)
                lines_ahead.begin()
                asked_when_drained = True

        if runtime is None:
            rt.loaded_engine("cardpipe consume")
        store = rt.stream_store()
        stream_broker(rt)
        stage: Stage | None = None
        left: int | None = None  # messages left on the topic after the committed offsets, once read
        if isinstance(progress, Reporter):  # a bar (updated every half second) over what is left to decide
            options = replace_options(options, progress_every=min(options.progress_every, 0.5))
            total = None
            if not options.follow:
                total = left = messages_left(rt, store) if finishing else count_undecided(store.engine)
            stage = progress.stage("consume", total, "msgs")
        try:
            if not finishing:
                summary = _consume_leg(
                    rt, store, options, workers, progress, publishing, should_stop, stage, deciding=deciding
                )
            else:
                terminated: list[bool] = []
                with signal_handled(signal.SIGTERM, lambda *_: terminated.append(True)):
                    summary = _consume_to_the_end(
                        rt,
                        store,
                        options,
                        workers,
                        progress,
                        lambda: bool(terminated),
                        stage,
                        left,
                        drained,
                        deciding=deciding,
                    )
                    finished = asked_when_drained  # it returns right after the topic was drained
            if stage is not None:
                stage.update(summary.messages)
                stage.done()
            return summary
        finally:
            # Also on Ctrl-C, and when a worker failed: what was committed is exported.
            serving_results.export_stream_results(
                store.engine,
                settings.results_dir,
                write_decisions=_decisions_exporter(rt, store.engine, ahead, begun=finished, lines_ahead=lines_ahead),
            )


def _export_lines(engine: Engine, path: Path) -> int:
    """MySQL/MariaDB: ``stream_transactions.csv`` with each line rendered by the server
    (:func:`~cardpipe.serving.csv_io.export_table_lines`, faster than DuckDB's MySQL scanner)."""
    with engine.connect() as conn:
        return export_table_lines(conn, schema.stream_transactions, path, STREAM_COLUMNS)


class _LinesAhead:
    """MySQL/MariaDB: :func:`_export_lines` on a thread of its own, begun when the topic is drained, while the
    consumer counts what is undecided."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine, self.path = engine, path
        self._thread: threading.Thread | None = None
        self._count: int | None = None
        self._error: BaseException | None = None

    def begin(self) -> None:
        """Write the file (again) from what is committed now."""
        self.result()  # one writer of the file at a time
        self._count, self._error = None, None
        self._thread = threading.Thread(target=self._run, name="stream-export-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._count = _export_lines(self.engine, self.path)
        except BaseException as exc:  # the caller writes the file again, on its own thread, and sees the error
            self._error = exc
            log.debug("writing %s ahead failed: %s", self.path.name, first_line(exc))

    def result(self) -> int | None:
        """The row count of the last write, once it ended; None if none was begun or it failed."""
        if self._thread is not None:
            self._thread.join()
        return self._count if self._error is None else None


def _decisions_exporter(
    rt: Runtime,
    engine: Engine,
    ahead: ExportProcess | None,
    *,
    begun: bool = False,
    lines_ahead: _LinesAhead | None = None,
) -> Callable[[Path], int]:
    """Writes ``stream_transactions.csv``: on SQLite through DuckDB (the embedded engine's reader and CSV writer: a
    few times faster than fetching the rows into Python) in a process of its own, ``ahead`` (which was asked for
    the file already when ``begun``) or one started now; on MySQL/MariaDB each line rendered by the server
    (:func:`_export_lines`), in the same format, by ``lines_ahead`` when it was ``begun``."""
    url = rt.settings.database_url
    if engine.dialect.name in ("mysql", "mariadb"):

        def rendered(path: Path) -> int:
            written = lines_ahead.result() if lines_ahead is not None else None
            if begun and written is not None and lines_ahead is not None and lines_ahead.path == path:
                return written
            return _export_lines(engine, path)

        return rendered

    def apart(path: Path) -> int:
        process = ahead or rt.start(lambda: ExportProcess(url))
        try:
            if not (begun and process is ahead):
                process.begin("stream_transactions", STREAM_COLUMNS, "transaction_id", path)
            process.last_job()
            return process.result()
        finally:
            rt.release(process)

    return apart


def _consume_leg(
    rt: Runtime,
    store: StreamStore,
    options: ConsumeOptions,
    workers: int,
    progress: Progress | None,
    publishing: Callable[[], bool] | None,
    should_stop: Callable[[], bool] | None,
    stage: Stage | None = None,
    *,
    deciding: Callable[[], None] | None = None,
) -> ConsumeSummary:
    """One leg of the stream: ``workers`` processes, or one consumer here. ``deciding``: called once, here, when the
    first worker has committed a checkpoint (workers only)."""
    if workers > 1:
        return _consume_with_workers(rt, options, workers, progress, publishing, should_stop, deciding)
    return _consume_recovering(rt, store, options, progress, publishing, should_stop, stage)


def _consume_to_the_end(
    rt: Runtime,
    store: StreamStore,
    options: ConsumeOptions,
    workers: int,
    progress: Progress | None,
    terminated: Callable[[], bool],
    stage: Stage | None = None,
    left: int | None = None,
    drained: Callable[[], None] | None = None,
    *,
    deciding: Callable[[], None] | None = None,
) -> ConsumeSummary:
    """Consume until every transaction of the database is decided (see :func:`consume`, finishing the stream).

    ``terminated``: SIGTERM came (the single consumer then stops after its batch; workers stop on their own).
    ``left``: the messages left on the topic after the committed offsets, when the caller has just read them.
    ``drained``: called each time the consumers have stopped, before what is undecided is counted.
    ``deciding``: see :func:`_consume_leg`.
    """
    engine = store.engine
    total = ConsumeSummary()
    # With workers, SIGTERM is theirs to handle (``terminated`` does not see it): no stop request from here.
    should_stop = terminated if workers == 1 else None
    undecided = count_undecided(engine)
    if undecided and not store.other_consumers():
        left = messages_left(rt, store) if left is None else left
        if undecided > left:
            log.warning(
                "%s transactions of the database are not decided, and %s messages are left on the topic: "
                "publishing every undecided transaction again (duplicates are ignored)",
                f"{undecided:,}",
                f"{left:,}",
            )
            total.counts["republished"] += _publish_undecided(rt, terminated)
    # MySQL/MariaDB: the first leg's undecided are mostly counted while it decides its last messages.
    ahead = UndecidedAhead(engine, rt.settings.kafka_topic, undecided) if undecided and rt.settings.is_mysql else None
    for round_ in range(MAX_FINISH_ROUNDS + 1):
        if ahead is not None:
            ahead.start()
        try:
            total.add(_consume_leg(rt, store, options, workers, progress, None, should_stop, stage, deciding=deciding))
            if drained is not None:
                drained()
            undecided = ahead.count() if ahead is not None else count_undecided(engine)
        finally:
            if ahead is not None:
                ahead.close()
        ahead = None  # a later leg's (after publishing again) counts afresh
        if not undecided:
            return total
        others = store.other_consumers()
        if others:
            log.info(
                "%s transactions are not decided yet: other consumers (%s) decide them",
                f"{undecided:,}",
                ", ".join(others),
            )
            return total
        left = messages_left(rt, store)
        if terminated() or left:
            raise StreamIncomplete(
                f"stopped with {undecided:,} transactions not decided yet ({left:,} messages left on the topic): "
                "run `cardpipe consume` to finish the stream"
            )
        if undecided == _transactions_loaded(engine):
            # The topic held other transactions than the database's (``produce --from-csv``): not its stream.
            log.warning(
                "none of the %s transactions of the database is decided: `cardpipe produce` publishes them",
                f"{undecided:,}",
            )
            return total
        if round_ == MAX_FINISH_ROUNDS:
            break
        log.warning(
            "the topic is drained and %s transactions of the database are not decided: publishing them again",
            f"{undecided:,}",
        )
        total.counts["republished"] += _publish_undecided(rt, terminated)
    raise StreamIncomplete(
        f"{undecided:,} transactions are still not decided after publishing them {MAX_FINISH_ROUNDS} times again "
        "(see rejected_transactions); run `cardpipe consume` to try again"
    )


def _transactions_loaded(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.transactions)).scalar_one())


def _publish_undecided(rt: Runtime, terminated: Callable[[], bool]) -> int:
    """Publish every undecided transaction of the database (stopping early on SIGTERM); how many."""
    rt.ensure_topics()
    messages = messages_from_database(rt.ensure_schema())
    summary = publish_messages(messages, rt.broker.bootstrap_servers, rt.settings.kafka_topic, should_stop=terminated)
    log.info("published the %s undecided transactions again", f"{summary.published:,}")
    return summary.published


def messages_left(rt: Runtime, store: StreamStore) -> int:
    """How many messages the topic holds after the committed offsets (the whole log of a partition without one,
    or whose committed offset is past its end: the consumer reads those from the start)."""
    rt.ensure_topics()
    servers, topic = rt.broker.bootstrap_servers, rt.settings.kafka_topic
    ends = log_end_offsets(servers, topic)
    committed = store.committed_offsets()
    starts = {p: committed.get(p) for p in ends}
    from_start = [p for p, o in starts.items() if o is None or o > ends[p]]
    firsts = log_start_offsets(servers, topic, from_start) if from_start else {}
    return sum(max(0, end - (firsts[p] if p in firsts else starts[p] or 0)) for p, end in ends.items())


def log_start_offsets(bootstrap_servers: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """Each partition's first offset still in the log (its low watermark)."""
    consumer = Consumer(client_config(bootstrap_servers, {"group.id": "cardpipe-offsets", "logger": CLIENT_LOG}))
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[0] for p in partitions
        }
    except Exception as exc:  # confluent raises KafkaException with a KafkaError inside
        raise BrokerUnavailable(f"cannot read the first offsets of topic {topic!r}: {exc}") from None
    finally:
        consumer.close()


def _consume_recovering(
    rt: Runtime,
    store: StreamStore,
    options: ConsumeOptions,
    progress: Progress | None,
    publishing: Callable[[], bool] | None,
    should_stop: Callable[[], bool] | None,
    stage: Stage | None = None,
) -> ConsumeSummary:
    """One consumer in this process; an embedded broker that dies is replaced and the undecided re-published."""
    settings = rt.settings
    total = ConsumeSummary()

    def report(summary: ConsumeSummary) -> None:
        if stage is not None:
            stage.update(total.messages + summary.messages, lag=_latest_lag(store))
        elif progress:
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


def _latest_lag(store: StreamStore) -> int | None:
    """The consumer lag its last checkpoint recorded (None when unknown), for the progress bar."""
    log_table = schema.stream_checkpoint_log
    query = select(log_table.c.lag_messages).order_by(log_table.c.checkpoint_id.desc()).limit(1)
    try:
        with store.engine.connect() as conn:
            lag = conn.execute(query).scalar()
    except SQLAlchemyError:
        return None
    return None if lag is None else int(lag)


def _consume_with_workers(
    rt: Runtime,
    options: ConsumeOptions,
    workers: int,
    progress: Progress | None,
    publishing: Callable[[], bool] | None,
    should_stop: Callable[[], bool] | None,
    deciding: Callable[[], None] | None = None,
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
        first_checkpoint=deciding,
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
    settle_process: SettleProcess | None = None,
) -> BatchResult:
    """Settle every decision committed so far (SPEC §4 and §9) and publish the settlement.

    ``settle_process``: the embedded engine's process, started ahead by the caller (see
    :mod:`cardpipe.batch.apart`); owned from here on (stopped, used or not).

    Safe beside a running consumer: the watermark is fixed at the start, the engine settles exactly the
    decisions at or below it from the original cards and customers, the settled rows are written aside
    (keyed by the new settlement's id, the CSVs in a staging folder) and the settlement is published by one
    UPDATE, after which the CSVs are moved into the results folder. Killed before that, the settlement in
    force stays; the next one cleans up what was left.
    """
    from cardpipe.batch.engines import choose_engine, run_engine
    from cardpipe.batch.outputs import SettledRows
    from cardpipe.serving.owners import process_owner
    from cardpipe.serving.settlement_source import settled_counts
    from cardpipe.serving.settlements import NothingNew, SettlementStore

    started = time.perf_counter()
    name = choose_engine(engine_name or settings.batch_engine, settings.spark_master, settings.spark_remote)
    with _runtime(settings, runtime, command="cardpipe batch") as rt:
        if settle_process is not None:
            rt.adopt(settle_process)
        if runtime is None:
            _warn_if_undecided(rt, rt.loaded_engine("cardpipe batch"))
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
                spinner = _batch_spinner(progress, settlement_id)
                stored: list[SettledRows] = []

                def store_settled(rows: SettledRows) -> None:
                    cards, customers = rows.fetched_cards, rows.fetched_customers
                    as_fetched = store.store_texts(
                        settlement_id, (cards.names, cards.rows), (customers.names, customers.rows)
                    )
                    if as_fetched is None:  # not on SQLite: the rows typed
                        store.store_rows(settlement_id, rows.cards, rows.customers)
                    stored.append(rows)

                summary = run_engine(
                    name,
                    settings,
                    claim.watermark,
                    staged,
                    progress=_noting(progress, spinner),
                    on_settled=store_settled,
                    settle_process=settle_process,
                )
                crash_point("batch.computed")
                if not stored:  # not handed over by the engine: read back from its files, counted in the database
                    with rt.ensure_schema().connect() as conn:
                        counts = settled_counts(conn, claim.watermark)
                    cards = (
                        {**card, "settled_count": counts.get(card["card_id"], 0)}
                        for card in read_typed_rows(staged / "cards_updated.csv", schema.settled_cards, CARD_COLUMNS)
                    )
                    customers = read_typed_rows(
                        staged / "customers_updated.csv", schema.settled_customers, CUSTOMER_COLUMNS
                    )
                    store.store_rows(settlement_id, cards, customers)
                crash_point("batch.staged")
                store.publish(settlement_id, {k: getattr(summary, k) for k in COUNT_COLUMNS})
                if spinner is not None:
                    spinner.done()
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


def _batch_spinner(progress: Progress | None, settlement_id: int) -> Stage | None:
    """A spinner for the settlement, when ``progress`` shows stages."""
    return progress.stage(f"batch: settlement {settlement_id}") if isinstance(progress, Reporter) else None


def _noting(progress: Progress | None, spinner: Stage | None) -> Progress | None:
    """``progress``, each message also shown beside ``spinner``."""
    if progress is None or spinner is None:
        return progress
    say = progress

    def noted(message: str) -> None:
        say(message)
        spinner.update(note=message)

    return noted


def _warn_if_undecided(rt: Runtime, engine: Any) -> None:
    """A settlement settles what is decided; say so when transactions wait and no consumer decides them.

    Counts tables, not ids (an exact count joins every transaction to its decision, a second of a batch at a
    million): fewer decisions than transactions means at least the difference waits."""
    with engine.connect() as conn:
        undecided = (
            conn.execute(select(func.count()).select_from(schema.transactions)).scalar_one()
            - conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one()
        )
    if undecided > 0 and not rt.stream_store().other_consumers():
        log.warning(
            "at least %s transactions are not decided yet and no consumer is running: this settlement leaves them out "
            "(`cardpipe consume` decides them, then `cardpipe batch` settles them)",
            f"{undecided:,}",
        )


def persist(settings: Settings, *, runtime: Runtime | None = None) -> dict[str, int]:
    """The seed's ``serving_processor.py updated``: the batch already wrote its tables when it published its
    settlement; this checks they are there and returns their row counts."""
    with _runtime(settings, runtime, command="cardpipe persist") as rt:
        engine = rt.loaded_engine("cardpipe persist") if runtime is None else rt.ensure_schema()
        return serving_results.batch_table_counts(engine)


@dataclass
class RunSummary:
    load: LoadSummary
    publish: PublishSummary
    consume: ConsumeSummary
    batch: BatchResult
    seconds: float
    #: The run.json document written at its end (see :mod:`cardpipe.report`).
    report: dict[str, Any] | None = None


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
            published = produce(settings, progress=progress, runtime=rt)
            return published, consume(settings, options, progress=progress, workers=workers, runtime=rt)
        stage = None
        if isinstance(progress, Reporter):  # a bar for the producer process too
            stage = progress.stage("produce", count_undecided(rt.ensure_schema()), "msgs")
        told = stage.update if stage is not None else None
        publisher = rt.start(lambda: PublisherProcess(settings, rt.broker.bootstrap_servers, told))
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
            published = publisher.result()
            if stage is not None:
                stage.update(published.published)
            return published, consumed
        finally:
            rt.release(publisher)
            if stage is not None:
                stage.done()


def run(settings: Settings, progress: Progress | None = None, *, workers: int = 1) -> RunSummary:
    """All layers end to end over one runtime: clean schema, load, publish and authorize (``workers``
    consumers), settle, persist. The embedded broker it starts is stopped once the stream is decided.

    It holds the results folder and the database exclusively (a second ``run``, a ``load``, a ``consume``…
    refuses at once, naming it). Killed, it is run again as it was (it starts over from a clean schema), or
    ``cardpipe consume`` then ``cardpipe batch`` finish it.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    check_data_dir(settings.data_dir)
    with Runtime(settings, stop_broker_on_exit=True, lock=EXCLUSIVE, command="cardpipe run") as rt:
        rt.hold()
        say(f"serving: clean schema in {settings.describe_database()}")
        setup(settings, runtime=rt)
        say(f"serving: loading {settings.data_dir}")
        loaded = load(settings, progress, runtime=rt)
        say(f"stream: publishing to {settings.kafka_topic!r} on {rt.broker.bootstrap_servers} and authorizing at once")
        _start_stream_here(rt)
        published, consumed = stream(settings, progress=progress, workers=workers, runtime=rt)
        undecided = count_undecided(rt.ensure_schema())
        if undecided:
            raise StreamIncomplete(
                f"the stream stopped with {undecided:,} transactions not decided: run `cardpipe consume` to "
                "finish it, then `cardpipe batch`"
            )
        rt.close_broker()  # its messages are decided: free it before settling
        say("batch: settling")
        settled = batch(settings, progress, runtime=rt)
        steps = getattr(settled.summary, "steps", None) or {}
        stages = {
            "load": loaded.seconds,
            "stream.publish": published.seconds,
            "stream.consume": consumed.seconds,
            "batch": settled.seconds,
            **{f"batch.{name}": seconds for name, seconds in steps.items()},
        }
        run_json, _html = report(settings, runtime=rt, stage_seconds={**stages, "run": time.perf_counter() - started})
    from cardpipe.report.write import read_run_json

    facts = read_run_json(run_json.parent)
    return RunSummary(loaded, published, consumed, settled, time.perf_counter() - started, facts)


def report(
    settings: Settings, *, runtime: Runtime | None = None, stage_seconds: dict[str, float] | None = None
) -> tuple[Path, Path]:
    """Write ``run.json`` and the self-contained ``report.html`` from the database (see :mod:`cardpipe.report`);
    without ``stage_seconds``, those of the last ``run.json`` are kept. Returns the two paths."""
    from cardpipe.report import write_run_report

    with _runtime(settings, runtime, command="cardpipe report") as rt:
        return write_run_report(rt.loaded_engine("cardpipe report"), settings.results_dir, stage_seconds)
