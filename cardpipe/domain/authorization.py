"""Real-time authorization rules (SPEC §3). Pure functions plus a small per-card state holder."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal

from cardpipe.domain.money import to_cents
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
#: Locations whose zip head :class:`Authorizer` remembers (merchants' locations repeat); then it starts over.
_MAX_REMEMBERED_LOCATIONS = 50_000
_UNSEEN = object()


def zip_of(text: str | None) -> str | None:
    """The zip code of an address or location: its last whitespace-separated token."""
    if not text:
        return None
    tokens = text.rsplit(None, 1)
    return tokens[-1] if tokens else None


def zip_head(zip_code: str | None) -> str | None:
    """What the location rule compares of a zip: its first character, if it has at least 5; else None."""
    return zip_code[0] if zip_code and len(zip_code) >= MIN_ZIP_LENGTH else None


def location_ok(customer_zip: str | None, merchant_zip: str | None) -> bool:
    """Both zips present, at least 5 characters, and starting with the same character."""
    head = zip_head(customer_zip)
    return head is not None and head == zip_head(merchant_zip)


def _decline_reason(
    amount: Decimal,
    merchant_zip_head: str | None,
    credit_limit: Decimal,
    half_limit: Decimal,
    customer_zip_head: str | None,
    pending_balance: Decimal,
) -> str | None:
    """The rules, in SPEC order, on a card's terms as :class:`Authorizer` keeps them (computed once per card)
    and the zip head of the transaction's location."""
    if abs(amount) >= half_limit:
        return AMOUNT_OVER_HALF_LIMIT
    if customer_zip_head is None or customer_zip_head != merchant_zip_head:
        return LOCATION_TOO_FAR
    if pending_balance + amount > credit_limit:
        return OVER_CREDIT_LIMIT
    return None


#: What the rules read of a card: (credit limit, half of it exactly, the owner's zip head, the limit in integer
#: cents or None when it is not whole cents).
CardTerms = tuple[Decimal, Decimal, str | None, int | None]


def _terms(card: CardProfile) -> CardTerms:
    limit = card.credit_limit
    return limit, limit / 2, zip_head(card.customer_zip), to_cents(limit)


def decline_reason(amount: Decimal, location: str, card: CardProfile, pending_balance: Decimal) -> str | None:
    """The first rule the transaction fails, in SPEC order, or ``None`` when it may go pending."""
    return _decline_reason(amount, zip_head(zip_of(location)), *_terms(card)[:3], pending_balance)


def decide(tx: Transaction, card: CardProfile, pending_balance: Decimal) -> Decision:
    """Authorize one transaction against its card's pending balance."""
    reason = decline_reason(tx.amount, tx.location, card, pending_balance)
    if reason is not None:
        return Decision(DECLINED, pending_balance, reason)
    return Decision(PENDING, pending_balance + tx.amount)


#: Loads cards on demand: for card ids, each known one's profile (its limits now) and its pending balance.
CardLoader = Callable[[list[int]], Mapping[int, tuple[CardProfile, Decimal]]]


class Authorizer:
    """Decides transactions in arrival order, keeping each card's running pending balance.

    State is per card only (memory bounded by the number of cards, not of transactions). Each card's
    terms (limit, half limit, zip head) are computed once, not per transaction.

    The cards are given up front (``cards`` and ``balances``), or, with ``load``, read as they first come:
    :meth:`prepare` loads the cards of a batch not seen yet, so a consumer starts deciding at once however many
    cards there are.
    """

    def __init__(
        self, cards: Mapping[int, CardProfile], balances: Mapping[int, Decimal], *, load: CardLoader | None = None
    ):
        self.balances: dict[int, Decimal] = dict(balances)
        self._terms = {card_id: _terms(card) for card_id, card in cards.items()}
        self._load = load
        self._unknown: set[int] = set()  # loaded and not found
        self._zip_heads: dict[str, str | None] = {}  # location -> zip head, a memo of a pure function

    def knows(self, card_id: int) -> bool:
        return card_id in self._terms

    def terms_of(self, card_ids: Iterable[int]) -> list[CardTerms | None]:
        """What each card of ``card_ids`` is judged by now (:data:`CardTerms`); None for a card not known."""
        return list(map(self._terms.get, card_ids))

    def limit_of(self, card_id: int) -> Decimal:
        """The credit limit ``card_id`` is judged against now."""
        return self._terms[card_id][0]

    def prepare(self, card_ids: Iterable[int]) -> int:
        """Load the cards among ``card_ids`` not seen yet (with ``load``; else nothing to do). A card's balance
        is read only the first time: later loads (after :meth:`adopt`) bring its new limits. How many were read."""
        if self._load is None:
            return 0
        terms, unknown = self._terms, self._unknown
        # One argument each: a set's difference with a dict or set looks its own members up (not the other's).
        missing = sorted(set(card_ids).difference(terms).difference(unknown))
        if not missing:
            return 0
        found = self._load(missing)
        for card_id in missing:
            entry = found.get(card_id)
            if entry is None:
                unknown.add(card_id)
                continue
            profile, balance = entry
            terms[card_id] = _terms(profile)
            self.balances.setdefault(card_id, balance)
        return len(missing)

    def adopt(self, cards: Mapping[int, CardProfile] | None = None) -> None:
        """Judge by ``cards`` (new limits after a settlement) from now on, or, with ``load``, by the cards as it
        loads them from now on; pending balances carry on."""
        if cards is None:
            if self._load is None:
                raise ValueError("adopt() without cards needs a loader")
            self._terms, self._unknown = {}, set()
        else:
            self._terms = {card_id: _terms(card) for card_id, card in cards.items()}

    def decide(self, card_id: int, amount: Decimal, location: str) -> tuple[str, Decimal, str | None] | None:
        """``(status, pending balance after, decline reason)`` for a transaction of ``card_id``, updating the
        card's pending balance; None (and no change) when the card is unknown. The stream's hot path."""
        terms = self._terms.get(card_id)
        if terms is None:
            return None
        limit, half_limit, customer_zip_head, _ = terms
        balance = self.balances[card_id]
        heads = self._zip_heads
        head = heads.get(location, _UNSEEN)
        if head is _UNSEEN:
            if len(heads) >= _MAX_REMEMBERED_LOCATIONS:
                heads.clear()
            head = heads[location] = zip_head(zip_of(location))
        reason = _decline_reason(amount, head, limit, half_limit, customer_zip_head, balance)  # type: ignore[arg-type]
        if reason is not None:
            return DECLINED, balance, reason
        balance = self.balances[card_id] = balance + amount
        return PENDING, balance, None

    def authorize(self, tx: Transaction) -> Decision:
        """Decide ``tx`` (its card must be known) and update the card's pending balance."""
        outcome = self.decide(tx.card_id, tx.amount, tx.location)
        if outcome is None:
            raise KeyError(tx.card_id)
        return Decision(*outcome)
