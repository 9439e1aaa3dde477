"""Acceptance: the whole pipeline on real components (Tansu, DuckDB and Spark, SQLite and MariaDB)."""

import re
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy.engine import URL

from tests.orchestration.helpers import (
    REPO_ROOT,
    RESULT_TABLES,
    cardpipe,
    command_lines,
    compare_results,
    env_without_services,
    table_matches_csv,
)

pytestmark = [pytest.mark.kafka]


def test_run_on_seed_dataset_with_embedded_defaults(seed_dataset, tmp_path):
    results = tmp_path / "results"
    proc = cardpipe(
        ["run", "--data-dir", str(seed_dataset / "input"), "--results-dir", str(results)], env_without_services()
    )
    compare_results(seed_dataset / "expected", results)
    db = URL.create("sqlite", database=str(results / "cardpipe.db"))
    for table in RESULT_TABLES:
        table_matches_csv(db, table, results / f"{table}.csv")
    assert not (results / ".cardpipe-broker.json").exists(), "run must stop the broker it started"
    assert re.search(r"\bdecided\W+400\b", proc.stdout), proc.stdout  # the summary table


def test_run_settles_with_the_embedded_engine_and_the_views_show_the_settlement(seed_dataset, tmp_path):
    """Embedded defaults settle without Spark; the batch tables are views of the settlement in force."""
    from sqlalchemy import create_engine, text

    from cardpipe.config import Settings
    from cardpipe.orchestration import commands

    results = tmp_path / "results"
    summary = commands.run(Settings.from_env(env={}, results_dir=results, data_dir=seed_dataset / "input"))
    assert summary.batch.engine == "embedded" and summary.batch.settlement_id == 1
    assert summary.batch.summary.transactions == 400
    compare_results(seed_dataset / "expected", results)
    engine = create_engine(URL.create("sqlite", database=str(results / "cardpipe.db")))
    try:
        with engine.connect() as conn:
            views = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'view'")).scalars())
            assert views == {"batch_transactions", "cards_updated", "customers_updated"}
            assert conn.execute(text("SELECT status FROM settlements")).scalars().all() == ["published"]
    finally:
        engine.dispose()


@pytest.mark.spark
def test_run_with_the_spark_engine_gives_the_same_results(seed_dataset, tmp_path):
    results = tmp_path / "results"
    proc = cardpipe(
        ["run", "--data-dir", str(seed_dataset / "input"), "--results-dir", str(results)],
        env_without_services(CARDPIPE_BATCH_ENGINE="spark"),
    )
    assert "spark engine" in proc.stdout
    compare_results(seed_dataset / "expected", results)


@pytest.mark.mysql
@pytest.mark.spark
def test_run_on_seed_dataset_against_mariadb(seed_dataset, tmp_path, mysql_env, mysql_database):
    results = tmp_path / "results"
    password = mysql_env["DB_PASSWORD"].encode()
    assert password
    seen: list[bytes] = []
    done = threading.Event()

    def watch_process_list() -> None:  # every process's command line, Spark's JVM included, while the run goes
        while not done.wait(0.2):
            seen.extend(line for line in command_lines() if b"cardpipe" in line or b"spark" in line.lower())

    watcher = threading.Thread(target=watch_process_list, daemon=True)
    watcher.start()
    try:
        proc = cardpipe(
            ["run", "--data-dir", str(seed_dataset / "input"), "--results-dir", str(results)],
            env_without_services(**mysql_env, CARDPIPE_BATCH_ENGINE="spark"),
        )
    finally:
        done.set()
        watcher.join()
    assert any(b"org.apache.spark" in line for line in seen), "the watcher never saw the Spark JVM"
    assert not [line for line in seen if password in line], "the database password is in a process's command line"
    assert password.decode() not in proc.stdout + proc.stderr
    compare_results(seed_dataset / "expected", results)
    assert not (results / "cardpipe.db").exists(), "with DB_HOST set nothing goes to SQLite"
    for table in RESULT_TABLES:
        table_matches_csv(mysql_database, table, results / f"{table}.csv")


@pytest.mark.mysql
def test_seed_commands_in_order_against_mariadb(seed_dataset, tmp_path, mysql_env, mysql_database):
    """The seed README's flow: setup, load, consume and produce in two terminals, batch, persist; then main.py."""
    results = tmp_path / "results"
    env = env_without_services(
        **mysql_env,
        CARDPIPE_RESULTS_DIR=str(results),
        CARDPIPE_DATA_DIR=str(seed_dataset / "input"),
        CONSUMER_IDLE_SECONDS="8",
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    for args in (["db_setup.py"], ["serving_processor.py", "initial"]):
        assert run(*args).returncode == 0
    # The consumer starts first (as in a second terminal) and waits for the producer.
    consumer = subprocess.Popen(
        [sys.executable, "stream_processor.py", "consume"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        produced = run("stream_processor.py", "produce")
        assert produced.returncode == 0, produced.stderr
        out, err = consumer.communicate(timeout=300)
        assert consumer.returncode == 0, err
        # The consumer started the embedded broker itself, so it also published what was undecided;
        # the producer's copies are recognised as duplicates.
        assert "360 pending, 40 declined, 0 rejected" in out
        for args in (["batch_processor.py"], ["serving_processor.py", "updated"]):
            proc = run(*args)
            assert proc.returncode == 0, proc.stderr
        compare_results(seed_dataset / "expected", results)
        for table in RESULT_TABLES:
            table_matches_csv(mysql_database, table, results / f"{table}.csv")
        for table in RESULT_TABLES:
            (results / f"{table}.csv").unlink()
        proc = run("main.py")
        assert proc.returncode == 0, proc.stderr
        compare_results(seed_dataset / "expected", results)
    finally:
        if consumer.poll() is None:
            consumer.kill()
        cardpipe(["broker", "stop", "--results-dir", str(results)], env, check=False)
