"""``cardpipe consume --workers N``: N consumer processes, each owning a share of the topic's partitions.

Worker ``i`` of ``N`` consumes the partitions ``p`` with ``p % N == i``, with its own database engine and
its own rows of ``stream_offsets`` (keyed by topic and partition). The producer keys messages by card, so
a card lives in one partition, hence in one worker, in order: the decisions are those of one consumer.
(A transaction id that comes back with another card id may reach two workers at once: see
:func:`cardpipe.stream.consumer.consume` for how the loser of that race recovers.)

The parent process starts the workers (:class:`~cardpipe.childprocs.ChildProcess`), relays their progress lines,
adds up their summaries, and stops them all when one fails, or on Ctrl-C / SIGTERM. A worker stops by
finishing its current batch (its checkpoint is committed), as a single consumer does on SIGTERM.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from cardpipe.childprocs import ChildProcess, error_line, prepare_child, report_to_parent, worker_context
from cardpipe.config import Settings
from cardpipe.errors import CardpipeError
from cardpipe.stream.checkpoints import CheckpointStore
from cardpipe.stream.clients import use_client_settings
from cardpipe.stream.consumer import ConsumeOptions, ConsumeSummary, stop_on_sigterm

log = logging.getLogger(__name__)

#: After the stop request, how long the workers get to finish their current batch before being killed
#: (a checkpoint is one database transaction: killing a worker loses nothing that was committed).
STOP_GRACE_SECONDS = 30.0
#: Name of worker i's process (``multiprocessing.active_children()``).
PROCESS_NAME = "cardpipe-consume-{}"


class WorkerFailed(CardpipeError):
    """A consumer worker raised an error or died; the other workers were stopped."""


def assign_partitions(partitions: Sequence[int], workers: int) -> list[tuple[int, ...]]:
    """Round robin: worker ``i`` gets the partitions ``p`` with ``p % workers == i``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return [tuple(sorted(p for p in partitions if p % workers == i)) for i in range(workers)]


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process needs. Sent pickled through a pipe: the settings' password is never in argv."""

    index: int
    settings: Settings
    bootstrap_servers: str
    options: ConsumeOptions  # with this worker's partitions
    broker_pid: int | None  # the embedded broker, checked after every poll
    log_level: int
    #: Opens this worker's checkpoint store from the settings (a module-level function: it is pickled).
    open_store: Callable[[Settings], AbstractContextManager[CheckpointStore]]


@dataclass
class _Worker:
    """One worker process as the parent sees it: its job, its process, and what it has reported."""

    job: WorkerJob
    child: ChildProcess
    summary: ConsumeSummary | None = None
    interrupted: bool = False  # the worker itself got SIGTERM (not from this parent)
    error: str | None = None
    failed_at: float = 0.0  # when the parent learnt of the error (the first failure is the one reported)

    @property
    def name(self) -> str:
        partitions = self.job.options.partitions or ()
        return (
            f"worker {self.job.index} (partition{'' if len(partitions) == 1 else 's'} "
            f"{', '.join(map(str, partitions))})"
        )

    @property
    def finished(self) -> bool:
        return self.summary is not None or self.error is not None


class _Stop:
    """The stop request shared with the workers. A signal handler only sets a plain flag (setting the
    multiprocessing Event from a handler could deadlock on its lock); the supervising loop passes it on."""

    def __init__(self, event: Any, should_stop: Callable[[], bool] | None = None):
        self.event = event
        self.signalled = False
        self.should_stop = should_stop

    def signal(self) -> None:
        """From a signal handler: only set the flag."""
        self.signalled = True

    def is_set(self) -> bool:
        if self.should_stop is not None and self.should_stop():
            self.signalled = True
        if self.signalled and not self.event.is_set():
            self.event.set()
        return bool(self.event.is_set())

    def set(self) -> None:
        self.event.set()


