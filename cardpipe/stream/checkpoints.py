"""The stream layer's checkpoint contract: what one checkpoint holds, and the port that stores it.

The consumer writes a polled batch's decisions, rejections, per-card balances and next offsets as ONE
checkpoint, and only then polls again; on start it resumes from what the store holds. The port is
:class:`CheckpointStore`: the serving database implements it (:class:`cardpipe.serving.stream_store.StreamStore`)
and :class:`MemoryCheckpointStore` implements it in memory, so that the stream runs in tests with no database.
"""

from __future__ import annotations

import json
import math
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from cardpipe.domain.records import (
    DECLINED,
    PENDING,
    REJECTED,
    STREAM_COLUMNS,
    TRANSACTION_COLUMNS,
    CardProfile,
    Transaction,
)
from cardpipe.errors import PartitionsHeld, SettlementChanged

if TYPE_CHECKING:
    from cardpipe.stream.columnar import DecidedColumns


class CardState(NamedTuple):
    """Per-card stream state, persisted with each checkpoint (a named tuple: one is made per card and batch)."""

    card_id: int
    pending_balance: Decimal | None  # None for a card the serving data does not know
    pending_added: int = 0  # the card's pending decisions in this batch (added to its running count)


_STREAM_INDEX = {name: index for index, name in enumerate(STREAM_COLUMNS)}


class DecisionRow(tuple):  # type: ignore[type-arg]
    """A ``stream_transactions`` row: a tuple in ``STREAM_COLUMNS`` order (what the database writer takes
    as is) that also reads by column name, ``row["status"]``, and converts with ``dict(row)``."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
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
    #: Per decided row, in the same order: (the partition it came from, the credit limit it was judged against).
    positions: list[tuple[int, Decimal | None]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rejected_transactions rows
    card_states: dict[int, CardState] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    counts: Counter[str] = field(default_factory=Counter)
    publish_times_ms: list[int] = field(default_factory=list)  # of decided messages, for latency
    #: The settlement whose credit limits decided this batch (None: the original limits).
    settlement_id: int | None = None
    #: Messages left on the consumer's partitions after this batch (None: not known yet).
    lag_messages: int | None = None
    #: The decisions and card states as columns when the batch was decided column by column
    #: (:mod:`cardpipe.stream.columnar`); ``decided``, ``positions`` and ``card_states`` are then empty. See
    #: :meth:`decision_rows` and :meth:`card_state_rows`.
    columns: DecidedColumns | None = None

    def decision_rows(self) -> list[DecisionRow]:
        """The batch's ``stream_transactions`` rows, however it was decided."""
        return self.columns.rows() if self.columns is not None else self.decided

    def card_state_rows(self) -> dict[int, CardState]:
        """The batch's ``card_states``, however it was decided."""
        return self.columns.card_states() if self.columns is not None else self.card_states


#: Upper bounds (milliseconds, inclusive) of the decision-latency histogram kept per checkpoint.
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000)


def checkpoint_log_row(batch: CheckpointBatch, topic: str, owner: str, committed_ms: int) -> dict[str, Any]:
    """The ``stream_checkpoint_log`` row of ``batch``, committed at ``committed_ms``: what the run report, the
    dashboard and the metrics read of the stream's history."""
    counts = batch.counts
    reasons = {key: n for key, n in sorted(counts.items()) if ":" in key}  # "declined:<reason>", "rejected:<reason>"
    latencies = sorted(map(committed_ms.__sub__, batch.publish_times_ms))  # committed_ms - t, in C
    return {
        "topic": topic,
        "owner": owner,
        "committed_ms": committed_ms,
        "messages": sum(counts[k] for k in (PENDING, DECLINED, REJECTED, "duplicate_ignored")),
        "pending": counts[PENDING],
        "declined": counts[DECLINED],
        "rejected": counts[REJECTED],
        "duplicates": counts["duplicate_ignored"],
        "reasons": json.dumps(reasons, separators=(",", ":")),
        "latency_p50_ms": _percentile(latencies, 0.50),
        "latency_p99_ms": _percentile(latencies, 0.99),
        "latency_max_ms": float(latencies[-1]) if latencies else None,
        "latency_buckets": json.dumps(_histogram(latencies)) if latencies else None,
        "latency_sum_ms": float(sum(latencies)) if latencies else None,
        "newest_publish_ms": max(batch.publish_times_ms) if batch.publish_times_ms else None,
        "lag_messages": batch.lag_messages,
        "settlement_id": batch.settlement_id,
    }


def _histogram(ordered: list[int]) -> list[int]:
    """How many of an ascending list fall in each bucket of :data:`LATENCY_BUCKETS_MS`, and above the last."""
    counts, below = [], 0
    for bound in LATENCY_BUCKETS_MS:
        upto = bisect_right(ordered, bound)
        counts.append(upto - below)
        below = upto
    counts.append(len(ordered) - below)
    return counts


def _percentile(ordered: list[int], q: float) -> float | None:
    """The nearest-rank ``q`` percentile of an ascending list (None for an empty one)."""
    if not ordered:
        return None
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


