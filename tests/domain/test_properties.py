"""Property tests of SPEC §3-§4: authorization and settlement invariants, and independence of the stream's
results from how the topic is split into polled batches and partitions.

The oracles here are written from SPEC's text (exact ``Fraction`` arithmetic), not from the product's code.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal as D
from fractions import Fraction
from functools import cache
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from cardpipe.domain.authorization import Authorizer
from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    APPROVED,
    DECLINED,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    PENDING,
    REJECTED,
    TRANSACTION_COLUMNS,
    Card,
    CardProfile,
    Customer,
    Transaction,
)
from cardpipe.domain.settlement import SettledTransaction, settle
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor

CENT = D("0.01")
UNKNOWN_CARD_ID = 99
T0 = datetime(2025, 4, 1, 0, 0, 0)

# Customer zips: missing, short, long, non-digit, near (1…) and far (2…, 9…) from the locations below.
ZIPS = [None, "", "1", "1151", "11513", "10001", "19446", "20001", "90210", "11513-1234", "A1513"]
# Transaction locations: the zip is the last whitespace token (missing, short, near, far, odd whitespace).
LOCATIONS = [
    "",
    "   ",
    "Online",
    "10001",
    "x, NY 1000",
    "4395 Brenda Lake, Queens, NY 10859",
    "x, NY 19446",
    "x, DC 20001",
    "x, CA 90210",
    "x,  NY  11111",
    "x,\u00a0NY\u00a012345",
    "x, NY 11513-0000",
    "x, NY A1513",
]

limits = st.one_of(
    st.just(D("0.00")),
    st.sampled_from([100, 200, 500, 1000, 1200, 2500, 5000, 66300]).map(lambda n: D(n).quantize(CENT)),
    st.integers(1, 300).map(lambda h: D(h * 100).quantize(CENT)),
)


def money(low: D | int, high: D | int) -> st.SearchStrategy[D]:
    """Dollars with cents in [low, high] (drawn as integer cents: fast, and every cent is reachable)."""
    return st.integers(int(low * 100), int(high * 100)).map(lambda cents: D(cents).scaleb(-2))


@cache
def amounts(limit: D) -> st.SearchStrategy[D]:
    """Any amount, with the boundaries weighted in: exactly half the limit, a cent either side, the limit."""
    half = (limit / 2).quantize(CENT)
    specials = sorted({half, -half, half - CENT, -(half - CENT), half + CENT, D("0.00"), CENT, -CENT, limit, -limit})
    return st.one_of(st.sampled_from(specials), money(-limit - 100, limit + 100), money(-20, 20))


@dataclass(frozen=True)
class World:
    customers: list[Customer]
    cards: list[Card]
    zips: dict[int, str | None]  # customer_id -> zip of its address

    def profiles(self) -> dict[int, CardProfile]:
        return {c.card_id: CardProfile(c.card_id, c.credit_limit, self.zips[c.customer_id]) for c in self.cards}

    def balances(self) -> dict[int, D]:
        return {c.card_id: c.current_balance for c in self.cards}

    def card(self, card_id: int) -> Card:
        return next(c for c in self.cards if c.card_id == card_id)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n_customers = draw(st.integers(1, 3))  # a customer may end up with no card
    customers = [Customer(i, draw(st.integers(300, 850))) for i in range(1, n_customers + 1)]
    cards = []
    for card_id in range(1, draw(st.integers(1, 4)) + 1):
        limit = draw(limits)
        balance = draw(st.one_of(money(-2000, limit + 1000), st.sampled_from([D("0.00"), limit, limit / 2])))
        cards.append(Card(card_id, draw(st.integers(1, n_customers)), limit, balance.quantize(CENT)))
    zips = {c.customer_id: draw(st.sampled_from(ZIPS)) for c in customers}
    return World(customers, cards, zips)


@st.composite
def transactions(
    draw: st.DrawFn, world: World, *, max_size: int = 25, unknown_cards: bool = False
) -> list[Transaction]:
    """A stream in timestamp order (ties allowed), ids increasing, on the world's cards (and maybe an unknown one)."""
    card_ids = [c.card_id for c in world.cards] + ([UNKNOWN_CARD_ID] if unknown_cards else [])
    out = []
    when = T0
    for tid in range(1, draw(st.integers(0, max_size)) + 1):
        card_id = draw(st.sampled_from(card_ids))
        limit = world.card(card_id).credit_limit if card_id != UNKNOWN_CARD_ID else D("1000.00")
        when += timedelta(seconds=draw(st.integers(0, 2)))
        out.append(
            Transaction(
                tid,
                card_id,
                draw(st.sampled_from(["Shop", 'Barrett "LLC"', "Ünïcode ✓"])),
                when,
                draw(amounts(limit)),
                draw(st.sampled_from(LOCATIONS)),
                draw(st.sampled_from(["purchase", "refund", "bill_payment"])),
                None,
            )
        )
    return out


