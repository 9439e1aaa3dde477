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

#: A card's ordering watermark: the greatest (timestamp, transaction_id) decided for it.
Watermark = tuple[datetime, int]
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
    last_timestamp: datetime
    last_transaction_id: int


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

    Duplicate detection keeps per-card state only: a transaction whose (timestamp, id) is past its
    card's watermark cannot have been decided before; only the others are looked up.
    """

    def __init__(
        self,
        topic: str,
        cards: Mapping[int, CardProfile],
        balances: Mapping[int, Decimal],
        watermarks: Mapping[int, Watermark],
        lookup: DecidedLookup,
        clock: Callable[[], datetime] = datetime.now,
    ):
        self.topic = topic
        self.authorizer = Authorizer(cards, balances)
        self.watermarks: dict[int, Watermark] = dict(watermarks)
        self.lookup = lookup
        self.clock = clock

    def process(self, messages: Iterable[RawMessage]) -> CheckpointBatch:
        """Decide a batch of messages in order; returns the checkpoint to persist."""
        batch = CheckpointBatch()
        decoded = [(m, decode_transaction(m.value)) for m in messages]
        suspects = [
            r.transaction_id for _, r in decoded
            if isinstance(r, Transaction) and self._maybe_seen(r)
        ]
        known: dict[int, Transaction] = dict(self.lookup(suspects)) if suspects else {}
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

    def _maybe_seen(self, tx: Transaction) -> bool:
        mark = self.watermarks.get(tx.card_id)
        return mark is not None and (tx.timestamp, tx.transaction_id) <= mark

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
        mark = (tx.timestamp, tx.transaction_id)
        old = self.watermarks.get(tx.card_id)
        if old is None or mark > old:
            self.watermarks[tx.card_id] = mark
        current = self.watermarks[tx.card_id]
        batch.card_states[tx.card_id] = CardState(tx.card_id, balance, current[0], current[1])
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
