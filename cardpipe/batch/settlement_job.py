"""Batch layer: settle the stream results with Spark (SPEC §4) and write them out (SPEC §5).

Every rule is built as a native Spark expression from the constants of :mod:`cardpipe.domain.settlement`
(one source of truth; no Python UDFs) and computes with exact decimals, exactly as the pure-Python
reference :func:`cardpipe.domain.settlement.settle` does:

* the large transactions table is read by two passes: one aggregation (approved cents and counts per
  card, partial sums before a shuffle of a few rows per card; each input partition's id range), then the
  projection (status ``pending`` → ``approved``) each sink writes; read from a file it is parsed twice
  (cheaper than caching it), read from a database it is cached;
* cards and customers are small: the per-card sums and per-customer changes are broadcast into them, so
  no large side is ever shuffled for a join;
* utilization bounds are compared without division (``balance × 100 <= bound × limit``), new limits are
  ``bround(limit × factor, -2)`` (half to even) cast to DECIMAL(12,2).

Outputs go to one CSV file each (written in parallel as sorted part files, then concatenated after a
header and renamed atomically; sorted without a shuffle when the input partitions are already in id
order, the usual case). The job writes no database table: publishing a settlement is the caller's.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from pyspark.sql import Column, DataFrame, DataFrameReader, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DataType,
    DateType,
    DecimalType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from cardpipe.batch.outputs import (  # re-exported: the job's users import them from here
    BATCH_TRANSACTIONS,
    CARDS_UPDATED,
    CUSTOMERS_UPDATED,
    OUTPUTS,
    SettlementSummary,
    timed,
)
from cardpipe.domain.records import (
    APPROVED,
    CARD_COLUMNS,
    CUSTOMER_COLUMNS,
    DECLINED,
    PENDING,
    REJECTED,
    STREAM_COLUMNS,
)
from cardpipe.domain.settlement import (
    LIMIT_FACTOR_OTHER_NEGATIVE,
    LIMIT_FACTOR_STEPS,
    SCORE_CHANGE_ABOVE,
    SCORE_MAX,
    SCORE_MIN,
    SCORE_STEPS,
)
from cardpipe.errors import CardpipeError, DatabaseUnavailable, InputFileError, spark_error_summary
from cardpipe.serving.settlement_source import watermark_sql

log = logging.getLogger(__name__)

MONEY = DecimalType(12, 2)
#: Spark datetime patterns of the files (SPEC §1).
TIMESTAMP_PATTERN = "yyyy-MM-dd HH:mm:ss"
DATE_PATTERN = "yyyy-MM-dd"

__all__ = ["BATCH_TRANSACTIONS", "CARDS_UPDATED", "CUSTOMERS_UPDATED", "OUTPUTS", "SettlementSummary"]

#: Input tables read over JDBC.
STREAM_TABLE, CARDS_TABLE, CUSTOMERS_TABLE = "stream_transactions", "cards", "customers"
JDBC_BATCH_SIZE = 10_000
#: About the size of one stream result as a CSV line (to size a job read over JDBC from its id range).
STREAM_ROW_BYTES = 120


# --------------------------------------------------------------------------------------------- schemas


def _schema(columns: Sequence[str], types: Mapping[str, DataType], nullable: frozenset[str]) -> StructType:
    if set(columns) != set(types):
        raise AssertionError(f"schema types do not match the columns: {sorted(set(columns) ^ set(types))}")
    return StructType([StructField(c, types[c], c in nullable) for c in columns])


STREAM_SCHEMA = _schema(
    STREAM_COLUMNS,
    {
        "transaction_id": LongType(),
        "card_id": LongType(),
        "merchant_name": StringType(),
        "timestamp": TimestampType(),
        "amount": MONEY,
        "location": StringType(),
        "transaction_type": StringType(),
        "related_transaction_id": LongType(),
        "status": StringType(),
        "pending_balance": MONEY,
        "decline_reason": StringType(),
    },
    # Rejected rows may lack what the rules could not judge; CSV readers see empty fields as null.
    nullable=frozenset(STREAM_COLUMNS),
)
CARD_SCHEMA = _schema(
    CARD_COLUMNS,
    {
        "card_id": LongType(),
        "customer_id": LongType(),
        "card_type_id": LongType(),
        "card_number": StringType(),
        "expiration_date": StringType(),  # "06/27"
        "credit_limit": MONEY,
        "current_balance": MONEY,
        "issue_date": DateType(),
    },
    nullable=frozenset(CARD_COLUMNS) - {"card_id", "customer_id", "credit_limit", "current_balance"},
)
CUSTOMER_SCHEMA = _schema(
    CUSTOMER_COLUMNS,
    {
        "customer_id": LongType(),
        "name": StringType(),
        "phone_number": StringType(),
        "address": StringType(),
        "email": StringType(),
        "credit_score": IntegerType(),
        "annual_income": MONEY,
    },
    nullable=frozenset(CUSTOMER_COLUMNS) - {"customer_id", "credit_score"},
)
#: Stream-result columns an input may lack (older producers, the seed's files): read as null.
OPTIONAL_STREAM_COLUMNS = frozenset({"decline_reason"})
#: Stream-result columns read from a CSV file as text as well as typed: ``batch_transactions`` writes the
#: text back unchanged when it is already in the output format (the regex beside it), instead of
#: formatting the parsed value again (parsing and formatting 10M timestamps and amounts takes about a third
#: of writing the file). Column -> (hidden text column, canonical form as a Java regex).
# Two decimals, no leading zero, no "-0.00" (a parsed -0.00 is written 0.00), at most DECIMAL(12,2).
_CANONICAL_MONEY = r"^(-?[1-9][0-9]{0,9}|0|-0(?=\.(0[1-9]|[1-9][0-9])))\.[0-9]{2}$"
PASS_THROUGH_TEXT = {
    "timestamp": (
        "_text_timestamp",
        r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]$",
    ),
    "amount": ("_text_amount", _CANONICAL_MONEY),
    "pending_balance": ("_text_pending_balance", _CANONICAL_MONEY),
}


@dataclass(frozen=True)
class SettlementInputs:
    """The batch job's three inputs, typed as :data:`STREAM_SCHEMA`, :data:`CARD_SCHEMA`,
    :data:`CUSTOMER_SCHEMA`. ``secrets`` are strings (a database password) that must never show in an
    error message about them."""

    transactions: DataFrame
    cards: DataFrame
    customers: DataFrame
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: About how many bytes the transactions are (the file's size, or an estimate), to size the job.
    transactions_bytes: int | None = None
    #: Keep the transactions in memory between the passes over them (a database read), or read them again
    #: (a local file: parsing it twice costs less than building and collecting the cache).
    cache_transactions: bool = True


@dataclass(frozen=True)
class SettlementOutputs:
    """The settled tables, columns in :data:`STREAM_COLUMNS` / :data:`CARD_COLUMNS` /
    :data:`CUSTOMER_COLUMNS` order, same types as the inputs.

    ``transaction_stats`` (per partition of ``batch_transactions`` and card_id: approved sum, transactions
    per status, transaction_id range), ``cards_balanced`` (the cards with their new balances, old limits),
    ``changes`` (customer_id, score change, limit factor),
    ``cards_detail`` (the card columns plus ``_old_limit``) and ``customers_detail`` (plus ``_old_score``)
    are the intermediate frames the outputs are projections of: :func:`run_settlement` persists those so
    that nothing is computed twice.
    """

    batch_transactions: DataFrame
    cards_updated: DataFrame
    customers_updated: DataFrame
    transaction_stats: DataFrame | None = field(default=None, repr=False, compare=False)
    cards_balanced: DataFrame | None = field(default=None, repr=False, compare=False)
    changes: DataFrame | None = field(default=None, repr=False, compare=False)
    cards_detail: DataFrame | None = field(default=None, repr=False, compare=False)
    customers_detail: DataFrame | None = field(default=None, repr=False, compare=False)
    #: ``batch_transactions`` for its CSV file, canonical input text kept (see :func:`settle`); None: the same.
    batch_transactions_csv: DataFrame | None = field(default=None, repr=False, compare=False)

    def by_name(self) -> dict[str, DataFrame]:
        return {
            BATCH_TRANSACTIONS: self.batch_transactions,
            CARDS_UPDATED: self.cards_updated,
            CUSTOMERS_UPDATED: self.customers_updated,
        }


# --------------------------------------------------------------------------------------------- reading

_CSV_READ_OPTIONS = {
    "header": "true",
    "sep": ",",
    "quote": '"',
    "escape": '"',
    "encoding": "UTF-8",
    "timestampFormat": TIMESTAMP_PATTERN,
    "dateFormat": DATE_PATTERN,
    "nullValue": "",
    "ignoreLeadingWhiteSpace": "false",
    "ignoreTrailingWhiteSpace": "false",
}


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except FileNotFoundError:
        raise InputFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(f"{path}: cannot read the header line ({exc})") from None
    if not header:
        raise InputFileError(f"{path}: empty file (a header line is required)")
    return [name.strip() for name in header]


def _read_csv(
    spark: SparkSession,
    path: Path,
    schema: StructType,
    *,
    optional: frozenset[str] = frozenset(),
    mode: str = "FAILFAST",
) -> DataFrame:
    """Read a headed CSV by column *name* (any order, extra columns ignored) into ``schema``."""
    path = Path(path)
    header = _csv_header(path)
    wanted = {f.name: f for f in schema.fields}
    missing = [name for name in wanted if name not in header and name not in optional]
    if missing:
        raise InputFileError(f"{path}: missing column(s) {', '.join(missing)}")
    if len(set(header)) != len(header):
        raise InputFileError(f"{path}: duplicate column names in the header")
    # The file's own column order, typed where we know the column; the rest stay text and are dropped.
    file_schema = StructType([wanted.get(name, StructField(name, StringType(), True)) for name in header])
    df = (
        spark.read.options(**_CSV_READ_OPTIONS)
        .option("mode", mode)
        .option("enforceSchema", "true")  # the header was checked above; fields are matched by position
        .schema(file_schema)
        .csv(str(path.resolve()))
    )
    return df.select(
        *[F.col(f.name) if f.name in header else F.lit(None).cast(f.dataType).alias(f.name) for f in schema]
    )


def read_csv_inputs(spark: SparkSession, stream_csv: Path, cards_csv: Path, customers_csv: Path) -> SettlementInputs:
    """Read the stream results and the cards and customers CSV files (header lines, Python csv quoting).

    Columns are matched by name. Cards and customers must parse (a malformed value fails the job); a
    stream row may hold unparsable fields (a rejected transaction): those read as null. The stream file is
    parsed by each pass over it rather than cached (``cache_transactions=False``), and its size sizes the
    job.
    """
    text_schema = StructType(
        [StructField(f.name, StringType(), True) if f.name in PASS_THROUGH_TEXT else f for f in STREAM_SCHEMA.fields]
    )
    raw = _read_csv(spark, stream_csv, text_schema, optional=OPTIONAL_STREAM_COLUMNS, mode="PERMISSIVE")
    # Typed as the CSV reader would type them (null when unparsable), the text kept beside them.
    typed = {
        "timestamp": F.try_to_timestamp(F.col("timestamp"), F.lit(TIMESTAMP_PATTERN)),
        "amount": F.col("amount").try_cast(MONEY),
        "pending_balance": F.col("pending_balance").try_cast(MONEY),
    }
    transactions = raw.select(
        *[typed[c].alias(c) if c in typed else F.col(c) for c in STREAM_COLUMNS],
        *[F.col(c).alias(text) for c, (text, _) in PASS_THROUGH_TEXT.items()],
    )
    return SettlementInputs(
        transactions=transactions,
        cards=_read_csv(spark, cards_csv, CARD_SCHEMA),
        customers=_read_csv(spark, customers_csv, CUSTOMER_SCHEMA),
        transactions_bytes=Path(stream_csv).stat().st_size,
        cache_transactions=False,
    )


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _table_name(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain table name: {name!r}")
    return name


def _secrets(jdbc_options: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(str(v) for k, v in jdbc_options.items() if k.lower() == "password" and v)


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def _jdbc_errors(action: str, jdbc_options: Mapping[str, str], secrets: Sequence[str] = ()) -> Iterator[None]:
    """Turn JDBC failures into :class:`DatabaseUnavailable` with one redacted line (no password ever)."""
    all_secrets = (*_secrets(jdbc_options), *secrets)
    try:
        yield
    except CardpipeError:
        raise
    except Exception as exc:
        log.debug("%s", _redact(f"{action}: {exc!r}", all_secrets))
        where = jdbc_options.get("url", "?")
        message = _redact(f"{action} ({where}): {spark_error_summary(exc)}", all_secrets)
        # ``from None``: the Java stack trace is not chained to the error the user sees.
        raise DatabaseUnavailable(message) from None


@contextlib.contextmanager
def _redacting(secrets: Sequence[str]) -> Iterator[None]:
    """Re-raise any error whose text holds one of ``secrets`` as a one-line, redacted error."""
    try:
        yield
    except Exception as exc:
        if not any(s and s in f"{exc!s} {exc!r}" for s in secrets):
            raise
        raise CardpipeError(_redact(spark_error_summary(exc), secrets)) from None


def _conform(df: DataFrame, schema: StructType, source: str, optional: frozenset[str] = frozenset()) -> DataFrame:
    """Select ``schema``'s columns by name (case-insensitively) and cast them to its types."""
    by_lower = {c.lower(): c for c in df.columns}
    missing = [f.name for f in schema if f.name.lower() not in by_lower and f.name not in optional]
    if missing:
        raise InputFileError(f"{source}: missing column(s) {', '.join(missing)}")
    return df.select(
        *[
            (F.col(by_lower[f.name.lower()]) if f.name.lower() in by_lower else F.lit(None))
            .cast(f.dataType)
            .alias(f.name)
            for f in schema
        ]
    )


