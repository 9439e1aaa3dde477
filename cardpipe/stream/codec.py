"""The topic's message format (SPEC §3), pure: no I/O.

key   = card_id as UTF-8 text
value = UTF-8 JSON object with the CSV's column names; ``amount`` a decimal string (a JSON number is
        accepted too), ``timestamp`` ``YYYY-MM-DD HH:MM:SS``, an empty related id as null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from cardpipe.domain.money import MoneyError, parse_money
from cardpipe.domain.records import TIMESTAMP_FORMAT, Transaction

#: Messages larger than this are rejected unread (a transaction is a few hundred bytes).
MAX_MESSAGE_BYTES = 64 * 1024
_TEXT_LIMITS = {"merchant_name": 255, "location": 512, "transaction_type": 32}
_MAX_ID = 2**63 - 1
_MAX_ID_DIGITS = 19

# Reason codes for messages the rules cannot judge.
EMPTY_MESSAGE = "empty_message"
OVERSIZED_MESSAGE = "oversized_message"
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
BAD_TRANSACTION_ID = "bad_transaction_id"
BAD_CARD_ID = "bad_card_id"
BAD_AMOUNT = "bad_amount"
BAD_TIMESTAMP = "bad_timestamp"
BAD_FIELD = "bad_field"
UNKNOWN_CARD = "unknown_card"
DUPLICATE_CONFLICT = "duplicate_conflict"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message could not be judged. ``transaction_id`` when it could be read."""

    reason: str
    detail: str
    transaction_id: int | None = None


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _BadNumber:
    """Stands for a number literal no Decimal can hold (NaN, Infinity, 1e99999999999999999999), so the
    field that holds it gets the blame rather than the whole message."""

    def __init__(self, text: str):
        self.text = text


def _decimal(text: str) -> Decimal | _BadNumber:
    try:
        value = Decimal(text)
    except ArithmeticError:
        return _BadNumber(text[:40])
    return value if value.is_finite() else _BadNumber(text[:40])


def encode_transaction(tx: Transaction) -> tuple[bytes, bytes]:
    """The (key, value) of ``tx`` on the topic."""
    value = {
        "transaction_id": tx.transaction_id,
        "card_id": tx.card_id,
        "merchant_name": tx.merchant_name,
        "timestamp": tx.timestamp.strftime(TIMESTAMP_FORMAT),
        "amount": str(tx.amount),
        "location": tx.location,
        "transaction_type": tx.transaction_type,
        "related_transaction_id": tx.related_transaction_id,
    }
    return str(tx.card_id).encode(), json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def decode_transaction(value: bytes | None) -> Transaction | Rejection:
    """Parse and validate a message value; never raises."""
    if not value:
        return Rejection(EMPTY_MESSAGE, "message has no value")
    if len(value) > MAX_MESSAGE_BYTES:
        return Rejection(OVERSIZED_MESSAGE, f"message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(NOT_UTF8, f"value is not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        obj = json.loads(text, parse_float=_decimal, parse_constant=_BadNumber)
    except (ValueError, RecursionError, ArithmeticError) as exc:
        # ArithmeticError: a number literal no Decimal can hold (e.g. 1e99999999999999999999).
        return Rejection(NOT_JSON, f"value is not JSON ({str(exc)[:120] or type(exc).__name__})")
    if not isinstance(obj, dict):
        kind = "number" if isinstance(obj, _BadNumber) else type(obj).__name__
        return Rejection(NOT_AN_OBJECT, f"value is a JSON {kind}, not an object")
    tx_id: int | None = None
    try:
        tx_id = _id(obj, "transaction_id", BAD_TRANSACTION_ID)
        card_id = _id(obj, "card_id", BAD_CARD_ID)
        return Transaction(
            transaction_id=tx_id,
            card_id=card_id,
            merchant_name=_text(obj, "merchant_name"),
            timestamp=_timestamp(obj),
            amount=_amount(obj),
            location=_text(obj, "location"),
            transaction_type=_text(obj, "transaction_type", allow_empty=False),
            related_transaction_id=_optional_id(obj, "related_transaction_id"),
        )
    except _Invalid as exc:
        return Rejection(exc.reason, exc.detail, tx_id)


def _field(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise _Invalid(MISSING_FIELD, f"field {name!r} is missing")
    return obj[name]


def _parse_id(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and 0 < len(text := raw.strip()) <= _MAX_ID_DIGITS and text.isascii() \
            and text.isdigit():
        value = int(text)
    elif isinstance(raw, Decimal) and raw.is_finite() and raw.adjusted() < _MAX_ID_DIGITS \
            and raw == raw.to_integral_value():
        value = int(raw)  # the exponent check keeps 1e1000000 from becoming a million-digit int
    else:
        return None
    return value if 0 < value <= _MAX_ID else None


def _id(obj: dict[str, Any], name: str, reason: str) -> int:
    raw = _field(obj, name)
    value = _parse_id(raw)
    if value is None:
        raise _Invalid(reason, f"{name} {_show(raw)} is not a positive integer")
    return value


def _optional_id(obj: dict[str, Any], name: str) -> int | None:
    raw = obj.get(name)
    if raw is None or raw == "":
        return None
    value = _parse_id(raw)
    if value is None:
        raise _Invalid(BAD_FIELD, f"{name} {_show(raw)} is not a positive integer")
    return value


def _text(obj: dict[str, Any], name: str, *, allow_empty: bool = True) -> str:
    raw = _field(obj, name)
    if not isinstance(raw, str):
        raise _Invalid(BAD_FIELD, f"{name} {_show(raw)} is not a string")
    if not allow_empty and not raw.strip():
        raise _Invalid(BAD_FIELD, f"{name} is empty")
    if len(raw) > _TEXT_LIMITS[name]:
        raise _Invalid(BAD_FIELD, f"{name} is longer than {_TEXT_LIMITS[name]} characters")
    if "\x00" in raw:
        raise _Invalid(BAD_FIELD, f"{name} contains a NUL character")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
        raise _Invalid(BAD_FIELD, f"{name} is not valid Unicode text") from None
    return raw


def _timestamp(obj: dict[str, Any]) -> datetime:
    raw = _field(obj, "timestamp")
    if not isinstance(raw, str):
        raise _Invalid(BAD_TIMESTAMP, f"timestamp {_show(raw)} is not a string")
    # fromisoformat is fast; the shape check keeps it to exactly YYYY-MM-DD HH:MM:SS (no offset, no 'T').
    if (len(raw) == 19 and raw.isascii() and raw[4] == "-" and raw[7] == "-" and raw[10] == " "
            and raw[13] == ":" and raw[16] == ":"
            and (raw[:4] + raw[5:7] + raw[8:10] + raw[11:13] + raw[14:16] + raw[17:]).isdigit()):
        try:
            return datetime.fromisoformat(raw)
        except ValueError:
            pass
    raise _Invalid(BAD_TIMESTAMP, f"timestamp {_show(raw)} is not YYYY-MM-DD HH:MM:SS")


def _amount(obj: dict[str, Any]) -> Decimal:
    raw = _field(obj, "amount")
    if isinstance(raw, _BadNumber):
        raise _Invalid(BAD_AMOUNT, f"amount {raw.text} is not a finite number")
    try:
        return parse_money(raw)
    except MoneyError as exc:
        raise _Invalid(BAD_AMOUNT, str(exc)) from None


def _show(raw: Any) -> str:
    if isinstance(raw, _BadNumber):
        return raw.text
    text = json.dumps(raw, default=str, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."

