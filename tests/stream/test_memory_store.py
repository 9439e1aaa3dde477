"""The stream pipeline with the in-memory checkpoint store: decide, checkpoint, adopt a settlement's limits."""

from datetime import datetime
from decimal import Decimal as D

import pytest

from cardpipe.domain.records import CardProfile, Transaction
from cardpipe.errors import PartitionsHeld, SettlementChanged
from cardpipe.stream.checkpoints import MemoryCheckpointStore
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor

CARD = CardProfile(7, D("1000.00"), "10001")


def tx(i: int, amount: str) -> Transaction:
    return Transaction(i, 7, "Shop", datetime(2025, 4, 1, 0, 0, i), D(amount), "x, NY 10002", "purchase")


def messages(txs, start=0):
    return [RawMessage(0, start + i, *encode_transaction(t), None) for i, t in enumerate(txs)]


def resumed(store: MemoryCheckpointStore) -> StreamProcessor:
    settlement_id, profiles = store.settled_profiles()
    balances, _ = store.restore()
    return StreamProcessor(store.topic, profiles, balances, store.lookup_decided, settlement_id=settlement_id)


def test_a_settlement_changes_the_limits_and_a_stale_batch_is_refused():
    store = MemoryCheckpointStore("t", {7: CARD}, {7: D("0.00")})
    proc = resumed(store)
    store.commit_durably(proc.process(messages([tx(1, "300.00")])))
    stale = proc.process(messages([tx(2, "300.00")], start=1))
    store.publish(1, {7: CardProfile(7, D("500.00"), "10001")})
    with pytest.raises(SettlementChanged):
        store.commit_durably(stale)
    proc = resumed(store)
    batch = proc.process(messages([tx(2, "300.00")], start=1))
    store.commit_durably(batch)
    # Judged against the settlement's 500.00: 300 is over half of it; the pending balance carries on.
    assert batch.decided[0]["decline_reason"] == "amount_over_half_limit"
    assert batch.positions == [(0, D("500.00"))]
    assert store.restore() == ({7: D("300.00")}, {0: 2})
    assert store.lookup_decided([1, 2, 3]).keys() == {1, 2}


def test_partitions_held_by_another_owner_are_refused():
    store = MemoryCheckpointStore("t", {7: CARD}, {}, owner="a")
    assert store.acquire([0, 1]) == [0, 1]
    other = MemoryCheckpointStore("t", {7: CARD}, {}, owner="b")
    other.leases = store.leases
    with pytest.raises(PartitionsHeld):
        other.acquire([0, 1])
    store.release()
    assert other.acquire([1]) == [1]
