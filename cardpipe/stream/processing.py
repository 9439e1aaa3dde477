"""The stream's processing step, pure: a polled batch of raw messages in, a checkpoint batch out.

No broker and no database here: the consumer feeds :class:`StreamProcessor` with messages and a
``lookup`` callable (its checkpoint store's), and writes the :class:`CheckpointBatch` it returns in one
checkpoint. Tests drive it with plain lists and dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import compress, repeat
from operator import is_not
from typing import NamedTuple, cast, overload

from cardpipe.domain.authorization import Authorizer
from cardpipe.domain.records import DECLINED, REJECTED, CardProfile, Transaction
from cardpipe.stream.checkpoints import CardState, CheckpointBatch, DecisionRow, decision_row
from cardpipe.stream.codec import DUPLICATE_CONFLICT, UNKNOWN_CARD, Rejection, TransactionFields, decode_fields
from cardpipe.stream.columnar import ColumnarDecider

#: Finds already-decided transactions by id (the serving store in production).
DecidedLookup = Callable[[list[int]], Mapping[int, Transaction]]
#: Loads cards by id under a settlement's limits (None: the original ones): each known card's profile and the
#: pending balance of the last checkpoint (the serving store's ``load_cards`` in production).
CardsLoader = Callable[[list[int], int | None], Mapping[int, tuple[CardProfile, Decimal]]]


class RawMessage(NamedTuple):
    """One polled message, as the broker gave it (a named tuple: one is made per message)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


class RawBatch(Sequence[RawMessage]):
    """A poll's messages as columns, in order: each message's partition, offset, key, value and timestamp. The
    column-by-column path reads the columns as they are (no tuple per message); indexing or iterating gives
    :class:`RawMessage` tuples, made as they are asked for."""

    __slots__ = ("keys", "offsets", "partitions", "timestamps", "values")

    def __init__(
        self,
        partitions: list[int],
        offsets: list[int],
        keys: list[bytes | None],
        values: list[bytes | None],
        timestamps: list[int | None],
    ) -> None:
        if not len(partitions) == len(offsets) == len(keys) == len(values) == len(timestamps):
            raise ValueError("a batch's columns must be equally long")
        self.partitions, self.offsets, self.keys, self.values = partitions, offsets, keys, values
        self.timestamps = timestamps

    @classmethod
    def of(cls, messages: Iterable[RawMessage]) -> RawBatch:
        """The batch of ``messages``, in their order."""
        if isinstance(messages, RawBatch):
            return messages
        listed = list(messages)
        if not listed:
            return cls([], [], [], [], [])
        partitions, offsets, keys, values, timestamps = map(list, zip(*listed, strict=True))
        return cls(partitions, offsets, keys, values, timestamps)

    def __len__(self) -> int:
        return len(self.partitions)

    def __iter__(self) -> Iterator[RawMessage]:
        columns = zip(self.partitions, self.offsets, self.keys, self.values, self.timestamps, strict=True)
        return map(tuple.__new__, repeat(RawMessage), columns)

    @overload
    def __getitem__(self, index: int) -> RawMessage: ...

    @overload
    def __getitem__(self, index: slice) -> RawBatch: ...

    def __getitem__(self, index: int | slice) -> RawMessage | RawBatch:
        p, o, k, v, t = self.partitions, self.offsets, self.keys, self.values, self.timestamps
        if isinstance(index, slice):
            return RawBatch(p[index], o[index], k[index], v[index], t[index])
        return RawMessage(p[index], o[index], k[index], v[index], t[index])

    def __repr__(self) -> str:
        return f"RawBatch({list(self)!r})"


