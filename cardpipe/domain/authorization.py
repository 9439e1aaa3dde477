"""Real-time authorization rules (SPEC §3). Pure functions plus a small per-card state holder."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    DECLINED,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    PENDING,
    CardProfile,
    Decision,
    Transaction,
)

MIN_ZIP_LENGTH = 5


def zip_of(text: str | None) -> str | None:
    """The zip code of an address or location: its last whitespace-separated token."""
    if not text:
        return None
    tokens = text.split()
    return tokens[-1] if tokens else None


def location_ok(customer_zip: str | None, merchant_zip: str | None) -> bool:
    """Both zips present, at least 5 characters, and starting with the same character."""
    if not customer_zip or not merchant_zip:
        return False
    if len(customer_zip) < MIN_ZIP_LENGTH or len(merchant_zip) < MIN_ZIP_LENGTH:
        return False
    return customer_zip[0] == merchant_zip[0]


def decline_reason(amount: Decimal, location: str, card: CardProfile, pending_balance: Decimal) -> str | None:
    """The first rule the transaction fails, in SPEC order, or ``None`` when it may go pending."""
    if abs(amount) >= card.credit_limit / 2:
        return AMOUNT_OVER_HALF_LIMIT
    if not location_ok(card.customer_zip, zip_of(location)):
        return LOCATION_TOO_FAR
    if pending_balance + amount > card.credit_limit:
        return OVER_CREDIT_LIMIT
    return None


def decide(tx: Transaction, card: CardProfile, pending_balance: Decimal) -> Decision:
    """Authorize one transaction against its card's pending balance."""
    reason = decline_reason(tx.amount, tx.location, card, pending_balance)
    if reason is not None:
        return Decision(DECLINED, pending_balance, reason)
    return Decision(PENDING, pending_balance + tx.amount)


class Authorizer:
    """Decides transactions in arrival order, keeping each card's running pending balance.

    State is per card only (memory bounded by the number of cards, not of transactions).
    """

    def __init__(self, cards: Mapping[int, CardProfile], balances: Mapping[int, Decimal]):
        self.cards = cards
        self.balances: dict[int, Decimal] = dict(balances)

    def knows(self, card_id: int) -> bool:
        return card_id in self.cards

    def authorize(self, tx: Transaction) -> Decision:
        """Decide ``tx`` (its card must be known) and update the card's pending balance."""
        card = self.cards[tx.card_id]
        decision = decide(tx, card, self.balances[tx.card_id])
        if decision.status == PENDING:
            self.balances[tx.card_id] = decision.pending_balance
        return decision
