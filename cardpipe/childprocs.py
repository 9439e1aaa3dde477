"""Child processes that report to their parent through a pipe: started, watched, described and stopped alike.

cardpipe runs CPU-bound Python beside the command process: the stream's producer while the consumers decide
(:mod:`cardpipe.orchestration.publisher`) and the consumer workers (:mod:`cardpipe.stream.workers`). Both start
as fresh interpreters (no inherited threads, locks or connections): spawned, or the workers forked from a
server spawned ahead with their modules imported (:func:`start_forkserver`). They get their arguments pickled
(never through argv: the settings hold the database password) and send ``(kind, payload)`` messages back on a
one-way pipe, ending with ``("done", result)`` or ``("error", one line)``.

The parent side is :class:`ChildProcess`; the child side is :func:`prepare_child` (signals and logging as a
child needs them) and :func:`report_to_parent` (run the work, send its result or its error, exit).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cardpipe.errors import CardpipeError, first_line
from cardpipe.logs import configure as configure_logs

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext

    StartContext = SpawnContext | ForkServerContext

log = logging.getLogger(__name__)

#: The start method of cardpipe's child processes (the consumer workers': see :func:`worker_context`).
CONTEXT = multiprocessing.get_context("spawn")
_FORKSERVER = (
    multiprocessing.get_context("forkserver") if "forkserver" in multiprocessing.get_all_start_methods() else None
)
#: Where :func:`worker_context` starts the workers: spawned until :func:`start_forkserver` starts the server.
_worker_context: StartContext = CONTEXT

#: Loggers of the Kafka client library: the parent reports broker trouble itself.
_QUIET_LOGGERS = ("cardpipe.librdkafka", "cardpipe.stream.broker.librdkafka")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform tells it, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe_exit(exitcode: int | None) -> str:
    """How a child process ended without a result: killed by which signal, or its exit status."""
    if exitcode is not None and exitcode < 0:
        try:
            how = signal.Signals(-exitcode).name
        except ValueError:
            how = f"signal {-exitcode}"
        return f"was killed ({how}) before finishing"
    return f"exited (status {exitcode}) without a result"


@contextmanager
def signal_handled(signum: int, handler: Any) -> Iterator[None]:
    """``handler`` for ``signum`` while inside, the previous one restored after (nothing off the main thread)."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


def start_forkserver(modules: Sequence[str]) -> None:
    """Start the server process the consumer workers are then forked from (:func:`worker_context`), importing
    ``modules`` in it while this process goes on with its own imports: returns at once.

    A worker forked from it starts with those modules imported, where a spawned one imports them itself: N
    workers cost the imports of one, done while the command imports its own. The server is spawned too, a
    fresh single-threaded interpreter (nothing it forks inherits threads, locks or connections), with Ctrl-C
    ignored, which the workers keep until they set their own handlers; it ends when this process does.
    """
    global _worker_context
    if _FORKSERVER is None:  # not on this platform: the workers are spawned
        return
    _FORKSERVER.set_forkserver_preload(list(modules))
    try:
        with signal_handled(signal.SIGINT, signal.SIG_IGN):
            multiprocessing.forkserver.ensure_running()
    except OSError as exc:  # a faster start only: without the server, the workers are spawned
        log.debug("the workers will be spawned: their server did not start: %s", exc)
        return
    _worker_context = _FORKSERVER


def worker_context() -> StartContext:
    """Where the consumer workers are started from: the forkserver once :func:`start_forkserver` started it
    (the CLI does, first thing, for ``--workers`` above 1), else fresh spawned interpreters."""
    return _worker_context


@contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """Hold ``signums`` while inside: one that arrives is delivered to the handler in place before, on the way
    out (main thread only; elsewhere Python runs no signal handler anyway). For steps that must not be cut in
    two, as starting a child process and taking ownership of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda n, _frame: arrived.append(n)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


class ChildProcess:
    """A started child process, ``target(conn, *args)``, and the reading end of its pipe (parent side)."""

    def __init__(self, target: Callable[..., None], *args: Any, name: str, context: StartContext = CONTEXT):
        self._receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=target, args=(sender, *args), name=name, daemon=True)
        # Until the child sets its own handlers, Ctrl-C is the parent's alone: SIG_IGN is inherited through exec (a
        # child forked from the server inherits the server's, which ignores it too: :func:`start_forkserver`).
        with signal_handled(signal.SIGINT, signal.SIG_IGN):
            self.process.start()
        sender.close()  # the child holds the writing end: EOF here once it is gone
        self.open = True  # the pipe has not reached EOF

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None  # started in __init__
        return pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    @property
    def handles(self) -> list[Any]:
        """What :func:`multiprocessing.connection.wait` watches: the pipe (while open) and the process."""
        return [self._receiver, self.process.sentinel] if self.open else [self.process.sentinel]

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def receive(self) -> Iterator[tuple[str, Any]]:
        """The messages the child has sent so far, without waiting (a child blocked on a full pipe waits for this)."""
        while self.open:
            try:
                if not self._receiver.poll():
                    return
                message = self._receiver.recv()
            except (EOFError, OSError):
                self.open = False
                return
            yield message

    def describe_exit(self) -> str:
        """How the child ended, for a child that sent no result."""
        return describe_exit(self.process.exitcode)

    def join(self, timeout: float | None = None) -> None:
        self.process.join(timeout)

    def kill(self, timeout: float | None = 10.0) -> None:
        """SIGKILL, then wait for the process to be gone (up to ``timeout``; None: however long it takes)."""
        self.process.kill()
        self.process.join(timeout)

    def stop(self, grace: float) -> None:
        """SIGTERM if it still runs, SIGKILL if it has not ended ``grace`` seconds later; then close the pipe."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace)
            if self.process.is_alive():
                self.kill(timeout=None)
        self.close()

    def close(self) -> None:
        """Close the reading end of the pipe (nothing more is received)."""
        self._receiver.close()
        self.open = False


# --- inside a child process ----------------------------------------------------------------------------


def prepare_child(log_level: int, log_format: str) -> Callable[[], bool]:
    """A child's first step: Ctrl-C left to the parent, the parent's log level, the client libraries quiet.

    Returns ``orphaned()``: True once the parent is gone (killed), so that the child stops too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it stops this process itself
    parent = os.getppid()
    configure_logs(log_level, log_format)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    for quiet in _QUIET_LOGGERS:
        logging.getLogger(quiet).setLevel(logging.CRITICAL)
    # SQLite stores DECIMAL as numbers; SQLAlchemy converts them back to exact 2-decimal Decimals.
    warnings.filterwarnings("ignore", message=r".*does \*not\* support Decimal objects natively")
    return lambda: os.getppid() != parent


def error_line(exc: BaseException) -> str:
    """One line for an error: the message of a :class:`~cardpipe.errors.CardpipeError`, else type and message."""
    return first_line(exc) if isinstance(exc, CardpipeError) else f"{type(exc).__name__}: {first_line(exc)}"


def report_to_parent(
    conn: Connection, work: Callable[[], object], describe: Callable[[BaseException], str] = error_line
) -> NoReturn:
    """Run ``work``; send ``("done", its result)`` or ``("error", describe(exc))``; end the process (status 0 or 1).

    An unexpected error (not a :class:`~cardpipe.errors.CardpipeError`) also leaves its traceback on stderr.
    """
    try:
        message: tuple[str, Any] = ("done", work())
        status = 0
    except BaseException as exc:  # noqa: B036  # reported to the parent, then this process ends
        if not isinstance(exc, CardpipeError):
            traceback.print_exc(file=sys.stderr)
        message, status = ("error", describe(exc)), 1
    with suppress(OSError):  # the parent is gone: nobody to tell
        conn.send(message)
    conn.close()
    sys.exit(status)


def remove_orphaned_dirs(folder: Path, prefix: str) -> list[Path]:
    """Remove the working folders ``<prefix><pid>-…`` in ``folder`` whose process is gone (one killed before it
    could clean up: they may hold gigabytes); those of live processes stay. Returns the folders removed."""
    removed = []
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:  # alive, another user's
            continue
    return removed
