"""The run report as one self-contained HTML page: styles, Vega, Vega-Lite and vega-embed inlined, data inline.

:func:`render_report` is a pure function of run.json's content. Every number the page shows sits in an
element with ``data-fact="<key path in run.json>"`` (``totals.decided``, ``reconciliation.statuses.0.batch_count``)
so that a reader, or a test, can check it against run.json. The page opens from a file with no network.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import resources
from typing import Any

from cardpipe.domain.records import response_code
from cardpipe.report.charts import CHARTS

#: The vendored UMD builds, in load order (vega-lite and vega-embed need the ones before them).
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
LIBRARIES = "Vega 6.4.0, Vega-Lite 6.5.0, vega-embed 7.3.0 (BSD-3-Clause, inlined)"
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)
MISSING = "–"


@lru_cache(maxsize=1)
def vendored_scripts() -> str:
    """The vendored libraries' code, without their source-map comments (nothing to fetch)."""
    static = resources.files("cardpipe.report") / "static"
    parts = []
    for name in SCRIPTS:
        code = _SOURCE_MAP.sub("", (static / name).read_text(encoding="utf-8"))
        if "</script" in code.lower():  # would end the inline <script> early
            raise ValueError(f"{name} contains '</script': cannot be inlined")
        parts.append(f"<script>/* {name} */\n{code}\n</script>")
    return "\n".join(parts)


def lookup(document: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted key path (list items by index): ``lookup(d, "reconciliation.statuses.0.holds")``."""
    value: Any = document
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def format_value(value: Any, kind: str = "int") -> str:
    """How the page shows a fact: ``int`` 1,234; ``id`` 1234; ``money`` 1,234.50; ``f1`` 1,234.5; bools yes/no."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "id":
        return html.escape(str(value))
    if kind == "money":
        try:
            return f"{Decimal(str(value)):,.2f}"
        except InvalidOperation:
            return html.escape(str(value))
    if kind == "g":
        return f"{float(value):,g}"
    if kind.startswith("f") and kind[1:].isdigit():
        return f"{float(value):,.{int(kind[1:])}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def fact(document: Mapping[str, Any], path: str, kind: str = "int", css: str = "") -> str:
    """An element showing the fact at ``path``, marked with its path."""
    value = lookup(document, path)
    classes = [css] if css else []
    if isinstance(value, bool):
        classes.append("ok" if value else "bad")
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f'<span data-fact="{html.escape(path)}"{cls}>{format_value(value, kind)}</span>'


def _json_for_script(value: Any) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>``, no ``<!--``)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def _cell(document: Mapping[str, Any], path: str, kind: str = "int") -> str:
    return f'<td class="n">{fact(document, path, kind)}</td>'


def _tile(document: Mapping[str, Any], label: str, path: str, kind: str = "int", unit: str = "") -> str:
    unit_html = f' <span class="unit">{html.escape(unit)}</span>' if unit else ""
    label_html = f'<div class="label">{html.escape(label)}</div>'
    return f'<div class="tile">{label_html}{fact(document, path, kind, "big")}{unit_html}</div>'


