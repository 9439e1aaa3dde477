"""The settlement rules of SPEC §4 as SQL expression text (DuckDB's dialect), built from the domain's constants.

One source of truth: every threshold, change and factor comes from :mod:`cardpipe.domain.settlement` and
:mod:`cardpipe.domain.records`, exactly as the Spark job's column expressions do. Each function takes the SQL
text of its operands (column names or expressions) and returns an expression; all arithmetic is exact
DECIMAL (never DOUBLE):

* utilization is compared without division, ``balance * 100 <= bound * limit``;
* the new limit is ``limit * factor`` rounded half to even to the hundred, as Python's ``round(x, -2)`` on a
  ``Decimal``. DuckDB's ``round_even`` returns a DOUBLE, so the rounding is spelt out on decimals:
  ``floor`` of the value in hundreds, plus one when the rest is above a half, or exactly a half and the
  floor odd.
"""

from __future__ import annotations

from decimal import Decimal

from cardpipe.domain.records import APPROVED, PENDING
from cardpipe.domain.settlement import (
    LIMIT_FACTOR_OTHER_NEGATIVE,
    LIMIT_FACTOR_STEPS,
    SCORE_CHANGE_ABOVE,
    SCORE_MAX,
    SCORE_MIN,
    SCORE_STEPS,
)

#: Money as stored (SPEC §2).
MONEY = "DECIMAL(12,2)"
#: Sums of money (a card's balance plus its approved amounts, a customer's totals).
MONEY_SUM = "DECIMAL(18,2)"


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_decimal(value: Decimal, sql_type: str | None = None) -> str:
    """An exact DECIMAL literal: of ``sql_type``, or of ``value``'s own precision and scale."""
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite decimal: {value}")
    if sql_type is None:
        scale = max(0, -exponent)
        sql_type = f"DECIMAL({max(len(digits), scale + 1)},{scale})"
    return f"CAST({sql_string(str(value))} AS {sql_type})"


def _factor_type() -> str:
    """One DECIMAL type holding every credit-limit factor exactly."""
    factors = [f for _, f in LIMIT_FACTOR_STEPS] + [LIMIT_FACTOR_OTHER_NEGATIVE]
    scale = max(max(0, -int(f.as_tuple().exponent)) for f in factors)
    integer_digits = max(max(1, f.adjusted() + 1) for f in factors)
    return f"DECIMAL({integer_digits + scale},{scale})"


FACTOR = _factor_type()


def money(value: str) -> str:
    """A money column as exact DECIMAL(12,2). SQLite hands its NUMERIC columns over as DOUBLE; they hold
    exact cents, so rounding the double to two places then casting gives back the stored amount exactly
    (on a DECIMAL column both steps change nothing)."""
    return f"CAST(ROUND({value}, 2) AS {MONEY})"


def settled_status(status: str) -> str:
    """:func:`cardpipe.domain.settlement.settled_status`: pending becomes approved; the rest stay."""
    return f"(CASE WHEN {status} = {sql_string(PENDING)} THEN {sql_string(APPROVED)} ELSE {status} END)"


def score_change(total_balance: str, total_limit: str) -> str:
    """:func:`cardpipe.domain.settlement.score_change`: a CASE chain over ``SCORE_STEPS``, compared without
    division; a customer whose cards have no limit counts as 0 % used if it owes nothing, else as over every
    bound. An INTEGER."""
    first_change = SCORE_STEPS[0][1]
    whens = [
        f"WHEN {total_limit} <= 0 THEN "
        f"(CASE WHEN {total_balance} <= 0 THEN {first_change} ELSE {SCORE_CHANGE_ABOVE} END)"
    ]
    whens += [f"WHEN {total_balance} * 100 <= {bound} * {total_limit} THEN {change}" for bound, change in SCORE_STEPS]
    return f"CAST((CASE {' '.join(whens)} ELSE {SCORE_CHANGE_ABOVE} END) AS INTEGER)"


def new_credit_score(score: str, change: str) -> str:
    """:func:`cardpipe.domain.settlement.new_credit_score`: ``score + change`` kept within the bounds."""
    return f"CAST(greatest({SCORE_MIN}, least({SCORE_MAX}, {score} + {change})) AS INTEGER)"


def limit_factor(change: str) -> str:
    """:func:`cardpipe.domain.settlement.limit_factor`: NULL (limit unchanged) unless the change is
    negative."""
    whens = [f"WHEN {change} >= 0 THEN CAST(NULL AS {FACTOR})"]
    whens += [f"WHEN {change} <= {bound} THEN {sql_decimal(f, FACTOR)}" for bound, f in LIMIT_FACTOR_STEPS]
    return f"(CASE {' '.join(whens)} ELSE {sql_decimal(LIMIT_FACTOR_OTHER_NEGATIVE, FACTOR)} END)"


def round_to_hundred_half_even(value: str) -> str:
    """:func:`cardpipe.domain.money.round_to_hundred_half_even` of a DECIMAL expression, exactly, as
    DECIMAL(12,2)."""
    hundreds = f"(({value}) * {sql_decimal(Decimal('0.01'))})"
    whole = f"floor({hundreds})"
    rest = f"({hundreds} - {whole})"
    half = sql_decimal(Decimal("0.5"))
    up = f"(CASE WHEN {rest} > {half} OR ({rest} = {half} AND {whole} % 2 <> 0) THEN 1 ELSE 0 END)"
    return f"CAST(({whole} + {up}) * 100 AS {MONEY})"


def new_credit_limit(limit: str, factor: str) -> str:
    """:func:`cardpipe.domain.settlement.new_credit_limit` given the factor (:func:`limit_factor`):
    ``limit * factor`` rounded half to even to the hundred, or the limit itself when the factor is NULL."""
    return (
        f"(CASE WHEN {factor} IS NULL THEN CAST({limit} AS {MONEY}) "
        f"ELSE {round_to_hundred_half_even(f'{limit} * {factor}')} END)"
    )
