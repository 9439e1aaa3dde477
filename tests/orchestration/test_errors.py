"""Acceptance: bad configuration gets a clear one-line error, not a traceback."""

import errno
import os
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from cardpipe import cli
from cardpipe.errors import ErrorContext, internal_error_line, user_message
from tests.orchestration.helpers import cardpipe, env_without_services


def assert_one_line_error(proc, *fragments: str, secret: str | None = None) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cardpipe: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if secret:
        assert secret not in proc.stderr and secret not in proc.stdout
    return lines[0]


def test_database_unreachable(tmp_path):
    env = env_without_services(DB_HOST="127.0.0.1", DB_PORT="1", DB_USER="u", DB_PASSWORD="pw-not-shown")
    proc = cardpipe(["setup", "--results-dir", str(tmp_path)], env, check=False)
    assert_one_line_error(proc, "cannot connect", "127.0.0.1:1", secret="pw-not-shown")


@pytest.mark.mysql
def test_wrong_database_password(tmp_path, mysql_env):
    env = env_without_services(**{**mysql_env, "DB_PASSWORD": "wrong-pw-not-shown"})
    proc = cardpipe(["setup", "--results-dir", str(tmp_path)], env, check=False)
    assert_one_line_error(proc, "access denied", secret="wrong-pw-not-shown")


@pytest.mark.kafka
def test_broker_unreachable(tmp_path, seed_dataset):
    env = env_without_services(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    cardpipe(["setup", "--results-dir", str(tmp_path)], env)
    cardpipe(["load", "--results-dir", str(tmp_path), "--data-dir", str(seed_dataset / "input")], env)
    proc = cardpipe(["produce", "--results-dir", str(tmp_path)], env, check=False, timeout=120)
    assert_one_line_error(proc, "127.0.0.1:1", "unreachable")


def test_missing_data_folder(tmp_path):
    proc = cardpipe(
        ["run", "--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r")],
        env_without_services(),
        check=False,
    )
    assert_one_line_error(proc, "nowhere", "does not exist")


def test_csv_with_a_missing_column(tmp_path, seed_dataset):
    data = tmp_path / "data"
    shutil.copytree(seed_dataset / "input", data)
    text = (data / "customers.csv").read_text().replace("credit_score,", "score,", 1)
    (data / "customers.csv").write_text(text)
    proc = cardpipe(
        ["load", "--data-dir", str(data), "--results-dir", str(tmp_path / "r")], env_without_services(), check=False
    )
    assert_one_line_error(proc, "customers.csv", "missing column(s) credit_score")


def test_bad_setting_value(tmp_path):
    proc = cardpipe(
        ["setup", "--results-dir", str(tmp_path)], env_without_services(KAFKA_PARTITIONS="many"), check=False
    )
    assert_one_line_error(proc, "KAFKA_PARTITIONS must be an integer")


def test_bad_columnar_setting(tmp_path):
    proc = cardpipe(
        ["setup", "--results-dir", str(tmp_path)], env_without_services(CARDPIPE_COLUMNAR="fast"), check=False
    )
    assert_one_line_error(proc, "CARDPIPE_COLUMNAR must be one of auto, on, off, got 'fast'")


# ---------------------------------------------------------------------------------------------------------------
# Issue 12, part 4: each library's errors mapped once (cardpipe.errors.user_message), one line with what to do
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("number", "fragments"),
    [
        (errno.ENOSPC, ("no space left on device", "free some space")),
        (errno.EACCES, ("permission denied", "make it writable")),
        (errno.EROFS, ("read-only file system", "writable file system")),
        (errno.ENOENT, ("no such file or folder", "check the path")),
    ],
)
def test_os_errors_name_the_path_and_what_to_do(number, fragments):
    line = user_message(OSError(number, os.strerror(number), "/data/out/cards.csv"))
    assert line is not None and "/data/out/cards.csv" in line and "\n" not in line
    for fragment in fragments:
        assert fragment in line, line


def test_os_error_without_a_file_name_names_the_folder_being_written():
    """A write() on a full disk names no file: the command's folder is named instead."""
    line = user_message(OSError(errno.ENOSPC, "No space left on device"), ErrorContext(folder=Path("/results")))
    assert line == "no space left on device: writing in /results: free some space, or choose a folder on another disk"


