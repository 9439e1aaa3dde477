"""The merged views of SPEC §9 (the Lambda serving query): a card, a customer, a transaction, the counts.

Each view reads the settlement in force (``serving_state``) and the stream's decisions beyond its watermark
in ONE read snapshot (one statement, or :func:`read_snapshot`), so it never mixes two settlements or half a
checkpoint. Pure queries over a SQLAlchemy :class:`~sqlalchemy.Connection` (SQLAlchemy Core), for SQLite and
MySQL/MariaDB. Money is ``Decimal`` in the returned dicts; :func:`to_json` makes the API's JSON of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Select, and_, bindparam, func, select

from cardpipe.domain.money import CENT
from cardpipe.domain.records import (
    APPROVED,
    DECLINED,
    PENDING,
    REJECTED,
    TIMESTAMP_FORMAT,
    TRANSACTION_COLUMNS,
    response_code,
)
from cardpipe.serving import schema
from cardpipe.serving.driver_query import DriverQuery

__all__ = [
    "MAX_ID",
    "card_view",
    "customer_view",
    "mask_card_number",
    "read_snapshot",
    "service_counts",
    "to_json",
    "transaction_view",
]

#: Ids are signed 64-bit integers (BIGINT): anything outside 1..MAX_ID is unknown, never a query.
MAX_ID = 2**63 - 1
_ZERO = Decimal("0.00")

_s = schema.stream_transactions
_w = schema.settlement_watermarks
_p = schema.serving_state
_cards = schema.cards
_customers = schema.customers
_settled_cards = schema.settled_cards
_settled_customers = schema.settled_customers
_card_states = schema.card_states
_rejected = schema.rejected_transactions
_settlements = schema.settlements
# serving_state's one row, outer-joined so that a missing row reads as "no settlement".
_IN_FORCE = _p.c.id == schema.SERVING_STATE_ID


# --------------------------------------------------------------------------------------------- helpers
def mask_card_number(number: str | None) -> str:
    """``number`` with every digit (or letter) but the last four replaced by ``*``; separators kept.

    ``"4109-1661-0231-7934"`` -> ``"****-****-****-7934"``. A value of four characters or fewer is masked
    whole: no answer and no log line may carry a full card number.
    """
    if not number:
        return ""
    keep = sum(ch.isalnum() for ch in number)
    keep = 4 if keep > 4 else 0
    out: list[str] = []
    for ch in reversed(number):
        if ch.isalnum():
            out.append(ch if keep > 0 else "*")
            keep -= 1
        else:
            out.append(ch)
    return "".join(reversed(out))


def _money_text(value: Decimal) -> str:
    value = value.quantize(CENT)
    return str(value.copy_abs() if value.is_zero() else value)  # never "-0.00"


def to_json(view: Any) -> Any:
    """A view as JSON-ready values: Decimal -> ``"1234.50"``, datetime -> ``"YYYY-MM-DD HH:MM:SS"``, recursively."""
    if isinstance(view, Mapping):
        return {str(k): to_json(v) for k, v in view.items()}
    if isinstance(view, list | tuple):
        return [to_json(v) for v in view]
    if isinstance(view, Decimal):
        return _money_text(view)
    if isinstance(view, datetime):
        return view.strftime(TIMESTAMP_FORMAT)
    if isinstance(view, date):
        return view.isoformat()
    return view


def _money(value: Any) -> Decimal | None:
    """A money column's value as a 2-decimal Decimal (SQLite hands some back as floats or ints)."""
    if value is None:
        return None
    if not isinstance(value, Decimal):
        value = Decimal(str(value))
    return value.quantize(CENT)


def _valid_id(ident: int) -> bool:
    return isinstance(ident, int) and not isinstance(ident, bool) and 0 < ident <= MAX_ID


@contextmanager
def read_snapshot(conn: Connection) -> Iterator[Connection]:
    """Run the block's queries in one transaction that reads one snapshot of the database.

    Uses ``conn``'s transaction when it has one, else begins one (ended with the block). On MySQL/MariaDB
    (InnoDB, REPEATABLE READ) a transaction reads one snapshot. Python's sqlite3 driver opens no SQLite
    transaction for SELECTs (each would read its own snapshot), so on SQLite this issues ``BEGIN`` itself
    when the driver connection is not in one: in WAL mode the reads then share one snapshot.
    """
    if conn.in_transaction():
        _begin_sqlite_read(conn)
        yield conn
        return
    with conn.begin():
        _begin_sqlite_read(conn)
        yield conn


def _begin_sqlite_read(conn: Connection) -> None:
    if conn.dialect.name != "sqlite":
        return
    driver = conn.connection.driver_connection
    if driver is not None and not driver.in_transaction:
        conn.exec_driver_sql("BEGIN")


