"""How fast ``cardpipe consume`` starts deciding and how fast it stops once the topic is drained.

    python3 bench/startup_bench.py [--transactions 500000] [--runs 3] [--cardpipe PATH ...] [--workers N ...]

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
each of them with each ``--workers`` value (default 1: the single consumer).

Targets (issue 14): first decision <= 1 s; exit <= 1 s after the topic is drained.
"""

from __future__ import annotations

import argparse
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
    fresh_dir,
    load_average,
    machine,
    print_table,
    say,
    write_json,
)

CARDPIPE = str(ROOT / ".venv" / "bin" / "cardpipe")


def one_run(data_dir: Path, folder: Path, cardpipe: str = CARDPIPE, workers: int = 1) -> dict[str, Any]:
    """Set up, load and produce into ``folder``; time ``consume --until-caught-up --workers N`` (all with
    ``cardpipe``)."""

    def run(*args: str) -> None:
        subprocess.run([cardpipe, *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)

    fresh_dir(folder)
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
        )
        exited_ms = time.time() * 1000
    finally:
        subprocess.run([cardpipe, "broker", "stop", *results], cwd=ROOT, capture_output=True)
    with sqlite3.connect(folder / "cardpipe.db") as conn:
        first_ms, last_ms, checkpoints, messages = conn.execute(
            "SELECT min(committed_ms), max(committed_ms), count(*), sum(messages) FROM stream_checkpoint_log"
        ).fetchone()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "startup.json")
    parser.add_argument(
        "--cardpipe", nargs="+", action="extend", help="the cardpipe executables to time (repeatable; default: ours)"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", action="extend", help="consume --workers values to time (default 1)"
    )
    args = parser.parse_args()
    args.cardpipe = args.cardpipe or [CARDPIPE]
    args.workers = args.workers or [1]
    data_dir = dataset(args.transactions, args.seed)
    runs = []
    for i in range(1, args.runs + 1):
        for cardpipe in args.cardpipe:
            for workers in args.workers:
                say(
                    f"run {i}: {cardpipe} consume --until-caught-up --workers {workers} of "
                    f"{args.transactions:,} transactions"
                )
                result = one_run(data_dir, WORK_DIR / "startup", cardpipe, workers)
                say(f"  {result['summary_line']}")
                runs.append({"cardpipe": cardpipe, "workers": workers, "run": i, **result})
    fresh_dir(WORK_DIR / "startup")
    rows = [
        [
            r["run"],
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
        ["run", "cardpipe", "workers", "first decision s", "exit after drained s", "command s", "checkpoints"],
        rows,
    )
    medians = {
        f"{cardpipe} --workers {workers}": {
            key: statistics.median(r[key] for r in runs if r["cardpipe"] == cardpipe and r["workers"] == workers)
            for key in ("first_decision_s", "exit_after_drained_s")
        }
        for cardpipe in args.cardpipe
        for workers in args.workers
    }
    print(f"medians: {medians}")
    write_json(args.out, {"machine": machine(), "transactions": args.transactions, "runs": runs, "medians": medians})
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
