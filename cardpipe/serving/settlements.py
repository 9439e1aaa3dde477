"""Settlements in the serving database (SPEC §9): claim one with its watermark, store its rows, publish it.

A settlement is claimed in one transaction that also fixes its **watermark**: per partition, the last
checkpoint the consumers committed (``stream_offsets.checkpoint_seq``, written in the same transaction as
the decisions it counts, so reading it is a consistent cut). The engine then settles the decisions at or
below it; the settled cards and customers are written in small transactions keyed by the settlement's id,
and the settlement is **published** by one UPDATE of the ``serving_state`` row, which every view and the
consumer's checkpoints read. A settlement killed before that leaves the previous one in force; the rows it
left are removed by the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, select, true
from sqlalchemy.exc import DBAPIError

from cardpipe.errors import CardpipeError
from cardpipe.serving import schema
from cardpipe.serving.bulk import BulkWriter
from cardpipe.serving.csv_io import insert_rows
from cardpipe.serving.owners import holder_is_dead

log = logging.getLogger(__name__)

#: A running settlement whose heartbeat is older than this is taken for dead.
STALE_SECONDS = 20.0
HEARTBEAT_SECONDS = 2.0
#: A settlement's cards and customers are stored this many rows to a transaction: the consumer keeps committing.
STORE_CHUNK_ROWS = 5000
#: Counts a settlement records (the columns of ``settlements`` of the same names).
COUNT_COLUMNS = (
    "transactions",
    "approved",
    "declined",
    "rejected",
    "cards",
    "customers",
    "cards_limit_lowered",
    "customers_score_down",
)


class SettlementRunning(CardpipeError):
    """Another settlement is running on this database."""


@dataclass(frozen=True)
class Claim:
    """A settlement claimed to run: its id and watermark (partition -> last checkpoint settled)."""

    settlement_id: int
    watermark: dict[int, int]
    previous_id: int | None


@dataclass(frozen=True)
class NothingNew:
    """No decision was committed after the watermark of the settlement in force."""

    settlement_id: int


class SettlementStore:
    """The batch layer's side of the serving database."""

    def __init__(self, engine: Engine, topic: str):
        self.engine = engine
        self.topic = topic

    def claim(self, owner: str, engine_name: str) -> Claim | NothingNew:
        """Fix a watermark and record a running settlement, unless nothing was decided since the one in force.

        Raises :class:`SettlementRunning` when another live settlement runs; one whose process died (stale
        heartbeat, or a dead process of this host) is marked failed and its rows removed.
        """
        st, ss = schema.settlements, schema.serving_state
        with self.engine.begin() as conn:
            # Serialises claims (and the consumers' checkpoints, for the instant this takes): a row lock on
            # MySQL, the write lock on SQLite.
            conn.execute(ss.update().where(ss.c.id == schema.SERVING_STATE_ID).values(settlement_id=ss.c.settlement_id))
            now = time.time()
            for sid, holder, beat in conn.execute(
                select(st.c.settlement_id, st.c.owner, st.c.heartbeat_at).where(
                    st.c.status == schema.SETTLEMENT_RUNNING
                )
            ):
                if beat > now - STALE_SECONDS and not holder_is_dead(holder):
                    raise SettlementRunning(
                        f"settlement {sid} is running (by {holder}, last heard {now - beat:.0f} s ago); "
                        "wait for it to finish"
                    )
                log.warning("settlement %s (by %s) stopped without finishing; marking it failed", sid, holder)
                conn.execute(
                    st.update()
                    .where(st.c.settlement_id == sid)
                    .values(
                        status=schema.SETTLEMENT_FAILED,
                        finished_at=_now(),
                        error=f"abandoned: {holder} stopped before publishing it",
                    )
                )
            previous = conn.execute(select(ss.c.settlement_id).where(ss.c.id == schema.SERVING_STATE_ID)).scalar()
            so = schema.stream_offsets
            watermark = {
                p: seq
                for p, seq in conn.execute(
                    select(so.c.kafka_partition, so.c.checkpoint_seq).where(so.c.topic == self.topic)
                )
                if seq > 0
            }
            if previous is not None and watermark == _watermark_of(conn, previous):
                return NothingNew(previous)
            settlement_id = conn.execute(
                st.insert().values(
                    status=schema.SETTLEMENT_RUNNING,
                    owner=owner,
                    engine=engine_name,
                    started_at=_now(),
                    heartbeat_at=now,
                )
            ).inserted_primary_key[0]  # type: ignore[index]  # an INSERT's: set
            if watermark:
                conn.execute(
                    schema.settlement_watermarks.insert(),
                    [
                        {"settlement_id": settlement_id, "kafka_partition": p, "checkpoint_seq": seq}
                        for p, seq in sorted(watermark.items())
                    ],
                )
        return Claim(int(settlement_id), watermark, previous)

    def heartbeat(self, settlement_id: int) -> None:
        st = schema.settlements
        with self.engine.begin() as conn:
            conn.execute(st.update().where(st.c.settlement_id == settlement_id).values(heartbeat_at=time.time()))

    @contextmanager
    def beating(self, settlement_id: int) -> Iterator[None]:
        """Keep ``settlement_id``'s heartbeat fresh from a background thread while inside."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.heartbeat(settlement_id)
                except DBAPIError as exc:  # a restarting database: the next beat tries again
                    log.debug("settlement heartbeat failed: %s", exc)

        thread = threading.Thread(target=beat, name=f"settlement-{settlement_id}-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def store_rows(
        self, settlement_id: int, cards: Iterable[dict[str, Any]], customers: Iterable[dict[str, Any]]
    ) -> dict[str, int]:
        """Write the settlement's cards and customers (small transactions: the consumer keeps committing)."""
        return {
            schema.CARDS_UPDATED: self._insert_chunked(schema.settled_cards, settlement_id, cards),
            schema.CUSTOMERS_UPDATED: self._insert_chunked(schema.settled_customers, settlement_id, customers),
        }

    def store_texts(
        self,
        settlement_id: int,
        cards: tuple[Sequence[str], Sequence[tuple[Any, ...]]],
        customers: tuple[Sequence[str], Sequence[tuple[Any, ...]]],
    ) -> dict[str, int] | None:
        """:meth:`store_rows` for rows as an engine fetched them: (column names, row tuples) with money and dates
        as their text. On SQLite they are stored as they are, with no value made and converted back per cell: a
        NUMERIC column takes a money text as the number SQLAlchemy would bind (the nearest double, an integer when
        whole) and a date is kept as that text. None elsewhere (nothing stored): the caller types the rows and
        calls :meth:`store_rows`."""
        if self.engine.dialect.name != "sqlite":
            return None
        return {
            schema.CARDS_UPDATED: self._insert_texts(schema.settled_cards, settlement_id, *cards),
            schema.CUSTOMERS_UPDATED: self._insert_texts(schema.settled_customers, settlement_id, *customers),
        }

    def _insert_texts(
        self,
        table: Table,
        settlement_id: int,
        names: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
        chunk: int = STORE_CHUNK_ROWS,
    ) -> int:
        writer = BulkWriter(self.engine.dialect, table, ("settlement_id", *names))
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            columns: list[Sequence[Any]] = [[settlement_id] * len(part), *zip(*part, strict=True)]
            with self.engine.begin() as conn:
                writer.write_columns(conn, columns, converted=True)
        return len(rows)

    def _insert_chunked(
        self, table: Table, settlement_id: int, rows: Iterable[dict[str, Any]], chunk: int = STORE_CHUNK_ROWS
    ) -> int:
        total = 0
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            nonlocal total
            with self.engine.begin() as conn:
                total += insert_rows(conn, table, pending)
            pending.clear()

        for row in rows:
            pending.append({"settlement_id": settlement_id, **row})
            if len(pending) >= chunk:
                flush()
        if pending:
            flush()
        return total

    def publish(self, settlement_id: int, counts: Mapping[str, int]) -> None:
        """Put the settlement in force: every view and every later decision sees it from this commit on."""
        st, ss = schema.settlements, schema.serving_state
        with self.engine.begin() as conn:
            conn.execute(
                st.update()
                .where(st.c.settlement_id == settlement_id)
                .values(
                    status=schema.SETTLEMENT_PUBLISHED,
                    finished_at=_now(),
                    heartbeat_at=time.time(),
                    **{k: int(counts[k]) for k in COUNT_COLUMNS if k in counts},
                )
            )
            conn.execute(ss.update().where(ss.c.id == schema.SERVING_STATE_ID).values(settlement_id=settlement_id))

    def fail(self, settlement_id: int, error: str) -> None:
        """Record that the settlement failed (the one in force stays); its rows are removed."""
        st = schema.settlements
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    st.update()
                    .where(st.c.settlement_id == settlement_id)
                    .values(status=schema.SETTLEMENT_FAILED, finished_at=_now(), error=error[:1024])
                )
            self.prune()
        except DBAPIError as exc:
            log.warning("could not record settlement %s as failed: %s", settlement_id, exc)

    def prune(self) -> None:
        """Remove the rows of settlements no longer in force (older ones, failed ones); keep the published
        watermarks (they tell which settlement first covered a transaction)."""
        st, ss = schema.settlements, schema.serving_state
        with self.engine.connect() as conn:
            in_force = conn.execute(select(ss.c.settlement_id).where(ss.c.id == schema.SERVING_STATE_ID)).scalar()
            running = set(
                conn.execute(select(st.c.settlement_id).where(st.c.status == schema.SETTLEMENT_RUNNING)).scalars()
            )
            failed = set(
                conn.execute(select(st.c.settlement_id).where(st.c.status == schema.SETTLEMENT_FAILED)).scalars()
            )
        keep = running | ({in_force} if in_force is not None else set())
        for table in (schema.settled_cards, schema.settled_customers):
            with self.engine.begin() as conn:
                conn.execute(table.delete().where(table.c.settlement_id.not_in(keep) if keep else true()))
        if failed:
            sw = schema.settlement_watermarks
            with self.engine.begin() as conn:
                conn.execute(sw.delete().where(sw.c.settlement_id.in_(failed)))

    def in_force(self) -> dict[str, Any] | None:
        """The ``settlements`` row in force, as a dict (None before any)."""
        st, ss = schema.settlements, schema.serving_state
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(st)
                    .join(ss, ss.c.settlement_id == st.c.settlement_id)
                    .where(ss.c.id == schema.SERVING_STATE_ID)
                )
                .mappings()
                .first()
            )
            return dict(row) if row is not None else None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.settlements)).scalar() or 0)


def _watermark_of(conn: Connection, settlement_id: int) -> dict[int, int]:
    sw = schema.settlement_watermarks
    return dict(
        conn.execute(select(sw.c.kafka_partition, sw.c.checkpoint_seq).where(sw.c.settlement_id == settlement_id)).all()
    )


def _now() -> datetime:
    return datetime.now().replace(microsecond=0)
