"""The live dashboard of ``cardpipe serve`` (``/`` and ``/dashboard/data``).

Through the API on the views scenario (with checkpoint-log rows as consumers write them), and in headless
chromium on a real ``cardpipe serve``: the page shows new decisions after more are published, without a reload.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cardpipe.config import SAMPLE_DATA_DIR
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.report.html import vendored_scripts
from cardpipe.serving import schema
from cardpipe.serving.api import create_app
from cardpipe.serving.dashboard import LIVE_CHARTS, NO_FAVICON, dashboard_page, read_dashboard, recent_rate
from cardpipe.stream.broker import stop_broker
from tests.serving.test_views import Serving, sqlite_engine, whole_scenario

TOKEN = "dashboard-secret"


def _log_row(committed_ms: int, pending: int, declined: int, rejected: int, lag: int | None) -> dict[str, Any]:
    reasons = {"declined:amount_over_half_limit": declined} if declined else {}
    if rejected:
        reasons["rejected:unknown_card"] = rejected
    return {
        "topic": "transactions",
        "owner": "host:1:0",
        "committed_ms": committed_ms,
        "messages": pending + declined + rejected,
        "pending": pending,
        "declined": declined,
        "rejected": rejected,
        "duplicates": 0,
        "reasons": json.dumps(reasons),
        "latency_p50_ms": 12.0,
        "latency_p99_ms": 40.0,
        "latency_max_ms": 55.0,
        "lag_messages": lag,
    }


@pytest.fixture
def serving(tmp_path: Path):
    engine = sqlite_engine(tmp_path / "serving.db")
    s = whole_scenario(engine)
    yield s
    engine.dispose()


def _add_log(s: Serving, now_ms: int) -> None:
    rows = [
        _log_row(now_ms - 30_000, 100, 0, 0, 9),  # outside the recent window
        _log_row(now_ms - 5_000, 6, 2, 1, 3),
        _log_row(now_ms - 3_000, 4, 0, 0, 0),
    ]
    with s.engine.begin() as conn:
        conn.execute(schema.stream_checkpoint_log.insert(), rows)


def _card_numbers() -> list[str]:
    with (SAMPLE_DATA_DIR / "cards.csv").open(newline="") as handle:
        return [row["card_number"] for row in csv.DictReader(handle)]


def test_data_holds_the_scenarios_numbers(serving):
    now_ms = int(time.time() * 1000)
    _add_log(serving, now_ms)
    data = read_dashboard(serving.engine, now_ms=now_ms)
    assert data["decided"] == serving.counts()["decided"] == 12  # 9 stream rows + 3 rejected-only messages
    assert data["decisions_per_second"] == 1.2  # (6 + 2 + 4) / 10 s; the row of 30 s ago is older
    assert data["lag"] == 0  # no service status: the consumers' last reported lag
    assert data["window"] == {"seconds": 3600, "checkpoints": 3, "pending": 110, "declined": 2, "rejected": 1}
    assert data["settlement_in_force"] == 2
    latest = data["latest_settlement"]
    assert (latest["settlement_id"], latest["status"], latest["in_force"]) == (3, schema.SETTLEMENT_FAILED, False)
    assert latest["started_at"] == "2025-04-02 00:00:00"
    assert [(d["transaction_id"], d["card_id"], d["amount"], d["decline_reason"]) for d in data["latest_declines"]] == [
        (7, 1, "9999.00", "amount_over_half_limit"),
        (3, 1, "9000.00", "amount_over_half_limit"),
    ]
    assert set(data["charts"]) == {c.id for c in LIVE_CHARTS}
    for chart_id, spec in data["charts"].items():
        assert spec is not None and spec["data"]["values"], chart_id
    rates = data["charts"]["chart-decisions-per-second"]["data"]["values"]
    width = data["charts"]["chart-decisions-per-second"]["data"]["values"][0]
    assert width["t_end"] > width["t"]
    total = sum(v["per_second"] * (v["t_end"] - v["t"]) / 1000 for v in rates)
    assert round(total) == 112  # every pending and declined decision of the window


def test_recent_rate_counts_only_the_last_seconds():
    from cardpipe.report.facts import CheckpointRow

    def row(ms: int, pending: int) -> CheckpointRow:
        return CheckpointRow(ms, "o", pending, pending, 0, 0, 0, {}, None, None, None, None)

    assert recent_rate([row(1_000, 50), row(15_000, 20), row(20_000, 30)], 20_000) == 5.0
    assert recent_rate([], 20_000) == 0.0


def test_page_and_data_through_the_api(serving):
    _add_log(serving, int(time.time() * 1000))
    with TestClient(create_app(serving.engine, status=lambda: {"lag": 7, "lag_by_partition": {0: 7}})) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        outside_scripts = page.text.replace(vendored_scripts(), "").replace(NO_FAVICON, "")
        assert "http://" not in outside_scripts and "https://" not in outside_scripts
        assert not re.search(r"<(script|img|iframe)[^>]*\bsrc=|<link\b|@import|url\(", outside_scripts, re.I)
        for chart in LIVE_CHARTS:
            assert f'id="{chart.id}"' in page.text
        answer = client.get("/dashboard/data")
        assert answer.status_code == 200
        data = answer.json()
        assert data["decided"] == 12 and data["lag"] == 7 and data["lag_by_partition"] == {"0": 7}
        assert [d["transaction_id"] for d in data["latest_declines"]] == [7, 3]
        for number in _card_numbers():
            assert number not in answer.text and number not in page.text
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and "/dashboard/data" not in paths


def test_data_is_cached_for_a_second(serving):
    with TestClient(create_app(serving.engine)) as client:
        before = client.get("/dashboard/data").json()["decided"]
        serving.decide(100, 1, "1.00")
        assert client.get("/dashboard/data").json()["decided"] == before  # the same reading, within a second
        time.sleep(1.1)
        assert client.get("/dashboard/data").json()["decided"] == before + 1


def test_the_data_needs_the_token_when_one_is_set_the_page_does_not(serving):
    """The page is a shell with no data (a browser cannot send a bearer header to open it); its data needs it."""
    with TestClient(create_app(serving.engine, token=TOKEN)) as client:
        page = client.get("/")
        assert page.status_code == 200 and "7934" not in page.text
        assert client.get("/dashboard/data").status_code == 401
        assert client.get("/cards/1").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/", headers=auth).status_code == 200
        assert client.get("/dashboard/data", headers=auth).json()["decided"] == 12
        assert client.get("/health").status_code == 200


def test_page_builds_no_markup_from_data():
    """Declines and settlement are written as text (textContent), never as HTML."""
    assert "innerHTML" not in dashboard_page().replace(vendored_scripts(), "")


# ------------------------------------------------------------------------------------------------ browser
_READ = """
const done = arguments[arguments.length - 1];
window.cardpipeReady.then(() => {
  const charts = {};
  for (const el of document.querySelectorAll(".chart")) {
    charts[el.id] = {
      rendered: el.getAttribute("data-rendered") === "true",
      error: el.getAttribute("data-error"),
      marks: el.querySelectorAll("svg g.role-mark path, svg g.role-mark line").length,
    };
  }
  done({
    polls: Number(document.body.getAttribute("data-polls") || 0),
    decided: document.getElementById("decided").getAttribute("data-value"),
    declines: document.querySelectorAll("#declines tr").length,
    problem: document.getElementById("problem").textContent,
    text: document.body.innerText,
    charts,
    resources: performance.getEntriesByType("resource").map(r => r.name),
  });
});
"""


def _read(driver: Any) -> dict[str, Any]:
    read: dict[str, Any] = driver.execute_async_script(_READ)
    return read


def _wait_for(driver: Any, ok: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        read = _read(driver)
        if ok(read) or time.monotonic() > deadline:
            return read
        time.sleep(0.25)


@pytest.mark.kafka
def test_the_page_shows_new_decisions_in_a_browser(tmp_path):
    from tests.orchestration.helpers import env_without_services
    from tests.orchestration.test_service import cardpipe, start_serve, write_half
    from tests.report.browser import headless_chromium

    data, results = tmp_path / "data", tmp_path / "results"
    generate_dataset(data, GeneratorConfig(transactions=3_000, customers=200, cards=300, seed=5))
    env = env_without_services()
    cardpipe(["setup", "--results-dir", str(results)], env)
    cardpipe(["load", "--results-dir", str(results), "--data-dir", str(data)], env)
    first = write_half(data / "transactions.csv", tmp_path / "first.csv", True)
    second = write_half(data / "transactions.csv", tmp_path / "second.csv", False)
    cardpipe(["produce", "--results-dir", str(results), "--from-csv", str(tmp_path / "first.csv")], env)
    served = start_serve(results, env)
    try:
        served.wait_decided(len(first))
        with headless_chromium() as driver:
            driver.get(f"http://127.0.0.1:{served.port}/")
            before = _wait_for(driver, lambda r: r["decided"] == str(len(first)), 20)
            assert before["decided"] == str(len(first)), before["problem"]
            cardpipe(["produce", "--results-dir", str(results), "--from-csv", str(tmp_path / "second.csv")], env)
            after = _wait_for(driver, lambda r: r["decided"] == str(len(first) + len(second)), 20)
            assert after["decided"] == str(len(first) + len(second)), (after["decided"], after["problem"])
            assert after["polls"] > before["polls"]  # the same page, polled again: no reload
            time.sleep(2.5)  # one more poll: every chart redrawn with the second half
            after = _read(driver)
            console = driver.get_log("browser")
        assert not [m for m in console if m.get("level") in ("SEVERE", "WARNING")], console
        for chart_id, chart in after["charts"].items():
            assert chart["rendered"] and not chart["error"] and chart["marks"] > 0, (chart_id, chart)
        assert after["declines"] > 0 and after["problem"] == ""
        origin = f"http://127.0.0.1:{served.port}/"
        assert all(url.startswith(origin) for url in after["resources"]), after["resources"]
        shown = after["text"]
        for row in csv.DictReader((data / "cards.csv").open(newline="")):
            assert row["card_number"] not in shown
    finally:
        if served.popen.poll() is None:
            served.popen.terminate()
            served.popen.wait(10)
        stop_broker(results)
