"""The domain's records. Plain immutable values: no I/O, no framework types."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from cardpipe.domain.checks import CANONICAL_TIMESTAMP as CANONICAL_TIMESTAMP  # re-exported

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
#: ``CANONICAL_TIMESTAMP`` (``TIMESTAMP_FORMAT``'s canonical text in ASCII digits, for ``fullmatch``): on it,
#: ``datetime.fromisoformat`` (several times faster) parses exactly as ``strptime(TIMESTAMP_FORMAT)`` does.

TRANSACTION_COLUMNS = (
    "transaction_id",
    "card_id",
    "merchant_name",
    "timestamp",
    "amount",
    "location",
    "transaction_type",
    "related_transaction_id",
)
STREAM_COLUMNS = (*TRANSACTION_COLUMNS, "status", "pending_balance", "decline_reason")
CUSTOMER_COLUMNS = (
    "customer_id",
    "name",
    "phone_number",
    "address",
    "email",
    "credit_score",
    "annual_income",
)
CARD_TYPE_COLUMNS = (
    "card_type_id",
    "name",
    "credit_score_min",
    "credit_score_max",
    "credit_limit_min",
    "credit_limit_max",
    "annual_fee",
    "rewards_rate",
)
CARD_COLUMNS = (
    "card_id",
    "customer_id",
    "card_type_id",
    "card_number",
    "expiration_date",
    "credit_limit",
    "current_balance",
    "issue_date",
)

# Transaction statuses.
PENDING = "pending"
DECLINED = "declined"
REJECTED = "rejected"
APPROVED = "approved"

# Decline reasons (SPEC §3, in the order the rules are checked).
AMOUNT_OVER_HALF_LIMIT = "amount_over_half_limit"
LOCATION_TOO_FAR = "location_too_far"
OVER_CREDIT_LIMIT = "over_credit_limit"
#: The one rejection reason a decision row carries: a well-formed transaction of a card the serving data does not
#: know (status ``rejected``); every other rejection goes to ``rejected_transactions`` only.
UNKNOWN_CARD = "unknown_card"

#: Columns only cardpipe's own rules write, with codes from closed sets of lower-case identifiers (the statuses,
#: the decline and rejection reasons): never a comma, quote or line break, so never quoted in a CSV. (Input
#: columns, even the checked transaction type, are quoted where needed: a database may be filled otherwise.)
CODE_COLUMNS = frozenset({"status", "decline_reason"})

#: ISO 8583 response codes (field 39) beside each decision: what a card network would answer.
RESPONSE_CODES = {
    OVER_CREDIT_LIMIT: "51",  # insufficient funds / over limit
    AMOUNT_OVER_HALF_LIMIT: "61",  # exceeds withdrawal amount limit
    LOCATION_TOO_FAR: "59",  # suspected fraud
}
APPROVED_CODE = "00"  # approved (pending settlement, or settled)
REJECTED_CODE = "30"  # format error: input the rules cannot judge


def response_code(status: str, decline_reason: str | None) -> str:
    """The ISO 8583 response code of a decision (``status`` pending, approved, declined or rejected)."""
    if status == DECLINED:
        return RESPONSE_CODES.get(decline_reason or "", "05")  # 05: do not honour (a reason SPEC does not name)
    return REJECTED_CODE if status == REJECTED else APPROVED_CODE


@dataclass(frozen=True, slots=True)
class Transaction:
    """One card transaction as published on the topic."""

    transaction_id: int
    card_id: int
    merchant_name: str
    timestamp: datetime
    amount: Decimal
    location: str
    transaction_type: str
    related_transaction_id: int | None = None

    @property
    def timestamp_text(self) -> str:
        return self.timestamp.strftime(TIMESTAMP_FORMAT)

    def values(self) -> tuple[int, int, str, datetime, Decimal, str, str, int | None]:
        """The fields in ``TRANSACTION_COLUMNS`` order (``Transaction(*tx.values()) == tx``)."""
        return (
            self.transaction_id,
            self.card_id,
            self.merchant_name,
            self.timestamp,
            self.amount,
            self.location,
            self.transaction_type,
            self.related_transaction_id,
        )


@dataclass(frozen=True, slots=True)
class CardProfile:
    """What authorization needs to know about a card: its limit and its owner's zip."""

    card_id: int
    credit_limit: Decimal
    customer_zip: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of authorizing one transaction."""

    status: str  # PENDING or DECLINED
    pending_balance: Decimal  # the card's pending balance after this decision
    reason: str | None = None  # first failing rule when declined


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: int
    credit_score: int


@dataclass(frozen=True, slots=True)
class Card:
    card_id: int
    customer_id: int
    credit_limit: Decimal
    current_balance: Decimal
