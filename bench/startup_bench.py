"""How fast ``cardpipe consume`` starts deciding and how fast it stops once the topic is drained.

    python3 bench/startup_bench.py [--transactions 500000] [--runs 3] [--cardpipe PATH ...] [--workers N ...]
                                   [--sinks sqlite,mysql]

Per run, on a fresh results folder (embedded defaults: SQLite and the embedded broker, which outlives the
commands): ``cardpipe setup``, ``load`` (a ``cardpipe.generate`` dataset) and ``produce`` (not timed), then
``cardpipe consume --until-caught-up`` as a subprocess, the way a user runs it. From the command's own
checkpoint log (``stream_checkpoint_log.committed_ms``, wall-clock milliseconds written in each checkpoint's
transaction) and the parent's wall clock around the subprocess:

* **first decision**: from starting the command (``Popen``) to the commit of its first checkpoint;
* **exit after drained**: from the commit of its last checkpoint (the topic is drained: every message is
  decided) to the process's exit, which includes writing ``stream_transactions.csv`` and
  ``rejected_transactions.csv`` (its log line gives the export's share when ``--log-level debug`` shows it).

``--cardpipe`` names the ``cardpipe`` executables to time (default: this checkout's ``.venv/bin/cardpipe``); with
several (another checkout's, to compare code), each run times each of them in turn, on the same dataset; and
each of them with each ``--workers`` value (default 1: the single consumer). ``--sinks mysql`` times the same on
the private MariaDB of ``scripts/mariadb.sh`` (its own database, dropped and made again for each run) instead
of the embedded SQLite file; the broker is the embedded one either way.

Targets (issue 14): first decision <= 1 s; exit <= 1 s after the topic is drained.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from common import (  # first: it puts the project on sys.path
    OUT_DIR,
    ROOT,
    WORK_DIR,
    dataset,
    drop_mysql_database,
    fresh_dir,
    load_average,
    machine,
    print_table,
    pymysql_connect,
    say,
    sink_env,
    write_json,
)

CARDPIPE = str(ROOT / ".venv" / "bin" / "cardpipe")


#: Settings naming the serving database: a run's own replace the caller's.
DB_SETTINGS = ("DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME")


def one_run(
    data_dir: Path, folder: Path, cardpipe: str = CARDPIPE, workers: int = 1, sink: dict[str, str] | None = None
) -> dict[str, Any]:
    """Set up, load and produce into ``folder``; time ``consume --until-caught-up --workers N`` (all with
    ``cardpipe``). ``sink``: the MariaDB settings to use (from :func:`common.sink_env`), else the SQLite file."""
    env = {**{k: v for k, v in os.environ.items() if k not in DB_SETTINGS}, **(sink or {})}

    def run(*args: str) -> None:
        subprocess.run([cardpipe, *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)

    fresh_dir(folder)
    if sink:
        drop_mysql_database(sink, recreate=True)
    results = ["--results-dir", str(folder)]
    try:
        run("setup", "-q", *results)
        run("load", "-q", *results, "--data-dir", str(data_dir))
        run("produce", "-q", *results)
        before = load_average()
        started_ms = time.time() * 1000
        proc = subprocess.run(
            [cardpipe, "consume", "-q", "--until-caught-up", "--workers", str(workers), *results],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        exited_ms = time.time() * 1000
    finally:
        subprocess.run([cardpipe, "broker", "stop", *results], cwd=ROOT, capture_output=True, env=env)
    first_ms, last_ms, checkpoints, messages = _checkpoint_span(folder, sink)
    return {
        "first_decision_s": round((first_ms - started_ms) / 1000, 3),
        "exit_after_drained_s": round((exited_ms - last_ms) / 1000, 3),
        "command_s": round((exited_ms - started_ms) / 1000, 3),
        "checkpoints": checkpoints,
        "messages": messages,
        "summary_line": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "",
        "load_average_before": before,
        "load_average_after": load_average(),
    }


_SPAN = "SELECT min(committed_ms), max(committed_ms), count(*), sum(messages) FROM stream_checkpoint_log"


def _checkpoint_span(folder: Path, sink: dict[str, str] | None) -> tuple[Any, ...]:
    """The first and last checkpoints' commit times (ms), how many and their messages."""
    if not sink:
        with sqlite3.connect(folder / "cardpipe.db") as conn:
            return tuple(conn.execute(_SPAN).fetchone())
    conn = pymysql_connect(sink)
    try:
        with conn.cursor() as cursor:
            cursor.execute(_SPAN)
            return tuple(int(v) for v in cursor.fetchone())
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "startup.json")
    parser.add_argument(
        "--cardpipe",
        nargs="+",
        action="extend",
        help="the cardpipe executables to time (repeatable; default: ours). Compile another checkout's package "
        "first (python -m compileall DIR/cardpipe): with PYTHONDONTWRITEBYTECODE set, it would compile its modules "
        "in every run",
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", action="extend", help="consume --workers values to time (default 1)"
    )
    parser.add_argument("--sinks", default="sqlite", help="serving databases, comma-separated: sqlite, mysql")
    args = parser.parse_args()
    sinks = {name: sink_env(name) or None for name in args.sinks.split(",")}
    args.cardpipe = args.cardpipe or [CARDPIPE]
    args.workers = args.workers or [1]
    data_dir = dataset(args.transactions, args.seed)
    runs = []
    for i in range(1, args.runs + 1):
        for sink, sink_settings in sinks.items():
            for cardpipe in args.cardpipe:
                for workers in args.workers:
                    say(
                        f"run {i}: {cardpipe} consume --until-caught-up --workers {workers} of "
                        f"{args.transactions:,} transactions on {sink}"
                    )
                    result = one_run(data_dir, WORK_DIR / "startup", cardpipe, workers, sink_settings)
                    say(f"  {result['summary_line']}")
                    runs.append({"sink": sink, "cardpipe": cardpipe, "workers": workers, "run": i, **result})
    fresh_dir(WORK_DIR / "startup")
    if "mysql" in sinks:
        drop_mysql_database(sinks["mysql"] or {})
    rows = [
        [
            r["run"],
            r["sink"],
            r["cardpipe"],
            r["workers"],
            r["first_decision_s"],
            r["exit_after_drained_s"],
            r["command_s"],
            r["checkpoints"],
        ]
        for r in runs
    ]
    print_table(
        f"consume --until-caught-up, {args.transactions:,} transactions (targets: first decision <= 1 s, "
        "exit <= 1 s after drained)",
        ["run", "sink", "cardpipe", "workers", "first decision s", "exit after drained s", "command s", "checkpoints"],
        rows,
    )
    medians = {
        f"{sink}: {cardpipe} --workers {workers}": {
            key: statistics.median(
                r[key] for r in runs if (r["sink"], r["cardpipe"], r["workers"]) == (sink, cardpipe, workers)
            )
            for key in ("first_decision_s", "exit_after_drained_s")
        }
        for sink in sinks
        for cardpipe in args.cardpipe
        for workers in args.workers
    }
    print(f"medians: {medians}")
    write_json(args.out, {"machine": machine(), "transactions": args.transactions, "runs": runs, "medians": medians})
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
