"""Exact money: ``Decimal`` cents, never binary floats."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

CENT = Decimal("0.01")
HUNDRED = Decimal(100)
_HUNDREDS_PLACE = Decimal("1E2")
#: Largest magnitude a DECIMAL(12,2) column holds.
MAX_MONEY = Decimal("9999999999.99")
#: The common shape, ``-?D{1,10}.DD`` in ASCII digits: exactly cents, within MAX_MONEY, so ``Decimal(text)`` is
#: already what the general path below returns (same value, same exponent).
_PLAIN_CENTS = re.compile(r"-?[0-9]{1,10}\.[0-9]{2}").fullmatch


class MoneyError(ValueError):
    """A value is not a valid amount of money."""


def parse_money(value: object) -> Decimal:
    """Parse a money value (decimal string, int or Decimal) to exact cents.

    Accepts at most two decimal places after stripping trailing zeros; rejects floats (use their
    text), NaN, infinities and magnitudes a DECIMAL(12,2) cannot hold.
    """
    if type(value) is str and _PLAIN_CENTS(value):  # the fast path of the stream's hot loop
        return Decimal(value)
    if isinstance(value, bool | float):
        raise MoneyError(f"amount must be a decimal string or number, not {type(value).__name__}")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text.isascii() or "_" in text:  # Decimal() also takes "1_000" and non-ASCII digits
            raise MoneyError(f"amount {value[:40]!r} is not a plain decimal number")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise MoneyError(f"amount {value[:40]!r} is not a number") from None
    else:
        raise MoneyError(f"amount must be a decimal string or number, not {type(value).__name__}")
    if not amount.is_finite():
        raise MoneyError(f"amount {amount} is not finite")
    if amount.adjusted() > MAX_MONEY.adjusted() or abs(amount) > MAX_MONEY:  # exponent first: 1e1000000
        raise MoneyError(f"amount {amount:.2E} is out of range")
    cents = amount.quantize(CENT)
    if cents != amount:
        raise MoneyError(f"amount {amount} has more than two decimal places")
    return cents


def parse_money_lenient(text: str) -> Decimal:
    """Parse money written by a float-based system (``-95.11000000000001``): round half-even to cents.

    Used for CSV inputs whose money columns came from floats; raises :class:`MoneyError` on garbage.
    """
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise MoneyError(f"{text[:40]!r} is not a number") from None
    if not amount.is_finite() or abs(amount) > MAX_MONEY:
        raise MoneyError(f"{text[:40]!r} is out of range")
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)


def round_to_hundred_half_even(amount: Decimal) -> Decimal:
    """Round to the nearest 100, halves to even, as Python's ``round(x, -2)``; result has cents scale."""
    return amount.quantize(_HUNDREDS_PLACE, rounding=ROUND_HALF_EVEN).quantize(CENT)


def format_money(amount: Decimal | None) -> str:
    """Two decimals, as in the output files; empty for ``None``."""
    return "" if amount is None else f"{amount.quantize(CENT)}"
