"""The serving database's schema: one SQLAlchemy Core definition for MySQL/MariaDB and SQLite."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Select,
    String,
    Table,
    case,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import mysql

from cardpipe.domain.records import (
    APPROVED,
    CARD_COLUMNS,
    CUSTOMER_COLUMNS,
    PENDING,
    TRANSACTION_COLUMNS,
)

metadata = MetaData()


# Money: DECIMAL(12,2), read back as Decimal.
def _money(name: str, nullable: bool = False) -> Column:
    return Column(name, Numeric(12, 2, asdecimal=True), nullable=nullable)


# BIGINT ids that still autoincrement on SQLite (which only does that for INTEGER PRIMARY KEY).
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Raw message bytes: LONGBLOB on MySQL.
RawBytes = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def _customer_columns() -> list[Column]:
    return [
        Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
        Column("name", String(255), nullable=False),
        Column("phone_number", String(64), nullable=False),
        Column("address", String(512), nullable=False),
        Column("email", String(255), nullable=False),
        Column("credit_score", Integer, nullable=False),
        _money("annual_income"),
    ]


def _card_columns(foreign_keys: bool) -> list[Column]:
    customer_fk = [ForeignKey("customers.customer_id")] if foreign_keys else []
    type_fk = [ForeignKey("credit_card_types.card_type_id")] if foreign_keys else []
    return [
        Column("card_id", BigInteger, primary_key=True, autoincrement=False),
        Column("customer_id", BigInteger, *customer_fk, nullable=False, index=foreign_keys),
        Column("card_type_id", BigInteger, *type_fk, nullable=False),
        Column("card_number", String(32), nullable=False),
        Column("expiration_date", String(16), nullable=False),
        _money("credit_limit"),
        _money("current_balance"),
        Column("issue_date", Date, nullable=False),
    ]


def _transaction_columns() -> list[Column]:
    return [
        Column("transaction_id", BigInteger, primary_key=True, autoincrement=False),
        Column("card_id", BigInteger, nullable=False),
        Column("merchant_name", String(255), nullable=False),
        Column("timestamp", DateTime, nullable=False),
        _money("amount"),
        Column("location", String(512), nullable=False),
        Column("transaction_type", String(32), nullable=False),
        Column("related_transaction_id", BigInteger, nullable=True),
    ]


def _decision_columns() -> list[Column]:
    return [
        Column("status", String(16), nullable=False),
        _money("pending_balance", nullable=True),
        Column("decline_reason", String(64), nullable=True),
    ]


customers = Table("customers", metadata, *_customer_columns())

credit_card_types = Table(
    "credit_card_types",
    metadata,
    Column("card_type_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(64), nullable=False),
    Column("credit_score_min", Integer, nullable=False),
    Column("credit_score_max", Integer, nullable=False),
    _money("credit_limit_min"),
    _money("credit_limit_max"),
    _money("annual_fee"),
    Column("rewards_rate", Numeric(8, 5, asdecimal=True), nullable=False),
)

cards = Table("cards", metadata, *_card_columns(foreign_keys=True))

transactions = Table(
    "transactions",
    metadata,
    *[
        Column("card_id", BigInteger, ForeignKey("cards.card_id"), nullable=False) if c.name == "card_id" else c
        for c in _transaction_columns()
    ],
    Index("ix_transactions_timestamp_id", "timestamp", "transaction_id"),
)

# Stream results: one row per distinct transaction_id the stream decided (or rejected by id), with the
# credit limit it was judged against and where it sits in the stream: the partition it came from and the
# partition's checkpoint that committed it (a settlement's watermark is one checkpoint per partition).
stream_transactions = Table(
    "stream_transactions",
    metadata,
    *_transaction_columns(),
    *_decision_columns(),
    _money("credit_limit", nullable=True),  # NULL when rejected
    Column("kafka_partition", Integer, nullable=False),
    Column("checkpoint_seq", BigInteger, nullable=False),
    # No index on card_id: the card view reads the card's counters in card_states instead (an index here
    # costs the consumer most of its write time).
)

# Every message the rules could not judge, with its original bytes and the reason.
rejected_transactions = Table(
    "rejected_transactions",
    metadata,
    Column("rejection_id", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("kafka_partition", Integer, nullable=False),
    Column("kafka_offset", BigInteger, nullable=False),
    Column("transaction_id", BigInteger, nullable=True, index=True),
    Column("reason", String(64), nullable=False),
    Column("detail", String(1024), nullable=False),
    Column("message_key", RawBytes, nullable=True),
    Column("message_value", RawBytes, nullable=True),
    Column("recorded_at", DateTime, nullable=False),
)

# The consumer's checkpoint: next offset per partition (NULL: read the partition from its start) and how
# many checkpoints the partition has committed, written with the decisions.
stream_offsets = Table(
    "stream_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True, autoincrement=False),
    Column("next_offset", BigInteger, nullable=True),
    Column("checkpoint_seq", BigInteger, nullable=False, default=0),
)

# One live owner per partition: a consumer holds a lease, renewed with each checkpoint.
stream_leases = Table(
    "stream_leases",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(255), nullable=False),
    Column("expires_at", Double, nullable=False),  # seconds since the epoch
)

# What each committed checkpoint did, written in its transaction: the stream's history for the run report, the
# dashboard and the metrics (decisions by status and reason over time, latency, lag).
stream_checkpoint_log = Table(
    "stream_checkpoint_log",
    metadata,
    Column("checkpoint_id", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("owner", String(255), nullable=False),  # the consumer process (host:pid:n)
    Column("committed_ms", BigInteger, nullable=False, index=True),  # milliseconds since the epoch
    Column("messages", Integer, nullable=False),  # read in the batch (decided, rejected, duplicates)
    Column("pending", Integer, nullable=False),
    Column("declined", Integer, nullable=False),
    Column("rejected", Integer, nullable=False),
    Column("duplicates", Integer, nullable=False),
    Column("reasons", String(2048), nullable=False),  # JSON object: decline or rejection reason -> count
    Column("latency_p50_ms", Double, nullable=True),  # publish (broker timestamp) to commit
    Column("latency_p99_ms", Double, nullable=True),
    Column("latency_max_ms", Double, nullable=True),
    # JSON list: how many latencies fell in each bucket of stream.checkpoints.LATENCY_BUCKETS_MS (+ one over the last)
    Column("latency_buckets", String(512), nullable=True),
    Column("latency_sum_ms", Double, nullable=True),
    Column("newest_publish_ms", BigInteger, nullable=True),  # broker timestamp of the newest message decided
    Column("lag_messages", BigInteger, nullable=True),  # left on this consumer's partitions after the batch
    Column("settlement_id", BigInteger, nullable=True),  # whose limits the batch was judged with
)

# The consumer's per-card state, committed with the decisions.
card_states = Table(
    "card_states",
    metadata,
    # BigId: on SQLite the table's own key (INTEGER PRIMARY KEY), so that each checkpoint's upsert of its cards
    # finds and writes one b-tree instead of a key index and the table beside it.
    Column("card_id", BigId, primary_key=True, autoincrement=False),
    _money("pending_balance", nullable=True),  # NULL: a card the serving data does not know
    # How many of the card's decisions so far are pending (settled or not): with a settlement's count per card
    # (settled_cards.settled_count) it gives the card view's pending count without reading the decisions.
    Column("pending_count", BigInteger, nullable=False, default=0, server_default="0"),
)

# Settlements (SPEC §9): one row each; the one ``serving_state`` points at is in force.
SETTLEMENT_RUNNING, SETTLEMENT_PUBLISHED, SETTLEMENT_FAILED = "running", "published", "failed"
settlements = Table(
    "settlements",
    metadata,
    Column("settlement_id", BigId, primary_key=True, autoincrement=True),
    Column("status", String(16), nullable=False),
    Column("owner", String(255), nullable=False),  # host:pid of the batch
    Column("engine", String(16), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", Double, nullable=False),  # seconds since the epoch; a stale running one is dead
    Column("finished_at", DateTime, nullable=True),
    Column("transactions", BigInteger, nullable=True),
    Column("approved", BigInteger, nullable=True),
    Column("declined", BigInteger, nullable=True),
    Column("rejected", BigInteger, nullable=True),
    Column("cards", BigInteger, nullable=True),
    Column("customers", BigInteger, nullable=True),
    Column("cards_limit_lowered", BigInteger, nullable=True),
    Column("customers_score_down", BigInteger, nullable=True),
    Column("error", String(1024), nullable=True),
)

# A settlement's watermark: per partition, the last checkpoint it settles (decisions with a
# checkpoint_seq at or below it).
settlement_watermarks = Table(
    "settlement_watermarks",
    metadata,
    Column("settlement_id", BigInteger, primary_key=True, autoincrement=False),
    Column("kafka_partition", Integer, primary_key=True, autoincrement=False),
    Column("checkpoint_seq", BigInteger, nullable=False),
)

# The single row that says which settlement is in force (NULL: none yet). Publishing a settlement is one
# UPDATE of it; the consumer reads it under a shared lock in each checkpoint.
SERVING_STATE_ID = 1
serving_state = Table(
    "serving_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("settlement_id", BigInteger, nullable=True),
)

# Each settlement's cards and customers, keyed by settlement; the views ``cards_updated`` and
# ``customers_updated`` show the settlement in force.
settled_cards = Table(
    "settled_cards",
    metadata,
    Column("settlement_id", BigInteger, primary_key=True, autoincrement=False),
    *[
        c if c.name != "card_id" else Column("card_id", BigInteger, primary_key=True, autoincrement=False)
        for c in _card_columns(foreign_keys=False)
    ],
    # The card's pending decisions this settlement approved (those at or below its watermark).
    Column("settled_count", BigInteger, nullable=False, default=0, server_default="0"),
)
settled_customers = Table(
    "settled_customers",
    metadata,
    Column("settlement_id", BigInteger, primary_key=True, autoincrement=False),
    *_customer_columns(),
)

INPUT_TABLES = (credit_card_types, customers, cards, transactions)  # load order (foreign keys)
STREAM_STATE_TABLES = (stream_transactions, rejected_transactions, stream_offsets, card_states, stream_leases)
SETTLEMENT_TABLES = (settlements, settlement_watermarks, serving_state, settled_cards, settled_customers)
TABLES_BY_NAME = {t.name: t for t in metadata.sorted_tables}

# --------------------------------------------------------------------------------------------- views
# The batch outputs of SPEC §5, as views over the settlement in force: publishing a settlement changes
# them all at once, and the large one (every settled decision) is never copied.

#: View name -> (the table it reads, its columns): what a reader sees as the latest settlement's table.
BATCH_TRANSACTIONS, CARDS_UPDATED, CUSTOMERS_UPDATED = "batch_transactions", "cards_updated", "customers_updated"
BATCH_VIEWS = (BATCH_TRANSACTIONS, CARDS_UPDATED, CUSTOMERS_UPDATED)


def view_selects() -> dict[str, Select]:
    """The SELECT of each of :data:`BATCH_VIEWS` (compiled per dialect by :func:`create_views`)."""
    s, p, w = stream_transactions.alias("s"), serving_state.alias("p"), settlement_watermarks.alias("w")
    in_force = p.c.id == SERVING_STATE_ID
    # SPEC §4 rule 1 (domain.settlement.settled_status): pending becomes approved, the rest stay.
    status = case((s.c.status == PENDING, literal(APPROVED)), else_=s.c.status).label("status")
    batch = (
        select(*[s.c[c] for c in TRANSACTION_COLUMNS], status, s.c.pending_balance, s.c.decline_reason)
        .select_from(
            s.join(p, in_force).join(
                w, (w.c.settlement_id == p.c.settlement_id) & (w.c.kafka_partition == s.c.kafka_partition)
            )
        )
        .where(s.c.checkpoint_seq <= w.c.checkpoint_seq)
    )

    def settled(table: Table, columns: tuple[str, ...]) -> Select:
        t = table.alias("t")
        return select(*[t.c[c] for c in columns]).select_from(
            t.join(p, in_force & (t.c.settlement_id == p.c.settlement_id))
        )

    return {
        BATCH_TRANSACTIONS: batch,
        CARDS_UPDATED: settled(settled_cards, CARD_COLUMNS),
        CUSTOMERS_UPDATED: settled(settled_customers, CUSTOMER_COLUMNS),
    }


def create_views(conn: Connection) -> None:
    """(Re)create :data:`BATCH_VIEWS` and the ``serving_state`` row they read."""
    dialect = conn.dialect
    for name, query in view_selects().items():
        body = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        quoted = dialect.identifier_preparer.quote(name)
        if dialect.name == "sqlite":
            conn.execute(text(f"DROP VIEW IF EXISTS {quoted}"))
            conn.execute(text(f"CREATE VIEW {quoted} AS {body}"))
        else:
            conn.execute(text(f"CREATE OR REPLACE VIEW {quoted} AS {body}"))
    if conn.execute(select(serving_state.c.id).where(serving_state.c.id == SERVING_STATE_ID)).first() is None:
        conn.execute(serving_state.insert().values(id=SERVING_STATE_ID, settlement_id=None))


def drop_views(conn: Connection) -> None:
    """Drop :data:`BATCH_VIEWS` (and a table of the same name an older schema had)."""
    preparer = conn.dialect.identifier_preparer
    existing_views = set(inspect(conn).get_view_names())
    existing_tables = set(inspect(conn).get_table_names())
    for name in BATCH_VIEWS:
        if name in existing_views:
            conn.execute(text(f"DROP VIEW {preparer.quote(name)}"))
        elif name in existing_tables:
            conn.execute(text(f"DROP TABLE {preparer.quote(name)}"))