def read_jdbc_inputs(
    spark: SparkSession,
    jdbc_options: dict,
    *,
    partitions: int,
    watermark: Mapping[int, int] | None = None,
    stream_table: str = STREAM_TABLE,
    cards_table: str = CARDS_TABLE,
    customers_table: str = CUSTOMERS_TABLE,
) -> SettlementInputs:
    """Read the three inputs over JDBC; the stream results in up to ``partitions`` parallel ranges of
    ``transaction_id`` (bounds from one min/max query; none read as one partition).

    ``watermark`` (partition → last checkpoint_seq): read only the decisions at or below it (SPEC §9), a
    subquery filtered in the database; ``None`` reads the whole stream table.
    """
    stream_table, cards_table, customers_table = (_table_name(t) for t in (stream_table, cards_table, customers_table))
    secrets = _secrets(jdbc_options)
    columns = ", ".join(f"`{c}`" for c in STREAM_COLUMNS)
    where = "" if watermark is None else f" WHERE {watermark_sql(watermark, '`kafka_partition`', '`checkpoint_seq`')}"
    source = f"SELECT {columns} FROM `{stream_table}`{where}"
    with _jdbc_errors(f"cannot read table {stream_table}", jdbc_options):
        bounds = (
            spark.read.format("jdbc")
            .options(**jdbc_options)
            .option("dbtable", f"(select min(transaction_id) lo, max(transaction_id) hi from ({source}) s) t")
            .load()
            .collect()[0]
        )

        # DataFrameReader.option() mutates the reader: give every table a reader of its own.
        def reader() -> DataFrameReader:
            return spark.read.format("jdbc").options(**jdbc_options).option("fetchsize", str(JDBC_BATCH_SIZE))

        lo, hi = bounds["lo"], bounds["hi"]
        stream = reader().option("dbtable", f"({source}) settling")
        size_estimate = None
        if lo is not None and hi is not None:
            lo, hi = int(lo), int(hi)
            size_estimate = (hi - lo + 1) * STREAM_ROW_BYTES
            n = max(1, min(int(partitions), hi - lo + 1))
            if n > 1:
                stream = (
                    stream.option("partitionColumn", "transaction_id")
                    .option("lowerBound", str(lo))
                    .option("upperBound", str(hi + 1))
                    .option("numPartitions", str(n))
                )
        transactions = _conform(stream.load(), STREAM_SCHEMA, f"table {stream_table}", OPTIONAL_STREAM_COLUMNS)
    with _jdbc_errors(f"cannot read table {cards_table}", jdbc_options):
        cards = _conform(reader().option("dbtable", cards_table).load(), CARD_SCHEMA, f"table {cards_table}")
    with _jdbc_errors(f"cannot read table {customers_table}", jdbc_options):
        customers = _conform(
            reader().option("dbtable", customers_table).load(), CUSTOMER_SCHEMA, f"table {customers_table}"
        )
    return SettlementInputs(transactions, cards, customers, secrets=secrets, transactions_bytes=size_estimate)


