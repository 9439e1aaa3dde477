"""The report's pure parts: the stream's history in buckets, the histogram, the invariants."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from cardpipe.report.facts import (
    MAX_BUCKETS,
    MAX_REASONS,
    CheckpointRow,
    bucket_history,
    bucket_ms_for,
    check_card_balances,
    parse_reasons,
    stage_seconds_from_json,
    utilization_histogram,
    weighted_percentile,
)
from tests.report.synthetic import checkpoint_rows, synthetic_facts

T0 = 1_790_000_000_000  # a whole second, ms since the epoch


def row(ms: int, owner: str = "a", pending: int = 0, declined: int = 0, **kw) -> CheckpointRow:
    base = dict(
        committed_ms=T0 + ms,
        owner=owner,
        messages=pending + declined + kw.get("rejected", 0),
        pending=pending,
        declined=declined,
        rejected=0,
        duplicates=0,
        reasons={},
        latency_p50_ms=None,
        latency_p99_ms=None,
        latency_max_ms=None,
        lag_messages=None,
    )
    base.update(kw)
    return CheckpointRow(**base)


def test_weighted_percentile():
    assert weighted_percentile([], 0.5) is None
    assert weighted_percentile([(5.0, 0)], 0.5) is None
    assert weighted_percentile([(1.0, 1), (2.0, 1), (3.0, 1)], 0.5) == 2.0
    assert weighted_percentile([(10.0, 1), (1.0, 99)], 0.5) == 1.0  # unsorted input, weights count
    assert weighted_percentile([(10.0, 2), (1.0, 98)], 0.99) == 10.0
    assert weighted_percentile([(10.0, 1), (1.0, 99)], 0.99) == 1.0


@pytest.mark.parametrize(
    ("span_ms", "width_ms"),
    [
        (0, 100),
        (59_899, 100),
        (59_900, 200),
        (3_600_000, 10_000),
        (30 * 86_400_000, 7_200_000),
        (400 * 86_400_000, 86_400_000),
    ],
)
def test_bucket_width_keeps_at_most_max_buckets(span_ms, width_ms):
    assert bucket_ms_for(span_ms) == width_ms
    rows = [row(span_ms * i // 1999, pending=1) for i in range(2000)]
    history = bucket_history(rows)
    assert len(history.buckets) <= MAX_BUCKETS
    assert history.bucket_seconds == width_ms / 1000
    assert sum(b.pending for b in history.buckets) == 2000


def test_buckets_hold_a_few_checkpoints_each():
    # 41 checkpoints over 10.6 s: not 107 buckets of 100 ms, most of them empty.
    rows = [row(i * 265, pending=1000) for i in range(41)]
    history = bucket_history(rows)
    assert history.bucket_seconds == 1 and len(history.buckets) == 11
    assert sum(b.checkpoints == 0 for b in history.buckets) == 0


def test_empty_log_gives_an_empty_history():
    history = bucket_history([])
    assert history.checkpoints == 0 and history.buckets == () and history.mean_decisions_per_second is None


def test_history_buckets_rates_latency_and_lag():
    rows = [
        row(0, "a", pending=80, declined=20, reasons={"declined:over_credit_limit": 20}, lag_messages=500),
        row(30, "b", pending=10, reasons={}, lag_messages=300, latency_p50_ms=5.0, latency_p99_ms=9.0),
        row(150, "a", pending=5, declined=5, reasons={"declined:location_too_far": 5}, lag_messages=100),
        # nothing in the third bucket: lag carried forward
        row(390, "b", pending=1, lag_messages=0, latency_p50_ms=50.0, latency_p99_ms=70.0, latency_max_ms=80.0),
    ]
    h = bucket_history(reversed(rows), width_ms=100)  # ordered by the function
    assert h.bucket_seconds == 0.1 and h.checkpoints == 4
    assert [b.t_ms - T0 for b in h.buckets] == [0, 100, 200, 300]
    assert [b.pending + b.declined for b in h.buckets] == [110, 10, 0, 1]
    assert [b.decisions_per_second for b in h.buckets] == [1100, 100, 0, 10]
    assert [b.lag_messages for b in h.buckets] == [800, 400, 400, 100]
    assert h.max_lag_messages == 800
    assert h.decisions == 121 and h.mean_decisions_per_second == pytest.approx(121 / 0.4)
    assert h.peak_decisions_per_second == 1100
    assert h.buckets[0].latency_p50_ms == 5.0 and h.buckets[3].latency_max_ms == 80.0
    assert h.buckets[2].latency_p50_ms is None
    # weighted by decisions, 10 vs 1: the median is the first's, the 99th percentile the second's
    assert h.latency_p50_ms == 5.0 and h.latency_p99_ms == 70.0 and h.latency_max_ms == 80.0
    mix = {(p.t_ms - T0, p.reason): p.count for p in h.reasons}
    assert mix == {
        (0, "pending"): 90,
        (0, "declined:over_credit_limit"): 20,
        (100, "pending"): 5,
        (100, "declined:location_too_far"): 5,
        (300, "pending"): 1,
    }


def test_rare_reasons_beyond_the_cap_are_summed_as_other():
    rows = [row(i, pending=1, reasons={f"rejected:r{i:03}": 1 + i}) for i in range(MAX_REASONS + 10)]
    h = bucket_history(rows)
    reasons = {p.reason for p in h.reasons}
    assert len(reasons) == MAX_REASONS + 1 and "other" in reasons
    assert "rejected:r000" not in reasons and f"rejected:r{MAX_REASONS + 9:03}" in reasons
    assert sum(p.count for p in h.reasons) == sum(1 + 1 + i for i in range(MAX_REASONS + 10))


def test_history_of_a_million_scale_log_stays_bounded():
    rows = checkpoint_rows(1_000_000, seconds=3 * 3600, per_checkpoint=1000)
    h = bucket_history(rows)
    assert h.checkpoints == 1_000 and len(h.buckets) <= MAX_BUCKETS
    decided = sum(r.pending + r.declined for r in rows)
    assert h.decisions == sum(b.pending + b.declined for b in h.buckets) == decided == 1_000_000 - 1_000_000 // 500


def test_utilization_histogram_bins_and_their_score_change():
    bins = utilization_histogram(
        [
            (Decimal("-5"), Decimal("100")),  # below 0
            (Decimal("0"), Decimal("100")),  # 0-5
            (Decimal("10"), Decimal("100")),  # 10-15 (10 itself gives +15 but the bin's interior +10)
            (Decimal("99.99"), Decimal("100")),  # 95-100
            (Decimal("100"), Decimal("100")),  # >= 100
            (Decimal("5"), Decimal("0")),  # no limit: left out
        ]
    )
    counts = {b.label: b.customers for b in bins if b.customers}
    assert counts == {"< 0": 1, "0-5": 1, "10-15": 1, "95-100": 1, ">= 100": 1}
    assert len(bins) == 22
    change = {b.label: b.score_change for b in bins}
    assert change["5-10"] == 15 and change["10-15"] == 10 and change["45-50"] == -5 and change["70-75"] == -25


def test_card_balance_check_counts_and_lists_mismatches():
    d = Decimal
    rows = [
        (1, d("10.00"), d("25.50"), d("15.50")),
        (2, d("0.00"), d("1.00"), d("0.99")),  # a cent off
        (3, d("5.00"), None, d("0.00")),  # missing from the settlement
    ] + [(10 + i, d("0"), d("1"), d("2")) for i in range(30)]
    check = check_card_balances(rows, max_listed=5)
    assert (check.cards, check.holding, check.mismatches) == (33, 1, 32)
    assert [m.card_id for m in check.listed] == [2, 3, 10, 11, 12]


def test_parse_reasons_tolerates_bad_json():
    assert parse_reasons('{"declined:x": 2, "y": 1.0, "z": "no", "b": true}') == {"declined:x": 2, "y": 1}
    assert parse_reasons("") == {} and parse_reasons("[1]") == {} and parse_reasons("{") == {}


def test_invariants_follow_the_facts():
    facts = synthetic_facts(10_000, 1_000)
    assert all(i.holds and i.checked for i in facts.invariants())
    names = [i.name for i in facts.invariants()]
    assert names == ["decided_equals_published", "settled_balance_equals_approved", "stream_batch_reconcile"]

    broken = replace(facts, undecided=3, card_balances=replace(facts.card_balances, holding=5, mismatches=1))
    first, balances, reconcile = broken.invariants()
    assert not first.holds and "3 not decided" in first.detail
    assert not balances.holds and reconcile.holds

    row = facts.reconciliation[0]
    off = replace(facts, reconciliation=(replace(row, batch_amount=row.batch_amount + Decimal("0.01")),))
    assert not off.invariants()[2].holds and "approved" in off.invariants()[2].detail
    recorded = replace(facts, reconciliation=(replace(row, recorded=row.batch_count - 1),))
    assert not recorded.invariants()[2].holds

    unsettled = replace(facts, settlement=None)
    assert [(i.holds, i.checked) for i in unsettled.invariants()] == [(True, True), (True, False), (True, False)]


def test_run_json_shape():
    document = synthetic_facts(10_000, 1_000, mismatches=2).to_json()
    assert document["totals"]["decided"] == 10_000
    assert document["stream"]["by_status"][0] == {"status": "pending", "count": 8_000, "amount": "123456789.12"}
    assert document["reconciliation"]["cards"]["listed"][0]["settled_balance"] == "250.00"
    assert document["invariants"][1]["holds"] is False
    assert document["history"]["start"].endswith("+00:00")
    assert stage_seconds_from_json(document) == {f"stage.{i}": 1.5 * i for i in range(12)}
    assert stage_seconds_from_json(
        {"stages": [{"stage": "x", "seconds": "1"}, "bad", {"stage": "y", "seconds": 2}]}
    ) == {"y": 2.0}
