"""The long-lived resources of a command, owned in one place: :class:`Runtime`.

``run``, ``consume`` and ``serve`` (and the other commands) are compositions over one runtime: it opens the
serving database's engine, the broker and the topics when first asked, once, and on exit stops and closes
whatever it started, in the reverse order, whatever happened inside.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy import Engine

from cardpipe.childprocs import signals_deferred
from cardpipe.config import Settings
from cardpipe.orchestration.locks import RUN_SETUP, SHARED, DatabaseLock, FolderLock, NotReady, require_loaded
from cardpipe.serving.database import check_connection, create_clean_schema, ensure_schema, make_engine
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.broker import BrokerHandle, ensure_broker, ensure_topics, stop_broker
from cardpipe.stream.clients import use_client_settings

log = logging.getLogger("cardpipe")


class Stoppable(Protocol):
    """A child process (or anything) the runtime stops on exit; stopping twice must be harmless."""

    def stop(self) -> None: ...


ChildT = TypeVar("ChildT", bound=Stoppable)


class Runtime:
    """The database engine, the broker, the topics and the child processes of one command; a context manager.

    Each is opened lazily, once: the engine (its connection checked once), the schema, the broker
    (``ensure_broker``: an embedded one is started when none is configured or running) and the topic with its
    dead-letter topic. On exit the children it adopted are stopped, then the broker if this runtime started it
    and ``stop_broker_on_exit`` (``run`` and ``serve``; ``consume`` and ``produce`` leave it running for the
    next command), then the engine is disposed of.

    ``broker``: a handle to use instead of ensuring one; the runtime never stops it.

    ``lock``: how this runtime holds the results folder and the database (see :mod:`cardpipe.orchestration.locks`):
    ``"shared"`` (the default), ``"exclusive"`` (``run``, ``setup``, ``load``: they wipe tables) or None. Taken on
    first use of the engine (or by :meth:`hold`), released on exit; ``command`` names this holder to others.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        broker: BrokerHandle | None = None,
        stop_broker_on_exit: bool = False,
        lock: str | None = SHARED,
        command: str | None = None,
    ):
        self.settings = settings
        use_client_settings(settings.kafka_client_in_use)
        if settings.uses_embedded_broker and settings.kafka_client:
            log.warning(
                "KAFKA_* client settings (%s) are for a configured cluster: the embedded broker takes none",
                ", ".join(settings.kafka_client),
            )
        self.stop_broker_on_exit = stop_broker_on_exit
        self.lock_mode = lock
        self.command = command
        self._folder_lock: FolderLock | None = None
        self._broker = broker
        self._started_broker = False  # a broker this runtime ensured was started by it
        self._engine: Engine | None = None
        self._schema_ready = False
        self._partitions: dict[str, int] = {}  # bootstrap servers -> the topic's partition count
        self._lock = threading.RLock()  # ``serve`` shares one runtime between threads
        self._exit = ExitStack()
        self._closed = False

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the children, then the broker (see the class), then dispose of the engine; idempotent.

        A closed runtime opens nothing more (a thread still running then gets an error, never a new broker).
        """
        self._closed = True
        self._exit.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the runtime is closed")

    # ------------------------------------------------------------------------------------------ locks

    def hold(self) -> None:
        """Take this runtime's hold on the results folder now (the database's comes with the engine); raises
        :class:`~cardpipe.orchestration.locks.PipelineBusy` naming the holder when another command excludes it."""
        with self._lock:
            if self.lock_mode is None or self._folder_lock is not None:
                return
            self._check_open()
            folder_lock = FolderLock(self.settings.results_dir, self.lock_mode, self.command).acquire()
            self._folder_lock = folder_lock
            self._exit.callback(folder_lock.release)

    # ------------------------------------------------------------------------------------------ database

    @property
    def engine(self) -> Engine:
        """The serving database's engine, its connection checked and the database's lock taken (on first use)."""
        with self._lock:
            if self._engine is None:
                self._check_open()
                self.hold()
                engine = make_engine(self.settings.database_url)
                try:
                    check_connection(engine)
                except BaseException:
                    engine.dispose()
                    raise
                self._engine = engine
                self._exit.callback(self._dispose_engine)
                if self.lock_mode is not None:
                    command = self.command or (self._folder_lock.command if self._folder_lock else "cardpipe")
                    where = self.settings.describe_database()
                    db_lock = DatabaseLock(engine, self.lock_mode, command, where).acquire()
                    self._exit.callback(db_lock.release)
            return self._engine

    def loaded_engine(self, command: str) -> Engine:
        """The engine of a database set up and loaded (schema ensured); else :class:`~cardpipe.orchestration.locks.
        NotReady` saying what to run first (a missing SQLite file is not created)."""
        url = self.settings.database_url
        sqlite_file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
        if sqlite_file and not Path(sqlite_file).exists():
            raise NotReady(f"{command}: nothing set up in {self.settings.results_dir}: {RUN_SETUP}")
        require_loaded(self.engine, self.settings.describe_database(), command)
        return self.ensure_schema()

    def ensure_schema(self) -> Engine:
        """The engine, with every cardpipe table and view there (created once when missing)."""
        with self._lock:
            engine = self.engine
            if not self._schema_ready:
                ensure_schema(engine)
                self._schema_ready = True
            return engine

    def clean_schema(self) -> Engine:
        """Drop every cardpipe table and create the schema anew; the engine."""
        with self._lock:
            engine = self.engine
            create_clean_schema(engine)
            self._schema_ready = True
            return engine

    def stream_store(self) -> StreamStore:
        """A new checkpoint store for the topic on this runtime's engine (schema ensured)."""
        return StreamStore(self.ensure_schema(), self.settings.kafka_topic)

    def _dispose_engine(self) -> None:
        engine, self._engine, self._schema_ready = self._engine, None, False
        if engine is not None:
            engine.dispose()

    # ------------------------------------------------------------------------------------------ broker

    @property
    def has_broker(self) -> bool:
        """Whether the broker is known already (given, or ensured before)."""
        return self._broker is not None

    @property
    def broker(self) -> BrokerHandle:
        """The broker handle (ensured on first use: an embedded broker is started when none runs)."""
        with self._lock:
            if self._broker is None:
                self._check_open()
                self._broker = self._ensure_broker()
                if self._broker.started_here and not self.stop_broker_on_exit:
                    log.info(
                        "started the embedded broker at %s (stop it with: cardpipe broker stop --results-dir %s)",
                        self._broker.bootstrap_servers,
                        self.settings.results_dir,
                    )
            return self._broker

    def replace_broker(self) -> BrokerHandle:
        """After the embedded broker died: a new one (topics ensured again on next use)."""
        with self._lock:
            self._check_open()
            self._partitions.clear()
            self._broker = self._ensure_broker()
            return self._broker

    def close_broker(self) -> None:
        """Done with the broker: stop it now if this runtime is to stop it on exit; forget it either way."""
        started, self._started_broker, self._broker = self._started_broker, False, None
        self._partitions.clear()
        if started and self.stop_broker_on_exit:
            stop_broker(self.settings.results_dir)  # the recorded one: a replacement if the first one died

    def _ensure_broker(self) -> BrokerHandle:
        handle = ensure_broker(self.settings.kafka_bootstrap_servers, self.settings.results_dir)
        if handle.started_here and not self._started_broker:
            self._started_broker = True
            self._exit.callback(self.close_broker)
        return handle

    def ensure_topics(self) -> int:
        """Make sure of the topic and its dead-letter topic on the broker (once per broker); the topic's partitions."""
        with self._lock:
            servers = self.broker.bootstrap_servers
            if servers not in self._partitions:
                replicas = self.settings.topic_replication_factor
                topic = self.settings.kafka_topic
                wanted = {self.settings.dead_letter_topic: 1, topic: self.settings.kafka_partitions}
                self._partitions[servers] = ensure_topics(servers, wanted, replication_factor=replicas)[topic]
            return self._partitions[servers]

    # ------------------------------------------------------------------------------------------ children

    def adopt(self, child: ChildT) -> ChildT:
        """Own ``child`` (a started process): it is stopped on exit unless :meth:`release` stopped it before."""
        with self._lock:
            if self._closed:
                child.stop()
                self._check_open()
            self._exit.callback(child.stop)
        return child

    def start(self, factory: Callable[[], ChildT]) -> ChildT:
        """Start a child (``factory()``) and own it, SIGTERM and SIGINT held meanwhile: a signal can no longer
        land between the two and leave a started child that nobody stops."""
        with signals_deferred(signal.SIGTERM, signal.SIGINT):
            return self.adopt(factory())

    def release(self, child: Stoppable) -> None:
        """Stop an adopted child now (it is done with, or no longer wanted)."""
        child.stop()


@contextmanager
def open_stream_store(settings: Settings) -> Iterator[StreamStore]:
    """A checkpoint store on its own engine, disposed of on exit (a consumer worker process's)."""
    engine = make_engine(settings.database_url, create_database=False)
    try:
        check_connection(engine)
        yield StreamStore(engine, settings.kafka_topic)
    finally:
        engine.dispose()