# --------------------------------------------------------------------------------------------- rules


def _factor_type() -> DecimalType:
    """One exact decimal type holding every credit-limit factor."""
    factors = [f for _, f in LIMIT_FACTOR_STEPS] + [LIMIT_FACTOR_OTHER_NEGATIVE]
    scale = max(max(0, -int(f.as_tuple().exponent)) for f in factors)
    integer_digits = max(max(1, f.adjusted() + 1) for f in factors)
    return DecimalType(integer_digits + scale, scale)


def settled_status_expr(status: Column) -> Column:
    """Pending becomes approved; declined and rejected stay as they are."""
    return F.when(status == F.lit(PENDING), F.lit(APPROVED)).otherwise(status)


def score_change_expr(total_balance: Column, total_limit: Column) -> Column:
    """:func:`cardpipe.domain.settlement.score_change` as a CASE chain over ``SCORE_STEPS``.

    Exact, without division: ``total_balance × 100 <= bound × total_limit``; a customer whose cards
    have no limit counts as 0 % used if it owes nothing, else as over every bound.
    """
    first_change = SCORE_STEPS[0][1]
    expr = F.when(
        total_limit <= F.lit(0),
        F.when(total_balance <= F.lit(0), F.lit(first_change)).otherwise(F.lit(SCORE_CHANGE_ABOVE)),
    )
    for bound, change in SCORE_STEPS:
        expr = expr.when(total_balance * F.lit(100) <= F.lit(bound) * total_limit, F.lit(change))
    return expr.otherwise(F.lit(SCORE_CHANGE_ABOVE)).cast(IntegerType())


