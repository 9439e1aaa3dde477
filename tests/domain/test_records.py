"""The ISO 8583 response codes beside each decision."""

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