# --------------------------------------------------------------------------------------------- queries
# Built once (bound parameters): SQLAlchemy caches their compiled SQL per dialect.

_IN_FORCE_ID = select(_p.c.settlement_id).where(_IN_FORCE)


def _card_query() -> Select:
    """ONE statement (so one snapshot): the card, the settlement in force's row for it (balance and how many of
    the card's pending decisions it approved) and the card's stream counters (its running balance and how many
    of its decisions are pending, settled or not). What is pending after the settlement is the difference:
    every pending decision adds its amount to the running balance, and the settlement adds the amounts of those
    at or below its watermark to the same original balance (SPEC section 9)."""
    settled = and_(_settled_cards.c.settlement_id == _p.c.settlement_id, _settled_cards.c.card_id == _cards.c.card_id)
    return (
        select(
            _cards.c.card_id,
            _cards.c.customer_id,
            _cards.c.card_type_id,
            _cards.c.card_number,
            _cards.c.credit_limit,
            _cards.c.current_balance,
            _p.c.settlement_id,
            _settled_cards.c.credit_limit.label("settled_limit"),
            _settled_cards.c.current_balance.label("settled_balance"),
            _settled_cards.c.settled_count,
            _card_states.c.pending_balance.label("running_balance"),
            _card_states.c.pending_count.label("running_count"),
        )
        .select_from(
            _cards.outerjoin(_p, _IN_FORCE)
            .outerjoin(_settled_cards, settled)
            .outerjoin(_card_states, _card_states.c.card_id == _cards.c.card_id)
        )
        .where(_cards.c.card_id == bindparam("card_id"))
    )


_CARD = DriverQuery(_card_query())

_CUSTOMER = (
    select(
        _customers.c.customer_id,
        _customers.c.name,
        _customers.c.credit_score,
        _p.c.settlement_id,
        _settled_customers.c.credit_score.label("settled_score"),
    )
    .select_from(
        _customers.outerjoin(_p, _IN_FORCE).outerjoin(
            _settled_customers,
            and_(
                _settled_customers.c.settlement_id == _p.c.settlement_id,
                _settled_customers.c.customer_id == _customers.c.customer_id,
            ),
        )
    )
    .where(_customers.c.customer_id == bindparam("customer_id"))
)
_CUSTOMER_CARDS = (
    select(_cards.c.card_id).where(_cards.c.customer_id == bindparam("customer_id")).order_by(_cards.c.card_id)
)

_TRANSACTION = (
    select(
        *[_s.c[c] for c in TRANSACTION_COLUMNS],
        _s.c.status,
        _s.c.pending_balance,
        _s.c.decline_reason,
        _s.c.credit_limit,
        _s.c.kafka_partition,
        _s.c.checkpoint_seq,
        _p.c.settlement_id,
        _w.c.checkpoint_seq.label("watermark"),
    )
    .select_from(
        _s.outerjoin(_p, _IN_FORCE).outerjoin(
            _w, and_(_w.c.settlement_id == _p.c.settlement_id, _w.c.kafka_partition == _s.c.kafka_partition)
        )
    )
    .where(_s.c.transaction_id == bindparam("transaction_id"))
)
# The first published settlement whose watermark covers a decision (watermarks only grow: at most the one in force).
_FIRST_SETTLEMENT = (
    select(func.min(_w.c.settlement_id))
    .select_from(_w.join(_settlements, _settlements.c.settlement_id == _w.c.settlement_id))
    .where(
        _w.c.kafka_partition == bindparam("kafka_partition"),
        _w.c.checkpoint_seq >= bindparam("checkpoint_seq"),
        _settlements.c.status == schema.SETTLEMENT_PUBLISHED,
    )
)
_REJECTION = (
    select(_rejected.c.reason, _rejected.c.detail)
    .where(_rejected.c.transaction_id == bindparam("transaction_id"))
    .order_by(_rejected.c.rejection_id)
    .limit(1)
)

_STREAM_COUNT = select(func.count()).select_from(_s)
# Rejected messages whose transaction id the stream has not decided (a NULL id matches no decision: counted).
_REJECTED_ONLY_COUNT = (
    select(func.count())
    .select_from(_rejected)
    .where(~select(_s.c.transaction_id).where(_s.c.transaction_id == _rejected.c.transaction_id).exists())
)
_LATEST_SETTLEMENT = select(_settlements).order_by(_settlements.c.settlement_id.desc()).limit(1)


