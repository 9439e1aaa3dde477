"""The consumer's side of the serving database: restore state, look up decisions, commit checkpoints.

Checkpoint contract: a polled batch's decisions, rejections, per-card states and next offsets are
written in ONE database transaction; the consumer acknowledges nothing before that commit, and on
start it resumes from what the database holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from operator import itemgetter
from typing import TypeVar

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from cardpipe.domain.authorization import zip_of
from cardpipe.domain.records import STREAM_COLUMNS, TRANSACTION_COLUMNS, CardProfile, Transaction
from cardpipe.errors import DatabaseUnavailable
from cardpipe.faults import crash_point
from cardpipe.serving import schema
from cardpipe.serving.bulk import BulkWriter, KeyReader
from cardpipe.serving.database import describe_error
from cardpipe.stream.processing import CheckpointBatch

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOOKUP_CHUNK = 900  # stays under SQLite's bound-parameter limit
REJECTION_COLUMNS = ("topic", "kafka_partition", "kafka_offset", "transaction_id", "reason", "detail",
                     "message_key", "message_value", "recorded_at")
CARD_STATE_COLUMNS = ("card_id", "pending_balance")
_decision_values = itemgetter(*STREAM_COLUMNS)
_rejection_values = itemgetter(*REJECTION_COLUMNS)


def is_transient(exc: DBAPIError) -> bool:
    """A lost or refused connection, a restarting server or a busy SQLite file: worth retrying."""
    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


class StreamStore:
    """All the stream consumer's database I/O, for one topic."""

    def __init__(self, engine: Engine, topic: str):
        self.engine = engine
        self.topic = topic
        dialect = engine.dialect
        self._decisions = BulkWriter(dialect, schema.stream_transactions, STREAM_COLUMNS)
        self._rejections = BulkWriter(dialect, schema.rejected_transactions, REJECTION_COLUMNS)
        self._card_states = BulkWriter(dialect, schema.card_states, CARD_STATE_COLUMNS, upsert_keys=["card_id"])
        self._offsets = BulkWriter(dialect, schema.stream_offsets, ("topic", "kafka_partition", "next_offset"),
                                   upsert_keys=["topic", "kafka_partition"])
        self._decided = KeyReader(dialect, schema.stream_transactions, TRANSACTION_COLUMNS, "transaction_id",
                                  chunk=_LOOKUP_CHUNK)

    def card_profiles(self) -> dict[int, CardProfile]:
        """Every card's limit and its owner's zip."""
        c, cu = schema.cards, schema.customers
        query = select(c.c.card_id, c.c.credit_limit, cu.c.address).join(cu, c.c.customer_id == cu.c.customer_id)
        with self.engine.connect() as conn:
            return {
                card_id: CardProfile(card_id, Decimal(limit), zip_of(address))
                for card_id, limit, address in conn.execute(query)
            }

    def restore(self) -> tuple[dict[int, Decimal], dict[int, int]]:
        """Pending balances (checkpointed, else the card's current balance) and next offsets."""
        with self.engine.connect() as conn:
            balances = {cid: Decimal(b) for cid, b in conn.execute(
                select(schema.cards.c.card_id, schema.cards.c.current_balance))}
            st = schema.card_states
            for cid, balance in conn.execute(select(st.c.card_id, st.c.pending_balance)):
                if balance is not None:
                    balances[cid] = Decimal(balance)
            so = schema.stream_offsets
            offsets = dict(conn.execute(
                select(so.c.kafka_partition, so.c.next_offset).where(so.c.topic == self.topic)).all())
        return balances, offsets

    def lookup_decided(self, transaction_ids: list[int], *, give_up_after: float = 300.0,
                       sleep: Callable[[float], None] = time.sleep) -> Mapping[int, Transaction]:
        """Already-decided transactions among ``transaction_ids`` (primary-key lookups, one query per chunk).

        Like :meth:`commit_durably`, retries with backoff while the database is unreachable: every polled
        batch starts with this lookup, and a restarting server must not stop the consumer here either.
        """
        return self._retry_while_unavailable(lambda: self._lookup_decided(transaction_ids), "the lookup",
                                             give_up_after=give_up_after, sleep=sleep)

    def _lookup_decided(self, transaction_ids: list[int]) -> Mapping[int, Transaction]:
        found: dict[int, Transaction] = {}
        with self.engine.connect() as conn:
            for row in self._decided.read(conn, sorted(set(transaction_ids))):
                tx = Transaction(*row)
                found[tx.transaction_id] = tx
        return found

    def commit(self, batch: CheckpointBatch) -> None:
        """Write one checkpoint batch atomically."""
        decided = [row if isinstance(row, tuple) else _decision_values(row) for row in batch.decided]
        rejected = [_rejection_values(row) for row in batch.rejected]
        # Sorted keys: concurrent workers lock rows in one order (no deadlocks).
        card_states = [(s.card_id, s.pending_balance) for _, s in sorted(batch.card_states.items())]
        offsets = [(self.topic, p, o) for p, o in sorted(batch.next_offsets.items())]
        with self.engine.begin() as conn:
            self._decisions.write(conn, decided)
            self._rejections.write(conn, rejected)
            self._card_states.write(conn, card_states)
            self._offsets.write(conn, offsets)
            crash_point("checkpoint.written")

    def commit_durably(self, batch: CheckpointBatch, *, give_up_after: float = 300.0,
                       sleep: Callable[[float], None] = time.sleep) -> None:
        """:meth:`commit`, retrying with backoff while the database is unreachable.

        A commit whose acknowledgement was lost (the connection died after COMMIT) is recognised by the
        stored offsets and not written twice. Raises :class:`DatabaseUnavailable` after ``give_up_after``.
        """
        def attempt() -> None:
            try:
                self.commit(batch)
            except IntegrityError:
                if not self._is_committed(batch):
                    raise

        self._retry_while_unavailable(attempt, "the checkpoint", give_up_after=give_up_after, sleep=sleep,
                                      done_anyway=lambda: self._is_committed(batch))

    def _retry_while_unavailable(self, attempt: Callable[[], T], what: str, *, give_up_after: float,
                                 sleep: Callable[[float], None],
                                 done_anyway: Callable[[], bool] | None = None) -> T | None:
        """``attempt()``, retried with backoff (0.2 s doubling to 5 s) while the database is unreachable.

        After a transient error, ``done_anyway()`` may say the attempt took effect after all (then None is
        returned). Raises :class:`DatabaseUnavailable` after ``give_up_after`` seconds.
        """
        delay, started = 0.2, time.monotonic()
        while True:
            try:
                return attempt()
            except DBAPIError as exc:
                if not is_transient(exc):
                    raise
                if done_anyway is not None and done_anyway():
                    return None
                if time.monotonic() - started > give_up_after:
                    raise DatabaseUnavailable(describe_error(self.engine.url, exc)) from None
                log.warning("database unavailable (%s); retrying %s in %.1f s",
                            describe_error(self.engine.url, exc), what, delay)
                sleep(delay)
                delay = min(delay * 2, 5.0)

    def _is_committed(self, batch: CheckpointBatch) -> bool:
        """Whether the database already holds this batch's offsets (False when it cannot tell)."""
        if not batch.next_offsets:
            return False
        so = schema.stream_offsets
        try:
            with self.engine.connect() as conn:
                stored = dict(conn.execute(select(so.c.kafka_partition, so.c.next_offset).where(
                    so.c.topic == self.topic, so.c.kafka_partition.in_(list(batch.next_offsets)))).all())
        except DBAPIError:
            return False
        return all(stored.get(p, -1) >= o for p, o in batch.next_offsets.items())

    def reset_offsets(self, partitions: Iterable[int] | None = None) -> None:
        """Forget the stored offsets of ``partitions``, or of every partition (the topic was recreated)."""
        so = schema.stream_offsets
        condition = so.c.topic == self.topic
        if partitions is not None:
            condition = condition & so.c.kafka_partition.in_(list(partitions))
        with self.engine.begin() as conn:
            conn.execute(so.delete().where(condition))

    def start_at(self, offsets: Mapping[int, int]) -> None:
        """Make the next consume start at ``offsets`` (a fresh run ignores what the topic held before)."""
        with self.engine.begin() as conn:
            self._offsets.write(conn, [(self.topic, p, o) for p, o in sorted(offsets.items())])
