"""Progress display (bars on a terminal, plain lines elsewhere, silence when quiet) and the run summary table."""

import io
import logging
from decimal import Decimal

import pytest
from rich.console import Console

from cardpipe.progress import Reporter, stage_of, summary_rows, summary_table


def _rows(document):
    return {row[0]: row for section in summary_rows(document) for row in section}


@pytest.mark.kafka
def test_the_run_summary_shows_the_numbers_of_run_json(tmp_path):
    from cardpipe.config import Settings
    from cardpipe.orchestration import commands
    from cardpipe.report.write import read_run_json

    summary = commands.run(Settings.from_env(env={}, results_dir=tmp_path / "results"))
    document = read_run_json(tmp_path / "results")
    assert document is not None and summary.report == document
    rows = _rows(document)
    counts = summary.consume.counts
    assert rows["transactions"][1] == f"{summary.load.rows['transactions']:,}"
    assert rows["decided"][1] == f"{summary.consume.messages:,}"
    assert rows["approved (pending)"][1] == f"{counts['pending']:,}"
    assert rows["declined"][1] == f"{counts['declined']:,}"
    reasons = {r["reason"]: r["count"] for r in document["stream"]["reasons"]}
    assert reasons and all(rows[f"  {reason}"][1] == f"{n:,}" for reason, n in reasons.items())
    pending = next(s for s in document["stream"]["by_status"] if s["status"] == "pending")
    assert rows["approved amount"][2] == f"{Decimal(pending['amount']):,.2f}" == rows["approved (pending)"][2]
    settled = document["settlement"]["counts"]
    assert rows["limits lowered"][1] == f"{settled['cards_limit_lowered']:,}" != "0"
    assert rows["scores down"][1] == f"{settled['customers_score_down']:,}" != "0"
    stages = {s["stage"]: s["seconds"] for s in document["stages"]}
    assert {"load", "stream.publish", "stream.consume", "batch"} <= set(rows)
    assert all(rows[name][3] == f"{seconds:,.2f}" for name, seconds in stages.items() if name != "run")
    assert rows["total"][3] == f"{stages['run']:,.2f}"
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table(document))
    text = out.getvalue()
    assert "limits lowered" in text and f"{Decimal(pending['amount']):,.2f}" in text and "\x1b[" not in text


def test_rates_only_for_stages_of_a_second_or_more():
    document = {
        "totals": {
            "transactions": 1000,
            "decided": 1000,
            "cards": 3,
            "customers": 2,
            "pending": 1000,
            "declined": 0,
            "rejected": 0,
        },
        "stream": {"by_status": [{"status": "pending", "count": 1000, "amount": "12.50"}], "reasons": []},
        "settlement": None,
        "stages": [{"stage": "load", "seconds": 0.5}, {"stage": "stream.consume", "seconds": 2.0}],
    }
    rows = _rows(document)
    assert rows["load"][4] == "" and rows["stream.consume"][4] == "500"
    assert rows["limits lowered"][1] == "0" and "total" not in rows


def test_bars_render_on_a_terminal():
    out = io.StringIO()
    with Reporter(console=Console(file=out, force_terminal=True, width=140)) as reporter:
        stage = reporter.stage("consume", total=100, unit="msgs")
        stage.update(40, lag=60)
        stage.update(100, lag=7)
        stage.done()
        reporter.stage("batch: settlement 1").done()
    text = out.getvalue()
    assert "\x1b[" in text  # a live display
    assert "consume" in text and "100/100 msgs" in text and "lag 7" in text and "batch: settlement 1" in text


def test_plain_lines_off_a_terminal(caplog):
    out = io.StringIO()
    caplog.set_level(logging.INFO, logger="cardpipe")
    with Reporter(console=Console(file=out), every=60) as reporter:
        stage = reporter.stage("produce", total=10, unit="msgs")
        stage.update(5)
        stage.update(6)  # within a minute of the first line: not told
        stage.done()
    assert out.getvalue() == ""
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "produce: 5/10 msgs"
    assert messages[1].startswith("produce: 6/10 msgs, done in ") and len(messages) == 2


def test_quiet_shows_nothing(caplog):
    out = io.StringIO()
    caplog.set_level(logging.DEBUG, logger="cardpipe")
    with Reporter(enabled=False, console=Console(file=out, force_terminal=True), every=0) as reporter:
        stage = reporter.stage("load cards", unit="rows")
        stage.update(3)
        stage.done()
        reporter("a message")
    assert out.getvalue() == "" and caplog.records == []


def test_a_plain_callback_gets_the_messages_it_got_before():
    seen: list[str] = []
    stage = stage_of(seen.append, "produce", lambda n: f"published {n:,} transactions", total=5)
    stage.update(2000)
    stage.done()
    assert seen == ["published 2,000 transactions"]


@pytest.mark.kafka
def test_every_stage_of_a_run_reports_its_progress(tmp_path, caplog):
    """Load (with its total), the producer process (more than IN_PROCESS_PUBLISH_MAX transactions), consume and
    each batch stage are told to the reporter."""
    from cardpipe.config import Settings
    from cardpipe.generate import GeneratorConfig, generate_dataset
    from cardpipe.orchestration import commands

    n = commands.IN_PROCESS_PUBLISH_MAX + 2_000
    generate_dataset(tmp_path / "data", GeneratorConfig(transactions=n, customers=300, seed=12))
    settings = Settings.from_env(env={}, results_dir=tmp_path / "results", data_dir=tmp_path / "data")
    caplog.set_level(logging.INFO, logger="cardpipe")
    with Reporter(console=Console(file=io.StringIO()), every=0) as reporter:
        commands.run(settings, reporter)
    messages = [r.getMessage() for r in caplog.records]
    assert f"loading transactions: {n:,}/{n:,} rows" in {m.split(", done")[0] for m in messages}
    assert any(m.startswith(f"produce: {n:,}/{n:,} msgs") for m in messages), messages
    assert any(m.startswith(f"consume: {n:,}/{n:,} msgs") for m in messages), messages
    for stage in ("read", "settle", "summary", "csv files", "rows", "stored"):
        assert any(m.endswith(f"batch stage: {stage}") for m in messages), (stage, messages)
