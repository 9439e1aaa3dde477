"""Value checks of the domain, one definition per rule: the CSV loader and the topic's decoder use these.

Pure, no I/O. A refused value raises :class:`CheckError`, whose message is the reason alone, phrased to follow
"is" or to stand in parentheses after the value (``not a positive integer``): the caller names where the value
was (file, line and column, or the message's field) and shows it.

Numbers are plain ASCII decimal text: Python's ``int()`` and ``Decimal()`` also take ``1_000`` and digits of
other scripts (``٣``), which no issuer writes; these parsers do not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

#: ASCII whitespace, the only padding a number, a date or a timestamp may have.
WHITESPACE = " \t\n\r\f\v"
#: Ids are positive integers within SQL's BIGINT.
MAX_ID = 2**63 - 1
CREDIT_SCORE_MIN, CREDIT_SCORE_MAX = 300, 850
#: SPEC §1's transaction types.
TRANSACTION_TYPES = frozenset(
    {"purchase", "bill_payment", "atm_withdrawal", "p2p_transfer", "wire_transfer", "refund", "cancellation"}
)

#: Plain decimal: optional sign, ASCII digits, an optional fraction and an optional exponent (``1e-05``, as
#: float-based tools write). No underscore, no other script's digits, no ``NaN`` or ``Infinity``.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,9})?").fullmatch
#: An integer, also as a float-based tool writes it (``685.0``).
_INTEGER = re.compile(r"([+-]?[0-9]+)(?:\.0*)?").fullmatch
#: An id: unsigned (``-3`` and ``+3`` are not ids).
_ID = re.compile(r"([0-9]+)(?:\.0*)?").fullmatch
_DIGITS_OF_MAX_ID = len(str(MAX_ID))
#: Characters no text field may hold: C0 and C1 control characters, DEL, and lone surrogates (a byte that is
#: not UTF-8, read with ``surrogateescape``, or a JSON escape such as ``\ud800``).
FORBIDDEN_IN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_find_forbidden = FORBIDDEN_IN_TEXT.search
#: ``YYYY-MM-DD HH:MM:SS`` in ASCII digits, the canonical timestamp.
CANONICAL_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_canonical_timestamp = CANONICAL_TIMESTAMP.fullmatch
#: What ``strptime("%Y-%m-%d %H:%M:%S")`` takes too (one-digit fields), in ASCII digits.
_LENIENT_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2}) ([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})"
).fullmatch
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}").fullmatch
#: A card's expiration: ``MM/YY`` (or ``MM/YYYY``).
_EXPIRATION = re.compile(r"(?:0[1-9]|1[0-2])/(?:[0-9]{2}|[0-9]{4})").fullmatch


class CheckError(ValueError):
    """A value breaks a rule. The message is the reason only; ``column`` names the field a row rule blames."""

    def __init__(self, reason: str, column: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.column = column


# --- numbers ------------------------------------------------------------------------------------------------


def parse_decimal(text: str) -> Decimal:
    """A plain ASCII decimal number (surrounding ASCII whitespace allowed) as an exact ``Decimal``."""
    stripped = text.strip(WHITESPACE)
    if _DECIMAL(stripped) is None:
        raise CheckError("not a plain decimal number")
    try:
        return Decimal(stripped)
    except InvalidOperation:  # an exponent beyond what Decimal holds
        raise CheckError("out of range") from None


def parse_integer(text: str) -> int:
    """A plain ASCII integer (``685.0`` too); values beyond 19 digits are out of range (no column holds them)."""
    match = _INTEGER(text.strip(WHITESPACE))
    if match is None:
        raise CheckError("not an integer")
    digits = match.group(1)
    if len(digits.lstrip("+-0")) > _DIGITS_OF_MAX_ID:
        raise CheckError("out of range")
    return int(digits)


def check_id(value: int) -> int:
    """``value`` if it is an id: a positive integer up to :data:`MAX_ID`."""
    if not 0 < value <= MAX_ID:
        raise CheckError("not a positive integer" if value <= 0 else f"above the largest id {MAX_ID}")
    return value


def parse_id(text: str) -> int:
    """An id written as text: unsigned ASCII digits (``7``, ``0007``, ``7.0``), within 1..:data:`MAX_ID`."""
    match = _ID(text.strip(WHITESPACE))
    if match is None:
        raise CheckError("not a positive integer")
    digits = match.group(1).lstrip("0")
    if len(digits) > _DIGITS_OF_MAX_ID:
        raise CheckError(f"above the largest id {MAX_ID}")
    return check_id(int(digits or "0"))


# --- text, dates and times ----------------------------------------------------------------------------------


def text_problem(text: str) -> str | None:
    """Why ``text`` is not acceptable text (a control character, a byte that is not UTF-8), or None."""
    found = _find_forbidden(text)
    if found is None:
        return None
    char = found.group()
    if "\udc80" <= char <= "\udcff":  # surrogateescape's stand-in for a byte that is not UTF-8
        return f"not UTF-8 text: byte 0x{ord(char) - 0xDC00:02X}"
    if "\ud800" <= char <= "\udfff":
        return f"not valid Unicode text: lone surrogate U+{ord(char):04X}"
    return f"not plain text: control character U+{ord(char):04X}"


def check_text(text: str) -> str:
    """``text`` if it holds no control character and no byte that is not UTF-8."""
    problem = text_problem(text)
    if problem is not None:
        raise CheckError(problem)
    return text


def parse_timestamp(text: str, *, lenient: bool = False) -> datetime:
    """``YYYY-MM-DD HH:MM:SS`` (ASCII digits) as a real date and time.

    ``lenient``: also what ``strptime`` takes of that format (one-digit fields) and surrounding whitespace, as
    CSV files from other tools may hold; the topic's messages have the canonical form only.
    """
    if lenient:
        text = text.strip(WHITESPACE)
    if _canonical_timestamp(text):
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            raise CheckError("not a real date and time") from None
    match = _LENIENT_TIMESTAMP(text) if lenient else None
    if match is None:
        raise CheckError("not YYYY-MM-DD HH:MM:SS")
    year, month, day, hour, minute, second = map(int, match.groups())
    try:
        return datetime(year, month, day, hour, minute, second)
    except ValueError:
        raise CheckError("not a real date and time") from None


def parse_date(text: str) -> date:
    """``YYYY-MM-DD`` (ASCII digits, surrounding whitespace allowed) as a real calendar date."""
    stripped = text.strip(WHITESPACE)
    if _DATE(stripped) is None:
        raise CheckError("not YYYY-MM-DD")
    try:
        return date.fromisoformat(stripped)
    except ValueError:
        raise CheckError("not a real date") from None


# --- rules of single values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounds:
    """A number within ``low``..``high`` (either may be open: None); ``above``: strictly greater than ``low``."""

    low: int | Decimal | None = None
    high: int | Decimal | None = None
    above: bool = False

    @property
    def reason(self) -> str:
        if self.high is None:
            return f"not above {self.low}" if self.above else f"below {self.low}"
        return f"not within {self.low}..{self.high}"

    def holds_for_all(self, values: Iterable[Any]) -> bool:
        """Whether every one of ``values`` (numbers) is within the bounds (True for none)."""
        seen = list(values)
        if not seen:
            return True
        low, high = min(seen), max(seen)
        if self.low is not None and (low <= self.low if self.above else low < self.low):
            return False
        return self.high is None or high <= self.high

    def check(self, value: Any) -> Any:
        if not self.holds_for_all((value,)):
            raise CheckError(self.reason)
        return value


@dataclass(frozen=True, slots=True)
class OneOf:
    """A text among ``choices``."""

    choices: frozenset[str]

    @property
    def reason(self) -> str:
        return f"not one of {', '.join(sorted(self.choices))}"

    def holds_for_all(self, values: Iterable[Any]) -> bool:
        return self.choices.issuperset(values)

    def check(self, value: Any) -> Any:
        if value not in self.choices:
            raise CheckError(self.reason)
        return value


@dataclass(frozen=True, slots=True)
class Shape:
    """A text of a fixed shape (a regular expression's ``fullmatch``), described by ``reason``."""

    fullmatch: Any
    reason: str

    def holds_for_all(self, values: Iterable[Any]) -> bool:
        return all(map(self.fullmatch, values))

    def check(self, value: Any) -> Any:
        if not self.fullmatch(value):
            raise CheckError(self.reason)
        return value


Rule = Bounds | OneOf | Shape

ID = Bounds(1, MAX_ID)
CREDIT_SCORE = Bounds(CREDIT_SCORE_MIN, CREDIT_SCORE_MAX)
POSITIVE = Bounds(0, above=True)
NON_NEGATIVE = Bounds(0)
TRANSACTION_TYPE = OneOf(TRANSACTION_TYPES)
EXPIRATION = Shape(_EXPIRATION, "not MM/YY")


def check_transaction_type(text: str) -> str:
    """``text`` if it is one of SPEC's seven transaction types."""
    return str(TRANSACTION_TYPE.check(text))


#: Integer columns holding ids (positive), in every input table.
ID_COLUMNS = frozenset({"customer_id", "card_type_id", "card_id", "transaction_id", "related_transaction_id"})
#: Input table -> column -> the rule its values follow (beyond their type's: ids, plain numbers, DECIMAL(12,2)
#: money, real dates, text without control characters).
COLUMN_RULES: Mapping[str, Mapping[str, Rule]] = {
    "credit_card_types": {
        "credit_score_min": CREDIT_SCORE,
        "credit_score_max": CREDIT_SCORE,
        "credit_limit_min": POSITIVE,
        "credit_limit_max": POSITIVE,
        "annual_fee": NON_NEGATIVE,
        "rewards_rate": NON_NEGATIVE,
    },
    "customers": {"credit_score": CREDIT_SCORE, "annual_income": NON_NEGATIVE},
    "cards": {"credit_limit": POSITIVE, "expiration_date": EXPIRATION},
    "transactions": {"transaction_type": TRANSACTION_TYPE},
}


# --- rules of whole rows ------------------------------------------------------------------------------------


def check_card_type(row: Mapping[str, Any]) -> None:
    """A card type's minimums are not above its maximums (credit score, credit limit)."""
    for low, high in (("credit_score_min", "credit_score_max"), ("credit_limit_min", "credit_limit_max")):
        if row[low] > row[high]:
            raise CheckError(f"above {high} {row[high]}", column=low)


#: Input table -> (the columns a row rule reads, the rule).
ROW_RULES: Mapping[str, tuple[tuple[tuple[str, ...], Any], ...]] = {
    "credit_card_types": (
        (("credit_score_min", "credit_score_max", "credit_limit_min", "credit_limit_max"), check_card_type),
    ),
}