def new_credit_score_expr(score: Column, change: Column) -> Column:
    """Apply a change, kept within ``SCORE_MIN..SCORE_MAX``."""
    return F.greatest(F.lit(SCORE_MIN), F.least(F.lit(SCORE_MAX), score + change)).cast(IntegerType())


def limit_factor_expr(change: Column) -> Column:
    """:func:`cardpipe.domain.settlement.limit_factor`: null (limit unchanged) unless the change is
    negative."""
    factor_type = _factor_type()
    expr = F.when(change >= F.lit(0), F.lit(None).cast(factor_type))
    for bound, factor in LIMIT_FACTOR_STEPS:
        expr = expr.when(change <= F.lit(bound), F.lit(Decimal(factor)).cast(factor_type))
    return expr.otherwise(F.lit(Decimal(LIMIT_FACTOR_OTHER_NEGATIVE)).cast(factor_type))


def new_credit_limit_expr(limit: Column, factor: Column) -> Column:
    """``limit × factor`` rounded half-even to the hundred (``bround(x, -2)``), as DECIMAL(12,2)."""
    return F.when(factor.isNull(), limit).otherwise(F.bround(limit * factor, -2)).cast(MONEY)


_COUNTED_STATUSES = (APPROVED, DECLINED, REJECTED)


