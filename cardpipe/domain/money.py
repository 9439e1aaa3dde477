"""Exact money: ``Decimal`` cents, never binary floats."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal

from cardpipe.domain.checks import CheckError, parse_decimal

CENT = Decimal("0.01")
HUNDRED = Decimal(100)
_HUNDREDS_PLACE = Decimal("1E2")
#: Largest magnitude a DECIMAL(12,2) column holds.
MAX_MONEY = Decimal("9999999999.99")
#: The common shape, ``-?D{1,10}.DD`` in ASCII digits: exactly cents, within MAX_MONEY, so ``Decimal(text)`` is
#: already what the general path below returns (same value, same exponent).
_PLAIN_CENTS = re.compile(r"-?[0-9]{1,10}\.[0-9]{2}").fullmatch


class MoneyError(CheckError):
    """A value is not a valid amount of money."""


def to_cents(amount: Decimal) -> int | None:
    """Money as integer cents, exactly; None when it is not a whole number of cents (or not finite)."""
    if not amount.is_finite():
        return None
    scaled = amount.scaleb(2)
    return int(scaled) if scaled == scaled.to_integral_value() else None


def from_cents(cents: int) -> Decimal:
    """Integer cents as money with two decimals (``from_cents(-5) == Decimal("-0.05")``)."""
    return Decimal(cents).scaleb(-2)


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
        try:
            amount = parse_decimal(value)  # plain ASCII decimal: not "1_000", not other scripts' digits
        except CheckError as exc:
            raise MoneyError(f"amount {value[:40]!r} is {exc.reason}") from None
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

    Used for CSV inputs whose money columns came from floats; raises :class:`MoneyError` (its message the
    reason alone, as :class:`~cardpipe.domain.checks.CheckError`'s) on anything else.
    """
    try:
        amount = parse_decimal(text)
    except CheckError as exc:
        raise MoneyError(exc.reason) from None
    if amount.adjusted() > MAX_MONEY.adjusted() or abs(amount) > MAX_MONEY:  # exponent first: 1e999999999
        raise MoneyError("out of range for DECIMAL(12,2)")
    cents = amount.quantize(CENT, rounding=ROUND_HALF_EVEN)
    if abs(cents) > MAX_MONEY:  # half-even rounding can carry 9999999999.995 over the top
        raise MoneyError("out of range for DECIMAL(12,2)")
    return cents


def round_to_hundred_half_even(amount: Decimal) -> Decimal:
    """Round to the nearest 100, halves to even, as Python's ``round(x, -2)``; result has cents scale."""
    return amount.quantize(_HUNDREDS_PLACE, rounding=ROUND_HALF_EVEN).quantize(CENT)


def format_money(amount: Decimal | None) -> str:
    """Two decimals, as in the output files; empty for ``None``."""
    return "" if amount is None else f"{amount.quantize(CENT)}"
