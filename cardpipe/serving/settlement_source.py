"""What a settlement reads from the serving database: the decisions at or below a watermark (SPEC §9).

A watermark maps each partition to the last checkpoint a settlement settles: the decisions with
``checkpoint_seq <= W[kafka_partition]``. A partition absent from it contributes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import ColumnElement, Connection, Select, and_, false, func, or_, select
from sqlalchemy.engine import Dialect

from cardpipe.domain.records import PENDING, STREAM_COLUMNS
from cardpipe.serving import schema
from cardpipe.serving.csv_io import exported_text, write_csv_atomic

#: Rows fetched at a time when exporting.
_FETCH_ROWS = 10_000


def watermark_entries(watermark: Mapping[int, int]) -> list[tuple[int, int]]:
    """``(partition, last checkpoint_seq)`` pairs of a watermark, as integers, by partition."""
    entries = []
    for partition, seq in sorted(watermark.items()):
        if isinstance(partition, bool) or isinstance(seq, bool):
            raise ValueError(f"not a watermark entry: {partition!r}: {seq!r}")
        entries.append((int(partition), int(seq)))
    return entries


def watermark_sql(
    watermark: Mapping[int, int], partition: str = "kafka_partition", checkpoint: str = "checkpoint_seq"
) -> str:
    """:func:`watermark_condition` as SQL text (the same in DuckDB, MySQL and SQLite) over the columns named
    ``partition`` and ``checkpoint`` (given already quoted as needed): ``FALSE`` for an empty watermark."""
    terms = [f"({partition} = {p} AND {checkpoint} <= {seq})" for p, seq in watermark_entries(watermark)]
    return "(" + " OR ".join(terms) + ")" if terms else "(1 = 0)"


def watermark_condition(watermark: Mapping[int, int]) -> ColumnElement[bool]:
    """The decisions of ``stream_transactions`` at or below ``watermark`` (FALSE for an empty one)."""
    s = schema.stream_transactions.c
    terms = [and_(s.kafka_partition == p, s.checkpoint_seq <= seq) for p, seq in watermark_entries(watermark)]
    return or_(*terms) if terms else false()


def settled_counts(conn: Connection, watermark: Mapping[int, int]) -> dict[int, int]:
    """Per card, how many of its pending decisions ``watermark`` covers (what the settlement approves); cards
    without one are absent. One scan, no lock taken (a consistent read on MySQL/MariaDB)."""
    s = schema.stream_transactions
    query = (
        select(s.c.card_id, func.count())
        .where(s.c.status == PENDING, watermark_condition(watermark))
        .group_by(s.c.card_id)
    )
    return {int(card_id): int(n) for card_id, n in conn.execute(query)}


def settling_decisions(watermark: Mapping[int, int]) -> Select:
    """SELECT the stream columns (:data:`~cardpipe.domain.records.STREAM_COLUMNS`) of the decisions at or below
    ``watermark``, by transaction_id."""
    s = schema.stream_transactions
    return select(*[s.c[c] for c in STREAM_COLUMNS]).where(watermark_condition(watermark)).order_by(s.c.transaction_id)


def settling_decisions_sql(watermark: Mapping[int, int], dialect: Dialect) -> str:
    """:func:`settling_decisions` as SQL text of ``dialect``, values inlined (integers only), e.g. for a
    Spark JDBC ``dbtable`` subquery."""
    query = settling_decisions(watermark).order_by(None)
    return str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def export_settling_decisions(conn: Connection, watermark: Mapping[int, int], path: Path) -> int:
    """Write the decisions at or below ``watermark`` to ``path`` as :func:`~cardpipe.serving.csv_io.export_table`
    writes ``stream_transactions`` (same columns, formats and order; streamed; atomic). Returns the row count."""
    s = schema.stream_transactions
    selected = [exported_text(s.c[c], conn.dialect.name) for c in STREAM_COLUMNS]
    query = select(*selected).where(watermark_condition(watermark)).order_by(s.c.transaction_id)
    result = conn.execution_options(stream_results=True, yield_per=_FETCH_ROWS).execute(query)
    return write_csv_atomic(path, STREAM_COLUMNS, result)
