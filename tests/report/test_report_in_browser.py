"""Acceptance: a real run's run.json and report.html, the report opened in headless chromium.

A generated dataset goes through ``cardpipe``'s run (embedded broker, SQLite, embedded batch); the facts are
checked against the result CSVs, and the page, opened from its file with no network, must render every chart
without a console message and show exactly run.json's numbers.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, func, insert, select, update

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.report import gather_facts, write_report, write_run_report
from cardpipe.report.html import lookup
from cardpipe.serving import schema
from tests.orchestration.helpers import read_csv_rows
from tests.report.browser import headless_chromium, open_report, screenshot
from tests.report.pages import shown_equals
from tests.report.synthetic import synthetic_facts

pytestmark = pytest.mark.kafka
N_TRANSACTIONS = 4_000


def _fill_log_if_empty(engine, decided: Counter[str]) -> None:
    """Checkpoint-log rows as the consumer writes them, for a consumer that does not write them yet."""
    with engine.begin() as conn:
        if conn.execute(select(func.count()).select_from(schema.stream_checkpoint_log)).scalar_one():
            return
        now = int(time.time() * 1000) - 10_000
        n = 20
        for i in range(n):
            share = {k: v // n + (v % n if i == n - 1 else 0) for k, v in decided.items()}
            conn.execute(
                insert(schema.stream_checkpoint_log).values(
                    topic="credit-card-transactions",
                    owner="test:1:0",
                    committed_ms=now + i * 450,
                    messages=sum(share.values()),
                    pending=share["pending"],
                    declined=sum(v for k, v in share.items() if k.startswith("declined:")),
                    rejected=0,
                    duplicates=0,
                    reasons=json.dumps({k: v for k, v in share.items() if k != "pending"}),
                    latency_p50_ms=4.0 + i,
                    latency_p99_ms=9.0 + 2 * i,
                    latency_max_ms=12.0 + 2 * i,
                    lag_messages=(n - 1 - i) * 200,
                    settlement_id=None,
                )
            )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report-run")
    data, results = base / "data", base / "results"
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=2026))
    settings = Settings.from_env(env={}, results_dir=results, data_dir=data)
    summary = commands.run(settings)
    engine = create_engine(settings.database_url)
    stream_rows = read_csv_rows(results / "stream_transactions.csv")
    _fill_log_if_empty(
        engine,
        Counter(r["status"] if r["status"] == "pending" else f"declined:{r['decline_reason']}" for r in stream_rows),
    )
    stages = {
        "load": summary.load.seconds,
        "stream.publish": summary.publish.seconds,
        "stream.consume": summary.consume.seconds,
        "batch": summary.batch.seconds,
        "run": summary.seconds,
    }
    write_run_report(engine, results, stages)
    yield data, results, engine
    engine.dispose()


def test_run_json_holds_the_runs_facts(run):
    data, results, _ = run
    document = json.loads((results / "run.json").read_text())
    stream_rows = read_csv_rows(results / "stream_transactions.csv")
    statuses = Counter(r["status"] for r in stream_rows)
    totals = document["totals"]
    assert totals["transactions"] == totals["decided"] == N_TRANSACTIONS and totals["undecided"] == 0
    assert (totals["pending"], totals["declined"], totals["rejected"]) == (
        statuses["pending"],
        statuses["declined"],
        statuses["rejected"],
    )
    reasons = Counter(r["decline_reason"] for r in stream_rows if r["status"] == "declined")
    assert {r["reason"]: r["count"] for r in document["stream"]["reasons"] if r["kind"] == "declined"} == reasons
    codes = {r["reason"]: r["response_code"] for r in document["stream"]["reasons"] if r["kind"] == "declined"}
    iso = {"over_credit_limit": "51", "amount_over_half_limit": "61", "location_too_far": "59"}
    assert codes and codes == {k: iso[k] for k in codes}
    approved = sum(
        Decimal(r["amount"]) for r in read_csv_rows(results / "batch_transactions.csv") if r["status"] == "approved"
    )
    rec = {r["status"]: r for r in document["reconciliation"]["statuses"]}
    assert Decimal(rec["approved"]["batch_amount"]) == approved
    assert rec["approved"]["stream_count"] == rec["approved"]["batch_count"] == statuses["pending"]

    cards = {r["card_id"]: r for r in read_csv_rows(data / "cards.csv")}
    types = {r["card_type_id"]: r["name"] for r in read_csv_rows(data / "credit_card_types.csv")}
    lowered: Counter[str] = Counter()
    for r in read_csv_rows(results / "cards_updated.csv"):
        original = cards[r["card_id"]]
        lowered[types[original["card_type_id"]]] += Decimal(r["credit_limit"]) < Decimal(original["credit_limit"])
    by_type = {t["card_type"]: t["lowered"] for t in document["limits_lowered_by_card_type"]}
    assert by_type == dict(lowered) and sum(by_type.values()) > 0

    scores = {r["customer_id"]: int(r["credit_score"]) for r in read_csv_rows(data / "customers.csv")}
    changes = Counter(
        int(r["credit_score"]) - scores[r["customer_id"]] for r in read_csv_rows(results / "customers_updated.csv")
    )
    assert {c["change"]: c["customers"] for c in document["score_changes"]} == changes
    assert sum(b["customers"] for b in document["utilization"]) == len({c["customer_id"] for c in cards.values()})

    assert [(i["name"], i["holds"], i["checked"]) for i in document["invariants"]] == [
        ("decided_equals_published", True, True),
        ("settled_balance_equals_approved", True, True),
        ("stream_batch_reconcile", True, True),
    ]
    assert document["reconciliation"]["cards"]["holding"] == len(cards)
    history = document["history"]
    assert history["checkpoints"] > 0 and history["buckets"] and history["decisions"] == N_TRANSACTIONS
    assert [s["stage"] for s in document["stages"]] == ["load", "stream.publish", "stream.consume", "batch", "run"]


def test_a_settlement_that_does_not_add_up_breaks_the_invariant(run, tmp_path):
    _, results, _ = run
    copy = tmp_path / "cardpipe.db"
    shutil.copy(results / "cardpipe.db", copy)
    engine = create_engine(f"sqlite:///{copy}")
    try:
        with engine.begin() as conn:
            sid = conn.execute(select(schema.serving_state.c.settlement_id)).scalar_one()
            card_id = conn.execute(select(func.min(schema.settled_cards.c.card_id))).scalar_one()
            conn.execute(
                update(schema.settled_cards)
                .where(schema.settled_cards.c.settlement_id == sid, schema.settled_cards.c.card_id == card_id)
                .values(current_balance=schema.settled_cards.c.current_balance + Decimal("0.01"))
            )
        facts = gather_facts(engine)
    finally:
        engine.dispose()
    published, balances, reconcile = facts.invariants()
    assert published.holds and reconcile.holds and not balances.holds
    assert facts.card_balances.mismatches == 1 and [m.card_id for m in facts.card_balances.listed] == [card_id]


def _check_page(page, document) -> None:
    assert page.console == [], page.console  # no error, no warning
    assert page.resources == []  # nothing fetched: every script and style is in the page
    assert page.height < 20_000  # laid out, not grown without end
    for chart_id, chart in page.charts.items():
        assert chart["error"] is None, (chart_id, chart["error"])
        if not chart["empty"]:
            assert chart["rendered"] and chart["marks"] > 0, (chart_id, chart)
    assert len(page.facts) > 30
    for path, text in page.facts:
        assert shown_equals(text, lookup(document, path)), (path, text, lookup(document, path))


def test_report_opens_offline_renders_every_chart_and_shows_run_json(run, tmp_path):
    _, results, _ = run
    document = json.loads((results / "run.json").read_text())
    with headless_chromium() as driver:
        page = open_report(driver, results / "report.html")
        _check_page(page, document)
        shot = screenshot(driver, tmp_path / "report.png")
    assert not any(chart["empty"] for chart in page.charts.values()) and len(page.charts) == 8
    # The limits chart draws a lowered and an unchanged bar per card type.
    assert page.charts["chart-limits-lowered"]["rects"] == 2 * len(document["limits_lowered_by_card_type"])
    assert page.charts["chart-utilization"]["rects"] == len(document["utilization"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_a_million_transaction_report_renders_too(tmp_path):
    document = synthetic_facts(1_000_000, 100_000, mismatches=30).to_json()
    path = write_report(tmp_path, document)
    with headless_chromium() as driver:
        page = open_report(driver, path)
    _check_page(page, document)
    assert all(chart["rendered"] for chart in page.charts.values())
    assert page.charts["chart-decisions-per-second"]["rects"] == 2 * len(document["history"]["buckets"])