def _cents(money: Column) -> Column:
    """A DECIMAL(12,2) amount as whole cents (LONG), exactly (the product stays a long-backed decimal)."""
    return (money * F.lit(100).cast(DecimalType(3, 0))).cast(LongType())


def _from_cents(cents: Column) -> Column:
    """Whole cents (LONG) back to an exact decimal with two places."""
    return cents.cast(DecimalType(20, 0)) * F.lit(Decimal("0.01"))


def settle(inputs: SettlementInputs) -> SettlementOutputs:
    """Settle the stream results (SPEC §4); lazy: nothing runs until an output is written.

    Transactions read with their text (:data:`PASS_THROUGH_TEXT`, a CSV input) also get
    ``batch_transactions_csv``: the same rows with that text where it is canonical, for the CSV file.
    """
    settled = inputs.transactions.withColumn("status", settled_status_expr(F.col("status")))
    available = set(inputs.transactions.columns)

    def output_column(name: str) -> Column:
        text, canonical = PASS_THROUGH_TEXT.get(name, (None, None))
        if text is None or canonical is None or text not in available:
            return F.col(name)
        formatted = (
            F.date_format(F.col(name), TIMESTAMP_PATTERN) if name == "timestamp" else F.col(name).cast(StringType())
        )
        return F.when(F.col(text).rlike(canonical), F.col(text)).otherwise(formatted).alias(name)

    batch = settled.select(*STREAM_COLUMNS)
    with_text = any(text in available for text, _ in PASS_THROUGH_TEXT.values())
    batch_csv = settled.select(*[output_column(c) for c in STREAM_COLUMNS]) if with_text else None
    # The one aggregation over the large table, per (partition, card): approved sums and counts per status
    # (the cards' balances, the summary) and each partition's id range (see write_csv), all from the pass
    # that reads the transactions. Partial sums before the shuffle: a few rows per card and partition.
    # Sums are of whole cents in a LONG (exact; the job fails beyond ±9.2e16 dollars per card): with only
    # LONG buffers Spark aggregates in its fast hash map, a DECIMAL(22,2) sum would not.
    status, tid = F.col("status"), F.col("transaction_id")
    transaction_stats = settled.groupBy(F.spark_partition_id().alias("_partition"), "card_id").agg(
        F.sum(F.when(status == F.lit(APPROVED), _cents(F.col("amount")))).alias("_approved_cents"),
        *[F.count(F.when(status == F.lit(s), 1)).alias(f"_n_{s}") for s in _COUNTED_STATUSES],
        F.count(F.lit(1)).alias("_n_transactions"),
        F.min(tid).alias("_lo"),
        F.max(tid).alias("_hi"),
        F.count(F.when(tid.isNull(), 1)).alias("_null_ids"),
    )
    approved = (
        transaction_stats.where(F.col("_approved_cents").isNotNull())
        .groupBy("card_id")
        .agg(_from_cents(F.sum("_approved_cents")).alias("_approved"))
    )
    cards = inputs.cards.join(F.broadcast(approved), on="card_id", how="left").withColumn(
        "current_balance", (F.col("current_balance") + F.coalesce(F.col("_approved"), F.lit(0))).cast(MONEY)
    )
    # One row per customer that has cards (customers without cards keep their score).
    changes = (
        cards.groupBy("customer_id")
        .agg(F.sum("current_balance").alias("_balance"), F.sum("credit_limit").alias("_limit"))
        .select("customer_id", score_change_expr(F.col("_balance"), F.col("_limit")).alias("_change"))
        .withColumn("_factor", limit_factor_expr(F.col("_change")))
    )
    cards_detail = (
        cards.join(F.broadcast(changes.select("customer_id", "_factor")), on="customer_id", how="left")
        .withColumn("_old_limit", F.col("credit_limit"))
        .withColumn("credit_limit", new_credit_limit_expr(F.col("credit_limit"), F.col("_factor")))
        .select(*CARD_COLUMNS, "_old_limit")
    )
    customers_detail = (
        inputs.customers.join(F.broadcast(changes.select("customer_id", "_change")), on="customer_id", how="left")
        .withColumn("_old_score", F.col("credit_score"))
        .withColumn(
            "credit_score",
            F.when(F.col("_change").isNull(), F.col("credit_score")).otherwise(
                new_credit_score_expr(F.col("credit_score"), F.col("_change"))
            ),
        )
        .select(*CUSTOMER_COLUMNS, "_old_score")
    )
    return SettlementOutputs(
        batch_transactions=batch,
        batch_transactions_csv=batch_csv,
        cards_updated=cards_detail.select(*CARD_COLUMNS),
        customers_updated=customers_detail.select(*CUSTOMER_COLUMNS),
        transaction_stats=transaction_stats,
        cards_balanced=cards,
        changes=changes,
        cards_detail=cards_detail,
        customers_detail=customers_detail,
    )


