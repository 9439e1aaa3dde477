"""A plain reference model of the running system (SPEC §9), written from SPEC's text for the tests.

Everything in memory, one step at a time: ``decide`` one transaction with the limits in force, ``settle``
every decision so far from the original cards and customers, and the three merged views. The settlement
arithmetic is SPEC §4 written out again here with exact ``Fraction``s (not the product's code).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

SCORE_STEPS = ((10, 15), (20, 10), (30, 5), (50, -5), (70, -15))


def _zip_head(text: str | None) -> str | None:
    if not text or not text.split():
        return None
    z = text.split()[-1]
    return z[0] if len(z) >= 5 else None


def _score_change(balance: Decimal, limit: Decimal) -> int:
    if limit <= 0:
        return 15 if balance <= 0 else -25
    utilization = Fraction(balance) / Fraction(limit) * 100
    for bound, change in SCORE_STEPS:
        if utilization <= bound:
            return change
    return -25


def _new_limit(limit: Decimal, change: int) -> Decimal:
    if change >= 0:
        return limit
    factor = Decimal("0.85") if change <= -20 else Decimal("0.90") if change <= -10 else Decimal("0.95")
    return (limit * factor / 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN) * 100 + Decimal("0.00")


@dataclass
class Decided:
    tx: dict[str, Any]
    status: str
    pending_balance: Decimal | None
    reason: str | None
    credit_limit: Decimal | None
    settlement_id: int | None = None  # the first settlement that covered it


@dataclass
class LambdaModel:
    cards: dict[int, dict[str, Any]]  # the original cards, by id
    customers: dict[int, dict[str, Any]]  # the original customers, by id
    decided: dict[int, Decided] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    balances: dict[int, Decimal] = field(default_factory=dict)
    settlement_id: int | None = None
    limits: dict[int, Decimal] = field(default_factory=dict)  # in force
    settled_balances: dict[int, Decimal] = field(default_factory=dict)
    scores: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.balances = {i: c["current_balance"] for i, c in self.cards.items()}
        self.limits = {i: c["credit_limit"] for i, c in self.cards.items()}
        self.settled_balances = dict(self.balances)
        self.scores = {i: c["credit_score"] for i, c in self.customers.items()}

    def decide(self, tx: dict[str, Any]) -> None:
        """SPEC §3 with the limits in force; a transaction id seen before is ignored."""
        tid = tx["transaction_id"]
        if tid in self.decided:
            return
        card = self.cards.get(tx["card_id"])
        self.order.append(tid)
        if card is None:
            self.decided[tid] = Decided(tx, "rejected", None, None, None)
            return
        limit, amount, balance = self.limits[tx["card_id"]], tx["amount"], self.balances[tx["card_id"]]
        owner_head = _zip_head(self.customers[card["customer_id"]]["address"])
        if abs(amount) >= limit / 2:
            reason: str | None = "amount_over_half_limit"
        elif owner_head is None or owner_head != _zip_head(tx["location"]):
            reason = "location_too_far"
        elif balance + amount > limit:
            reason = "over_credit_limit"
        else:
            reason = None
        if reason is None:
            balance = self.balances[tx["card_id"]] = balance + amount
            self.decided[tid] = Decided(tx, "pending", balance, None, limit)
        else:
            self.decided[tid] = Decided(tx, "declined", balance, reason, limit)

    def settle(self) -> bool:
        """SPEC §4 over every decision so far, from the original inputs; False when nothing is new."""
        if self.settlement_id is not None and all(d.settlement_id is not None for d in self.decided.values()):
            return False
        self.settlement_id = (self.settlement_id or 0) + 1
        approved: dict[int, Decimal] = defaultdict(Decimal)
        for d in self.decided.values():
            if d.settlement_id is None:
                d.settlement_id = self.settlement_id
            if d.status == "pending":
                approved[d.tx["card_id"]] += d.tx["amount"]
        self.settled_balances = {i: c["current_balance"] + approved[i] for i, c in self.cards.items()}
        totals: dict[int, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
        for i, c in self.cards.items():
            totals[c["customer_id"]][0] += self.settled_balances[i]
            totals[c["customer_id"]][1] += c["credit_limit"]
        changes = {cid: _score_change(b, lim) for cid, (b, lim) in totals.items()}
        self.scores = {
            cid: max(300, min(850, c["credit_score"] + changes[cid])) if cid in changes else c["credit_score"]
            for cid, c in self.customers.items()
        }
        self.limits = {i: _new_limit(c["credit_limit"], changes[c["customer_id"]]) for i, c in self.cards.items()}
        return True

    # ----------------------------------------------------------------------------------------- views

    def card_view(self, card_id: int) -> dict[str, Any]:
        pending = [
            d
            for d in self.decided.values()
            if d.tx["card_id"] == card_id and d.status == "pending" and d.settlement_id is None
        ]
        amount = sum((d.tx["amount"] for d in pending), Decimal("0.00"))
        limit, settled = self.limits[card_id], self.settled_balances[card_id]
        return {
            "credit_limit": limit,
            "settled_balance": settled,
            "pending_amount": amount,
            "pending_count": len(pending),
            "available_credit": limit - settled - amount,
            "settlement_id": self.settlement_id,
        }

    def customer_view(self, customer_id: int) -> dict[str, Any]:
        return {
            "credit_score": self.scores[customer_id],
            "card_ids": sorted(i for i, c in self.cards.items() if c["customer_id"] == customer_id),
            "settlement_id": self.settlement_id,
        }

    def transaction_view(self, transaction_id: int) -> dict[str, Any]:
        d = self.decided[transaction_id]
        status = "approved" if d.status == "pending" and d.settlement_id is not None else d.status
        return {
            "status": status,
            "decline_reason": d.reason,
            "pending_balance": d.pending_balance if d.status != "rejected" else None,
            "credit_limit": d.credit_limit,
            "settlement_id": d.settlement_id,
        }
