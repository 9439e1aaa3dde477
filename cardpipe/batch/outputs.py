"""What a settlement produces, independent of the engine that computes it (no pyspark here).

The three result files of SPEC §5 (:data:`OUTPUTS`) and the counts an engine reports
(:class:`SettlementSummary`), and :func:`timed`, how both engines time their stages.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
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


#: The name prefix of the embedded settlements' working folders (followed by the process's pid).
EMBEDDED_DIR_PREFIX = ".embedded-"


def work_dir_prefix(pid: int) -> str:
    """The name prefix of the working folders process ``pid``'s embedded settlements make inside their output
    folder."""
    return f"{EMBEDDED_DIR_PREFIX}{pid}-"


#: The kinds of :class:`FetchedRows` columns held as text: exact money and calendar dates.
MONEY, DATE = "money", "date"
_FROM_TEXT: dict[str, Callable[[str], Any]] = {MONEY: Decimal, DATE: date.fromisoformat}


@dataclass(frozen=True)
class FetchedRows:
    """Rows as an engine fetched them: column names, each column's kind (:data:`MONEY`, :data:`DATE`, or None:
    the value as it is) and the rows as tuples, money and dates as their text (quick to fetch and to send to
    another process, where Decimals and dates are not)."""

    names: tuple[str, ...]
    kinds: tuple[str | None, ...]
    rows: list[tuple[Any, ...]]

    def typed(self) -> list[dict[str, Any]]:
        """The rows as dicts of typed values (money as exact Decimal, dates as :class:`~datetime.date`)."""
        names = self.names
        convert = [(i, _FROM_TEXT[kind]) for i, kind in enumerate(self.kinds) if kind is not None]
        if not convert:
            return [dict(zip(names, row, strict=True)) for row in self.rows]
        typed = []
        for row in self.rows:
            values = list(row)
            for i, parse in convert:
                if values[i] is not None:
                    values[i] = parse(values[i])
            typed.append(dict(zip(names, values, strict=True)))
        return typed


@dataclass(frozen=True)
class SettledRows:
    """A settlement's rows for the serving database: every card (its :data:`CARD_COLUMNS` plus
    ``settled_count``, how many of its pending decisions the settlement approved) and every customer (its
    :data:`CUSTOMER_COLUMNS`), held as fetched; :attr:`cards` and :attr:`customers` are them as dicts of typed
    values (converted on first use: a settlement's process passes them on without converting them)."""

    fetched_cards: FetchedRows
    fetched_customers: FetchedRows

    @functools.cached_property
    def cards(self) -> list[dict[str, Any]]:
        return self.fetched_cards.typed()

    @functools.cached_property
    def customers(self) -> list[dict[str, Any]]:
        return self.fetched_customers.typed()

    def __getstate__(self) -> dict[str, Any]:
        # Sent as fetched: the typed rows, if converted already, are made again on the other side.
        return {"fetched_cards": self.fetched_cards, "fetched_customers": self.fetched_customers}


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
