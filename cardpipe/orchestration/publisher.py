"""The stream's producer in a process of its own, so that publishing and authorizing overlap.

``cardpipe run`` publishes the ``transactions`` table while its consumer (or consumer workers) decide what
has arrived, as a card network and an issuer's authorizer would: the first decisions are committed while
the last transactions are still being read from the database. The producer is a separate process (spawn
context) because both sides are CPU-bound Python: as a thread it would take the consumer's interpreter
lock half of the time.

The parent asks :meth:`PublisherProcess.publishing` (the ``publishing`` callable of
:func:`cardpipe.stream.consumer.consume`): True while the child publishes, False once every message is
acknowledged by the broker, :class:`PublisherFailed` when the child failed or died.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

from cardpipe.config import Settings
from cardpipe.errors import CardpipeError, first_line
from cardpipe.stream.producer import PublishSummary
from cardpipe.stream.workers import describe_exit

log = logging.getLogger(__name__)

#: How long :meth:`PublisherProcess.stop` waits for the child after asking it to stop.
STOP_GRACE_SECONDS = 10.0


class PublisherFailed(CardpipeError):
    """The producer process raised an error or died before every message was acknowledged."""


class StreamStopped(CardpipeError):
    """The consumers were stopped (SIGTERM) while the producer was still publishing."""


class PublisherProcess:
    """Publishes the undecided transactions of ``settings``' database to its topic, in a child process."""

    def __init__(self, settings: Settings, bootstrap_servers: str):
        context = multiprocessing.get_context("spawn")
        self._receiver, sender = context.Pipe(duplex=False)
        level = logging.getLogger("cardpipe").getEffectiveLevel()
        # Settings go through the process arguments pickled, never through argv (the database password).
        self._process = context.Process(target=_publisher_main, args=(settings, bootstrap_servers, sender, level),
                                        name="cardpipe-publish", daemon=True)
        self._process.start()
        sender.close()  # the child holds the writing end
        self._summary: PublishSummary | None = None
        self._error: str | None = None

    def publishing(self) -> bool:
        """True while the child publishes; False once it is done; raises :class:`PublisherFailed` if it failed."""
        if self._summary is None and self._error is None:
            self._receive()
            if self._summary is None and self._error is None:
                if self._process.is_alive():
                    return True
                self._receive()  # what it sent just before exiting
                if self._summary is None and self._error is None:
                    self._error = describe_exit(self._process.exitcode)
        if self._error is not None:
            raise PublisherFailed(f"publishing failed: {self._error}")
        return False

    def result(self) -> PublishSummary:
        """Wait for the child to finish; its summary (or :class:`PublisherFailed`)."""
        self._process.join()
        self.publishing()  # reads what it sent; raises if it failed
        assert self._summary is not None
        return self._summary

    def stop(self) -> None:
        """Stop the child if it still runs (the consumer side failed); no-op once it finished."""
        if self._process.is_alive():
            self._process.terminate()  # SIGTERM: the child stops publishing at once
            self._process.join(STOP_GRACE_SECONDS)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._receiver.close()

    def _receive(self) -> None:
        with suppress(EOFError, OSError):
            while self._receiver.poll():
                kind, payload = self._receiver.recv()
                if kind == "done":
                    self._summary = payload
                else:
                    self._error = payload


def _publisher_main(settings: Settings, bootstrap_servers: str, conn: Connection, log_level: int) -> None:
    """The child: publish what is undecided, then send ("done", summary) or ("error", one line)."""
    import signal

    from cardpipe.serving.database import make_engine
    from cardpipe.serving.transaction_source import transactions_from_database
    from cardpipe.stream.producer import publish

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops this process itself
    logging.basicConfig(level=log_level, format="cardpipe: %(message)s", stream=sys.stderr)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("cardpipe.librdkafka").setLevel(logging.CRITICAL)  # the parent reports broker trouble
    parent = os.getppid()
    status, engine = 0, None
    try:
        engine = make_engine(settings.database_url, create_database=False)
        summary = publish(
            transactions_from_database(engine), bootstrap_servers, settings.kafka_topic,
            progress=lambda n: log.info("published %s transactions", f"{n:,}"),
            should_stop=lambda: os.getppid() != parent,  # orphaned: the parent was killed
        )
        message: tuple[str, Any] = ("done", summary)
    except CardpipeError as exc:
        message, status = ("error", first_line(exc)), 1
    except BaseException as exc:  # noqa: B036  # reported to the parent, then this process ends
        import traceback

        traceback.print_exc(file=sys.stderr)
        message, status = ("error", f"{type(exc).__name__}: {first_line(exc)}"), 1
    finally:
        if engine is not None:
            engine.dispose()
    with suppress(OSError):  # the parent is gone: nobody to tell
        conn.send(message)
    conn.close()
    sys.exit(status)