class CheckpointStore(Protocol):
    """Where the consumer keeps its state (the serving database in production)."""

    topic: str
    owner: str

    def acquire(self, partitions: Iterable[int]) -> list[int]:
        """Claim the partitions no live consumer holds; raise :class:`PartitionsHeld` when none is free."""

    def keep_leases(self) -> None:
        """Renew the claims of an idle consumer when due."""

    def release(self) -> None:
        """Give the claims up (a clean stop)."""

    def settlement_in_force(self) -> int | None:
        """The settlement whose credit limits decide now (None: the original limits)."""

    def card_profiles(self, settlement_id: int | None = None) -> dict[int, CardProfile]:
        """Every card's limit (under ``settlement_id``) and its owner's zip."""

    def settled_profiles(self) -> tuple[int | None, dict[int, CardProfile]]:
        """The settlement in force and the card profiles under its limits."""

    def restore(self) -> tuple[dict[int, Decimal], dict[int, int]]:
        """Pending balances and next offsets of the last checkpoint."""

    def restore_offsets(self) -> dict[int, int]:
        """The next offsets of the last checkpoint."""

    def load_cards(
        self, card_ids: list[int], settlement_id: int | None = None
    ) -> dict[int, tuple[CardProfile, Decimal]]:
        """Each known card of ``card_ids``: its profile (under ``settlement_id``) and its pending balance of the
        last checkpoint."""

    def lookup_decided(self, transaction_ids: list[int]) -> Mapping[int, Transaction]:
        """The already-decided transactions among ``transaction_ids``."""

    def commit_durably(self, batch: CheckpointBatch) -> None:
        """Write ``batch`` as one checkpoint (retrying while the store is unreachable). Raises
        :class:`SettlementChanged` when a settlement was published after the batch was decided."""

    def reset_offsets(self, partitions: Iterable[int] | None = None) -> None:
        """Forget the next offsets of ``partitions`` (all: the topic was recreated)."""

    def start_at(self, offsets: Mapping[int, int]) -> None:
        """Make the next consume start at ``offsets``."""


class MemoryCheckpointStore:
    """:class:`CheckpointStore` in memory: the stream's tests run with it and no database.

    ``settlements`` maps a settlement id to its card profiles; :meth:`publish` puts one in force.
    """

    def __init__(
        self, topic: str, cards: Mapping[int, CardProfile], balances: Mapping[int, Decimal], *, owner: str = "memory"
    ):
        self.topic = topic
        self.owner = owner
        self.cards = dict(cards)
        self.initial_balances = dict(balances)
        self.checkpoint_log: list[dict[str, Any]] = []  # stream_checkpoint_log rows
        self.balances: dict[int, Decimal] = {}
        self.pending_counts: dict[int, int] = {}  # card_states.pending_count
        self.offsets: dict[int, int] = {}
        self.decided: dict[int, DecisionRow] = {}
        self.rejected: list[dict[str, Any]] = []
        self.checkpoints = 0
        self.settlements: dict[int, dict[int, CardProfile]] = {}
        self.in_force: int | None = None
        self.leases: dict[int, str] = {}

    def acquire(self, partitions: Iterable[int]) -> list[int]:
        free = sorted(p for p in set(partitions) if self.leases.get(p, self.owner) == self.owner)
        if not free:
            raise PartitionsHeld(f"every partition of topic {self.topic!r} is held by another consumer")
        self.leases.update({p: self.owner for p in free})
        return free

    def keep_leases(self) -> None:
        pass

    def release(self) -> None:
        for p in [p for p, o in self.leases.items() if o == self.owner]:
            del self.leases[p]

    def publish(self, settlement_id: int, cards: Mapping[int, CardProfile]) -> None:
        self.settlements[settlement_id] = dict(cards)
        self.in_force = settlement_id

    def settlement_in_force(self) -> int | None:
        return self.in_force

    def card_profiles(self, settlement_id: int | None = None) -> dict[int, CardProfile]:
        return dict(self.cards if settlement_id is None else self.settlements[settlement_id])

    def settled_profiles(self) -> tuple[int | None, dict[int, CardProfile]]:
        return self.in_force, self.card_profiles(self.in_force)

    def restore(self) -> tuple[dict[int, Decimal], dict[int, int]]:
        restored = dict(self.initial_balances)
        restored.update({card_id: b for card_id, b in self.balances.items() if b is not None})
        return restored, dict(self.offsets)

    def restore_offsets(self) -> dict[int, int]:
        return dict(self.offsets)

    def load_cards(
        self, card_ids: list[int], settlement_id: int | None = None
    ) -> dict[int, tuple[CardProfile, Decimal]]:
        profiles, (balances, _) = self.card_profiles(settlement_id), self.restore()
        return {c: (profiles[c], balances[c]) for c in card_ids if c in profiles}

    def lookup_decided(self, transaction_ids: list[int]) -> Mapping[int, Transaction]:
        width = len(TRANSACTION_COLUMNS)
        return {i: Transaction(*self.decided[i][:width]) for i in transaction_ids if i in self.decided}

    def commit_durably(self, batch: CheckpointBatch) -> None:
        if batch.settlement_id != self.in_force:
            raise SettlementChanged()
        for row in batch.decision_rows():
            self.decided[row[0]] = row
        self.rejected.extend(batch.rejected)
        card_states = batch.card_state_rows()
        self.balances.update({c: s.pending_balance for c, s in card_states.items() if s.pending_balance is not None})
        for c, s in card_states.items():
            self.pending_counts[c] = self.pending_counts.get(c, 0) + s.pending_added
        self.offsets.update(batch.next_offsets)
        self.checkpoints += 1
        self.checkpoint_log.append(checkpoint_log_row(batch, self.topic, self.owner, int(time.time() * 1000)))

    def reset_offsets(self, partitions: Iterable[int] | None = None) -> None:
        for p in list(self.offsets) if partitions is None else partitions:
            self.offsets.pop(p, None)

    def start_at(self, offsets: Mapping[int, int]) -> None:
        self.offsets.update(offsets)


__all__ = [
    "CardState",
    "CheckpointBatch",
    "CheckpointStore",
    "DecisionRow",
    "MemoryCheckpointStore",
    "checkpoint_log_row",
    "decision_row",
]
