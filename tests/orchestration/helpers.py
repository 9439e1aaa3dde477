"""Helpers for the end-to-end tests: run the CLI as a user would, compare result folders."""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import column, create_engine, select
from sqlalchemy import table as sa_table

from cardpipe.serving import schema
from cardpipe.serving.csv_io import format_cell
from tests.reference import COMPARE_TOOL

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_TABLES = ("stream_transactions", "batch_transactions", "cards_updated", "customers_updated")


def cardpipe(
    args: Sequence[str], env: dict[str, str], *, timeout: float = 600, check: bool = True, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cardpipe ARGS`` in a subprocess."""
    return run_python(["-m", "cardpipe", *args], env, timeout=timeout, check=check, cwd=cwd)


def run_python(
    args: Sequence[str], env: dict[str, str], *, timeout: float = 600, check: bool = True, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    full_env = {**env, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def compare_results(expected: Path, actual: Path) -> str:
    """Run the shared comparison tool; returns its output, raises with it on any mismatch."""
    proc = subprocess.run(
        [sys.executable, str(COMPARE_TOOL), str(expected), str(actual)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


#: Each batch view and the table whose column types it has.
VIEW_BASES = {
    "batch_transactions": schema.stream_transactions,
    "cards_updated": schema.settled_cards,
    "customers_updated": schema.settled_customers,
}


def table_matches_csv(database_url, table_name: str, path: Path) -> None:
    """The database table (or view) holds exactly the CSV's rows (same cells as the CSV writer renders them)."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        from_csv = [tuple(row) for row in reader]
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            if table_name in schema.TABLES_BY_NAME:
                table = schema.TABLES_BY_NAME[table_name]
                query = select(*[table.c[c] for c in header]).order_by(*table.primary_key.columns)
            else:  # a view of the settlement in force, keyed by its first column
                base = VIEW_BASES[table_name]
                view = sa_table(table_name, *[column(c, base.c[c].type) for c in header])
                query = select(*view.c).order_by(view.c[header[0]])
            from_db = [tuple(format_cell(v) for v in row) for row in conn.execute(query)]
    finally:
        engine.dispose()
    assert len(from_db) == len(from_csv), f"{table_name}: {len(from_db)} rows in the table, {len(from_csv)} in CSV"
    assert from_db == from_csv, f"{table_name}: table and CSV differ"


def env_without_services(**extra: str) -> dict[str, str]:
    drop = {
        "DB_HOST",
        "DB_PORT",
        "DB_USER",
        "DB_PASSWORD",
        "DB_NAME",
        "DATABASE_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
        "CARDPIPE_RESULTS_DIR",
        "CARDPIPE_DATA_DIR",
    }
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def reference_results(data_dir: Path):  # type: ignore[no-untyped-def]
    """The pure-Python domain applied to a dataset: stream decisions by id, and the settlement.

    Returns ``(decisions, settlement)`` where ``decisions[id] = (transaction, status, pending_balance,
    decline_reason)``.
    """
    from datetime import datetime

    from cardpipe.domain.authorization import Authorizer, zip_of
    from cardpipe.domain.money import parse_money_lenient as money
    from cardpipe.domain.records import Card, CardProfile, Customer, Transaction
    from cardpipe.domain.settlement import SettledTransaction, settle

    customers = read_csv_rows(data_dir / "customers.csv")
    cards = read_csv_rows(data_dir / "cards.csv")
    transactions = read_csv_rows(data_dir / "transactions.csv")
    zips = {c["customer_id"]: zip_of(c["address"]) for c in customers}
    profiles = {
        int(c["card_id"]): CardProfile(int(c["card_id"]), money(c["credit_limit"]), zips[c["customer_id"]])
        for c in cards
    }
    authorizer = Authorizer(profiles, {int(c["card_id"]): money(c["current_balance"]) for c in cards})
    decisions = {}
    for t in sorted(transactions, key=lambda t: (t["timestamp"], int(t["transaction_id"]))):
        related = int(t["related_transaction_id"]) if t["related_transaction_id"] else None
        tx = Transaction(
            int(t["transaction_id"]),
            int(t["card_id"]),
            t["merchant_name"],
            datetime.fromisoformat(t["timestamp"]),
            money(t["amount"]),
            t["location"],
            t["transaction_type"],
            related,
        )
        decision = authorizer.authorize(tx)
        decisions[tx.transaction_id] = (tx, decision.status, decision.pending_balance, decision.reason)
    settlement = settle(
        [SettledTransaction(k, v[0].card_id, v[0].amount, v[1]) for k, v in decisions.items()],
        [
            Card(int(c["card_id"]), int(c["customer_id"]), money(c["credit_limit"]), money(c["current_balance"]))
            for c in cards
        ],
        [Customer(int(c["customer_id"]), int(c["credit_score"])) for c in customers],
    )
    return decisions, settlement


def assert_results_match_reference(results: Path, data_dir: Path) -> None:
    """The four result CSVs equal the pure-Python computation, row for row, exactly."""
    from decimal import Decimal

    decisions, settlement = reference_results(data_dir)
    stream = {
        int(r["transaction_id"]): (r["status"], Decimal(r["pending_balance"]), r["decline_reason"] or None)
        for r in read_csv_rows(results / "stream_transactions.csv")
    }
    assert stream == {k: v[1:] for k, v in decisions.items()}
    batch = {int(r["transaction_id"]): r["status"] for r in read_csv_rows(results / "batch_transactions.csv")}
    assert batch == {t.transaction_id: t.status for t in settlement.transactions}
    cards = {
        int(r["card_id"]): (Decimal(r["credit_limit"]), Decimal(r["current_balance"]))
        for r in read_csv_rows(results / "cards_updated.csv")
    }
    assert cards == {c.card_id: (c.credit_limit, c.current_balance) for c in settlement.cards}
    scores = {int(r["customer_id"]): int(r["credit_score"]) for r in read_csv_rows(results / "customers_updated.csv")}
    assert scores == {c.customer_id: c.credit_score for c in settlement.customers}


def command_lines() -> list[bytes]:
    """Every running process's command line (NUL-separated arguments)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(cmdline.read_bytes())
    return lines


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc; a thread that ends meanwhile is skipped)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def command_line(pid: int) -> bytes:
    """The command line of ``pid`` (NUL-separated arguments); empty once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_group(pid: int) -> int | None:
    """The process group of the running process ``pid``; None once it has ended or is a zombie (Linux's /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone (FileNotFoundError, ProcessLookupError)
        return None
    return None if fields[0] == "Z" else int(fields[2])
