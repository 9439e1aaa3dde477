"""The consumer's side of the serving database: restore state, look up decisions, commit checkpoints.

Checkpoint contract: a polled batch's decisions, rejections, per-card states and next offsets are
written in ONE database transaction; the consumer acknowledges nothing before that commit, and on
start it resumes from what the database holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cardpipe.domain.authorization import zip_of
from cardpipe.domain.records import CardProfile, Transaction
from cardpipe.serving import schema
from cardpipe.stream.processing import CheckpointBatch, Watermark

_LOOKUP_CHUNK = 900  # stays under SQLite's bound-parameter limit


def upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], keys: Iterable[str]) -> None:
    """Insert ``rows``, updating the non-key columns of rows whose key exists (SQLite or MySQL)."""
    if not rows:
        return
    key_set = set(keys)
    updates = [c for c in rows[0] if c not in key_set]
    if conn.dialect.name == "mysql":
        stmt = mysql_insert(table)
        stmt = stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in updates})
    else:
        stmt = sqlite_insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=list(key_set),
                                          set_={c: stmt.excluded[c] for c in updates})
    conn.execute(stmt, rows)


class StreamStore:
    """All the stream consumer's database I/O, for one topic."""

    def __init__(self, engine: Engine, topic: str):
        self.engine = engine
        self.topic = topic

    def card_profiles(self) -> dict[int, CardProfile]:
        """Every card's limit and its owner's zip."""
        c, cu = schema.cards, schema.customers
        query = select(c.c.card_id, c.c.credit_limit, cu.c.address).join(cu, c.c.customer_id == cu.c.customer_id)
        with self.engine.connect() as conn:
            return {
                card_id: CardProfile(card_id, Decimal(limit), zip_of(address))
                for card_id, limit, address in conn.execute(query)
            }

    def restore(self) -> tuple[dict[int, Decimal], dict[int, Watermark], dict[int, int]]:
        """Pending balances (checkpointed, else the card's current balance), watermarks, next offsets."""
        with self.engine.connect() as conn:
            balances = {cid: Decimal(b) for cid, b in conn.execute(
                select(schema.cards.c.card_id, schema.cards.c.current_balance))}
            watermarks: dict[int, Watermark] = {}
            st = schema.card_states
            for cid, balance, ts, tid in conn.execute(
                select(st.c.card_id, st.c.pending_balance, st.c.last_timestamp, st.c.last_transaction_id)
            ):
                if balance is not None:
                    balances[cid] = Decimal(balance)
                if ts is not None and tid is not None:
                    watermarks[cid] = (ts, tid)
            so = schema.stream_offsets
            offsets = dict(conn.execute(
                select(so.c.kafka_partition, so.c.next_offset).where(so.c.topic == self.topic)).all())
        return balances, watermarks, offsets

    def lookup_decided(self, transaction_ids: list[int]) -> Mapping[int, Transaction]:
        """Already-decided transactions among ``transaction_ids``."""
        t = schema.stream_transactions
        found: dict[int, Transaction] = {}
        unique = sorted(set(transaction_ids))
        with self.engine.connect() as conn:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start:start + _LOOKUP_CHUNK]
                query = select(
                    t.c.transaction_id, t.c.card_id, t.c.merchant_name, t.c.timestamp, t.c.amount,
                    t.c.location, t.c.transaction_type, t.c.related_transaction_id,
                ).where(t.c.transaction_id.in_(chunk))
                for row in conn.execute(query):
                    found[row.transaction_id] = Transaction(
                        row.transaction_id, row.card_id, row.merchant_name, row.timestamp,
                        Decimal(row.amount), row.location, row.transaction_type, row.related_transaction_id,
                    )
        return found

    def commit(self, batch: CheckpointBatch) -> None:
        """Write one checkpoint batch atomically."""
        with self.engine.begin() as conn:
            if batch.decided:
                conn.execute(schema.stream_transactions.insert(), batch.decided)
            if batch.rejected:
                conn.execute(schema.rejected_transactions.insert(), batch.rejected)
            upsert(conn, schema.card_states, [
                {"card_id": s.card_id, "pending_balance": s.pending_balance,
                 "last_timestamp": s.last_timestamp, "last_transaction_id": s.last_transaction_id}
                for s in batch.card_states.values()
            ], keys=["card_id"])
            upsert(conn, schema.stream_offsets, [
                {"topic": self.topic, "kafka_partition": p, "next_offset": o}
                for p, o in sorted(batch.next_offsets.items())
            ], keys=["topic", "kafka_partition"])

    def reset_offsets(self, partitions: Iterable[int]) -> None:
        """Forget the stored offsets of ``partitions`` (the topic was recreated)."""
        so = schema.stream_offsets
        with self.engine.begin() as conn:
            conn.execute(so.delete().where(so.c.topic == self.topic, so.c.kafka_partition.in_(list(partitions))))

    def start_at(self, offsets: Mapping[int, int]) -> None:
        """Make the next consume start at ``offsets`` (a fresh run ignores what the topic held before)."""
        with self.engine.begin() as conn:
            upsert(conn, schema.stream_offsets, [
                {"topic": self.topic, "kafka_partition": p, "next_offset": o} for p, o in sorted(offsets.items())
            ], keys=["topic", "kafka_partition"])
