"""The Spark settlement job: conformance with the seed, equality with the pure-Python reference,
the CSV writer and a JDBC round trip against MariaDB."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from cardpipe.domain.money import format_money, parse_money_lenient
from cardpipe.domain.records import (
    APPROVED,
    CARD_COLUMNS,
    CUSTOMER_COLUMNS,
    DECLINED,
    PENDING,
    REJECTED,
    STREAM_COLUMNS,
    Card,
    Customer,
)
from cardpipe.domain.settlement import SettledTransaction
from cardpipe.domain.settlement import settle as reference_settle
from tests.reference import COMPARE_TOOL, REFERENCE_DIR, SEED_DATASET

TS_FORMAT = "%Y-%m-%d %H:%M:%S"


@pytest.fixture(scope="session")
def spark():
    from cardpipe.batch.spark import build_spark_session

    session = build_spark_session("local[2]", app_name="cardpipe-tests")
    yield session
    session.stop()


# ------------------------------------------------------------------------------------------ helpers


def _text(value: object) -> str:
    """A typed value as the CSV files write it."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_money(value)
    if isinstance(value, datetime):
        return value.strftime(TS_FORMAT)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_text(row[c]) for c in columns] for row in rows)
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


@dataclass
class Dataset:
    transactions: list[dict]
    cards: list[dict]
    customers: list[dict]
    #: card_id → the credit limit the rules must give it (rounding ties and other cases checked by hand).
    expected_limits: dict[int, Decimal]
    #: customer_id → the credit score the rules must give it (bounds and clamps).
    expected_scores: dict[int, int]

    def write_inputs(self, folder: Path) -> tuple[Path, Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        return (
            _write_csv(folder / "stream_transactions.csv", STREAM_COLUMNS, self.transactions),
            _write_csv(folder / "cards.csv", CARD_COLUMNS, self.cards),
            _write_csv(folder / "customers.csv", CUSTOMER_COLUMNS, self.customers),
        )

    def reference(self):
        return reference_settle(
            [
                SettledTransaction(t["transaction_id"], t["card_id"], t["amount"], t["status"])
                for t in self.transactions
            ],
            [Card(c["card_id"], c["customer_id"], c["credit_limit"], c["current_balance"]) for c in self.cards],
            [Customer(c["customer_id"], c["credit_score"]) for c in self.customers],
        )


MERCHANTS = [
    "Barrett LLC",
    "Smith, Jones and Sons",
    'The "Best" Deli',
    "Café Zoë",
    " Padded Name ",
    "Davidson-Moreno",
    'Comma, "Quote", Both',
]
TYPES = ["purchase", "bill_payment", "atm_withdrawal", "p2p_transfer", "wire_transfer", "refund", "cancellation"]


def generate_dataset(seed: int, n_transactions: int) -> Dataset:
    """Random stream results plus hand-made customers on every rule's edge."""
    rng = random.Random(seed)
    customers: list[dict] = []
    cards: list[dict] = []
    targets: dict[int, Decimal] = {}  # card_id → the balance it must have after settlement
    expected_limits: dict[int, Decimal] = {}
    expected_scores: dict[int, int] = {}

    def customer(score: int, customer_id: int | None = None) -> int:
        cid = customer_id if customer_id is not None else len(customers) + 1
        customers.append(
            {
                "customer_id": cid,
                "name": f"Customer {cid}",
                "phone_number": f"555-{cid:04d}",
                "address": f"{cid} Main St, Springfield, NY 1{cid % 10000:04d}",
                "email": f"c{cid}@example.com",
                "credit_score": score,
                "annual_income": Decimal(rng.randint(2_000_000, 90_000_000)) / 100,
            }
        )
        return cid

    def card(
        customer_id: int, limit: Decimal, balance: Decimal | None = None, final_balance: Decimal | None = None
    ) -> int:
        card_id = len(cards) + 1
        cards.append(
            {
                "card_id": card_id,
                "customer_id": customer_id,
                "card_type_id": rng.randint(1, 5),
                "card_number": f"5{card_id:03d}-{rng.randint(0, 9999):04d}-0000-{card_id % 10000:04d}",
                "expiration_date": f"{rng.randint(1, 12):02d}/{rng.randint(26, 30)}",
                "credit_limit": Decimal(limit),
                "current_balance": balance,
                "issue_date": date(2020, 1, 1) + timedelta(days=rng.randint(0, 2000)),
            }
        )
        if final_balance is not None:
            targets[card_id] = Decimal(final_balance)
        return card_id

    # Utilization exactly on each bound (two cards, total limit 10,000) and one cent above it.
    steps = [(10, 15, 10), (20, 10, 5), (30, 5, -5), (50, -5, -15), (70, -15, -25)]
    for bound, at_change, above_change in steps:
        for extra, change in ((Decimal(0), at_change), (Decimal("0.01"), above_change)):
            cid = customer(600)
            total = Decimal(bound * 100) + extra
            first = (total * Decimal("0.37")).quantize(Decimal("0.01"))
            card(cid, Decimal(6000), final_balance=first)
            card(cid, Decimal(4000), final_balance=total - first)
            expected_scores[cid] = 600 + change
    # New limits on half-hundred ties (half to even) and around them.
    for limit, utilization, new_limit in [
        (1000, "0.40", 1000),
        (3000, "0.40", 2800),
        (3500, "0.40", 3300),
        (2700, "0.40", 2600),  # × 0.95
        (4500, "0.60", 4000),
        (3500, "0.60", 3200),
        (3100, "0.60", 2800),  # × 0.90
        (3100, "0.90", 2600),
        (1000, "0.90", 800),
        (3000, "0.90", 2600),
        ("1234.56", "0.90", 1000),  # × 0.85
        (2500, "0.25", 2500),  # positive change: unchanged
    ]:
        cid = customer(700)
        limit = Decimal(limit)
        card_id = card(cid, limit, final_balance=(limit * Decimal(utilization)).quantize(Decimal("0.01")))
        expected_limits[card_id] = Decimal(new_limit)
    # Scores at the clamps.
    clamps = [(845, "0.05", 850), (850, "0", 850), (305, "0.95", 300), (300, "1", 300)]
    for score, utilization, new_score in clamps:
        cid = customer(score)
        card(cid, Decimal(8000), final_balance=Decimal(8000) * Decimal(utilization))
        expected_scores[cid] = new_score
    # Cards without any limit: owing nothing is 0 % used, owing anything is over every bound.
    cid = customer(650)
    expected_limits[card(cid, Decimal(0), final_balance=Decimal(0))] = Decimal(0)
    expected_scores[cid] = 665
    cid = customer(650)
    expected_limits[card(cid, Decimal(0), final_balance=Decimal("12.34"))] = Decimal(0)
    expected_scores[cid] = 625
    # A customer in credit (refunds), a customer without cards, a card whose owner is unknown.
    cid = customer(500)
    card(cid, Decimal(5000), final_balance=Decimal(-200))
    expected_scores[cid] = 515
    expected_scores[customer(720)] = 720
    orphan_card = card(999_999, Decimal(2000), balance=Decimal("1900.00"))
    # Everyone else: random customers with one to three cards.
    for _ in range(400):
        cid = customer(rng.randint(300, 850))
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8:
                limit = Decimal(rng.randint(5, 500) * 100)
            else:
                limit = Decimal(rng.randint(10_000, 5_000_000)) / 100
            card(cid, limit, balance=(limit * Decimal(rng.randint(0, 90)) / 100).quantize(Decimal("0.01")))

    transactions: list[dict] = []
    card_ids = [c["card_id"] for c in cards]
    start = datetime(2025, 4, 1)
    for i in range(n_transactions):
        tid = i + 1
        roll = rng.random()
        status = PENDING if roll < 0.7 else DECLINED if roll < 0.9 else REJECTED
        card_id: int | None = rng.choice(card_ids) if rng.random() > 0.01 else 880_000 + rng.randint(0, 99)
        amount: Decimal | None = Decimal(rng.randint(-50_000, 200_000)) / 100
        if status == REJECTED and rng.random() < 0.3:
            card_id, amount = (None, amount) if rng.random() < 0.5 else (card_id, None)
        transactions.append(
            {
                "transaction_id": tid,
                "card_id": card_id,
                "merchant_name": rng.choice(MERCHANTS),
                "timestamp": start + timedelta(seconds=37 * i + rng.randint(0, 36)),
                "amount": amount,
                "location": f"{rng.randint(1, 9999)} Elm Rd, Albany, NY {rng.randint(10000, 14999)}",
                "transaction_type": rng.choice(TYPES),
                "related_transaction_id": rng.randint(1, tid) if rng.random() < 0.05 else None,
                "status": status,
                "pending_balance": None if status == REJECTED else Decimal(rng.randint(-10_000, 900_000)) / 100,
                "decline_reason": "over_credit_limit" if status == DECLINED else None,
            }
        )
    rng.shuffle(transactions)  # the job must not rely on the input order

    # Opening balances that land the hand-made cards exactly on their target after settlement.
    approved: dict[int, Decimal] = {}
    for t in transactions:
        if t["status"] == PENDING and t["card_id"] is not None:
            approved[t["card_id"]] = approved.get(t["card_id"], Decimal(0)) + t["amount"]
    for c in cards:
        if c["card_id"] in targets:
            c["current_balance"] = targets[c["card_id"]] - approved.get(c["card_id"], Decimal(0))
    assert all(c["current_balance"] is not None for c in cards)
    assert orphan_card in {c["card_id"] for c in cards}
    return Dataset(transactions, cards, customers, expected_limits, expected_scores)


def assert_outputs_match_reference(results: Path, data: Dataset) -> None:
    """Every row of the three CSV files equals the pure-Python settlement, text for text."""
    ref = data.reference()
    status_by_id = {t.transaction_id: t.status for t in ref.transactions}

    header, rows = _read_csv(results / "batch_transactions.csv")
    assert tuple(header) == STREAM_COLUMNS
    ids = [int(r["transaction_id"]) for r in rows]
    assert ids == sorted(status_by_id)
    inputs = {t["transaction_id"]: t for t in data.transactions}
    for row in rows:
        tid = int(row["transaction_id"])
        expected = {c: _text(inputs[tid][c]) for c in STREAM_COLUMNS} | {"status": status_by_id[tid]}
        assert row == expected

    header, rows = _read_csv(results / "cards_updated.csv")
    assert tuple(header) == CARD_COLUMNS
    ref_cards = {c.card_id: c for c in ref.cards}
    assert [int(r["card_id"]) for r in rows] == sorted(ref_cards)
    inputs = {c["card_id"]: c for c in data.cards}
    for row in rows:
        cid = int(row["card_id"])
        expected = {c: _text(inputs[cid][c]) for c in CARD_COLUMNS} | {
            "credit_limit": format_money(ref_cards[cid].credit_limit),
            "current_balance": format_money(ref_cards[cid].current_balance),
        }
        assert row == expected
    for card_id, limit in data.expected_limits.items():
        assert Decimal(next(r for r in rows if int(r["card_id"]) == card_id)["credit_limit"]) == limit

    header, rows = _read_csv(results / "customers_updated.csv")
    assert tuple(header) == CUSTOMER_COLUMNS
    ref_customers = {c.customer_id: c for c in ref.customers}
    assert [int(r["customer_id"]) for r in rows] == sorted(ref_customers)
    inputs = {c["customer_id"]: c for c in data.customers}
    for row in rows:
        cid = int(row["customer_id"])
        expected = {c: _text(inputs[cid][c]) for c in CUSTOMER_COLUMNS} | {
            "credit_score": str(ref_customers[cid].credit_score),
        }
        assert row == expected
    for customer_id, score in data.expected_scores.items():
        assert ref_customers[customer_id].credit_score == score


# ------------------------------------------------------------------------------------------ tests


def test_jdbc_options_from_url_hide_the_password():
    from sqlalchemy.engine import URL

    from cardpipe.batch.spark import jdbc_options_from_url

    url = URL.create(
        "mysql+pymysql",
        username="app",
        password="s3cr3t-pw",
        host="db.local",
        port=3310,
        database="cards",
        query={"charset": "utf8mb4"},
    )
    options = jdbc_options_from_url(url)
    assert options == {
        "url": "jdbc:mysql://db.local:3310/cards?permitMysqlScheme",
        "driver": "org.mariadb.jdbc.Driver",
        "user": "app",
        "password": "s3cr3t-pw",
    }
    assert "s3cr3t-pw" not in repr(options) and "s3cr3t-pw" not in str(options)
    assert "s3cr3t-pw" not in options.describe()


def test_class_data_sharing_archive_is_dumped_once_then_used(tmp_path, monkeypatch):
    import time

    from cardpipe.batch import spark as spark_module

    monkeypatch.setenv(spark_module.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("CARDPIPE_SPARK_CDS", raising=False)
    monkeypatch.delenv(spark_module.CDS_MAX_MB_ENV, raising=False)
    folder = tmp_path / "cache" / "spark" / "cds"  # in the cache folder, no longer in the temporary directory

    first = spark_module.class_data_sharing_options("-Da=1")
    dump = Path(next(o for o in first if o.startswith("-XX:ArchiveClassesAtExit=")).split("=", 1)[1])
    assert dump.parent == folder and dump.name.endswith(f".{os.getpid()}.dump")
    key = dump.name.split(".")[0]
    archive = folder / f"{key}.jsa"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)

    # A JVM still writing its dump (header not written yet): nobody else dumps meanwhile, nothing is used.
    writing = folder / f"{key}.{dead_pid}.dump"
    writing.write_bytes(b"\0" * 64)
    assert spark_module.class_data_sharing_options("-Da=1") == []
    # Abandoned long ago: dropped, and this JVM dumps instead.
    old = time.time() - 3600
    os.utime(writing, (old, old))
    assert any(o.startswith("-XX:ArchiveClassesAtExit=") for o in spark_module.class_data_sharing_options("-Da=1"))
    assert not writing.exists()
    # A finished dump of a process that has exited becomes the archive, which the next JVMs map.
    writing.write_bytes(spark_module._CDS_MAGIC + b"rest of the archive")
    options = spark_module.class_data_sharing_options("-Da=1")
    assert f"-XX:SharedArchiveFile={archive}" in options and "-Xlog:cds=off" in options
    assert archive.read_bytes().startswith(spark_module._CDS_MAGIC) and not writing.exists()
    # Another finished dump once the archive exists: dropped. Other JVM options: another archive.
    writing.write_bytes(spark_module._CDS_MAGIC)
    assert f"-XX:SharedArchiveFile={archive}" in spark_module.class_data_sharing_options("-Da=1")
    assert not writing.exists()
    assert any(o.startswith("-XX:ArchiveClassesAtExit=") for o in spark_module.class_data_sharing_options("-Da=2"))
    monkeypatch.setenv("CARDPIPE_SPARK_CDS", "0")
    assert spark_module.class_data_sharing_options("-Da=1") == []


@pytest.mark.spark
def test_conformance_with_the_seed_reference(spark, tmp_path):
    from cardpipe.batch.settlement_job import read_csv_inputs, run_settlement

    if not SEED_DATASET.is_dir() or not COMPARE_TOOL.is_file():
        pytest.fail(f"reference data not found at {REFERENCE_DIR} (set CARDPIPE_REFERENCE_DIR)")
    results = tmp_path / "results"
    results.mkdir()
    # The seed's stream results, as our stream layer writes them (exact cents, a decline_reason column).
    _, seed_rows = _read_csv(SEED_DATASET / "expected" / "stream_transactions.csv")
    stream_csv = results / "stream_transactions.csv"
    with stream_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(STREAM_COLUMNS)
        for row in seed_rows:
            row = dict(row, decline_reason="")
            for money in ("amount", "pending_balance"):
                row[money] = format_money(parse_money_lenient(row[money])) if row[money] else ""
            writer.writerow([row[c] for c in STREAM_COLUMNS])

    inputs = read_csv_inputs(
        spark, stream_csv, SEED_DATASET / "input" / "cards.csv", SEED_DATASET / "input" / "customers.csv"
    )
    summary = run_settlement(spark, inputs, results)

    done = subprocess.run(
        [sys.executable, str(COMPARE_TOOL), str(SEED_DATASET / "expected"), str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "PASS" in done.stdout, done.stdout + done.stderr
    statuses = [r["status"] for r in seed_rows]
    assert summary.transactions == len(seed_rows) == 400
    assert summary.approved == statuses.count(PENDING)
    assert summary.declined == statuses.count(DECLINED)
    assert (summary.cards, summary.customers) == (54, 30)
    _, cards = _read_csv(results / "cards_updated.csv")
    assert cards[0]["credit_limit"] == "2500.00" and cards[0]["current_balance"] == "372.66"
    assert sorted(p.name for p in results.iterdir()) == [
        "batch_transactions.csv",
        "cards_updated.csv",
        "customers_updated.csv",
        "stream_transactions.csv",
    ]


@pytest.mark.spark
def test_equals_the_python_reference_on_generated_data(spark, tmp_path):
    from cardpipe.batch.settlement_job import read_csv_inputs, run_settlement

    data = generate_dataset(seed=20_251_125, n_transactions=20_500)
    stream_csv, cards_csv, customers_csv = data.write_inputs(tmp_path / "in")
    results = tmp_path / "results"
    summary = run_settlement(spark, read_csv_inputs(spark, stream_csv, cards_csv, customers_csv), results)

    assert_outputs_match_reference(results, data)
    ref = data.reference()
    statuses = [t.status for t in ref.transactions]
    old_scores = {c["customer_id"]: c["credit_score"] for c in data.customers}
    old_limits = {c["card_id"]: c["credit_limit"] for c in data.cards}
    assert summary.transactions == len(data.transactions)
    assert (summary.approved, summary.declined, summary.rejected) == (
        statuses.count(APPROVED),
        statuses.count(DECLINED),
        statuses.count(REJECTED),
    )
    assert summary.cards == len(data.cards) and summary.customers == len(data.customers)
    assert summary.customers_score_down == sum(c.credit_score < old_scores[c.customer_id] for c in ref.customers)
    assert summary.cards_limit_lowered == sum(c.credit_limit < old_limits[c.card_id] for c in ref.cards)
    assert summary.seconds > 0
    assert sorted(p.name for p in results.iterdir()) == [
        "batch_transactions.csv",
        "cards_updated.csv",
        "customers_updated.csv",
    ]


@pytest.mark.spark
def test_settle_keeps_types_and_column_order(spark, tmp_path):
    from cardpipe.batch.settlement_job import (
        CARD_SCHEMA,
        CUSTOMER_SCHEMA,
        STREAM_SCHEMA,
        read_csv_inputs,
        settle,
    )

    data = generate_dataset(seed=7, n_transactions=50)
    out = settle(read_csv_inputs(spark, *data.write_inputs(tmp_path)))
    for df, schema in (
        (out.batch_transactions, STREAM_SCHEMA),
        (out.cards_updated, CARD_SCHEMA),
        (out.customers_updated, CUSTOMER_SCHEMA),
    ):
        assert [(f.name, f.dataType) for f in df.schema] == [(f.name, f.dataType) for f in schema]


@pytest.mark.spark
def test_batch_transactions_csv_keeps_canonical_text_and_formats_the_rest(spark, tmp_path):
    """The CSV file of batch_transactions written from the input's text (where canonical) is byte for byte
    the file written from the parsed values; non-canonical texts are formatted from their values."""
    from cardpipe.batch.settlement_job import read_csv_inputs, settle, write_csv

    data = generate_dataset(seed=13, n_transactions=3_000)
    stream_csv, cards_csv, customers_csv = data.write_inputs(tmp_path / "in")
    with stream_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    odd = {
        "amount": ["12.3", "007.50", "-0.00", "1e2", "+5.00", " 4.00", "abc"],
        "pending_balance": ["0", "-0.00", "00.10", "3.456", ""],
        "timestamp": [
            "2024-01-05T01:02:03",
            "2024-1-5 01:02:03",
            "2024-13-01 00:00:00",
            "2024-01-05 01:02:03.5",
            "not a time",
        ],
    }
    for i, row in enumerate(rows[::50]):
        for column, values in odd.items():
            row[column] = values[i % len(values)]
    with stream_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    out = settle(read_csv_inputs(spark, stream_csv, cards_csv, customers_csv))
    assert out.batch_transactions_csv is not None
    write_csv(out.batch_transactions_csv, "transaction_id", tmp_path / "text.csv", STREAM_COLUMNS)
    write_csv(out.batch_transactions, "transaction_id", tmp_path / "typed.csv", STREAM_COLUMNS)
    assert (tmp_path / "text.csv").read_bytes() == (tmp_path / "typed.csv").read_bytes()
    with (tmp_path / "text.csv").open(newline="", encoding="utf-8") as handle:
        written = {int(r["transaction_id"]): r for r in csv.DictReader(handle)}
    first = written[int(rows[0]["transaction_id"])]
    assert first["amount"] == "12.30" and first["timestamp"] == ""  # formatted from the parsed value; unparsable
    assert written[int(rows[50]["transaction_id"])]["amount"] == "7.50"


@pytest.mark.spark
def test_write_csv_empty_frame_gives_a_header_only_file(spark, tmp_path):
    from cardpipe.batch.settlement_job import STREAM_SCHEMA, write_csv

    target = tmp_path / "out" / "batch_transactions.csv"
    write_csv(spark.createDataFrame([], STREAM_SCHEMA), "transaction_id", target, STREAM_COLUMNS)
    assert target.read_text(encoding="utf-8") == ",".join(STREAM_COLUMNS) + "\n"
    assert [p.name for p in target.parent.iterdir()] == ["batch_transactions.csv"]


@pytest.mark.spark
def test_write_csv_round_trips_through_pythons_csv(spark, tmp_path):
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType, DecimalType, LongType, StringType, StructField, StructType

    from cardpipe.batch.settlement_job import write_csv

    schema = StructType(
        [
            StructField("id", LongType()),
            StructField("text", StringType()),
            StructField("money", DecimalType(12, 2)),
            StructField("ts", StringType()),
            StructField("day", DateType()),
        ]
    )
    texts = ["plain", "a, comma", 'a "quote"', '"', ",", 'both, "of" them', "  padded  ", "", None, "Zoë ✓"]
    moneys = [
        Decimal("100.00"),
        Decimal("0.00"),
        Decimal("-0.50"),
        Decimal("9999999999.99"),
        None,
        Decimal("1E+2"),
        Decimal("-95.11"),
        Decimal("0.10"),
        Decimal("12345.60"),
        Decimal("7.00"),
    ]
    start = datetime(2025, 4, 1, 1, 2, 3)
    rows = [
        (
            i * 7919 % 1000,
            texts[i % 10],
            moneys[i % 10],
            (start + timedelta(seconds=i)).strftime(TS_FORMAT),
            date(2025, 1, 1) + timedelta(days=i),
        )
        for i in range(1000)
    ]
    df = (
        spark.createDataFrame(rows, schema).withColumn("ts", F.to_timestamp("ts", "yyyy-MM-dd HH:mm:ss")).repartition(7)
    )
    target = tmp_path / "t.csv"
    target.write_text("old content\n")  # replaced atomically
    write_csv(df, "id", target, ("id", "text", "money", "ts", "day"))

    with target.open(newline="", encoding="utf-8") as handle:
        got = list(csv.reader(handle))
    assert got[0] == ["id", "text", "money", "ts", "day"]
    expected = [
        [str(r[0]), r[1] or "", format_money(r[2]), r[3], r[4].isoformat()] for r in sorted(rows, key=lambda r: r[0])
    ]
    assert got[1:] == expected
    raw = target.read_text(encoding="utf-8")
    assert '"a, comma"' in raw and '"a ""quote"""' in raw and ",  padded  ," in raw
    assert "E+" not in raw and "E-" not in raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


@pytest.mark.spark
@pytest.mark.parametrize("in_id_order", [True, False], ids=["in-id-order", "shuffled"])
def test_many_input_partitions_sorted_with_or_without_a_shuffle(spark, tmp_path, in_id_order):
    """Stream results read as many partitions: in id order, each partition is sorted on its own (no
    shuffle of the transactions); shuffled, they are sorted globally. The files equal the reference."""
    from cardpipe.batch.settlement_job import read_csv_inputs, run_settlement

    data = generate_dataset(seed=5, n_transactions=6_000)  # shuffled
    if in_id_order:
        data.transactions.sort(key=lambda t: t["transaction_id"])
    stream_csv, cards_csv, customers_csv = data.write_inputs(tmp_path / "in")
    key = "spark.sql.files.maxPartitionBytes"
    previous = spark.conf.get(key)
    spark.conf.set(key, str(64 * 1024))  # the ~1 MB stream file in many splits
    try:
        inputs = read_csv_inputs(spark, stream_csv, cards_csv, customers_csv)
        assert inputs.transactions.rdd.getNumPartitions() >= 8
        summary = run_settlement(spark, inputs, tmp_path / "results")
    finally:
        spark.conf.set(key, previous)
    assert summary.sorted_globally == (() if in_id_order else ("batch_transactions",))
    assert_outputs_match_reference(tmp_path / "results", data)


@pytest.mark.spark
def test_write_csv_sorts_globally_only_when_partitions_overlap(spark, tmp_path):
    from pyspark import StorageLevel

    from cardpipe.batch.settlement_job import partitions_in_key_order, write_csv

    def frame(chunks: list[list[int | None]]):
        rows = [(k, f"row {k}") for chunk in chunks for k in chunk]
        rdd = spark.sparkContext.parallelize(rows, len(chunks))  # one chunk per partition, in this order
        return spark.createDataFrame(rdd, "id long, v string").persist(StorageLevel.MEMORY_ONLY)

    def written(name: str) -> list[int]:
        with (tmp_path / name).open(newline="", encoding="utf-8") as handle:
            return [int(r["id"]) for r in csv.DictReader(handle)]

    # Partitions in key order, rows inside them not: each partition is sorted on its own.
    in_order = frame([list(range(49, -1, -1)), list(range(99, 49, -1)), list(range(150, 100, -1))])
    assert partitions_in_key_order(in_order, "id")
    assert write_csv(in_order, "id", tmp_path / "a.csv", ("id", "v"), partitions_in_order=None) is False
    assert written("a.csv") == sorted([*range(100), *range(101, 151)])
    # Overlapping partitions: sorted globally.
    overlapping = frame([list(range(50, 100)), list(range(0, 60, 2))])
    assert not partitions_in_key_order(overlapping, "id")
    assert write_csv(overlapping, "id", tmp_path / "b.csv", ("id", "v"), partitions_in_order=None) is True
    assert written("b.csv") == sorted([*range(50, 100), *range(0, 60, 2)])
    # A null key sorts first: not in order unless sorted globally.
    assert not partitions_in_key_order(frame([[1, 2], [None, 3]]), "id")
    for df in (in_order, overlapping):
        df.unpersist()


@pytest.mark.spark
def test_job_conf_sizes_splits_and_shuffle_partitions_from_the_input(spark):
    from cardpipe.batch.spark import FILE_PARTITION_BYTES, SHUFFLE_PARTITION_BYTES, job_conf

    cores = spark.sparkContext.defaultParallelism  # the fixture's local[2]: 2
    size = 1_300_000_000  # ~10M stream results
    conf = job_conf(spark, size)
    splits = -(-size // int(conf["spark.sql.files.maxPartitionBytes"]))
    assert splits % cores == 0 and int(conf["spark.sql.files.maxPartitionBytes"]) <= FILE_PARTITION_BYTES
    assert splits - cores < size / FILE_PARTITION_BYTES  # no more splits than needed
    assert int(conf["spark.sql.shuffle.partitions"]) == -(-size // SHUFFLE_PARTITION_BYTES)
    # Small inputs keep Spark's splits and the session's (automatic) shuffle partitions.
    assert job_conf(spark, 50_000) == {"spark.sql.shuffle.partitions": spark.conf.get("spark.sql.shuffle.partitions")}
    assert job_conf(spark, None) == {}


INPUT_DDL = {
    "stream_transactions": """
        CREATE TABLE {name} (
            transaction_id BIGINT NOT NULL PRIMARY KEY, card_id BIGINT NULL,
            merchant_name VARCHAR(255) NOT NULL, `timestamp` DATETIME NOT NULL, amount DECIMAL(12,2) NULL,
            location VARCHAR(512) NOT NULL, transaction_type VARCHAR(32) NOT NULL,
            related_transaction_id BIGINT NULL, status VARCHAR(16) NOT NULL,
            pending_balance DECIMAL(12,2) NULL, decline_reason VARCHAR(64) NULL)""",
    "cards": """
        CREATE TABLE {name} (
            card_id BIGINT NOT NULL PRIMARY KEY, customer_id BIGINT NOT NULL, card_type_id BIGINT NOT NULL,
            card_number VARCHAR(32) NOT NULL, expiration_date VARCHAR(16) NOT NULL,
            credit_limit DECIMAL(12,2) NOT NULL, current_balance DECIMAL(12,2) NOT NULL,
            issue_date DATE NOT NULL)""",
    "customers": """
        CREATE TABLE {name} (
            customer_id BIGINT NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL,
            phone_number VARCHAR(64) NOT NULL, address VARCHAR(512) NOT NULL, email VARCHAR(255) NOT NULL,
            credit_score INT NOT NULL, annual_income DECIMAL(12,2) NOT NULL)""",
}


@pytest.mark.mysql
@pytest.mark.spark
def test_jdbc_round_trip(spark, tmp_path, mysql_database):
    """Inputs read over JDBC (in id ranges), outputs written as CSV files only: the job creates no table."""
    from sqlalchemy import create_engine, inspect, text

    from cardpipe.batch.settlement_job import read_jdbc_inputs, run_settlement, settle
    from cardpipe.batch.spark import jdbc_options_from_url
    from cardpipe.errors import DatabaseUnavailable

    url = mysql_database  # a fresh database on the private MariaDB (tests/conftest.py)
    engine = create_engine(url)
    try:
        data = generate_dataset(seed=99, n_transactions=600)
        with engine.begin() as conn:
            for table, ddl in INPUT_DDL.items():
                conn.exec_driver_sql(ddl.format(name=table))
            for table, columns, rows in (
                ("stream_transactions", STREAM_COLUMNS, data.transactions),
                ("cards", CARD_COLUMNS, data.cards),
                ("customers", CUSTOMER_COLUMNS, data.customers),
            ):
                conn.execute(
                    text(
                        f"INSERT INTO {table} ({', '.join(f'`{c}`' for c in columns)}) "
                        f"VALUES ({', '.join(':' + c for c in columns)})"
                    ),
                    [{c: r[c] for c in columns} for r in rows],
                )

        options = jdbc_options_from_url(url)
        inputs = read_jdbc_inputs(spark, options, partitions=3)
        assert inputs.transactions.rdd.getNumPartitions() == 3
        assert inputs.cache_transactions  # a database is read once
        summary = run_settlement(spark, inputs, tmp_path / "results")
        assert summary.transactions == len(data.transactions)
        assert summary.sorted_globally == ()  # read in ranges of transaction_id
        assert_outputs_match_reference(tmp_path / "results", data)
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
            "batch_transactions.csv",
            "cards_updated.csv",
            "customers_updated.csv",
        ]
        assert sorted(inspect(engine).get_table_names()) == sorted(INPUT_DDL)

        # An empty stream table is read (one partition) and settles to unchanged balances.
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM stream_transactions")
        empty = read_jdbc_inputs(spark, options, partitions=3)
        out = settle(empty)
        assert out.batch_transactions.count() == 0
        balances = {r["card_id"]: r["current_balance"] for r in out.cards_updated.collect()}
        assert balances == {c["card_id"]: c["current_balance"] for c in data.cards}

        # A wrong password: a one-line error that never shows the password.
        bad = jdbc_options_from_url(url.set(password="wrong-Pa55word-xyz"))
        with pytest.raises(DatabaseUnavailable) as failure:
            read_jdbc_inputs(spark, bad, partitions=2)
        assert "wrong-Pa55word-xyz" not in str(failure.value) and "\n" not in str(failure.value)
        assert (mysql_database.password or "\0") not in str(failure.value)
    finally:
        engine.dispose()
