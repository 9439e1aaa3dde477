"""The column-by-column path (cardpipe.stream.columnar) against the per-message path: the same checkpoints.

Needs pyarrow (the ``fast`` extra, which ``scripts/install.sh --test`` installs).
"""

import os
import subprocess
import sys
from datetime import datetime
from decimal import Decimal as D

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardpipe.domain.records import TRANSACTION_COLUMNS, CardProfile, Transaction
from cardpipe.errors import ConfigError
from cardpipe.stream import columnar
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor

CLOCK = datetime(2025, 5, 1, 12, 0, 0)
GOOD = {
    "transaction_id": 1,
    "card_id": 7,
    "merchant_name": "M",
    "timestamp": "2025-04-01 00:00:15",
    "amount": "1.00",
    "location": "a b 12345",
    "transaction_type": "purchase",
    "related_transaction_id": None,
}


def value(**changes: object) -> bytes:
    return orjson.dumps({**GOOD, **changes})


def raw(text: str) -> bytes:
    return text.encode()


BASE = raw(value().decode()[1:-1])  # the well-formed fields without their braces
#: Messages the column-by-column path must leave to the per-message path (valid or not): each alone in a batch.
NOT_TAKEN = {
    "duplicate key": raw('{"transaction_id":2,' + BASE.decode() + "}"),
    "boolean id": value(transaction_id=True),
    "integral float id": raw('{"transaction_id":1.0,' + BASE.decode().split(",", 1)[1] + "}"),
    "id as text": value(transaction_id="1"),
    "id beyond int64": raw('{"transaction_id":9223372036854775808,' + BASE.decode().split(",", 1)[1] + "}"),
    "id zero": value(transaction_id=0),
    "negative card": value(card_id=-3),
    "number as merchant": value(merchant_name=123),
    "null merchant": value(merchant_name=None),
    "missing location": orjson.dumps({k: v for k, v in GOOD.items() if k != "location"}),
    "lone surrogate": raw(value().decode().replace('"M"', '"\\ud800"')),
    "escaped control": raw(value().decode().replace('"M"', '"a\\u0000b"')),
    "escaped tab": raw(value().decode().replace('"M"', '"a\\tb"')),
    "raw DEL": value(merchant_name="a\x7fb"),
    "C1 control": value(location="a\x85b 12345"),
    "amount as number": raw(value().decode().replace('"1.00"', "1")),
    "amount of three decimals": value(amount="1.005"),
    "amount with exponent": value(amount="1E+2"),
    "second 60": value(timestamp="2025-04-01 23:59:60"),
    "hour 24": value(timestamp="2025-04-01 24:00:00"),
    "30 February": value(timestamp="2025-02-30 00:00:00"),
    "29 February 1900": value(timestamp="1900-02-29 00:00:00"),
    "year 0": value(timestamp="0000-04-01 00:00:00"),
    "T separator": value(timestamp="2025-04-01T00:00:15"),
    "related as empty text": value(related_transaction_id=""),
    "unknown type": value(transaction_type="gift"),
    "extra field": value(extra=1),
    "array": b"[1,2]",
    "number": b"5",
    "two objects": value() + b" " + value(transaction_id=2),
    "line break inside": value().replace(b",", b",\n", 1),
    "byte order mark": b"\xef\xbb\xbf" + value(),
    "not UTF-8": value(merchant_name="M").replace(b'"M"', b'"\xff"'),
    "empty": b"",
    "too long for this path": value(merchant_name="x" * 1100),
}


@pytest.mark.parametrize("name", sorted(NOT_TAKEN))
def test_a_message_of_another_shape_leaves_the_batch_to_the_per_message_path(name: str) -> None:
    decider = columnar.ColumnarDecider()
    assert decider.read([value(), NOT_TAKEN[name]]) is None
    assert decider.read([value()]) is not None  # the well-formed one alone is taken


def test_real_dates_and_other_scripts_are_taken() -> None:
    decider = columnar.ColumnarDecider()
    for message in (
        value(timestamp="2024-02-29 23:59:59"),
        value(timestamp="0001-01-01 00:00:00"),
        value(timestamp="9999-12-31 23:59:59"),
        value(merchant_name="Ünïcode ✓ 😀", location="Zürich 80331"),
        value(merchant_name='Shop "A", \\B', location="x, NY 10001"),
        value(amount="-0.00", related_transaction_id=5),
    ):
        assert decider.read([message]) is not None, message


CARD_IDS = (1, 2, 3, 4, 5)
ZIPS = ("11513", "12345", "20001", "1234", None, "A2345")
LOCATIONS = ("x, NY 11777", "y 20002", "z 1234", "Zürich 11011", "Zürich\u00a012345", "a b", "", "q  29999  ", "12345")
AMOUNTS = ("0.01", "-0.00", "12.34", "250.00", "333.33", "500.00", "499.99", "-75.25", "2500.00", "9999999999.99")


