"""Results out of the serving database: CSV exports, and the batch tables' counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func, select, text

from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS, STREAM_COLUMNS
from cardpipe.errors import CardpipeError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import export_table
from cardpipe.serving.database import translated_errors

STREAM_RESULTS_FILE = "stream_transactions.csv"
REJECTED_FILE = "rejected_transactions.csv"
REJECTED_COLUMNS = (
    "rejection_id",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "transaction_id",
    "reason",
    "detail",
    "recorded_at",
)
#: Batch outputs: table -> (file name, columns).
BATCH_OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "batch_transactions": ("batch_transactions.csv", STREAM_COLUMNS),
    "cards_updated": ("cards_updated.csv", CARD_COLUMNS),
    "customers_updated": ("customers_updated.csv", CUSTOMER_COLUMNS),
}


def export_stream_results(
    engine: Engine, results_dir: Path, *, write_decisions: Callable[[Path], int] | None = None
) -> dict[str, int]:
    """Write ``stream_transactions.csv`` and ``rejected_transactions.csv`` from the database.

    ``write_decisions(path)``, when given, writes the first (the large one) instead of :func:`export_table`, in
    the same format, and returns its row count."""
    stream_path = results_dir / STREAM_RESULTS_FILE
    with translated_errors(engine), engine.connect() as conn:
        # The small file first: it is written while ``write_decisions`` may already be writing the other, apart.
        rejected = export_table(conn, schema.rejected_transactions, results_dir / REJECTED_FILE, REJECTED_COLUMNS)
        if write_decisions is not None:
            decisions = write_decisions(stream_path)
        else:
            decisions = export_table(conn, schema.stream_transactions, stream_path, STREAM_COLUMNS)
        return {STREAM_RESULTS_FILE: decisions, REJECTED_FILE: rejected}


def batch_table_counts(engine: Engine) -> dict[str, int]:
    """Rows of each batch table (the views of the settlement in force); an error if none is published yet."""
    with translated_errors(engine), engine.connect() as conn:
        in_force = conn.execute(select(schema.serving_state.c.settlement_id)).scalar()
        if in_force is None:
            raise CardpipeError("no settlement has been published yet: run `cardpipe batch` first")
        return {
            name: int(conn.execute(select(func.count()).select_from(text(name))).scalar() or 0)
            for name in BATCH_OUTPUTS
        }
