"""The live dashboard of ``cardpipe serve``: ``GET /`` (the page) and ``GET /dashboard/data`` (what it polls).

The page carries its scripts inline (the run report's vendored Vega, Vega-Lite and vega-embed: no CDN, works
offline) and polls ``dashboard/data`` every :data:`POLL_SECONDS`, re-drawing the run report's stream charts
(:mod:`cardpipe.report.charts`) and the numbers around them. One poll is a few small queries, read at most once
per :data:`DATA_TTL_SECONDS` whatever the number of open pages: the decided count, the checkpoint log of the
last :data:`WINDOW_SECONDS`, the newest declines (by transaction id, the primary key) and the newest settlement.
No answer carries a card number: declines show ids only.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, select

from cardpipe.domain.records import DECLINED
from cardpipe.report.charts import CHARTS, Chart
from cardpipe.report.facts import (
    CardBalanceCheck,
    CheckpointRow,
    RunFacts,
    StreamHistory,
    bucket_history,
    read_checkpoint_log,
)
from cardpipe.report.html import LIBRARIES, vendored_scripts
from cardpipe.serving import schema, views

__all__ = ["DashboardData", "dashboard_page", "read_dashboard"]

#: How often the page asks for new data.
POLL_SECONDS = 2.0
#: How long one reading of the database serves every page's polls.
DATA_TTL_SECONDS = 1.0
#: The charts show the checkpoint log of this many seconds before the newest checkpoint.
WINDOW_SECONDS = 3600
#: At most this many time buckets per chart (the report's are finer: the page redraws every poll).
MAX_BUCKETS = 120
#: "Decisions per second (recent)" averages the checkpoints committed in this many seconds before now.
RECENT_SECONDS = 10
#: How many of the newest declines are listed.
LATEST_DECLINES = 20
#: The run report's charts the dashboard redraws: those of the stream's history.
LIVE_CHARTS: tuple[Chart, ...] = tuple(
    c for c in CHARTS if c.id in ("chart-decisions-per-second", "chart-decision-mix", "chart-latency", "chart-lag")
)
_SETTLEMENT_COUNTS = ("transactions", "approved", "declined", "rejected", "cards_limit_lowered", "customers_score_down")

StatusFn = Callable[[], Mapping[str, Any] | None]
_log = schema.stream_checkpoint_log
_s = schema.stream_transactions


# ------------------------------------------------------------------------------------------------ data
def _recent_log(conn: Connection, window_seconds: int) -> list[CheckpointRow]:
    """The checkpoint log's rows of the last ``window_seconds`` before its newest one, in commit order."""
    newest = conn.execute(select(_log.c.committed_ms).order_by(_log.c.committed_ms.desc()).limit(1)).scalar()
    if newest is None:
        return []
    return read_checkpoint_log(conn, since_ms=int(newest) - window_seconds * 1000)


def _history_json(history: StreamHistory) -> dict[str, Any]:
    """``history`` exactly as run.json holds it (the charts' input), through :meth:`RunFacts.to_json`."""
    facts = RunFacts(
        generated_at="",
        database="",
        transactions=0,
        cards=0,
        customers=0,
        undecided=0,
        rejected_messages=0,
        stream=(),
        reasons=(),
        history=history,
        settlement=None,
        reconciliation=(),
        card_balances=CardBalanceCheck(),
        utilization=(),
        score_changes=(),
        limits_by_card_type=(),
    )
    history_json: dict[str, Any] = facts.to_json()["history"]
    return history_json


def recent_rate(rows: list[CheckpointRow], now_ms: int, seconds: int = RECENT_SECONDS) -> float:
    """Decisions (pending + declined) per second committed in the ``seconds`` before ``now_ms``."""
    since = now_ms - seconds * 1000
    return round(sum(r.pending + r.declined for r in rows if since <= r.committed_ms <= now_ms) / seconds, 1)