def consume_with_workers(
    settings: Settings,
    bootstrap_servers: str,
    partitions: Sequence[int],
    workers: int,
    options: ConsumeOptions,
    *,
    broker_pid: int | None = None,
    progress: Callable[[str], None] | None = None,
    publishing: Callable[[], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
    open_store: Callable[[Settings], AbstractContextManager[CheckpointStore]],
    first_checkpoint: Callable[[], None] | None = None,
) -> ConsumeSummary:
    """Consume ``partitions`` with ``workers`` processes; their summaries added up (``seconds``: wall time).

    ``should_stop`` (asked while supervising) stops every worker after its batch, as SIGTERM does.
    ``open_store`` opens each worker's checkpoint store (a module-level function, sent to the workers pickled).
    ``first_checkpoint`` is called once, in this process, when the first worker has committed a checkpoint (a
    worker's first progress line comes with its first checkpoint).

    Raises :class:`WorkerFailed` (after stopping the other workers) when a worker raises or dies. On
    SIGTERM every worker finishes its batch and the summary so far is returned; on Ctrl-C the same, then
    ``KeyboardInterrupt`` goes on.

    ``publishing`` (see :func:`cardpipe.stream.consumer.consume`) is asked here, in the parent; the workers
    learn that the producer is done through an event. When it raises (the producer failed), every worker
    is stopped and its error goes on.
    """
    shares = [share for share in assign_partitions(partitions, workers) if share]
    if len(shares) < workers:
        log.warning("%d workers for %d partitions: starting %d", workers, len(partitions), len(shares))
    context = worker_context()
    stop = _Stop(context.Event(), should_stop)
    published = context.Event()  # set once ``publishing`` says the producer is done
    level = logging.getLogger("cardpipe").getEffectiveLevel()
    running: list[_Worker] = []
    relay = progress if first_checkpoint is None else _FirstLine(first_checkpoint, progress)
    started = time.monotonic()
    try:
        with stop_on_sigterm(stop.signal):
            for index, share in enumerate(shares):
                job = WorkerJob(
                    index,
                    settings,
                    bootstrap_servers,
                    replace(options, partitions=share),
                    broker_pid,
                    level,
                    open_store,
                )
                child = ChildProcess(
                    _worker_main,
                    job,
                    stop.event,
                    None if publishing is None else published,
                    name=PROCESS_NAME.format(index),
                    context=context,
                )
                running.append(_Worker(job, child))
            _supervise(
                running,
                stop,
                relay,
                publishing=None if publishing is None else _PublishingWatch(publishing, published),
            )
    finally:
        _stop_all(running, stop, relay)
    failed = sorted((w for w in running if w.error is not None), key=lambda w: w.failed_at)
    if failed:
        raise WorkerFailed(f"consume {failed[0].name} {failed[0].error}{_others(running, failed)}")
    total = ConsumeSummary()
    for worker in running:
        total.add(worker.summary)  # type: ignore[arg-type]
    total.seconds = time.monotonic() - started
    return total


def _others(running: list[_Worker], failed: list[_Worker]) -> str:
    others = len(running) - 1
    if not others:
        return ""
    also = len(failed) - 1
    if also == others:
        return f"; the other worker{'s' if others > 1 else ''} failed too"
    stopped = (
        f"the other worker{'s were' if others > 1 else ' was'} stopped"
        if not also
        else f"{also} other{'s' if also > 1 else ''} failed too, the rest were stopped"
    )
    return f"; {stopped}"


class _FirstLine:
    """Relays the workers' progress lines to ``progress``, calling ``first`` once, at the first one."""

    def __init__(self, first: Callable[[], None], progress: Callable[[str], None] | None):
        self.first: Callable[[], None] | None = first
        self.progress = progress

    def __call__(self, line: str) -> None:
        if self.first is not None:
            first, self.first = self.first, None
            first()
        if self.progress is not None:
            self.progress(line)


class _PublishingWatch:
    """Passes ``publishing()`` on to the workers' event once it says the producer is done."""

    def __init__(self, publishing: Callable[[], bool], published: Any):
        self.publishing = publishing
        self.published = published

    def check(self) -> None:
        """Raises what ``publishing()`` raises (the producer failed)."""
        if not self.published.is_set() and not self.publishing():
            self.published.set()


def _supervise(
    running: list[_Worker],
    stop: _Stop,
    progress: Callable[[str], None] | None,
    until: float | None = None,
    publishing: _PublishingWatch | None = None,
) -> None:
    """Relay messages until every worker has finished, or the stop request (with ``until``: that time).

    A worker that fails, dies or gets SIGTERM itself makes every worker stop.
    """
    while not all(w.finished for w in running):
        if until is None and stop.is_set() or until is not None and time.monotonic() >= until:
            return
        if publishing is not None:
            publishing.check()
        handles = [handle for w in running if not w.finished for handle in w.child.handles]
        # While the producer publishes, look at it 10 times a second: its end is the workers' signal to finish.
        wait(handles, timeout=0.1 if publishing is not None and not publishing.published.is_set() else 0.5)
        for worker in running:
            if worker.finished:
                continue
            _drain(worker, progress)
            if not worker.finished and not worker.child.is_alive():
                _drain(worker, progress)  # what it sent just before exiting
                if not worker.finished:
                    worker.error = worker.child.describe_exit()
            if worker.error is not None or worker.interrupted:
                worker.failed_at = worker.failed_at or time.monotonic()
                stop.set()


def _drain(worker: _Worker, progress: Callable[[str], None] | None) -> None:
    """Handle what the worker has sent so far (a worker blocked on a full pipe waits for this)."""
    for kind, payload in worker.child.receive():
        if kind == "progress":
            if progress is not None:
                progress(f"worker {worker.job.index}: {payload}")
        elif kind == "done":
            worker.summary, worker.interrupted = payload
        else:
            worker.error = payload
        if worker.finished:
            return


def _stop_all(running: list[_Worker], stop: _Stop, progress: Callable[[str], None] | None) -> None:
    """Ask every worker to finish its current batch and stop; kill the ones that do not in time."""
    stop.set()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    _supervise(running, stop, progress, until=deadline)
    for worker in running:
        if worker.finished:
            worker.child.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.child.is_alive():
            if not worker.finished:
                log.warning("%s did not stop within %.0f s; killing it", worker.name, STOP_GRACE_SECONDS)
                worker.error = f"did not stop within {STOP_GRACE_SECONDS:.0f} s and was killed"
                worker.failed_at = time.monotonic()
            worker.child.kill()
        worker.child.close()


# --- inside a worker process ---------------------------------------------------------------------------


def _worker_main(conn: Connection, job: WorkerJob, stop: Any, published: Any = None) -> None:
    """A worker process: consume the job's partitions; send progress lines, then the summary or the error.

    ``stop``: the parent's stop request (an event); ``published``: an event the parent sets once the stream's
    producer is done (None: no producer runs). The summary goes with whether this worker got SIGTERM itself.
    """
    # What this process holds from the server it was forked from (the modules it imported) lives as long as it:
    # kept out of its collections, the first of which scanned it all, copying its pages on write, before the first
    # decision.
    gc.freeze()
    orphaned = prepare_child(job.log_level, f"cardpipe: worker {job.index}: %(message)s")
    use_client_settings(job.settings.kafka_client_in_use)
    terminated: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))

    def should_stop() -> bool:  # asked to, SIGTERM, or orphaned (the parent was killed)
        return bool(terminated) or stop.is_set() or orphaned()

    def work() -> tuple[ConsumeSummary, bool]:
        publishing = None if published is None else (lambda: not published.is_set())
        summary = _run_job(job, conn, should_stop, publishing)
        return summary, bool(terminated) and not stop.is_set()

    report_to_parent(conn, work, lambda exc: f"failed: {error_line(exc)}{_hint(exc, job.broker_pid)}")


