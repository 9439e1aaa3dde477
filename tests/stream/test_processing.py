"""The stream's processing step without a broker or a database (pure pipeline)."""

import json
from collections import Counter
from datetime import datetime
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardpipe.domain.authorization import Authorizer
from cardpipe.domain.records import DECLINED, PENDING, REJECTED, TRANSACTION_COLUMNS, CardProfile, Transaction
from cardpipe.stream.codec import Rejection, decode_transaction, encode_transaction
from cardpipe.stream.processing import RawBatch, RawMessage, StreamProcessor

CARDS = {1: CardProfile(1, D("1000.00"), "11513"), 2: CardProfile(2, D("500.00"), "20001")}
NEAR1, NEAR2 = "x, NY 10001", "y, DC 20002"


def tx(tid: int, card: int, amount: str, second: int = 0, location: str | None = None) -> Transaction:
    loc = location or (NEAR1 if card == 1 else NEAR2)
    return Transaction(tid, card, "M", datetime(2025, 4, 1, 0, 0, second), D(amount), loc, "purchase")


def messages(items, start=0):
    out = []
    for i, item in enumerate(items, start=start):
        value = encode_transaction(item)[1] if isinstance(item, Transaction) else item
        out.append(RawMessage(0, i, None, value, 1_000))
    return out


class Store:
    """An in-memory stand-in for the serving store's lookup."""

    def __init__(self):
        self.decided: dict[int, Transaction] = {}
        self.lookups = 0

    def lookup(self, ids):
        self.lookups += 1
        return {i: self.decided[i] for i in ids if i in self.decided}

    def commit(self, batch):
        for row in batch.decided:
            self.decided[row["transaction_id"]] = Transaction(*[row[k] for k in TRANSACTION_COLUMNS])


def processor(store, balances=None):
    return StreamProcessor("t", CARDS, balances or {1: D("0.00"), 2: D("100.00")}, store.lookup)


def test_decides_in_order_and_tracks_pending_balance():
    store = Store()
    batch = processor(store).process(messages([tx(1, 1, "100.00"), tx(2, 2, "250.00"), tx(3, 1, "-30.50", 1)]))
    assert [(r["transaction_id"], r["status"], r["pending_balance"]) for r in batch.decided] == [
        (1, PENDING, D("100.00")),
        (2, DECLINED, D("100.00")),
        (3, PENDING, D("69.50")),
    ]
    assert batch.decided[1]["decline_reason"] == "amount_over_half_limit"
    assert batch.next_offsets == {0: 3}
    assert batch.card_states[1].pending_balance == D("69.50")
    assert store.lookups == 1  # one lookup per batch


def test_duplicate_delivery_is_decided_once():
    store = Store()
    proc = processor(store)
    first = proc.process(messages([tx(1, 1, "100.00"), tx(2, 1, "50.00", 1)]))
    store.commit(first)
    again = proc.process(messages([tx(1, 1, "100.00"), tx(2, 1, "50.00", 1), tx(3, 1, "1.00", 2)], start=2))
    assert [r["transaction_id"] for r in again.decided] == [3]
    assert again.counts["duplicate_ignored"] == 2
    assert again.decided[0]["pending_balance"] == D("151.00")


def test_duplicate_within_one_batch_is_decided_once():
    batch = processor(Store()).process(messages([tx(1, 1, "100.00"), tx(1, 1, "100.00")]))
    assert len(batch.decided) == 1 and batch.counts["duplicate_ignored"] == 1


def test_duplicate_with_other_content_is_rejected_and_changes_nothing():
    store = Store()
    proc = processor(store)
    store.commit(proc.process(messages([tx(1, 1, "100.00")])))
    batch = proc.process(messages([tx(1, 1, "999.00")], start=1))
    assert batch.decided == [] and batch.rejected[0]["reason"] == "duplicate_conflict"
    assert proc.authorizer.balances[1] == D("100.00")


