"""Issue 12, part 1: a killed run is finished by `cardpipe consume` (or said to be unfinished), never silently lost;
and commands run in the wrong order say what to run first.

Real processes (``python -m cardpipe``), the embedded broker, SQLite and MariaDB; every result is compared with
the pure-Python computation of the same generated dataset.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import URL

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.orchestration.runtime import Runtime
from cardpipe.serving import schema
from cardpipe.serving.transaction_source import transactions_from_database
from cardpipe.stream.broker import ensure_broker, stop_broker
from cardpipe.stream.producer import publish
from tests.orchestration.helpers import REPO_ROOT, assert_results_match_reference, cardpipe, env_without_services

N_TRANSACTIONS = 20_000  # above IN_PROCESS_PUBLISH_MAX: `run` publishes from a producer process


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("recovery-data")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=1212))
    return data


def decided(url: URL) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one())
    finally:
        engine.dispose()


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("cardpipe: error:")]


def finish_and_check(results: Path, data: Path, env: dict[str, str], url: URL) -> None:
    """`consume` decides every transaction, `batch` settles them: the results are an uninterrupted run's."""
    consumed = cardpipe(["consume", "--results-dir", str(results), "--until-caught-up"], env, check=False)
    assert consumed.returncode == 0, consumed.stdout + consumed.stderr
    assert decided(url) == N_TRANSACTIONS
    settled = cardpipe(["batch", "--results-dir", str(results)], env, check=False)
    assert settled.returncode == 0, settled.stdout + settled.stderr
    assert_results_match_reference(results, data)


# --------------------------------------------------------------------------------------------- killed runs


@pytest.mark.kafka
@pytest.mark.parametrize("published", [0, 3_000])
def test_consume_finishes_a_run_killed_while_publishing(dataset, tmp_path, published):
    """What `run` killed while publishing leaves (its broker alive, the stream started at the topic's end, 0 or
    3,000 of 20,000 transactions published): `consume` used to decide only those and exit 0; now it publishes the
    rest again and decides every one."""
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    broker = ensure_broker(None, results)
    try:
        with Runtime(settings, broker=broker) as rt:
            commands._start_stream_here(rt)
            first = list(itertools.islice(transactions_from_database(rt.ensure_schema()), published))
        publish(first, broker.bootstrap_servers, settings.kafka_topic)
        finish_and_check(results, dataset, env_without_services(), settings.database_url)
    finally:
        stop_broker(results)


@pytest.mark.kafka
@pytest.mark.mysql
def test_run_sigkilled_on_mariadb_is_finished_by_consume(dataset, tmp_path, mysql_env, mysql_database):
    """`cardpipe run` on MariaDB SIGKILLed after its first checkpoint (its producer process still publishing, its
    broker left running): `consume` then `batch` give the results of an uninterrupted run."""
    results = tmp_path / "results"
    env = env_without_services(**mysql_env)
    try:
        killed = cardpipe(
            ["run", "--data-dir", str(dataset), "--results-dir", str(results)],
            {**env, "CARDPIPE_CRASH_AT": "consume.committed:1"},
            check=False,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert 0 < decided(mysql_database) < N_TRANSACTIONS
        finish_and_check(results, dataset, env, mysql_database)
    finally:
        stop_broker(results)


@pytest.mark.kafka
def test_the_same_run_again_after_a_kill(dataset, tmp_path):
    """The README's advice: a killed `cardpipe run` is run again as it was, and gives the complete results."""
    results = tmp_path / "results"
    env = env_without_services()
    args = ["run", "--data-dir", str(dataset), "--results-dir", str(results)]
    try:
        killed = cardpipe(args, {**env, "CARDPIPE_CRASH_AT": "consume.committed:1"}, check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        again = cardpipe(args, env, check=False)
        assert again.returncode == 0, again.stdout + again.stderr
        assert_results_match_reference(results, dataset)
    finally:
        stop_broker(results)


@pytest.mark.kafka
def test_consume_stopped_with_sigterm_says_the_stream_is_unfinished(dataset, tmp_path):
    """SIGTERM stops `consume` after its batch: it used to exit 0 with the stream half decided; now it exits 2,
    naming how many are undecided and the command that finishes them (which then does)."""
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    env = env_without_services()
    broker = ensure_broker(None, results)
    try:
        commands.produce(settings, broker=broker)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cardpipe", "consume", "--results-dir", str(results), "--batch-size", "100"],
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while decided(settings.database_url) == 0:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        undecided = N_TRANSACTIONS - decided(settings.database_url)
        assert undecided > 0, "the stream was over before SIGTERM"
        assert proc.returncode == 2, out + err
        lines = error_lines(subprocess.CompletedProcess([], proc.returncode, out, err))
        assert lines == [
            f"cardpipe: error: stopped with {undecided:,} transactions not decided yet "
            f"({undecided:,} messages left on the topic): run `cardpipe consume` to finish the stream"
        ], err
        finish_and_check(results, dataset, env, settings.database_url)
    finally:
        stop_broker(results)


# --------------------------------------------------------------------------------------------- wrong order

ORDERED = [["consume"], ["produce"], ["batch"], ["persist"]]


@pytest.mark.parametrize("args", ORDERED, ids=lambda a: a[0])
def test_commands_on_a_folder_never_set_up_say_what_to_run_first(tmp_path, args):
    """`consume` (and the others) on a folder never set up used to exit 0 with nothing; now one line and exit 2."""
    results = tmp_path / "results"
    proc = cardpipe([*args, "--results-dir", str(results)], env_without_services(), check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert error_lines(proc) == [
        f"cardpipe: error: cardpipe {args[0]}: nothing set up in {results.resolve()}: run `cardpipe run` for every "
        "layer, or `cardpipe setup` then `cardpipe load` first"
    ]
    assert not (results / "cardpipe.db").exists(), "a database was created as a side effect"


@pytest.mark.parametrize("args", ORDERED, ids=lambda a: a[0])
def test_commands_on_a_database_never_loaded_say_what_to_run_first(tmp_path, args):
    results = tmp_path / "results"
    env = env_without_services()
    cardpipe(["setup", "--results-dir", str(results)], env)
    proc = cardpipe([*args, "--results-dir", str(results)], env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith(f"cardpipe: error: cardpipe {args[0]}: no cards loaded in sqlite:")
    assert line.endswith(": run `cardpipe load` first (or `cardpipe run` for every layer)")


@pytest.mark.mysql
def test_consume_on_an_empty_mariadb_schema_says_what_to_run_first(tmp_path, mysql_env):
    proc = cardpipe(
        ["consume", "--results-dir", str(tmp_path / "results")],
        env_without_services(**mysql_env),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = error_lines(proc)
    assert "no cardpipe schema in mysql" in line and "`cardpipe setup` then `cardpipe load` first" in line
