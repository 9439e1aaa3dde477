"""The domain's value rules (cardpipe.domain.checks): pure, one definition for the loader and the decoder."""

import re
from datetime import date, datetime
from decimal import Decimal as D

import pytest

from cardpipe.domain import checks
from cardpipe.domain.checks import CheckError


@pytest.mark.parametrize(
    "text, value",
    [("7", 7), ("0007", 7), (" 7 ", 7), ("7.0", 7), ("9223372036854775807", 2**63 - 1), ("7.", 7)],
)
def test_ids_are_positive_integers_in_ascii_digits(text, value):
    assert checks.parse_id(text) == value


@pytest.mark.parametrize(
    "text",
    ["-3", "+3", "0", "00", "", " ", "1_000", "\u0663", "\uff13", "1e3", "7.5", "0x10", "nan", "9223372036854775808"],
)
def test_what_is_not_an_id(text):
    with pytest.raises(CheckError) as refused:
        checks.parse_id(text)
    assert refused.value.reason in ("not a positive integer", f"above the largest id {2**63 - 1}")


def test_enormous_ids_are_refused_without_building_the_integer():
    with pytest.raises(CheckError, match="above the largest id"):
        checks.parse_id("9" * 100_000)
    with pytest.raises(CheckError, match="out of range"):
        checks.parse_integer("-" + "9" * 100_000)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1000.00", D("1000.00")),
        ("-95.11000000000001", D("-95.11000000000001")),
        (".5", D("0.5")),
        ("1e-05", D("1e-5")),
    ],
)
def test_plain_decimals(text, value):
    assert checks.parse_decimal(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "1_000.00",
        "\u0661\u0660\u0660\u0660.00",
        "\uff11.00",
        "NaN",
        "Infinity",
        "1,000",
        "$5",
        "",
        "1e",
        "--1",
        "1.2.3",
    ],
)
def test_numbers_that_python_may_read_but_no_issuer_writes_are_refused(text):
    with pytest.raises(CheckError, match="not a plain decimal number"):
        checks.parse_decimal(text)


def test_no_internal_decimal_text_in_reasons():
    for text in ("1e9999999999", "abc", "1e", "\u0661"):
        with pytest.raises(CheckError) as refused:
            checks.parse_decimal(text)
        assert "decimal." not in str(refused.value) and "Conversion" not in str(refused.value)


@pytest.mark.parametrize("score, ok", [(300, True), (850, True), (299, False), (851, False), (-700, False)])
def test_credit_scores_are_within_300_and_850(score, ok):
    if ok:
        assert checks.CREDIT_SCORE.check(score) == score
    else:
        with pytest.raises(CheckError, match=r"not within 300\.\.850"):
            checks.CREDIT_SCORE.check(score)


def test_credit_limits_are_above_zero():
    assert checks.POSITIVE.check(D("0.01")) == D("0.01")
    for value in (D("0.00"), D("-5000.00")):
        with pytest.raises(CheckError, match="not above 0"):
            checks.POSITIVE.check(value)
    assert checks.POSITIVE.holds_for_all([D(1), D(2)]) and not checks.POSITIVE.holds_for_all([D(1), D(0)])


def test_a_card_type_minimum_is_not_above_its_maximum():
    good = {"credit_score_min": 580, "credit_score_max": 669, "credit_limit_min": D(1000), "credit_limit_max": D(5000)}
    checks.check_card_type(good)
    checks.check_card_type({**good, "credit_limit_min": D(5000)})  # equal is fine
    with pytest.raises(CheckError) as refused:
        checks.check_card_type({**good, "credit_limit_min": D(6000)})
    assert refused.value.column == "credit_limit_min" and refused.value.reason == "above credit_limit_max 5000"
    with pytest.raises(CheckError) as refused:
        checks.check_card_type({**good, "credit_score_max": 500})
    assert refused.value.column == "credit_score_min"


def test_transaction_types_are_the_specs_seven():
    assert {
        "purchase",
        "bill_payment",
        "atm_withdrawal",
        "p2p_transfer",
        "wire_transfer",
        "refund",
        "cancellation",
    } == checks.TRANSACTION_TYPES
    for bad in ("teleport", "Purchase", " purchase", ""):
        with pytest.raises(CheckError, match="not one of"):
            checks.check_transaction_type(bad)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("bell\x07", "not plain text: control character U+0007"),
        ("tab\there", "not plain text: control character U+0009"),
        ("two\nlines", "not plain text: control character U+000A"),
        ("del\x7f", "not plain text: control character U+007F"),
        ("c1\x85", "not plain text: control character U+0085"),
        ("nul\x00", "not plain text: control character U+0000"),
        ("caf\udce9", "not UTF-8 text: byte 0xE9"),
        ("\ud800", "not valid Unicode text: lone surrogate U+D800"),
    ],
)
def test_text_refuses_control_characters_and_bytes_that_are_not_utf8(text, problem):
    assert checks.text_problem(text) == problem
    with pytest.raises(CheckError, match=re.escape(problem)):
        checks.check_text(text)


def test_ordinary_unicode_text_is_accepted():
    for text in ('Café "Zoë", l\'Étoile', "😀", "中文", "\u2028", "\u00a0NY 10001", "", "back\\slash"):
        assert checks.check_text(text) == text


def test_timestamps_and_dates_are_real_calendar_values_in_ascii_digits():
    assert checks.parse_timestamp("2024-02-29 23:59:59") == datetime(2024, 2, 29, 23, 59, 59)
    assert checks.parse_timestamp(" 2025-4-1 0:0:4 ", lenient=True) == datetime(2025, 4, 1, 0, 0, 4)
    for text, lenient in [
        ("2025-4-1 0:0:4", False),
        (" 2025-04-01 00:00:00", False),
        ("2025-02-29 00:00:00", True),
        ("2025-04-01 24:00:00", True),
        ("\uff12025-04-01 00:00:00", True),
        ("2025-04-01T00:00:00", True),
    ]:
        with pytest.raises(CheckError):
            checks.parse_timestamp(text, lenient=lenient)
    assert checks.parse_date("2024-02-29") == date(2024, 2, 29)
    for text in ("2023-02-29", "20230101", "2023-W01-1", "2023-1-3", "\u0662023-01-01"):
        with pytest.raises(CheckError):
            checks.parse_date(text)


def test_card_expiration_is_month_and_year():
    for text in ("05/26", "12/2030"):
        assert checks.EXPIRATION.check(text) == text
    for text in ("13/26", "00/26", "5/26", "05-26", ""):
        with pytest.raises(CheckError, match="not MM/YY"):
            checks.EXPIRATION.check(text)