def test_kafka_exception_is_one_line_naming_the_broker():
    from confluent_kafka import KafkaError, KafkaException

    line = user_message(KafkaException(KafkaError(KafkaError._TRANSPORT)), ErrorContext(kafka_servers="kafka:9092"))
    assert line is not None and line.startswith("Kafka broker kafka:9092 is unreachable")
    assert "KAFKA_BOOTSTRAP_SERVERS" in line
    line = user_message(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
    assert line is not None and "cardpipe produce" in line


def test_py4j_errors_are_one_line_without_the_java_trace():
    from py4j.protocol import Py4JNetworkError

    line = user_message(Py4JNetworkError("Answer from Java side is empty"))
    assert line is not None and line.startswith("lost contact with Spark's Java process")
    assert "Answer from Java side" not in line


def test_pymysql_error_keeps_the_servers_message_without_the_password():
    import pymysql

    url = URL.create("mysql+pymysql", username="u", password="pw-secret", host="db", database="x")
    exc = pymysql.err.ProgrammingError(1064, "You have an error near 'pw-secret' at line 1")
    line = user_message(exc, ErrorContext(database_url=url))
    assert line == "database mysql+pymysql://u:***@db/x: You have an error near '***' at line 1 [MySQL error 1064]"
    exc = pymysql.err.OperationalError(1044, "Access denied for user 'u'@'%' to database 'x'")
    line = user_message(exc, ErrorContext(database_url=url))
    assert line is not None and "GRANT ALL ON" in line and "DB_NAME" in line


def test_a_bug_is_no_user_error():
    assert user_message(KeyError("card")) is None
    assert internal_error_line(KeyError("card")) == (
        "internal error: KeyError: 'card' (set CARDPIPE_DEBUG=1 for the traceback)"
    )


def test_a_bug_exits_70_with_one_line_and_the_traceback_on_request(monkeypatch, capsys, tmp_path):
    def broken(_args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli, "cmd_persist", broken)
    monkeypatch.delenv("CARDPIPE_DEBUG", raising=False)
    assert cli.main(["persist", "--results-dir", str(tmp_path)]) == 70
    err = capsys.readouterr().err
    assert err == (
        "cardpipe: internal error: ZeroDivisionError: division by zero (set CARDPIPE_DEBUG=1 for the traceback)\n"
    )
    monkeypatch.setenv("CARDPIPE_DEBUG", "1")
    assert cli.main(["persist", "--results-dir", str(tmp_path)]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("for the traceback)\n")


@pytest.mark.mysql
def test_user_without_create_database_uses_an_existing_database(
    tmp_path, mysql_url, mysql_database, mysql_env, seed_dataset
):
    """Issue 12: a user granted rights on one existing database, without CREATE (so without CREATE DATABASE),
    can use its schema: cardpipe creates the database only when it does not exist."""
    from sqlalchemy import create_engine, text

    user, password = f"cp_{uuid.uuid4().hex[:12]}", f"pw-{uuid.uuid4().hex}"
    rights = "SELECT, INSERT, UPDATE, DELETE, DROP, ALTER, INDEX, LOCK TABLES, CREATE TEMPORARY TABLES, SHOW VIEW"
    admin = create_engine(mysql_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for host in ("%", "localhost"):
            conn.execute(text(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'"))
            conn.execute(text(f"GRANT {rights} ON `{mysql_database.database}`.* TO '{user}'@'{host}'"))
    try:
        cardpipe(["setup", "--results-dir", str(tmp_path)], env_without_services(**mysql_env))  # the owner's
        env = env_without_services(**{**mysql_env, "DB_USER": user, "DB_PASSWORD": password})
        proc = cardpipe(["load", "--results-dir", str(tmp_path), "--data-dir", str(seed_dataset / "input")], env)
        assert "transactions 400" in proc.stdout
        # A database it may not create: one line saying what to do, no password.
        proc = cardpipe(["load", "--results-dir", str(tmp_path)], {**env, "DB_NAME": f"{user}_other"}, check=False)
        assert_one_line_error(proc, "access denied to the database", "GRANT ALL ON", secret=password)
    finally:
        with admin.connect() as conn:
            for host in ("%", "localhost"):
                conn.execute(text(f"DROP USER IF EXISTS '{user}'@'{host}'"))
        admin.dispose()
