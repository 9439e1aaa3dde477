"""Synthetic run facts of a given scale, for the size bound and the browser's rendering of large pages."""

from __future__ import annotations

import random
from decimal import Decimal

from cardpipe.report.facts import (
    CardBalanceCheck,
    CardMismatch,
    CardTypeLimits,
    CheckpointRow,
    ReasonCount,
    ReconciliationRow,
    RunFacts,
    SettlementInfo,
    StatusTotal,
    bucket_history,
    utilization_histogram,
)

DECLINE_REASONS = ("amount_over_half_limit", "location_too_far", "over_credit_limit")
REJECTION_REASONS = ("not_json", "missing_field", "bad_amount", "unknown_card", "duplicate_conflict", "bad_timestamp")


def checkpoint_rows(
    transactions: int, *, seconds: float, per_checkpoint: int = 5000, owners: int = 2, start_ms: int = 1_790_000_000_000
) -> list[CheckpointRow]:
    """Checkpoints deciding ``transactions`` over ``seconds``, spread over ``owners`` consumers."""
    rng = random.Random(7)
    rows = []
    n = max(1, transactions // per_checkpoint)
    left = transactions
    for i in range(n):
        messages = left if i == n - 1 else per_checkpoint
        left -= messages
        declined = messages // 5
        rejected = messages // 500
        pending = messages - declined - rejected
        reasons = {f"declined:{r}": declined // 3 for r in DECLINE_REASONS}
        reasons.update({f"rejected:{r}": rejected // len(REJECTION_REASONS) for r in REJECTION_REASONS})
        p50 = 20 + rng.random() * 30
        rows.append(
            CheckpointRow(
                committed_ms=start_ms + int(i * seconds * 1000 / n),
                owner=f"host:{100 + i % owners}:0",
                messages=messages,
                pending=pending,
                declined=declined,
                rejected=rejected,
                duplicates=0,
                reasons=reasons,
                latency_p50_ms=p50,
                latency_p99_ms=p50 * 3,
                latency_max_ms=p50 * 4,
                lag_messages=max(0, transactions - (i + 1) * per_checkpoint) // owners,
            )
        )
    return rows


def synthetic_facts(
    transactions: int = 1_000_000, customers: int = 100_000, *, mismatches: int = 0, card_types: int = 12
) -> RunFacts:
    """Facts of a run of this size: every bounded series at its largest (a 10-minute stream, many reasons)."""
    cards = customers * 18 // 10
    history = bucket_history(checkpoint_rows(transactions, seconds=600, per_checkpoint=500, owners=4))
    pending, declined, rejected = transactions * 8 // 10, transactions * 19 // 100, transactions // 100
    rng = random.Random(3)
    utilization = utilization_histogram(
        (Decimal(rng.randint(-100, 15_000)), Decimal(10_000)) for _ in range(min(customers, 20_000))
    )
    money = Decimal("123456789.12")
    return RunFacts(
        generated_at="2026-12-03T10:00:00+00:00",
        database="sqlite:////results/cardpipe.db",
        transactions=transactions,
        cards=cards,
        customers=customers,
        undecided=0,
        rejected_messages=rejected,
        stream=(
            StatusTotal("pending", pending, money),
            StatusTotal("declined", declined, money),
            StatusTotal("rejected", rejected, Decimal("0.00")),
        ),
        reasons=tuple(ReasonCount(r, "declined", declined // 3) for r in DECLINE_REASONS)
        + tuple(ReasonCount(r, "rejected", rejected // 6) for r in REJECTION_REASONS),
        history=history,
        settlement=SettlementInfo(
            settlement_id=1,
            engine="embedded",
            started_at="2026-12-03 10:00:00",
            finished_at="2026-12-03 10:00:09",
            counts={"transactions": transactions, "approved": pending, "declined": declined, "rejected": rejected},
            watermark={p: 100 for p in range(8)},
        ),
        reconciliation=(
            ReconciliationRow("approved", "pending", pending, money, 0, Decimal("0.00"), pending, money, pending),
            ReconciliationRow("declined", "declined", declined, money, 0, Decimal("0.00"), declined, money, declined),
            ReconciliationRow("rejected", "rejected", rejected, Decimal(0), 0, Decimal(0), rejected, Decimal(0), None),
        ),
        card_balances=CardBalanceCheck(
            cards=cards,
            holding=cards - mismatches,
            mismatches=mismatches,
            listed=tuple(
                CardMismatch(10_000 + i, Decimal("100.00"), Decimal("250.00"), Decimal("140.00"))
                for i in range(min(mismatches, 20))
            ),
        ),
        utilization=utilization,
        score_changes=tuple((change, customers // 12) for change in range(-25, 16)),
        limits_by_card_type=tuple(CardTypeLimits(f"Type {i}", cards // card_types, i * 100) for i in range(card_types)),
        stage_seconds=tuple((f"stage.{i}", 1.5 * i) for i in range(12)),
    )
