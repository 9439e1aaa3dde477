"""The stream's producer in a process of its own, so that publishing and authorizing overlap.

``cardpipe run`` publishes the ``transactions`` table while its consumer (or consumer workers) decide what
has arrived, as a card network and an issuer's authorizer would: the first decisions are committed while
the last transactions are still being read from the database. The producer is a separate process (spawn
context, :class:`~cardpipe.childprocs.ChildProcess`) because both sides are CPU-bound Python: as a thread it
would take the consumer's interpreter lock half of the time.

The parent asks :meth:`PublisherProcess.publishing` (the ``publishing`` callable of
:func:`cardpipe.stream.consumer.consume`): True while the child publishes, False once every message is
acknowledged by the broker, :class:`PublisherFailed` when the child failed or died.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from multiprocessing.connection import Connection

from cardpipe.childprocs import ChildProcess, prepare_child, report_to_parent
from cardpipe.config import Settings
from cardpipe.errors import CardpipeError
from cardpipe.stream.producer import PublishSummary

log = logging.getLogger(__name__)

#: How long :meth:`PublisherProcess.stop` waits for the child after asking it to stop.
STOP_GRACE_SECONDS = 10.0


class PublisherFailed(CardpipeError):
    """The producer process raised an error or died before every message was acknowledged."""


class StreamStopped(CardpipeError):
    """The consumers were stopped (SIGTERM) while the producer was still publishing."""


class PublisherProcess:
    """Publishes the undecided transactions of ``settings``' database to its topic, in a child process."""

    def __init__(
        self, settings: Settings, bootstrap_servers: str, on_published: Callable[[int], None] | None = None
    ) -> None:
        level = logging.getLogger("cardpipe").getEffectiveLevel()
        self._on_published = on_published
        self._child = ChildProcess(
            _publisher_main, settings, bootstrap_servers, level, on_published is not None, name="cardpipe-publish"
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

    def _receive(self) -> None:
        for kind, payload in self._child.receive():
            if kind == "published":  # progress: how many are published so far
                if self._on_published is not None:
                    self._on_published(payload)
            elif kind == "done":
                self._summary = payload
            else:
                self._error = payload


def _publisher_main(
    conn: Connection, settings: Settings, bootstrap_servers: str, log_level: int, tell_progress: bool = False
) -> None:
    """The child: publish what is undecided, then send ("done", summary) or ("error", one line); with
    ``tell_progress``, ("published", n) every 10,000 messages too (instead of logging them)."""
    orphaned = prepare_child(log_level, "cardpipe: %(message)s")
    told = (lambda n: conn.send(("published", n))) if tell_progress else None
    report_to_parent(conn, lambda: _publish(settings, bootstrap_servers, orphaned, told))


def _publish(
    settings: Settings,
    bootstrap_servers: str,
    orphaned: Callable[[], bool],
    told: Callable[[int], None] | None = None,
) -> PublishSummary:
    from cardpipe.serving.database import make_engine
    from cardpipe.serving.transaction_source import messages_from_database
    from cardpipe.stream.clients import use_client_settings
    from cardpipe.stream.producer import publish_messages

    use_client_settings(settings.kafka_client_in_use)
    engine = make_engine(settings.database_url, create_database=False)
    try:
        return publish_messages(
            messages_from_database(engine),
            bootstrap_servers,
            settings.kafka_topic,
            progress=told or (lambda n: log.info("published %s transactions", f"{n:,}")),
            progress_every=10_000 if told else 100_000,
            should_stop=orphaned,  # the parent was killed
        )
    finally:
        engine.dispose()
