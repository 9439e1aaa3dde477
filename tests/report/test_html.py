"""The report page without a browser: bounded size, nothing fetched, every fact marked, empty states."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from cardpipe.report.charts import CHARTS, NO_HISTORY, NO_SETTLEMENT
from cardpipe.report.facts import CardBalanceCheck, CheckpointRow, StreamHistory, bucket_history
from cardpipe.report.html import lookup, render_report, vendored_scripts
from cardpipe.report.write import read_run_json, write_report, write_run_json
from tests.report.pages import shown_equals
from tests.report.synthetic import synthetic_facts

FIVE_MB = 5 * 1024 * 1024
FACT = re.compile(r'<span data-fact="([^"]+)"[^>]*>([^<]*)</span>')


def specs_of(page: str) -> dict:
    text = re.search(r'<script type="application/json" id="cardpipe-specs">(.*?)</script>', page, re.S).group(1)
    return json.loads(text)


def test_page_of_a_million_transactions_stays_under_5_mb():
    facts = synthetic_facts(1_000_000, 100_000, mismatches=40)
    page = render_report(facts.to_json())
    size = len(page.encode("utf-8"))
    scripts = len(vendored_scripts().encode("utf-8"))
    assert size <= FIVE_MB, size
    # The data is bounded, not the transactions: 1,000 times fewer give a page of about the same size.
    small = len(render_report(synthetic_facts(1_000, 100).to_json()).encode("utf-8"))
    assert size - scripts < 1024 * 1024 and abs(size - small) < 512 * 1024
    assert len(specs_of(page)) == len(CHARTS)


def test_page_loads_nothing_from_anywhere():
    page = render_report(synthetic_facts(10_000, 1_000).to_json())
    outside_scripts = page.replace(vendored_scripts(), "")
    assert not re.search(r"<(script|img|iframe)[^>]*\bsrc=|<link\b|@import|url\(", outside_scripts, re.I)
    assert "http://" not in outside_scripts and "https://" not in outside_scripts
    assert "sourceMappingURL" not in page
    assert vendored_scripts().count("<script>") == 3


def test_every_fact_shows_its_run_json_value():
    document = synthetic_facts(10_000, 1_000, mismatches=3).to_json()
    page = render_report(document)
    facts = FACT.findall(page)
    paths = {path for path, _ in facts}
    for required in (
        "totals.transactions",
        "totals.decided",
        "history.decisions_per_second.mean",
        "history.latency_ms.p99",
        "history.max_lag_messages",
        "reconciliation.statuses.0.batch_amount",
        "reconciliation.cards.mismatches",
        "reconciliation.cards.listed.2.card_id",
        "invariants.1.holds",
    ):
        assert required in paths
    for path, text in facts:
        assert shown_equals(text, lookup(document, path)), (path, text)
    assert not shown_equals("1,234.6", "1234.50") and shown_equals("1,234.50", "1234.50")
    assert 'data-fact="invariants.1.holds" class="bad">no<' in page


def test_without_history_or_settlement_the_charts_say_so():
    facts = replace(
        synthetic_facts(1_000, 100),
        history=StreamHistory(),
        settlement=None,
        reconciliation=(),
        card_balances=CardBalanceCheck(),
        utilization=(),
        score_changes=(),
        limits_by_card_type=(),
        stage_seconds=(),
    )
    page = render_report(facts.to_json())
    assert specs_of(page) == {}
    assert page.count(f'<p class="empty">{NO_HISTORY}</p>') == 4
    assert page.count(f'<p class="empty">{NO_SETTLEMENT}</p>') == 4  # three charts and the reconciliation
    assert "no stage timings recorded" in page
    assert page.count('data-empty="true"') == len(CHARTS)


def test_text_from_the_database_cannot_break_out_of_the_page():
    evil = "</script><script>alert(1)</script><!--"
    row = CheckpointRow(1_790_000_000_000, "a", 1, 0, 1, 0, 0, {evil: 1}, None, None, None, None)
    facts = replace(synthetic_facts(1_000, 100), history=bucket_history([row]))
    page = render_report(facts.to_json())
    assert evil not in page and "<script>alert" not in page
    mix = specs_of(page)["chart-decision-mix"]["data"]["values"]
    assert {v["reason"] for v in mix} == {evil}


def test_files_are_written_whole(tmp_path):
    document = synthetic_facts(1_000, 100).to_json()
    json_path = write_run_json(tmp_path, document)
    html_path = write_report(tmp_path, document)
    assert read_run_json(tmp_path) == json.loads(json.dumps(document))
    assert html_path.read_text(encoding="utf-8") == render_report(document)
    assert sorted(p.name for p in tmp_path.iterdir()) == [html_path.name, json_path.name]  # no temporary left
    (tmp_path / "run.json").write_text("{broken", encoding="utf-8")
    assert read_run_json(tmp_path) is None