# --------------------------------------------------------------------------------------------- writing

_CSV_WRITE_OPTIONS = {
    "header": "false",
    "sep": ",",
    "quote": '"',
    "escape": '"',  # a quote inside a quoted field is doubled, as Python's csv module does
    "quoteAll": "false",
    "escapeQuotes": "true",
    "nullValue": "",
    "emptyValue": "",
    "ignoreLeadingWhiteSpace": "false",  # Spark trims text by default when writing
    "ignoreTrailingWhiteSpace": "false",
    "timestampFormat": TIMESTAMP_PATTERN,
    "dateFormat": DATE_PATTERN,
    "lineSep": "\n",
    "encoding": "UTF-8",
    "compression": "none",
}
_PART_FILE = re.compile(r"^part-(\d+)")


def _ranges_in_order(ranges: Sequence[Row]) -> bool:
    """Rows (p, lo, hi, nulls) of a frame's partitions, empty ones left out: is every partition's key range
    after the ranges of the partitions before it (null keys, which sort first, answer no)?"""
    previous_hi = None
    for row in sorted(ranges, key=lambda r: r["p"]):
        if row["nulls"]:
            return False
        if previous_hi is not None and row["lo"] < previous_hi:
            return False
        previous_hi = row["hi"]
    return True


def partitions_in_key_order(df: DataFrame, key: str) -> bool:
    """True when every row of each partition of ``df`` sorts after every row of the partitions before it,
    ``key`` ascending (one job: min and max of ``key`` per partition). Sorting each partition then sorts
    the whole frame, without a shuffle.

    ``df`` must have a fixed partitioning (a scan, or a projection of a persisted frame), so that the
    frame written afterwards is split exactly as the one checked here.
    """
    k = F.col(key)
    ranges = (
        df.select(F.spark_partition_id().alias("p"), k.alias("k"))
        .groupBy("p")
        .agg(F.min("k").alias("lo"), F.max("k").alias("hi"), F.count(F.when(F.col("k").isNull(), 1)).alias("nulls"))
        .collect()
    )
    return _ranges_in_order(ranges)