@st.composite
def scenario(draw: st.DrawFn) -> tuple[dict[int, CardProfile], dict[int, D], list[list[bytes | None]], set[int]]:
    limits = st.sampled_from([D("1000.00"), D("500.00"), D("999.99"), D("0.01"), D("250.50")])
    cards = {c: CardProfile(c, draw(limits), draw(st.sampled_from(ZIPS))) for c in CARD_IDS}
    balances = {c: draw(st.sampled_from([D("0.00"), D("120.25"), D("-10.00"), D("999.99")])) for c in CARD_IDS}

    few_ids = st.integers(1, 40)  # redeliveries, within a batch and across

    def well_formed(cards: tuple[int, ...], ids: st.SearchStrategy[int] = few_ids) -> st.SearchStrategy[bytes]:
        return st.builds(
            lambda tid, card, amount, location, related: encode_transaction(
                Transaction(
                    tid, card, "M", datetime(2025, 4, 1, 0, 0, tid % 60), D(amount), location, "purchase", related
                )
            )[1],
            ids,
            st.sampled_from(cards),
            st.sampled_from(AMOUNTS),
            st.sampled_from(LOCATIONS),
            st.none() | st.integers(1, 40),
        )

    any_card = well_formed((*CARD_IDS, 99))  # 99: not a card
    message = st.one_of(any_card, any_card, any_card, st.sampled_from(sorted(NOT_TAKEN.values())), st.none())
    mixed = st.lists(message, min_size=1, max_size=12)

    # A clean batch (ids new to the batch, all well-formed) is the column-by-column path's to take, unless it
    # holds an unknown card or a transaction decided before.
    def clean_batch(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
        return st.lists(messages, min_size=1, max_size=16, unique_by=lambda v: orjson.loads(v)["transaction_id"])

    clean = clean_batch(well_formed(CARD_IDS))
    batches = draw(st.lists(st.one_of(clean, clean, mixed), min_size=0, max_size=6))
    # And one clean batch of ids no other batch holds, anywhere among them: every example has a batch that path
    # must take, so the property test compares the two paths on at least one batch decided column by column.
    fresh = clean_batch(well_formed(CARD_IDS, st.integers(41, 80)))
    batches.insert(draw(st.integers(0, len(batches))), draw(fresh))
    adopt_after = set(draw(st.lists(st.integers(0, 5), max_size=2)))  # new limits after these batches
    return cards, balances, batches, adopt_after


class Lookup:
    def __init__(self) -> None:
        self.decided: dict[int, Transaction] = {}

    def __call__(self, ids: list[int]) -> dict[int, Transaction]:
        return {i: self.decided[i] for i in ids if i in self.decided}

    def commit(self, rows: list) -> None:
        width = len(TRANSACTION_COLUMNS)
        for row in rows:
            self.decided.setdefault(row[0], Transaction(*row[:width]))


def checkpoint(batch) -> dict:
    """Everything a checkpoint writes, however the batch was decided."""
    return {
        "decided": batch.decision_rows(),
        "positions": batch.columns.positions() if batch.columns is not None else batch.positions,
        "card_states": list(batch.card_state_rows().items()),
        "counts": +batch.counts,
        "next_offsets": batch.next_offsets,
        "publish_times": batch.publish_times_ms,
        "rejected": batch.rejected,
        "settlement_id": batch.settlement_id,
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_the_column_by_column_path_writes_the_per_message_paths_checkpoints(case) -> None:
    cards, balances, batches, adopt_after = case
    ways = {}
    for way in (False, True):
        lookup = Lookup()
        proc = StreamProcessor("t", cards, balances, lookup, clock=lambda: CLOCK, columnar=way)
        seen = []
        offset = 0
        for number, values in enumerate(batches):
            messages = [RawMessage(i % 2, offset + i, None, v, 1_000 + i) for i, v in enumerate(values)]
            offset += len(values)
            batch = proc.process(messages)
            seen.append(checkpoint(batch))
            lookup.commit(batch.decision_rows())
            if number in adopt_after:  # a settlement lowers every limit by a cent; balances carry on
                proc.adopt(
                    number, {c: CardProfile(c, p.credit_limit - D("0.01"), p.customer_zip) for c, p in cards.items()}
                )
        if proc.columnar is not None:
            proc.columnar.hand_back(proc.authorizer)
        ways[way] = (seen, proc.authorizer.balances, proc.columnar_batches)
    assert ways[True][0] == ways[False][0]
    assert ways[True][1] == ways[False][1]
    assert ways[True][2] >= 1  # the fresh clean batch, at least, was decided column by column


def test_well_formed_batches_are_taken_and_decided_as_one_by_one() -> None:
    cards = {c: CardProfile(c, D("1000.00"), "11513") for c in CARD_IDS}
    balances = dict.fromkeys(CARD_IDS, D("0.00"))
    values = [
        encode_transaction(Transaction(t, CARD_IDS[t % 5], "M", datetime(2025, 4, 1), D(a), loc, "purchase"))[1]
        for t, (a, loc) in enumerate([("400.00", "x 11000"), ("499.99", "x 11000"), ("300.00", "x 11000")] * 5, 1)
    ]
    per_message = StreamProcessor("t", cards, balances, lambda ids: {})
    by_columns = StreamProcessor("t", cards, balances, lambda ids: {}, columnar=True)
    messages = [RawMessage(0, i, None, v, None) for i, v in enumerate(values)]
    expected, got = per_message.process(messages), by_columns.process(messages)
    assert by_columns.columnar_batches == 1 and got.columns is not None and not got.decided
    assert checkpoint(got) == checkpoint(expected)
    # Each card's three transactions in the batch, 1,199.99 in all against 1,000.00: its third goes over the limit.
    assert +got.counts == {"pending": 10, "declined": 5, "declined:over_credit_limit": 5}


def test_a_later_transaction_reaching_the_limit_exactly_goes_pending() -> None:
    """The over-limit rule is ``pending + amount > limit``, for a card's later transactions in a batch too."""
    cards = {c: CardProfile(c, D("1000.00"), "11513") for c in CARD_IDS}
    balances = dict.fromkeys(CARD_IDS, D("0.00"))
    amounts = [(1, "400.00"), (2, "100.00"), (1, "400.00"), (1, "200.00"), (1, "0.01"), (1, "-0.01"), (1, "0.01")]
    values = [
        encode_transaction(Transaction(t, card, "M", datetime(2025, 4, 1), D(a), "x 11000", "purchase"))[1]
        for t, (card, a) in enumerate(amounts, 1)
    ]
    per_message = StreamProcessor("t", cards, balances, lambda ids: {})
    by_columns = StreamProcessor("t", cards, balances, lambda ids: {}, columnar=True)
    messages = [RawMessage(0, i, None, v, None) for i, v in enumerate(values)]
    expected, got = per_message.process(messages), by_columns.process(messages)
    assert got.columns is not None and checkpoint(got) == checkpoint(expected)
    assert got.columns.status == ["pending", "pending", "pending", "pending", "declined", "pending", "pending"]
    assert got.columns.card_balances == {1: 100_000, 2: 10_000}


def test_running_sums_add_up_each_keys_values_in_row_order() -> None:
    columnar.load()
    keys = columnar.pa.array([7, 3, 7, 9, 3, 7, 9], columnar.pa.int64())
    values = columnar.pa.array([5, 1, -2, 0, 10, 4, 6], columnar.pa.int64())
    assert columnar._running_sums(keys, values).to_pylist() == [5, 1, 3, 0, 11, 7, 6]
    empty = columnar.pa.array([], columnar.pa.int64())
    assert columnar._running_sums(empty, empty).to_pylist() == []


def test_a_card_is_judged_one_by_one_from_its_first_transaction_over_the_limit() -> None:
    """Card 1 goes over its limit at its third transaction: that one is declined and moves nothing, the refund after
    it goes pending, and so does the one that fits again; its declines for half the limit and the location moved
    nothing before. Card 2 never goes over, card 3 only at its last."""
    cards = {c: CardProfile(c, D("1000.00"), "11513") for c in CARD_IDS}
    balances = {1: D("100.00"), 2: D("0.00"), 3: D("990.00"), 4: D("0.00"), 5: D("0.00")}
    rows = [
        (1, "600.00", "x 11000"),  # half the limit: declined
        (1, "300.00", "x 11000"),  # 400.00
        (2, "100.00", "x 11000"),
        (1, "100.00", "x 99999"),  # too far: declined
        (1, "499.00", "x 11000"),  # 899.00
        (3, "5.00", "x 11000"),  # 995.00
        (1, "200.00", "x 11000"),  # 1,099.00: over, declined
        (1, "-50.00", "x 11000"),  # 849.00
        (2, "400.00", "x 11000"),
        (1, "150.00", "x 11000"),  # 999.00
        (1, "1.01", "x 11000"),  # over, declined
        (3, "5.01", "x 11000"),  # over, declined
    ]
    values = [
        encode_transaction(Transaction(t, card, "M", datetime(2025, 4, 1), D(a), loc, "purchase"))[1]
        for t, (card, a, loc) in enumerate(rows, 1)
    ]
    per_message = StreamProcessor("t", cards, balances, lambda ids: {})
    by_columns = StreamProcessor("t", cards, balances, lambda ids: {}, columnar=True)
    messages = [RawMessage(0, i, None, v, None) for i, v in enumerate(values)]
    expected, got = per_message.process(messages), by_columns.process(messages)
    assert got.columns is not None and checkpoint(got) == checkpoint(expected)
    assert got.columns.decline_reason == [
        "amount_over_half_limit",
        None,
        None,
        "location_too_far",
        None,
        None,
        "over_credit_limit",
        None,
        None,
        None,
        "over_credit_limit",
        "over_credit_limit",
    ]
    assert got.columns.pending_balance == [
        10_000,
        40_000,
        10_000,
        40_000,
        89_900,
        99_500,
        89_900,
        84_900,
        50_000,
        99_900,
        99_900,
        99_500,
    ]
    assert got.columns.card_balances == {1: 99_900, 2: 50_000, 3: 99_500}


def test_without_looking_up_first_a_taken_batch_is_decided_without_the_lookup() -> None:
    """``look_up_first=False``: the column-by-column path skips the lookup (the store's primary key catches a
    redelivery at the commit); the decisions are the same. A batch that path leaves is still looked up."""
    cards = {c: CardProfile(c, D("1000.00"), "11513") for c in CARD_IDS}
    balances = dict.fromkeys(CARD_IDS, D("0.00"))
    values = [
        encode_transaction(Transaction(t, CARD_IDS[t % 5], "M", datetime(2025, 4, 1), D("400.00"), "x 1", "purchase"))[
            1
        ]
        for t in range(1, 11)
    ]
    messages = [RawMessage(0, i, None, v, None) for i, v in enumerate(values)]
    asked: dict[str, list[list[int]]] = {"first": [], "not first": []}
    looking = StreamProcessor("t", cards, balances, lambda ids: asked["first"].append(ids) or {}, columnar=True)
    trusting = StreamProcessor(
        "t", cards, balances, lambda ids: asked["not first"].append(ids) or {}, columnar=True, look_up_first=False
    )
    expected, got = looking.process(messages), trusting.process(messages)
    assert trusting.columnar_batches == looking.columnar_batches == 1
    assert checkpoint(got) == checkpoint(expected)
    assert asked == {"first": [list(range(1, 11))], "not first": []}
    trusting.process([RawMessage(0, 10, None, NOT_TAKEN["extra field"], None)])  # left to the per-message path
    assert asked["not first"] == [[1]]


def test_the_setting_chooses_the_path() -> None:
    assert columnar.wanted("off") is False
    assert columnar.wanted("auto") is columnar.available()
    assert columnar.wanted("on") is True  # pyarrow is installed here (the fast extra)


def test_on_without_pyarrow_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columnar, "available", lambda: False)
    assert columnar.wanted("auto") is False
    with pytest.raises(ConfigError, match=r"cardpipe\[fast\]"):
        columnar.wanted("on")


@pytest.mark.parametrize(("setting", "backend"), [(None, "system"), ("jemalloc", "jemalloc"), ("mimalloc", "mimalloc")])
def test_arrow_allocates_with_malloc_unless_its_own_setting_says_otherwise(setting: str | None, backend: str) -> None:
    """A fresh process: the allocator is chosen where Arrow is imported, once."""
    env = {k: v for k, v in os.environ.items() if k != columnar.ARROW_POOL_VARIABLE}
    if setting is not None:
        env[columnar.ARROW_POOL_VARIABLE] = setting
    script = (
        "from cardpipe.stream import columnar; columnar.load(); print(columnar.pa.default_memory_pool().backend_name)"
    )
    shown = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == backend


def test_a_card_over_its_limit_is_judged_without_arrows_query_engine() -> None:
    """A fresh process: judging a card one by one from its first transaction over the limit does not import
    Arrow's query engine (``pyarrow.acero``, which loads its Parquet and dataset libraries into each consumer)."""
    script = """
import sys
from datetime import datetime
from decimal import Decimal as D
from cardpipe.domain.records import CardProfile, Transaction
from cardpipe.stream import columnar
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor
columnar.load()
cards = {1: CardProfile(1, D("1000.00"), "11513")}
values = [
    encode_transaction(Transaction(t, 1, "M", datetime(2025, 4, 1), D(a), "x 11000", "purchase"))[1]
    for t, a in enumerate(["400.00", "499.00", "200.00", "100.00"], 1)
]
processor = StreamProcessor("t", cards, {1: D("0.00")}, lambda ids: {}, columnar=True)
got = processor.process([RawMessage(0, i, None, v, None) for i, v in enumerate(values)])
print(processor.columnar_batches, got.columns.decline_reason, "pyarrow.acero" in sys.modules)
"""
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["1", "[None,", "None,", "'over_credit_limit',", "None]", "False"]
