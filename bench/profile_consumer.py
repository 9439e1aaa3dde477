"""cProfile of the product's consumer (``commands.consume``, until caught up) on a pre-filled topic, or of
``commands.load``: prints the top functions by cumulative and by own time, writes the .prof file.

    python3 bench/profile_consumer.py [--transactions 200000] [--sink sqlite] [--target consume|load|stages]

Read the .prof with ``python3 -m pstats bench/out/consume-sqlite.prof`` (or snakeviz, if installed).

``--target stages`` runs the consume without cProfile (whose overhead distorts Python-heavy code) and prints
the wall seconds spent in each stage of the loop instead: polling, deciding (``StreamProcessor.process``), the
lookups, the checkpoint commit and, inside it, each table's write, the decisions turned into columns, the
settlement's lock, the lease renewal and the database ``COMMIT``.
"""

from __future__ import annotations

import argparse
import io
import pstats
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


#: (module, attribute path, stage name): the consumer loop's stages, timed by wrapping each callable.
STAGES = (
    ("cardpipe.stream.consumer", "poll_ready", "poll"),
    ("cardpipe.stream.processing", "StreamProcessor.process", "decide (process)"),
    ("cardpipe.serving.stream_store", "StreamStore.lookup_decided", "lookup of decided ids"),
    ("cardpipe.serving.stream_store", "StreamStore.load_cards", "loading cards"),
    ("cardpipe.serving.stream_store", "StreamStore.settlement_in_force", "settlement in force"),
    ("cardpipe.serving.stream_store", "StreamStore.commit", "checkpoint commit"),
    ("cardpipe.serving.stream_store", "_decision_columns", "  decision columns"),
    ("cardpipe.serving.stream_store", "_settlement_in_force", "  settlement lock"),
    ("cardpipe.serving.stream_store", "StreamStore._renew", "  lease renewal"),
    ("sqlalchemy.engine.base", "Connection._commit_impl", "  database COMMIT"),
)


def staged_consume(env: dict[str, str], work: Path, data: Path) -> dict[str, Any]:
    """``ours_consume`` with each of :data:`STAGES` (and each table's write) timed: {stage: seconds}."""
    import importlib
    import time
    from collections import Counter

    from cardpipe.serving import bulk

    spent: Counter[str] = Counter()

    def timing(fn: Any, stage: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = stage(*args) if callable(stage) else stage
                spent[name] += time.perf_counter() - started

        return timed

    for module_name, path, stage in STAGES:
        owner: Any = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, attribute, timing(getattr(owner, attribute), stage))
    for method in ("write", "write_columns"):  # each table's write, rows or columns
        setattr(
            bulk.BulkWriter,
            method,
            timing(getattr(bulk.BulkWriter, method), lambda writer, *_: f"  write {writer.sql.split()[2]}"),
        )
    result = ours_consume(env, work, data)
    result["stages"] = {name: round(seconds, 3) for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])}
    return result


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
    parser.add_argument("--target", choices=("consume", "load", "stages"), default="consume")
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
                if args.target == "stages":
                    result, _ = run_worker(staged_consume, env, work, data)
                else:
                    result, _ = run_worker(ours_consume, env, work, data, profile)
            say(
                f"consumed {result['messages']:,}{'' if args.target == 'stages' else ' under cProfile'} in "
                f"{result['seconds']} s (loop {result['loop_seconds']} s); load average {load_average()}"
            )
    finally:
        if args.sink == "mysql":
            drop_mysql_database(env)
        fresh_dir(work)
    if args.target == "stages":
        loop = result["loop_seconds"]
        print(f"\n{'stage':<40} {'seconds':>8} {'of loop':>8}")
        for name, seconds in result["stages"].items():
            print(f"{name:<40} {seconds:>8.3f} {seconds / loop:>8.0%}")
        return
    show(profile, args.top)
    print(f"\nprofile: {profile}")


if __name__ == "__main__":
    main()
