"""Decision latency at a steady offered load: a paced producer offers ``--rate`` tx/s for ``--seconds``
while the product's consumer (``commands.consume`` with ``follow``, in its own process) decides them.

Latency of a message = time its decision is committed to the database minus its publish time (the
message's CreateTime, stamped by the producer client when ``produce()`` is called, so the producer's
batching delay counts too). The samples are the consumer's own (``ConsumeSummary.latencies_ms``).
The producer is the product's (``make_producer``: idempotent, acks=all, linger 10 ms), connected
before the clock starts, as a long-lived producer is: a fresh client's first messages wait ~0.5 s for its
connection and producer id, which would be the whole p99 of a 20 s run.

    python3 bench/latency_bench.py [--rate 10000] [--seconds 20] [--sinks sqlite,mysql]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import common  # noqa: I001  (puts the project on sys.path)
from common import (
    OUT_DIR,
    WORK_DIR,
    dataset,
    drop_mysql_database,
    embedded_broker,
    fresh_dir,
    latency_stats,
    load_average,
    machine,
    print_table,
    rate,
    run_worker,
    say,
    settings,
    sink_env,
    write_json,
)
from stream_bench import _sample_messages, ours_prepare


def follow_consumer(env: dict[str, str], work: Path, data: Path, queue: Any) -> None:
    """Runs in its own process until SIGTERM; sends 'ready', then its summary."""
    from cardpipe.orchestration import commands
    from cardpipe.stream.consumer import ConsumeOptions

    s = settings(env, work, data)
    queue.put(("ready", os.getpid()))
    summary = commands.consume(s, ConsumeOptions(follow=True, batch_size=s.consumer_batch_size))
    queue.put(
        (
            "done",
            {
                "messages": summary.messages,
                "batches": summary.batches,
                "seconds": round(summary.seconds, 3),
                "counts": dict(summary.counts),
                "latencies_ms": summary.latencies_ms,
                "peak_rss_mb": common.peak_rss_mb(),
            },
        )
    )


def _decided(env: dict[str, str], work: Path, data: Path) -> int:
    from sqlalchemy import func, select

    from cardpipe.serving import schema
    from cardpipe.serving.database import make_engine

    engine = make_engine(settings(env, work, data).database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one())
    finally:
        engine.dispose()


def paced_produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], offered: float) -> dict[str, Any]:
    from cardpipe.stream.producer import make_producer

    producer = make_producer(bootstrap)
    producer.list_topics(topic, timeout=30)  # connected, and its idempotent producer id on the way
    time.sleep(0.5)
    started = time.perf_counter()
    sent = 0
    total = len(messages)
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * offered) + 1)
        while sent < due:
            key, value = messages[sent]
            producer.produce(topic, value=value, key=key)
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    producer.flush(60)
    seconds = time.perf_counter() - started
    return {"published": sent, "seconds": round(seconds, 3), "achieved_rate": rate(sent, seconds)}


def measure(sink: str, env: dict[str, str], data: Path, offered: float, seconds: float) -> dict[str, Any]:
    from cardpipe.stream.broker import ensure_topic

    count = int(offered * seconds)
    work = fresh_dir(WORK_DIR / f"latency-{sink}")
    try:
        with embedded_broker(work) as broker:
            env = {**env, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
            say(f"latency/{sink}: setup + load (not timed)")
            run_worker(ours_prepare, env, work, data)
            s = settings(env, work, data)
            ensure_topic(broker.bootstrap_servers, s.kafka_topic, s.kafka_partitions)
            messages = _sample_messages(data, count)
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=follow_consumer, args=(env, work, data, queue))
            proc.start()
            try:
                queue.get(timeout=60)  # "ready"
                time.sleep(3.0)  # the consumer restores its state and assigns its partitions
                result: dict[str, Any] = {"sink": sink, "offered_rate": offered, "load_average_before": load_average()}
                say(f"latency/{sink}: offering {offered:,.0f} tx/s for {seconds:g} s ({count:,} messages)")
                result["produce"] = paced_produce(broker.bootstrap_servers, s.kafka_topic, messages, offered)
                deadline = time.monotonic() + 120
                while _decided(env, work, data) < count and time.monotonic() < deadline:
                    time.sleep(0.5)
                result["load_average_after"] = load_average()
                os.kill(proc.pid, signal.SIGTERM)  # finishes the current batch, exports, returns its summary
                _kind, consumed = queue.get(timeout=300)
                proc.join(30)
            finally:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        latencies = consumed.pop("latencies_ms")
        skip = int(offered)  # the first second: the consumer's first polls
        result.update(
            {
                "consume": consumed,
                "latency": latency_stats(latencies),
                "latency_after_first_second": latency_stats(latencies[skip:]),
                "complete": consumed["messages"] == count,
            }
        )
        lat = result["latency"]
        say(f"latency/{sink}: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms")
        return result
    finally:
        fresh_dir(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--sinks", default="sqlite,mysql")
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--bench-db", default=common.DEFAULT_BENCH_DB)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "latency.json")
    args = parser.parse_args()
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    count = int(args.rate * args.seconds)
    results: dict[str, Any] = {
        "benchmark": "latency",
        "machine": machine(),
        "config": {"rate": args.rate, "seconds": args.seconds, "messages": count, "sinks": sinks},
        "runs": {},
    }
    data = dataset(count, args.seed)
    envs = {sink: sink_env(sink, args.bench_db) for sink in sinks}
    try:
        for sink in sinks:
            if sink == "mysql":
                drop_mysql_database(envs[sink], recreate=True)
            results["runs"][sink] = measure(sink, envs[sink], data, args.rate, args.seconds)
    finally:
        if "mysql" in envs:
            drop_mysql_database(envs["mysql"])
    results["machine"]["load_average_at_end"] = load_average()
    rows = []
    for sink, r in results["runs"].items():
        lat, late = r["latency"], r["latency_after_first_second"]
        rows.append(
            [
                sink,
                r["produce"]["published"],
                r["produce"]["achieved_rate"],
                lat["p50_ms"],
                lat["p90_ms"],
                lat["p99_ms"],
                lat["max_ms"],
                late["p99_ms"],
                r["consume"]["peak_rss_mb"],
                "/".join(str(x) for x in r["load_average_after"]),
            ]
        )
        r["meets_p99_50ms"] = lat["p99_ms"] is not None and lat["p99_ms"] <= 50
    print_table(
        f"decision latency at an offered {args.rate:,.0f} tx/s (target p99 <= 50 ms)",
        [
            "sink",
            "messages",
            "offered/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "p99 after 1s",
            "cons RSS MB",
            "load avg",
        ],
        rows,
    )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
