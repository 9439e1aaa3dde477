"""The embedded-broker manager against a real Tansu broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from cardpipe.errors import BrokerUnavailable
from cardpipe.stream.broker import (
    LOCK_FILENAME,
    RECORD_FILENAME,
    BrokerHandle,
    broker_session,
    broker_status,
    ensure_broker,
    ensure_topic,
    ensure_topics,
    stop_broker,
)

pytestmark = pytest.mark.kafka


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def work_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "broker"
    try:
        yield directory
    finally:
        stop_broker(directory)


def test_lifecycle_reuse_topic_roundtrip_and_stop(work_dir: Path) -> None:
    first = ensure_broker(None, work_dir)
    assert first.started_here and first.pid is not None and _alive(first.pid)
    assert first.bootstrap_servers.startswith("127.0.0.1:")
    record = json.loads((work_dir / RECORD_FILENAME).read_text())
    assert record["pid"] == first.pid
    assert record["bootstrap_servers"] == first.bootstrap_servers
    assert {"port", "binary", "started_at"} <= record.keys()
    assert (work_dir / LOCK_FILENAME).exists()

    second = ensure_broker(None, work_dir)
    assert second == BrokerHandle(first.bootstrap_servers, first.pid, False)
    status = broker_status(work_dir)
    assert status is not None and status["pid"] == first.pid

    bootstrap = first.bootstrap_servers
    assert ensure_topic(bootstrap, "transactions", 8) == 8
    assert ensure_topic(bootstrap, "transactions", 8) == 8
    # Several at once: the existing one keeps its partitions, the new one is made with its own.
    assert ensure_topics(bootstrap, {"transactions": 3, "transactions.dlq": 1}) == {
        "transactions": 8,
        "transactions.dlq": 1,
    }
    assert ensure_topics(bootstrap, {"transactions.dlq": 5}) == {"transactions.dlq": 1}

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for partition in range(8):
        producer.produce("transactions", f"tx-{partition}".encode(), key=b"card", partition=partition)
    assert producer.flush(10) == 0

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False})
    consumer.assign([TopicPartition("transactions", p, 0) for p in range(8)])
    received: dict[int, bytes] = {}
    deadline = time.monotonic() + 10
    while len(received) < 8 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            received[message.partition()] = message.value()
    consumer.close()
    assert received == {p: f"tx-{p}".encode() for p in range(8)}

    started = time.monotonic()
    assert stop_broker(work_dir) is True  # fast even though the producer is still connected
    assert time.monotonic() - started < 3
    assert _wait_gone(first.pid)
    assert not (work_dir / RECORD_FILENAME).exists()
    assert broker_status(work_dir) is None
    assert stop_broker(work_dir) is False


def test_ensure_topic_returns_actual_count_of_existing_topic(work_dir: Path) -> None:
    bootstrap = ensure_broker(None, work_dir).bootstrap_servers
    assert ensure_topic(bootstrap, "small", 3) == 3
    assert ensure_topic(bootstrap, "small", 8) == 3
    with pytest.raises(ValueError):
        ensure_topic(bootstrap, "empty", 0)


def test_stale_record_is_replaced(work_dir: Path) -> None:
    work_dir.mkdir(parents=True)
    dead = _dead_pid()
    stale = {"pid": dead, "port": 1, "bootstrap_servers": "127.0.0.1:1", "binary": "tansu", "started_at": ""}
    (work_dir / RECORD_FILENAME).write_text(json.dumps(stale))
    assert broker_status(work_dir) is None

    handle = ensure_broker(None, work_dir)
    assert handle.started_here and handle.pid != dead and _alive(handle.pid)
    assert json.loads((work_dir / RECORD_FILENAME).read_text())["pid"] == handle.pid


def test_record_of_a_live_non_tansu_process_is_not_reused_nor_killed(work_dir: Path) -> None:
    work_dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": sleeper.pid, "port": 9, "bootstrap_servers": "127.0.0.1:9", "binary": "x"}
        (work_dir / RECORD_FILENAME).write_text(json.dumps(record))
        assert stop_broker(work_dir) is False
        (work_dir / RECORD_FILENAME).write_text(json.dumps(record))
        handle = ensure_broker(None, work_dir)
        assert handle.started_here and handle.pid != sleeper.pid
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_broker_outlives_the_starting_process(work_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from cardpipe.stream.broker import ensure_broker; "
        "print(ensure_broker(None, Path(sys.argv[1])).pid)"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(work_dir)], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())
    assert _alive(pid)
    handle = ensure_broker(None, work_dir)
    assert handle.pid == pid and not handle.started_here
    assert stop_broker(work_dir) is True
    assert _wait_gone(pid)


def test_concurrent_starters_share_one_broker(work_dir: Path) -> None:
    handles: list[BrokerHandle] = []

    def start() -> None:
        handles.append(ensure_broker(None, work_dir))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(handles) == 4
    assert len({h.pid for h in handles}) == 1
    assert sum(h.started_here for h in handles) == 1


def test_broker_session_stops_what_it_started_even_on_error(work_dir: Path) -> None:
    with pytest.raises(RuntimeError), broker_session(None, work_dir) as handle:
        assert handle.started_here and handle.pid is not None
        pid = handle.pid
        raise RuntimeError("boom")
    assert _wait_gone(pid)
    assert broker_status(work_dir) is None


def test_broker_session_leaves_a_reused_broker_running(work_dir: Path) -> None:
    started = ensure_broker(None, work_dir)
    with broker_session(None, work_dir) as handle:
        assert handle.pid == started.pid and not handle.started_here
    assert started.pid is not None and _alive(started.pid)
    assert broker_status(work_dir) is not None


def test_external_broker_is_used_as_is(work_dir: Path, tmp_path: Path) -> None:
    embedded = ensure_broker(None, work_dir)
    other = tmp_path / "other"
    handle = ensure_broker(embedded.bootstrap_servers, other, timeout=5)
    assert handle == BrokerHandle(embedded.bootstrap_servers, None, False)
    assert not (other / RECORD_FILENAME).exists()


def test_unreachable_external_broker_fails_fast_with_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as excinfo:
        ensure_broker("127.0.0.1:1", tmp_path, timeout=1.5)
    assert time.monotonic() - started < 5
    message = str(excinfo.value)
    assert "127.0.0.1:1" in message and "unreachable" in message
    assert "\n" not in message
    assert not (tmp_path / RECORD_FILENAME).exists()
