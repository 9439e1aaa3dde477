"""Issue 12, part 2: one results folder / database is used by one `run` (or `setup`, `load`) at a time.

A second one refuses at once with one line naming the holder; the lock of a killed process is taken over.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.orchestration.locks import EXCLUSIVE, HOLDERS_DIR, SHARED, FolderLock, PipelineBusy
from cardpipe.orchestration.runtime import Runtime
from cardpipe.serving import schema
from cardpipe.stream.broker import stop_broker
from tests.orchestration.helpers import REPO_ROOT, assert_results_match_reference, cardpipe, env_without_services


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("cardpipe: error:")]
    return line


@pytest.fixture
def loaded(tmp_path: Path, seed_dataset: Path) -> Path:
    """A results folder with the seed dataset loaded (SQLite)."""
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=seed_dataset / "input")
    commands.setup(settings)
    commands.load(settings)
    return results


# --------------------------------------------------------------------------------------------- in-process


def test_folder_lock_modes(tmp_path):
    """Shared holds nest in one process; an exclusive hold excludes every other, and its release frees it."""
    outer = FolderLock(tmp_path, SHARED, "cardpipe serve").acquire()
    inner = FolderLock(tmp_path, SHARED, "cardpipe batch").acquire()  # the same process: nested
    inner.release()
    outer.release()
    run = FolderLock(tmp_path, EXCLUSIVE, "cardpipe run").acquire()
    try:
        (record,) = (tmp_path / HOLDERS_DIR).glob("*.json")
        assert f"-{os.getpid()}.json" in record.name and '"cardpipe run"' in record.read_text()
    finally:
        run.release()
    assert not list((tmp_path / HOLDERS_DIR).glob("*.json"))


# --------------------------------------------------------------------------------------------- the folder


def test_load_setup_and_consume_refuse_while_a_run_holds_the_folder(loaded):
    env = env_without_services()
    run = FolderLock(loaded, EXCLUSIVE, "cardpipe run").acquire()
    try:
        for command in ("load", "setup", "consume", "batch"):
            line = error_line(cardpipe([command, "--results-dir", str(loaded)], env, check=False, timeout=120))
            assert line.startswith(
                f"cardpipe: error: results folder {loaded.resolve()} is in use by `cardpipe run` (pid {os.getpid()}, "
                "since "
            ), line
            assert line.endswith(f": wait for it to finish, or stop it, then run `cardpipe {command}` again"), line
    finally:
        run.release()
    cardpipe(["setup", "--results-dir", str(loaded)], env)


def test_a_run_refuses_while_a_consumer_shares_the_folder(loaded, seed_dataset):
    consumer = FolderLock(loaded, SHARED, "cardpipe consume").acquire()
    try:
        proc = cardpipe(
            ["run", "--results-dir", str(loaded), "--data-dir", str(seed_dataset / "input")],
            env_without_services(),
            check=False,
            timeout=120,
        )
        assert f"is in use by `cardpipe consume` (pid {os.getpid()}, since " in error_line(proc)
    finally:
        consumer.release()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    """A process holding the folder exclusively is SIGKILLed: the next command takes the lock, and the dead
    holder's record is removed."""
    results = tmp_path / "results"
    code = (
        "import os, signal, sys; from pathlib import Path; from cardpipe.orchestration.locks import FolderLock;"
        f"FolderLock(Path({str(results)!r}), 'exclusive', 'cardpipe run').acquire(); print('held', flush=True);"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL and killed.stdout == "held\n", killed.stderr
    (stale,) = (results / HOLDERS_DIR).glob("*.json")
    cardpipe(["setup", "--results-dir", str(results)], env_without_services())
    assert not stale.exists()


@pytest.mark.kafka
def test_a_second_run_into_one_folder_refuses_at_once(tmp_path):
    """Two `cardpipe run` into one folder used to damage each other; the second now refuses in seconds, naming
    the first, which finishes with complete results."""
    data = tmp_path / "data"
    generate_dataset(data, GeneratorConfig(transactions=20_000, seed=1213))
    results = tmp_path / "results"
    env = env_without_services()
    args = ["run", "--data-dir", str(data), "--results-dir", str(results)]
    first = subprocess.Popen(
        [sys.executable, "-m", "cardpipe", *args],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((results / HOLDERS_DIR).glob(f"*-{first.pid}.json")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        started = time.monotonic()
        second = cardpipe(args, env, check=False, timeout=120)
        assert time.monotonic() - started < 30
        assert f"is in use by `cardpipe run` (pid {first.pid}, since " in error_line(second)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, out + err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        stop_broker(results)
    assert_results_match_reference(results, data)


# --------------------------------------------------------------------------------------------- the database


def test_setup_refuses_while_a_live_consumer_holds_partitions(loaded):
    """Leases of a live consumer (this test process) stop a `setup` that would wipe its tables; a dead one's don't."""
    env = env_without_services()
    engine = create_engine(f"sqlite:///{loaded / 'cardpipe.db'}")
    owner = f"{socket.gethostname()}:{os.getpid()}:1"
    try:
        with engine.begin() as conn:
            conn.execute(
                schema.stream_leases.insert().values(
                    topic="transactions", kafka_partition=0, owner=owner, expires_at=time.time() + 600
                )
            )
        line = error_line(cardpipe(["setup", "--results-dir", str(loaded)], env, check=False))
        assert f"is in use by a consumer ({owner}, 1 partition(s) of 'transactions')" in line, line
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        with engine.begin() as conn:
            conn.execute(schema.stream_leases.update().values(owner=f"{socket.gethostname()}:{dead.stdout.strip()}:1"))
    finally:
        engine.dispose()
    cardpipe(["setup", "--results-dir", str(loaded)], env)


@pytest.mark.mysql
def test_a_mariadb_schema_is_held_across_results_folders(tmp_path, mysql_env):
    """A `run` (here: an exclusive runtime of this process) holds the schema: `load` and `consume` from another
    results folder refuse, naming its connection; once it is done, `setup` goes through."""
    env = env_without_services(**mysql_env)
    other = tmp_path / "other"
    settings = Settings.from_env(env=mysql_env, results_dir=tmp_path / "first")
    with Runtime(settings, lock=EXCLUSIVE, command="cardpipe run") as rt:
        rt.clean_schema()
        for command in ("load", "consume"):
            line = error_line(cardpipe([command, "--results-dir", str(other)], env, check=False, timeout=120))
            assert "is in use by another `cardpipe run`, `setup` or `load` (MariaDB connection " in line, line
            assert line.endswith(f"then run `cardpipe {command}` again"), line
        with pytest.raises(PipelineBusy), Runtime(settings.with_(results_dir=other), lock=SHARED) as probe:
            probe.engine  # noqa: B018  # taking the shared hold is the point
    cardpipe(["setup", "--results-dir", str(other)], env)
