"""What a settlement produces, independent of the engine that computes it (no pyspark here).

The three result files of SPEC §5 (:data:`OUTPUTS`) and the counts an engine reports
(:class:`SettlementSummary`), and :func:`timed`, how both engines time their stages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS, STREAM_COLUMNS

BATCH_TRANSACTIONS = "batch_transactions"
CARDS_UPDATED = "cards_updated"
CUSTOMERS_UPDATED = "customers_updated"
#: Output name → (sort key, columns). The CSV file is ``<name>.csv``.
OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    BATCH_TRANSACTIONS: ("transaction_id", STREAM_COLUMNS),
    CARDS_UPDATED: ("card_id", CARD_COLUMNS),
    CUSTOMERS_UPDATED: ("customer_id", CUSTOMER_COLUMNS),
}


def output_file(name: str) -> str:
    """The CSV file name of an output (``batch_transactions`` → ``batch_transactions.csv``)."""
    if name not in OUTPUTS:
        raise ValueError(f"unknown output {name!r} (known: {', '.join(OUTPUTS)})")
    return f"{name}.csv"


@dataclass(frozen=True)
class SettledRows:
    """A settlement's rows for the serving database: every card (its :data:`CARD_COLUMNS` plus
    ``settled_count``, how many of its pending decisions the settlement approved) and every customer (its
    :data:`CUSTOMER_COLUMNS`), as dicts of typed values."""

    cards: list[dict[str, Any]]
    customers: list[dict[str, Any]]


@dataclass(frozen=True)
class SettlementSummary:
    """The counts of one settlement: its transactions by status (after settling: approved, declined,
    rejected), every card and customer, and how many got a lower limit or score."""

    transactions: int
    approved: int
    declined: int
    rejected: int
    cards: int
    customers: int
    customers_score_down: int
    cards_limit_lowered: int
    seconds: float
    #: Seconds per stage of the engine, in order (e.g. ``read``, ``settle``, ``csv:<output>``, ``summary``).
    steps: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    #: Spark: outputs whose partitions were not in key order, so that writing them needed a global sort.
    sorted_globally: tuple[str, ...] = field(default=(), repr=False, compare=False)
    #: The settled rows, when the engine hands them over in memory (the embedded one does); None: the caller
    #: reads them from the CSV files and counts ``settled_count`` in the database.
    settled: SettledRows | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        return (
            f"settled {self.transactions} transactions ({self.approved} approved, {self.declined} declined, "
            f"{self.rejected} rejected); {self.cards} cards ({self.cards_limit_lowered} limits lowered), "
            f"{self.customers} customers ({self.customers_score_down} scores down) in {self.seconds:.1f}s"
        )


@contextlib.contextmanager
def timed(steps: dict[str, float], name: str, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """Record the seconds the block takes (rounded to the millisecond) as ``steps[name]``, even when it fails;
    ``progress`` is told the stage's name as it starts."""
    if progress is not None:
        progress(f"batch stage: {name}")
    started = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = round(time.perf_counter() - started, 3)
