import json
from datetime import datetime
from decimal import Decimal as D

import pytest

from cardpipe.domain.records import Transaction
from cardpipe.stream.codec import MAX_MESSAGE_BYTES, Rejection, decode_transaction, encode_transaction

TX = Transaction(
    1,
    26,
    'Barrett "LLC", Inc.',
    datetime(2025, 4, 1, 1, 21, 9),
    D("-95.11"),
    "4395 Brenda Lake, Queens, NY 10859",
    "refund",
    7,
)


def test_message_format_is_readable_by_any_client():
    key, value = encode_transaction(TX)
    assert key == b"26"
    assert json.loads(value) == {
        "transaction_id": 1,
        "card_id": 26,
        "merchant_name": 'Barrett "LLC", Inc.',
        "timestamp": "2025-04-01 01:21:09",
        "amount": "-95.11",
        "location": "4395 Brenda Lake, Queens, NY 10859",
        "transaction_type": "refund",
        "related_transaction_id": 7,
    }
    assert decode_transaction(value) == TX


def test_ids_as_strings_and_empty_related_id_are_accepted():
    obj = json.loads(encode_transaction(TX)[1])
    obj.update(transaction_id="1", card_id="26", related_transaction_id="")
    assert decode_transaction(json.dumps(obj).encode()) == Transaction(
        *[
            *list(
                TX.__getattribute__(f)
                for f in (
                    "transaction_id",
                    "card_id",
                    "merchant_name",
                    "timestamp",
                    "amount",
                    "location",
                    "transaction_type",
                )
            ),
            None,
        ]
    )


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"amount": "abc"}, "bad_amount"),
        ({"amount": 1e400}, "bad_amount"),
        ({"amount": "1.001"}, "bad_amount"),
        ({"amount": True}, "bad_amount"),
        ({"amount": None}, "bad_amount"),
        ({"timestamp": "2025-04-01T01:21:09"}, "bad_timestamp"),
        ({"timestamp": "2025-02-30 00:00:00"}, "bad_timestamp"),
        ({"timestamp": 5}, "bad_timestamp"),
        ({"transaction_id": -1}, "bad_transaction_id"),
        ({"transaction_id": 1.5}, "bad_transaction_id"),
        ({"card_id": "x"}, "bad_card_id"),
        ({"merchant_name": 5}, "bad_field"),
        ({"location": "x" * 600}, "bad_field"),
        ({"transaction_type": ""}, "bad_field"),
        ({"related_transaction_id": "abc"}, "bad_field"),
    ],
)
def test_invalid_fields_are_rejected_with_a_reason(change, reason):
    obj = json.loads(encode_transaction(TX)[1])
    obj.update(change)
    result = decode_transaction(json.dumps(obj).encode())
    assert isinstance(result, Rejection) and result.reason == reason, result


@pytest.mark.parametrize(
    "change, reason, detail",
    [
        ({"transaction_type": "teleport"}, "bad_field", 'transaction_type "teleport" is not one of atm_withdrawal,'),
        ({"transaction_type": "Purchase"}, "bad_field", 'transaction_type "Purchase" is not one of'),
        ({"transaction_id": -3}, "bad_transaction_id", "transaction_id -3 is not a positive integer"),
        ({"transaction_id": "-3"}, "bad_transaction_id", 'transaction_id "-3" is not a positive integer'),
        ({"card_id": "\u0662\u0666"}, "bad_card_id", "is not a positive integer"),  # Arabic-Indic digits
        ({"card_id": "2_6"}, "bad_card_id", "is not a positive integer"),
        ({"amount": "1_000.00"}, "bad_amount", "is not a plain decimal number"),
        ({"amount": "\u0661\u0660.00"}, "bad_amount", "is not a plain decimal number"),
        ({"merchant_name": "bell\x07"}, "bad_field", "merchant_name is not plain text: control character U+0007"),
        ({"location": "x\x1b[31m, NY 10001"}, "bad_field", "location is not plain text: control character U+001B"),
        ({"merchant_name": "tab\there"}, "bad_field", "control character U+0009"),
        ({"merchant_name": "c1\x85"}, "bad_field", "control character U+0085"),
    ],
)
def test_values_no_issuer_would_send_are_rejected_with_the_rule_they_break(change, reason, detail):
    """Issue 12: the loader's value rules (cardpipe.domain.checks) hold for the topic's messages too."""
    obj = json.loads(encode_transaction(TX)[1])
    obj.update(change)
    for ensure_ascii in (True, False):
        result = decode_transaction(json.dumps(obj, ensure_ascii=ensure_ascii).encode())
        assert isinstance(result, Rejection) and result.reason == reason, result
        assert detail in result.detail and "decimal." not in result.detail, result


def test_every_transaction_type_of_the_spec_is_accepted():
    obj = json.loads(encode_transaction(TX)[1])
    for kind in (
        "purchase",
        "bill_payment",
        "atm_withdrawal",
        "p2p_transfer",
        "wire_transfer",
        "refund",
        "cancellation",
    ):
        obj["transaction_type"] = kind
        result = decode_transaction(json.dumps(obj).encode())
        assert isinstance(result, Transaction) and result.transaction_type == kind


def test_oversized_message_is_rejected_unread():
    result = decode_transaction(b"{" + b" " * MAX_MESSAGE_BYTES + b"}")
    assert isinstance(result, Rejection) and result.reason == "oversized_message"


@pytest.mark.parametrize(
    "merchant", ['Café "Zoë", l\'Étoile', "back \\ slash, line separator \u2028", "\U0001f600", "x" * 255]
)
@pytest.mark.parametrize(
    "timestamp", [datetime(2024, 2, 29, 23, 59, 59), datetime(1999, 1, 1), datetime(2024, 1, 2, 3, 4, 5, 999)]
)
def test_encoding_is_the_compact_standard_json_and_round_trips(merchant, timestamp):
    tx = Transaction(10, 20, merchant, timestamp, D("-1234.50"), "Springfield, IL 62701", "refund", 9)
    key, value = encode_transaction(tx)
    expected = {
        "transaction_id": 10,
        "card_id": 20,
        "merchant_name": merchant,
        "timestamp": timestamp.strftime("%Y-%m-%d %H:%M:%S"),
        "amount": "-1234.50",
        "location": "Springfield, IL 62701",
        "transaction_type": "refund",
        "related_transaction_id": 9,
    }
    assert key == b"20"
    assert value == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
    assert decode_transaction(value) == Transaction(
        10, 20, merchant, timestamp.replace(microsecond=0), D("-1234.50"), "Springfield, IL 62701", "refund", 9
    )
