"""The topic's message format (SPEC §3), pure: no I/O.

key   = card_id as UTF-8 text
value = UTF-8 JSON object with the CSV's column names; ``amount`` a decimal string (a JSON number is
        accepted too), ``timestamp`` ``YYYY-MM-DD HH:MM:SS``, an empty related id as null.

Decoding has two paths with one meaning. The strict path (the standard library's ``json``, amounts and
other non-integer numbers read as exact ``Decimal``) defines what is accepted and, for everything else,
the rejection reason and detail. The fast path (msgspec, decoding into a typed struct whose types and
bounds it checks in C) takes only the common shape of a well-formed message, every field of the exact JSON
type a producer writes, and returns what the strict path would; anything it does not take, valid or not,
goes to the strict path. Messages are encoded with orjson.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from orjson import dumps as _fast_dumps

from cardpipe.domain import checks, records
from cardpipe.domain.checks import MAX_ID, TRANSACTION_TYPES, CheckError
from cardpipe.domain.money import MoneyError, parse_money
from cardpipe.domain.records import CANONICAL_TIMESTAMP, Transaction

#: Messages larger than this are rejected unread (a transaction is a few hundred bytes).
MAX_MESSAGE_BYTES = 64 * 1024
_TEXT_LIMITS = {"merchant_name": 255, "location": 512, "transaction_type": 32}
_MAX_ID = MAX_ID
_MAX_ID_DIGITS = 19
_MAX_MERCHANT, _MAX_LOCATION = _TEXT_LIMITS["merchant_name"], _TEXT_LIMITS["location"]
#: A control character or a lone surrogate (checks.text_problem says which, on the strict path).
_forbidden = checks.FORBIDDEN_IN_TEXT.search
#: ``YYYY-MM-DD HH:MM:SS`` in ASCII digits, the only shape accepted (fromisoformat alone takes more).
_TIMESTAMP_SHAPE = CANONICAL_TIMESTAMP.fullmatch
_fromisoformat = datetime.fromisoformat
#: Messages up to this size nest at most half as deep, well within the standard decoder's recursion limit.
_MAX_UNCHECKED_NESTING = 1024

#: A transaction's fields in ``TRANSACTION_COLUMNS`` order (the stream's hot path uses these, not objects).
TransactionFields = tuple[int, int, str, datetime, Decimal, str, str, int | None]

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
UNKNOWN_CARD = records.UNKNOWN_CARD  # in a decision row too: defined with the decisions' codes
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


def encode_fields(
    transaction_id: int,
    card_id: int,
    merchant_name: str,
    timestamp: str,
    amount: str,
    location: str,
    transaction_type: str,
    related_transaction_id: int | None,
) -> tuple[bytes, bytes]:
    """The (key, value) of a transaction on the topic, its timestamp (``TIMESTAMP_FORMAT``) and amount (two
    decimals) given as the message's text: compact UTF-8 JSON, money as a string."""
    value = {
        "transaction_id": transaction_id,
        "card_id": card_id,
        "merchant_name": merchant_name,
        "timestamp": timestamp,
        "amount": amount,
        "location": location,
        "transaction_type": transaction_type,
        "related_transaction_id": related_transaction_id,
    }
    key = str(card_id).encode()
    try:
        return key, _fast_dumps(value)
    except TypeError:  # e.g. a lone surrogate, which only the standard encoder's error explains
        pass
    return key, json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def encode_transaction(tx: Transaction) -> tuple[bytes, bytes]:
    """The (key, value) of ``tx`` on the topic (:func:`encode_fields`)."""
    return encode_fields(
        tx.transaction_id,
        tx.card_id,
        tx.merchant_name,
        # Same text as strftime(TIMESTAMP_FORMAT) (seconds, no fraction), several times faster.
        tx.timestamp.isoformat(" ", "seconds"),
        str(tx.amount),
        tx.location,
        tx.transaction_type,
        tx.related_transaction_id,
    )


def decode_transaction(value: bytes | None) -> Transaction | Rejection:
    """Parse and validate a message value; never raises."""
    fields = _fast_fields(value)
    return Transaction(*fields) if fields is not None else _decode_strict(value)


def decode_fields(value: bytes | None) -> TransactionFields | Rejection:
    """:func:`decode_transaction` with a valid transaction as the tuple of its fields; never raises."""
    fields = _fast_fields(value)
    if fields is not None:
        return fields
    result = _decode_strict(value)
    return result.values() if isinstance(result, Transaction) else result


_Id = Annotated[int, msgspec.Meta(gt=0, le=_MAX_ID)]


class _WireMessage(msgspec.Struct):
    """The common shape of a message, as msgspec checks it: JSON integers in range for the ids, JSON strings
    within their limits for the texts, one of SPEC's transaction types (unknown fields are skipped)."""

    transaction_id: _Id
    card_id: _Id
    merchant_name: Annotated[str, msgspec.Meta(max_length=_MAX_MERCHANT)]
    timestamp: str
    amount: str | int
    location: Annotated[str, msgspec.Meta(max_length=_MAX_LOCATION)]
    transaction_type: Literal[tuple(sorted(TRANSACTION_TYPES))]  # type: ignore[valid-type]
    related_transaction_id: _Id | None = None


_decode_wire = msgspec.json.Decoder(_WireMessage).decode


