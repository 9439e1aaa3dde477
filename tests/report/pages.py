"""Reading the numbers a report page shows."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any


def shown_equals(text: str, value: Any) -> bool:
    """Whether ``text``, as the page shows it (``1,234.5``, ``yes``, ``–``), is ``value`` of run.json, to the
    digits shown."""
    text = text.strip()
    if value is None:
        return text == "–"
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    try:
        shown, exact = Decimal(text.replace(",", "")), Decimal(str(value))
    except InvalidOperation:
        return False
    return abs(shown - exact) <= Decimal(1).scaleb(shown.as_tuple().exponent) / 2