def test_duplicates_are_recognised_after_a_restart_from_the_checkpoint():
    store = Store()
    proc = processor(store)
    batch = proc.process(messages([tx(1, 1, "100.00"), tx(2, 1, "5.00", 3)]))
    store.commit(batch)
    state = batch.card_states[1]
    restarted = processor(store, balances={1: state.pending_balance, 2: D("100.00")})
    again = restarted.process(messages([tx(1, 1, "100.00"), tx(9, 1, "1.00", 1)]))
    # tx 1 is a duplicate; tx 9 is new although older than what the card saw (a late arrival): decided.
    assert again.counts["duplicate_ignored"] == 1
    assert [(r["transaction_id"], r["pending_balance"]) for r in again.decided] == [(9, D("106.00"))]


def test_bad_messages_are_rejected_with_reasons_and_never_stop_the_batch():
    good = tx(5, 1, "10.00")
    bad = [
        b"",
        b"not json",
        b"[1,2]",
        json.dumps({"transaction_id": 6}).encode(),
        encode_transaction(good)[1].replace(b'"10.00"', b"NaN"),
        b"\xff\xfe",
        encode_transaction(tx(7, 99, "1.00"))[1],
    ]
    batch = processor(Store()).process(messages([*bad, good]))
    reasons = [r["reason"] for r in batch.rejected]
    assert reasons == [
        "empty_message",
        "not_json",
        "not_an_object",
        "missing_field",
        "bad_amount",
        "not_utf8",
        "unknown_card",
    ]
    assert [r["status"] for r in batch.decided] == [REJECTED, PENDING]  # unknown card is recorded by id
    assert batch.rejected[3]["transaction_id"] == 6 and batch.rejected[1]["message_value"] == b"not json"
    assert batch.next_offsets == {0: 8}


def test_amount_as_json_number_is_accepted():
    value = encode_transaction(tx(1, 1, "12.34"))[1].replace(b'"12.34"', b"12.34")
    batch = processor(Store()).process(messages([value]))
    assert batch.decided[0]["amount"] == D("12.34")


# --- the tuple-based hot path decides as the plain per-message algorithm ------------------------------------


class ReferenceProcessor:
    """process() as first written: a Transaction and a Decision per message, a dict per row."""

    def __init__(self, balances, lookup):
        self.authorizer, self.lookup = Authorizer(CARDS, balances), lookup

    def process(self, messages):
        decided, rejected, states, offsets, counts = [], [], {}, {}, Counter()
        decoded = [(m, decode_transaction(m.value)) for m in messages]
        known = dict(self.lookup([r.transaction_id for _, r in decoded if isinstance(r, Transaction)]))

        def reject(m, reason, tid):
            counts["rejected"] += 1
            counts[f"rejected:{reason}"] += 1
            rejected.append((m.partition, m.offset, reason, tid))

        for m, r in decoded:
            offsets[m.partition] = m.offset + 1
            if isinstance(r, Rejection):
                reject(m, r.reason, r.transaction_id)
                continue
            previous = known.get(r.transaction_id)
            if previous is not None:
                if previous == r:
                    counts["duplicate_ignored"] += 1
                else:
                    reject(m, "duplicate_conflict", r.transaction_id)
                continue
            known[r.transaction_id] = r
            if self.authorizer.knows(r.card_id):
                d = self.authorizer.authorize(r)
                decided.append(
                    {
                        **{k: getattr(r, k) for k in FIELDS},
                        "status": d.status,
                        "pending_balance": d.pending_balance,
                        "decline_reason": d.reason,
                    }
                )
                counts[d.status] += 1
                if d.reason is not None:
                    counts[f"declined:{d.reason}"] += 1
                states[r.card_id] = self.authorizer.balances[r.card_id]
            else:
                decided.append(
                    {
                        **{k: getattr(r, k) for k in FIELDS},
                        "status": REJECTED,
                        "pending_balance": None,
                        "decline_reason": "unknown_card",
                    }
                )
                reject(m, "unknown_card", r.transaction_id)
                states[r.card_id] = None
        return decided, rejected, states, offsets, counts


FIELDS = TRANSACTION_COLUMNS


