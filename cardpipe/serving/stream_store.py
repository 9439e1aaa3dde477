"""The consumer's side of the serving database: restore state, look up decisions, commit checkpoints.

Checkpoint contract: a polled batch's decisions, rejections, per-card states and next offsets are
written in ONE database transaction; the consumer acknowledges nothing before that commit, and on
start it resumes from what the database holds.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from itertools import repeat
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from cardpipe.domain.authorization import zip_of
from cardpipe.domain.money import from_cents
from cardpipe.domain.records import STREAM_COLUMNS, TRANSACTION_COLUMNS, CardProfile, Transaction
from cardpipe.errors import DatabaseUnavailable, LeaseLost, PartitionsHeld, SettlementChanged
from cardpipe.faults import crash_point
from cardpipe.serving import schema
from cardpipe.serving.bulk import BulkWriter, KeyReader
from cardpipe.serving.database import describe_error
from cardpipe.serving.owners import holder_is_dead, unique_owner
from cardpipe.stream.checkpoints import CheckpointBatch, checkpoint_log_row
from cardpipe.stream.columnar import DecidedColumns

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOOKUP_CHUNK = 900  # stays under SQLite's bound-parameter limit
REJECTION_COLUMNS = (
    "topic",
    "kafka_partition",
    "kafka_offset",
    "transaction_id",
    "reason",
    "detail",
    "message_key",
    "message_value",
    "recorded_at",
)
CARD_STATE_COLUMNS = ("card_id", "pending_balance", "pending_count")
DECISION_COLUMNS = (*STREAM_COLUMNS, "credit_limit", "kafka_partition", "checkpoint_seq")
#: How long a consumer's claim on a partition lasts without a renewal (each checkpoint renews it, and an
#: idle consumer every third of it): a consumer killed with SIGKILL frees its partitions after this long.
LEASE_SECONDS = 5.0
_decision_values = itemgetter(*STREAM_COLUMNS)
_partition_of, _limit_of = itemgetter(0), itemgetter(1)


def _decision_columns(
    batch: CheckpointBatch, seqs: Mapping[int, int], dialect: Dialect
) -> tuple[list[Sequence[Any]], bool] | None:
    """The ``stream_transactions`` rows of ``batch`` as columns, in ``DECISION_COLUMNS`` order (the decision's own,
    then the credit limit it was judged against, its partition and that partition's checkpoint sequence), built
    column by column at C speed, and whether they are the driver's values already (a batch decided column by
    column: :func:`_driver_columns`); None when it decided nothing."""
    if batch.columns is not None:
        if not batch.columns:
            return None
        driver = _driver_columns(batch.columns, seqs, dialect.name)
        if driver is not None:
            return driver, True
        rows: Sequence[Any] = batch.columns.rows()
        positions: Sequence[tuple[int, Decimal | None]] = batch.columns.positions()
    else:
        rows, positions = batch.decided, batch.positions
    if not rows:
        return None
    if len(positions) != len(rows):
        raise ValueError(f"{len(rows)} decisions but {len(positions)} positions")
    if not all(map(isinstance, rows, repeat(tuple))):
        rows = [row if isinstance(row, tuple) else _decision_values(row) for row in rows]
    partitions = list(map(_partition_of, positions))
    columns = [
        *zip(*rows, strict=True),
        list(map(_limit_of, positions)),
        partitions,
        list(map(seqs.__getitem__, partitions)),
    ]
    return columns, False


def _driver_columns(columns: DecidedColumns, seqs: Mapping[int, int], dialect: str) -> list[Sequence[Any]] | None:
    """A column-by-column batch's rows as the driver takes them, in ``DECISION_COLUMNS`` order: what the dialect
    stores for the per-message path's ``Decimal`` and ``datetime``. Money as :func:`_driver_money` gives it (an
    amount from its text: SQLite's ``float`` of it, MySQL/MariaDB the text); timestamps as SQLAlchemy's text with
    microseconds on SQLite, as the text on MySQL/MariaDB, which the server reads into the same DATETIME. None for
    another dialect (the rows then go the per-message way)."""
    money = _driver_money(dialect)
    if money is None:
        return None
    if dialect == "sqlite":
        stamps: Sequence[str] = [stamp + ".000000" for stamp in columns.timestamp]
        amounts: Sequence[Any] = list(map(float, columns.amount))  # the nearest double, as float(Decimal(text))
    else:
        stamps, amounts = columns.timestamp, columns.amount
    return [
        columns.transaction_id,
        columns.card_id,
        columns.merchant_name,
        stamps,
        amounts,
        columns.location,
        columns.transaction_type,
        columns.related_transaction_id,
        columns.status,
        money(columns.pending_balance),
        columns.decline_reason,
        money(columns.credit_limit),
        columns.partition,
        list(map(seqs.__getitem__, columns.partition)),
    ]


def _card_state_columns(batch: CheckpointBatch, dialect: Dialect) -> tuple[list[Sequence[Any]], bool]:
    """``batch``'s ``card_states`` rows as columns (card, balance, pending added), sorted by card (concurrent
    workers lock rows in one order: no deadlocks), and whether they are the driver's values already. A batch
    decided column by column gives its balances in cents: SQLite takes them as the nearest double (the Numeric
    type's own conversion of the ``Decimal``), MySQL/MariaDB as text."""
    columns = batch.columns
    money = None if columns is None else _driver_money(dialect.name)
    if columns is None or money is None:
        states = sorted(batch.card_state_rows().items())
        return [
            [c for c, _ in states],
            [s.pending_balance for _, s in states],
            [s.pending_added for _, s in states],
        ], False
    balances, added = columns.card_balances, columns.card_pending_added
    cards = sorted(balances)
    return [cards, money(list(map(balances.__getitem__, cards))), list(map(added.get, cards, repeat(0)))], True


def _driver_money(dialect: str) -> Callable[[list[int]], list[Any]] | None:
    """How the driver is given amounts of money held in cents, as the dialect stores the per-message path's
    ``Decimal``: SQLite the nearest double (the Numeric bind processor's ``float``; cents / 100 is that double),
    MySQL/MariaDB the decimal text; None for another dialect."""
    if dialect == "sqlite":
        return _cents_as_floats
    if dialect in ("mysql", "mariadb"):
        return _cents_as_texts
    return None


def _cents_as_floats(cents: list[int]) -> list[float]:
    return [c / 100 for c in cents]


def _cents_as_texts(cents: list[int]) -> list[str]:
    return [str(from_cents(c)) for c in cents]


_rejection_values = itemgetter(*REJECTION_COLUMNS)


def is_transient(exc: DBAPIError) -> bool:
    """A lost or refused connection, a restarting server or a busy SQLite file: worth retrying."""
    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


def _card_reader(dialect: Dialect, settlement_id: int | None) -> KeyReader:
    """Cards by id: each one's limit (settlement ``settlement_id``'s, else the original one), its owner's address
    and its pending balance (checkpointed, else the card's current balance)."""
    c, cu, st, sc = schema.cards, schema.customers, schema.card_states, schema.settled_cards
    source = c.join(cu, c.c.customer_id == cu.c.customer_id).outerjoin(st, st.c.card_id == c.c.card_id)
    limit: Any = c.c.credit_limit
    if settlement_id is not None:
        source = source.outerjoin(sc, and_(sc.c.card_id == c.c.card_id, sc.c.settlement_id == int(settlement_id)))
        limit = func.coalesce(sc.c.credit_limit, c.c.credit_limit)
    balance = func.coalesce(st.c.pending_balance, c.c.current_balance)
    query = select(c.c.card_id, limit, cu.c.address, balance).select_from(source)
    return KeyReader.of_select(dialect, query, c.c.card_id, chunk=_LOOKUP_CHUNK)


def card_states_writer(dialect: Dialect) -> BulkWriter:
    """Upserts ``card_states`` rows (:data:`CARD_STATE_COLUMNS`): the balance replaced, the count of pending
    decisions added to the card's running count."""
    return BulkWriter(
        dialect, schema.card_states, CARD_STATE_COLUMNS, upsert_keys=["card_id"], add_columns=["pending_count"]
    )


class StreamStore:
    """All the stream consumer's database I/O, for one topic: the serving database's implementation of the
    stream layer's :class:`~cardpipe.stream.checkpoints.CheckpointStore`.

    Besides decisions and offsets, each checkpoint (one database transaction) also advances its
    partitions' checkpoint sequence (what a settlement's watermark counts), renews this consumer's
    partition leases, and checks that the settlement it decided with is still the one in force.
    """

    def __init__(self, engine: Engine, topic: str, *, owner: str | None = None, lease_seconds: float = LEASE_SECONDS):
        self.engine = engine
        self.topic = topic
        self.owner = owner or unique_owner()
        self.lease_seconds = lease_seconds
        self._owned: tuple[int, ...] = ()
        self._renewed_at = 0.0
        self._seq: dict[int, int] = {}
        dialect = engine.dialect
        self._decisions = BulkWriter(dialect, schema.stream_transactions, DECISION_COLUMNS, load_data=True)
        self._rejections = BulkWriter(dialect, schema.rejected_transactions, REJECTION_COLUMNS)
        self._card_states = card_states_writer(dialect)
        self._offsets = BulkWriter(
            dialect,
            schema.stream_offsets,
            ("topic", "kafka_partition", "next_offset", "checkpoint_seq"),
            upsert_keys=["topic", "kafka_partition"],
        )
        self._decided = KeyReader(
            dialect, schema.stream_transactions, TRANSACTION_COLUMNS, "transaction_id", chunk=_LOOKUP_CHUNK
        )
        self._card_readers: dict[int | None, KeyReader] = {}

    def settlement_in_force(
        self, *, give_up_after: float = 300.0, sleep: Callable[[float], None] = time.sleep
    ) -> int | None:
        """The id of the settlement in force (None before any); retried while the database is unreachable."""

        def read() -> int | None:
            with self.engine.connect() as conn:
                return _settlement_in_force(conn)

        return self._retry_while_unavailable(
            read, "reading the settlement in force", give_up_after=give_up_after, sleep=sleep
        )

    def card_profiles(self, settlement_id: int | None = None) -> dict[int, CardProfile]:
        """Every card's limit (settlement ``settlement_id``'s, else the original) and its owner's zip."""
        c, cu, sc = schema.cards, schema.customers, schema.settled_cards
        query = select(c.c.card_id, c.c.credit_limit, cu.c.address).join(cu, c.c.customer_id == cu.c.customer_id)
        with self.engine.connect() as conn:
            profiles = {
                card_id: CardProfile(card_id, limit, zip_of(address))
                for card_id, limit, address in conn.execute(query).all()  # one fetch: iterating fetches each row
            }
            if settlement_id is not None:
                for card_id, limit in conn.execute(
                    select(sc.c.card_id, sc.c.credit_limit).where(sc.c.settlement_id == settlement_id)
                ).all():
                    old = profiles.get(card_id)
                    if old is not None:
                        profiles[card_id] = CardProfile(card_id, limit, old.customer_zip)
            return profiles

    def settled_profiles(self) -> tuple[int | None, dict[int, CardProfile]]:
        """The settlement in force and the card profiles under its limits."""
        settlement_id = self.settlement_in_force()
        return settlement_id, self.card_profiles(settlement_id)

    # ----------------------------------------------------------------------------------------- leases

    def acquire(self, partitions: Iterable[int]) -> list[int]:
        """Claim ``partitions`` for this consumer: those no live consumer holds (expired leases, and those of
        dead processes of this host, are taken over). Returns the partitions claimed (sorted); raises
        :class:`PartitionsHeld`, naming the holder, when every one is held."""
        wanted = sorted(set(partitions))
        attempts = 10
        for attempt in range(attempts):
            try:
                return self._acquire(wanted)
            except (IntegrityError, OperationalError):
                # Another consumer claimed at the same moment: it inserted a lease first, or (MySQL) both
                # transactions locked the same gap of missing leases and one was chosen as the deadlock victim.
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0.02, 0.2))
        raise AssertionError("unreachable")

    def _acquire(self, wanted: list[int]) -> list[int]:
        sl = schema.stream_leases
        now = time.time()
        granted: list[int] = []
        held: dict[str, list[int]] = {}
        with self.engine.begin() as conn:
            current = {
                p: (owner, expires)
                for p, owner, expires in conn.execute(
                    select(sl.c.kafka_partition, sl.c.owner, sl.c.expires_at)
                    .where(sl.c.topic == self.topic, sl.c.kafka_partition.in_(wanted))
                    .with_for_update()
                )
            }
            for p in wanted:
                lease = current.get(p)
                expires = now + self.lease_seconds
                if lease is None:
                    conn.execute(
                        sl.insert().values(topic=self.topic, kafka_partition=p, owner=self.owner, expires_at=expires)
                    )
                elif lease[0] == self.owner or lease[1] < now or holder_is_dead(lease[0]):
                    conn.execute(
                        sl.update()
                        .where(sl.c.topic == self.topic, sl.c.kafka_partition == p)
                        .values(owner=self.owner, expires_at=expires)
                    )
                else:
                    held.setdefault(lease[0], []).append(p)
                    continue
                granted.append(p)
        if not granted:
            raise PartitionsHeld(
                f"every partition of topic {self.topic!r} this consumer would decide is being decided by another "
                f"consumer ({_describe_holders(held)}); stop it first, or let it finish"
            )
        if held:
            log.warning(
                "partition(s) %s of %r are decided by another consumer (%s); this one takes %s",
                ", ".join(str(p) for ps in held.values() for p in ps),
                self.topic,
                _describe_holders(held),
                ", ".join(map(str, granted)),
            )
        self._owned = tuple(granted)
        self._renewed_at = time.monotonic()
        return granted

    def keep_leases(self) -> None:
        """Renew this consumer's leases if a third of their time has passed (for an idle consumer)."""
        if not self._owned or time.monotonic() - self._renewed_at < self.lease_seconds / 3:
            return
        try:
            with self.engine.begin() as conn:
                self._renew(conn)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            log.warning("database unavailable (%s); lease renewal postponed", describe_error(self.engine.url, exc))

    def _renew(self, conn: Connection) -> None:
        if not self._owned:
            return
        sl = schema.stream_leases
        result = conn.execute(
            sl.update()
            .where(sl.c.topic == self.topic, sl.c.owner == self.owner, sl.c.kafka_partition.in_(self._owned))
            .values(expires_at=time.time() + self.lease_seconds)
        )
        if result.rowcount != len(self._owned):
            raise LeaseLost(
                f"another consumer took over partition(s) of topic {self.topic!r} this one was "
                f"deciding (its lease had expired: was this consumer stopped for over "
                f"{self.lease_seconds:g} s?)"
            )
        self._renewed_at = time.monotonic()

    def release(self) -> None:
        """Give up this consumer's leases (a clean stop); a failure to reach the database is only logged."""
        if not self._owned:
            return
        sl = schema.stream_leases
        try:
            with self.engine.begin() as conn:
                conn.execute(sl.delete().where(sl.c.topic == self.topic, sl.c.owner == self.owner))
        except DBAPIError as exc:
            log.warning(
                "could not release partition leases (%s); they expire in %g s",
                describe_error(self.engine.url, exc),
                self.lease_seconds,
            )
        self._owned = ()

    def restore(self) -> tuple[dict[int, Decimal], dict[int, int]]:
        """Pending balances (checkpointed, else the card's current balance) and next offsets."""
        with self.engine.connect() as conn:
            # Money columns come as Decimal (Numeric(asdecimal=True)); one fetch each: iterating fetches each row.
            balances: dict[int, Decimal] = dict(
                conn.execute(select(schema.cards.c.card_id, schema.cards.c.current_balance)).all()
            )
            st = schema.card_states
            for cid, balance in conn.execute(select(st.c.card_id, st.c.pending_balance)).all():
                if balance is not None:
                    balances[cid] = balance
        return balances, self.restore_offsets()

    def restore_offsets(self) -> dict[int, int]:
        """The next offsets of the last checkpoint (partitions that have one)."""
        so = schema.stream_offsets
        offsets: dict[int, int] = {}
        seqs: dict[int, int] = {}
        query = select(so.c.kafka_partition, so.c.next_offset, so.c.checkpoint_seq).where(so.c.topic == self.topic)
        with self.engine.connect() as conn:
            for p, next_offset, seq in conn.execute(query).all():
                seqs[p] = seq
                if next_offset is not None:
                    offsets[p] = next_offset
        self._seq = seqs
        return offsets

    def load_cards(
        self,
        card_ids: list[int],
        settlement_id: int | None = None,
        *,
        give_up_after: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[int, tuple[CardProfile, Decimal]]:
        """For each card of ``card_ids`` in the database: its profile (the limit of settlement ``settlement_id``,
        else the original one; its owner's zip) and its pending balance (checkpointed, else the card's current
        balance), as :meth:`card_profiles` and :meth:`restore` give them. Retried while the database is
        unreachable, like :meth:`lookup_decided`: the consumer loads each batch's new cards."""
        found = self._retry_while_unavailable(
            lambda: self._load_cards(card_ids, settlement_id),
            "loading cards",
            give_up_after=give_up_after,
            sleep=sleep,
        )
        return found or {}

    def _load_cards(self, card_ids: list[int], settlement_id: int | None) -> dict[int, tuple[CardProfile, Decimal]]:
        reader = self._card_readers.get(settlement_id)
        if reader is None:  # the settlement whose limits the consumer judges with: only the latest is kept
            self._card_readers = {settlement_id: _card_reader(self.engine.dialect, settlement_id)}
            reader = self._card_readers[settlement_id]
        found: dict[int, tuple[CardProfile, Decimal]] = {}
        with self.engine.connect() as conn:
            for card_id, credit_limit, address, pending_balance in reader.read(conn, sorted(set(card_ids))):
                found[card_id] = (CardProfile(card_id, credit_limit, zip_of(address)), pending_balance)
        return found

    def lookup_decided(
        self, transaction_ids: list[int], *, give_up_after: float = 300.0, sleep: Callable[[float], None] = time.sleep
    ) -> Mapping[int, Transaction]:
        """Already-decided transactions among ``transaction_ids`` (primary-key lookups, one query per chunk).

        Like :meth:`commit_durably`, retries with backoff while the database is unreachable: every polled
        batch starts with this lookup, and a restarting server must not stop the consumer here either.
        """
        found = self._retry_while_unavailable(
            lambda: self._lookup_decided(transaction_ids), "the lookup", give_up_after=give_up_after, sleep=sleep
        )
        return found or {}  # never None: no ``done_anyway`` here

    def _lookup_decided(self, transaction_ids: list[int]) -> Mapping[int, Transaction]:
        found: dict[int, Transaction] = {}
        with self.engine.connect() as conn:
            for row in self._decided.read(conn, sorted(set(transaction_ids))):
                tx = Transaction(*row)
                found[tx.transaction_id] = tx
        return found

    def commit(self, batch: CheckpointBatch) -> None:
        """Write one checkpoint batch atomically.

        Raises :class:`SettlementChanged` (nothing written) when the settlement in force is no longer the
        one the batch was decided with, and :class:`LeaseLost` when another consumer took a partition over.
        """
        seqs = {p: self._seq.get(p, 0) + 1 for p in batch.next_offsets}
        decided = _decision_columns(batch, seqs, self.engine.dialect)
        rejected = [_rejection_values(row) for row in batch.rejected]
        # Sorted keys: concurrent workers lock rows in one order (no deadlocks).
        card_states = _card_state_columns(batch, self.engine.dialect)
        offsets = [(self.topic, p, o, seqs[p]) for p, o in sorted(batch.next_offsets.items())]
        with self.engine.begin() as conn:
            if decided is not None:
                self._decisions.write_columns(conn, decided[0], converted=decided[1])
            self._rejections.write(conn, rejected)
            self._card_states.write_columns(conn, card_states[0], converted=card_states[1])
            self._offsets.write(conn, offsets)
            conn.execute(
                schema.stream_checkpoint_log.insert(),
                checkpoint_log_row(batch, self.topic, self.owner, int(time.time() * 1000)),
            )
            self._renew(conn)
            # Last, under a shared lock: a settlement published meanwhile waits for this commit, or this
            # commit sees it and is decided again with its limits.
            if _settlement_in_force(conn, lock=True) != batch.settlement_id:
                raise SettlementChanged()
            crash_point("checkpoint.written")
        self._seq.update(seqs)

    def commit_durably(
        self, batch: CheckpointBatch, *, give_up_after: float = 300.0, sleep: Callable[[float], None] = time.sleep
    ) -> None:
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

        def committed_anyway() -> bool:
            if not self._is_committed(batch):
                return False
            self._seq.update({p: self._seq.get(p, 0) + 1 for p in batch.next_offsets})
            return True

        self._retry_while_unavailable(
            attempt, "the checkpoint", give_up_after=give_up_after, sleep=sleep, done_anyway=committed_anyway
        )

    def _retry_while_unavailable(
        self,
        attempt: Callable[[], T],
        what: str,
        *,
        give_up_after: float,
        sleep: Callable[[float], None],
        done_anyway: Callable[[], bool] | None = None,
    ) -> T | None:
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
                log.warning(
                    "database unavailable (%s); retrying %s in %.1f s",
                    describe_error(self.engine.url, exc),
                    what,
                    delay,
                )
                sleep(delay)
                delay = min(delay * 2, 5.0)

    def _is_committed(self, batch: CheckpointBatch) -> bool:
        """Whether the database already holds this batch's offsets (False when it cannot tell)."""
        if not batch.next_offsets:
            return False
        so = schema.stream_offsets
        try:
            with self.engine.connect() as conn:
                stored = dict(
                    conn.execute(
                        select(so.c.kafka_partition, so.c.next_offset).where(
                            so.c.topic == self.topic, so.c.kafka_partition.in_(list(batch.next_offsets))
                        )
                    ).all()
                )
        except DBAPIError:
            return False
        return all((stored.get(p) or -1) >= o for p, o in batch.next_offsets.items())

    def reset_offsets(self, partitions: Iterable[int] | None = None) -> None:
        """Forget the stored offsets of ``partitions``, or of every partition (the topic was recreated)."""
        so = schema.stream_offsets
        condition = so.c.topic == self.topic
        if partitions is not None:
            condition = condition & so.c.kafka_partition.in_(list(partitions))
        with self.engine.begin() as conn:
            # The checkpoint sequence stays: settlements' watermarks count on it never going back.
            conn.execute(so.update().where(condition).values(next_offset=None))

    def committed_offsets(self) -> dict[int, int | None]:
        """Each partition's next offset to read as committed (None: from the beginning of the log)."""
        so = schema.stream_offsets
        with self.engine.connect() as conn:
            return dict(
                conn.execute(select(so.c.kafka_partition, so.c.next_offset).where(so.c.topic == self.topic)).all()
            )

    def other_consumers(self) -> dict[str, list[int]]:
        """Live consumers other than this store's (unexpired leases of processes not known to be dead): owner ->
        the partitions it holds."""
        sl = schema.stream_leases
        with self.engine.connect() as conn:
            leases = conn.execute(
                select(sl.c.owner, sl.c.kafka_partition)
                .where(sl.c.topic == self.topic, sl.c.expires_at > time.time(), sl.c.owner != self.owner)
                .order_by(sl.c.owner, sl.c.kafka_partition)
            ).all()
        held: dict[str, list[int]] = {}
        for owner, p in leases:
            if not holder_is_dead(owner):
                held.setdefault(owner, []).append(p)
        return held

    def start_at(self, offsets: Mapping[int, int]) -> None:
        """Make the next consume start at ``offsets`` (a fresh run ignores what the topic held before)."""
        so = schema.stream_offsets
        with self.engine.begin() as conn:
            seqs = dict(
                conn.execute(select(so.c.kafka_partition, so.c.checkpoint_seq).where(so.c.topic == self.topic)).all()
            )
            self._offsets.write(conn, [(self.topic, p, o, seqs.get(p, 0)) for p, o in sorted(offsets.items())])


def _settlement_in_force(conn: Connection, *, lock: bool = False) -> int | None:
    ss = schema.serving_state
    query = select(ss.c.settlement_id).where(ss.c.id == schema.SERVING_STATE_ID)
    if lock:
        query = query.with_for_update(read=True)
    return conn.execute(query).scalar()


def _describe_holders(held: Mapping[str, list[int]]) -> str:
    return "; ".join(f"{owner} holds partition(s) {', '.join(map(str, ps))}" for owner, ps in held.items())