class StreamProcessor:
    """Authorizes polled batches, absorbing duplicates by transaction_id (the idempotency key).

    The batch's transaction ids are looked up in one query (primary-key lookups): memory holds per-card
    state only, never the set of decided ids. (Without ``look_up_first``, a batch the column-by-column path
    takes is not looked up: the store's primary key catches a redelivery at the commit.) The cards are given
    (``cards``, ``balances``), or loaded as they first come with ``load_cards``: a batch's new cards in one call.
    """

    def __init__(
        self,
        topic: str,
        cards: Mapping[int, CardProfile],
        balances: Mapping[int, Decimal],
        lookup: DecidedLookup,
        clock: Callable[[], datetime] = datetime.now,
        settlement_id: int | None = None,
        load_cards: CardsLoader | None = None,
        *,
        columnar: bool | ColumnarDecider = False,
        look_up_first: bool = True,
    ):
        self.topic = topic
        #: False: the column-by-column path decides a batch without looking its ids up first. A redelivered id
        #: then fails the checkpoint on the decisions' primary key, and the consumer decides again from its last
        #: checkpoint with a processor that looks them up (:func:`cardpipe.stream.consumer.consume`).
        self.look_up_first = look_up_first
        self.authorizer = Authorizer(
            cards, balances, load=None if load_cards is None else lambda ids: load_cards(ids, self.settlement_id)
        )
        self.lookup = lookup
        self.clock = clock
        self.settlement_id = settlement_id
        self.cards_loaded = 0  # how many cards ``load_cards`` was asked for so far
        #: With ``columnar`` (True, or the decider to use), each batch is first offered to the column-by-column
        #: path (needs pyarrow).
        self.columnar = columnar if isinstance(columnar, ColumnarDecider) else ColumnarDecider() if columnar else None
        self.columnar_batches = 0  # how many batches that path decided

    def adopt(self, settlement_id: int | None, cards: Mapping[int, CardProfile] | None = None) -> None:
        """Decide from now on with the limits of settlement ``settlement_id``: ``cards``' or, with ``load_cards``,
        those it loads from now on; the running pending balances carry on unchanged (SPEC §9)."""
        self.settlement_id = settlement_id
        self.authorizer.adopt(cards)

    def process(self, messages: Iterable[RawMessage]) -> CheckpointBatch:
        """Decide a batch of messages in order; returns the checkpoint to persist.

        With ``columnar``, a batch of messages all in the common shape is decided column by column
        (:mod:`cardpipe.stream.columnar`: the same decisions, as ``batch.columns``). Any other batch goes the
        per-message way, which works on tuples (:func:`decode_fields`, :meth:`Authorizer.decide`,
        :class:`DecisionRow`): no object per message beyond the row itself.
        """
        messages = RawBatch.of(messages)
        if self.columnar is not None and messages:
            taken = self._process_columns(messages)
            if taken is not None:
                self.columnar_batches += 1
                return taken
            self.columnar.hand_back(self.authorizer)  # the per-message path reads the authorizer's balances
        batch = self._process_messages(messages)
        if self.columnar is not None:
            self.columnar.forget(batch.card_states)
        return batch

    def _process_messages(self, messages: RawBatch) -> CheckpointBatch:
        """The per-message path."""
        batch = CheckpointBatch(settlement_id=self.settlement_id)
        decoded = list(map(decode_fields, messages.values))
        ids = [r[0] for r in decoded if type(r) is tuple]
        self.cards_loaded += self.authorizer.prepare(r[1] for r in decoded if type(r) is tuple)
        known: dict[int, TransactionFields] = {}
        if ids:
            known = {tid: tx.values() for tid, tx in self.lookup(ids).items()}
        decide, limit_of = self.authorizer.decide, self.authorizer.limit_of
        decided, publish_times, next_offsets = batch.decided, batch.publish_times_ms, batch.next_offsets
        positions = batch.positions
        counts: dict[str, int] = {}
        touched: dict[int, bool] = {}  # card id -> known to the serving data
        pending_added: dict[int, int] = {}  # card id -> its pending decisions in this batch
        for message, result in zip(messages, decoded, strict=True):
            next_offsets[message.partition] = message.offset + 1
            if type(result) is not tuple:
                self._reject(batch, message, result)  # type: ignore[arg-type]  # not a plain tuple: a Rejection
                continue
            tx_id = result[0]
            previous = known.get(tx_id)
            if previous is not None:
                if previous == result:
                    counts["duplicate_ignored"] = counts.get("duplicate_ignored", 0) + 1
                else:
                    self._reject(
                        batch,
                        message,
                        Rejection(
                            DUPLICATE_CONFLICT,
                            f"transaction {tx_id} was already decided with different content",
                            tx_id,
                        ),
                    )
                continue
            known[tx_id] = result
            card_id = result[1]
            outcome = decide(card_id, result[4], result[5])
            if outcome is not None:
                decided.append(DecisionRow(result + outcome))
                positions.append((message.partition, limit_of(card_id)))
                status = outcome[0]
                counts[status] = counts.get(status, 0) + 1
                if outcome[2] is not None:  # a decline's reason
                    key = f"{DECLINED}:{outcome[2]}"
                    counts[key] = counts.get(key, 0) + 1
                else:
                    pending_added[card_id] = pending_added.get(card_id, 0) + 1
                touched[card_id] = True
            else:
                decided.append(DecisionRow(result + (REJECTED, None, UNKNOWN_CARD)))
                positions.append((message.partition, None))
                self._reject(
                    batch, message, Rejection(UNKNOWN_CARD, f"card {card_id} is not in the serving database", tx_id)
                )
                touched[card_id] = False
            if message.timestamp_ms is not None:
                publish_times.append(message.timestamp_ms)
        balances = self.authorizer.balances
        batch.card_states = {
            cid: CardState(cid, balances[cid], pending_added.get(cid, 0)) if is_known else CardState(cid, None)
            for cid, is_known in touched.items()
        }
        batch.counts.update(counts)
        return batch

    def _process_columns(self, messages: RawBatch) -> CheckpointBatch | None:
        """The batch decided column by column, or None (nothing changed) when that path does not take it: a
        message of another shape, an unknown card, or a transaction twice in the batch or decided before (a
        redelivery: the per-message path tells a duplicate from a conflict)."""
        assert self.columnar is not None
        table = self.columnar.read(messages.values)
        if table is None:
            return None
        card_ids, transaction_ids = table.column("card_id").to_pylist(), table.column("transaction_id").to_pylist()
        if len(set(transaction_ids)) != len(transaction_ids):  # a transaction twice in the batch (re-published)
            return None
        self.cards_loaded += self.authorizer.prepare(card_ids)
        if self.look_up_first and self.lookup(transaction_ids):
            return None
        partitions = messages.partitions
        outcome = self.columnar.decide(table, card_ids, transaction_ids, partitions, self.authorizer)
        if outcome is None:
            return None
        batch = CheckpointBatch(settlement_id=self.settlement_id, columns=outcome.columns)
        last_offsets = dict(zip(partitions, messages.offsets, strict=True))  # each partition's last
        batch.next_offsets = {p: offset + 1 for p, offset in last_offsets.items()}
        stamps = messages.timestamps
        batch.publish_times_ms = cast(list[int], list(compress(stamps, map(is_not, stamps, repeat(None)))))
        batch.counts.update(outcome.counts)
        return batch

    def _reject(self, batch: CheckpointBatch, message: RawMessage, rejection: Rejection) -> None:
        batch.counts[REJECTED] += 1
        batch.counts[f"rejected:{rejection.reason}"] += 1
        batch.rejected.append(
            {
                "topic": self.topic,
                "kafka_partition": message.partition,
                "kafka_offset": message.offset,
                "transaction_id": rejection.transaction_id,
                "reason": rejection.reason,
                "detail": rejection.detail[:1024],
                "message_key": message.key,
                "message_value": message.value,
                "recorded_at": self.clock().replace(microsecond=0),
            }
        )


__all__ = ["CardState", "CheckpointBatch", "DecisionRow", "RawBatch", "RawMessage", "StreamProcessor", "decision_row"]
