"""``cardpipe serve``: the running Lambda system in one process.

The consumer decides the topic in follow mode (resuming from the committed offsets) on a thread of its own,
the HTTP API answers the merged views, a status thread measures the lag, and with ``settle_every`` a timer
thread runs a settlement every so often. SIGINT/SIGTERM stop the web server; the consumer then finishes
its batch (checkpoint), its leases are released and the embedded broker this service started is stopped.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from cardpipe.config import Settings
from cardpipe.errors import CardpipeError, ConfigError, first_line
from cardpipe.orchestration.runtime import Runtime
from cardpipe.serving import schema
from cardpipe.stream.consumer import ConsumeOptions, log_end_offsets

log = logging.getLogger("cardpipe.service")

#: Seconds between two measurements of the consumer's lag.
STATUS_EVERY = 1.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_token_for(host: str, token: str | None) -> str | None:
    """The bearer token the API requires: ``token`` if set; on a non-loopback address one is mandatory."""
    token = (token or "").strip() or None
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without an API token: set CARDPIPE_API_TOKEN (clients "
            "send it as 'Authorization: Bearer <token>'), or bind 127.0.0.1"
        )
    return token


@dataclass
class ServiceStatus:
    """What the service knows of itself, for ``/health`` (read without any broker round trip)."""

    lag: int | None = None
    lag_by_partition: dict[int, int] = field(default_factory=dict)
    consumer_error: str | None = None
    settlements: int = 0
    last_settlement_error: str | None = None
    started: float = field(default_factory=time.monotonic)


class Service:
    """The consumer, the lag measurement and the settlement timer of ``cardpipe serve``: three threads over
    one :class:`~cardpipe.orchestration.runtime.Runtime` (the engine, the broker); a context manager that stops
    everything it started on exit."""

    def __init__(self, settings: Settings, *, settle_every: float | None = None, workers: int = 1):
        self.settings = settings
        self.settle_every = settle_every
        self.workers = workers
        self.status = ServiceStatus()
        self.runtime = Runtime(settings, stop_broker_on_exit=True)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def engine(self) -> Engine:
        """The serving database's engine (the API's too)."""
        return self.runtime.engine

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Service:
        from cardpipe.orchestration import commands

        try:
            self.runtime.ensure_schema()
            # A new in-memory broker holds nothing: what is loaded and not yet decided is published again.
            commands.stream_broker(self.runtime)
        except BaseException:
            self.runtime.close()
            raise
        self._start("consumer", self._consume)
        self._start("status", self._measure)
        if self.settle_every:
            self._start("settlements", self._settle_periodically)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 2.5) -> None:
        """Stop the consumer after its current batch, then the other threads; then the runtime (the broker if
        started here, the engine)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.runtime.close()

    def _start(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=f"cardpipe-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------------------------------ threads

    def _consume(self) -> None:
        from cardpipe.orchestration import commands

        options = ConsumeOptions(follow=True, batch_size=self.settings.consumer_batch_size)
        try:
            commands.consume(
                self.settings, options, workers=self.workers, should_stop=self._stop.is_set, runtime=self.runtime
            )
        except CardpipeError as exc:
            self.status.consumer_error = first_line(exc)
            log.error("consumer stopped: %s", first_line(exc))
        except Exception as exc:  # reported on /health, the service keeps answering
            self.status.consumer_error = f"{type(exc).__name__}: {first_line(exc)}"
            log.exception("consumer failed")

    def _measure(self) -> None:
        so = schema.stream_offsets
        while not self._stop.wait(STATUS_EVERY):
            try:
                ends = log_end_offsets(self.runtime.broker.bootstrap_servers, self.settings.kafka_topic)
                with self.runtime.engine.connect() as conn:
                    done = dict(
                        conn.execute(
                            select(so.c.kafka_partition, so.c.next_offset).where(
                                so.c.topic == self.settings.kafka_topic
                            )
                        ).all()
                    )
                by_partition = {p: max(0, end - (done.get(p) or 0)) for p, end in ends.items()}
                self.status.lag_by_partition, self.status.lag = by_partition, sum(by_partition.values())
            except Exception as exc:  # the broker or database restarting: measured again next time
                log.debug("lag not measured: %s", exc)

    def _settle_periodically(self) -> None:
        from cardpipe.orchestration import commands

        assert self.settle_every is not None
        while not self._stop.wait(self.settle_every):
            try:
                result = commands.batch(self.settings, runtime=self.runtime)
                if not result.nothing_new:
                    self.status.settlements += 1
                    log.info("settlement %s published", result.settlement_id)
                self.status.last_settlement_error = None
            except Exception as exc:  # a failed settlement leaves the previous one in force
                self.status.last_settlement_error = first_line(exc)
                log.error("settlement failed: %s", first_line(exc))

    def health(self) -> dict[str, Any]:
        return {
            "lag": self.status.lag,
            "lag_by_partition": self.status.lag_by_partition,
            "consumer_error": self.status.consumer_error,
        }


@contextmanager
def running_service(settings: Settings, *, settle_every: float | None = None, workers: int = 1) -> Iterator[Service]:
    """A started :class:`Service` (for tests and embedding)."""
    with Service(settings, settle_every=settle_every, workers=workers) as service:
        yield service


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settle_every: float | None = None,
    workers: int = 1,
    token: str | None = None,
) -> int | None:
    """Run the service until SIGINT/SIGTERM: consumer, API (uvicorn) and the optional settlement timer.

    Returns the signal that stopped it (None if the web server stopped by itself).
    """
    import uvicorn

    from cardpipe.serving.api import create_app

    class Server(uvicorn.Server):
        """uvicorn's server, stopping gracefully on SIGINT/SIGTERM without raising the signal again after."""

        stopped_by: int | None = None

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(signum: int, _frame: object) -> None:
                self.stopped_by = signum
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    required = api_token_for(host, token)
    # The API's port is taken before anything starts: an embedded broker choosing a free port cannot take it, and a
    # port in use is said at once.
    with (
        listening_socket(host, port) as listener,
        Service(settings, settle_every=settle_every, workers=workers) as service,
    ):
        app = create_app(service.engine, token=required, status=service.health)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=1
        )
        server = Server(config)
        log.info(
            "serving on http://%s:%d (API docs at /docs)%s", host, port, "; bearer token required" if required else ""
        )
        server.run(sockets=[listener])
        if not server.started and server.stopped_by is None:
            raise CardpipeError(f"could not serve on {host}:{port}")
        return server.stopped_by


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (an IPv6 address when ``host`` holds a colon), as uvicorn binds its
    own but not inherited by child processes (a broker outliving the command must not hold the port); a
    :class:`CardpipeError` naming the address when it cannot be bound (a port in use, an unknown host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CardpipeError(f"could not serve on {host}:{port}: {exc.strerror or exc}") from None
    return sock