def _header(d: Mapping[str, Any]) -> str:
    settlement = d.get("settlement")
    tiles = [
        _tile(d, "transactions", "totals.transactions"),
        _tile(d, "decided", "totals.decided"),
        _tile(d, "pending (approved once settled)", "totals.pending"),
        _tile(d, "declined", "totals.declined"),
        _tile(d, "rejected", "totals.rejected"),
        _tile(d, "rejected messages", "totals.rejected_messages"),
        _tile(d, "decisions / s (mean)", "history.decisions_per_second.mean", "f1"),
        _tile(d, "decisions / s (peak bucket)", "history.decisions_per_second.peak", "f1"),
        _tile(d, "latency p50", "history.latency_ms.p50", "f1", "ms"),
        _tile(d, "latency p99", "history.latency_ms.p99", "f1", "ms"),
        _tile(d, "latency max", "history.latency_ms.max", "f1", "ms"),
        _tile(d, "max lag", "history.max_lag_messages", "int", "messages"),
    ]
    if settlement is not None:
        tiles.append(_tile(d, "settlement in force", "settlement.settlement_id"))
    where = html.escape(str(d.get("database", "")))
    when = html.escape(str(d.get("generated_at", "")))
    stream_span = ""
    history = d.get("history") or {}
    if history.get("start"):
        stream_span = (
            f" · stream history {html.escape(str(history['start']))} to {html.escape(str(history['end']))} "
            f"({fact(d, 'history.checkpoints')} checkpoints, buckets of {fact(d, 'history.bucket_seconds', 'g')} s)"
        )
    return (
        "<header><h1>cardpipe run report</h1>"
        f'<p class="meta">generated {when} · {where}{stream_span}</p>'
        f'<div class="tiles">{"".join(tiles)}</div></header>'
    )


