"""cProfile of the product's consumer (``commands.consume``, until caught up) on a pre-filled topic, or of
``commands.load``: prints the top functions by cumulative and by own time, writes the .prof file.

    python3 bench/profile_consumer.py [--transactions 200000] [--sink sqlite] [--target consume|load]

Read the .prof with ``python3 -m pstats bench/out/consume-sqlite.prof`` (or snakeviz, if installed).
"""

from __future__ import annotations

import argparse
import io
import pstats
from pathlib import Path

import common  # noqa: I001  (puts the project on sys.path)
from common import (
    OUT_DIR,
    WORK_DIR,
    dataset,
    drop_mysql_database,
    embedded_broker,
    fresh_dir,
    load_average,
    run_worker,
    say,
    settings,
    sink_env,
)
from stream_bench import ours_consume, ours_prepare, ours_produce


def profiled_load(env: dict[str, str], work: Path, data: Path, profile: Path) -> dict[str, float]:
    import cProfile
    import time

    from cardpipe.orchestration import commands

    s = settings(env, work, data)
    commands.setup(s)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    commands.load(s)
    profiler.disable()
    seconds = time.perf_counter() - started
    profiler.dump_stats(str(profile))
    return {"seconds": round(seconds, 3)}


def show(profile: Path, top: int) -> None:
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        stats = pstats.Stats(str(profile), stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(top)
        text = out.getvalue()
        print(f"\n=== top {top} by {order} ===")
        print(text[text.find("   ncalls") :].rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--sink", default="sqlite")
    parser.add_argument("--target", choices=("consume", "load"), default="consume")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bench-db", default=common.DEFAULT_BENCH_DB)
    args = parser.parse_args()
    data = dataset(args.transactions, args.seed)
    env = sink_env(args.sink, args.bench_db)
    profile = OUT_DIR / f"{args.target}-{args.sink}.prof"
    work = fresh_dir(WORK_DIR / f"profile-{args.sink}")
    try:
        if args.sink == "mysql":
            drop_mysql_database(env, recreate=True)
        if args.target == "load":
            result, _ = run_worker(profiled_load, env, work, data, profile)
            say(f"load of {args.transactions:,} transactions under cProfile: {result['seconds']} s")
        else:
            with embedded_broker(work) as broker:
                env = {**env, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
                run_worker(ours_prepare, env, work, data)
                run_worker(ours_produce, env, work, data)
                result, _ = run_worker(ours_consume, env, work, data, profile)
            say(
                f"consumed {result['messages']:,} under cProfile in {result['seconds']} s "
                f"(loop {result['loop_seconds']} s); load average {load_average()}"
            )
    finally:
        if args.sink == "mysql":
            drop_mysql_database(env)
        fresh_dir(work)
    show(profile, args.top)
    print(f"\nprofile: {profile}")


if __name__ == "__main__":
    main()