def _run_job(
    job: WorkerJob, conn: Connection, should_stop: Callable[[], bool], publishing: Callable[[], bool] | None = None
) -> ConsumeSummary:
    from cardpipe.stream.broker import is_alive
    from cardpipe.stream.consumer import consume

    settings = job.settings
    if should_stop():  # stopped while this process was starting
        return ConsumeSummary()
    with job.open_store(settings) as store:
        alive = (lambda pid=job.broker_pid: is_alive(pid)) if job.broker_pid is not None else None
        return consume(
            job.bootstrap_servers,
            settings.kafka_topic,
            store,
            group_id=settings.kafka_group_id,
            dead_letter_topic=settings.dead_letter_topic,
            options=job.options,
            broker_alive=alive,
            should_stop=should_stop,
            publishing=publishing,
            progress=lambda s: conn.send(("progress", f"decided {s.messages:,} messages ({s.rate:,.0f}/s)")),
        )


def _hint(exc: BaseException, broker_pid: int | None) -> str:
    from cardpipe.errors import BrokerLost, BrokerUnavailable
    from cardpipe.stream.broker import is_alive

    advice = (
        "with --workers above 1 a lost embedded broker is not replaced: run consume again, which "
        "re-publishes what is not decided yet, or use --workers 1"
    )
    if isinstance(exc, BrokerLost):
        return f" ({advice})"
    if isinstance(exc, BrokerUnavailable) and broker_pid is not None and not is_alive(broker_pid):
        return f" (the embedded broker stopped; {advice})"
    return ""
