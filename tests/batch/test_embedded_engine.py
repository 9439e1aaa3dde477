"""The embedded batch engine (DuckDB): the seed's expected results, equality with the pure-Python settlement on
the peer datasets and 50,000 generated transactions, the watermark, the SQL rules on their boundaries, the CSV
format, and MariaDB.

The serving databases are built with the project's own code (schema, loader) plus decisions computed by the
pure :class:`~cardpipe.domain.authorization.Authorizer`; ``tests/batch/test_engine_equality.py`` uses the
helpers here too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from cardpipe.domain.authorization import Authorizer, zip_of
from cardpipe.domain.money import format_money
from cardpipe.domain.records import (
    APPROVED,
    CARD_COLUMNS,
    CUSTOMER_COLUMNS,
    DECLINED,
    PENDING,
    REJECTED,
    STREAM_COLUMNS,
    Card,
    CardProfile,
    Customer,
)
from cardpipe.domain.settlement import SettledTransaction, Settlement, settle
from tests.reference import COMPARE_TOOL, PEER_DATASETS_DIR, REFERENCE_DIR, SEED_DATASET

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_DATASETS = sorted(p for p in PEER_DATASETS_DIR.glob("*") if p.is_dir())
PEER_NAMES = ["aaru15sharma", "bhavinisai", "rahulkfernandes", "sidpatondikar", "v-atharva"]
OUTPUT_FILES = ("batch_transactions.csv", "cards_updated.csv", "customers_updated.csv")
PARTITIONS = 4
GENERATED_TRANSACTIONS = 50_000
#: Rows of stream_transactions for unknown cards (rejected, no balance, no limit), added to every database.
UNKNOWN_CARD_ROWS = 6


# ------------------------------------------------------------------------------------------ building databases


def _decide(conn: Any, partitions: int, per_checkpoint: int, unknown_cards: int) -> list[dict[str, Any]]:
    """Every transaction of the serving database decided by the pure Authorizer, in (timestamp, id) order, with
    its partition (card_id % partitions) and the partition's checkpoint (a new one every ``per_checkpoint``
    decisions of that partition), plus ``unknown_cards`` rejected rows of unknown cards."""
    from cardpipe.serving import schema

    zips = {r.customer_id: zip_of(r.address) for r in conn.execute(select(schema.customers))}
    profiles: dict[int, CardProfile] = {}
    balances: dict[int, Decimal] = {}
    for r in conn.execute(select(schema.cards)):
        profiles[r.card_id] = CardProfile(r.card_id, r.credit_limit, zips.get(r.customer_id))
        balances[r.card_id] = r.current_balance
    t = schema.transactions
    transactions = conn.execute(select(t).order_by(t.c.timestamp, t.c.transaction_id)).mappings().all()
    authorizer = Authorizer(profiles, balances)
    counts: dict[int, int] = {}
    rows: list[dict[str, Any]] = []

    def place(card_id: int) -> dict[str, int]:
        partition = card_id % partitions
        counts[partition] = counts.get(partition, 0) + 1
        return {"kafka_partition": partition, "checkpoint_seq": (counts[partition] - 1) // per_checkpoint + 1}

    for tx in transactions:
        decided = authorizer.decide(tx["card_id"], tx["amount"], tx["location"])
        assert decided is not None
        status, balance, reason = decided
        rows.append(
            {
                **tx,
                "status": status,
                "pending_balance": balance,
                "decline_reason": reason,
                "credit_limit": profiles[tx["card_id"]].credit_limit,
                **place(tx["card_id"]),
            }
        )
    last = max((r["transaction_id"] for r in rows), default=0)
    for i in range(unknown_cards):
        card_id = 9_000_000 + i
        rows.append(
            {
                "transaction_id": last + 1 + i,
                "card_id": card_id,
                "merchant_name": f"Unknown {i}",
                "timestamp": datetime(2025, 5, 1, 12, 0, i),
                "amount": Decimal("10.00") * (i + 1),
                "location": "Nowhere, NY 10001",
                "transaction_type": "purchase",
                "related_transaction_id": None,
                "status": REJECTED,
                "pending_balance": None,
                "decline_reason": "unknown_card",
                "credit_limit": None,
                **place(card_id),
            }
        )
    return rows


def build_serving(
    url: URL,
    data_dir: Path,
    *,
    partitions: int = PARTITIONS,
    per_checkpoint: int = 7,
    unknown_cards: int = UNKNOWN_CARD_ROWS,
    edit: Any = None,
) -> None:
    """A serving database at ``url``: clean schema, the four input CSVs of ``data_dir`` loaded, and the stream's
    decisions (:func:`_decide`) in ``stream_transactions``. ``edit(rows)`` may change the decision rows first."""
    from cardpipe.serving import schema
    from cardpipe.serving.csv_io import insert_rows
    from cardpipe.serving.database import create_clean_schema, make_engine
    from cardpipe.serving.loader import load_inputs

    engine = make_engine(url)
    try:
        create_clean_schema(engine)
        load_inputs(engine, data_dir)
        with engine.connect() as conn:
            rows = _decide(conn, partitions, per_checkpoint, unknown_cards)
        if edit is not None:
            edit(rows)
        with engine.begin() as conn:
            insert_rows(conn, schema.stream_transactions, rows)
    finally:
        engine.dispose()


@dataclass
class Serving:
    """What a serving database holds, read back with SQLAlchemy: the decisions (STREAM_COLUMNS plus
    kafka_partition and checkpoint_seq), the original cards and customers."""

    url: URL
    decisions: list[dict[str, Any]]
    cards: list[dict[str, Any]]
    customers: list[dict[str, Any]]

    @classmethod
    def read(cls, url: URL) -> Serving:
        from cardpipe.serving import schema
        from cardpipe.serving.database import make_engine

        engine = make_engine(url, create_database=False)
        try:
            with engine.connect() as conn:
                s = schema.stream_transactions
                decisions = (
                    conn.execute(select(*[s.c[c] for c in STREAM_COLUMNS], s.c.kafka_partition, s.c.checkpoint_seq))
                    .mappings()
                    .all()
                )
                cards = conn.execute(select(schema.cards)).mappings().all()
                customers = conn.execute(select(schema.customers)).mappings().all()
        finally:
            engine.dispose()
        return cls(url, [dict(r) for r in decisions], [dict(r) for r in cards], [dict(r) for r in customers])

    def full_watermark(self) -> dict[int, int]:
        """Every decision: each partition's last checkpoint."""
        last: dict[int, int] = {}
        for d in self.decisions:
            last[d["kafka_partition"]] = max(last.get(d["kafka_partition"], 0), d["checkpoint_seq"])
        return last

    def settling(self, watermark: Mapping[int, int]) -> list[dict[str, Any]]:
        return [
            d
            for d in self.decisions
            if d["kafka_partition"] in watermark and d["checkpoint_seq"] <= watermark[d["kafka_partition"]]
        ]

    def reference(self, watermark: Mapping[int, int]) -> Settlement:
        return settle(
            [
                SettledTransaction(d["transaction_id"], d["card_id"], d["amount"], d["status"])
                for d in self.settling(watermark)
            ],
            [Card(c["card_id"], c["customer_id"], c["credit_limit"], c["current_balance"]) for c in self.cards],
            [Customer(c["customer_id"], c["credit_score"]) for c in self.customers],
        )


