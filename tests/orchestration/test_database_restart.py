"""Issue 3: the serving database restarts while ``cardpipe consume`` is mid-stream; nothing is lost or doubled.

The restart happens on a private MariaDB server started for this test (``scripts/mariadb.sh`` with its own
state folder, port and password), never on the shared test server other runs use.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.serving.transaction_source import transactions_from_csv
from cardpipe.stream.broker import ensure_broker, stop_broker
from cardpipe.stream.producer import publish
from tests.orchestration.helpers import REPO_ROOT, env_without_services
from tests.orchestration.test_crash_recovery import (
    Expected,
    Processes,
    assert_stream_exact,
    consume_counts,
    count_rows,
    expected_stream,
    wait_for,
)

pytestmark = [pytest.mark.mysql, pytest.mark.kafka]

N_TRANSACTIONS = 30_000
MARIADB_SCRIPT = REPO_ROOT / "scripts" / "mariadb.sh"
RESTART_PAUSE = 3.0  # seconds the server stays down


@dataclass
class PrivateMariaDB:
    """A MariaDB server of this test alone: ``scripts/mariadb.sh`` on its own state folder and port."""

    state_dir: Path
    port: int
    password: str

    def ctl(self, action: str) -> str:
        env = {
            **os.environ,
            "CARDPIPE_MARIADB_DIR": str(self.state_dir),
            "CARDPIPE_MARIADB_PORT": str(self.port),
            "CARDPIPE_MARIADB_PASSWORD": self.password,
        }
        proc = subprocess.run(
            ["bash", str(MARIADB_SCRIPT), action],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"mariadb.sh {action} exited {proc.returncode}: {proc.stderr}"
        return proc.stdout

    def db_env(self) -> dict[str, str]:
        """The ``DB_*`` variables ``mariadb.sh env`` prints."""
        env = {}
        for line in self.ctl("env").splitlines():
            words = shlex.split(line)
            if words and words[0] == "export":
                env.update(word.split("=", 1) for word in words[1:])
        assert env.get("DB_PORT") == str(self.port) and env.get("DB_PASSWORD") == self.password, "unexpected env"
        return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[PrivateMariaDB]:
    # A short path under /tmp: the server's Unix socket lives in it (at most ~107 characters).
    server = PrivateMariaDB(Path(tempfile.mkdtemp(prefix="cardpipe-mdb-")), _free_port(), f"pw-{secrets.token_hex(12)}")
    try:
        server.ctl("start")
        yield server
    finally:
        try:
            server.ctl("stop")
        finally:
            shutil.rmtree(server.state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data30k")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=909))
    return data


@pytest.fixture(scope="module")
def expected(dataset: Path) -> Expected:
    return expected_stream(dataset)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


def test_consumer_rides_out_a_database_restart(dataset, expected, tmp_path, private_mariadb, processes):
    """Stop the server mid-stream, keep it down 3 s, start it: the consumer retries, then finishes exactly."""
    db_env = private_mariadb.db_env()
    results = tmp_path / "results"
    settings = Settings.from_env(env=db_env, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    engine = create_engine(settings.database_url, pool_pre_ping=True)
    broker = ensure_broker(None, results)
    try:
        assert commands.produce(settings, broker=broker).published == N_TRANSACTIONS
        consumer = processes.start(
            ["consume", "--results-dir", str(results), "--batch-size", "500", "--idle-seconds", "5"],
            env_without_services(**db_env),
            "consume",
        )
        wait_for(lambda: count_rows(engine) >= 3_000, "3,000 decisions", consumer)
        before = count_rows(engine)
        engine.dispose()
        private_mariadb.ctl("stop")
        assert consumer.popen.poll() is None, f"the consumer ended before the outage\n{consumer.describe()}"
        time.sleep(RESTART_PAUSE)
        assert consumer.popen.poll() is None, f"the consumer gave up during the outage\n{consumer.describe()}"
        private_mariadb.ctl("start")
        assert consumer.wait() == 0, consumer.describe()
        messages, duplicates = consume_counts(consumer)
    finally:
        stop_broker(results)
    try:
        assert before < N_TRANSACTIONS, "the stream was over before the restart"
        assert messages == N_TRANSACTIONS and duplicates == 0, (messages, duplicates)
        outcome = assert_stream_exact(engine, results, expected)
    finally:
        engine.dispose()
    output = consumer.stdout() + consumer.stderr()
    assert "database unavailable" in consumer.stderr(), consumer.describe()
    assert private_mariadb.password not in output, "the consumer printed the database password"
    # Issue 12: the pool's "Exception during reset or similar" (or any other) traceback never reaches the user.
    assert "Traceback" not in consumer.stderr(), consumer.describe()
    retries = consumer.stderr().count("database unavailable")
    print(
        f"\ndatabase restarted after {before} decisions; the consumer retried {retries} times and decided "
        f"{messages} messages, {duplicates} duplicates; outcome {outcome}"
    )


def test_messages_arriving_while_the_database_is_down_wait_for_it(
    dataset, expected, tmp_path, private_mariadb, processes
):
    """The consumer idles when the server stops; messages arrive during the outage: it waits, then decides them."""
    db_env = private_mariadb.db_env()
    results = tmp_path / "results"
    settings = Settings.from_env(env=db_env, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    transactions = transactions_from_csv(dataset / "transactions.csv")  # in timestamp order
    first = N_TRANSACTIONS // 3
    engine = create_engine(settings.database_url, pool_pre_ping=True)
    broker = ensure_broker(None, results)
    try:
        publish(transactions[:first], broker.bootstrap_servers, settings.kafka_topic)
        consumer = processes.start(
            ["consume", "--results-dir", str(results), "--batch-size", "1000", "--follow"],
            env_without_services(**db_env),
            "consume",
        )
        wait_for(lambda: count_rows(engine) == first, f"the first {first:,} decisions", consumer)
        engine.dispose()
        private_mariadb.ctl("stop")
        publish(transactions[first:], broker.bootstrap_servers, settings.kafka_topic)
        time.sleep(RESTART_PAUSE)  # the consumer has polled the new messages by now
        assert consumer.popen.poll() is None, f"the consumer died during the outage\n{consumer.describe()}"
        private_mariadb.ctl("start")
        wait_for(lambda: count_rows(engine) == N_TRANSACTIONS, "every decision", consumer)
        consumer.popen.send_signal(signal.SIGTERM)  # --follow: stop after the current batch
        assert consumer.wait() == 0, consumer.describe()
        messages, duplicates = consume_counts(consumer)
    finally:
        stop_broker(results)
    try:
        assert messages == N_TRANSACTIONS and duplicates == 0, (messages, duplicates)
        assert_stream_exact(engine, results, expected)
    finally:
        engine.dispose()
    # The first database access of a polled batch is reading the settlement in force, then the lookup.
    assert (
        "database unavailable" in consumer.stderr() and "retrying reading the settlement in force" in consumer.stderr()
    ), consumer.describe()
    assert private_mariadb.password not in consumer.stdout() + consumer.stderr()
    assert "Traceback" not in consumer.stderr(), consumer.describe()
