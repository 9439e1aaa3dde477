"""The report's charts as Vega-Lite specs: each a pure function of run.json's data (plain dicts) to a spec.

The run report (:mod:`cardpipe.report.html`) and a live dashboard build the same charts from the same
functions. Specs carry their data inline (``data.values``) and no ``$schema`` URL: the page embeds them with
``mode: "vega-lite"`` and never fetches anything. Times are epoch milliseconds shown in UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Spec = dict[str, Any]
Rows = Sequence[Mapping[str, Any]]

HEIGHT = 220
_TIME_AXIS = {
    "field": "t",
    "type": "temporal",
    "title": "time (UTC)",
    "scale": {"type": "utc"},
    "axis": {"format": "%H:%M:%S", "labelOverlap": True},
}
_TIME_END = {"field": "t_end"}  # bars span their bucket: [t, t_end)


def _base(values: list[dict[str, Any]], **rest: Any) -> Spec:
    return {
        "width": "container",
        "height": HEIGHT,
        "data": {"values": values},
        "autosize": {"type": "fit-x", "contains": "padding"},
        "config": {"view": {"stroke": None}, "axis": {"labelFontSize": 11, "titleFontSize": 12}},
        **rest,
    }


def _utc_tooltip() -> dict[str, Any]:
    return {"field": "t", "type": "temporal", "title": "bucket start (UTC)", "timeUnit": "utchoursminutesseconds"}


def _end(t: int, bucket_seconds: float) -> int:
    return t + round((bucket_seconds or 1) * 1000)


def _stacked(rows: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    """Rows of one bucket after another, each given ``y0``..``y1``: its segment of the bucket's stack.

    The stack is computed here: Vega-Lite lays a bar with ``x2`` out horizontally and does not stack it.
    """
    tops: dict[Any, float] = {}
    for r in rows:
        y0 = tops.get(r["t"], 0)
        r["y0"], r["y1"] = y0, y0 + r[value]
        tops[r["t"]] = r["y1"]
    return rows


def decisions_per_second(buckets: Rows, bucket_seconds: float) -> Spec:
    """Decisions committed per second (pending and declined, stacked) per time bucket."""
    width = bucket_seconds or 1
    values = _stacked(
        [
            {"t": b["t"], "t_end": _end(b["t"], width), "status": status, "per_second": round(b[status] / width, 2)}
            for b in buckets
            for status in ("pending", "declined")
        ],
        "per_second",
    )
    return _base(
        values,
        mark={"type": "rect", "tooltip": True},
        encoding={
            "x": _TIME_AXIS,
            "x2": _TIME_END,
            "y": {"field": "y1", "type": "quantitative", "title": "decisions / s"},
            "y2": {"field": "y0"},
            "color": {
                "field": "status",
                "type": "nominal",
                "scale": {"domain": ["pending", "declined"], "range": ["#4c78a8", "#e45756"]},
            },
            "tooltip": [
                _utc_tooltip(),
                {"field": "status", "type": "nominal"},
                {"field": "per_second", "type": "quantitative", "title": "per second"},
            ],
        },
    )


def decision_mix(points: Rows, bucket_seconds: float) -> Spec:
    """The share of each decision category (pending, each decline and rejection reason) per time bucket."""
    totals: dict[Any, int] = {}
    for p in points:
        totals[p["t"]] = totals.get(p["t"], 0) + p["count"]
    values = _stacked(
        [
            {
                "t": p["t"],
                "t_end": _end(p["t"], bucket_seconds),
                "reason": p["reason"],
                "count": p["count"],
                "share": round(p["count"] / totals[p["t"]], 5) if totals[p["t"]] else 0,
            }
            for p in points
        ],
        "share",
    )
    return _base(
        values,
        mark={"type": "rect", "tooltip": True},
        encoding={
            "x": _TIME_AXIS,
            "x2": _TIME_END,
            "y": {
                "field": "y1",
                "type": "quantitative",
                "title": "share of decisions",
                "axis": {"format": "%"},
                "scale": {"domain": [0, 1]},
            },
            "y2": {"field": "y0"},
            "color": {"field": "reason", "type": "nominal", "title": "decision / reason"},
            "tooltip": [
                _utc_tooltip(),
                {"field": "reason", "type": "nominal"},
                {"field": "count", "type": "quantitative", "format": ","},
                {"field": "share", "type": "quantitative", "format": ".1%"},
            ],
        },
    )


def latency(buckets: Rows) -> Spec:
    """Decision latency (publish to commit) per time bucket: p50, p99 and max, in milliseconds."""
    series = (("latency_p50_ms", "p50"), ("latency_p99_ms", "p99"), ("latency_max_ms", "max"))
    values = [
        {"t": b["t"], "percentile": label, "ms": b[key]}
        for b in buckets
        for key, label in series
        if b.get(key) is not None
    ]
    return _base(
        values,
        mark={"type": "line", "point": {"size": 12}, "tooltip": True},
        encoding={
            "x": _TIME_AXIS,
            "y": {"field": "ms", "type": "quantitative", "title": "latency (ms)"},
            "color": {"field": "percentile", "type": "nominal", "scale": {"domain": ["p50", "p99", "max"]}},
            "tooltip": [
                _utc_tooltip(),
                {"field": "percentile", "type": "nominal"},
                {"field": "ms", "type": "quantitative", "format": ",.1f"},
            ],
        },
    )


def consumer_lag(buckets: Rows, bucket_seconds: float) -> Spec:
    """Messages on the topic not yet decided, as the consumers last reported, per time bucket."""
    values = [
        {"t": b["t"], "t_end": _end(b["t"], bucket_seconds), "lag": b["lag_messages"]}
        for b in buckets
        if b.get("lag_messages") is not None
    ]
    return _base(
        values,
        mark={"type": "rect", "color": "#72b7b2", "tooltip": True},
        encoding={
            "x": _TIME_AXIS,
            "x2": _TIME_END,
            "y2": {"datum": 0},
            "y": {
                "field": "lag",
                "type": "quantitative",
                "title": "lag (messages)",
                "axis": {"format": ",d", "tickMinStep": 1},
            },
            "tooltip": [_utc_tooltip(), {"field": "lag", "type": "quantitative", "format": ","}],
        },
    )


def stage_timings(stages: Rows) -> Spec:
    """Seconds per stage, in the order measured; a stage ``a.b`` is part ``b`` of ``a``."""
    values = [{"stage": s["stage"], "seconds": s["seconds"], "group": str(s["stage"]).split(".", 1)[0]} for s in stages]
    return _base(
        values,
        height=max(60, 22 * len(values)),
        mark={"type": "bar", "tooltip": True},
        encoding={
            "y": {"field": "stage", "type": "nominal", "sort": None, "title": None},
            "x": {"field": "seconds", "type": "quantitative", "title": "seconds"},
            "color": {"field": "group", "type": "nominal", "legend": None},
            "tooltip": [{"field": "stage"}, {"field": "seconds", "type": "quantitative", "format": ",.3f"}],
        },
    )


def utilization(bins: Rows) -> Spec:
    """Customers by utilization (settled balances / original limits), coloured by the score change it gives."""
    values = [{"bin": b["bin"], "customers": b["customers"], "score_change": b["score_change"]} for b in bins]
    return _base(
        values,
        mark={"type": "bar", "tooltip": True},
        encoding={
            "x": {"field": "bin", "type": "ordinal", "sort": None, "title": "utilization (%)"},
            "y": {"field": "customers", "type": "quantitative", "title": "customers"},
            "color": {
                "field": "score_change",
                "type": "ordinal",
                "title": "score change",
                "scale": {"scheme": "redyellowgreen"},
                "sort": "ascending",
            },
            "tooltip": [{"field": "bin"}, {"field": "customers", "type": "quantitative"}, {"field": "score_change"}],
        },
    )


def score_changes(changes: Rows) -> Spec:
    """Customers by score change (settled score - original score)."""
    values = [{"change": c["change"], "customers": c["customers"]} for c in changes]
    return _base(
        values,
        mark={"type": "bar", "tooltip": True},
        encoding={
            "x": {"field": "change", "type": "ordinal", "title": "score change", "sort": "ascending"},
            "y": {"field": "customers", "type": "quantitative", "title": "customers"},
            "color": {
                "condition": {"test": "datum.change < 0", "value": "#e45756"},
                "value": "#54a24b",
            },
            "tooltip": [{"field": "change", "type": "quantitative"}, {"field": "customers", "type": "quantitative"}],
        },
    )


def limits_lowered(by_type: Rows) -> Spec:
    """Per card type: cards whose limit the settlement lowered, and the others."""
    values = [
        {"card_type": t["card_type"], "cards": n, "limit": what}
        for t in by_type
        for what, n in (("lowered", t["lowered"]), ("unchanged", t["cards"] - t["lowered"]))
    ]
    return _base(
        values,
        mark={"type": "bar", "tooltip": True},
        encoding={
            "x": {"field": "card_type", "type": "nominal", "sort": None, "title": "card type"},
            "y": {"field": "cards", "type": "quantitative", "stack": "zero", "title": "cards"},
            "color": {
                "field": "limit",
                "type": "nominal",
                "scale": {"domain": ["lowered", "unchanged"], "range": ["#e45756", "#bab0ac"]},
                "title": "credit limit",
            },
            "tooltip": [{"field": "card_type"}, {"field": "limit"}, {"field": "cards", "type": "quantitative"}],
        },
    )


@dataclass(frozen=True)
class Chart:
    """One chart of the report: its container id, title, what it shows, and how to build it from run.json."""

    id: str
    title: str
    description: str
    build: Callable[[Mapping[str, Any]], Spec | None]  # run.json -> spec, None when there is nothing to show
    empty: str


def _history(facts: Mapping[str, Any]) -> Mapping[str, Any]:
    history: Mapping[str, Any] = facts.get("history") or {}
    return history


def _when_any(rows: Rows, make: Callable[[Rows], Spec]) -> Spec | None:
    return make(rows) if rows else None


NO_HISTORY = "no stream history recorded"
NO_SETTLEMENT = "no settlement in force"

CHARTS: tuple[Chart, ...] = (
    Chart(
        "chart-decisions-per-second",
        "Decisions per second",
        "Decisions committed (pending + declined) per second of each time bucket, from the checkpoint log.",
        lambda f: _when_any(
            _history(f).get("buckets") or [], lambda b: decisions_per_second(b, _history(f).get("bucket_seconds", 1))
        ),
        NO_HISTORY,
    ),
    Chart(
        "chart-decision-mix",
        "Decision mix by reason over time",
        "Share of pending decisions, of each decline reason and of each rejection reason per time bucket.",
        lambda f: _when_any(
            _history(f).get("reasons") or [], lambda p: decision_mix(p, _history(f).get("bucket_seconds", 1))
        ),
        NO_HISTORY,
    ),
    Chart(
        "chart-latency",
        "Decision latency",
        "Publish (broker timestamp) to commit, per bucket: the checkpoints' p50, p99 and max, combined weighted "
        "by decisions.",
        lambda f: _when_any(
            [b for b in _history(f).get("buckets") or [] if b.get("latency_max_ms") is not None], latency
        ),
        NO_HISTORY,
    ),
    Chart(
        "chart-lag",
        "Consumer lag",
        "Messages on the topic not yet decided, as each consumer last reported it, summed over consumers.",
        lambda f: _when_any(
            [b for b in _history(f).get("buckets") or [] if b.get("lag_messages") is not None],
            lambda b: consumer_lag(b, _history(f).get("bucket_seconds", 1)),
        ),
        NO_HISTORY,
    ),
    Chart(
        "chart-stages",
        "Stage timings",
        "Seconds per stage of the run and of the batch, as the command measured them.",
        lambda f: _when_any(f.get("stages") or [], stage_timings),
        "no stage timings recorded (they come from `cardpipe run`)",
    ),
    Chart(
        "chart-utilization",
        "Utilization",
        "Customers by utilization: their cards' settled balances / original credit limits (SPEC §4), coloured by "
        "the score change of the bin.",
        lambda f: _when_any(f.get("utilization") or [], utilization),
        NO_SETTLEMENT,
    ),
    Chart(
        "chart-score-changes",
        "Score changes",
        "Customers by credit score change: settled score - original score (kept within 300..850).",
        lambda f: _when_any(f.get("score_changes") or [], score_changes),
        NO_SETTLEMENT,
    ),
    Chart(
        "chart-limits-lowered",
        "Credit limits lowered by card type",
        "Cards whose settled credit limit is below the original, per card type.",
        lambda f: _when_any(f.get("limits_lowered_by_card_type") or [], limits_lowered),
        NO_SETTLEMENT,
    ),
)