def _invariants(d: Mapping[str, Any]) -> str:
    rows = []
    for i, inv in enumerate(d.get("invariants") or []):
        checked = "" if inv["checked"] else ' <span class="note">(not checked)</span>'
        rows.append(
            f"<tr><td><code>{html.escape(inv['name'])}</code></td><td>{fact(d, f'invariants.{i}.holds')}{checked}</td>"
            f"<td>{html.escape(inv['detail'])}</td></tr>"
        )
    return (
        '<section id="invariants"><h2>Invariants</h2><table><thead><tr><th>invariant</th><th>holds</th>'
        f"<th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _reconciliation(d: Mapping[str, Any]) -> str:
    rec = d.get("reconciliation") or {}
    statuses: Sequence[Mapping[str, Any]] = rec.get("statuses") or []
    if not statuses:
        return (
            '<section id="reconciliation"><h2>Stream vs batch</h2><p class="empty">no settlement in force</p></section>'
        )
    rows = []
    for i, r in enumerate(statuses):
        p = f"reconciliation.statuses.{i}"
        rows.append(
            f"<tr><td>{html.escape(r['stream_status'])} → {html.escape(r['status'])}</td>"
            + "".join(
                _cell(d, f"{p}.{name}", kind)
                for name, kind in (
                    ("stream_count", "int"),
                    ("stream_amount", "money"),
                    ("after_watermark_count", "int"),
                    ("after_watermark_amount", "money"),
                    ("batch_count", "int"),
                    ("batch_amount", "money"),
                    ("recorded", "int"),
                    ("holds", "int"),
                )
            )
            + "</tr>"
        )
    cards = rec.get("cards") or {}
    listed = cards.get("listed") or []
    mismatch_rows = "".join(
        f"<tr><td class='n'>{fact(d, f'reconciliation.cards.listed.{i}.card_id', 'id')}</td>"
        f"<td class='n'>{fact(d, f'reconciliation.cards.listed.{i}.original_balance', 'money')}</td>"
        f"<td class='n'>{fact(d, f'reconciliation.cards.listed.{i}.settled_balance', 'money')}</td>"
        f"<td class='n'>{fact(d, f'reconciliation.cards.listed.{i}.approved_amount', 'money')}</td></tr>"
        for i in range(len(listed))
    )
    mismatches = (
        "<table><thead><tr><th>card</th><th>original balance</th><th>settled balance</th><th>approved</th></tr>"
        f"</thead><tbody>{mismatch_rows}</tbody></table>"
        if listed
        else ""
    )
    return (
        '<section id="reconciliation"><h2>Stream vs batch</h2>'
        "<p>Per status: the stream's decisions, minus those after the watermark of the settlement in force, equal "
        "the batch's (count and amount), and the count the settlement recorded.</p>"
        '<table class="numbers"><thead><tr><th>status</th><th>stream</th><th>stream amount</th>'
        "<th>after watermark</th><th>amount after</th><th>batch</th><th>batch amount</th><th>recorded</th>"
        f"<th>reconciles</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<p>Per card, settled balance − original balance = the sum of its approved amounts: "
        f"{fact(d, 'reconciliation.cards.holding')} of {fact(d, 'reconciliation.cards.checked')} cards hold it, "
        f"{fact(d, 'reconciliation.cards.mismatches')} do not.</p>{mismatches}</section>"
    )


def _reasons(d: Mapping[str, Any]) -> str:
    reasons = (d.get("stream") or {}).get("reasons") or []
    rows = "".join(
        f"<tr><td>{html.escape(r['kind'])}</td><td><code>{html.escape(r['reason'])}</code></td>"
        f"<td>{html.escape(response_code(r['kind'], r['reason']))}</td>"
        f"<td class='n'>{fact(d, f'stream.reasons.{i}.count')}</td></tr>"
        for i, r in enumerate(reasons)
    )
    body = (
        '<table class="numbers"><thead><tr><th>kind</th><th>reason</th><th>ISO 8583</th><th>count</th></tr></thead>'
        f"<tbody>{rows}"
        "</tbody></table>"
        if reasons
        else '<p class="empty">no decline and no rejection</p>'
    )
    return f'<section id="reasons"><h2>Declines and rejections by reason</h2>{body}</section>'


def _charts(d: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    sections, specs = [], {}
    for chart in CHARTS:
        spec = chart.build(d)
        if spec is None:
            note = f'<p class="empty">{html.escape(chart.empty)}</p>'
            body = f'<div class="chart" id="{chart.id}" data-empty="true">{note}</div>'
        else:
            specs[chart.id] = spec
            body = f'<div class="chart" id="{chart.id}"></div>'
        sections.append(
            f'<section class="panel"><h2>{html.escape(chart.title)}</h2>'
            f'<p class="desc">{html.escape(chart.description)}</p>{body}</section>'
        )
    return f'<div class="grid">{"".join(sections)}</div>', specs


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header,main,footer{max-width:1280px;margin:0 auto;padding:12px 20px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:16px;margin:0 0 4px}
.meta,.desc,.note,footer{color:#666;font-size:12.5px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px;margin-top:10px}
.tile,.panel,section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:10px 12px}
.tile .label{color:#666;font-size:12px}.big{font-size:20px;font-weight:600}.unit{color:#666;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:12px}
main>section{margin:12px 0}.panel{min-width:0}
.chart{width:100%;min-height:240px;overflow:hidden}.chart .vega-embed{width:100%}
.empty{color:#888;font-style:italic;padding:24px 0;text-align:center}
table{border-collapse:collapse;margin:6px 0}th,td{padding:4px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:700}
"""

_BOOT = """
(function () {
  var specs = JSON.parse(document.getElementById("cardpipe-specs").textContent);
  var options = {mode: "vega-lite", renderer: "svg", actions: false};
  window.cardpipeViews = {};
  window.cardpipeReady = Promise.all(Object.keys(specs).map(function (id) {
    var el = document.getElementById(id);
    return vegaEmbed(el, specs[id], options).then(function (result) {
      window.cardpipeViews[id] = result.view;
      el.setAttribute("data-rendered", "true");
    }).catch(function (error) {
      el.setAttribute("data-error", String(error));
      console.error("chart " + id + " failed: " + error);
    });
  }));
})();
"""


def render_report(document: Mapping[str, Any]) -> str:
    """The report page for run.json's content ``document``."""
    charts_html, specs = _charts(document)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>cardpipe run report</title><style>{_STYLE}</style></head><body>"
        f"{_header(document)}<main>{_invariants(document)}{charts_html}{_reconciliation(document)}"
        f"{_reasons(document)}</main>"
        f"<footer>Charts: {LIBRARIES}. The same facts are in run.json beside this file.</footer>"
        f'<script type="application/json" id="cardpipe-specs">{_json_for_script(specs)}</script>'
        f"{vendored_scripts()}<script>{_BOOT}</script></body></html>\n"
    )
