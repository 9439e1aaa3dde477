"""The serving database's schema: one SQLAlchemy Core definition for MySQL/MariaDB and SQLite."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
)
from sqlalchemy.dialects import mysql

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
        Column("card_id", BigInteger, ForeignKey("cards.card_id"), nullable=False)
        if c.name == "card_id" else c
        for c in _transaction_columns()
    ],
    Index("ix_transactions_timestamp_id", "timestamp", "transaction_id"),
)

# Stream results: one row per distinct transaction_id the stream decided (or rejected by id).
stream_transactions = Table("stream_transactions", metadata, *_transaction_columns(), *_decision_columns())

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

# The consumer's checkpoint: next offset per partition, committed with the decisions.
stream_offsets = Table(
    "stream_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True, autoincrement=False),
    Column("next_offset", BigInteger, nullable=False),
)

# The consumer's per-card state, committed with the decisions.
card_states = Table(
    "card_states",
    metadata,
    Column("card_id", BigInteger, primary_key=True, autoincrement=False),
    _money("pending_balance", nullable=True),  # NULL: a card the serving data does not know
)

# Batch outputs.
batch_transactions = Table("batch_transactions", metadata, *_transaction_columns(), *_decision_columns())
cards_updated = Table("cards_updated", metadata, *_card_columns(foreign_keys=False))
customers_updated = Table("customers_updated", metadata, *_customer_columns())

INPUT_TABLES = (credit_card_types, customers, cards, transactions)  # load order (foreign keys)
STREAM_STATE_TABLES = (stream_transactions, rejected_transactions, stream_offsets, card_states)
BATCH_TABLES = (batch_transactions, cards_updated, customers_updated)
TABLES_BY_NAME = {t.name: t for t in metadata.sorted_tables}
