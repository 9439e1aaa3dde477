"""Results in and out of the serving database: CSV exports and atomic table replacement."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, Table, text

from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS, STREAM_COLUMNS
from cardpipe.errors import CardpipeError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import export_table, insert_rows, read_typed_rows
from cardpipe.serving.database import translated_errors

STREAM_RESULTS_FILE = "stream_transactions.csv"
REJECTED_FILE = "rejected_transactions.csv"
REJECTED_COLUMNS = ("rejection_id", "topic", "kafka_partition", "kafka_offset", "transaction_id", "reason",
                    "detail", "recorded_at")
#: Batch outputs: table -> (file name, columns).
BATCH_OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "batch_transactions": ("batch_transactions.csv", STREAM_COLUMNS),
    "cards_updated": ("cards_updated.csv", CARD_COLUMNS),
    "customers_updated": ("customers_updated.csv", CUSTOMER_COLUMNS),
}


def export_stream_results(engine: Engine, results_dir: Path) -> dict[str, int]:
    """Write ``stream_transactions.csv`` and ``rejected_transactions.csv`` from the database."""
    with translated_errors(engine), engine.connect() as conn:
        return {
            STREAM_RESULTS_FILE: export_table(conn, schema.stream_transactions, results_dir / STREAM_RESULTS_FILE,
                                              STREAM_COLUMNS),
            REJECTED_FILE: export_table(conn, schema.rejected_transactions, results_dir / REJECTED_FILE,
                                        REJECTED_COLUMNS),
        }


def export_for_batch(engine: Engine, staging_dir: Path, *, stream_results: Path | None = None) -> dict[str, Path]:
    """Export what the batch job reads (stream results, cards, customers) as CSV into ``staging_dir``.

    ``stream_results``: a ``stream_transactions.csv`` known to hold the table as it is now (``run`` has just
    written it), used instead of exporting the table again.
    """
    sources = {
        "stream_transactions": (schema.stream_transactions, STREAM_COLUMNS),
        "cards": (schema.cards, CARD_COLUMNS),
        "customers": (schema.customers, CUSTOMER_COLUMNS),
    }
    paths = {}
    if stream_results is not None:
        del sources["stream_transactions"]
        paths["stream_transactions"] = stream_results
    with translated_errors(engine), engine.connect() as conn:
        for name, (table, columns) in sources.items():
            paths[name] = staging_dir / f"{name}.csv"
            export_table(conn, table, paths[name], columns)
    return paths


def _replace_rows(conn: Connection, table: Table, path: Path, columns: tuple[str, ...]) -> int:
    conn.execute(table.delete())
    return insert_rows(conn, table, read_typed_rows(path, table, columns))


def persist_batch_results(engine: Engine, results_dir: Path) -> dict[str, int]:
    """Load the batch's three result CSVs into their tables (the seed's ``serving_processor updated``)."""
    missing = [f for f, _ in BATCH_OUTPUTS.values() if not (results_dir / f).is_file()]
    if missing:
        raise CardpipeError(f"no batch results in {results_dir} ({', '.join(missing)} missing): run the batch first")
    # One transaction for all three: readers (and a crash) see the old results or the new, never a mix.
    with translated_errors(engine), engine.begin() as conn:
        return {
            name: _replace_rows(conn, schema.TABLES_BY_NAME[name], results_dir / file, columns)
            for name, (file, columns) in BATCH_OUTPUTS.items()
        }


def staging_table_name(name: str) -> str:
    return f"{name}__staging"


def prepare_staging_tables(engine: Engine) -> dict[str, str]:
    """MySQL: fresh empty copies of the batch tables for the Spark job to fill over JDBC."""
    names = {}
    with translated_errors(engine), engine.begin() as conn:
        for name in BATCH_OUTPUTS:
            staging = staging_table_name(name)
            conn.execute(text(f"DROP TABLE IF EXISTS `{staging}`"))
            conn.execute(text(f"CREATE TABLE `{staging}` LIKE `{name}`"))
            names[name] = staging
    return names


def swap_in_staging_tables(engine: Engine) -> None:
    """MySQL: replace the batch tables by their filled staging copies in one atomic RENAME."""
    renames = []
    for name in BATCH_OUTPUTS:
        renames += [f"`{name}` TO `{name}__old`", f"`{staging_table_name(name)}` TO `{name}`"]
    with translated_errors(engine), engine.begin() as conn:
        conn.execute(text("RENAME TABLE " + ", ".join(renames)))
        for name in BATCH_OUTPUTS:
            conn.execute(text(f"DROP TABLE `{name}__old`"))
