"""The stream's producer in processes of its own: so that publishing and authorizing overlap, and so that
``cardpipe produce`` publishes on every core.

``cardpipe run`` publishes the ``transactions`` table while its consumer (or consumer workers) decide what
has arrived, as a card network and an issuer's authorizer would: the first decisions are committed while
the last transactions are still being read from the database. The producer is a separate process (spawn
context, :class:`~cardpipe.childprocs.ChildProcess`) because both sides are CPU-bound Python: as a thread it
would take the consumer's interpreter lock half of the time.

The parent asks :meth:`PublisherProcess.publishing` (the ``publishing`` callable of
:func:`cardpipe.stream.consumer.consume`): True while the child publishes, False once every message is
acknowledged by the broker, :class:`PublisherFailed` when the child failed or died.

``cardpipe produce`` on SQLite publishes in several such children at once (:func:`publish_in_processes`), each
the cards of its own partitions, forked from a server started ahead (:func:`~cardpipe.childprocs.start_forkserver`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from cardpipe.childprocs import CONTEXT, ChildProcess, prepare_child, report_to_parent
from cardpipe.config import Settings
from cardpipe.errors import CardpipeError
from cardpipe.stream.producer import PublishSummary

if TYPE_CHECKING:
    from cardpipe.childprocs import StartContext
    from cardpipe.serving.transaction_source import CardShare

log = logging.getLogger(__name__)

#: How long :meth:`PublisherProcess.stop` waits for the child after asking it to stop.
STOP_GRACE_SECONDS = 10.0


class PublisherFailed(CardpipeError):
    """The producer process raised an error or died before every message was acknowledged."""


class StreamStopped(CardpipeError):
    """The consumers were stopped (SIGTERM) while the producer was still publishing."""


class PublisherProcess:
    """Publishes the undecided transactions of ``settings``' database to its topic, in a child process; with
    ``share``, only those of its cards (``republish_all``: the decided ones too)."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        on_published: Callable[[int], None] | None = None,
        *,
        share: CardShare | None = None,
        republish_all: bool = False,
        context: StartContext = CONTEXT,
        name: str = "cardpipe-publish",
    ) -> None:
        level = logging.getLogger("cardpipe").getEffectiveLevel()
        self._on_published = on_published
        told = on_published is not None
        self._child = ChildProcess(
            _publisher_main,
            settings,
            bootstrap_servers,
            level,
            told,
            share,
            republish_all,
            name=name,
            context=context,
        )
        self._summary: PublishSummary | None = None
        self._error: str | None = None

    def publishing(self) -> bool:
        """True while the child publishes; False once it is done; raises :class:`PublisherFailed` if it failed."""
        if self._summary is None and self._error is None:
            self._receive()
            if self._summary is None and self._error is None:
                if self._child.is_alive():
                    return True
                self._receive()  # what it sent just before exiting
                if self._summary is None and self._error is None:
                    self._error = self._child.describe_exit()
        if self._error is not None:
            raise PublisherFailed(f"publishing failed: {self._error}")
        return False

    def result(self) -> PublishSummary:
        """Wait for the child to finish; its summary (or :class:`PublisherFailed`)."""
        self._child.join()
        self.publishing()  # reads what it sent; raises if it failed
        assert self._summary is not None
        return self._summary

    def stop(self) -> None:
        """Stop the child if it still runs (SIGTERM: it stops publishing at once); no-op once it finished."""
        self._child.stop(STOP_GRACE_SECONDS)

    @property
    def handles(self) -> list[Any]:
        """What :func:`multiprocessing.connection.wait` watches for this child (its pipe and its process)."""
        return self._child.handles

    def _receive(self) -> None:
        for kind, payload in self._child.receive():
            if kind == "published":  # progress: how many are published so far
                if self._on_published is not None:
                    self._on_published(payload)
            elif kind == "done":
                self._summary = payload
            else:
                self._error = payload


def publish_in_processes(
    start: Callable[[Callable[[], PublisherProcess]], PublisherProcess],
    settings: Settings,
    bootstrap_servers: str,
    shares: Sequence[CardShare],
    *,
    republish_all: bool = False,
    context: StartContext = CONTEXT,
    progress: Callable[[int], None] | None = None,
) -> PublishSummary:
    """Publish the transactions of ``settings``' database in one child process per share of the cards, at once;
    ``start`` starts each child and owns it (:meth:`~cardpipe.orchestration.runtime.Runtime.start`: the children
    are stopped if this one fails or is stopped). When every share is one partition's cards or more (see
    :func:`~cardpipe.stream.partitioner.split_by_partition`), each partition still has one producer, which
    writes it in timestamp order. ``progress``: told how many all the children published so far. Raises
    :class:`PublisherFailed` (the others stopped) when one fails."""
    published = [0] * len(shares)

    def publisher(k: int, share: CardShare) -> Callable[[], PublisherProcess]:
        def told(n: int) -> None:
            published[k] = n
            if progress is not None:
                progress(sum(published))

        return lambda: PublisherProcess(
            settings,
            bootstrap_servers,
            told,
            share=share,
            republish_all=republish_all,
            context=context,
            name=f"cardpipe-publish-{k}",
        )

    started = time.perf_counter()
    children = [start(publisher(k, share)) for k, share in enumerate(shares)]
    running = list(enumerate(children))
    while running:
        wait([handle for _, p in running for handle in p.handles], timeout=1.0)
        still = []
        for k, p in running:
            try:
                if p.publishing():
                    still.append((k, p))
            except PublisherFailed as exc:
                for other in children:
                    other.stop()
                others = "the other was stopped" if len(children) == 2 else "the others were stopped"
                raise PublisherFailed(f"{exc}, in publishing process {k + 1} of {len(children)}; {others}") from None
        running = still
    summaries = [p.result() for p in children]
    return PublishSummary(
        published=sum(s.published for s in summaries),
        failed=sum(s.failed for s in summaries),
        seconds=time.perf_counter() - started,
    )


def _publisher_main(
    conn: Connection,
    settings: Settings,
    bootstrap_servers: str,
    log_level: int,
    tell_progress: bool = False,
    share: CardShare | None = None,
    republish_all: bool = False,
) -> None:
    """The child: publish what is undecided (of ``share``'s cards), then send ("done", summary) or ("error", one
    line); with ``tell_progress``, ("published", n) every 10,000 messages too (instead of logging them)."""
    orphaned = prepare_child(log_level, "cardpipe: %(message)s")
    told = (lambda n: conn.send(("published", n))) if tell_progress else None
    report_to_parent(conn, lambda: _publish(settings, bootstrap_servers, orphaned, told, share, republish_all))


def _publish(
    settings: Settings,
    bootstrap_servers: str,
    orphaned: Callable[[], bool],
    told: Callable[[int], None] | None = None,
    share: CardShare | None = None,
    republish_all: bool = False,
) -> PublishSummary:
    from cardpipe.serving.database import make_engine
    from cardpipe.serving.transaction_source import messages_from_database
    from cardpipe.stream.clients import use_client_settings
    from cardpipe.stream.producer import publish_messages

    use_client_settings(settings.kafka_client_in_use)
    engine = make_engine(settings.database_url, create_database=False)
    try:
        return publish_messages(
            messages_from_database(engine, only_undecided=not republish_all, share=share),
            bootstrap_servers,
            settings.kafka_topic,
            progress=told or (lambda n: log.info("published %s transactions", f"{n:,}")),
            progress_every=10_000 if told else 100_000,
            should_stop=orphaned,  # the parent was killed
        )
    finally:
        engine.dispose()