def _latest_declines(conn: Connection, limit: int) -> list[dict[str, Any]]:
    query = (
        select(
            _s.c.transaction_id,
            _s.c.card_id,
            _s.c.amount,
            _s.c.decline_reason,
            _s.c.timestamp,
            _s.c.kafka_partition,
            _s.c.checkpoint_seq,
        )
        .where(_s.c.status == DECLINED)
        .order_by(_s.c.transaction_id.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in conn.execute(query)]


def _settlement(row: Mapping[str, Any] | None, in_force: int | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "settlement_id": row["settlement_id"],
        "status": row["status"],
        "engine": row["engine"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "in_force": row["settlement_id"] == in_force,
        "counts": {name: row.get(name) for name in _SETTLEMENT_COUNTS},
    }


def read_dashboard(engine: Engine, status: StatusFn | None = None, *, now_ms: int | None = None) -> dict[str, Any]:
    """One reading for the dashboard, JSON-ready: counts, lag, recent rate, the live charts' specs, the newest
    declines and the newest settlement."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    with engine.connect() as conn, views.read_snapshot(conn):
        counts = views.service_counts(conn)
        rows = _recent_log(conn, WINDOW_SECONDS)
        declines = _latest_declines(conn, LATEST_DECLINES)
    try:
        known = dict((status() if status is not None else None) or {})
    except Exception:  # the service's own report failing must not fail the dashboard
        known = {}
    history = bucket_history(rows, MAX_BUCKETS)
    document = {"history": _history_json(history)}
    lag = known.get("lag")
    if lag is None and history.buckets:
        lag = history.buckets[-1].lag_messages
    return views.to_json(
        {
            "generated_at": datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds"),
            "decided": counts["decided"],
            "lag": lag,
            "lag_by_partition": {str(p): n for p, n in sorted((known.get("lag_by_partition") or {}).items())},
            "decisions_per_second": recent_rate(rows, now_ms),
            "window": {
                "seconds": WINDOW_SECONDS,
                "checkpoints": len(rows),
                "pending": sum(r.pending for r in rows),
                "declined": sum(r.declined for r in rows),
                "rejected": sum(r.rejected for r in rows),
            },
            "settlement_in_force": counts["settlement_id"],
            "latest_settlement": _settlement(counts["latest_settlement"], counts["settlement_id"]),
            "latest_declines": declines,
            "charts": {chart.id: chart.build(document) for chart in LIVE_CHARTS},
        }
    )


class DashboardData:
    """:func:`read_dashboard` at most once per ``ttl`` seconds, whatever the number of callers (single flight)."""

    def __init__(self, engine: Engine, status: StatusFn | None = None, ttl: float = DATA_TTL_SECONDS) -> None:
        self.engine, self.status, self.ttl = engine, status, ttl
        self._lock = threading.Lock()
        self._value: bytes | None = None
        self._at = float("-inf")

    def get(self) -> bytes:
        """The reading as JSON bytes; refreshed when older than ``ttl``."""
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl:
                self._value = json.dumps(read_dashboard(self.engine, self.status), separators=(",", ":")).encode()
                self._at = time.monotonic()
            return self._value


# ------------------------------------------------------------------------------------------------ page
#: An empty inline icon: the browser then asks the server for no /favicon.ico.
NO_FAVICON = '<link rel="icon" href="data:,">'
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header,main,footer{max-width:1280px;margin:0 auto;padding:12px 20px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:16px;margin:0 0 4px}
.meta,.desc,footer{color:#666;font-size:12.5px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px;margin-top:10px}
.tile,.panel{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:10px 12px;min-width:0}
.tile .label{color:#666;font-size:12px}.big{font-size:20px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:12px;margin:12px 0}
.chart{width:100%;min-height:240px;overflow:hidden}.chart .vega-embed{width:100%}
.empty{color:#888;font-style:italic;padding:24px 0;text-align:center}
table{border-collapse:collapse;margin:6px 0;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#cf222e;font-weight:600}
"""

_BOOT = """
(function () {
  var options = {mode: "vega-lite", renderer: "svg", actions: false};
  var views = {}, drawn = {}, polls = 0;
  var headers = {};
  var token = /(?:^|[#&])token=([^&]+)/.exec(location.hash.slice(1));
  if (token) headers.Authorization = "Bearer " + decodeURIComponent(token[1]);
  function num(v) { return v === null || v === undefined ? "\\u2013" : Number(v).toLocaleString("en-US"); }
  function show(id, v, text) {
    var el = document.getElementById(id);
    el.textContent = text !== undefined ? text : num(v);
    el.setAttribute("data-value", v === null || v === undefined ? "" : String(v));
  }
  function draw(id, spec) {
    var key = JSON.stringify(spec), el = document.getElementById(id);
    if (drawn[id] === key) return Promise.resolve();
    drawn[id] = key;
    if (views[id]) { views[id].finalize(); delete views[id]; }
    if (!spec) {
      el.textContent = el.getAttribute("data-empty-text");
      el.className = "chart empty";
      el.setAttribute("data-empty", "true");
      el.removeAttribute("data-rendered");
      return Promise.resolve();
    }
    el.className = "chart";
    el.removeAttribute("data-empty");
    return vegaEmbed(el, spec, options).then(function (result) {
      views[id] = result.view;
      el.setAttribute("data-rendered", "true");
      el.removeAttribute("data-error");
    }).catch(function (error) {
      drawn[id] = null;
      el.setAttribute("data-error", String(error));
      console.error("chart " + id + " failed: " + error);
    });
  }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "\\u2013" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
  }
  function declines(rows) {
    var body = document.getElementById("declines");
    body.textContent = "";
    rows.forEach(function (d) {
      var tr = document.createElement("tr");
      cell(tr, d.transaction_id, "n"); cell(tr, d.card_id, "n"); cell(tr, d.amount, "n");
      cell(tr, d.decline_reason, "bad"); cell(tr, d.timestamp);
      cell(tr, d.kafka_partition + " / " + d.checkpoint_seq, "n");
      body.appendChild(tr);
    });
    document.getElementById("declines-empty").hidden = rows.length > 0;
  }
  function settlement(s, inForce) {
    show("settlement-in-force", inForce);
    var el = document.getElementById("settlement");
    if (!s) { el.textContent = "no settlement yet"; return; }
    var c = s.counts, parts = [
      "#" + s.settlement_id + " " + s.status + (s.in_force ? " (in force)" : "") + ", engine " + s.engine,
      "started " + (s.started_at || "\\u2013") + ", finished " + (s.finished_at || "\\u2013"),
      num(c.transactions) + " transactions: " + num(c.approved) + " approved, " + num(c.declined) +
        " declined, " + num(c.rejected) + " rejected",
      num(c.cards_limit_lowered) + " limits lowered, " + num(c.customers_score_down) + " scores down"
    ];
    el.textContent = parts.join(" \\u00b7 ");
    el.setAttribute("data-settlement-id", String(s.settlement_id));
  }
  function update(d) {
    show("decided", d.decided);
    show("lag", d.lag);
    show("rate", d.decisions_per_second);
    show("generated", d.generated_at, d.generated_at);
    settlement(d.latest_settlement, d.settlement_in_force);
    declines(d.latest_declines);
    return Promise.all(Object.keys(d.charts).map(function (id) { return draw(id, d.charts[id]); }));
  }
  var first;
  window.cardpipeReady = new Promise(function (resolve) { first = resolve; });
  function poll() {
    fetch("dashboard/data", {headers: headers, cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(update).then(function () {
      polls += 1;
      document.body.setAttribute("data-polls", String(polls));
      document.getElementById("problem").textContent = "";
    }).catch(function (error) {
      document.getElementById("problem").textContent = "no fresh data: " + error.message;
      console.warn("dashboard poll failed: " + error);
    }).then(function () { first(); setTimeout(poll, POLL_MS); });
  }
  poll();
})();
"""


def _tile(ident: str, label: str) -> str:
    return f'<div class="tile"><div class="label">{html.escape(label)}</div><div class="big" id="{ident}">–</div></div>'


@lru_cache(maxsize=1)
def dashboard_page() -> str:
    """The dashboard's HTML: everything inline, data fetched from ``dashboard/data`` (relative to the page)."""
    panels = "".join(
        f'<section class="panel"><h2>{html.escape(c.title)}</h2><p class="desc">{html.escape(c.description)}</p>'
        f'<div class="chart" id="{html.escape(c.id)}" data-empty-text="{html.escape(c.empty)}"></div></section>'
        for c in LIVE_CHARTS
    )
    tiles = "".join(
        _tile(ident, label)
        for ident, label in (
            ("decided", "decided"),
            ("lag", "lag (messages)"),
            ("rate", f"decisions / s (last {RECENT_SECONDS} s)"),
            ("settlement-in-force", "settlement in force"),
        )
    )
    boot = _BOOT.replace("POLL_MS", str(int(POLL_SECONDS * 1000)))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"{NO_FAVICON}<title>cardpipe live</title><style>{_STYLE}</style></head><body>"
        '<header><h1>cardpipe live</h1><p class="meta">Updated every '
        f'{POLL_SECONDS:g} s; last data <span id="generated">–</span> (UTC). '
        f'Charts: the last {WINDOW_SECONDS // 60} minutes of the checkpoint log. <span id="problem" class="bad">'
        f'</span></p><div class="tiles">{tiles}</div></header><main><div class="grid">{panels}</div>'
        '<section class="panel"><h2>Latest settlement</h2><p id="settlement">–</p></section>'
        f'<section class="panel"><h2>Latest declines</h2><p class="desc">The newest {LATEST_DECLINES} declined '
        "transactions (highest ids); ids only, never card numbers.</p><table><thead><tr><th>transaction</th>"
        "<th>card id</th><th>amount</th><th>reason</th><th>timestamp</th><th>partition / checkpoint</th></tr>"
        '</thead><tbody id="declines"></tbody></table><p class="empty" id="declines-empty">no declines yet</p>'
        f"</section></main><footer>Charts: {html.escape(LIBRARIES)}. JSON: <code>/dashboard/data</code>.</footer>"
        f"{vendored_scripts()}<script>{boot}</script></body></html>\n"
    )
