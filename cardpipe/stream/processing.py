"""The stream's processing step, pure: a polled batch of raw messages in, a checkpoint batch out.

No broker and no database here: the consumer feeds :class:`StreamProcessor` with messages and a
``lookup`` callable (the serving store's), and writes the :class:`CheckpointBatch` it returns in one
database transaction. Tests drive it with plain lists and dicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from cardpipe.domain.authorization import Authorizer
from cardpipe.domain.records import REJECTED, CardProfile, Transaction
from cardpipe.stream.codec import DUPLICATE_CONFLICT, UNKNOWN_CARD, Rejection, decode_transaction

#: Finds already-decided transactions by id (the serving store in production).
DecidedLookup = Callable[[list[int]], Mapping[int, Transaction]]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One polled message, as the broker gave it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CardState:
    """Per-card stream state, persisted with each checkpoint."""

    card_id: int
    pending_balance: Decimal | None  # None for a card the serving data does not know


@dataclass
class CheckpointBatch:
    """Everything one polled batch changes; written atomically, then acknowledged."""

    decided: list[dict[str, Any]] = field(default_factory=list)  # stream_transactions rows
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rejected_transactions rows
    card_states: dict[int, CardState] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    counts: Counter[str] = field(default_factory=Counter)
    publish_times_ms: list[int] = field(default_factory=list)  # of decided messages, for latency


def decision_row(tx: Transaction, status: str, pending_balance: Decimal | None, reason: str | None) -> dict[str, Any]:
    """A ``stream_transactions`` row."""
    return {
        "transaction_id": tx.transaction_id,
        "card_id": tx.card_id,
        "merchant_name": tx.merchant_name,
        "timestamp": tx.timestamp,
        "amount": tx.amount,
        "location": tx.location,
        "transaction_type": tx.transaction_type,
        "related_transaction_id": tx.related_transaction_id,
        "status": status,
        "pending_balance": pending_balance,
        "decline_reason": reason,
    }


class StreamProcessor:
    """Authorizes polled batches, absorbing duplicates by transaction_id (the idempotency key).

    The batch's transaction ids are looked up in one query (primary-key lookups): memory holds per-card
    state only, never the set of decided ids.
    """

    def __init__(
        self,
        topic: str,
        cards: Mapping[int, CardProfile],
        balances: Mapping[int, Decimal],
        lookup: DecidedLookup,
        clock: Callable[[], datetime] = datetime.now,
    ):
        self.topic = topic
        self.authorizer = Authorizer(cards, balances)
        self.lookup = lookup
        self.clock = clock

    def process(self, messages: Iterable[RawMessage]) -> CheckpointBatch:
        """Decide a batch of messages in order; returns the checkpoint to persist."""
        batch = CheckpointBatch()
        decoded = [(m, decode_transaction(m.value)) for m in messages]
        ids = [r.transaction_id for _, r in decoded if isinstance(r, Transaction)]
        known: dict[int, Transaction] = dict(self.lookup(ids)) if ids else {}
        for message, result in decoded:
            batch.next_offsets[message.partition] = message.offset + 1
            if isinstance(result, Rejection):
                self._reject(batch, message, result)
                continue
            previous = known.get(result.transaction_id)
            if previous is not None:
                if previous == result:
                    batch.counts["duplicate_ignored"] += 1
                else:
                    self._reject(batch, message, Rejection(
                        DUPLICATE_CONFLICT,
                        f"transaction {result.transaction_id} was already decided with different content",
                        result.transaction_id,
                    ))
                continue
            known[result.transaction_id] = result
            self._decide(batch, message, result)
        return batch

    def _decide(self, batch: CheckpointBatch, message: RawMessage, tx: Transaction) -> None:
        if self.authorizer.knows(tx.card_id):
            decision = self.authorizer.authorize(tx)
            batch.decided.append(decision_row(tx, decision.status, decision.pending_balance, decision.reason))
            batch.counts[decision.status] += 1
            balance: Decimal | None = self.authorizer.balances[tx.card_id]
        else:
            detail = f"card {tx.card_id} is not in the serving database"
            batch.decided.append(decision_row(tx, REJECTED, None, UNKNOWN_CARD))
            self._reject(batch, message, Rejection(UNKNOWN_CARD, detail, tx.transaction_id))
            balance = None
        batch.card_states[tx.card_id] = CardState(tx.card_id, balance)
        if message.timestamp_ms is not None:
            batch.publish_times_ms.append(message.timestamp_ms)

    def _reject(self, batch: CheckpointBatch, message: RawMessage, rejection: Rejection) -> None:
        batch.counts[REJECTED] += 1
        batch.counts[f"rejected:{rejection.reason}"] += 1
        batch.rejected.append({
            "topic": self.topic,
            "kafka_partition": message.partition,
            "kafka_offset": message.offset,
            "transaction_id": rejection.transaction_id,
            "reason": rejection.reason,
            "detail": rejection.detail[:1024],
            "message_key": message.key,
            "message_value": message.value,
            "recorded_at": self.clock().replace(microsecond=0),
        })


__all__ = ["CardState", "CheckpointBatch", "RawMessage", "StreamProcessor", "decision_row"]