@st.composite
def message_stream(draw):
    out = []
    for i in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["new", "new", "new", "again", "conflict", "unknown", "bad"]))
        tid = draw(st.integers(1, 12))
        card = draw(st.sampled_from([1, 2]))
        amount = draw(st.sampled_from(["10.00", "-5.25", "250.00", "499.99", "500.00", "0.01"]))
        if kind == "unknown":
            card = 77
        if kind == "bad":
            out.append(draw(st.sampled_from([b"", b"{}", b"nope", b'{"transaction_id": 3}'])))
            continue
        if kind == "conflict":
            amount = "1.23"
        location = draw(st.sampled_from([None, "far away, CO 80202", "x NY 1000"]))
        out.append(tx(tid, card, amount, second=i % 60, location=location))
    return out


@settings(max_examples=150, deadline=None)
@given(items=message_stream(), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_processor_decides_as_the_plain_algorithm(items, cuts):
    new_store, ref_store = Store(), Store()
    new = processor(new_store)
    ref = ReferenceProcessor({1: D("0.00"), 2: D("100.00")}, ref_store.lookup)
    msgs = messages(items)
    bounds = [0, *sorted(c for c in cuts if c < len(msgs)), len(msgs)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        batch = new.process(msgs[a:b])
        decided, rejected, states, offsets, counts = ref.process(msgs[a:b])
        assert [dict(r) for r in batch.decided] == decided
        assert [
            (r["kafka_partition"], r["kafka_offset"], r["reason"], r["transaction_id"]) for r in batch.rejected
        ] == rejected
        assert {c: s.pending_balance for c, s in batch.card_states.items()} == states
        assert batch.next_offsets == offsets and batch.counts == counts
        new_store.commit(batch)
        ref_store.commit(batch)
    assert new.authorizer.balances == ref.authorizer.balances


def test_a_raw_batch_is_its_messages_as_columns() -> None:
    listed = [RawMessage(3, 10, b"1", b"{}", 5), RawMessage(1, 4, None, None), RawMessage(3, 11, b"2", b"[]", 7)]
    batch = RawBatch.of(listed)
    assert (batch.partitions, batch.offsets, batch.keys, batch.values, batch.timestamps) == (
        [3, 1, 3],
        [10, 4, 11],
        [b"1", None, b"2"],
        [b"{}", None, b"[]"],
        [5, None, 7],
    )
    assert list(batch) == listed and all(type(m) is RawMessage for m in batch)
    assert (len(batch), batch[1], batch[-1]) == (3, listed[1], listed[2])
    assert list(batch[1:]) == listed[1:] and isinstance(batch[1:], RawBatch)
    assert RawBatch.of(batch) is batch and len(RawBatch.of([])) == 0 and not RawBatch.of(iter([]))
    with pytest.raises(ValueError, match="equally long"):
        RawBatch([0], [1, 2], [None], [None], [None])


@pytest.mark.parametrize("columnar", [False, True])  # True: pyarrow, which the test install has
@pytest.mark.parametrize("valid", [True, False])
def test_a_batch_is_decided_the_same_given_as_a_list_or_as_columns(columnar: bool, valid: bool) -> None:
    items = [tx(1, 1, "100.00"), tx(2, 2, "600.00"), tx(3, 1, "95.50", 2), tx(4, 2, "-20.00", 3)]
    if not valid:
        items.insert(1, b"not json")  # the whole batch goes the per-message way
    decided = []
    for given_as in (messages, lambda xs: RawBatch.of(messages(xs))):
        processor = StreamProcessor(
            "t",
            CARDS,
            {1: D("0.00"), 2: D("100.00")},
            Store().lookup,
            clock=lambda: datetime(2025, 4, 1),
            columnar=columnar,
        )
        batch = processor.process(given_as(items))
        assert processor.columnar_batches == (1 if columnar and valid else 0)
        decided.append((batch.decision_rows(), batch.rejected, batch.next_offsets, dict(batch.counts)))
    assert decided[0] == decided[1]
    assert decided[0][2] == {0: len(items)}
