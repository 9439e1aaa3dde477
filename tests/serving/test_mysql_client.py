"""The MySQL/MariaDB command-line client as a reader (``cardpipe.serving.mysql_client``): what it is told of the URL
(the password never on its command line), when it is not used, the same rows as the driver on a real MariaDB, a
client that cannot connect handing the read back to the driver, and one that fails midway raising a clear error.
A stand-in client (a script named by ``CARDPIPE_MYSQL_CLIENT``) plays the failures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import URL, select

from cardpipe.errors import CardpipeError, ConfigError
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.mysql_client import CLIENT_ENV, client_command, client_rows, read_rows

URL_ = URL.create(
    "mysql+pymysql",
    username="cardpipe",
    password='pa ss"word',
    host="db.example",
    port=3399,
    database="cards",
    query={"charset": "utf8mb4"},
)


def stand_in(tmp_path: Path, script: str) -> str:
    """An executable shell script standing in for the client."""
    path = tmp_path / "fake-mysql"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_client_is_told_the_url_and_gets_the_password_in_its_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CLIENT_ENV, stand_in(tmp_path, "exit 0\n"))
    command = client_command(URL_)
    assert command is not None
    args, environment = command
    assert args[0].endswith("fake-mysql") and args[1] == "--no-defaults"  # the user's option files not read
    for expected in ("--protocol=TCP", "--host=db.example", "--port=3399", "--user=cardpipe", "--database=cards"):
        assert expected in args
    assert {"--batch", "--raw", "--skip-column-names", "--quick", "--default-character-set=utf8mb4"} <= set(args)
    assert not any("pa ss" in arg for arg in args)
    assert environment["MYSQL_PWD"] == 'pa ss"word'
    socket_url = URL_.update_query_dict({"unix_socket": "/run/mysqld.sock"})
    socket_command = client_command(socket_url)
    assert socket_command is not None
    assert "--socket=/run/mysqld.sock" in socket_command[0]
    assert not any(arg.startswith("--host") for arg in socket_command[0])


def test_the_driver_reads_when_the_client_is_off_missing_or_not_told_everything(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CLIENT_ENV, "off")
    assert client_command(URL_) is None
    monkeypatch.setenv(CLIENT_ENV, stand_in(tmp_path, "exit 0\n"))
    assert client_command(URL_.update_query_dict({"ssl_ca": "/etc/ca.pem"})) is None  # TLS: the driver's
    assert client_command(URL_.update_query_dict({"charset": "latin1"})) is None
    assert client_command(URL.create("sqlite", database="x.db")) is None
    monkeypatch.setenv(CLIENT_ENV, "auto")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert client_command(URL_) is None  # no mariadb or mysql on the PATH
    monkeypatch.setenv(CLIENT_ENV, str(tmp_path / "no-such-client"))
    with pytest.raises(ConfigError, match="CARDPIPE_MYSQL_CLIENT"):
        client_command(URL_)


def test_a_client_that_fails_before_any_row_hands_the_read_back(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv(CLIENT_ENV, stand_in(tmp_path, "echo 'ERROR 1045 (28000): Access denied' >&2\nexit 1\n"))
    with caplog.at_level("INFO", logger="cardpipe"):
        assert read_rows(URL_, "SELECT 1") is None
    assert "Access denied" in caplog.text


def test_a_client_that_fails_midway_raises_with_its_message(tmp_path, monkeypatch) -> None:
    script = "printf '1\\tone\\n2\\ttwo\\n'\necho 'ERROR 2013 (HY000): Lost connection' >&2\nexit 1\n"
    monkeypatch.setenv(CLIENT_ENV, stand_in(tmp_path, script))
    rows = read_rows(URL_, "SELECT 1")
    assert rows is not None
    with pytest.raises(CardpipeError, match="Lost connection"):
        list(rows)


def test_output_cut_short_of_a_line_end_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CLIENT_ENV, stand_in(tmp_path, "printf '1\\tone\\n2\\ttw'\nexit 0\n"))
    rows = read_rows(URL_, "SELECT 1")
    assert rows is not None
    with pytest.raises(CardpipeError, match="fake-mysql"):
        list(rows)


def test_a_reader_that_stops_early_stops_the_client(tmp_path, monkeypatch) -> None:
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}\nwhile true; do printf '1\\tone\\n'; done\n"
    monkeypatch.setenv(CLIENT_ENV, stand_in(tmp_path, script))
    rows = read_rows(URL_, "SELECT 1")
    assert rows is not None
    assert next(rows)[0] == (b"1", b"one")
    rows.close()
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


@pytest.mark.mysql
def test_the_client_reads_the_same_rows_as_the_driver(mysql_database, monkeypatch) -> None:
    monkeypatch.setenv(CLIENT_ENV, "auto")
    engine = make_engine(mysql_database)
    try:
        create_clean_schema(engine)
        t = schema.credit_card_types
        with engine.begin() as conn:
            conn.execute(
                t.insert(),
                [
                    {
                        "card_type_id": i,
                        "name": f"typ ✓ {i} \\ 'x'",
                        "credit_score_min": 300 + i,
                        "credit_score_max": 850,
                        "credit_limit_min": 100,
                        "credit_limit_max": 1000,
                        "annual_fee": i,
                        "rewards_rate": 0,
                    }
                    for i in range(1, 2_001)
                ],
            )
        statement = select(t.c.card_type_id, t.c.name, t.c.annual_fee).where(t.c.name != "it's").order_by(t.c.name)
        assert client_command(engine.url) is not None, "the MariaDB client is installed with the server"
        rows = client_rows(engine, statement)
        assert rows is not None
        got = [row for chunk in rows for row in chunk]
        with engine.connect() as conn:
            expected = [
                (str(i).encode(), name.encode(), f"{fee:.2f}".encode()) for i, name, fee in conn.execute(statement)
            ]
        assert got == expected and len(got) == 2_000
        wrong = engine.url.set(password="not the password")
        monkeypatch.setattr(engine, "url", wrong)
        assert client_rows(engine, statement) is None  # cannot connect: the driver reads
    finally:
        engine.dispose()
