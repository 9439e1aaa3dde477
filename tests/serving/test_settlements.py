"""Partition leases, checkpoint sequences and settlement claims on SQLite and MariaDB."""

import os
import subprocess
import sys
import time
from datetime import datetime
from decimal import Decimal as D

import pytest
from sqlalchemy import func, select, text

from cardpipe.domain.records import Transaction
from cardpipe.errors import LeaseLost, PartitionsHeld, SettlementChanged
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from cardpipe.serving.owners import holder_is_dead, process_owner
from cardpipe.serving.settlements import NothingNew, SettlementRunning, SettlementStore
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor


@pytest.fixture
def engine(database_url, seed_dataset):
    engine = make_engine(database_url)
    create_clean_schema(engine)
    load_inputs(engine, seed_dataset / "input")
    yield engine
    engine.dispose()


def tx(i: int, card: int = 26, amount: str = "10.00") -> Transaction:
    return Transaction(i, card, "Shop", datetime(2025, 4, 1, 1, 0, i % 60), D(amount), "x, NY 10859", "purchase")


def messages(txs, partition=0, start=0):
    return [RawMessage(partition, start + i, *encode_transaction(t), None) for i, t in enumerate(txs)]


def processor(store: StreamStore) -> StreamProcessor:
    settlement_id, profiles = store.settled_profiles()
    balances, _ = store.restore()
    return StreamProcessor(store.topic, profiles, balances, store.lookup_decided, settlement_id=settlement_id)


# --------------------------------------------------------------------------------------------- leases


def test_a_second_consumer_takes_only_free_partitions_and_refuses_when_none_is(engine):
    first = StreamStore(engine, "t", owner="hostA:1")
    second = StreamStore(engine, "t", owner="hostB:2")
    assert first.acquire([0, 1, 2]) == [0, 1, 2]
    assert second.acquire([2, 3]) == [3]
    with pytest.raises(PartitionsHeld, match=r"hostA:1 holds partition\(s\) 0, 1"):
        second.acquire([0, 1])
    first.release()
    assert second.acquire([0, 1]) == [0, 1]


def test_an_expired_lease_or_a_dead_holder_of_this_host_is_taken_over(engine):
    short = StreamStore(engine, "t", owner="hostA:1", lease_seconds=0.2)
    assert short.acquire([0]) == [0]
    other = StreamStore(engine, "t", owner="hostB:2")
    with pytest.raises(PartitionsHeld):
        other.acquire([0])
    time.sleep(0.3)
    assert other.acquire([0]) == [0]
    # The first consumer's next checkpoint notices it lost the partition.
    with pytest.raises(LeaseLost), engine.begin() as conn:
        short._renew(conn)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{process_owner().rsplit(':', 1)[0]}:{dead.stdout.strip()}"
    assert holder_is_dead(dead_owner) and not holder_is_dead(process_owner()) and not holder_is_dead("elsewhere:1")
    StreamStore(engine, "t", owner=dead_owner).acquire([5])
    assert StreamStore(engine, "t").acquire([5]) == [5]


def test_checkpoints_renew_leases_and_count_per_partition(engine):
    store = StreamStore(engine, "t")
    store.acquire([0, 1])
    proc = processor(store)
    store.commit(proc.process(messages([tx(1), tx(2)], partition=0)))
    store.commit(proc.process(messages([tx(3)], partition=0, start=2) + messages([tx(4)], partition=1)))
    with engine.connect() as conn:
        seqs = dict(
            conn.execute(select(schema.stream_offsets.c.kafka_partition, schema.stream_offsets.c.checkpoint_seq)).all()
        )
        rows = conn.execute(
            select(
                schema.stream_transactions.c.transaction_id,
                schema.stream_transactions.c.kafka_partition,
                schema.stream_transactions.c.checkpoint_seq,
                schema.stream_transactions.c.credit_limit,
            ).order_by(schema.stream_transactions.c.transaction_id)
        ).all()
    assert seqs == {0: 2, 1: 1}
    assert [tuple(r[:3]) for r in rows] == [(1, 0, 1), (2, 0, 1), (3, 0, 2), (4, 1, 1)]
    with engine.connect() as conn:
        limit = conn.execute(select(schema.cards.c.credit_limit).where(schema.cards.c.card_id == 26)).scalar()
    assert {r[3] for r in rows} == {limit}
    # Forgetting the offsets (a recreated topic) keeps the sequence: watermarks never go back.
    store.reset_offsets()
    assert store.restore()[1] == {}
    store.commit(proc.process(messages([tx(5)], partition=0)))
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(schema.stream_transactions.c.checkpoint_seq).where(
                    schema.stream_transactions.c.transaction_id == 5
                )
            ).scalar()
            == 3
        )


