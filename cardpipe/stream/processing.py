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
from typing import Any, NamedTuple

from cardpipe.domain.authorization import Authorizer
from cardpipe.domain.records import REJECTED, STREAM_COLUMNS, CardProfile, Transaction
from cardpipe.stream.codec import DUPLICATE_CONFLICT, UNKNOWN_CARD, Rejection, TransactionFields, decode_fields

#: Finds already-decided transactions by id (the serving store in production).
DecidedLookup = Callable[[list[int]], Mapping[int, Transaction]]


class RawMessage(NamedTuple):
    """One polled message, as the broker gave it (a named tuple: one is made per message)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


class CardState(NamedTuple):
    """Per-card stream state, persisted with each checkpoint (a named tuple: one is made per card and batch)."""

    card_id: int
    pending_balance: Decimal | None  # None for a card the serving data does not know


_STREAM_INDEX = {name: index for index, name in enumerate(STREAM_COLUMNS)}


class DecisionRow(tuple):  # type: ignore[type-arg]
    """A ``stream_transactions`` row: a tuple in ``STREAM_COLUMNS`` order (what the database writer takes
    as is) that also reads by column name, ``row["status"]``, and converts with ``dict(row)``."""

    __slots__ = ()

    def __getitem__(self, key):  # type: ignore[no-untyped-def,override]
        return tuple.__getitem__(self, _STREAM_INDEX[key] if type(key) is str else key)

    def keys(self) -> tuple[str, ...]:
        return STREAM_COLUMNS

    def __repr__(self) -> str:
        return f"DecisionRow({dict(self)!r})"


def decision_row(tx: Transaction, status: str, pending_balance: Decimal | None, reason: str | None) -> DecisionRow:
    """A ``stream_transactions`` row."""
    return DecisionRow((*tx.values(), status, pending_balance, reason))


@dataclass
class CheckpointBatch:
    """Everything one polled batch changes; written atomically, then acknowledged."""

    decided: list[DecisionRow] = field(default_factory=list)  # stream_transactions rows
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rejected_transactions rows
    card_states: dict[int, CardState] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    counts: Counter[str] = field(default_factory=Counter)
    publish_times_ms: list[int] = field(default_factory=list)  # of decided messages, for latency


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
        """Decide a batch of messages in order; returns the checkpoint to persist.

        The per-message path works on tuples (:func:`decode_fields`, :meth:`Authorizer.decide`,
        :class:`DecisionRow`): no object per message beyond the row itself.
        """
        batch = CheckpointBatch()
        messages = messages if isinstance(messages, list) else list(messages)
        decoded = [decode_fields(m.value) for m in messages]
        ids = [r[0] for r in decoded if type(r) is tuple]
        known: dict[int, TransactionFields] = {}
        if ids:
            known = {tid: tx.values() for tid, tx in self.lookup(ids).items()}
        decide = self.authorizer.decide
        decided, publish_times, next_offsets = batch.decided, batch.publish_times_ms, batch.next_offsets
        counts: dict[str, int] = {}
        touched: dict[int, bool] = {}  # card id -> known to the serving data
        for message, result in zip(messages, decoded, strict=True):
            next_offsets[message.partition] = message.offset + 1
            if type(result) is not tuple:
                self._reject(batch, message, result)
                continue
            tx_id = result[0]
            previous = known.get(tx_id)
            if previous is not None:
                if previous == result:
                    counts["duplicate_ignored"] = counts.get("duplicate_ignored", 0) + 1
                else:
                    self._reject(batch, message, Rejection(
                        DUPLICATE_CONFLICT, f"transaction {tx_id} was already decided with different content", tx_id,
                    ))
                continue
            known[tx_id] = result
            card_id = result[1]
            outcome = decide(card_id, result[4], result[5])
            if outcome is not None:
                decided.append(DecisionRow(result + outcome))
                status = outcome[0]
                counts[status] = counts.get(status, 0) + 1
                touched[card_id] = True
            else:
                decided.append(DecisionRow(result + (REJECTED, None, UNKNOWN_CARD)))
                self._reject(batch, message, Rejection(
                    UNKNOWN_CARD, f"card {card_id} is not in the serving database", tx_id))
                touched[card_id] = False
            if message.timestamp_ms is not None:
                publish_times.append(message.timestamp_ms)
        balances = self.authorizer.balances
        batch.card_states = {cid: CardState(cid, balances[cid] if is_known else None)
                             for cid, is_known in touched.items()}
        batch.counts.update(counts)
        return batch

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


__all__ = ["CardState", "CheckpointBatch", "DecisionRow", "RawMessage", "StreamProcessor", "decision_row"]
