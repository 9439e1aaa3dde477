"""Consumer memory at two sizes: peak RSS of the product's consumer process (``commands.consume``,
until caught up, SQLite sink by default) after consuming a pre-filled topic of N transactions, for each
N in ``--sizes``; plus, in the largest run, the RSS sampled while it consumes (RSS after the first
~1M messages vs at the end). Target: RSS at 10M within 20 % of RSS at 1M.

Both datasets have the same number of customers and cards (``--customers``), so what differs is the
number of transactions only.

    python3 bench/memory_bench.py [--sizes 1000000,10000000] [--customers 100000] [--sink sqlite]
"""

from __future__ import annotations

import argparse
import re
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
    rss_mb,
    run_worker,
    say,
    settings,
    sink_env,
    write_json,
)
from stream_bench import ours_prepare, ours_produce

_DECIDED = re.compile(r"decided ([\d,]+) messages")


def sampled_consume(env: dict[str, str], work: Path, data: Path) -> dict[str, Any]:
    """``commands.consume`` until caught up, sampling this process's RSS at every progress line."""
    from cardpipe.orchestration import commands
    from cardpipe.stream.consumer import ConsumeOptions

    s = settings(env, work, data)
    samples: list[tuple[int, float | None]] = []

    def progress(line: str) -> None:
        match = _DECIDED.search(line)
        if match:
            samples.append((int(match.group(1).replace(",", "")), rss_mb()))

    started = time.perf_counter()
    summary = commands.consume(
        s, ConsumeOptions(until_caught_up=True, batch_size=s.consumer_batch_size, progress_every=2.0), progress=progress
    )
    seconds = time.perf_counter() - started
    samples.append((summary.messages, rss_mb()))
    return {
        "messages": summary.messages,
        "seconds": round(seconds, 3),
        "loop_seconds": round(summary.seconds, 3),
        "rss_samples": samples,
        "vm_hwm_mb": rss_mb("self", "VmHWM"),
        "latency": latency_stats(summary.latencies_ms),
    }


def measure(size: int, customers: int, sink: str, env: dict[str, str], seed: int) -> dict[str, Any]:
    data = dataset(size, seed, customers)
    work = fresh_dir(WORK_DIR / f"memory-{sink}-{size}")
    try:
        with embedded_broker(work) as broker:
            env = {**env, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
            say(f"memory/{size:,}: setup + load (not timed)")
            loaded, _ = run_worker(ours_prepare, env, work, data)
            say(f"memory/{size:,}: loaded in {loaded['seconds']} s; producing")
            produced, _ = run_worker(ours_produce, env, work, data)
            say(f"memory/{size:,}: published {produced['published']:,} in {produced['seconds']} s; consuming")
            before = load_average()
            consumed, peak = run_worker(sampled_consume, env, work, data)
            broker_peak = rss_mb(broker.pid, "VmHWM") if broker.pid else None
        tx_rate = rate(consumed["messages"], consumed["seconds"])
        say(f"memory/{size:,}: consumer peak RSS {peak} MB, {tx_rate:,.0f} tx/s")
        return {
            "transactions": size,
            "customers": customers,
            "load": loaded,
            "produce": produced,
            "consume": consumed,
            "consume_rate": rate(consumed["messages"], consumed["seconds"]),
            "consumer_peak_rss_mb": peak,
            "broker_peak_rss_mb": broker_peak,
            "load_average_before": before,
            "load_average_after": load_average(),
        }
    finally:
        fresh_dir(work)


def rss_near(samples: list[list[Any]], messages: int) -> tuple[int, float] | None:
    """The first RSS sample taken at or after ``messages`` consumed."""
    for done, rss in samples:
        if done >= messages and rss is not None:
            return done, rss
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--customers", type=int, default=100_000, help="customers in every dataset (cards ~1.8x)")
    parser.add_argument("--sink", default="sqlite")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bench-db", default=common.DEFAULT_BENCH_DB)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "memory.json")
    args = parser.parse_args()
    sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())
    results: dict[str, Any] = {
        "benchmark": "memory",
        "machine": machine(),
        "config": {"sizes": sizes, "customers": args.customers, "sink": args.sink},
        "runs": [],
    }
    env = sink_env(args.sink, args.bench_db)
    try:
        for size in sizes:
            if args.sink == "mysql":
                drop_mysql_database(env, recreate=True)
            results["runs"].append(measure(size, args.customers, args.sink, env, args.seed))
    finally:
        if args.sink == "mysql":
            drop_mysql_database(env)
    runs = results["runs"]
    small, large = runs[0], runs[-1]
    peak_ratio = large["consumer_peak_rss_mb"] / small["consumer_peak_rss_mb"]
    results["peak_ratio_largest_over_smallest"] = round(peak_ratio, 3)
    early = rss_near(large["consume"]["rss_samples"], min(1_000_000, small["transactions"]))
    final = large["consume"]["rss_samples"][-1]
    results["in_run"] = {
        "early": early,
        "final": final,
        "ratio": round(final[1] / early[1], 3) if early and final[1] else None,
    }
    results["meets_flat_20pct"] = results["peak_ratio_largest_over_smallest"] <= 1.2
    results["machine"]["load_average_at_end"] = load_average()
    rows = [
        [
            f"{r['transactions']:,}",
            r["consume_rate"],
            r["consumer_peak_rss_mb"],
            r["consume"]["vm_hwm_mb"],
            r["broker_peak_rss_mb"],
            "/".join(str(x) for x in r["load_average_after"]),
        ]
        for r in runs
    ]
    print_table(
        "consumer memory (MB; target: largest within 20% of smallest)",
        ["transactions", "consume tx/s", "peak RSS", "VmHWM", "broker RSS", "load avg"],
        rows,
    )
    print(
        f"\npeak RSS ratio {large['transactions']:,} / {small['transactions']:,}: "
        f"{results['peak_ratio_largest_over_smallest']}"
    )
    if early:
        print(
            f"in the {large['transactions']:,} run: RSS {early[1]} MB after {early[0]:,} messages, "
            f"{final[1]} MB after {final[0]:,} (ratio {results['in_run']['ratio']})"
        )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
