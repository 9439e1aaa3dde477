from decimal import Decimal as D

import pytest

from cardpipe.domain.money import MoneyError, format_money, parse_money, parse_money_lenient


@pytest.mark.parametrize(
    "raw, expected",
    [("131.76", "131.76"), ("-95.11", "-95.11"), (" 5 ", "5.00"), (12, "12.00"), (D("1.5"), "1.50"), ("1.230", "1.23")],
)
def test_parse_money(raw, expected):
    assert parse_money(raw) == D(expected)


@pytest.mark.parametrize("raw", ["abc", "NaN", "Infinity", "-inf", "1.234", "1e11", 1.5, True, None, [], ""])
def test_parse_money_rejects(raw):
    with pytest.raises(MoneyError):
        parse_money(raw)


def test_lenient_parse_absorbs_float_artifacts():
    assert parse_money_lenient("-95.11000000000001") == D("-95.11")
    assert parse_money_lenient("439.12999999999994") == D("439.13")


def test_format_money():
    assert format_money(D("5")) == "5.00" and format_money(None) == ""