# --- oracles from SPEC's text ---------------------------------------------------------------------------


def spec_zip(text: str | None) -> str | None:
    tokens = (text or "").split()
    return tokens[-1] if tokens else None


def spec_decline_reason(tx: Transaction, limit: D, customer_zip: str | None, balance: D) -> str | None:
    merchant_zip = spec_zip(tx.location)
    if abs(Fraction(tx.amount)) >= Fraction(limit) / 2:
        return AMOUNT_OVER_HALF_LIMIT
    if (
        not customer_zip
        or not merchant_zip
        or len(customer_zip) < 5
        or len(merchant_zip) < 5
        or customer_zip[0] != merchant_zip[0]
    ):
        return LOCATION_TOO_FAR
    if Fraction(balance) + Fraction(tx.amount) > Fraction(limit):
        return OVER_CREDIT_LIMIT
    return None


def spec_score_change(balance: D, limit: D) -> int:
    if limit <= 0:  # README: no limit at all counts as 0 % used when nothing is owed, else over every bound
        return 15 if balance <= 0 else -25
    utilization = Fraction(balance) * 100 / Fraction(limit)
    for bound, change in ((10, 15), (20, 10), (30, 5), (50, -5), (70, -15)):
        if utilization <= bound:
            return change
    return -25


def spec_new_limit(limit: D, change: int) -> Fraction:
    if change >= 0:
        return Fraction(limit)
    factor = Fraction("0.85") if change <= -20 else Fraction("0.90") if change <= -10 else Fraction("0.95")
    return round(Fraction(limit) * factor, -2)  # Fraction rounds half to even, as SPEC's round(x, -2)


# --- (a) (b) (c): authorization ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_authorization_keeps_every_card_within_its_limit_and_declines_change_nothing(data):
    world = data.draw(worlds())
    txs = data.draw(transactions(world))
    profiles, initial = world.profiles(), world.balances()
    authorizer = Authorizer(profiles, initial)
    pending_sums: dict[int, D] = defaultdict(D)
    for tx in txs:
        card = profiles[tx.card_id]
        before = dict(authorizer.balances)
        decision = authorizer.authorize(tx)
        assert decision.reason == spec_decline_reason(tx, card.credit_limit, card.customer_zip, before[tx.card_id])
        if decision.status == PENDING:
            # (a) an accepted transaction never takes the pending balance over the limit
            assert decision.pending_balance <= card.credit_limit
            assert decision.pending_balance == before[tx.card_id] + tx.amount
            assert authorizer.balances == {**before, tx.card_id: decision.pending_balance}
            pending_sums[tx.card_id] += tx.amount
        else:
            # (b) a decline changes no balance, and reports the unchanged one
            assert decision.status == DECLINED and decision.reason is not None
            assert decision.pending_balance == before[tx.card_id]
            assert authorizer.balances == before
    # (c) every card ends at its initial balance plus its pending amounts
    assert authorizer.balances == {cid: initial[cid] + pending_sums[cid] for cid in initial}


# --- (d): settlement does not depend on order, batching or partitioning -----------------------------------


def settled(rows: dict[int, dict]) -> list[SettledTransaction]:
    return [SettledTransaction(tid, r["card_id"], r["amount"], r["status"]) for tid, r in sorted(rows.items())]


def settlement_key(result) -> tuple:
    return (
        sorted((t.transaction_id, t.card_id, t.amount, t.status) for t in result.transactions),
        sorted((c.card_id, c.customer_id, c.credit_limit, c.current_balance) for c in result.cards),
        sorted((c.customer_id, c.credit_score) for c in result.customers),
    )


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_settlement_does_not_depend_on_the_order_of_its_inputs(data):
    world = data.draw(worlds())
    txs = [
        SettledTransaction(
            t.transaction_id, t.card_id, t.amount, data.draw(st.sampled_from([PENDING, DECLINED, REJECTED]))
        )
        for t in data.draw(transactions(world, unknown_cards=True))
    ]
    reference = settle(txs, world.cards, world.customers)
    shuffled = settle(
        data.draw(st.permutations(txs)),
        data.draw(st.permutations(world.cards)),
        data.draw(st.permutations(world.customers)),
    )
    assert settlement_key(shuffled) == settlement_key(reference)


