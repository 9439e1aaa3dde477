"""Batch settlement rules (SPEC §4), pure Python.

The constants here are the single source of truth: the Spark job builds its expressions from them,
and :func:`settle` is the reference implementation the Spark job is tested against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal

from cardpipe.domain.money import round_to_hundred_half_even
from cardpipe.domain.records import APPROVED, PENDING, Card, Customer

#: (utilization % upper bound, inclusive; score change), checked in order.
SCORE_STEPS: tuple[tuple[int, int], ...] = ((10, 15), (20, 10), (30, 5), (50, -5), (70, -15))
#: Score change when utilization is above every bound.
SCORE_CHANGE_ABOVE = -25
SCORE_MIN, SCORE_MAX = 300, 850
#: (score change upper bound, inclusive; credit-limit factor) for negative changes, checked in order.
LIMIT_FACTOR_STEPS: tuple[tuple[int, Decimal], ...] = ((-20, Decimal("0.85")), (-10, Decimal("0.90")))
#: Factor for any other negative change.
LIMIT_FACTOR_OTHER_NEGATIVE = Decimal("0.95")


def settled_status(status: str) -> str:
    """Pending becomes approved; declined and rejected stay as they are."""
    return APPROVED if status == PENDING else status


def score_change(total_balance: Decimal, total_limit: Decimal) -> int:
    """Score change for a customer's utilization ``total_balance / total_limit × 100``.

    Compared without division (``balance × 100 <= bound × limit``), so the boundaries are exact.
    A customer whose cards have no limit at all counts as 0 % used if it owes nothing, else as over
    every bound.
    """
    if total_limit <= 0:
        return SCORE_STEPS[0][1] if total_balance <= 0 else SCORE_CHANGE_ABOVE
    for bound, change in SCORE_STEPS:
        if total_balance * 100 <= bound * total_limit:
            return change
    return SCORE_CHANGE_ABOVE


def new_credit_score(score: int, change: int) -> int:
    """Apply a change, kept within 300..850."""
    return max(SCORE_MIN, min(SCORE_MAX, score + change))


def limit_factor(change: int) -> Decimal | None:
    """The credit-limit factor for a score change, or ``None`` when the limit is unchanged."""
    if change >= 0:
        return None
    for bound, factor in LIMIT_FACTOR_STEPS:
        if change <= bound:
            return factor
    return LIMIT_FACTOR_OTHER_NEGATIVE


def new_credit_limit(limit: Decimal, change: int) -> Decimal:
    """Lower the limit for a negative change: limit × factor rounded half-even to 100."""
    factor = limit_factor(change)
    return limit if factor is None else round_to_hundred_half_even(limit * factor)


@dataclass(frozen=True)
class SettledTransaction:
    transaction_id: int
    card_id: int
    amount: Decimal
    status: str


@dataclass(frozen=True)
class Settlement:
    transactions: list[SettledTransaction]
    cards: list[Card]
    customers: list[Customer]


def settle(
    transactions: Iterable[SettledTransaction], cards: Iterable[Card], customers: Iterable[Customer]
) -> Settlement:
    """Reference settlement of stream results (statuses pending/declined/rejected)."""
    settled = [replace(t, status=settled_status(t.status)) for t in transactions]
    approved: dict[int, Decimal] = defaultdict(Decimal)
    for t in settled:
        if t.status == APPROVED:
            approved[t.card_id] += t.amount
    new_cards = [replace(c, current_balance=c.current_balance + approved.get(c.card_id, Decimal(0))) for c in cards]
    balance: dict[int, Decimal] = defaultdict(Decimal)
    limit: dict[int, Decimal] = defaultdict(Decimal)
    for c in new_cards:
        balance[c.customer_id] += c.current_balance
        limit[c.customer_id] += c.credit_limit
    changes = {cid: score_change(balance[cid], limit[cid]) for cid in limit}
    new_customers = [
        replace(cu, credit_score=new_credit_score(cu.credit_score, changes[cu.customer_id]))
        if cu.customer_id in changes
        else cu
        for cu in customers
    ]
    final_cards = [replace(c, credit_limit=new_credit_limit(c.credit_limit, changes[c.customer_id])) for c in new_cards]
    return Settlement(settled, final_cards, new_customers)