# ----------------------------------------------------------------------------------------------- views
def card_view(conn: Connection, card_id: int) -> dict[str, Any] | None:
    """A card's position: limit and settled balance of the settlement in force, plus what is pending after it.

    Keys: card_id, customer_id, card_type_id, card_number (masked), credit_limit, settled_balance,
    pending_amount, pending_count, available_credit (limit - settled - pending; may be negative),
    settlement_id (None before any settlement). None for an unknown card.
    """
    if not _valid_id(card_id):
        return None
    row = _CARD.first(conn, {"card_id": card_id})  # one statement: one snapshot
    if row is None:
        return None
    settled = row["settled_limit"] is not None and row["settlement_id"] is not None
    limit = _money(row["settled_limit"] if settled else row["credit_limit"]) or _ZERO
    balance = _money(row["settled_balance"] if settled else row["current_balance"]) or _ZERO
    running = _money(row["running_balance"])
    pending_amount = _ZERO if running is None else running - balance
    pending_count = int(row["running_count"] or 0) - (int(row["settled_count"] or 0) if settled else 0)
    return {
        "card_id": row["card_id"],
        "customer_id": row["customer_id"],
        "card_type_id": row["card_type_id"],
        "card_number": mask_card_number(row["card_number"]),
        "credit_limit": limit,
        "settled_balance": balance,
        "pending_amount": pending_amount,
        "pending_count": pending_count,
        "available_credit": limit - balance - pending_amount,
        "settlement_id": row["settlement_id"],
    }


def customer_view(conn: Connection, customer_id: int) -> dict[str, Any] | None:
    """A customer: credit_score of the settlement in force (the original before any), card_ids, settlement_id."""
    if not _valid_id(customer_id):
        return None
    with read_snapshot(conn):
        row = conn.execute(_CUSTOMER, {"customer_id": customer_id}).first()
        if row is None:
            return None
        card_ids = [int(c) for c in conn.execute(_CUSTOMER_CARDS, {"customer_id": customer_id}).scalars()]
    settled = row.settled_score is not None and row.settlement_id is not None
    return {
        "customer_id": row.customer_id,
        "name": row.name,
        "credit_score": int(row.settled_score if settled else row.credit_score),
        "card_ids": card_ids,
        "settlement_id": row.settlement_id,
    }


def transaction_view(conn: Connection, transaction_id: int) -> dict[str, Any] | None:
    """A decided transaction: its input fields and its decision as of the settlement in force.

    ``status`` is approved for a pending decision the settlement in force covers; ``settlement_id`` is the
    first published settlement that covered it (None until one does). A transaction only known from a
    rejected message (e.g. a duplicate with other content) reads as rejected with ``rejection_reason``.
    None for an unknown or not yet decided id.
    """
    if not _valid_id(transaction_id):
        return None
    params = {"transaction_id": transaction_id}
    with read_snapshot(conn):
        row = conn.execute(_TRANSACTION, params).first()
        rejection = None
        if row is None or row.status == REJECTED:
            rejection = conn.execute(_REJECTION, params).first()
            if row is None and rejection is None:
                return None
        covered = row is not None and row.watermark is not None and row.checkpoint_seq <= row.watermark
        first = None
        if covered and row is not None:
            cut = {"kafka_partition": row.kafka_partition, "checkpoint_seq": row.checkpoint_seq}
            first = conn.execute(_FIRST_SETTLEMENT, cut).scalar()
    if row is None:
        view: dict[str, Any] = dict.fromkeys(TRANSACTION_COLUMNS)
        view.update(
            transaction_id=transaction_id,
            status=REJECTED,
            decline_reason=None,
            pending_balance=None,
            credit_limit=None,
            settlement_id=None,
        )
    else:
        status = APPROVED if covered and row.status == PENDING else row.status
        view = {c: row._mapping[c] for c in TRANSACTION_COLUMNS}
        view["amount"] = _money(view["amount"])
        view.update(
            status=status,
            decline_reason=(row.decline_reason or None) if row.status == DECLINED else None,
            pending_balance=_money(row.pending_balance),
            credit_limit=_money(row.credit_limit),
            settlement_id=(min(first, row.settlement_id) if first is not None else row.settlement_id)
            if covered
            else None,
        )
    view["response_code"] = response_code(view["status"], view["decline_reason"])
    view["rejection_reason"] = rejection.reason if rejection is not None else None
    view["rejection_detail"] = rejection.detail if rejection is not None else None
    return view


def service_counts(conn: Connection) -> dict[str, Any]:
    """What the service has done: ``decided`` (every decision committed so far: the stream's rows plus the
    rejected messages not also among them), ``settlement_id`` in force, and ``latest_settlement`` (the
    newest ``settlements`` row, whatever its status; None before any)."""
    with read_snapshot(conn):
        decided = int(conn.execute(_STREAM_COUNT).scalar_one()) + int(conn.execute(_REJECTED_ONLY_COUNT).scalar_one())
        in_force = conn.execute(_IN_FORCE_ID).scalar()
        latest = conn.execute(_LATEST_SETTLEMENT).first()
    return {
        "decided": decided,
        "settlement_id": in_force,
        "latest_settlement": dict(latest._mapping) if latest is not None else None,
    }
