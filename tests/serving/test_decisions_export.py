"""``stream_transactions.csv`` as ``consume`` writes it: through DuckDB on SQLite, rendered line by line by the server
on MySQL/MariaDB. Both write the same bytes: what Python's csv writer writes (QUOTE_MINIMAL, ``\\n`` line ends), a
carriage return quoted too, money with two decimals, ``YYYY-MM-DD HH:MM:SS``, NULL empty, sorted by id."""

from __future__ import annotations

import os
import re
import signal
from datetime import datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from cardpipe.batch.embedded import export_table_csv
from cardpipe.domain.records import DECLINED, PENDING, REJECTED, STREAM_COLUMNS
from cardpipe.serving import schema
from cardpipe.serving.csv_io import export_table_lines
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.mysql_client import CLIENT_ENV

TEXTS = [
    "plain",
    "a, comma",
    'a "quote"',
    '"',
    ",",
    "  padded  ",
    "",
    "Zoë ✓ 東京 😀",
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\nNY 10001",
    "#hash",
    "'single'",
    "tab\there",
    "back\\slash",
    "NULL",
    '""',
    "%s %Y",
]
MONEY = [D("0.00"), D("-0.50"), D("12.30"), D("9999999999.99"), D("-9999999999.99"), D("0.01"), D("5000.00")]


def decision_rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(60):
        status = (PENDING, DECLINED, REJECTED)[i % 3]
        rows.append(
            {
                "transaction_id": 10_000 - i * 97,  # inserted out of order: the file is sorted by id
                "card_id": 1 + i % 7,
                "merchant_name": TEXTS[i % len(TEXTS)],
                "timestamp": datetime(2025, 1 + i % 12, 1 + i % 28, i % 24, i % 60, (i * 7) % 60),
                "amount": MONEY[i % len(MONEY)],
                "location": TEXTS[(i * 5) % len(TEXTS)],
                "transaction_type": TEXTS[(i * 11) % len(TEXTS)],
                "related_transaction_id": None if i % 4 else 2**62 + i,
                "status": status,
                "pending_balance": None if status == REJECTED else MONEY[(i * 3) % len(MONEY)],
                "decline_reason": "over_credit_limit" if status == DECLINED else None,
                "credit_limit": None if status == REJECTED else D("5000.00"),
                "kafka_partition": i % 3,
                "checkpoint_seq": 1 + i // 10,
            }
        )
    return rows


def expected_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The file, written out by hand: a text is quoted (its quotes doubled) when it holds a comma, a quote, a line
    feed or a carriage return (Python's csv module, QUOTE_MINIMAL, quotes the first three)."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, datetime):
            return value.strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(value, str) and any(char in value for char in ',"\n\r'):
            return '"' + value.replace('"', '""') + '"'
        return str(value)

    lines = [",".join(STREAM_COLUMNS)]
    lines += [",".join(cell(row[c]) for c in STREAM_COLUMNS) for row in sorted(rows, key=lambda r: r["transaction_id"])]
    return ("\n".join(lines) + "\n").encode("utf-8")


def test_stream_results_file_is_the_same_on_every_backend(database_url, tmp_path: Path, monkeypatch) -> None:
    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        rows = decision_rows()
        with engine.begin() as conn:
            conn.execute(schema.stream_transactions.insert(), rows)
        path = tmp_path / "out" / "stream_transactions.csv"
        # MySQL/MariaDB: written by the server's command-line client (three ranges of the key at once), by the
        # driver, and by the driver when the client fails.
        failing = tmp_path / "failing-client"
        failing.write_text("#!/bin/sh\necho 'ERROR 2002 (HY000): Cannot connect' >&2\nexit 1\n")
        failing.chmod(0o755)
        for client in ("auto", "off", str(failing)) if engine.dialect.name == "mysql" else ("auto",):
            monkeypatch.setenv(CLIENT_ENV, client)
            path.unlink(missing_ok=True)
            if engine.dialect.name == "mysql":
                with engine.connect() as conn:
                    count = export_table_lines(conn, schema.stream_transactions, path, STREAM_COLUMNS)
            else:
                count = export_table_csv(database_url, "stream_transactions", STREAM_COLUMNS, "transaction_id", path)
            assert count == len(rows), client
            written = path.read_bytes()
            assert written == expected_bytes(rows), client
            assert b',"a, comma",' in written and b'"carriage\rreturn"' in written
            assert not list(path.parent.glob(".*"))  # no staged, part or spill file left behind
    finally:
        engine.dispose()


@pytest.mark.parametrize("odd", [False, True], ids=["duckdb-quotes", "quoted-in-sql"])
def test_on_sqlite_duckdb_quotes_the_texts_unless_one_is_empty_or_holds_a_hash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, odd: bool
) -> None:
    """DuckDB's own quoting also quotes an empty text and one holding a ``#``; Python's csv module does not. The
    COPY with DuckDB's quoting fails at the first such text, and the texts are then quoted in SQL: the same bytes
    either way, and the second read only when a text needs it."""
    import logging

    from sqlalchemy.engine import URL

    url = URL.create("sqlite", database=str(tmp_path / "cardpipe.db"))
    engine = make_engine(url)
    try:
        create_clean_schema(engine)
        rows = decision_rows()
        if not odd:
            ordinary = [t for t in TEXTS if t and "#" not in t]
            for i, row in enumerate(rows):
                row["merchant_name"], row["location"] = ordinary[i % len(ordinary)], ordinary[(i * 5) % len(ordinary)]
                row["transaction_type"] = ordinary[(i * 3) % len(ordinary)]
        with engine.begin() as conn:
            conn.execute(schema.stream_transactions.insert(), rows)
    finally:
        engine.dispose()
    path = tmp_path / "stream_transactions.csv"
    with caplog.at_level(logging.DEBUG, logger="cardpipe.batch.embedded"):
        assert export_table_csv(url, "stream_transactions", STREAM_COLUMNS, "transaction_id", path) == len(rows)
    written = path.read_bytes()
    assert written == expected_bytes(rows)
    assert (b",#hash," in written) is odd  # written as Python writes it, unquoted
    assert ("written again with its texts quoted in SQL" in caplog.text) is odd
    assert not list(tmp_path.glob(".*"))  # the first COPY's staged file is gone too