# --------------------------------------------------------------------------------------------- settlements


def publish_settlement(engine, limit: str) -> int:
    """A settlement of the current decisions that sets every card's limit to ``limit``."""
    store = SettlementStore(engine, "t")
    claim = store.claim("me:1", "embedded")
    assert not isinstance(claim, NothingNew)
    with engine.connect() as conn:
        cards = [dict(r) for r in conn.execute(select(schema.cards)).mappings()]
        customers = [dict(r) for r in conn.execute(select(schema.customers)).mappings()]
    store.store_rows(claim.settlement_id, [{**c, "credit_limit": D(limit)} for c in cards], customers)
    store.publish(claim.settlement_id, {"transactions": 0})
    return claim.settlement_id


def test_a_checkpoint_decided_before_a_settlement_was_published_is_refused(engine):
    store = StreamStore(engine, "t")
    store.acquire([0])
    proc = processor(store)
    store.commit(proc.process(messages([tx(1)])))
    stale = proc.process(messages([tx(2)], start=1))
    first = publish_settlement(engine, "100.00")
    with pytest.raises(SettlementChanged):
        store.commit(stale)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM stream_transactions")).scalar() == 1  # nothing written
    # Decided again with the settlement's limits: 10.00 is no longer under half the limit? it is (100 / 2 = 50).
    proc = processor(store)
    assert proc.settlement_id == first and proc.authorizer.limit_of(26) == D("100.00")
    batch = proc.process(messages([tx(2, amount="60.00")], start=1))
    store.commit(batch)
    assert batch.decided[0]["decline_reason"] == "amount_over_half_limit"


def test_claims_fix_a_watermark_and_refuse_a_second_live_settlement(engine):
    store = StreamStore(engine, "t")
    store.acquire([0, 1])
    proc = processor(store)
    store.commit(proc.process(messages([tx(1)], partition=0) + messages([tx(2)], partition=1)))
    settlements = SettlementStore(engine, "t")
    claim = settlements.claim(process_owner(), "embedded")
    assert not isinstance(claim, NothingNew) and claim.watermark == {0: 1, 1: 1} and claim.previous_id is None
    with pytest.raises(SettlementRunning, match=f"settlement {claim.settlement_id} is running"):
        SettlementStore(engine, "t").claim("other:2", "embedded")
    settlements.store_rows(claim.settlement_id, [], [])
    settlements.publish(claim.settlement_id, {"transactions": 2, "approved": 2})
    # Nothing decided since: nothing to settle, nothing recorded.
    again = settlements.claim(process_owner(), "embedded")
    assert again == NothingNew(claim.settlement_id)
    with pytest.raises(SettlementChanged):  # decided with the original limits, after the settlement
        store.commit(proc.process(messages([tx(3)], partition=1, start=1)))
    store.commit(processor(store).process(messages([tx(3)], partition=1, start=1)))
    later = settlements.claim(process_owner(), "embedded")
    assert not isinstance(later, NothingNew) and later.watermark == {0: 1, 1: 2}
    assert later.previous_id == claim.settlement_id


