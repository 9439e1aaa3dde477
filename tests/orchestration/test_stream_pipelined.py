"""``commands.stream`` (what ``cardpipe run`` does): the producer publishes in its own process while the
consumer (or consumer workers) decides, on the real embedded broker.

The consumer must not stop while the producer publishes, even when it has caught up and waited longer than
its idle time; it stops once it has read every partition up to the end offsets measured after the producer
finished; the results are those of the sequential produce-then-consume; a producer that fails is a clear
error, and the consumers stop.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.orchestration.publisher import PublisherFailed, StreamStopped
from cardpipe.serving import schema
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import transactions_from_database
from cardpipe.stream.broker import BrokerHandle, broker_status, ensure_broker, ensure_topic, is_alive, stop_broker
from cardpipe.stream.consumer import ConsumeOptions, consume, log_end_offsets
from cardpipe.stream.producer import publish
from tests.orchestration.helpers import REPO_ROOT, command_lines, env_without_services, reference_results
from tests.orchestration.test_workers import _row, count_rows, stream_rows

pytestmark = pytest.mark.kafka
N_TRANSACTIONS = 20_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=505))
    return data


@pytest.fixture(scope="module")
def expected(dataset, tmp_path_factory):
    """stream_transactions of the sequential path: produce everything, then consume until caught up."""
    results = tmp_path_factory.mktemp("sequential")
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    try:
        commands.setup(settings)
        commands.load(settings)
        broker = ensure_broker(None, results)
        commands.produce(settings, broker=broker)
        commands.consume(settings, ConsumeOptions(until_caught_up=True), broker=broker)
    finally:
        stop_broker(results)
    rows = stream_rows(settings.database_url)
    assert len(rows) == N_TRANSACTIONS
    return rows


def _stream(settings: Settings, workers: int):
    commands.setup(settings)
    commands.load(settings)
    broker = ensure_broker(None, settings.results_dir)
    return commands.stream(settings, BrokerHandle(broker.bootstrap_servers, broker.pid, False), workers=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_on_sqlite_decides_like_produce_then_consume(dataset, expected, tmp_path, workers):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    try:
        published, consumed = _stream(settings, workers)
        ends = log_end_offsets(ensure_broker(None, results).bootstrap_servers, settings.kafka_topic)
    finally:
        stop_broker(results)
    assert published.published == N_TRANSACTIONS and published.failed == 0
    assert consumed.messages == N_TRANSACTIONS
    assert stream_rows(settings.database_url) == expected
    assert sum(ends.values()) == N_TRANSACTIONS
    engine = create_engine(settings.database_url)
    try:
        _, offsets = StreamStore(engine, settings.kafka_topic).restore()
    finally:
        engine.dispose()
    assert offsets == ends  # every partition read to its end, and not a message more
    assert (results / "stream_transactions.csv").read_text().count("\n") == N_TRANSACTIONS + 1


@pytest.mark.mysql
def test_stream_on_mariadb_decides_like_produce_then_consume(dataset, expected, tmp_path, mysql_env, mysql_database):
    results = tmp_path / "results"
    settings = Settings.from_env(env=mysql_env, results_dir=results, data_dir=dataset)
    try:
        published, consumed = _stream(settings, 1)
    finally:
        stop_broker(results)
    assert (published.published, consumed.messages) == (N_TRANSACTIONS, N_TRANSACTIONS)
    assert stream_rows(mysql_database) == expected


def test_consumer_waits_for_a_slow_producer_then_stops_at_the_end(dataset, expected, tmp_path):
    """Caught up and idle for longer than idle_seconds while the producer has not published yet: the
    consumer keeps waiting; once the producer is done it stops after the last message, not before."""
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    engine = create_engine(settings.database_url)
    done = threading.Event()
    outcome: dict = {}
    try:
        commands.setup(settings)
        commands.load(settings)
        broker = ensure_broker(None, results)
        ensure_topic(broker.bootstrap_servers, settings.kafka_topic, settings.kafka_partitions)
        store = StreamStore(engine, settings.kafka_topic)

        def consumer() -> None:
            outcome["summary"] = consume(
                broker.bootstrap_servers,
                settings.kafka_topic,
                store,
                options=ConsumeOptions(until_caught_up=True, idle_seconds=0.3, batch_size=500),
                publishing=lambda: not done.is_set(),
                should_stop=lambda: False,
            )

        thread = threading.Thread(target=consumer, daemon=True)
        thread.start()
        time.sleep(2.0)  # far past idle_seconds, every partition at its (empty) end
        assert thread.is_alive(), "the consumer stopped while the producer was still publishing"
        first = publish(transactions_from_database(engine), broker.bootstrap_servers, settings.kafka_topic)
        time.sleep(1.0)
        assert thread.is_alive()
        done.set()
        thread.join(60)
        assert not thread.is_alive(), "the consumer did not stop after the producer finished"
    finally:
        done.set()
        engine.dispose()
        stop_broker(results)
    assert first.published == N_TRANSACTIONS
    assert outcome["summary"].messages == N_TRANSACTIONS
    assert stream_rows(settings.database_url) == expected


def test_a_failing_producer_stops_the_stream_with_a_clear_error(dataset, tmp_path, monkeypatch):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    # Only the producer process reads it: this process imported cardpipe.faults without a crash point.
    monkeypatch.setenv("CARDPIPE_CRASH_AT", "produce.sent:5")
    try:
        with pytest.raises(PublisherFailed, match=r"^publishing failed: was killed \(SIGKILL\) before finishing$"):
            _stream(settings, 2)
    finally:
        stop_broker(results)
    decided = count_rows(settings.database_url, schema.stream_transactions)
    assert decided < N_TRANSACTIONS  # the producer died after handing over 5,000 messages
    # What was committed is exported, as when a consumer stops for any other reason.
    assert (results / "stream_transactions.csv").read_text().count("\n") == decided + 1


def test_sigterm_while_publishing_stops_the_producer_and_the_consumer(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=300_000, customers=2_000, seed=606))
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=data)
    commands.setup(settings)
    commands.load(settings)
    broker = ensure_broker(None, results)
    stop = threading.Event()

    def terminate_once_deciding() -> None:
        # After the first commit (the consumer's SIGTERM handler is installed by then) the producer, still
        # reading and publishing 300,000 rows, is at work.
        while not stop.is_set():
            if count_rows(settings.database_url, schema.stream_transactions) > 0:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    timer = threading.Thread(target=terminate_once_deciding, daemon=True)
    started = time.monotonic()
    try:
        timer.start()
        with pytest.raises(StreamStopped, match=r"^stopped after deciding [\d,]+ transactions, before every one"):
            commands.stream(settings, BrokerHandle(broker.bootstrap_servers, broker.pid, False))
        topic_size = sum(log_end_offsets(broker.bootstrap_servers, settings.kafka_topic).values())
    finally:
        stop.set()
        timer.join()
        stop_broker(results)
    assert time.monotonic() - started < 30
    assert not multiprocessing.active_children(), "the producer process is gone"
    assert topic_size < 300_000, "the producer was stopped, not waited for"
    decided = count_rows(settings.database_url, schema.stream_transactions)
    assert (results / "stream_transactions.csv").read_text().count("\n") == decided + 1


@pytest.mark.parametrize("delay", [0.0, 2.0])
def test_sigterm_to_the_run_command_stops_everything_it_started(tmp_path, delay):
    """SIGTERM to `cardpipe run` while it streams: before the consumer loop it unwinds like Ctrl-C (exit 143),
    inside it the consumers finish their batch (exit 2, the stream stopped, what is left named); either way the
    embedded broker and the producer process are stopped and what was decided is exported."""
    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=300_000, customers=2_000, seed=707))
    results = tmp_path / "results"
    env = {**env_without_services(), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardpipe", "run", "--data-dir", str(data), "--results-dir", str(results)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("authorizing at once" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.02)
        broker_pid = broker_status(results)["pid"]
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines)
    last = stderr.strip().splitlines()[-1]
    # exit 2 names the next step: while the producer publishes, that the stream stopped before every
    # transaction was published; once it has published them all, how many are left undecided
    assert (proc.returncode, last) == (143, "cardpipe: terminated") or (
        proc.returncode == 2
        and (
            last.startswith("cardpipe: error: stopped after deciding ")
            or last.startswith("cardpipe: error: the stream stopped with ")
            and last.endswith("not decided: run `cardpipe consume` to finish it, then `cardpipe batch`")
        )
    ), stderr
    assert "Traceback" not in stderr
    assert broker_status(results) is None and not is_alive(broker_pid), "the embedded broker was stopped"
    assert not any(
        b"cardpipe-publish" in line or b"cardpipe" in line and b"spawn_main" in line for line in command_lines()
    ), "no producer or worker process is left"
    decided = count_rows(URL.create("sqlite", database=str(results / "cardpipe.db")), schema.stream_transactions)
    assert decided < 300_000
    if (results / "stream_transactions.csv").exists():
        assert (results / "stream_transactions.csv").read_text().count("\n") == decided + 1


def test_embedded_broker_killed_while_publishing_is_replaced_with_identical_results(tmp_path):
    """The broker dies once decisions are being committed, while the producer still publishes 300,000
    transactions: consume replaces it and re-publishes what is undecided, the producer (its broker gone,
    its messages stranded) is stopped rather than waited for, and the decisions are the reference's."""
    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=300_000, customers=2_000, seed=808))
    decisions, _ = reference_results(data)
    expected = {k: _row(tx, status, balance, reason) for k, (tx, status, balance, reason) in decisions.items()}
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=data)
    stop = threading.Event()
    killed: list[int] = []

    def kill_broker_once_deciding() -> None:
        while not stop.is_set():
            if count_rows(settings.database_url, schema.stream_transactions) > 0:
                record = broker_status(results)
                os.kill(record["pid"], signal.SIGKILL)
                killed.append(record["pid"])
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_broker_once_deciding, daemon=True)
    try:
        commands.setup(settings)
        commands.load(settings)
        broker = ensure_broker(None, results)
        killer.start()
        started = time.monotonic()
        published, consumed = commands.stream(settings, BrokerHandle(broker.bootstrap_servers, broker.pid, False))
        seconds = time.monotonic() - started
    finally:
        stop.set()
        killer.join()
        stop_broker(results)
    assert killed, "the broker was never killed"
    assert consumed.counts["broker_recoveries"] == 1
    assert 0 < published.published == consumed.counts["republished"] < 300_000
    assert stream_rows(settings.database_url) == expected
    assert seconds < 60, "the stranded producer was waited for"
    assert not multiprocessing.active_children()
