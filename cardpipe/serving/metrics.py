"""The stream's and the batch's Prometheus metrics, read from the serving database.

Every consumer (in the service's process or in worker processes, on this host or others) writes one
``stream_checkpoint_log`` row per checkpoint, in the checkpoint's transaction; settlements have their rows in
``settlements``. The metrics are sums over those rows, so they count exactly what is committed, whatever the
number of consumer processes, and survive restarts. Lag per partition is what the running service measured
last (its ``status()``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from cardpipe.errors import DatabaseUnavailable
from cardpipe.serving import schema
from cardpipe.stream.checkpoints import LATENCY_BUCKETS_MS

#: How long one reading of the tables serves scrapes.
METRICS_TTL_SECONDS = 1.0

#: Buckets (seconds) of the settlement duration histogram.
SETTLEMENT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

StatusFn = Callable[[], Mapping[str, Any] | None]


class StreamReading:
    """One reading of the checkpoint log and the settlements: the sums the metrics report."""

    def __init__(self) -> None:
        self.decisions: Counter[tuple[str, str]] = Counter()  # (status, reason) -> n
        self.rejected: Counter[str] = Counter()  # reason -> n
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_ms = 0.0
        self.newest_publish_ms: int | None = None
        self.settlements: Counter[str] = Counter()  # status -> n
        self.settlement_seconds: list[float] = []


def read_stream(engine: Engine) -> StreamReading:
    """Sum the checkpoint log and the settlements (one pass over each)."""
    log, st = schema.stream_checkpoint_log, schema.settlements
    reading = StreamReading()
    with engine.connect() as conn:
        rows = conn.execute(
            select(log.c.pending, log.c.reasons, log.c.latency_buckets, log.c.latency_sum_ms, log.c.newest_publish_ms)
        )
        for pending, reasons, buckets, latency_sum, newest in rows:
            reading.decisions["pending", ""] += pending
            for key, n in json.loads(reasons).items():
                kind, _, reason = key.partition(":")
                if kind == "declined":
                    reading.decisions["declined", reason] += n
                elif kind == "rejected":
                    reading.rejected[reason] += n
            if buckets:
                counts = json.loads(buckets)
                for i, n in enumerate(counts):
                    reading.latency_buckets[i] += n
                reading.latency_sum_ms += latency_sum or 0.0
            if newest is not None and (reading.newest_publish_ms is None or newest > reading.newest_publish_ms):
                reading.newest_publish_ms = newest
        for status, n in conn.execute(select(st.c.status, func.count()).group_by(st.c.status)):
            reading.settlements[status] = n
        for started, finished in conn.execute(
            select(st.c.started_at, st.c.finished_at).where(st.c.status == schema.SETTLEMENT_PUBLISHED)
        ):
            if started is not None and finished is not None:
                reading.settlement_seconds.append(max(0.0, (finished - started).total_seconds()))
    return reading


class StreamCollector(Collector):
    """``cardpipe_decisions_total{status,reason}``, ``cardpipe_rejected_total{reason}``,
    ``cardpipe_decision_seconds`` (publish to commit), ``cardpipe_consumer_lag_messages{partition}``,
    ``cardpipe_consumer_lag_seconds``, ``cardpipe_settlements_total{status}``, ``cardpipe_settlement_seconds``."""

    def __init__(self, engine: Engine, status: StatusFn | None = None, ttl: float = METRICS_TTL_SECONDS) -> None:
        self.engine, self.status, self.ttl = engine, status, ttl
        self._lock = threading.Lock()
        self._reading: StreamReading | None = None
        self._at = float("-inf")

    def reading(self) -> StreamReading | None:
        """The last reading, refreshed when older than ``ttl`` (None while the database does not answer)."""
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._reading = read_stream(self.engine)
                except (SQLAlchemyError, DatabaseUnavailable):
                    self._reading = None
                self._at = time.monotonic()
            return self._reading

    def collect(self) -> Iterable[Metric]:
        reading = self.reading()
        known: Mapping[str, Any] = {}
        if self.status is not None:
            try:
                known = self.status() or {}
            except Exception:  # the service's own report failing must not fail a scrape
                known = {}
        by_partition: Mapping[int, int] = known.get("lag_by_partition") or {}
        lag = GaugeMetricFamily(
            "cardpipe_consumer_lag_messages",
            "Messages on the topic after the committed offsets, per partition (as last measured).",
            labels=["partition"],
        )
        for partition, n in sorted(by_partition.items()):
            lag.add_metric([str(partition)], n)
        yield lag
        if reading is None:
            return
        decisions = CounterMetricFamily(
            "cardpipe_decisions", "Decisions committed, by status and decline reason.", labels=["status", "reason"]
        )
        for (status, reason), n in sorted(reading.decisions.items()):
            decisions.add_metric([status, reason], n)
        yield decisions
        rejected = CounterMetricFamily(
            "cardpipe_rejected", "Messages the rules could not judge, by reason.", labels=["reason"]
        )
        for reason, n in sorted(reading.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        cumulative, buckets = 0, []
        for bound, n in zip(
            (*(str(b / 1000) for b in LATENCY_BUCKETS_MS), "+Inf"), reading.latency_buckets, strict=True
        ):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "cardpipe_decision_seconds",
            "From the broker's timestamp of a message to the commit of its decision.",
            buckets=buckets,
            sum_value=reading.latency_sum_ms / 1000,
        )
        total_lag = sum(by_partition.values()) if by_partition else known.get("lag")
        if total_lag is not None:
            behind = 0.0
            if total_lag > 0 and reading.newest_publish_ms is not None:
                behind = max(0.0, time.time() - reading.newest_publish_ms / 1000)
            yield GaugeMetricFamily(
                "cardpipe_consumer_lag_seconds",
                "How long the oldest undecided message may have waited: 0 when drained, else the time since the "
                "newest decided message was published (an upper bound).",
                value=behind,
            )
        settlements = CounterMetricFamily("cardpipe_settlements", "Settlements, by status.", labels=["status"])
        for status, n in sorted(reading.settlements.items()):
            settlements.add_metric([status], n)
        yield settlements
        sbuckets = [
            (str(bound), sum(1 for s in reading.settlement_seconds if s <= bound)) for bound in SETTLEMENT_BUCKETS
        ]
        sbuckets.append(("+Inf", len(reading.settlement_seconds)))
        yield HistogramMetricFamily(
            "cardpipe_settlement_seconds",
            "Wall time of each published settlement (claim to publication).",
            buckets=sbuckets,
            sum_value=sum(reading.settlement_seconds),
        )
