"""Loading the four input CSVs into the serving database: typed, validated, all or nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from cardpipe.errors import ConfigError, InputFileError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import insert_rows, read_typed_rows
from cardpipe.serving.database import translated_errors

log = logging.getLogger(__name__)

INPUT_FILES = {table.name: f"{table.name}.csv" for table in schema.INPUT_TABLES}


@dataclass
class LoadSummary:
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def check_data_dir(data_dir: Path) -> None:
    """Raise :class:`ConfigError` unless ``data_dir`` holds the four input files."""
    if not data_dir.is_dir():
        raise ConfigError(f"data folder {data_dir} does not exist")
    missing = [name for name in INPUT_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise ConfigError(f"data folder {data_dir} lacks {', '.join(missing)}")


def load_inputs(engine: Engine, data_dir: Path, progress: Callable[[str, int], None] | None = None) -> LoadSummary:
    """Replace the input tables' contents with the CSVs of ``data_dir``, in one transaction.

    A malformed row stops the load with an error naming file, line and column, and nothing of it
    stays in the database.
    """
    check_data_dir(data_dir)
    summary = LoadSummary()
    started = time.perf_counter()
    with translated_errors(engine), engine.begin() as conn:
        for table in reversed(schema.INPUT_TABLES):
            conn.execute(table.delete())
        for table in schema.INPUT_TABLES:
            path = data_dir / INPUT_FILES[table.name]
            report = (lambda n, name=table.name: progress(name, n)) if progress else None
            try:
                count = insert_rows(conn, table, read_typed_rows(path, table), progress=report)
            except IntegrityError as exc:
                raise InputFileError(f"{path}: {_integrity_message(table.name, exc)}") from None
            summary.rows[table.name] = count
            log.info("loaded %d rows into %s", count, table.name)
    summary.seconds = time.perf_counter() - started
    return summary


def _integrity_message(table: str, exc: IntegrityError) -> str:
    text = str(exc.orig).lower()
    if "foreign key" in text:
        parent = {"cards": "customers.csv or credit_card_types.csv", "transactions": "cards.csv"}.get(table, "")
        return f"a row references an id that is not in {parent}".rstrip()
    if "unique" in text or "duplicate" in text:
        return "duplicate id"
    return str(exc.orig).splitlines()[0]