def _fast_fields(value: bytes | None) -> TransactionFields | None:
    """The fields of a message in the common well-formed shape, exactly as the strict path reads them; None
    for anything else (malformed, or valid in a less common form: the strict path decides those).

    Taken here: a JSON object (:class:`_WireMessage`, decoded and checked by msgspec) whose ids are JSON
    integers in range, texts are strings within their limits without control characters
    (:mod:`cardpipe.domain.checks`), the transaction type is one of SPEC's, the timestamp has the one accepted
    shape, the amount is a string or integer that :func:`parse_money` accepts, and the related id is an integer
    or null. Everything msgspec reads, the standard decoder reads to the same values (both keep the last of
    duplicate keys); msgspec is stricter (no NaN or out-of-range numbers anywhere, no lone surrogates, no
    invalid UTF-8, no byte order mark; integral floats and booleans are no integers here). Nesting deep enough
    to exhaust the standard decoder's recursion limit takes twice as many bytes as ``_MAX_UNCHECKED_NESTING``:
    a longer message with more than one ``{`` or any ``[`` (in a text, an extra field or a duplicate key) is
    left to the strict path.
    """
    if (
        type(value) is not bytes
        or not value
        or len(value) > MAX_MESSAGE_BYTES
        or len(value) > _MAX_UNCHECKED_NESTING
        and (value.find(b"{", value.find(b"{") + 1) >= 0 or value.find(b"[") >= 0)
    ):  # nesting: see above
        return None
    if not value.isascii():
        try:
            value.decode("utf-8")  # the strict path's own check (msgspec validates too)
        except UnicodeDecodeError:
            return None
    try:  # any exception (not JSON, not an object, a missing field, a bad value): the strict path says what
        message = _decode_wire(value)
        merchant, location, stamp = message.merchant_name, message.location, message.timestamp
        if (
            not (merchant.isprintable() and location.isprintable())  # printable: no control character
            and (_forbidden(merchant) or _forbidden(location))
            or not _TIMESTAMP_SHAPE(stamp)
        ):
            return None
        return (
            message.transaction_id,
            message.card_id,
            merchant,
            _fromisoformat(stamp),
            parse_money(message.amount),
            location,
            message.transaction_type,
            message.related_transaction_id,
        )
    except Exception:
        return None


def _decode_strict(value: bytes | None) -> Transaction | Rejection:
    """The reference decoder: every rejection reason and detail comes from here."""
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
            transaction_type=_transaction_type(obj),
            related_transaction_id=_optional_id(obj, "related_transaction_id"),
        )
    except _Invalid as exc:
        return Rejection(exc.reason, exc.detail, tx_id)


def _field(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise _Invalid(MISSING_FIELD, f"field {name!r} is missing")
    return obj[name]


def _parse_id(raw: Any) -> int:
    """An id: a JSON integer, an integral JSON number or text as :func:`checks.parse_id` reads it."""
    if isinstance(raw, bool):
        raise CheckError("not a positive integer")
    if isinstance(raw, int):
        return checks.check_id(raw)
    if isinstance(raw, str):
        return checks.parse_id(raw)
    if (
        isinstance(raw, Decimal)
        and raw.is_finite()
        and raw.adjusted() < _MAX_ID_DIGITS
        and raw == raw.to_integral_value()
    ):
        return checks.check_id(int(raw))  # the exponent check keeps 1e1000000 from becoming a million-digit int
    raise CheckError("not a positive integer")


def _id(obj: dict[str, Any], name: str, reason: str) -> int:
    raw = _field(obj, name)
    try:
        return _parse_id(raw)
    except CheckError as exc:
        raise _Invalid(reason, f"{name} {_show(raw)} is {exc.reason}") from None


def _optional_id(obj: dict[str, Any], name: str) -> int | None:
    raw = obj.get(name)
    if raw is None or raw == "":
        return None
    return _id(obj, name, BAD_FIELD)


def _text(obj: dict[str, Any], name: str) -> str:
    raw = _field(obj, name)
    if not isinstance(raw, str):
        raise _Invalid(BAD_FIELD, f"{name} {_show(raw)} is not a string")
    if len(raw) > _TEXT_LIMITS[name]:
        raise _Invalid(BAD_FIELD, f"{name} is longer than {_TEXT_LIMITS[name]} characters")
    try:
        return checks.check_text(raw)
    except CheckError as exc:
        raise _Invalid(BAD_FIELD, f"{name} is {exc.reason}") from None


def _transaction_type(obj: dict[str, Any]) -> str:
    raw = _field(obj, "transaction_type")
    if not isinstance(raw, str):
        raise _Invalid(BAD_FIELD, f"transaction_type {_show(raw)} is not a string")
    try:
        return checks.check_transaction_type(raw)
    except CheckError as exc:
        raise _Invalid(BAD_FIELD, f"transaction_type {_show(raw)} is {exc.reason}") from None


def _timestamp(obj: dict[str, Any]) -> datetime:
    raw = _field(obj, "timestamp")
    if not isinstance(raw, str):
        raise _Invalid(BAD_TIMESTAMP, f"timestamp {_show(raw)} is not a string")
    try:
        return checks.parse_timestamp(raw)  # exactly YYYY-MM-DD HH:MM:SS: no offset, no 'T'
    except CheckError as exc:
        raise _Invalid(BAD_TIMESTAMP, f"timestamp {_show(raw)} is {exc.reason}") from None


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
