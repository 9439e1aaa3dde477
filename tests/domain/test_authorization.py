"""SPEC §3: every authorization rule and boundary."""

from datetime import datetime
from decimal import Decimal as D

import pytest

from cardpipe.domain.authorization import Authorizer, decide, decline_reason, location_ok, zip_of
from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    DECLINED,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    PENDING,
    CardProfile,
    Transaction,
)

CARD = CardProfile(card_id=7, credit_limit=D("1000.00"), customer_zip="11513")
NEAR = "12 Main St, Queens, NY 10859"


def tx(amount: str, location: str = NEAR, tid: int = 1) -> Transaction:
    return Transaction(tid, 7, "Shop", datetime(2025, 4, 1, 12, 0, 0), D(amount), location, "purchase")


@pytest.mark.parametrize("text, expected", [
    ("4395 Brenda Lake, Queens, NY 10859", "10859"),
    ("Online", "Online"),
    ("a  b\t 1234 ", "1234"),
    ("", None),
    ("   ", None),
    (None, None),
])
def test_zip_is_the_last_whitespace_token(text, expected):
    assert zip_of(text) == expected


@pytest.mark.parametrize("customer, merchant, ok", [
    ("11513", "10859", True),  # same first digit
    ("11513", "20859", False),  # different first digit
    ("11513", "1085", False),  # merchant zip too short
    ("1151", "10859", False),  # customer zip too short
    (None, "10859", False),
    ("11513", None, False),
    ("11513", "", False),
    ("11513-1234", "1abcd", True),  # only length and first character matter
])
def test_location_ok(customer, merchant, ok):
    assert location_ok(customer, merchant) is ok


def test_amount_exactly_half_the_limit_is_declined():
    assert decline_reason(D("500.00"), NEAR, CARD, D(0)) == AMOUNT_OVER_HALF_LIMIT


def test_amount_a_cent_below_half_the_limit_passes_that_rule():
    assert decline_reason(D("499.99"), NEAR, CARD, D(0)) is None


def test_refund_of_half_the_limit_is_declined_too():
    assert decline_reason(D("-500.00"), NEAR, CARD, D(0)) == AMOUNT_OVER_HALF_LIMIT


def test_far_location_is_declined():
    assert decline_reason(D("10.00"), "1 Road, Denver, CO 80202", CARD, D(0)) == LOCATION_TOO_FAR


def test_short_merchant_zip_is_declined():
    assert decline_reason(D("10.00"), "1 Road, NY 1234", CARD, D(0)) == LOCATION_TOO_FAR


def test_pending_balance_exactly_at_the_limit_is_allowed():
    decision = decide(tx("400.00"), CARD, D("600.00"))
    assert decision == decision.__class__(PENDING, D("1000.00"))


def test_pending_balance_a_cent_over_the_limit_is_declined():
    decision = decide(tx("400.01"), CARD, D("600.00"))
    assert (decision.status, decision.reason, decision.pending_balance) == (DECLINED, OVER_CREDIT_LIMIT, D("600.00"))


def test_first_failing_rule_wins():
    # Fails all three: over half, far away, over the limit -> the first is reported.
    assert decline_reason(D("900.00"), "1 Road, CO 80202", CARD, D("900.00")) == AMOUNT_OVER_HALF_LIMIT
    assert decline_reason(D("100.00"), "1 Road, CO 80202", CARD, D("950.00")) == LOCATION_TOO_FAR


def test_authorizer_tracks_pending_balance_and_refunds_lower_it():
    auth = Authorizer({7: CARD}, {7: D("100.00")})
    assert auth.authorize(tx("300.00", tid=1)).pending_balance == D("400.00")
    assert auth.authorize(tx("-150.25", tid=2)).pending_balance == D("249.75")
    assert auth.balances[7] == D("249.75")


def test_decline_leaves_the_balance_unchanged():
    auth = Authorizer({7: CARD}, {7: D("100.00")})
    decision = auth.authorize(tx("10.00", "1 Road, CO 80202"))
    assert decision.status == DECLINED and decision.pending_balance == D("100.00")
    assert auth.balances[7] == D("100.00")
