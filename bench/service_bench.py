"""The running system, side by side in ONE run (SQLite, embedded broker, commands as a user runs them):

1. ``cardpipe consume --until-caught-up`` alone on a topic filled in advance;
2. ``cardpipe serve`` on the same data (the consumer in follow mode beside the HTTP API);
3. ``cardpipe serve`` again, with ``cardpipe batch`` started from another process once a third of the stream
   is decided: the settlement runs beside the consumer.

Each run starts from a fresh results folder (``setup``, ``load``, ``produce``: not timed). One observer,
the same for every run, reads the consumer's checkpoints from the database every 20 ms (the sum of
``stream_offsets.next_offset`` and of ``checkpoint_seq``): decision throughput = transactions / (time of
the last checkpoint - time of the first), and in run 3 the longest time without a new checkpoint while the
settlement ran.

    python3 bench/service_bench.py [--transactions 500000]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401, I001  (puts the project on sys.path)
from common import OUT_DIR, WORK_DIR, dataset, fresh_dir, load_average, machine, print_table, say, write_json

ROOT = Path(os.environ.get("CARDPIPE_BENCH_ROOT") or Path(__file__).resolve().parent.parent)
POLL = 0.02


def cardpipe(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "cardpipe", *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def prepare(results: Path, data: Path, env: dict[str, str]) -> None:
    fresh_dir(results)
    cardpipe("setup", "--results-dir", str(results), env=env)
    cardpipe("load", "--results-dir", str(results), "--data-dir", str(data), "-q", env=env)
    cardpipe("produce", "--results-dir", str(results), "-q", env=env)  # starts the embedded broker


def progress(db: Path) -> tuple[int, int]:
    """(messages read, checkpoints committed) as the database holds them now."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(next_offset), 0), COALESCE(SUM(checkpoint_seq), 0) FROM stream_offsets"
            ).fetchone()
            return int(row[0]), int(row[1])
    except sqlite3.Error:
        return 0, 0


class Observer:
    """Checkpoint timeline of one run: (time, messages, checkpoints) whenever the checkpoint count changed."""

    def __init__(self, db: Path):
        self.db = db
        self.timeline: list[tuple[float, int, int]] = []

    def poll_until(
        self, total: int, proc: subprocess.Popen[Any], timeout: float = 900, on_progress: Any = None
    ) -> None:
        deadline = time.monotonic() + timeout
        last = (-1, -1)
        while time.monotonic() < deadline:
            now = time.monotonic()
            state = progress(self.db)
            if state[1] != last[1]:
                self.timeline.append((now, *state))
                last = state
            if on_progress is not None:
                on_progress(state[0])
            if state[0] >= total:
                return
            if proc.poll() is not None and state[0] < total:
                raise RuntimeError(f"the process exited {proc.returncode} after {state[0]:,} of {total:,}")
            time.sleep(POLL)
        raise RuntimeError(f"not done after {timeout} s")

    def rate(self, total: int) -> tuple[float, float]:
        first = next(t for t, messages, _ in self.timeline if messages > 0)
        last = self.timeline[-1][0]
        return total / (last - first), last - first

    def longest_pause(self, start: float, end: float) -> float:
        """The longest time without a new checkpoint within [start, end]."""
        times = [start] + [t for t, _, _ in self.timeline if start < t < end] + [end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_consume(results: Path, total: int, env: dict[str, str]) -> dict[str, Any]:
    observer = Observer(results / "cardpipe.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardpipe", "consume", "--until-caught-up", "-q", "--results-dir", str(results)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    observer.poll_until(total, proc)
    proc.wait(600)
    rate, seconds = observer.rate(total)
    return {"tx_per_s": round(rate), "seconds": round(seconds, 2)}


def run_serve(results: Path, total: int, env: dict[str, str], settle_at: float | None) -> dict[str, Any]:
    observer = Observer(results / "cardpipe.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardpipe", "serve", "-q", "--port", str(free_port()), "--results-dir", str(results)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    batch: dict[str, Any] = {}

    def maybe_settle(decided: int) -> None:
        if settle_at is not None and not batch and decided >= settle_at * total:
            batch["proc"] = subprocess.Popen(
                [sys.executable, "-m", "cardpipe", "batch", "-q", "--results-dir", str(results)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            batch["start"] = time.monotonic()
        elif batch and "end" not in batch and batch["proc"].poll() is not None:
            batch["end"] = time.monotonic()

    try:
        observer.poll_until(total, proc, on_progress=maybe_settle)
        figures: dict[str, Any] = {}
        if batch:
            out, _ = batch["proc"].communicate(timeout=600)
            # The batch's end as the observer saw it exit (to within one poll); one that outlived the stream is
            # cut at the stream's end.
            end = batch.get("end", time.monotonic())
            stream_end = observer.timeline[-1][0]
            figures["settlement"] = out.strip()
            figures["settlement_seconds_overlapping"] = round(min(end, stream_end) - batch["start"], 2)
            figures["longest_pause_s"] = round(observer.longest_pause(batch["start"], min(end, stream_end)), 3)
            figures["longest_pause_outside_settlement_s"] = round(
                observer.longest_pause(observer.timeline[1][0], batch["start"]), 3
            )
        rate, seconds = observer.rate(total)
        return {"tx_per_s": round(rate), "seconds": round(seconds, 2), **figures}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=500_000)
    args = parser.parse_args()
    data = dataset(args.transactions)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "KAFKA_", "DATABASE_URL"))}
    env["PYTHONPATH"] = str(ROOT)
    rows: list[list[Any]] = []
    report: dict[str, Any] = {"machine": machine(), "transactions": args.transactions, "runs": {}}
    for name, run in (
        ("consume alone", lambda r: run_consume(r, args.transactions, env)),
        ("serve", lambda r: run_serve(r, args.transactions, env, None)),
        ("serve + batch at 1/3", lambda r: run_serve(r, args.transactions, env, 1 / 3)),
    ):
        results = WORK_DIR / "service_bench" / name.split()[0]
        say(f"{name}: preparing {args.transactions:,} transactions")
        prepare(results, data, env)
        try:
            before = load_average()
            say(f"{name}: running")
            figures = run(results)
            figures["load_average"] = [before, load_average()]
        finally:
            cardpipe("broker", "stop", "--results-dir", str(results), env=env)
        report["runs"][name] = figures
        rows.append(
            [
                name,
                figures["tx_per_s"],
                figures["seconds"],
                figures.get("longest_pause_s", ""),
                figures.get("settlement_seconds_overlapping", ""),
            ]
        )
    alone = report["runs"]["consume alone"]["tx_per_s"]
    report["serve_vs_consume"] = round(report["runs"]["serve"]["tx_per_s"] / alone, 3)
    print_table(
        f"decision throughput, {args.transactions:,} transactions (SQLite, embedded broker)",
        ["run", "tx/s", "s", "longest pause during settlement (s)", "settlement overlap (s)"],
        rows,
    )
    print(f"serve / consume alone: {report['serve_vs_consume']}")
    write_json(OUT_DIR / "service_bench.json", report)


if __name__ == "__main__":
    main()
