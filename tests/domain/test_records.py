"""The ISO 8583 response codes beside each decision."""

import re

import pytest

from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    response_code,
)


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        ("pending", None, "00"),
        ("approved", None, "00"),
        ("declined", OVER_CREDIT_LIMIT, "51"),
        ("declined", AMOUNT_OVER_HALF_LIMIT, "61"),
        ("declined", LOCATION_TOO_FAR, "59"),
        ("declined", "some_future_rule", "05"),
        ("rejected", None, "30"),
    ],
)
def test_response_code(status, reason, code):
    assert response_code(status, reason) == code


def test_code_columns_hold_only_identifiers():
    """CSV writers leave CODE_COLUMNS unquoted: every value they can hold is a lower-case identifier."""
    from cardpipe.domain.records import (
        AMOUNT_OVER_HALF_LIMIT,
        APPROVED,
        CODE_COLUMNS,
        DECLINED,
        LOCATION_TOO_FAR,
        OVER_CREDIT_LIMIT,
        PENDING,
        REJECTED,
    )
    from cardpipe.stream import codec

    rejection_reasons = {v for k, v in vars(codec).items() if k.isupper() and isinstance(v, str) and v.islower()}
    assert codec.UNKNOWN_CARD in rejection_reasons and codec.NOT_JSON in rejection_reasons
    values = {
        "status": {PENDING, DECLINED, REJECTED, APPROVED},
        "decline_reason": {AMOUNT_OVER_HALF_LIMIT, LOCATION_TOO_FAR, OVER_CREDIT_LIMIT} | rejection_reasons,
    }
    assert set(values) == CODE_COLUMNS
    for column, codes in values.items():
        for code in codes:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", code), (column, code)