def serving_database(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    data_dir: Path | None = None,
    *,
    transactions: int = 0,
    unknown_cards: int = UNKNOWN_CARD_ROWS,
) -> Serving:
    """The SQLite serving database ``name``, built once per test session (shared by the test modules): from
    ``data_dir``, or from a generated dataset of ``transactions``."""
    folder = tmp_path_factory.getbasetemp() / f"serving-{name}"
    db = folder / "cardpipe.db"
    url = URL.create("sqlite", database=str(db))
    marker = folder / "ready.json"
    if not marker.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if data_dir is None:
            from cardpipe.generate import GeneratorConfig, generate_dataset

            data_dir = folder / "input"
            generate_dataset(data_dir, GeneratorConfig(transactions=transactions, seed=20_251_203))
        build_serving(url, data_dir, unknown_cards=unknown_cards)
        marker.write_text(json.dumps({"data_dir": str(data_dir)}))
    return Serving.read(url)


# ------------------------------------------------------------------------------------------ checking outputs


def text(value: object) -> str:
    """A typed value as the result files write it."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_money(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def assert_matches_reference(out_dir: Path, serving: Serving, watermark: Mapping[int, int]) -> None:
    """The three files hold exactly the pure-Python settlement of the decisions at or below ``watermark``: the
    settling decisions (only them) with their settled status, every card and every customer, every other field
    as stored, text for text."""
    ref = serving.reference(watermark)
    decisions = {d["transaction_id"]: d for d in serving.settling(watermark)}
    status = {t.transaction_id: t.status for t in ref.transactions}

    header, rows = read_csv(out_dir / "batch_transactions.csv")
    assert tuple(header) == STREAM_COLUMNS
    assert [int(r["transaction_id"]) for r in rows] == sorted(decisions)
    for row in rows:
        tid = int(row["transaction_id"])
        assert row == {c: text(decisions[tid][c]) for c in STREAM_COLUMNS} | {"status": status[tid]}

    header, rows = read_csv(out_dir / "cards_updated.csv")
    assert tuple(header) == CARD_COLUMNS
    cards = {c.card_id: c for c in ref.cards}
    originals = {c["card_id"]: c for c in serving.cards}
    assert [int(r["card_id"]) for r in rows] == sorted(cards)
    for row in rows:
        cid = int(row["card_id"])
        assert row == {c: text(originals[cid][c]) for c in CARD_COLUMNS} | {
            "credit_limit": format_money(cards[cid].credit_limit),
            "current_balance": format_money(cards[cid].current_balance),
        }

    header, rows = read_csv(out_dir / "customers_updated.csv")
    assert tuple(header) == CUSTOMER_COLUMNS
    customers = {c.customer_id: c for c in ref.customers}
    originals = {c["customer_id"]: c for c in serving.customers}
    assert [int(r["customer_id"]) for r in rows] == sorted(customers) == sorted(originals)
    for row in rows:
        cid = int(row["customer_id"])
        assert row == {c: text(originals[cid][c]) for c in CUSTOMER_COLUMNS} | {
            "credit_score": str(customers[cid].credit_score)
        }


def assert_summary(summary: Any, serving: Serving, watermark: Mapping[int, int]) -> None:
    ref = serving.reference(watermark)
    statuses = [t.status for t in ref.transactions]
    old_limits = {c["card_id"]: c["credit_limit"] for c in serving.cards}
    old_scores = {c["customer_id"]: c["credit_score"] for c in serving.customers}
    assert (summary.transactions, summary.approved, summary.declined, summary.rejected) == (
        len(statuses),
        statuses.count(APPROVED),
        statuses.count(DECLINED),
        statuses.count(REJECTED),
    )
    assert (summary.cards, summary.customers) == (len(serving.cards), len(serving.customers))
    assert summary.cards_limit_lowered == sum(c.credit_limit < old_limits[c.card_id] for c in ref.cards)
    assert summary.customers_score_down == sum(c.credit_score < old_scores[c.customer_id] for c in ref.customers)
    assert summary.seconds > 0
    # The files are written beside the settled rows (no caller to store them here: no "stored" step).
    assert list(summary.steps) == [
        "read",
        "settle",
        "summary",
        "rows",
        "csv:batch_transactions",
        "csv:cards_updated",
        "csv:customers_updated",
    ]


def assert_only_outputs(out_dir: Path) -> None:
    """The three files and nothing else (no temporary name, no spill folder left)."""
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUT_FILES)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def seed_serving(tmp_path_factory: pytest.TempPathFactory) -> Serving:
    # Only the seed's own transactions: its expected results are compared row for row.
    return serving_database(tmp_path_factory, "seed", SEED_DATASET / "input", unknown_cards=0)


@pytest.fixture(scope="module")
def generated_serving(tmp_path_factory: pytest.TempPathFactory) -> Serving:
    return serving_database(tmp_path_factory, "generated", transactions=GENERATED_TRANSACTIONS)


# ------------------------------------------------------------------------------------------ tests


def test_reference_data_is_there() -> None:
    assert SEED_DATASET.is_dir() and COMPARE_TOOL.is_file(), f"set CARDPIPE_REFERENCE_DIR ({REFERENCE_DIR})"
    assert [p.name for p in PEER_DATASETS] == PEER_NAMES


def test_seed_dataset_reproduces_the_seeds_expected_results(seed_serving: Serving, tmp_path: Path) -> None:
    from cardpipe.batch.embedded import settle_embedded
    from cardpipe.serving import schema
    from cardpipe.serving.csv_io import export_table
    from cardpipe.serving.database import make_engine

    watermark = seed_serving.full_watermark()
    summary = settle_embedded(seed_serving.url, watermark, tmp_path / "out")
    assert_only_outputs(tmp_path / "out")
    # The compared folder also holds the decisions as the stream layer exports them (the tool checks them too).
    engine = make_engine(seed_serving.url, create_database=False)
    try:
        with engine.connect() as conn:
            export_table(conn, schema.stream_transactions, tmp_path / "out" / "stream_transactions.csv", STREAM_COLUMNS)
    finally:
        engine.dispose()
    done = subprocess.run(
        [sys.executable, str(COMPARE_TOOL), str(SEED_DATASET / "expected"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "PASS" in done.stdout, done.stdout + done.stderr
    assert "rows agree, 0 extra" in done.stdout
    assert (summary.transactions, summary.rejected, summary.cards, summary.customers) == (400, 0, 54, 30)
    _, cards = read_csv(tmp_path / "out" / "cards_updated.csv")
    assert cards[0]["credit_limit"] == "2500.00" and cards[0]["current_balance"] == "372.66"
    assert_matches_reference(tmp_path / "out", seed_serving, watermark)
    assert_summary(summary, seed_serving, watermark)


@pytest.mark.parametrize("peer", PEER_NAMES)
def test_peer_datasets_equal_the_python_reference(
    peer: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from cardpipe.batch.embedded import settle_embedded

    serving = serving_database(tmp_path_factory, f"peer-{peer}", PEER_DATASETS_DIR / peer)
    watermark = serving.full_watermark()
    summary = settle_embedded(serving.url, watermark, tmp_path)
    assert_matches_reference(tmp_path, serving, watermark)
    assert_summary(summary, serving, watermark)
    assert_only_outputs(tmp_path)


def test_generated_transactions_equal_the_python_reference(generated_serving: Serving, tmp_path: Path) -> None:
    from cardpipe.batch.embedded import settle_embedded

    serving = generated_serving
    assert len(serving.decisions) >= GENERATED_TRANSACTIONS
    watermark = serving.full_watermark()
    summary = settle_embedded(serving.url, watermark, tmp_path, threads=2)
    assert_matches_reference(tmp_path, serving, watermark)
    assert_summary(summary, serving, watermark)
    # The data exercise every rule: customers without cards, lowered limits and scores, every status.
    assert summary.approved and summary.declined and summary.rejected == UNKNOWN_CARD_ROWS
    assert summary.cards_limit_lowered and summary.customers_score_down
    assert {c["customer_id"] for c in serving.customers} - {c["customer_id"] for c in serving.cards}


def test_watermark_settles_only_decisions_at_or_below_it(generated_serving: Serving, tmp_path: Path) -> None:
    from cardpipe.batch.embedded import settle_embedded

    serving = generated_serving
    full = serving.full_watermark()
    assert sorted(full) == list(range(PARTITIONS)) and min(full.values()) > 10
    # Partition 0 half way, 1 at its first checkpoint, 2 entirely, 3 absent; 7 has no decision at all.
    watermark = {0: full[0] // 2, 1: 1, 2: full[2], 7: 5}
    settling = serving.settling(watermark)
    assert 0 < len(settling) < len(serving.decisions)
    summary = settle_embedded(serving.url, watermark, tmp_path)
    assert_matches_reference(tmp_path, serving, watermark)
    assert_summary(summary, serving, watermark)
    _, rows = read_csv(tmp_path / "batch_transactions.csv")
    placed = {d["transaction_id"]: (d["kafka_partition"], d["checkpoint_seq"]) for d in serving.decisions}
    seen = [placed[int(r["transaction_id"])] for r in rows]
    assert {p for p, _ in seen} == {0, 1, 2}
    assert max(s for p, s in seen if p == 0) == full[0] // 2 and max(s for p, s in seen if p == 1) == 1
    # Cards of the absent partition keep their balances.
    _, cards = read_csv(tmp_path / "cards_updated.csv")
    original = {c["card_id"]: c["current_balance"] for c in serving.cards}
    assert all(
        Decimal(r["current_balance"]) == original[int(r["card_id"])]
        for r in cards
        if int(r["card_id"]) % PARTITIONS == 3
    )


def test_empty_watermark_settles_nothing_and_recomputes_from_the_originals(
    seed_serving: Serving, tmp_path: Path
) -> None:
    from cardpipe.batch.embedded import settle_embedded

    summary = settle_embedded(seed_serving.url, {}, tmp_path)
    assert (summary.transactions, summary.approved, summary.cards, summary.customers) == (0, 0, 54, 30)
    assert read_csv(tmp_path / "batch_transactions.csv") == (list(STREAM_COLUMNS), [])
    assert_matches_reference(tmp_path, seed_serving, {})
    # A second settlement with the same watermark writes the same bytes (a pure function of its inputs).
    again = tmp_path / "again"
    settle_embedded(seed_serving.url, {}, again)
    assert all((again / f).read_bytes() == (tmp_path / f).read_bytes() for f in OUTPUT_FILES)


@pytest.mark.parametrize("hash_or_empty", [True, False], ids=["quoted-in-sql", "quoted-by-duckdb"])
def test_csv_text_is_quoted_as_pythons_csv_module(tmp_path: Path, hash_or_empty: bool) -> None:
    """Text with commas, quotes, line breaks, '#', leading spaces, empty strings: the file is byte for byte what
    Python's csv writer (QUOTE_MINIMAL, '\\n' line ends) writes, except that a carriage return is quoted too
    (Python leaves it bare after a '\\n' line terminator, and then cannot read the file back). Without a '#'
    or an empty text DuckDB's own writer quotes the fields: the same bytes."""
    from cardpipe.batch.embedded import settle_embedded

    texts = [
        "plain",
        "a, comma",
        'a "quote"',
        '"',
        ",",
        'both, "of" them',
        "  padded  ",
        "",
        "Zoë ✓ 東京",
        "line\nbreak",
        "#hash",
        "'single'",
        "tab\there",
        "back\\slash",
        "NULL",
        "-",
        '""',
        "\n",
    ]
    if not hash_or_empty:
        texts = [t for t in texts if t and "#" not in t]

    def edit(rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            row["merchant_name"] = texts[i % len(texts)]
            row["transaction_type"] = texts[(i * 7) % len(texts)]

    url = URL.create("sqlite", database=str(tmp_path / "db" / "cardpipe.db"))
    build_serving(url, SEED_DATASET / "input", edit=edit)
    serving = Serving.read(url)
    watermark = serving.full_watermark()
    settle_embedded(url, watermark, tmp_path / "out")
    assert_matches_reference(tmp_path / "out", serving, watermark)

    status = {t.transaction_id: t.status for t in serving.reference(watermark).transactions}
    expected = io.StringIO(newline="")
    writer = csv.writer(expected, lineterminator="\n")
    writer.writerow(STREAM_COLUMNS)
    for d in sorted(serving.decisions, key=lambda d: d["transaction_id"]):
        writer.writerow(
            [text(d[c]) for c in STREAM_COLUMNS[:-3]]
            + [status[d["transaction_id"]], text(d["pending_balance"]), text(d["decline_reason"])]
        )
    written = (tmp_path / "out" / "batch_transactions.csv").read_bytes()
    assert written == expected.getvalue().encode("utf-8")
    assert b',"a, comma",' in written and b',"a ""quote""",' in written and b',"line\nbreak",' in written
    assert (b",#hash," in written) is hash_or_empty

    # A carriage return: quoted, so that the field reads back as it was.
    def edit_cr(rows: list[dict[str, Any]]) -> None:
        rows[0]["merchant_name"], rows[1]["location"] = "carriage\rreturn", "crlf\r\nNY 10001"

    url = URL.create("sqlite", database=str(tmp_path / "db2" / "cardpipe.db"))
    build_serving(url, SEED_DATASET / "input", edit=edit_cr)
    serving = Serving.read(url)
    settle_embedded(url, serving.full_watermark(), tmp_path / "out2")
    assert_matches_reference(tmp_path / "out2", serving, serving.full_watermark())
    assert b'"carriage\rreturn"' in (tmp_path / "out2" / "batch_transactions.csv").read_bytes()


def test_duckdb_quotes_the_fields_unless_a_text_holds_a_hash_or_is_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DuckDB's own quoting writes the file when it gives Python's bytes; a text it would quote otherwise (empty, or
    holding a ``#``) fails that COPY, and the file is written again with the texts quoted in SQL."""
    import duckdb

    from cardpipe.batch.embedded import _csv_copy, _write_csv

    conn = duckdb.connect()
    conn.execute("CREATE TABLE t (card_id INTEGER, merchant_name VARCHAR, location VARCHAR)")
    conn.execute("INSERT INTO t VALUES (2, 'c', NULL), (1, 'a, b', 'x')")
    columns = ("card_id", "merchant_name", "location")
    path = tmp_path / "t.csv"
    assert "QUOTE '\"'" in _csv_copy(columns, "t", "card_id", path, native=True)
    assert "CASE WHEN" in _csv_copy(columns, "t", "card_id", path, native=False)
    with caplog.at_level(logging.DEBUG, logger="cardpipe.batch.embedded"):
        assert _write_csv(conn, columns, "t", "card_id", path) == 2
    assert path.read_bytes() == b'card_id,merchant_name,location\n1,"a, b",x\n2,c,\n'
    assert "written again" not in caplog.text
    for text in ("", "#", "no # here"):
        caplog.clear()
        conn.execute("UPDATE t SET location = ? WHERE card_id = 2", [text])
        with caplog.at_level(logging.DEBUG, logger="cardpipe.batch.embedded"):
            assert _write_csv(conn, columns, "t", "card_id", path) == 2
        assert path.read_bytes() == f'card_id,merchant_name,location\n1,"a, b",x\n2,c,{text}\n'.encode()
        assert "t.csv written again with its texts quoted in SQL" in caplog.text
    # A table without texts needs no guard: its COPY is DuckDB's.
    assert _write_csv(conn, ("card_id",), "t", "card_id", path) == 2
    assert path.read_bytes() == b"card_id\n1\n2\n"


@pytest.mark.parametrize(("min_part_rows", "threads"), [(None, 2), (70_000, 3)])
def test_decisions_stored_in_any_order_are_written_in_id_order(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    min_part_rows: int | None,
    threads: int,
) -> None:
    """The decisions are read sorted by id and ``batch_transactions.csv`` is written in table order (no ORDER BY
    of its own): ids stored shuffled, over several of DuckDB's row groups and both threads, come out ascending,
    written whole or in parts side by side (one header, the parts joined in order). The one text holding a ``#``
    has its part written again with the texts quoted in SQL, the other parts keep DuckDB's quoting."""
    import sqlite3

    from cardpipe.batch import embedded
    from cardpipe.batch.embedded import settle_embedded

    if min_part_rows is not None:
        monkeypatch.setattr(embedded, "MIN_PART_ROWS", min_part_rows)
        written_parts: list[str] = []
        real_write_csv = embedded._write_csv
        monkeypatch.setattr(
            embedded, "_write_csv", lambda *a, **k: written_parts.append(str(a[2])) or real_write_csv(*a, **k)
        )
    from cardpipe.serving.database import create_clean_schema, make_engine
    from cardpipe.serving.stream_store import DECISION_COLUMNS

    url = URL.create("sqlite", database=str(tmp_path / "cardpipe.db"))
    engine = make_engine(url)
    create_clean_schema(engine)
    engine.dispose()
    ids = list(range(1, 300_001))
    random.Random(7).shuffle(ids)
    with sqlite3.connect(tmp_path / "cardpipe.db") as db:  # foreign keys off: decisions of no known card
        db.executemany(
            f"INSERT INTO stream_transactions ({', '.join(DECISION_COLUMNS)}) VALUES ({', '.join('?' * 14)})",
            (
                (
                    tid,
                    7,
                    "#m" if tid == 1 else "m",
                    "2025-04-01 00:00:00.000000",
                    1.5,
                    "l",
                    "purchase",
                    None,
                    "pending",
                    1.5,
                    None,
                    9.0,
                    tid % 4,
                    1,
                )
                for tid in ids
            ),
        )
    with caplog.at_level(logging.DEBUG, logger="cardpipe.batch.embedded"):
        summary = settle_embedded(url, dict.fromkeys(range(4), 1), tmp_path / "out", threads=threads)
    assert summary.transactions == len(ids)
    with (tmp_path / "out" / "batch_transactions.csv").open() as handle:
        assert handle.readline().startswith("transaction_id,")
        lines = list(handle)
    written = [int(line.split(",", 1)[0]) for line in lines]  # a second header would not parse
    assert written == sorted(ids)
    assert lines[0].startswith("1,7,#m,2025-04-01 00:00:00,1.50,l,purchase,,approved,1.50,")
    assert lines[1].startswith("2,7,m,")
    assert caplog.text.count("written again with its texts quoted in SQL") == 1
    if min_part_rows is not None:  # three parts, each a rowid range of the decisions
        assert sum("rowid >=" in source for source in written_parts) == threads
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_part_is_appended_whole_with_or_without_the_kernel_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from cardpipe.batch.embedded import _append

    body = bytes(range(256)) * 5000
    real = os.copy_file_range

    def short_then_unsupported(src: int, dst: int, count: int, *offsets: int) -> int:
        if offsets[0] == 0:
            return real(src, dst, 1000, *offsets)  # a short copy, then no more
        raise OSError(errno.EXDEV, "cross-device")

    for kernel_copy in (real, short_then_unsupported, lambda *a: 0):
        monkeypatch.setattr(os, "copy_file_range", kernel_copy)
        (tmp_path / "a").write_bytes(b"head\n")
        (tmp_path / "b").write_bytes(body)
        with (tmp_path / "a").open("r+b") as target, (tmp_path / "b").open("rb") as source:
            _append(source, target)
        assert (tmp_path / "a").read_bytes() == b"head\n" + body


def test_files_are_replaced_whole_and_failures_leave_them(seed_serving: Serving, tmp_path: Path) -> None:
    from cardpipe.batch.embedded import settle_embedded
    from cardpipe.errors import DatabaseUnavailable

    for name in OUTPUT_FILES:
        (tmp_path / name).write_text("old\n")
    settle_embedded(seed_serving.url, seed_serving.full_watermark(), tmp_path)
    assert_matches_reference(tmp_path, seed_serving, seed_serving.full_watermark())
    assert_only_outputs(tmp_path)
    # A database that is not there: an error naming it, the previous files untouched, no debris.
    before = {name: (tmp_path / name).read_bytes() for name in OUTPUT_FILES}
    with pytest.raises(DatabaseUnavailable, match="no SQLite file"):
        settle_embedded(URL.create("sqlite", database=str(tmp_path / "missing.db")), {0: 1}, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in OUTPUT_FILES} == before
    assert_only_outputs(tmp_path)


def test_serving_database_is_only_read(seed_serving: Serving, tmp_path: Path) -> None:
    """Attached read-only: settling changes no byte of the database."""
    from cardpipe.batch.embedded import settle_embedded

    db = Path(seed_serving.url.database or "")
    before = db.read_bytes()
    settle_embedded(seed_serving.url, seed_serving.full_watermark(), tmp_path)
    assert db.read_bytes() == before


_APART_SCRIPT = """
import json, sys
from pathlib import Path
from cardpipe.batch.engines import run_engine
from cardpipe.config import Settings

url, out, watermark = sys.argv[1], Path(sys.argv[2]), {int(k): v for k, v in json.loads(sys.argv[3]).items()}
settings = Settings.from_env(env={"DATABASE_URL": url}, results_dir=out.parent)
handed, lines = [], []
summary = run_engine("embedded", settings, watermark, out, progress=lines.append, on_settled=handed.append)
print(json.dumps({
    "duckdb_here": "duckdb" in sys.modules,
    "handed": [len(handed[0].cards), len(handed[0].customers)] if len(handed) == 1 else None,
    "settled": summary.settled is handed[0],
    "transactions": summary.transactions,
    "lines": lines,
}))
"""


def test_on_sqlite_the_engine_runs_in_a_process_of_its_own(seed_serving: Serving, tmp_path: Path) -> None:
    """The caller's process keeps the SQLite file to Python's sqlite3: DuckDB (its own SQLite library) is never
    loaded there. The rows, the progress lines and the files are those of the engine run in place."""
    from cardpipe.batch.embedded import settle_embedded

    watermark = seed_serving.full_watermark()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _APART_SCRIPT,
            f"sqlite:///{seed_serving.url.database}",
            str(tmp_path / "apart"),
            json.dumps(watermark),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    in_place = settle_embedded(seed_serving.url, watermark, tmp_path / "in-place")
    assert in_place.settled is not None
    assert report["duckdb_here"] is False
    assert report["handed"] == [len(in_place.settled.cards), len(in_place.settled.customers)]
    assert report["settled"] is True and report["transactions"] == in_place.transactions
    assert "batch stage: read" in report["lines"]
    for name in OUTPUT_FILES:
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "in-place" / name).read_bytes()


def test_apart_the_engines_errors_and_the_callers_reach_the_caller(seed_serving: Serving, tmp_path: Path) -> None:
    import multiprocessing

    from cardpipe.batch.engines import settle_embedded_apart
    from cardpipe.errors import DatabaseUnavailable

    with pytest.raises(DatabaseUnavailable, match="no SQLite file"):
        settle_embedded_apart(URL.create("sqlite", database=str(tmp_path / "missing.db")), {0: 1}, tmp_path)

    def store_fails(_rows: object) -> None:
        time.sleep(1.0)  # the settlement's process has written its files meanwhile: they must stay unpublished
        raise RuntimeError("the store is down")

    with pytest.raises(RuntimeError, match="the store is down"):
        settle_embedded_apart(seed_serving.url, seed_serving.full_watermark(), tmp_path, on_settled=store_fails)
    assert not multiprocessing.active_children()  # the settlement's process was stopped
    assert not (tmp_path / "batch_transactions.csv").exists()
    assert not list(tmp_path.glob(".embedded-*"))  # nor its working folder left behind


def test_a_settlement_process_started_ahead_settles_once_and_ends_when_unused_or_killed(
    seed_serving: Serving, tmp_path: Path
) -> None:
    """``cardpipe batch`` starts the engine's process before its own imports: given its job later, it settles as
    the engine in place does; never given one, it ends; killed before it, the caller is told how it ended."""
    import multiprocessing
    import signal

    from cardpipe.batch.apart import SettleProcess
    from cardpipe.batch.embedded import settle_embedded
    from cardpipe.errors import CardpipeError

    watermark = seed_serving.full_watermark()
    ahead = SettleProcess()
    handed: list[Any] = []
    lines: list[str] = []
    summary = ahead.settle(
        seed_serving.url, watermark, tmp_path / "ahead", progress=lines.append, on_settled=handed.append
    )
    in_place = settle_embedded(seed_serving.url, watermark, tmp_path / "in-place")
    assert in_place.settled is not None and summary.settled is not None
    assert (summary.transactions, summary.approved, summary.cards) == (
        in_place.transactions,
        in_place.approved,
        in_place.cards,
    )
    assert handed == [summary.settled] and summary.settled.cards == in_place.settled.cards
    assert "batch stage: read" in lines
    for name in OUTPUT_FILES:
        assert (tmp_path / "ahead" / name).read_bytes() == (tmp_path / "in-place" / name).read_bytes()
    with pytest.raises(ValueError, match="settled already"):
        ahead.settle(seed_serving.url, watermark, tmp_path / "again")

    unused = SettleProcess()
    unused.stop()  # never given a job: it ends at once
    assert not multiprocessing.active_children()
    killed = SettleProcess()
    os.kill(killed.pid, signal.SIGKILL)
    with pytest.raises(CardpipeError, match=r"settlement's process was killed \(SIGKILL\)"):
        killed.settle(seed_serving.url, watermark, tmp_path / "killed")
    assert not multiprocessing.active_children()
    assert not (tmp_path / "killed").exists() or not any((tmp_path / "killed").iterdir())


def test_extension_is_loaded_from_its_wheel_and_missing_extras_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb

    from cardpipe.batch import embedded
    from cardpipe.errors import ConfigError

    path = embedded.extension_path("sqlite")
    assert path.is_file() and path.parent.name == f"v{duckdb.__version__}"
    assert path.name == "sqlite_scanner.duckdb_extension" and "duckdb_extension_sqlite_scanner" in str(path)

    real_import = embedded.importlib.import_module

    def no_mysql_scanner(name: str) -> Any:
        if name == "duckdb_extension_mysql_scanner":
            raise ImportError(name)
        return real_import(name)

    monkeypatch.setattr(embedded.importlib, "import_module", no_mysql_scanner)
    url = URL.create("mysql+pymysql", username="u", password="pw-Secret-1", host="h", database="d")
    with pytest.raises(ConfigError, match=r"pip install 'cardpipe\[mysql\]'") as failure:
        embedded.connect(url)
    assert "pw-Secret-1" not in str(failure.value)
    monkeypatch.setattr(duckdb, "__version__", "0.0.1")
    with pytest.raises(ConfigError, match="no sqlite_scanner extension for DuckDB 0.0.1"):
        embedded.extension_path("sqlite")


def test_mysql_secret_options_come_from_the_url() -> None:
    from cardpipe.batch.embedded import mysql_secret_options
    from cardpipe.errors import ConfigError

    url = URL.create(
        "mysql+pymysql",
        username="app",
        password="p'w d;x=1",
        host="db.local",
        port=3310,
        database="cards",
        query={"charset": "utf8mb4", "unix_socket": "/run/mysqld.sock"},
    )
    assert mysql_secret_options(url) == {
        "host": "db.local",
        "port": 3310,
        "user": "app",
        "database": "cards",
        "password": "p'w d;x=1",
        "socket": "/run/mysqld.sock",
    }
    assert mysql_secret_options(URL.create("mysql+pymysql", database="x")) == {
        "host": "127.0.0.1",
        "port": 3306,
        "user": "root",
        "database": "x",
    }
    with pytest.raises(ConfigError, match="names no database"):
        mysql_secret_options(URL.create("mysql+pymysql", host="h"))


# ------------------------------------------------------------------------------------------ the SQL rules


def _evaluate(expressions: list[str]) -> list[Any]:
    """Evaluate SQL expressions in DuckDB, one query: (value, type) of each."""
    import duckdb

    conn = duckdb.connect()
    try:
        fields = ", ".join(f"{e} AS v{i}, typeof({e}) AS t{i}" for i, e in enumerate(expressions))
        row = conn.execute(f"SELECT {fields}").fetchone()
    finally:
        conn.close()
    assert row is not None
    return [(row[2 * i], row[2 * i + 1]) for i in range(len(expressions))]


def _evaluate_over(columns: dict[str, str], rows: list[tuple[Any, ...]], expression: str) -> list[Any]:
    """Evaluate ``expression`` in DuckDB on each row of a table with ``columns`` (name → SQL type): (value, type)
    per row, in order."""
    import duckdb

    conn = duckdb.connect()
    try:
        conn.execute(f"CREATE TABLE cases (i INTEGER, {', '.join(f'{n} {t}' for n, t in columns.items())})")
        values = ", ".join(f"({i}, {', '.join(repr(str(v)) for v in r)})" for i, r in enumerate(rows))
        conn.execute(f"INSERT INTO cases VALUES {values}")  # text cast to the column types: exact
        return [
            tuple(r)
            for r in conn.execute(f"SELECT {expression}, typeof({expression}) FROM cases ORDER BY i").fetchall()
        ]
    finally:
        conn.close()


def test_sql_score_change_equals_the_domain_on_every_bound() -> None:
    from cardpipe.batch import rules_sql
    from cardpipe.domain.settlement import SCORE_STEPS, score_change

    cent = Decimal("0.01")
    cases: list[tuple[Decimal, Decimal]] = []
    for limit in (Decimal("10000.00"), Decimal("1234.56"), Decimal("0.01"), Decimal("999999999.99")):
        for bound, _ in SCORE_STEPS:
            exact = limit * bound / 100  # utilization exactly on the bound (a whole number of cents or not)
            for balance in {exact.quantize(cent), exact.quantize(cent) + cent, exact.quantize(cent) - cent}:
                cases.append((balance, limit))
        cases += [(Decimal(0), limit), (Decimal("-5.00"), limit), (limit, limit), (limit * 2, limit)]
    # Cards without limit (0 % used when owing nothing, over every bound otherwise) and negative totals.
    cases += [
        (Decimal(0), Decimal(0)),
        (Decimal("-0.01"), Decimal(0)),
        (Decimal("0.01"), Decimal(0)),
        (Decimal("12.34"), Decimal("-100.00")),
        (Decimal(0), Decimal("-100.00")),
    ]
    got = _evaluate_over(
        {"balance": rules_sql.MONEY_SUM, "credit": rules_sql.MONEY_SUM},
        cases,
        rules_sql.score_change("balance", "credit"),
    )
    assert [v for v, _ in got] == [score_change(b, limit) for b, limit in cases]
    assert {t for _, t in got} == {"INTEGER"}
    # The exact bounds hit each step's own change (not the next one's).
    on_bounds = [score_change(Decimal(bound * 100), Decimal(10000)) for bound, _ in SCORE_STEPS]
    assert on_bounds == [change for _, change in SCORE_STEPS]


def test_sql_score_clamp_factor_and_status_equal_the_domain() -> None:
    from cardpipe.batch import rules_sql
    from cardpipe.domain.settlement import limit_factor, new_credit_score, settled_status

    scores = [(s, c) for s in (290, 300, 301, 305, 310, 600, 835, 840, 845, 849, 850, 860) for c in (-25, -5, 5, 15)]
    got = _evaluate([rules_sql.new_credit_score(str(s), str(c)) for s, c in scores])
    assert [v for v, _ in got] == [new_credit_score(s, c) for s, c in scores]
    changes = list(range(-30, 21))
    got = _evaluate([rules_sql.limit_factor(str(c)) for c in changes])
    assert [v for v, _ in got] == [limit_factor(c) for c in changes]
    statuses = [PENDING, DECLINED, REJECTED, APPROVED]
    got = _evaluate([rules_sql.settled_status(rules_sql.sql_string(s)) for s in statuses])
    assert [v for v, _ in got] == [settled_status(s) for s in statuses] == [APPROVED, DECLINED, REJECTED, APPROVED]


def test_sql_new_limit_rounds_half_to_even_exactly_as_python() -> None:
    from cardpipe.batch import rules_sql
    from cardpipe.domain.money import round_to_hundred_half_even
    from cardpipe.domain.settlement import new_credit_limit

    # round(x, -2) on Decimals: halves to even, anything above a half up.
    halves = {
        "4250": "4200",
        "4350": "4400",
        "4250.01": "4300",
        "4249.99": "4200",
        "50": "0",
        "150": "200",
        "-250": "-200",
        "-350": "-400",
        "-250.01": "-300",
        "0": "0",
        "1049.376": "1000",
        "2550.0000": "2600",
    }
    got = _evaluate_over(
        {"x": "DECIMAL(18,4)"}, [(Decimal(x),) for x in halves], rules_sql.round_to_hundred_half_even("x")
    )
    for (x, expected), (value, kind) in zip(halves.items(), got, strict=True):
        assert value == Decimal(expected) == round(Decimal(x), -2) == round_to_hundred_half_even(Decimal(x))
        assert kind == "DECIMAL(12,2)"
    # New limits for every change, on limits whose product is a tie (0.95 x 1000 = 950, 0.90 x 2500 = 2250,
    # 0.85 x 3000 = 2550, ...) and on random limits with cents.
    rng = random.Random(7)
    limits = [Decimal(v) for v in ("1000", "2500", "3000", "3500", "4500", "1234.56", "0", "0.01", "9999999999.99")]
    limits += [Decimal(rng.randint(0, 10_000_000)) / 100 for _ in range(300)]
    cases = [(limit, change) for limit in limits for change in (-25, -15, -5, 5)]
    got = _evaluate_over(
        {"credit": rules_sql.MONEY, "change": "INTEGER"},
        cases,
        rules_sql.new_credit_limit("credit", rules_sql.limit_factor("change")),
    )
    assert [v for v, _ in got] == [new_credit_limit(limit, change) for limit, change in cases]
    assert {t for _, t in got} == {"DECIMAL(12,2)"}
    assert new_credit_limit(Decimal(1000), -5) == Decimal(1000) and new_credit_limit(Decimal(3000), -25) == 2600


def test_duckdb_round_even_is_not_used_because_it_returns_a_double() -> None:
    """Why the rounding is spelt out: DuckDB's round_even gives the right value on these ties, but as a DOUBLE."""
    from cardpipe.batch import embedded, rules_sql

    ((value, kind),) = _evaluate(["round_even(CAST('4250.00' AS DECIMAL(12,2)), -2)"])
    assert (value, kind) == (4200.0, "DOUBLE")
    sql = " ".join(embedded._settle_sql())
    assert "round_even" not in sql and "DOUBLE" not in sql.upper() and "FLOAT" not in sql.upper()
    assert "round_even" not in rules_sql.new_credit_limit("l", "f")


# ------------------------------------------------------------------------------------------ MariaDB


@pytest.mark.mysql
def test_mariadb_serving_database(mysql_database: URL, tmp_path: Path) -> None:
    """The embedded engine reads MariaDB directly (mysql_scanner): the same bytes as from SQLite, the watermark
    applied; a wrong password is a one-line error without it."""
    from cardpipe.batch.embedded import settle_embedded
    from cardpipe.errors import DatabaseUnavailable

    build_serving(mysql_database, SEED_DATASET / "input")
    serving = Serving.read(mysql_database)
    sqlite_url = URL.create("sqlite", database=str(tmp_path / "sqlite" / "cardpipe.db"))
    build_serving(sqlite_url, SEED_DATASET / "input")
    full = serving.full_watermark()
    for watermark in (full, {0: 2, 2: full[2], 3: 1}):
        mysql_out, sqlite_out = tmp_path / f"mysql-{len(watermark)}", tmp_path / f"sqlite-{len(watermark)}"
        summary = settle_embedded(mysql_database, watermark, mysql_out)
        assert_matches_reference(mysql_out, serving, watermark)
        assert_summary(summary, serving, watermark)
        settle_embedded(sqlite_url, watermark, sqlite_out)
        assert all((mysql_out / f).read_bytes() == (sqlite_out / f).read_bytes() for f in OUTPUT_FILES)

    bad = mysql_database.set(password="Wrong-pa55word-zz")
    with pytest.raises(DatabaseUnavailable) as failure:
        settle_embedded(bad, full, tmp_path / "bad")
    message = str(failure.value)
    assert "Wrong-pa55word-zz" not in message and "\n" not in message
    assert str(mysql_database.password) not in message
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_codes_the_rules_do_not_write_are_read_again_as_text(
    seed_serving: Serving, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The codes are read as ENUMs of the rules' own values; a database holding another one (another writer's)
    is read again with them as text, and settles the same as the reference."""
    import logging
    import shutil
    import sqlite3

    from cardpipe.batch.embedded import settle_embedded

    caplog.set_level(logging.DEBUG, logger="cardpipe.batch.embedded")
    settle_embedded(seed_serving.url, seed_serving.full_watermark(), tmp_path / "as-enums")
    assert "read again" not in caplog.text
    assert_matches_reference(tmp_path / "as-enums", seed_serving, seed_serving.full_watermark())

    copy = tmp_path / "other-writer.db"
    shutil.copy(seed_serving.url.database or "", copy)
    with sqlite3.connect(copy) as db:
        changed = db.execute(
            "UPDATE stream_transactions SET decline_reason = 'legacy_rule' WHERE transaction_id = "
            "(SELECT min(transaction_id) FROM stream_transactions WHERE status = 'declined')"
        ).rowcount
    assert changed == 1
    other = Serving.read(URL.create("sqlite", database=str(copy)))
    settle_embedded(other.url, other.full_watermark(), tmp_path / "as-text")
    assert "decisions read again with their codes as text" in caplog.text
    assert_matches_reference(tmp_path / "as-text", other, other.full_watermark())
    assert b",legacy_rule\n" in (tmp_path / "as-text" / "batch_transactions.csv").read_bytes()  # the last column
