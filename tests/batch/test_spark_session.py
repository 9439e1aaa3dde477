"""The Spark session's life: the JDBC driver checked before the JVM starts, Ctrl-C as one line with the session
stopped, and no file left in the temporary directory (issue 12)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cardpipe.batch import spark as spark_module
from cardpipe.config import Settings
from cardpipe.errors import ConfigError
from tests.orchestration.helpers import REPO_ROOT, cardpipe, env_without_services

# ------------------------------------------------------------------------------------------ no JVM


def test_a_missing_jdbc_driver_is_named_before_the_jvm_starts(tmp_path, monkeypatch):
    """Was: "An error occurred while calling o65.load" after starting Spark."""
    from pyspark.sql import SparkSession

    from cardpipe.batch import engines

    missing = tmp_path / "mariadb-java-client.jar"
    monkeypatch.setattr(spark_module, "MARIADB_JAR", missing)
    monkeypatch.delenv(spark_module.JDBC_JAR_ENV, raising=False)
    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))

    def no_jvm(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the JVM was started")

    monkeypatch.setattr(spark_module, "build_spark_session", no_jvm)
    settings = Settings.from_env(
        env={"DATABASE_URL": "mysql+pymysql://u:pw@127.0.0.1:9/cardpipe"}, results_dir=tmp_path, load_dotenv_file=False
    )
    with pytest.raises(ConfigError) as failure, engines.spark_session(settings):
        pass
    message = str(failure.value)
    assert str(missing) in message and "apt-get install libmariadb-java" in message
    assert spark_module.JDBC_JAR_ENV in message and "\n" not in message

    # An override that names no file is named as such; one that does is used.
    monkeypatch.setenv(spark_module.JDBC_JAR_ENV, str(tmp_path / "nowhere.jar"))
    with pytest.raises(ConfigError, match=r"CARDPIPE_JDBC_JAR=.*nowhere\.jar: no such file"):
        spark_module.jdbc_driver_jar()
    jar = tmp_path / "driver.jar"
    jar.write_bytes(b"PK")
    monkeypatch.setenv(spark_module.JDBC_JAR_ENV, str(jar))
    assert spark_module.jdbc_driver_jar() == jar


def test_an_interrupt_behind_a_lost_py4j_call_is_the_interrupt():
    def chained() -> BaseException:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise ConnectionError("Answer from Java side is empty") from None
        except ConnectionError as exc:
            return exc

    failure = chained()
    assert isinstance(spark_module.interruption(failure), KeyboardInterrupt)
    assert spark_module.interruption(ValueError("plain")) is None


def test_stale_scratch_folders_and_old_archives_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(spark_module.tempfile, "gettempdir", lambda: str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"cardpipe-spark-{int(gone.stdout)}"
    (dead / "blockmgr-1").mkdir(parents=True)
    alive = tmp_path / f"cardpipe-spark-{os.getppid()}"
    alive.mkdir()
    legacy = tmp_path / f"cardpipe-spark-cds-{os.getuid()}"
    legacy.mkdir()
    (legacy / "key.jsa").write_bytes(b"x")
    (tmp_path / "cardpipe-spark-log4j2-0123456789ab.properties").write_text("x")
    other = tmp_path / "unrelated"
    other.mkdir()
    spark_module.remove_stale_temporary_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])

    own = spark_module.scratch_dir()
    assert own == tmp_path / f"cardpipe-spark-{os.getpid()}" and own.is_dir()
    spark_module.remove_scratch_dir()
    assert not own.exists()


def test_archives_beyond_the_size_cap_are_dropped_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv(spark_module.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(spark_module.CDS_MAX_MB_ENV, "3")
    monkeypatch.delenv("CARDPIPE_SPARK_CDS", raising=False)
    folder = tmp_path / "cache" / "spark" / "cds"
    folder.mkdir(parents=True)
    now = time.time()
    for age, name in enumerate(["new", "mid", "old"]):
        path = folder / f"{name}.jsa"
        path.write_bytes(b"\0" * 1024 * 1024 * 2)
        os.utime(path, (now - 100 * age, now - 100 * age))
    options = spark_module.class_data_sharing_options("-Dcap=1")  # no archive for these options: dumps one
    assert any(o.startswith(f"-XX:ArchiveClassesAtExit={folder}/") for o in options)
    assert sorted(p.name for p in folder.glob("*.jsa")) == ["new.jsa"]  # 2 MB kept of 6 (cap 3)


# ------------------------------------------------------------------------------------------ Spark


@pytest.fixture(scope="module")
def decided_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder (SQLite) whose sample transactions are decided and not settled yet."""
    results = tmp_path_factory.mktemp("decided") / "results"
    env = env_without_services(CARDPIPE_RESULTS_DIR=str(results))
    try:
        for args in (["setup"], ["load"], ["produce"], ["consume", "--until-caught-up"]):
            cardpipe([*args, "-q"], env)
    finally:
        cardpipe(["broker", "stop", "-q"], env, check=False)
    return results


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the module's Spark runs: the first one's class-data archive serves the next."""
    return tmp_path_factory.mktemp("cache")


def _batch_env(tmp_path: Path, decided_results: Path, cache: Path) -> tuple[dict[str, str], Path]:
    results = tmp_path / "results"
    shutil.copytree(decided_results, results)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = env_without_services(
        CARDPIPE_RESULTS_DIR=str(results),
        CARDPIPE_CACHE_DIR=str(cache),
        TMPDIR=str(temp),
        PYTHONPATH=str(REPO_ROOT),
    )
    env.pop("CARDPIPE_DEBUG", None)
    return env, temp


def _jvms_using(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (the JVM's java.io.tmpdir is inside it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _wait_for_no_jvm(folder: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _jvms_using(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _jvms_using(folder), "Spark's JVM still runs after the command ended"


@pytest.mark.spark
@pytest.mark.kafka
def test_a_spark_batch_leaves_nothing_in_the_temporary_directory(tmp_path, decided_results, cache):
    """Was: the class-data archive (up to ~960 MB) and the log4j2 settings left in /tmp, never cleaned."""
    env, temp = _batch_env(tmp_path, decided_results, cache)
    proc = subprocess.run(
        [sys.executable, "-m", "cardpipe", "batch", "--engine", "spark", "-q"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "spark engine" in proc.stdout
    _wait_for_no_jvm(temp)  # the JVM writes its class-data archive when it exits
    assert sorted(temp.rglob("*")) == []
    assert list((cache / "spark").glob("log4j2-*.properties"))
    assert list((cache / "spark" / "cds").glob("*.jsa")) or list((cache / "spark" / "cds").glob("*.dump"))
    assert not (tmp_path / "spark-warehouse").exists() and not (tmp_path / "derby.log").exists()


@pytest.mark.spark
@pytest.mark.kafka
@pytest.mark.parametrize(
    ("after_line", "delay"),
    [("starting Spark", 0.5), ("settling with Spark", 3.0)],
    ids=["while-the-jvm-starts", "while-a-job-runs"],
)
def test_ctrl_c_during_spark_is_one_line_and_stops_it(tmp_path, decided_results, cache, after_line, delay):
    """Was: ~50 lines of py4j tracebacks and the JVM's errors about aborted jobs; Ctrl-C while the JVM started
    left it running for ever."""
    env, temp = _batch_env(tmp_path, decided_results, cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardpipe", "batch", "--engine", "spark"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: SIGINT to all of it, as a terminal's Ctrl-C does
    )
    lines: list[str] = []
    reached = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if after_line in line:
                reached.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert reached.wait(300), "\n".join(lines)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = "\n".join(lines)
    assert proc.returncode == 130, stderr
    assert lines[-1] == "cardpipe: interrupted", stderr
    for noise in ("Traceback", "py4j", "Py4J", "ERROR", "Exception", "\tat "):
        assert noise not in stderr, stderr
    _wait_for_no_jvm(temp)
    assert sorted(temp.rglob("*")) == []


@pytest.mark.mysql
@pytest.mark.kafka
def test_spark_batch_on_mariadb_without_the_jdbc_driver_says_how_to_get_it(tmp_path, seed_dataset, mysql_env):
    """Was: "An error occurred while calling o65.load" once Spark had started."""
    missing = tmp_path / "mariadb-java-client.jar"
    env = env_without_services(
        **mysql_env,
        CARDPIPE_RESULTS_DIR=str(tmp_path / "results"),
        CARDPIPE_BATCH_ENGINE="spark",
        CARDPIPE_JDBC_JAR=str(missing),
    )
    proc = cardpipe(["run", "--data-dir", str(seed_dataset / "input")], env, check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cardpipe: error: ") and str(missing) in last, proc.stderr
    assert "apt-get install libmariadb-java" in last
    assert "starting Spark" not in proc.stderr and "o65" not in proc.stderr