def test_a_dead_settlement_is_marked_failed_and_leaves_the_previous_one_in_force(engine):
    first = publish_settlement(engine, "100.00")
    store = StreamStore(engine, "t")
    store.acquire([0])
    store.commit(processor(store).process(messages([tx(1)])))
    settlements = SettlementStore(engine, "t")
    dead = settlements.claim("elsewhere:1", "embedded")
    assert not isinstance(dead, NothingNew)
    with engine.connect() as conn:
        cards = [dict(r) for r in conn.execute(select(schema.cards)).mappings()]
    settlements.store_rows(dead.settlement_id, [{**c, "credit_limit": D("1.00")} for c in cards[:3]], [])
    with engine.begin() as conn:  # its heartbeat stopped long ago
        conn.execute(
            schema.settlements.update()
            .where(schema.settlements.c.settlement_id == dead.settlement_id)
            .values(heartbeat_at=time.time() - 3600)
        )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT DISTINCT credit_limit FROM cards_updated")).scalars().all() == [D("100.00")]
    claim = settlements.claim(process_owner(), "embedded")
    assert not isinstance(claim, NothingNew)
    settlements.fail(claim.settlement_id, "boom")
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(schema.settlements.c.settlement_id, schema.settlements.c.status)).all())
        leftovers = conn.execute(
            text("SELECT COUNT(*) FROM settled_cards WHERE settlement_id <> :s"), {"s": first}
        ).scalar()
        in_force = conn.execute(select(schema.serving_state.c.settlement_id)).scalar()
    assert statuses == {first: "published", dead.settlement_id: "failed", claim.settlement_id: "failed"}
    assert leftovers == 0 and in_force == first


def test_holder_names_this_process(engine):
    assert process_owner().endswith(f":{os.getpid()}")


def _claim_at_once(stores: list[StreamStore]) -> dict[int, object]:
    import threading

    results: dict[int, object] = {}
    start = threading.Barrier(len(stores))

    def claim(i: int) -> None:
        start.wait()
        try:
            results[i] = stores[i].acquire(range(i, 8, len(stores)))
        except Exception as exc:  # recorded, asserted by the caller
            results[i] = exc

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_consumers_claiming_at_the_same_moment_all_get_their_partitions(engine):
    """Two workers claim disjoint partitions at once, many times (on MySQL both may lock the same gap of missing
    leases and one is picked as a deadlock victim: it claims again)."""
    for round_ in range(15):
        stores = [StreamStore(engine, f"topic-{round_}", owner=f"host:{i}") for i in range(2)]
        assert _claim_at_once(stores) == {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}


def test_load_cards_gives_what_card_profiles_and_restore_give(engine, monkeypatch):
    """The consumer's per-batch read of new cards agrees with the full reads: before a checkpoint, after one and
    under a published settlement's limits (balances stay the checkpoint's); unknown ids are left out; ids past
    one query's worth are read in several."""
    import cardpipe.serving.stream_store as stream_store

    monkeypatch.setattr(stream_store, "_LOOKUP_CHUNK", 7)
    store = StreamStore(engine, "t")
    store.acquire([0])

    def expected(settlement_id):
        profiles, (balances, _) = store.card_profiles(settlement_id), store.restore()
        return {c: (profiles[c], balances[c]) for c in profiles}

    ids = sorted(store.card_profiles())
    assert len(ids) > 2 * 7
    assert store.load_cards([*ids, 10**12], None) == expected(None)
    proc = processor(store)
    store.commit(proc.process(messages([tx(1), tx(2, amount="-3.50")])))
    loaded = store.load_cards(ids)
    assert loaded == expected(None)
    assert loaded[26][1] == proc.authorizer.balances[26] != expected(None)[27][1]
    first = publish_settlement(engine, "123.45")
    under = store.load_cards(ids[:5] + [26], first)
    assert under == {c: v for c, v in expected(first).items() if c in {*ids[:5], 26}}
    assert {p.credit_limit for p, _ in under.values()} == {D("123.45")}
    assert under[26][1] == loaded[26][1]
    assert store.load_cards([10**12, 10**12 + 1]) == {}


