"""The merged views of SPEC §9 on the bundled sample: before any settlement, with decisions after a settlement's
watermark, across two settlements; a property test against a plain Python model; the same on MariaDB."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, and_, delete, func, literal, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from cardpipe.config import SAMPLE_DATA_DIR
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from cardpipe.serving.settlement_source import settled_counts
from cardpipe.serving.stream_store import card_states_writer
from cardpipe.serving.views import (
    card_view,
    customer_view,
    mask_card_number,
    read_snapshot,
    service_counts,
    to_json,
    transaction_view,
)

# The sample's card 1 and 2 (customer 2, "Kyle Silva", score 803); customer 1 has no card.
CARD1_NUMBER, CARD1_LIMIT, CARD1_BALANCE = "4109-1661-0231-7934", D("14300.00"), D("420.18")
CARD2_BALANCE = D("57.49")


def sqlite_engine(path: Path) -> Engine:
    engine = make_engine(make_url("sqlite:///" + str(path)))
    return engine


@dataclass
class Serving:
    """A serving database holding the bundled sample; decisions and settlements are written directly."""

    engine: Engine

    @classmethod
    def create(cls, engine: Engine) -> Serving:
        create_clean_schema(engine)
        load_inputs(engine, SAMPLE_DATA_DIR)
        return cls(engine)

    def decide(
        self,
        transaction_id: int,
        card_id: int,
        amount: str,
        *,
        status: str = "pending",
        partition: int = 0,
        seq: int = 1,
        reason: str | None = None,
        balance: str | None = "0.00",
        limit: str | None = "14300.00",
    ) -> None:
        row = {
            "transaction_id": transaction_id,
            "card_id": card_id,
            "merchant_name": f"Shop {transaction_id}",
            "timestamp": datetime(2025, 4, 1, 10, 0, transaction_id % 60),
            "amount": amount,
            "location": "1 Main St, Albany, NY 12207",
            "transaction_type": "purchase",
            "related_transaction_id": None,
            "status": status,
            "pending_balance": balance,
            "decline_reason": reason,
            "credit_limit": limit,
            "kafka_partition": partition,
            "checkpoint_seq": seq,
        }
        with self.engine.begin() as conn:
            conn.execute(schema.stream_transactions.insert(), [row])
            if balance is not None:  # the card's stream counters, as the consumer's checkpoint writes them
                card_states_writer(conn.dialect).write(conn, [(card_id, D(balance), 1 if status == "pending" else 0)])

    def reject(self, transaction_id: int | None, reason: str, detail: str = "a detail") -> None:
        with self.engine.begin() as conn:
            conn.execute(
                schema.rejected_transactions.insert(),
                [
                    {
                        "topic": "t",
                        "kafka_partition": 0,
                        "kafka_offset": 1,
                        "transaction_id": transaction_id,
                        "reason": reason,
                        "detail": detail,
                        "message_key": b"k",
                        "message_value": b"v",
                        "recorded_at": datetime(2025, 4, 1),
                    }
                ],
            )

    def settle(
        self,
        settlement_id: int,
        watermarks: dict[int, int],
        *,
        cards: dict[int, tuple[str, str]] | None = None,
        scores: dict[int, int] | None = None,
        status: str = schema.SETTLEMENT_PUBLISHED,
        in_force: bool = True,
    ) -> None:
        """Settlement ``settlement_id``: every card and customer copied, then ``cards`` (card -> (limit, balance))
        and ``scores`` applied; ``in_force``: publish it (serving_state points at it)."""
        c, cu = schema.cards, schema.customers
        with self.engine.begin() as conn:
            conn.execute(
                schema.settlements.insert().values(
                    settlement_id=settlement_id,
                    status=status,
                    owner="test",
                    engine="test",
                    started_at=datetime(2025, 4, 2),
                    heartbeat_at=0.0,
                    finished_at=datetime(2025, 4, 2),
                )
            )
            if watermarks:
                conn.execute(
                    schema.settlement_watermarks.insert(),
                    [
                        {"settlement_id": settlement_id, "kafka_partition": p, "checkpoint_seq": s}
                        for p, s in watermarks.items()
                    ],
                )
            card_columns = [col.name for col in c.columns]
            conn.execute(
                schema.settled_cards.insert().from_select(
                    ["settlement_id", *card_columns], select(literal(settlement_id), *c.columns)
                )
            )
            customer_columns = [col.name for col in cu.columns]
            conn.execute(
                schema.settled_customers.insert().from_select(
                    ["settlement_id", *customer_columns], select(literal(settlement_id), *cu.columns)
                )
            )
            sc, scu = schema.settled_cards, schema.settled_customers
            for card_id, n in settled_counts(conn, watermarks).items():  # as `cardpipe batch` stores them
                same_card = and_(sc.c.settlement_id == settlement_id, sc.c.card_id == card_id)
                conn.execute(update(sc).where(same_card).values(settled_count=n))
            for card_id, (limit, balance) in (cards or {}).items():
                conn.execute(
                    update(sc)
                    .where(sc.c.settlement_id == settlement_id, sc.c.card_id == card_id)
                    .values(credit_limit=limit, current_balance=balance)
                )
            for customer_id, score in (scores or {}).items():
                conn.execute(
                    update(scu)
                    .where(scu.c.settlement_id == settlement_id, scu.c.customer_id == customer_id)
                    .values(credit_score=score)
                )
            if in_force:
                conn.execute(update(schema.serving_state).values(settlement_id=settlement_id))

    def card(self, card_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return card_view(conn, card_id)

    def customer(self, customer_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return customer_view(conn, customer_id)

    def transaction(self, transaction_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return transaction_view(conn, transaction_id)

    def counts(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return service_counts(conn)


@pytest.fixture
def serving(tmp_path: Path):
    engine = sqlite_engine(tmp_path / "serving.db")
    yield Serving.create(engine)
    engine.dispose()


# ----------------------------------------------------------------------------------- the scenario, in phases
def phase_a(s: Serving) -> None:
    """Before any settlement: card 1 has two pending decisions (one a refund) and a declined one."""
    s.decide(1, 1, "100.00", partition=0, seq=1, balance="520.18")
    s.decide(2, 1, "-20.50", partition=1, seq=1, balance="499.68")
    s.decide(3, 1, "9000.00", status="declined", reason="amount_over_half_limit", partition=0, seq=1, balance="499.68")
    s.decide(4, 2, "5.00", partition=0, seq=1, balance="62.49", limit="6900.00")


def phase_b(s: Serving) -> None:
    """Settlement 1 (lowers card 1's limit, customer 2's score) covers phase A; then more decisions, one of them on
    a partition the watermark has no row for."""
    s.settle(1, {0: 1, 1: 1}, cards={1: ("12200.00", "499.68"), 2: ("6900.00", "62.49")}, scores={2: 798})
    s.decide(5, 1, "30.00", partition=0, seq=2, balance="529.68", limit="12200.00")
    s.decide(6, 1, "7.00", partition=2, seq=1, balance="536.68", limit="12200.00")
    s.decide(
        7,
        1,
        "9999.00",
        status="declined",
        reason="amount_over_half_limit",
        partition=0,
        seq=2,
        balance="536.68",
        limit="12200.00",
    )


def phase_c(s: Serving) -> None:
    """Settlement 2 covers everything so far and restores card 1's limit; settlement 3 failed (never in force);
    then one more pending decision, plus rejected messages."""
    s.settle(2, {0: 2, 1: 1, 2: 1}, cards={1: ("14300.00", "536.68"), 2: ("6900.00", "62.49")}, scores={2: 803})
    s.settle(
        3,
        {0: 9, 1: 9, 2: 9, 3: 9},
        cards={1: ("100.00", "0.00")},
        scores={2: 300},
        status=schema.SETTLEMENT_FAILED,
        in_force=False,
    )
    s.decide(8, 1, "1.00", partition=0, seq=3, balance="537.68")
    # An unknown card: kept in the stream as rejected (no limit, no balance), with its rejection.
    s.decide(9, 999, "5.00", status="rejected", partition=3, seq=1, balance=None, limit=None)
    s.reject(9, "unknown_card", "card 999 is not in the serving data")
    s.reject(12345, "duplicate_conflict", "transaction 12345 came back with other content")  # only rejected
    s.reject(1, "duplicate_conflict", "transaction 1 came back with other content")  # a decided id: not counted
    s.reject(None, "not_json", "not JSON")
    s.reject(12346, "bad_amount", "amount 'x' is not a number")  # only rejected


def whole_scenario(engine: Engine) -> Serving:
    """The serving data after the three phases (for the API and CLI tests)."""
    s = Serving.create(engine)
    phase_a(s)
    phase_b(s)
    phase_c(s)
    return s


#: Card 1's view after the whole scenario, as JSON (the API's answer and ``cardpipe card 1 --json``).
CARD_1_JSON = {
    "card_id": 1,
    "customer_id": 2,
    "card_type_id": 3,
    "card_number": "****-****-****-7934",
    "credit_limit": "14300.00",
    "settled_balance": "536.68",
    "pending_amount": "1.00",
    "pending_count": 1,
    "available_credit": "13762.32",
    "settlement_id": 2,
}


def check_scenario(s: Serving) -> None:
    """Every field of every view through the three phases (shared by the SQLite and MariaDB tests)."""
    phase_a(s)
    assert s.card(1) == {
        "card_id": 1,
        "customer_id": 2,
        "card_type_id": 3,
        "card_number": "****-****-****-7934",
        "credit_limit": CARD1_LIMIT,
        "settled_balance": CARD1_BALANCE,
        "pending_amount": D("79.50"),
        "pending_count": 2,
        "available_credit": D("13800.32"),
        "settlement_id": None,
    }
    assert s.card(2)["pending_amount"] == D("5.00") and s.card(2)["settled_balance"] == CARD2_BALANCE
    assert s.card(3)["pending_count"] == 0 and s.card(3)["pending_amount"] == D("0.00")
    assert s.customer(2) == {
        "customer_id": 2,
        "name": "Kyle Silva",
        "credit_score": 803,
        "card_ids": [1, 2],
        "settlement_id": None,
    }
    assert s.customer(1) == {
        "customer_id": 1,
        "name": "Shirley Rhodes",
        "credit_score": 627,
        "card_ids": [],
        "settlement_id": None,
    }
    t1 = s.transaction(1)
    assert t1 == {
        "transaction_id": 1,
        "card_id": 1,
        "merchant_name": "Shop 1",
        "timestamp": datetime(2025, 4, 1, 10, 0, 1),
        "amount": D("100.00"),
        "location": "1 Main St, Albany, NY 12207",
        "transaction_type": "purchase",
        "related_transaction_id": None,
        "status": "pending",
        "decline_reason": None,
        "pending_balance": D("520.18"),
        "credit_limit": D("14300.00"),
        "settlement_id": None,
        "response_code": "00",
        "rejection_reason": None,
        "rejection_detail": None,
    }
    assert s.transaction(3)["status"] == "declined"
    assert s.transaction(3)["decline_reason"] == "amount_over_half_limit"
    assert s.transaction(3)["response_code"] == "61"  # ISO 8583: exceeds withdrawal amount limit
    assert s.counts() == {"decided": 4, "settlement_id": None, "latest_settlement": None}

    phase_b(s)
    assert s.card(1) == {
        "card_id": 1,
        "customer_id": 2,
        "card_type_id": 3,
        "card_number": "****-****-****-7934",
        "credit_limit": D("12200.00"),
        "settled_balance": D("499.68"),
        "pending_amount": D("37.00"),
        "pending_count": 2,
        "available_credit": D("11663.32"),
        "settlement_id": 1,
    }
    assert s.card(2)["pending_count"] == 0 and s.card(2)["settled_balance"] == D("62.49")
    assert s.customer(2)["credit_score"] == 798 and s.customer(2)["settlement_id"] == 1
    assert s.customer(1)["credit_score"] == 627  # no card: its score is kept
    assert {k: s.transaction(1)[k] for k in ("status", "settlement_id")} == {"status": "approved", "settlement_id": 1}
    assert {k: s.transaction(3)[k] for k in ("status", "decline_reason", "settlement_id")} == {
        "status": "declined",
        "decline_reason": "amount_over_half_limit",
        "settlement_id": 1,
    }
    assert {k: s.transaction(5)[k] for k in ("status", "settlement_id", "credit_limit")} == {
        "status": "pending",
        "settlement_id": None,
        "credit_limit": D("12200.00"),
    }
    assert s.transaction(6)["status"] == "pending"  # partition 2 has no watermark row in settlement 1

    phase_c(s)
    assert s.card(1) == {
        "card_id": 1,
        "customer_id": 2,
        "card_type_id": 3,
        "card_number": "****-****-****-7934",
        "credit_limit": D("14300.00"),
        "settled_balance": D("536.68"),
        "pending_amount": D("1.00"),
        "pending_count": 1,
        "available_credit": D("13762.32"),
        "settlement_id": 2,
    }
    assert s.customer(2)["credit_score"] == 803 and s.customer(2)["settlement_id"] == 2
    for tid, status, settlement in [
        (1, "approved", 1),
        (2, "approved", 1),
        (3, "declined", 1),
        (4, "approved", 1),
        (5, "approved", 2),
        (6, "approved", 2),
        (7, "declined", 2),
        (8, "pending", None),
    ]:
        view = s.transaction(tid)
        assert (view["status"], view["settlement_id"]) == (status, settlement), tid
    assert s.transaction(1)["rejection_reason"] is None  # a conflicting duplicate does not change the decision
    assert s.transaction(9) | {"timestamp": None} == {
        "transaction_id": 9,
        "card_id": 999,
        "merchant_name": "Shop 9",
        "timestamp": None,
        "amount": D("5.00"),
        "location": "1 Main St, Albany, NY 12207",
        "transaction_type": "purchase",
        "related_transaction_id": None,
        "status": "rejected",
        "decline_reason": None,
        "pending_balance": None,
        "credit_limit": None,
        "settlement_id": None,
        "response_code": "30",
        "rejection_reason": "unknown_card",
        "rejection_detail": "card 999 is not in the serving data",
    }
    assert s.transaction(12345) == {
        "transaction_id": 12345,
        "card_id": None,
        "merchant_name": None,
        "timestamp": None,
        "amount": None,
        "location": None,
        "transaction_type": None,
        "related_transaction_id": None,
        "status": "rejected",
        "decline_reason": None,
        "pending_balance": None,
        "credit_limit": None,
        "settlement_id": None,
        "response_code": "30",
        "rejection_reason": "duplicate_conflict",
        "rejection_detail": "transaction 12345 came back with other content",
    }
    assert s.transaction(500) is None  # in the inputs, not decided
    assert s.transaction(10**9) is None and s.card(10**9) is None and s.customer(10**9) is None
    counts = s.counts()
    assert (counts["decided"], counts["settlement_id"]) == (9 + 3, 2)  # 9 decisions, 12345, 12346 and the not_json one
    latest = counts["latest_settlement"]
    assert (latest["settlement_id"], latest["status"]) == (3, schema.SETTLEMENT_FAILED)


def test_views_through_two_settlements(serving):
    check_scenario(serving)


@pytest.mark.mysql
def test_views_through_two_settlements_on_mariadb(mysql_database):
    engine = make_engine(mysql_database, create_database=False)
    try:
        check_scenario(Serving.create(engine))
    finally:
        engine.dispose()


@pytest.mark.mysql
def test_a_connection_lost_under_the_card_view_is_discarded_on_mariadb(mysql_database):
    engine = make_engine(mysql_database, create_database=False)
    try:
        Serving.create(engine)
        with engine.connect() as conn:
            victim = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
            conn.rollback()
            with engine.connect() as admin:
                admin.exec_driver_sql(f"KILL CONNECTION {int(victim)}")
            with pytest.raises(DBAPIError) as info:
                card_view(conn, 1)
            assert info.value.connection_invalidated
        with engine.connect() as conn:
            assert card_view(conn, 1)["card_number"] == "****-****-****-7934"
    finally:
        engine.dispose()


@pytest.mark.mysql
def test_read_snapshot_on_mariadb(mysql_database):
    engine = make_engine(mysql_database, create_database=False)
    try:
        s = Serving.create(engine)
        check_snapshot(s)
    finally:
        engine.dispose()


def test_available_credit_may_be_negative(serving):
    # A settled balance of 499.68, then a pending 50.00 the settlement does not cover: running balance 549.68.
    serving.decide(1, 1, "50.00", partition=0, seq=2, balance="549.68")
    serving.settle(1, {0: 1}, cards={1: ("400.00", "499.68")})
    view = serving.card(1)
    assert (view["credit_limit"], view["pending_amount"], view["available_credit"]) == (
        D("400.00"),
        D("50.00"),
        D("-149.68"),
    )
    assert to_json(view)["available_credit"] == "-149.68"


def test_a_failed_settlement_never_counts_as_the_one_that_included_a_transaction(serving):
    serving.decide(1, 1, "10.00", partition=0, seq=1)
    serving.settle(1, {0: 5}, cards={1: ("1.00", "1.00")}, status=schema.SETTLEMENT_FAILED, in_force=False)
    serving.settle(2, {0: 1})
    assert serving.card(1)["credit_limit"] == CARD1_LIMIT
    assert (serving.transaction(1)["status"], serving.transaction(1)["settlement_id"]) == ("approved", 2)


def test_the_settlement_in_force_is_the_published_pointer_not_the_newest_row(serving):
    """A newer settlement that is still running is not seen; one that is published but not the pointer is not
    credited either."""
    serving.decide(1, 1, "10.00", partition=0, seq=1)
    serving.settle(1, {0: 1}, cards={1: ("13000.00", "430.18")})
    serving.settle(2, {0: 5}, cards={1: ("1.00", "1.00")}, status=schema.SETTLEMENT_RUNNING, in_force=False)
    assert (serving.card(1)["credit_limit"], serving.card(1)["settlement_id"]) == (D("13000.00"), 1)
    assert serving.transaction(1)["settlement_id"] == 1
    assert serving.counts()["latest_settlement"]["status"] == schema.SETTLEMENT_RUNNING


@pytest.mark.parametrize("ident", [0, -1, 2**63, 2**70, -(2**70)])
def test_ids_outside_bigint_or_not_positive_are_unknown(serving, ident):
    assert serving.card(ident) is None
    assert serving.customer(ident) is None
    assert serving.transaction(ident) is None


def check_snapshot(s: Serving) -> None:
    """Inside ``read_snapshot`` a commit by another connection stays invisible; after it, it is seen."""
    count = select(func.count()).select_from(schema.stream_transactions)
    with s.engine.connect() as conn:
        with read_snapshot(conn):
            before = conn.execute(count).scalar_one()
            s.decide(1, 1, "10.00")  # another connection, committed
            assert conn.execute(count).scalar_one() == before
        assert not conn.in_transaction()
        assert conn.execute(count).scalar_one() == before + 1
        conn.rollback()
        # A connection already in a transaction: read_snapshot reads in it and leaves it open.
        with conn.begin():
            with read_snapshot(conn):
                before = conn.execute(count).scalar_one()
                s.decide(2, 1, "10.00")
                assert conn.execute(count).scalar_one() == before
            assert conn.in_transaction()
            assert conn.execute(count).scalar_one() == before


def test_read_snapshot_on_sqlite(serving):
    check_snapshot(serving)


# --------------------------------------------------------------------------------------------- formatting
@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("4109-1661-0231-7934", "****-****-****-7934"),
        ("4109166102317934", "************7934"),
        ("4109 1661 0231 7934", "**** **** **** 7934"),
        ("378282246310005", "***********0005"),
        ("1234", "****"),
        ("12", "**"),
        ("", ""),
    ],
)
def test_mask_card_number(number, masked):
    assert mask_card_number(number) == masked


def test_to_json():
    view = {
        "a": D("1234.5"),
        "b": D("-0.00"),
        "c": D("-95.11"),
        "d": datetime(2025, 4, 1, 3, 2, 1),
        "e": 7,
        "f": None,
        "g": [D("1"), 2],
        "h": {"i": D("0.1")},
        "j": "text",
    }
    assert to_json(view) == {
        "a": "1234.50",
        "b": "0.00",
        "c": "-95.11",
        "d": "2025-04-01 03:02:01",
        "e": 7,
        "f": None,
        "g": ["1.00", 2],
        "h": {"i": "0.10"},
        "j": "text",
    }


# -------------------------------------------------------------------------------- property: views vs a model
CARDS = (1, 2, 3)
ORIGINAL = {1: (D("14300.00"), D("420.18")), 2: (D("6900.00"), D("57.49")), 3: (D("80900.00"), D("305.25"))}
money = st.integers(min_value=-500_000, max_value=5_000_000).map(lambda cents: D(cents).scaleb(-2))
decisions = st.lists(
    st.tuples(
        st.sampled_from(CARDS), money, st.sampled_from(["pending", "declined"]), st.integers(0, 3), st.integers(1, 4)
    ),
    max_size=25,
)
settlement = st.none() | st.tuples(
    st.dictionaries(st.integers(0, 3), st.integers(0, 4)),  # watermark: some partitions, maybe none
    st.fixed_dictionaries({c: money for c in CARDS}),  # settled limit per card
)


@pytest.fixture(scope="module")
def model_db(tmp_path_factory):
    engine = sqlite_engine(tmp_path_factory.mktemp("model") / "serving.db")
    yield Serving.create(engine)
    engine.dispose()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decided=decisions, settled=settlement)
def test_card_views_match_a_plain_model(model_db, decided, settled):
    s = model_db
    with s.engine.begin() as conn:
        for table in (
            schema.stream_transactions,
            schema.card_states,
            schema.settlement_watermarks,
            schema.settled_cards,
            schema.settled_customers,
            schema.settlements,
        ):
            conn.execute(delete(table))
        conn.execute(update(schema.serving_state).values(settlement_id=None))
    watermark: dict[int, int] = settled[0] if settled is not None else {}

    def covered(p: int, seq: int) -> bool:
        return settled is not None and p in watermark and seq <= watermark[p]

    running = {c: balance for c, (_limit, balance) in ORIGINAL.items()}
    settled_balance = dict(running)
    for i, (card_id, amount, status, partition, seq) in enumerate(decided, start=1):
        if status == "pending":  # a pending decision adds to the card's running balance...
            running[card_id] += amount
            if covered(partition, seq):  # ...and, once settled, to its settled balance
                settled_balance[card_id] += amount
        s.decide(
            i,
            card_id,
            str(amount),
            status=status,
            partition=partition,
            seq=seq,
            reason="over_credit_limit" if status == "declined" else None,
            balance=str(running[card_id]),
        )
    if settled is not None:
        s.settle(1, watermark, cards={c: (str(limit), str(settled_balance[c])) for c, limit in settled[1].items()})
    for card_id in CARDS:
        limit = ORIGINAL[card_id][0] if settled is None else settled[1][card_id]
        balance = ORIGINAL[card_id][1] if settled is None else settled_balance[card_id]
        pending = [
            a for c, a, status, p, seq in decided if c == card_id and status == "pending" and not covered(p, seq)
        ]
        view = s.card(card_id)
        assert view["credit_limit"] == limit and view["settled_balance"] == balance
        assert view["pending_amount"] == sum(pending, D("0.00"))
        assert view["pending_count"] == len(pending)
        assert view["available_credit"] == limit - balance - sum(pending, D("0.00"))
        assert view["settlement_id"] == (None if settled is None else 1)
    for i, (_c, _a, status, p, seq) in enumerate(decided, start=1):
        view = s.transaction(i)
        assert view["settlement_id"] == (1 if covered(p, seq) else None)
        assert view["status"] == ("approved" if covered(p, seq) and status == "pending" else status)
