"""The run's facts: what the stream decided, what the settlement in force made of it, and the invariants.

:func:`gather_facts` reads them from the serving database (read-only SQLAlchemy Core queries, one snapshot)
and the optional stage timings the command measured; everything else here is pure: the stream's history
bucketed in time, the utilization histogram, the per-card balance check. Every series is bounded
(buckets, bins, categories, a few listed exceptions): never one row per transaction or per card, so the
report stays small at any size. :meth:`RunFacts.to_json` is ``results/run.json``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, case, cast, column, func, select, table

from cardpipe.domain.money import CENT, from_cents
from cardpipe.domain.records import APPROVED, DECLINED, PENDING, REJECTED, response_code
from cardpipe.domain.settlement import SCORE_CHANGE_ABOVE, SCORE_STEPS
from cardpipe.serving import schema
from cardpipe.serving.views import read_snapshot

#: run.json's format version.
FORMAT = 1
#: At most this many time buckets in the stream's history (the bucket width adapts to the run's length).
MAX_BUCKETS = 600
#: Bucket widths to choose from, in milliseconds (doubled beyond the last).
BUCKET_STEPS_MS: tuple[int, ...] = (
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
)
BUCKET_STEPS_MS += (900_000, 1_800_000, 3_600_000, 7_200_000, 21_600_000, 43_200_000, 86_400_000)
#: At most this many cards that break the balance invariant are listed (all are counted).
MAX_LISTED_MISMATCHES = 20
#: At most this many reasons are kept per bucket of the decision mix; the rest are summed as "other".
MAX_REASONS = 24
#: Utilization histogram: bins of this width (percent) from 0 to 100, plus one below and one above.
UTILIZATION_BIN = 5
#: Category of the decision mix for decisions without a reason.
PENDING_CATEGORY = "pending"
_ZERO = Decimal("0.00")


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class StatusTotal:
    """How many decisions have a status, and their amount."""

    status: str
    count: int
    amount: Decimal


@dataclass(frozen=True)
class ReasonCount:
    """A decline reason (``kind`` declined) or a rejection reason of a message (``kind`` rejected)."""

    reason: str
    kind: str
    count: int


@dataclass(frozen=True)
class CheckpointRow:
    """One row of ``stream_checkpoint_log``: what a committed checkpoint did."""

    committed_ms: int
    owner: str
    messages: int
    pending: int
    declined: int
    rejected: int
    duplicates: int
    reasons: Mapping[str, int]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    lag_messages: int | None


@dataclass(frozen=True)
class Bucket:
    """The checkpoints committed in ``[t_ms, t_ms + width)``; lag is the consumers' last one (carried forward)."""

    t_ms: int
    checkpoints: int
    messages: int
    pending: int
    declined: int
    rejected: int
    duplicates: int
    decisions_per_second: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    lag_messages: int | None


@dataclass(frozen=True)
class ReasonPoint:
    """How many decisions of one category (a reason, or pending) a bucket holds."""

    t_ms: int
    reason: str
    count: int


@dataclass(frozen=True)
class StreamHistory:
    """The stream over time, from the checkpoint log, in at most :data:`MAX_BUCKETS` buckets."""

    checkpoints: int = 0
    bucket_seconds: float = 1.0
    start_ms: int | None = None
    end_ms: int | None = None
    decisions: int = 0
    mean_decisions_per_second: float | None = None
    peak_decisions_per_second: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    max_lag_messages: int | None = None
    buckets: tuple[Bucket, ...] = ()
    reasons: tuple[ReasonPoint, ...] = ()


@dataclass(frozen=True)
class ReconciliationRow:
    """One status: the stream's decisions, those after the watermark in force, and the batch's.

    The stream's ``stream_status`` (pending) becomes the batch's ``status`` (approved); the rest keep theirs.
    ``recorded`` is the count the settlement itself recorded (``settlements``), None before any.
    """

    status: str
    stream_status: str
    stream_count: int
    stream_amount: Decimal
    after_watermark_count: int
    after_watermark_amount: Decimal
    batch_count: int
    batch_amount: Decimal
    recorded: int | None

    @property
    def holds(self) -> bool:
        counts = self.stream_count - self.after_watermark_count == self.batch_count
        amounts = self.stream_amount - self.after_watermark_amount == self.batch_amount
        recorded = self.recorded is None or self.recorded == self.batch_count
        return counts and amounts and recorded


