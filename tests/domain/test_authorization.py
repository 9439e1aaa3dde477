"""SPEC §3: every authorization rule and boundary."""

from datetime import datetime
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardpipe.domain.authorization import Authorizer, decide, decline_reason, location_ok, zip_of
from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    DECLINED,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    PENDING,
    CardProfile,
    Decision,
    Transaction,
)

CARD = CardProfile(card_id=7, credit_limit=D("1000.00"), customer_zip="11513")
NEAR = "12 Main St, Queens, NY 10859"


def tx(amount: str, location: str = NEAR, tid: int = 1) -> Transaction:
    return Transaction(tid, 7, "Shop", datetime(2025, 4, 1, 12, 0, 0), D(amount), location, "purchase")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4395 Brenda Lake, Queens, NY 10859", "10859"),
        ("Online", "Online"),
        ("a  b\t 1234 ", "1234"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_zip_is_the_last_whitespace_token(text, expected):
    assert zip_of(text) == expected


@pytest.mark.parametrize(
    "customer, merchant, ok",
    [
        ("11513", "10859", True),  # same first digit
        ("11513", "20859", False),  # different first digit
        ("11513", "1085", False),  # merchant zip too short
        ("1151", "10859", False),  # customer zip too short
        (None, "10859", False),
        ("11513", None, False),
        ("11513", "", False),
        ("11513-1234", "1abcd", True),  # only length and first character matter
    ],
)
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


# --- the Authorizer's hot path (card terms computed once, zip heads remembered) decides as SPEC §3 -------------


ZIPS = st.one_of(
    st.none(), st.sampled_from(["", "1151", "11513", "21513", "1abcd", "11513-1234", "٣1513"]), st.text(max_size=7)
)
LOCATIONS = st.one_of(
    st.sampled_from(["", " ", NEAR, "1 Road, CO 80202", "a  b\t 1234 ", "x NY\u00a010001", "x 1abcd\n", "Online"]),
    st.lists(st.one_of(st.text(max_size=6), st.sampled_from(["10001", "20002", " ", "\t", "\u2003"])), max_size=4).map(
        " ".join
    ),
)


def spec_reason(amount, location, card, pending):
    """SPEC §3 written out plainly (as the rules were first implemented): the reference for the hot path."""
    if abs(amount) >= card.credit_limit / 2:
        return AMOUNT_OVER_HALF_LIMIT
    tokens = location.split() if location else []
    merchant_zip, customer_zip = tokens[-1] if tokens else None, card.customer_zip
    if not (
        customer_zip
        and merchant_zip
        and len(customer_zip) >= 5
        and len(merchant_zip) >= 5
        and customer_zip[0] == merchant_zip[0]
    ):
        return LOCATION_TOO_FAR
    if pending + amount > card.credit_limit:
        return OVER_CREDIT_LIMIT
    return None


@settings(max_examples=200, deadline=None)
@given(
    cards=st.lists(st.tuples(st.integers(0, 10**8).map(lambda c: D(c).scaleb(-2)), ZIPS), min_size=1, max_size=3),
    txs=st.lists(
        st.tuples(st.integers(0, 3), st.integers(-(10**8), 10**8).map(lambda c: D(c).scaleb(-2)), LOCATIONS),
        max_size=30,
    ),
)
def test_authorizer_decides_as_the_spec_with_a_running_balance(cards, txs):
    profiles = {i: CardProfile(i, limit, zip_code) for i, (limit, zip_code) in enumerate(cards)}
    balances = {i: D("0.00") for i in profiles}
    auth = Authorizer(profiles, balances)
    for n, (card_id, amount, location) in enumerate(txs):
        t = Transaction(n + 1, card_id, "Shop", datetime(2025, 4, 1), amount, location, "purchase")
        if card_id not in profiles:
            assert not auth.knows(card_id) and auth.decide(card_id, amount, location) is None
            continue
        card, pending = profiles[card_id], balances[card_id]
        reason = spec_reason(amount, location, card, pending)
        expected = Decision(DECLINED, pending, reason) if reason else Decision(PENDING, pending + amount)
        assert decline_reason(amount, location, card, pending) == reason
        assert decide(t, card, pending) == expected
        assert auth.authorize(t) == expected
        if expected.status == PENDING:
            balances[card_id] = expected.pending_balance
        assert auth.balances == balances