def test_an_empty_table_gives_the_header_alone(database_url, tmp_path: Path) -> None:
    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        path = tmp_path / "stream_transactions.csv"
        if engine.dialect.name == "mysql":
            with engine.connect() as conn:
                assert export_table_lines(conn, schema.stream_transactions, path, STREAM_COLUMNS) == 0
        else:
            assert export_table_csv(database_url, "stream_transactions", STREAM_COLUMNS, "transaction_id", path) == 0
        assert path.read_bytes() == (",".join(STREAM_COLUMNS) + "\n").encode()
    finally:
        engine.dispose()


def test_the_export_process_writes_the_same_file_and_reports_errors(tmp_path: Path) -> None:
    """Attached ahead, it sees every row committed later, holds no read transaction meanwhile (the writer's
    checkpoints are not blocked), writes the same bytes, and reports a database that is not there."""
    import multiprocessing

    from sqlalchemy import text
    from sqlalchemy.engine import URL

    from cardpipe.batch.apart import ExportProcess
    from cardpipe.errors import CardpipeError, DatabaseUnavailable

    url = URL.create("sqlite", database=str(tmp_path / "cardpipe.db"))
    engine = make_engine(url)
    rows = decision_rows()
    path = tmp_path / "out" / "stream_transactions.csv"
    try:
        create_clean_schema(engine)
        with engine.begin() as conn:
            conn.execute(schema.stream_transactions.insert(), rows[:10])
        process = ExportProcess(url)
        try:
            assert process.export_table_csv("stream_transactions", STREAM_COLUMNS, "transaction_id", path) == 10
            assert path.read_bytes() == expected_bytes(rows[:10])
            with engine.begin() as conn:  # committed after the process attached the file
                conn.execute(schema.stream_transactions.insert(), rows[10:])
            with engine.connect() as conn:
                busy, _log, _done = conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)")).one()
            assert busy == 0  # no read transaction of the export process holds the WAL
            process.begin("stream_transactions", STREAM_COLUMNS, "transaction_id", path)
            process.last_job()  # no more: the process ends by itself once the file is written
            assert process.result() == len(rows)
            process._child.process.join(30)  # noqa: SLF001  # not stopped: it ends on its own
            assert process._child.process.exitcode == 0  # noqa: SLF001
            with pytest.raises(CardpipeError, match="the export's process"):  # nothing is asked after the last
                process.begin("stream_transactions", STREAM_COLUMNS, "transaction_id", path)
        finally:
            process.stop()
        assert path.read_bytes() == expected_bytes(rows)
    finally:
        engine.dispose()
    missing = ExportProcess(URL.create("sqlite", database=str(tmp_path / "missing.db")))
    try:
        with pytest.raises(DatabaseUnavailable, match="no SQLite file"):
            missing.export_table_csv("stream_transactions", STREAM_COLUMNS, "transaction_id", path)
    finally:
        missing.stop()
    ExportProcess(url).stop()  # never given a job: it ends at once
    killed = ExportProcess(url)
    try:
        os.kill(killed.pid, signal.SIGKILL)
        with pytest.raises(CardpipeError, match=r"export's process was killed \(SIGKILL\)"):
            killed.export_table_csv("stream_transactions", STREAM_COLUMNS, "transaction_id", path)
    finally:
        killed.stop()
    assert not multiprocessing.active_children()
    assert path.read_bytes() == expected_bytes(rows)  # the failed export left the file as it was


