"""MySQL/MariaDB: ``stream_transactions.csv`` begun on a thread of its own when the topic is drained
(``_LinesAhead``), while the consumer counts what is undecided. It is used only when no leg of the stream ran after
it began; otherwise the file is written again from what is committed then."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL

from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine


def _decide(engine, ids: range) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
        conn.execute(
            schema.stream_transactions.insert(),
            [
                {
                    "transaction_id": tid,
                    "card_id": 7,
                    "merchant_name": "m, with a comma",
                    "timestamp": "2025-04-01 00:00:00",
                    "amount": Decimal("1.50"),
                    "location": "l",
                    "transaction_type": "purchase",
                    "status": "pending",
                    "pending_balance": Decimal("1.50"),
                    "kafka_partition": 0,
                    "checkpoint_seq": 1,
                }
                for tid in ids
            ],
        )


def _runtime(url: URL) -> Any:
    """What the exporter reads of its runtime on this backend: the settings' database URL."""
    return SimpleNamespace(settings=SimpleNamespace(database_url=url))


def _ids_in(path: Path) -> list[int]:
    return [int(line.split(",", 1)[0]) for line in path.read_text().splitlines()[1:]]


def test_the_file_begun_when_drained_is_kept_only_when_nothing_ran_after(mysql_database: URL, tmp_path: Path) -> None:
    engine = make_engine(mysql_database)
    try:
        create_clean_schema(engine)
        _decide(engine, range(1, 3001))
        path = tmp_path / "stream_transactions.csv"
        ahead = commands._LinesAhead(engine, path)
        ahead.begin()
        assert ahead.result() == 3000
        assert _ids_in(path) == list(range(1, 3001))
        _decide(engine, range(3001, 3101))  # a leg of the stream after the file was begun

        kept = commands._decisions_exporter(_runtime(mysql_database), engine, None, begun=True, lines_ahead=ahead)
        assert kept(path) == 3000, "begun when drained and nothing ran after: the file is kept as it is"
        again = commands._decisions_exporter(_runtime(mysql_database), engine, None, begun=False, lines_ahead=ahead)
        assert again(path) == 3100
        assert _ids_in(path) == list(range(1, 3101))
        ahead.begin()  # begun again (the topic drained again): joins the last write first, one writer at a time
        ahead.begin()
        assert ahead.result() == 3100
    finally:
        engine.dispose()


def test_a_failed_write_ahead_is_written_again_by_the_caller(mysql_database: URL, tmp_path: Path) -> None:
    engine = make_engine(mysql_database)
    try:
        create_clean_schema(engine)
        _decide(engine, range(1, 11))
        path = tmp_path / "missing-folder" / "stream_transactions.csv"
        ahead = commands._LinesAhead(engine, path)
        with engine.begin() as conn:
            conn.execute(text("RENAME TABLE stream_transactions TO st_away"))
        ahead.begin()
        assert ahead.result() is None  # the table was away: the write failed
        with engine.begin() as conn:
            conn.execute(text("RENAME TABLE st_away TO stream_transactions"))

        exporter = commands._decisions_exporter(_runtime(mysql_database), engine, None, begun=True, lines_ahead=ahead)
        assert exporter(path) == 10
        assert _ids_in(path) == list(range(1, 11))
    finally:
        engine.dispose()
