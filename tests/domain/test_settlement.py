"""SPEC §4: every settlement rule and boundary."""

from decimal import Decimal as D

import pytest

from cardpipe.domain.money import round_to_hundred_half_even
from cardpipe.domain.records import APPROVED, DECLINED, PENDING, REJECTED, Card, Customer
from cardpipe.domain.settlement import (
    SettledTransaction,
    limit_factor,
    new_credit_limit,
    new_credit_score,
    score_change,
    settle,
    settled_status,
)


@pytest.mark.parametrize(
    "status, expected",
    [
        (PENDING, APPROVED),
        (DECLINED, DECLINED),
        (REJECTED, REJECTED),
    ],
)
def test_settled_status(status, expected):
    assert settled_status(status) == expected


@pytest.mark.parametrize(
    "balance, limit, change",
    [
        ("0", "1000", 15),
        ("100.00", "1000", 15),  # exactly 10 %
        ("100.01", "1000", 10),
        ("200.00", "1000", 10),  # exactly 20 %
        ("200.01", "1000", 5),
        ("300.00", "1000", 5),  # exactly 30 %
        ("300.01", "1000", -5),
        ("500.00", "1000", -5),  # exactly 50 %
        ("500.01", "1000", -15),
        ("700.00", "1000", -15),  # exactly 70 %
        ("700.01", "1000", -25),
        ("2000", "1000", -25),
        ("-50", "1000", 15),  # credit balance
        ("33.33", "333.30", 15),  # exactly 10 % where a float division would not be
    ],
)
def test_score_change_by_utilization(balance, limit, change):
    assert score_change(D(balance), D(limit)) == change


def test_score_change_without_any_limit():
    assert score_change(D(0), D(0)) == 15
    assert score_change(D("1.00"), D(0)) == -25


@pytest.mark.parametrize(
    "score, change, expected",
    [
        (700, 15, 715),
        (845, 15, 850),
        (850, 5, 850),
        (305, -25, 300),
        (300, -5, 300),
        (500, -15, 485),
    ],
)
def test_score_is_clamped(score, change, expected):
    assert new_credit_score(score, change) == expected


@pytest.mark.parametrize(
    "change, factor",
    [
        (15, None),
        (10, None),
        (5, None),
        (0, None),
        (-5, D("0.95")),
        (-10, D("0.90")),
        (-15, D("0.90")),
        (-19, D("0.90")),
        (-20, D("0.85")),
        (-25, D("0.85")),
    ],
)
def test_limit_factor(change, factor):
    assert limit_factor(change) == factor


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2375", "2400"),
        ("2350", "2400"),
        ("2250", "2200"),
        ("2249.99", "2200"),
        ("2250.01", "2300"),
        ("50", "0"),
        ("150", "200"),
        ("0", "0"),
    ],
)
def test_round_to_hundred_is_half_even(value, expected):
    assert round_to_hundred_half_even(D(value)) == D(expected)
    assert round_to_hundred_half_even(D(value)) == D(round(float(value), -2))  # as Python's round(x, -2)


@pytest.mark.parametrize(
    "limit, change, expected",
    [
        ("4500", -15, "4000"),  # 4050 -> 4000 (half to even)
        ("3500", -5, "3300"),  # 3325 -> 3300
        ("3100", -25, "2600"),  # 2635 -> 2600
        ("2500", -5, "2400"),  # 2375 -> 2400
        ("5000", -25, "4200"),  # 4250 -> 4200 (half to even)
        ("7000", -25, "6000"),  # 5950 -> 6000 (half to even)
        ("5000", 5, "5000"),
    ],
)
def test_new_credit_limit(limit, change, expected):
    assert new_credit_limit(D(limit), change) == D(expected)


def test_settle_end_to_end_small():
    cards = [
        Card(1, 10, D("1000.00"), D("50.00")),
        Card(2, 10, D("1000.00"), D("0.00")),
        Card(3, 20, D("2000.00"), D("1500.00")),
    ]
    customers = [Customer(10, 700), Customer(20, 600), Customer(30, 640)]  # 30 has no card
    txs = [
        SettledTransaction(1, 1, D("100.00"), PENDING),
        SettledTransaction(2, 1, D("999.00"), DECLINED),
        SettledTransaction(3, 2, D("-20.00"), PENDING),
        SettledTransaction(4, 3, D("10.00"), REJECTED),
    ]
    result = settle(txs, cards, customers)
    assert [t.status for t in result.transactions] == [APPROVED, DECLINED, APPROVED, REJECTED]
    balances = {c.card_id: c.current_balance for c in result.cards}
    assert balances == {1: D("150.00"), 2: D("-20.00"), 3: D("1500.00")}
    # customer 10: 130 / 2000 = 6.5 % -> +15; customer 20: 75 % -> -25 and limit x 0.85
    assert {c.customer_id: c.credit_score for c in result.customers} == {10: 715, 20: 575, 30: 640}
    assert {c.card_id: c.credit_limit for c in result.cards} == {1: D("1000.00"), 2: D("1000.00"), 3: D("1700.00")}