class MemoryStore:
    """The serving store's role for the processor: committed decisions, unique by transaction_id (a primary key)."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def lookup(self, ids: list[int]) -> dict[int, Transaction]:
        return {i: Transaction(*(self.rows[i][k] for k in TRANSACTION_COLUMNS)) for i in ids if i in self.rows}

    def commit(self, batch) -> None:
        for row in batch.decided:
            assert row["transaction_id"] not in self.rows, f"transaction {row['transaction_id']} decided twice"
            self.rows[row["transaction_id"]] = row


def run_stream(world: World, batches: list[list[RawMessage]]) -> dict[int, dict]:
    store = MemoryStore()
    processor = StreamProcessor("t", world.profiles(), world.balances(), store.lookup)
    for batch in batches:
        store.commit(processor.process(batch))
    return store.rows


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stream_results_and_settlement_do_not_depend_on_batches_or_partitions(data):
    world = data.draw(worlds())
    txs = data.draw(transactions(world, unknown_cards=True))
    # The message sequence: every transaction, plus exact re-deliveries somewhere after their original.
    sequence = list(txs)
    for _ in range(data.draw(st.integers(0, 3)) if txs else 0):
        original = data.draw(st.sampled_from(txs))
        sequence.insert(data.draw(st.integers(sequence.index(original) + 1, len(sequence))), original)
    values = [encode_transaction(t) for t in sequence]

    one_batch = run_stream(world, [[RawMessage(0, i, k, v) for i, (k, v) in enumerate(values)]])

    # Split by card over partitions (a card's order kept), partitions interleaved at random, random batch sizes.
    partition_of = {cid: data.draw(st.integers(0, 2)) for cid in {t.card_id for t in sequence}}
    queues: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for tx, kv in zip(sequence, values, strict=True):
        queues[partition_of[tx.card_id]].append(kv)
    labels = data.draw(st.permutations([p for p, q in queues.items() for _ in q]))
    next_offset: dict[int, int] = defaultdict(int)
    messages = []
    for p in labels:
        key, value = queues[p].pop(0)
        messages.append(RawMessage(p, next_offset[p], key, value))
        next_offset[p] += 1
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(messages) - 1)), max_size=10)))
    bounds = [0, *[c for c in cuts if c < len(messages)], len(messages)]
    split = run_stream(world, [messages[a:b] for a, b in pairwise(bounds)])

    assert split == one_batch
    assert sorted(one_batch) == [t.transaction_id for t in txs]
    assert settlement_key(settle(settled(split), world.cards, world.customers)) == settlement_key(
        settle(settled(one_batch), world.cards, world.customers)
    )


# --- (e): settlement invariants ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_settlement_keeps_scores_in_range_and_only_lowers_limits_to_hundreds(data):
    world = data.draw(worlds())
    txs = [
        SettledTransaction(
            t.transaction_id, t.card_id, t.amount, data.draw(st.sampled_from([PENDING, DECLINED, REJECTED]))
        )
        for t in data.draw(transactions(world, unknown_cards=True))
    ]
    result = settle(txs, world.cards, world.customers)

    assert [t.status for t in result.transactions] == [APPROVED if t.status == PENDING else t.status for t in txs]
    approved: dict[int, D] = defaultdict(D)
    for t in txs:
        if t.status == PENDING:
            approved[t.card_id] += t.amount
    old_cards = {c.card_id: c for c in world.cards}
    new_cards = {c.card_id: c for c in result.cards}
    assert new_cards.keys() == old_cards.keys()
    balance: dict[int, D] = defaultdict(D)
    limit: dict[int, D] = defaultdict(D)
    for cid, card in new_cards.items():
        assert card.current_balance == old_cards[cid].current_balance + approved[cid]
        balance[card.customer_id] += card.current_balance
        limit[card.customer_id] += old_cards[cid].credit_limit
    changes = {cu: spec_score_change(balance[cu], limit[cu]) for cu in limit}

    old_scores = {c.customer_id: c.credit_score for c in world.customers}
    new_scores = {c.customer_id: c.credit_score for c in result.customers}
    assert new_scores.keys() == old_scores.keys()  # every customer kept, with or without a card
    for cu, score in new_scores.items():
        assert 300 <= score <= 850
        expected = old_scores[cu] if cu not in changes else max(300, min(850, old_scores[cu] + changes[cu]))
        assert score == expected
    for cid, card in new_cards.items():
        old_limit, change = old_cards[cid].credit_limit, changes[card.customer_id]
        assert card.credit_limit <= old_limit, "a limit increased"
        if card.credit_limit != old_limit:
            assert change < 0, "a limit changed although the score did not fall"
            assert card.credit_limit % 100 == 0, "a new limit is not a multiple of 100"
        assert Fraction(card.credit_limit) == spec_new_limit(old_limit, change)
        assert card.credit_limit == card.credit_limit.quantize(CENT)
