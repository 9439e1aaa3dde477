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


_RUN_AND_TELL = """
import json, sys
from pathlib import Path
from cardpipe.config import Settings
from cardpipe.orchestration import commands

summary = commands.run(Settings.from_env(env={}, results_dir=Path(sys.argv[1]), data_dir=Path(sys.argv[2])))
print(json.dumps({"duckdb_here": "duckdb" in sys.modules, "settled": summary.batch.summary.transactions}))
"""


def test_on_sqlite_duckdb_never_opens_the_file_in_the_process_that_writes_it(seed_dataset, tmp_path):
    """The whole pipeline on embedded defaults: DuckDB's SQLite library (the settlement, the stream's CSV) works in
    processes of their own, never in the one writing the file through Python's sqlite3 (see cardpipe.batch.apart)."""
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_TELL, str(results), str(seed_dataset / "input")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env_without_services(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    told = json_line(done.stdout)
    assert told == {"duckdb_here": False, "settled": 400}
    compare_results(seed_dataset / "expected", results)
    assert (results / "stream_transactions.csv").read_text().count("\n") == 401


def json_line(stdout: str) -> dict[str, object]:
    import json

    return json.loads(stdout.strip().splitlines()[-1])


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
