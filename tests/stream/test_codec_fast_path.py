"""The codec's fast path (msgspec, the common well-formed shape) decides exactly as the strict reference path.

Every message either takes the fast path, with the very fields the strict path reads, or goes to the strict
path: rejection reasons and details come from there alone. Checked on the fuzz suite's good variants and bad
kinds, and on random mutations of well-formed messages (escapes, whitespace, duplicate keys, numbers, extra
fields, nesting).
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal as D
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardpipe.domain.money import MoneyError, parse_money
from cardpipe.domain.records import Transaction
from cardpipe.stream import codec
from cardpipe.stream.codec import Rejection, decode_fields, decode_transaction, encode_transaction
from tests.stream.test_fuzz import GOOD_VARIANTS, KINDS, build_bad, encode_variant, good_transactions, kind_params


def test_the_fast_path_is_taken():
    """Without it every test below would compare the strict path to itself."""
    assert codec._fast_fields(encode_transaction(TX)[1]) == TX.values()  # noqa: SLF001


TX = Transaction(
    7,
    26,
    "Smith, Jones and Williams",
    datetime(2025, 4, 1, 1, 21, 9),
    D("131.76"),
    "4395 Brenda Lake Apt. 123, Queens, NY 10859",
    "purchase",
    None,
)


def strict(value: bytes | None) -> Any:
    result = codec._decode_strict(value)  # noqa: SLF001
    return result.values() if isinstance(result, Transaction) else result


def assert_same_as_strict(value: bytes | None) -> None:
    reference = strict(value)
    fast = codec._fast_fields(value)  # noqa: SLF001
    if fast is not None:
        assert isinstance(reference, tuple), (value, reference)
        assert fast == reference and [type(v) for v in fast] == [type(v) for v in reference], value
        assert fast[4].as_tuple() == reference[4].as_tuple(), value  # same exponent: 1.00 stays 1.00
    assert decode_fields(value) == reference, value
    decoded = decode_transaction(value)
    assert (decoded.values() if isinstance(decoded, Transaction) else decoded) == reference, value


def test_the_producers_messages_take_the_fast_path():
    for tx in (TX, Transaction(1, 2, "Café ✓ 😀", datetime(2025, 1, 1), D("-0.50"), "x, NY 10001", "refund", 3)):
        value = encode_transaction(tx)[1]
        assert codec._fast_fields(value) == tx.values()  # noqa: SLF001
        assert decode_transaction(value) == tx


@pytest.mark.parametrize(
    "value",
    [
        b'{"transaction_id":1,"transaction_id":"x","card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00",'
        b'"amount":"1.00","location":"l","transaction_type":"purchase"}',  # the last of duplicate keys counts
        b'{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":"1.00",'
        b'"location":"l","transaction_type":"purchase","transaction_id":3}',
        b'{"transaction_id":1,"card_id":2,"merchant_name":"\\ud800","timestamp":"2025-04-01 00:00:00","amount":"1.00",'
        b'"location":"l","transaction_type":"purchase"}',  # lone surrogate: msgspec refuses, strict says bad_field
        b'{"transaction_id":1,"card_id":2,"merchant_name":"\\u0000","timestamp":"2025-04-01 00:00:00","amount":"1.00",'
        b'"location":"l","transaction_type":"purchase"}',
        b'{"transaction_id":18446744073709551616,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00",'
        b'"amount":"1.00","location":"l","transaction_type":"purchase"}',  # msgspec: out of range, as strict says
        b'{"transaction_id":9223372036854775808,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00",'
        b'"amount":"1.00","location":"l","transaction_type":"purchase"}',
        b'{"transaction_id":1.0,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":1.5,'
        b'"location":"l","transaction_type":"purchase"}',  # numbers with fractions: strict reads them as Decimal
        b'{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":1E400,'
        b'"location":"l","transaction_type":"purchase"}',
        b'{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":"1.00",'
        b'"location":"l","transaction_type":"purchase","extra":'
        + b"[" * 1010
        + b"]" * 1010
        + b"}",  # deep: strict decides
        b'{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":"1.00",'
        b'"location":"l","transaction_type":"purchase","x":NaN}',
        b'\xef\xbb\xbf{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00",'
        b'"amount":"1.00","location":"l","transaction_type":"purchase"}',
        b' \n{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":12,'
        b'"location":"l","transaction_type":"purchase","related_transaction_id":null}\t',
        b'{"transaction_id":1,"card_id":2,"merchant_name":"m","timestamp":"2025-04-01 00:00:00","amount":" 1.5 ",'
        b'"location":"l","transaction_type":"purchase","related_transaction_id":""}',
    ],
)
def test_edge_cases_decide_as_the_strict_path(value):
    assert_same_as_strict(value)


def test_every_good_variant_and_bad_kind_of_the_fuzz_suite_decides_as_the_strict_path():
    for variant in GOOD_VARIANTS:
        assert_same_as_strict(encode_variant(TX, variant))
    for kind, (examples, _, _) in KINDS.items():
        for param in examples:
            assert_same_as_strict(build_bad(kind, param, 5).value)


@settings(max_examples=150, deadline=None)
@given(txs=good_transactions(max_size=4), variant=st.sampled_from(GOOD_VARIANTS))
def test_good_transactions_decide_as_the_strict_path(txs, variant):
    for tx in txs:
        assert_same_as_strict(encode_variant(tx, variant))


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_bad_messages_decide_as_the_strict_path(kind, data):
    assert_same_as_strict(build_bad(kind, data.draw(kind_params(kind)), 11).value)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=8),
    st.sampled_from(["1.00", "-0.00", "1.5", "007.00", "1e2", "1_0.00", "１.00", "2025-04-01 00:00:00", "", " "]),
)
RAW_LITERALS = [
    "1.0",
    "1e2",
    "-0",
    "0.10",
    "NaN",
    "1E400",
    "-1.5e-3",
    "[]",
    "{}",
    "[1,[2]]",
    '"\\ud800"',
    '"\\u0000"',
    '"\\u00e9"',
    '"\\ud83d\\ude00"',
    "18446744073709551615",
    "12345678901234567890123",
]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A producer's message with some fields replaced, removed, duplicated or written otherwise."""
    obj: dict[str, Any] = json.loads(encode_transaction(TX)[1])
    parts: list[str] = []
    for name, value in obj.items():
        action = draw(st.sampled_from(["keep"] * 6 + ["value", "raw", "drop", "duplicate", "escape_key"]))
        if action == "drop":
            continue
        text = json.dumps(value, ensure_ascii=draw(st.booleans()))
        if action == "value":
            text = json.dumps(draw(JSON_VALUES), ensure_ascii=draw(st.booleans()))
        elif action == "raw":
            text = draw(st.sampled_from(RAW_LITERALS))
        key = json.dumps(name)
        if action == "escape_key":
            key = '"\\u' + f"{ord(name[0]):04x}" + name[1:] + '"'
        if action == "duplicate":
            parts.append(f"{key}:{draw(st.sampled_from(RAW_LITERALS))}")
        parts.append(key + draw(st.sampled_from([":", " : ", ":\n"])) + text)
    if draw(st.booleans()):
        parts.append(f'"extra":{draw(st.sampled_from(RAW_LITERALS))}')
    body = draw(st.sampled_from([",", ", ", ",\t"])).join(parts)
    return (
        draw(st.sampled_from(["", " ", "\n"])) + "{" + body + "}" + draw(st.sampled_from(["", " ", "\r\n"]))
    ).encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(value=mutated_messages())
def test_mutated_messages_decide_as_the_strict_path(value):
    assert_same_as_strict(value)


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.from_regex(r"-?[0-9]{1,12}\.[0-9]{1,3}", fullmatch=True),
        st.from_regex(r"\s?[+-]?[0-9_]{0,11}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,3})?\s?", fullmatch=True),
        st.text(max_size=14),
    )
)
def test_money_fast_path_is_the_general_path(text):
    class Text(str):  # a str subclass skips the fast path: the general path as reference
        pass

    try:
        reference: Any = parse_money(Text(text))
    except MoneyError as exc:
        reference = exc
    try:
        fast = parse_money(text)
    except MoneyError as exc:
        assert isinstance(reference, MoneyError) and str(exc) == str(reference)
        return
    assert isinstance(reference, D) and fast == reference and fast.as_tuple() == reference.as_tuple()


def test_rejections_keep_their_reason_and_detail():
    assert decode_fields(b"") == Rejection("empty_message", "message has no value")
    result = decode_fields(encode_transaction(TX)[1].replace(b'"131.76"', b'"131.765"'))
    assert result == Rejection("bad_amount", "amount 131.765 has more than two decimal places", 7)