@dataclass(frozen=True)
class CardMismatch:
    """A card whose settled balance is not its original balance plus its approved amounts."""

    card_id: int
    original_balance: Decimal
    settled_balance: Decimal | None  # None: the settlement lacks the card
    approved_amount: Decimal


@dataclass(frozen=True)
class CardBalanceCheck:
    """Per card: settled balance - original balance = the sum of its approved amounts."""

    cards: int = 0
    holding: int = 0
    mismatches: int = 0
    listed: tuple[CardMismatch, ...] = ()


@dataclass(frozen=True)
class UtilizationBin:
    """Customers whose utilization (settled balances / original limits, %) is in ``[low, high)``."""

    label: str
    low: float | None
    high: float | None
    customers: int
    score_change: int  # what SPEC §4 gives for the bin (its low end; the bins align with the steps)


@dataclass(frozen=True)
class CardTypeLimits:
    """A card type's cards and how many of them the settlement in force lowered the limit of."""

    card_type: str
    cards: int
    lowered: int


@dataclass(frozen=True)
class Invariant:
    """A property the run must have. ``checked`` False: nothing to check yet (``holds`` is then True)."""

    name: str
    holds: bool
    checked: bool
    detail: str


@dataclass(frozen=True)
class SettlementInfo:
    """The settlement in force (its ``settlements`` row and watermark)."""

    settlement_id: int
    engine: str
    started_at: str | None
    finished_at: str | None
    counts: Mapping[str, int | None]
    watermark: Mapping[int, int]