def _transactions_in_id_order(transaction_stats: DataFrame) -> bool:
    """:func:`partitions_in_key_order` for ``batch_transactions`` by transaction_id, from the per-partition
    ranges :func:`settle` gathered while reading them (no other pass over the transactions)."""
    ranges = (
        transaction_stats.groupBy(F.col("_partition").alias("p"))
        .agg(F.min("_lo").alias("lo"), F.max("_hi").alias("hi"), F.sum("_null_ids").alias("nulls"))
        .collect()
    )
    return _ranges_in_order(ranges)


def write_csv(
    df: DataFrame, key: str, path: Path, columns: tuple[str, ...], *, partitions_in_order: bool | None = False
) -> bool:
    """Write ``df`` as ONE CSV file at ``path``: header ``columns``, rows sorted by ``key``.

    Spark writes header-less part files in parallel into a temporary folder beside ``path``; they are
    concatenated in partition order after the header into ``path.tmp``, which then atomically replaces
    ``path``. Money keeps two decimals, timestamps are ``yyyy-MM-dd HH:mm:ss``, dates ``yyyy-MM-dd``,
    nulls empty fields, quoting as Python's csv module.

    ``partitions_in_order``: False sorts globally (range partitioning: a sampling pass and a shuffle of
    every row); True says the partitions of ``df`` are already in key order (see
    :func:`partitions_in_key_order`), so each partition is sorted on its own, without a shuffle; None
    checks that first (``df`` must then have a fixed partitioning). Returns True when it sorted globally.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = path.with_name(f".{path.name}.parts-{uuid.uuid4().hex}")
    tmp_file = path.with_name(path.name + ".tmp")
    try:
        frame = df.select(*columns)
        order = F.col(key).asc_nulls_first()
        if partitions_in_order is None:
            partitions_in_order = partitions_in_key_order(frame, key)
        ordered = frame.sortWithinPartitions(order) if partitions_in_order else frame.orderBy(order)
        ordered.write.options(**_CSV_WRITE_OPTIONS).mode("overwrite").csv(parts_dir.as_uri())
        parts = sorted(
            (p for p in parts_dir.iterdir() if _PART_FILE.match(p.name) and not p.name.endswith(".crc")),
            key=lambda p: (int(_PART_FILE.match(p.name).group(1)), p.name),  # type: ignore[union-attr]
        )
        with tmp_file.open("w", newline="", encoding="utf-8") as out:
            csv.writer(out, lineterminator="\n").writerow(columns)
        with tmp_file.open("ab") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_file, path)
        return not partitions_in_order
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            tmp_file.unlink()


# --------------------------------------------------------------------------------------------- the job


def run_settlement(
    spark: SparkSession,
    inputs: SettlementInputs,
    results_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> SettlementSummary:
    """Settle ``inputs`` and write the three CSV files (:data:`OUTPUTS`) into ``results_dir``; no database
    table is written. ``progress`` is told each stage as it starts.

    The transactions are read by two passes: one job aggregates them per card (and finds whether they
    are in id order), then each sink writes them; everything else reads small persisted frames derived
    from that aggregation. With ``inputs.cache_transactions`` (a database) the settled transactions are
    persisted (memory, spilling to disk) so the database is read once; a file is parsed again instead.
    The large output is written without a shuffle when its partitions are already in id order (see
    :func:`write_csv`). File splits and (when automatic) shuffle partitions are sized from
    ``inputs.transactions_bytes`` (:func:`cardpipe.batch.spark.job_conf`).
    """
    from pyspark import StorageLevel

    from cardpipe.batch.spark import job_conf

    started = time.perf_counter()
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)

    steps: dict[str, float] = {}
    globally: list[str] = []
    conf = job_conf(spark, inputs.transactions_bytes)
    session_conf = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    outputs = settle(inputs)
    frames = outputs.by_name()
    if outputs.batch_transactions_csv is not None:
        csv_frames = {**frames, BATCH_TRANSACTIONS: outputs.batch_transactions_csv}
    else:
        csv_frames = frames
    # Persisted in dependency order; the outputs are projections of these, so every sink reads them.
    cached = [
        outputs.batch_transactions if inputs.cache_transactions else None,
        outputs.transaction_stats,
        outputs.cards_balanced,
        outputs.changes,
        outputs.cards_detail,
        outputs.customers_detail,
    ]
    for df in cached:
        if df is not None:
            df.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with _redacting(inputs.secrets):
            # The first job reads the transactions (filling their cache, if any) and aggregates them per card.
            assert outputs.transaction_stats is not None
            with timed(steps, "read+aggregate", progress):
                transactions_in_order = _transactions_in_id_order(outputs.transaction_stats)
            for name, (key, columns) in OUTPUTS.items():
                # Cards and customers (projections of persisted frames) are checked by write_csv.
                in_order = transactions_in_order if name == BATCH_TRANSACTIONS else None
                with timed(steps, f"csv:{name}", progress):
                    sorted_globally = write_csv(
                        csv_frames[name], key, results_dir / f"{name}.csv", columns, partitions_in_order=in_order
                    )
                if sorted_globally:
                    globally.append(name)
                    log.debug("%s: partitions not in %s order, sorted globally", name, key)
            with timed(steps, "summary", progress):
                summary = _summarize(outputs, started)
    finally:
        for df in cached:
            if df is not None:
                df.unpersist()
        for key, previous in session_conf.items():
            if previous is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, previous)
    summary = SettlementSummary(
        **{
            **summary.__dict__,
            "seconds": round(time.perf_counter() - started, 3),
            "steps": steps,
            "sorted_globally": tuple(globally),
        }
    )
    log.info("%s", summary.describe())
    log.debug("settlement steps (s): %s", steps)
    return summary


def _summarize(outputs: SettlementOutputs, started: float) -> SettlementSummary:
    """The counts of a settlement, in one Spark job over the (persisted) small frames."""
    if outputs.transaction_stats is None or outputs.cards_detail is None or outputs.customers_detail is None:
        raise ValueError("the outputs lack their detail frames (build them with settle())")
    transactions = outputs.transaction_stats.agg(
        F.coalesce(F.sum("_n_transactions"), F.lit(0)).alias("transactions"),
        *[F.coalesce(F.sum(f"_n_{s}"), F.lit(0)).alias(s) for s in _COUNTED_STATUSES],
    )
    cards = outputs.cards_detail.agg(
        F.count(F.lit(1)).alias("cards"),
        F.count(F.when(F.col("credit_limit") < F.col("_old_limit"), 1)).alias("cards_limit_lowered"),
    )
    customers = outputs.customers_detail.agg(
        F.count(F.lit(1)).alias("customers"),
        F.count(F.when(F.col("credit_score") < F.col("_old_score"), 1)).alias("customers_score_down"),
    )
    row = transactions.crossJoin(cards).crossJoin(customers).collect()[0].asDict()
    return SettlementSummary(**row, seconds=round(time.perf_counter() - started, 3))