def test_a_processor_loading_its_cards_decides_as_one_given_them_all(engine):
    """Cards loaded as they first come (the consumer's way) give the same decisions, balances and checkpoints
    as every card read up front, across a settlement that lowers the limits; each card is read once per set of
    limits."""
    store = StreamStore(engine, "t")
    store.acquire([0])
    eager = processor(store)
    asked: list[list[int]] = []

    def load(ids, settlement_id):
        asked.append(sorted(ids))
        return store.load_cards(ids, settlement_id)

    lazy = StreamProcessor(store.topic, {}, {}, store.lookup_decided, load_cards=load)
    txs = [tx(i, card=26 if i % 3 else 27, amount=f"{(i * 37) % 90 - 20}.25") for i in range(1, 40)]
    txs.append(tx(40, card=999_999))  # an unknown card
    first = [eager.process(messages(txs[:20])), lazy.process(messages(txs[:20]))]
    assert first[0].decided == first[1].decided and first[0].card_states == first[1].card_states
    assert asked == [[26, 27]]
    store.commit(first[1])
    settlement = publish_settlement(engine, "60.00")
    eager.adopt(settlement, store.card_profiles(settlement))
    lazy.adopt(settlement)
    rest = messages(txs[20:], start=20)
    second = [eager.process(rest), lazy.process(rest)]
    assert second[0].decided == second[1].decided and second[0].card_states == second[1].card_states
    assert asked == [[26, 27], [26, 27, 999_999]]
    assert lazy.authorizer.limit_of(26) == D("60.00") and lazy.cards_loaded == 5
    assert sum(r["status"] == "rejected" for r in second[1].decided) == 1


def test_rows_stored_as_fetched_hold_what_the_typed_rows_hold(engine):
    """``store_texts`` (money and dates as their text, as an engine fetches them) stores on SQLite every value
    as ``store_rows`` stores it typed: the same storage class and the same value, whole amounts, cents and
    negative ones included. Elsewhere it stores nothing and says so (None): the caller types the rows."""
    from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS

    with engine.connect() as conn:
        cards = [dict(r._mapping) for r in conn.execute(select(*[schema.cards.c[c] for c in CARD_COLUMNS]))]
        customers = [dict(r._mapping) for r in conn.execute(select(*[schema.customers.c[c] for c in CUSTOMER_COLUMNS]))]
    for card, balance in zip(cards, ["-0.01", "0.10", "12345678.91", "700.00", "-250.50"], strict=False):
        card["current_balance"] = D(balance)
    customers[0]["annual_income"], customers[1]["annual_income"] = D("85000.00"), D("0.05")
    for card in cards:
        card["settled_count"] = card["card_id"] % 3

    def as_fetched(rows):  # money and dates as their text, the rest as it is
        names = tuple(rows[0])
        texts = [tuple(v if v is None or isinstance(v, int | str) else str(v) for v in row.values()) for row in rows]
        return names, texts

    store = SettlementStore(engine, "t")
    stored = store.store_texts(2, as_fetched(cards), as_fetched(customers))
    if engine.dialect.name != "sqlite":
        assert stored is None
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(schema.settled_cards)).scalar() == 0
        return
    assert stored == {schema.CARDS_UPDATED: len(cards), schema.CUSTOMERS_UPDATED: len(customers)}
    assert store.store_rows(1, cards, customers) == stored
    for table, key, rows in (
        (schema.settled_cards, "card_id", cards),
        (schema.settled_customers, "customer_id", customers),
    ):
        names = [c.name for c in table.columns if c.name != "settlement_id"]
        cells = ", ".join(f"{n}, typeof({n})" for n in names)
        with engine.connect() as conn:
            typed, fetched = (
                conn.execute(text(f"SELECT {cells} FROM {table.name} WHERE settlement_id = {sid} ORDER BY {key}")).all()
                for sid in (1, 2)
            )
        assert len(typed) == len(rows)
        assert fetched == typed