def test_the_export_process_follows_the_table_and_writes_it_from_its_copy(tmp_path: Path, capfd) -> None:
    """Following ``stream_transactions`` while rows are committed in waves, the export process writes the file
    from its copy (only the last rows read when asked), byte for byte the file read whole; a row deleted
    under it (the table no longer holds what was copied) and it reads the table whole instead, still exact."""
    import logging
    import multiprocessing
    import subprocess
    import sys
    import time

    from sqlalchemy.engine import URL

    from cardpipe.batch.apart import FOLLOW_SECONDS, ExportProcess

    url = URL.create("sqlite", database=str(tmp_path / "cardpipe.db"))
    engine = make_engine(url)
    rows = decision_rows()
    path = tmp_path / "out" / "stream_transactions.csv"
    cardpipe_log = logging.getLogger("cardpipe")
    level = cardpipe_log.level
    cardpipe_log.setLevel(logging.DEBUG)  # the child logs which way it wrote the file
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f".cardpipe-follow-{gone.pid}-left"  # a killed export process's copy
    (orphan / "copy.duckdb").parent.mkdir()
    (orphan / "copy.duckdb").write_bytes(b"\0" * 4096)
    try:
        create_clean_schema(engine)
        process = ExportProcess(url, follow=("stream_transactions", STREAM_COLUMNS, "transaction_id"))
        cardpipe_log.setLevel(level)
        try:
            for wave in (rows[:10], rows[10:30], rows[30:50]):
                with engine.begin() as conn:
                    conn.execute(schema.stream_transactions.insert(), wave)
                time.sleep(3 * FOLLOW_SECONDS)  # copied meanwhile
            assert list(tmp_path.glob(".cardpipe-follow-*")), "the copy lives beside the database"
            assert not orphan.exists(), "a copy left by a process gone is removed"
            with engine.begin() as conn:  # committed just before the file is asked for: read then
                conn.execute(schema.stream_transactions.insert(), rows[50:])
            assert process.export_table_csv("stream_transactions", STREAM_COLUMNS, "transaction_id", path) == 60
            assert path.read_bytes() == expected_bytes(rows)
            # The last 10 rows are read when the file is asked for, unless the copy caught up with them first.
            err = capfd.readouterr().err
            assert re.search(r"stream_transactions written from its copy: 60 rows, (10|0) read when asked", err), err
            with engine.begin() as conn:
                conn.execute(schema.stream_transactions.delete().where(schema.stream_transactions.c.card_id == 1))
            kept = [row for row in rows if row["card_id"] != 1]
            assert process.export_table_csv("stream_transactions", STREAM_COLUMNS, "transaction_id", path) == len(kept)
            assert path.read_bytes() == expected_bytes(kept)
            told = capfd.readouterr().err
            assert f"written from the table itself: it holds {len(kept)} rows up to rowid 60, the copy 60" in told
        finally:
            process.stop()
    finally:
        cardpipe_log.setLevel(level)
        engine.dispose()
    assert not multiprocessing.active_children()
    assert not list(tmp_path.glob(".cardpipe-follow-*")), "the copy is removed with the process"
    assert not list(path.parent.glob(".*"))


def test_the_copy_is_written_out_beyond_the_memory_budget(tmp_path: Path) -> None:
    """Writing the file from the followed copy sorts every line of it: past the connection's memory budget DuckDB
    spills to disk (a header joined on by UNION ALL ran out of memory instead), and the bytes are the same."""
    import sqlite3

    from sqlalchemy.engine import URL

    from cardpipe.batch.embedded import FollowedTable, connect

    url = URL.create("sqlite", database=str(tmp_path / "cardpipe.db"))
    engine = make_engine(url)
    try:
        create_clean_schema(engine)
    finally:
        engine.dispose()
    n = 400_000
    rows = [
        (n - i, 1 + i % 97, f"Merchant {i % 13}, Inc.", f"2025-04-01 {i % 24:02d}:00:00.000000", f"{i % 500}.25")
        + (f"{i} Main St, Albany, NY 12207", "purchase", None, PENDING, "12.50", None, "5000.00", i % 8, 1 + i // 5000)
        for i in range(n)
    ]
    with sqlite3.connect(tmp_path / "cardpipe.db") as db:
        db.executemany(f"INSERT INTO stream_transactions VALUES ({', '.join('?' * 14)})", rows)
    whole = tmp_path / "whole.csv"
    assert export_table_csv(url, "stream_transactions", STREAM_COLUMNS, "transaction_id", whole) == n

    conn = connect(url, threads=1, memory_limit="32MB")  # the lines alone take about 40 MB
    try:
        work = tmp_path / "follow"
        work.mkdir()
        followed = FollowedTable(conn, "stream_transactions", STREAM_COLUMNS, "transaction_id", work)
        assert followed.catch_up() == n
        path = tmp_path / "followed.csv"
        assert followed.export_csv(path, url) == n
    finally:
        conn.close()
    assert followed.broken is None, "written from the copy"
    assert path.read_bytes() == whole.read_bytes()