@dataclass(frozen=True)
class RunFacts:
    """Everything the report shows; :meth:`to_json` is ``results/run.json``."""

    generated_at: str
    database: str
    transactions: int
    cards: int
    customers: int
    undecided: int
    rejected_messages: int
    stream: tuple[StatusTotal, ...]
    reasons: tuple[ReasonCount, ...]
    history: StreamHistory
    settlement: SettlementInfo | None
    reconciliation: tuple[ReconciliationRow, ...]
    card_balances: CardBalanceCheck
    utilization: tuple[UtilizationBin, ...]
    score_changes: tuple[tuple[int, int], ...]  # (settled score - original, customers)
    limits_by_card_type: tuple[CardTypeLimits, ...]
    stage_seconds: tuple[tuple[str, float], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(s.count for s in self.stream if s.status == status)

    @property
    def decided(self) -> int:
        """Transactions of the ``transactions`` table with a decision."""
        return self.transactions - self.undecided

    def invariants(self) -> tuple[Invariant, ...]:
        """decided = published; per card, settled - original = approved; stream and batch reconcile."""
        published = Invariant(
            "decided_equals_published",
            holds=self.undecided == 0,
            checked=True,
            detail=f"{self.transactions:,} published, {self.decided:,} decided, {self.undecided:,} not decided",
        )
        if self.settlement is None:
            none = "no settlement in force yet"
            return (
                published,
                Invariant("settled_balance_equals_approved", True, False, none),
                Invariant("stream_batch_reconcile", True, False, none),
            )
        cb = self.card_balances
        balances = Invariant(
            "settled_balance_equals_approved",
            holds=cb.mismatches == 0,
            checked=True,
            detail=f"{cb.holding:,} of {cb.cards:,} cards hold it, {cb.mismatches:,} do not",
        )
        broken = [r.status for r in self.reconciliation if not r.holds]
        reconcile = Invariant(
            "stream_batch_reconcile",
            holds=not broken,
            checked=True,
            detail="every status reconciles" if not broken else "differs for " + ", ".join(broken),
        )
        return published, balances, reconcile

    def to_json(self) -> dict[str, Any]:
        """JSON-ready facts: money as decimal strings with two decimals, times as ISO 8601 UTC."""
        h = self.history
        return {
            "format": FORMAT,
            "generated_at": self.generated_at,
            "database": self.database,
            "totals": {
                "transactions": self.transactions,
                "decided": self.decided,
                "undecided": self.undecided,
                "pending": self.count(PENDING),
                "declined": self.count(DECLINED),
                "rejected": self.count(REJECTED),
                "rejected_messages": self.rejected_messages,
                "cards": self.cards,
                "customers": self.customers,
            },
            "stream": {
                "by_status": [{"status": s.status, "count": s.count, "amount": _money(s.amount)} for s in self.stream],
                "reasons": [
                    {
                        "reason": r.reason,
                        "kind": r.kind,
                        "response_code": response_code(r.kind, r.reason),
                        "count": r.count,
                    }
                    for r in self.reasons
                ],
            },
            "history": {
                "checkpoints": h.checkpoints,
                "bucket_seconds": h.bucket_seconds,
                "start": _iso_ms(h.start_ms),
                "end": _iso_ms(h.end_ms),
                "decisions": h.decisions,
                "decisions_per_second": {
                    "mean": _round(h.mean_decisions_per_second, 1),
                    "peak": _round(h.peak_decisions_per_second, 1),
                },
                "latency_ms": {
                    "p50": _round(h.latency_p50_ms, 1),
                    "p99": _round(h.latency_p99_ms, 1),
                    "max": _round(h.latency_max_ms, 1),
                },
                "max_lag_messages": h.max_lag_messages,
                "buckets": [
                    {
                        "t": b.t_ms,
                        "checkpoints": b.checkpoints,
                        "messages": b.messages,
                        "pending": b.pending,
                        "declined": b.declined,
                        "rejected": b.rejected,
                        "duplicates": b.duplicates,
                        "decisions_per_second": _round(b.decisions_per_second, 2),
                        "latency_p50_ms": _round(b.latency_p50_ms, 2),
                        "latency_p99_ms": _round(b.latency_p99_ms, 2),
                        "latency_max_ms": _round(b.latency_max_ms, 2),
                        "lag_messages": b.lag_messages,
                    }
                    for b in h.buckets
                ],
                "reasons": [{"t": p.t_ms, "reason": p.reason, "count": p.count} for p in h.reasons],
            },
            "stages": [{"stage": name, "seconds": round(seconds, 3)} for name, seconds in self.stage_seconds],
            "settlement": None
            if self.settlement is None
            else {
                "settlement_id": self.settlement.settlement_id,
                "engine": self.settlement.engine,
                "started_at": self.settlement.started_at,
                "finished_at": self.settlement.finished_at,
                "counts": dict(self.settlement.counts),
                "watermark": {str(p): seq for p, seq in sorted(self.settlement.watermark.items())},
            },
            "reconciliation": {
                "statuses": [
                    {
                        "status": r.status,
                        "stream_status": r.stream_status,
                        "stream_count": r.stream_count,
                        "stream_amount": _money(r.stream_amount),
                        "after_watermark_count": r.after_watermark_count,
                        "after_watermark_amount": _money(r.after_watermark_amount),
                        "batch_count": r.batch_count,
                        "batch_amount": _money(r.batch_amount),
                        "recorded": r.recorded,
                        "holds": r.holds,
                    }
                    for r in self.reconciliation
                ],
                "cards": {
                    "checked": self.card_balances.cards,
                    "holding": self.card_balances.holding,
                    "mismatches": self.card_balances.mismatches,
                    "listed": [
                        {
                            "card_id": m.card_id,
                            "original_balance": _money(m.original_balance),
                            "settled_balance": _money(m.settled_balance),
                            "approved_amount": _money(m.approved_amount),
                        }
                        for m in self.card_balances.listed
                    ],
                },
            },
            "utilization": [
                {"bin": b.label, "low": b.low, "high": b.high, "customers": b.customers, "score_change": b.score_change}
                for b in self.utilization
            ],
            "score_changes": [{"change": change, "customers": n} for change, n in self.score_changes],
            "limits_lowered_by_card_type": [
                {"card_type": t.card_type, "cards": t.cards, "lowered": t.lowered} for t in self.limits_by_card_type
            ],
            "invariants": [
                {"name": i.name, "holds": i.holds, "checked": i.checked, "detail": i.detail} for i in self.invariants()
            ],
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


def _money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    value = value.quantize(CENT)
    return str(value.copy_abs() if value.is_zero() else value)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------- pure helpers
def weighted_percentile(pairs: Iterable[tuple[float, int]], q: float) -> float | None:
    """The ``q`` (0..1) percentile of values weighted by counts: the smallest value whose cumulative weight
    reaches ``q`` of the total. None without any positive weight."""
    points = sorted((v, w) for v, w in pairs if w > 0)
    total = sum(w for _, w in points)
    if total == 0:
        return None
    target = q * total
    seen = 0
    for value, weight in points:
        seen += weight
        if seen >= target:
            return value
    return points[-1][0]


def bucket_ms_for(span_ms: int, max_buckets: int = MAX_BUCKETS) -> int:
    """The smallest of :data:`BUCKET_STEPS_MS` (then doublings) with which ``span_ms`` (plus the first
    bucket's offset) fits in ``max_buckets`` buckets."""
    width = BUCKET_STEPS_MS[0]
    steps = iter(BUCKET_STEPS_MS)
    while True:
        nxt = next(steps, None)
        width = nxt if nxt is not None else width * 2
        if span_ms // width + 2 <= max_buckets:
            return width


def bucket_history(
    rows: Iterable[CheckpointRow], max_buckets: int = MAX_BUCKETS, *, width_ms: int | None = None
) -> StreamHistory:
    """The checkpoint log (ordered by commit time) as a bounded history.

    Decisions are pending + declined. Per bucket, the latency percentiles are the checkpoints' own,
    combined weighted by their messages (p50: weighted median of the checkpoints' p50; p99: weighted 99th
    percentile of their p99; max: the maximum): an approximation, exact percentiles would need every
    decision's latency. Lag: per consumer its last reported value, summed over consumers. The mean rate is
    the decisions over the buckets' whole time (first to last bucket, as the chart shows them).
    """
    ordered = sorted(rows, key=lambda r: r.committed_ms)
    if not ordered:
        return StreamHistory()
    start, end = ordered[0].committed_ms, ordered[-1].committed_ms
    # No finer than about two checkpoints a bucket: a rate per bucket needs commits to average over.
    if width_ms is None:
        width_ms = bucket_ms_for(end - start, max(2, min(max_buckets, len(ordered) // 2)))
    width = width_ms / 1000
    origin = start - start % width_ms
    n = (end - origin) // width_ms + 1
    per_bucket: list[list[CheckpointRow]] = [[] for _ in range(n)]
    for row in ordered:
        per_bucket[(row.committed_ms - origin) // width_ms].append(row)

    reason_totals: dict[str, int] = defaultdict(int)
    for row in ordered:
        reason_totals[PENDING_CATEGORY] += row.pending
        for reason, count in row.reasons.items():
            reason_totals[reason] += count
    ranked = sorted(reason_totals, key=lambda r: (-reason_totals[r], r))
    kept = set(ranked[:MAX_REASONS])

    lag_by_owner: dict[str, int] = {}
    buckets: list[Bucket] = []
    points: list[ReasonPoint] = []
    for i, group in enumerate(per_bucket):
        t_ms = origin + i * width_ms
        decisions = sum(r.pending + r.declined for r in group)
        for r in group:
            if r.lag_messages is not None:
                lag_by_owner[r.owner] = r.lag_messages
        mix: dict[str, int] = defaultdict(int)
        for r in group:
            mix[PENDING_CATEGORY] += r.pending
            for reason, count in r.reasons.items():
                mix[reason if reason in kept else "other"] += count
        points.extend(ReasonPoint(t_ms, reason, count) for reason, count in sorted(mix.items()) if count)
        buckets.append(
            Bucket(
                t_ms=t_ms,
                checkpoints=len(group),
                messages=sum(r.messages for r in group),
                pending=sum(r.pending for r in group),
                declined=sum(r.declined for r in group),
                rejected=sum(r.rejected for r in group),
                duplicates=sum(r.duplicates for r in group),
                decisions_per_second=decisions / width,
                latency_p50_ms=weighted_percentile(_latencies(group, "latency_p50_ms"), 0.5),
                latency_p99_ms=weighted_percentile(_latencies(group, "latency_p99_ms"), 0.99),
                latency_max_ms=max((r.latency_max_ms for r in group if r.latency_max_ms is not None), default=None),
                lag_messages=sum(lag_by_owner.values()) if lag_by_owner else None,
            )
        )
    decisions = sum(b.pending + b.declined for b in buckets)
    lags = [b.lag_messages for b in buckets if b.lag_messages is not None]
    return StreamHistory(
        checkpoints=len(ordered),
        bucket_seconds=width,
        start_ms=start,
        end_ms=end,
        decisions=decisions,
        mean_decisions_per_second=decisions / (len(buckets) * width),
        peak_decisions_per_second=max(b.decisions_per_second for b in buckets),
        latency_p50_ms=weighted_percentile(_latencies(ordered, "latency_p50_ms"), 0.5),
        latency_p99_ms=weighted_percentile(_latencies(ordered, "latency_p99_ms"), 0.99),
        latency_max_ms=max((r.latency_max_ms for r in ordered if r.latency_max_ms is not None), default=None),
        max_lag_messages=max(lags) if lags else None,
        buckets=tuple(buckets),
        reasons=tuple(points),
    )


def _latencies(rows: Iterable[CheckpointRow], name: str) -> list[tuple[float, int]]:
    pairs = []
    for r in rows:
        value = getattr(r, name)
        if value is not None:
            pairs.append((float(value), max(r.pending + r.declined + r.rejected, 1)))
    return pairs


def _score_change_for(utilization: float) -> int:
    for bound, change in SCORE_STEPS:
        if utilization <= bound:
            return change
    return SCORE_CHANGE_ABOVE


def utilization_histogram(per_customer: Iterable[tuple[Decimal, Decimal]]) -> tuple[UtilizationBin, ...]:
    """Customers by utilization (balance sum / limit sum × 100) in :data:`UTILIZATION_BIN`-wide bins,
    one bin below 0 and one at 100 and above. A customer whose cards have no limit is left out."""
    edges = list(range(0, 100 + UTILIZATION_BIN, UTILIZATION_BIN))
    counts = [0] * (len(edges) + 1)  # below 0, the bins, 100 and above
    for balance, limit in per_customer:
        if limit <= 0:
            continue
        used = balance * 100 / limit
        if used < 0:
            counts[0] += 1
        elif used >= 100:
            counts[-1] += 1
        else:
            counts[1 + int(used // UTILIZATION_BIN)] += 1
    bins = [UtilizationBin("< 0", None, 0.0, counts[0], _score_change_for(-1))]
    for i, low in enumerate(edges[:-1]):
        high = low + UTILIZATION_BIN
        # The bin [low, high) meets SPEC's inclusive bounds at ``high`` only: labelled by its interior.
        bins.append(
            UtilizationBin(f"{low}-{high}", float(low), float(high), counts[1 + i], _score_change_for(low + 1e-9))
        )
    bins.append(UtilizationBin(">= 100", 100.0, None, counts[-1], _score_change_for(100)))
    return tuple(bins)


def check_card_balances(
    rows: Iterable[tuple[int, Decimal, Decimal | None, Decimal]], max_listed: int = MAX_LISTED_MISMATCHES
) -> CardBalanceCheck:
    """(card_id, original balance, settled balance or None, approved amount) rows -> the invariant's result."""
    cards = holding = 0
    listed: list[CardMismatch] = []
    for card_id, original, settled, approved in rows:
        cards += 1
        if settled is not None and settled - original == approved:
            holding += 1
        elif len(listed) < max_listed:
            listed.append(CardMismatch(card_id, original, settled, approved))
    return CardBalanceCheck(cards=cards, holding=holding, mismatches=cards - holding, listed=tuple(listed))


def parse_reasons(text: str | None) -> dict[str, int]:
    """The checkpoint log's reasons JSON (reason -> count); anything unreadable counts as none."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------- queries
_s = schema.stream_transactions
_log = schema.stream_checkpoint_log
_batch = table(schema.BATCH_TRANSACTIONS, column("card_id"), column("status"), column("amount"))
_cards_updated = table(
    schema.CARDS_UPDATED, column("card_id"), column("customer_id"), column("credit_limit"), column("current_balance")
)
_customers_updated = table(schema.CUSTOMERS_UPDATED, column("customer_id"), column("credit_score"))
#: The batch's status for each stream status (SPEC §4 rule 1), in the reconciliation table's order.
_STATUSES = ((APPROVED, PENDING), (DECLINED, DECLINED), (REJECTED, REJECTED))


def _cents(col: Any) -> Any:
    """SUM of a money column as integer cents, exact on SQLite too (it stores DECIMAL as REAL)."""
    return func.sum(cast(func.round(col * 100), BigInteger))


def _from_cents(value: Any) -> Decimal:
    return from_cents(int(value)) if value is not None else _ZERO


def _dec(value: Any) -> Decimal:
    return value.quantize(CENT) if isinstance(value, Decimal) else Decimal(str(value)).quantize(CENT)


def _by_status(conn: Connection, query: Any) -> dict[str, tuple[int, Decimal]]:
    return {row[0]: (int(row[1]), _from_cents(row[2])) for row in conn.execute(query)}


def _when(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def read_checkpoint_log(conn: Connection, since_ms: int | None = None) -> list[CheckpointRow]:
    """The rows of ``stream_checkpoint_log`` in commit order: every one, or those committed at ``since_ms`` or
    later."""
    query = select(
        _log.c.committed_ms,
        _log.c.owner,
        _log.c.messages,
        _log.c.pending,
        _log.c.declined,
        _log.c.rejected,
        _log.c.duplicates,
        _log.c.reasons,
        _log.c.latency_p50_ms,
        _log.c.latency_p99_ms,
        _log.c.latency_max_ms,
        _log.c.lag_messages,
    ).order_by(_log.c.committed_ms, _log.c.checkpoint_id)
    if since_ms is not None:
        query = query.where(_log.c.committed_ms >= since_ms)
    return [
        CheckpointRow(
            committed_ms=int(r.committed_ms),
            owner=r.owner,
            messages=int(r.messages),
            pending=int(r.pending),
            declined=int(r.declined),
            rejected=int(r.rejected),
            duplicates=int(r.duplicates),
            reasons=parse_reasons(r.reasons),
            latency_p50_ms=r.latency_p50_ms,
            latency_p99_ms=r.latency_p99_ms,
            latency_max_ms=r.latency_max_ms,
            lag_messages=None if r.lag_messages is None else int(r.lag_messages),
        )
        for r in conn.execute(query)
    ]


def _count(conn: Connection, t: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(t)).scalar_one())


def _settlement(conn: Connection) -> SettlementInfo | None:
    p, st, w = schema.serving_state, schema.settlements, schema.settlement_watermarks
    sid = conn.execute(select(p.c.settlement_id).where(p.c.id == schema.SERVING_STATE_ID)).scalar()
    if sid is None:
        return None
    row = conn.execute(select(st).where(st.c.settlement_id == sid)).first()
    watermark = {
        int(r.kafka_partition): int(r.checkpoint_seq)
        for r in conn.execute(select(w.c.kafka_partition, w.c.checkpoint_seq).where(w.c.settlement_id == sid))
    }
    names: tuple[str, ...] = ("transactions", "approved", "declined", "rejected", "cards", "customers")
    names += ("cards_limit_lowered", "customers_score_down")
    counts = {n: (None if row is None or row._mapping[n] is None else int(row._mapping[n])) for n in names}
    return SettlementInfo(
        settlement_id=int(sid),
        engine=row.engine if row is not None else "",
        started_at=_when(row.started_at) if row is not None else None,
        finished_at=_when(row.finished_at) if row is not None else None,
        counts=counts,
        watermark=watermark,
    )


def _reconciliation(conn: Connection, settlement: SettlementInfo) -> tuple[ReconciliationRow, ...]:
    p, w = schema.serving_state, schema.settlement_watermarks
    stream = _by_status(conn, select(_s.c.status, func.count(), _cents(_s.c.amount)).group_by(_s.c.status))
    # Decisions beyond the watermark in force (a partition the watermark lacks: every decision of it).
    after = (
        select(_s.c.status, func.count(), _cents(_s.c.amount))
        .select_from(
            _s.join(p, p.c.id == schema.SERVING_STATE_ID).outerjoin(
                w, (w.c.settlement_id == p.c.settlement_id) & (w.c.kafka_partition == _s.c.kafka_partition)
            )
        )
        .where(w.c.checkpoint_seq.is_(None) | (_s.c.checkpoint_seq > w.c.checkpoint_seq))
        .group_by(_s.c.status)
    )
    beyond = _by_status(conn, after)
    batch = _by_status(conn, select(_batch.c.status, func.count(), _cents(_batch.c.amount)).group_by(_batch.c.status))
    none = (0, _ZERO)
    rows = []
    for status, stream_status in _STATUSES:
        rows.append(
            ReconciliationRow(
                status=status,
                stream_status=stream_status,
                stream_count=stream.get(stream_status, none)[0],
                stream_amount=stream.get(stream_status, none)[1],
                after_watermark_count=beyond.get(stream_status, none)[0],
                after_watermark_amount=beyond.get(stream_status, none)[1],
                batch_count=batch.get(status, none)[0],
                batch_amount=batch.get(status, none)[1],
                recorded=settlement.counts.get(status),
            )
        )
    return tuple(rows)


def _card_balances(conn: Connection) -> CardBalanceCheck:
    c = schema.cards
    approved = (
        select(_batch.c.card_id, _cents(_batch.c.amount).label("cents"))
        .where(_batch.c.status == APPROVED)
        .group_by(_batch.c.card_id)
        .subquery("a")
    )
    query = (
        select(c.c.card_id, c.c.current_balance, _cards_updated.c.current_balance.label("settled"), approved.c.cents)
        .select_from(
            c.outerjoin(_cards_updated, _cards_updated.c.card_id == c.c.card_id).outerjoin(
                approved, approved.c.card_id == c.c.card_id
            )
        )
        .order_by(c.c.card_id)
    )
    rows = (
        (int(r.card_id), _dec(r.current_balance), None if r.settled is None else _dec(r.settled), _from_cents(r.cents))
        for r in conn.execute(query)
    )
    return check_card_balances(rows)


def _utilization(conn: Connection) -> tuple[UtilizationBin, ...]:
    c = schema.cards
    query = (
        select(_cents(_cards_updated.c.current_balance), _cents(c.c.credit_limit))
        .select_from(c.join(_cards_updated, _cards_updated.c.card_id == c.c.card_id))
        .group_by(c.c.customer_id)
    )
    return utilization_histogram((_from_cents(r[0]), _from_cents(r[1])) for r in conn.execute(query))


def _score_changes(conn: Connection) -> tuple[tuple[int, int], ...]:
    cu, c = _customers_updated, schema.customers
    change = (cu.c.credit_score - c.c.credit_score).label("change")
    query = (
        select(change, func.count())
        .select_from(cu.join(c, c.c.customer_id == cu.c.customer_id))
        .group_by(change)
        .order_by(change)
    )
    return tuple((int(r[0]), int(r[1])) for r in conn.execute(query))


def _limits_by_card_type(conn: Connection) -> tuple[CardTypeLimits, ...]:
    c, t = schema.cards, schema.credit_card_types
    lowered = func.sum(case((_cards_updated.c.credit_limit < c.c.credit_limit, 1), else_=0))
    query = (
        select(t.c.name, func.count(), lowered)
        .select_from(
            c.join(_cards_updated, _cards_updated.c.card_id == c.c.card_id).join(
                t, t.c.card_type_id == c.c.card_type_id
            )
        )
        .group_by(t.c.card_type_id, t.c.name)
        .order_by(t.c.card_type_id)
    )
    return tuple(CardTypeLimits(r[0], int(r[1]), int(r[2] or 0)) for r in conn.execute(query))


def gather_facts(
    engine: Engine,
    stage_seconds: Mapping[str, float] | None = None,
    *,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> RunFacts:
    """Read the run's facts from the serving database in one read snapshot (read-only).

    ``stage_seconds``: how long each stage took (``{"load": 0.4, "batch.read": 1.2, …}``), as the command
    measured it; the database does not hold them. ``extra``: anything JSON-ready to carry into run.json.
    """
    c = schema.cards
    with engine.connect() as conn, read_snapshot(conn):
        transactions = _count(conn, schema.transactions)
        undecided = int(
            conn.execute(
                select(func.count())
                .select_from(
                    schema.transactions.outerjoin(_s, _s.c.transaction_id == schema.transactions.c.transaction_id)
                )
                .where(_s.c.transaction_id.is_(None))
            ).scalar_one()
        )
        stream = _by_status(conn, select(_s.c.status, func.count(), _cents(_s.c.amount)).group_by(_s.c.status))
        declines = conn.execute(
            select(_s.c.decline_reason, func.count()).where(_s.c.status == DECLINED).group_by(_s.c.decline_reason)
        ).all()
        r = schema.rejected_transactions
        rejections = conn.execute(select(r.c.reason, func.count()).group_by(r.c.reason)).all()
        history = bucket_history(read_checkpoint_log(conn))
        settlement = _settlement(conn)
        if settlement is not None:
            reconciliation = _reconciliation(conn, settlement)
            balances = _card_balances(conn)
            utilization = _utilization(conn)
            score_changes = _score_changes(conn)
            limits = _limits_by_card_type(conn)
        else:
            reconciliation, balances, utilization, score_changes, limits = (), CardBalanceCheck(), (), (), ()
        cards, customers = _count(conn, c), _count(conn, schema.customers)
    reasons = [ReasonCount(str(reason or ""), DECLINED, int(n)) for reason, n in declines]
    reasons += [ReasonCount(str(reason), REJECTED, int(n)) for reason, n in rejections]
    reasons.sort(key=lambda x: (x.kind, -x.count, x.reason))
    order = {PENDING: 0, DECLINED: 1, REJECTED: 2}
    return RunFacts(
        generated_at=(now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        database=engine.url.render_as_string(hide_password=True),
        transactions=transactions,
        cards=cards,
        customers=customers,
        undecided=undecided,
        rejected_messages=sum(x.count for x in reasons if x.kind == REJECTED),
        stream=tuple(
            StatusTotal(status, n, amount)
            for status, (n, amount) in sorted(stream.items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))
        ),
        reasons=tuple(reasons),
        history=history,
        settlement=settlement,
        reconciliation=reconciliation,
        card_balances=balances,
        utilization=utilization,
        score_changes=score_changes,
        limits_by_card_type=limits,
        stage_seconds=tuple((str(k), float(v)) for k, v in (stage_seconds or {}).items()),
        extra=dict(extra or {}),
    )


def stage_seconds_from_json(document: Mapping[str, Any]) -> dict[str, float]:
    """The stage timings of an earlier run.json (``cardpipe report`` carries them over)."""
    stages: Sequence[Any] = document.get("stages") or []
    out: dict[str, float] = {}
    for item in stages:
        if isinstance(item, Mapping) and isinstance(item.get("stage"), str):
            seconds = item.get("seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                out[item["stage"]] = float(seconds)
    return out
