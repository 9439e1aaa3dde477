"""The seed system's own batch code against ``cardpipe batch``, side by side on the same stream results.

    python3 bench/seed_batch_bench.py [--transactions 1000000] [--rounds 3] [--engine embedded|spark] [--keep]

1. Data (cached under bench/out/data): a ``cardpipe.generate`` dataset of N transactions, then a results
   folder ``tx<N>_seed<S>_cardpipe_results`` with the REAL stream results of the product: ``cardpipe setup``,
   ``load``, ``produce`` and ``consume --until-caught-up`` (embedded broker and SQLite), each a subprocess;
   the folder's embedded broker is stopped afterwards. It holds ``cardpipe.db`` and ``stream_transactions.csv``.
2. **ours**: ``cardpipe.db`` copied into a fresh folder and synced to disk (not timed), then ``cardpipe batch
   -q --engine embedded --results-dir FOLDER`` (the embedded DuckDB engine: it reads the decisions from the
   SQLite file, writes the three CSVs into the folder and the settled tables into the database). ``--engine
   spark`` times the Spark engine instead (``local[*]``, as the seed's job runs).
3. **seed**: the seed's ``batch_processor.py``, unmodified, run as ../shared/reference/seed_code/README.md
   says: a fresh RUN folder with the seed's ``*.py``, the dataset's CSVs in ``RUN/dataset_22/`` and the stream
   results in ``RUN/results/`` (copies synced to disk, not timed), then ``python batch_processor.py`` in RUN
   with the shim on PYTHONPATH (pyspark with its defaults: ``local[*]``, 1 GB driver; its JVM is a child
   process).
4. The jobs alternate, ``--rounds`` times each: seed, ours, seed, ours, ...
5. The outputs of the first ours and the first seed run are compared with ``../shared/tools/compare_results.py
   SEED OURS`` (numbers within 0.005; its verdict is printed as it is), and row by row here, the differences
   counted per table and sorted out: the seed drops customers without cards and does not clamp credit
   scores to 300..850 (both documented); anything else is reported as unexplained.

Per run: wall seconds from ``Popen`` to exit (interpreter and JVM start included); peak RSS of the whole
process tree (the process and all its descendants, RSS summed, sampled every 0.1 s from /proc); CPU seconds
(user + system) of the tree: the larger of the child's rusage from ``os.wait4`` (itself and the descendants
it waited for) and the sum of each process's last sampled /proc time (a JVM nobody waits for); the load
average before and after. The machine has 2 cores: compare runs made at a similar load.

Targets: median wall time seed / ours >= 10; peak memory ours / seed <= 1.0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (  # first: it puts the project on sys.path
    OUT_DIR,
    ROOT,
    WORK_DIR,
    dataset,
    dataset_counts,
    fresh_dir,
    load_average,
    machine,
    print_table,
    say,
    write_json,
)

SEED_CODE = ROOT.parent / "shared" / "reference" / "seed_code"
COMPARE_TOOL = ROOT.parent / "shared" / "tools" / "compare_results.py"
PYTHON = ROOT / ".venv" / "bin" / "python"
CARDPIPE = ROOT / ".venv" / "bin" / "cardpipe"
STREAM_FILE = "stream_transactions.csv"
SQLITE_FILE = "cardpipe.db"
OUTPUTS = ("batch_transactions", "cards_updated", "customers_updated")
OUTPUT_KEYS = {"batch_transactions": "transaction_id", "cards_updated": "card_id", "customers_updated": "customer_id"}
#: Columns compared (those of compare_results.py).
COMPARED = {
    "batch_transactions": ("card_id", "amount", "status"),
    "cards_updated": ("customer_id", "credit_limit", "current_balance"),
    "customers_updated": ("credit_score",),
}
#: Settings that would send cardpipe elsewhere than the folder's SQLite file and embedded broker.
CLEARED_ENV = (
    "DATABASE_URL",
    "DB_HOST",
    "KAFKA_BOOTSTRAP_SERVERS",
    "SPARK_MASTER",
    "SPARK_REMOTE",
    "CARDPIPE_BATCH_ENGINE",
    "CARDPIPE_RESULTS_DIR",
    "CARDPIPE_DATA_DIR",
)
SAMPLE_SECONDS = 0.1
SCORE_RANGE = (300, 850)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(extra)
    return env


# --- the prepared stream results ------------------------------------------------------------------


def _cardpipe(*args: str, cwd: Path) -> tuple[str, float]:
    """Run ``cardpipe ARGS`` (check=True); its stdout (stripped) and seconds."""
    started = time.perf_counter()
    done = subprocess.run([str(CARDPIPE), *args], cwd=cwd, env=_env(), check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip(), round(time.perf_counter() - started, 1)


def prepared_results(data_dir: Path) -> Path:
    """A results folder holding the product's own stream results of ``data_dir`` (cached beside it)."""
    folder = data_dir.with_name(data_dir.name + "_cardpipe_results")
    marker = folder / ".complete.json"
    if marker.is_file():
        return folder
    fresh_dir(folder)
    say(f"preparing the stream results of {data_dir.name} in {folder} (setup, load, produce, consume)")
    where = ("--results-dir", str(folder))
    steps: dict[str, Any] = {}
    try:
        for name, args in (
            ("setup", ("setup", "-q", *where)),
            ("load", ("load", "-q", *where, "--data-dir", str(data_dir))),
            ("produce", ("produce", "-q", *where)),
            ("consume", ("consume", "-q", "--until-caught-up", *where)),
        ):
            output, seconds = _cardpipe(*args, cwd=folder)
            steps[name] = {"seconds": seconds, "output": output}
            say(f"  {name}: {seconds}s {output.splitlines()[-1] if output else ''}")
    finally:
        stopped, _ = _cardpipe("broker", "stop", *where, cwd=folder)
        say(f"  broker stop: {stopped}")
    with (folder / STREAM_FILE).open("rb") as handle:
        stream_rows = sum(1 for _ in handle) - 1
    marker.write_text(json.dumps({"counts": dataset_counts(data_dir), "stream_rows": stream_rows, "steps": steps}))
    return folder


# --- measuring a process tree ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc/PID/task/*/children."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return found


def _sample_tree(root: int, cpu: dict[int, float]) -> float:
    """RSS (MB) summed over ``root`` and its descendants now; updates ``cpu`` (pid -> own user+system s)."""
    todo, total_kb = [root], 0
    while todo:
        pid = todo.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if stat[0] == "Z":
            continue
        cpu[pid] = (int(stat[11]) + int(stat[12])) / CLK_TCK
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
                break
        todo.extend(_children(pid))
    return total_kb / 1024


def run_measured(argv: list[str], cwd: Path, env: dict[str, str], log_name: str) -> dict[str, Any]:
    """Run ``argv`` in ``cwd`` (stdout/stderr to LOG.out/.err there), sampling its process tree every 0.1 s.

    Raises with the tail of its output when it exits non-zero.
    """
    out_path, err_path = cwd / f"{log_name}.out", cwd / f"{log_name}.err"
    before = load_average()
    peak = [0.0]
    cpu: dict[int, float] = {}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _sample_tree(proc.pid, cpu))
                done.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session, nothing else
            proc.wait()
            raise
        finally:
            done.set()
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(err_path, "rb") as handle:
        err_tail = handle.read()[-3000:].decode(errors="replace")
    if proc.returncode != 0:
        out_tail = out_path.read_bytes()[-2000:].decode(errors="replace")
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode} in {cwd}\n{out_tail}\n{err_tail}")
    rusage_cpu = usage.ru_utime + usage.ru_stime
    sampled_cpu = sum(cpu.values())
    return {
        "wall_seconds": round(wall, 3),
        "peak_tree_rss_mb": round(peak[0], 1),
        "cpu_seconds": round(max(rusage_cpu, sampled_cpu), 2),
        "cpu_seconds_wait4": round(rusage_cpu, 2),
        "cpu_seconds_sampled": round(sampled_cpu, 2),
        "processes_seen": len(cpu),
        "load_average_before": before,
        "load_average_after": load_average(),
    }


# --- the two jobs ---------------------------------------------------------------------------------


def run_ours(prepared: Path, folder: Path, engine: str = "embedded") -> dict[str, Any]:
    """``cardpipe batch --engine ENGINE`` on a copy of the prepared database (the copy is not timed)."""
    fresh_dir(folder)
    for name in (SQLITE_FILE, SQLITE_FILE + "-wal"):  # a WAL left over would hold committed rows
        if (prepared / name).is_file():
            shutil.copy2(prepared / name, folder / name)
    os.sync()  # the copy written out before the clock starts (its writeback would slow whatever runs next)
    argv = [str(CARDPIPE), "batch", "-q", "--engine", engine, "--results-dir", str(folder)]
    result = run_measured(argv, folder, _env(), "batch")
    result["summary_line"] = (folder / "batch.out").read_text().strip()
    missing = [name for name in OUTPUTS if not (folder / f"{name}.csv").is_file()]
    if missing:
        raise RuntimeError(f"cardpipe batch wrote no {missing} in {folder}")
    return result


def run_seed(data_dir: Path, prepared: Path, run_dir: Path) -> dict[str, Any]:
    """The seed's ``batch_processor.py`` in a fresh RUN folder set up as its README says (copies not timed)."""
    fresh_dir(run_dir)
    (run_dir / "dataset_22").mkdir()
    (run_dir / "results").mkdir()
    for path in SEED_CODE.glob("*.py"):
        shutil.copyfile(path, run_dir / path.name)
    for path in data_dir.glob("*.csv"):
        shutil.copyfile(path, run_dir / "dataset_22" / path.name)
    shutil.copyfile(prepared / STREAM_FILE, run_dir / "results" / STREAM_FILE)
    os.sync()  # as for ours
    env = _env(PYTHONPATH=str(SEED_CODE / "shim"))
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # as batch_bench.py: no hostname lookup warnings
    result = run_measured([str(PYTHON), "batch_processor.py"], run_dir, env, "seed")
    missing = [name for name in OUTPUTS if not (run_dir / "results" / f"{name}.csv").is_file()]
    if missing:
        raise RuntimeError(f"the seed wrote no {missing} in {run_dir / 'results'}")
    return result


# --- comparing the outputs ------------------------------------------------------------------------


def _same(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 0.005
    except ValueError:
        return a.strip() == b.strip()


def _rows(path: Path, name: str) -> dict[str, dict[str, str]]:
    keep = (OUTPUT_KEYS[name], *COMPARED[name])
    with path.open(newline="", encoding="utf-8") as handle:
        return {row[keep[0]]: {c: row[c] for c in keep[1:]} for row in csv.DictReader(handle)}


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def explain_differences(seed_dir: Path, ours_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Per table: rows on each side, the differing ones (compared columns, numbers within 0.005) sorted out by
    the seed's two documented deviations (customers without cards dropped, scores not clamped)."""
    with (data_dir / "cards.csv").open(newline="", encoding="utf-8") as handle:
        with_cards = {row["customer_id"] for row in csv.DictReader(handle)}
    report: dict[str, Any] = {}
    for name in OUTPUTS:
        seed_rows, ours_rows = _rows(seed_dir / f"{name}.csv", name), _rows(ours_dir / f"{name}.csv", name)
        only_seed = [k for k in seed_rows if k not in ours_rows]
        only_ours = [k for k in ours_rows if k not in seed_rows]
        differing = [
            k
            for k, s in seed_rows.items()
            if k in ours_rows and not all(_same(s[c], ours_rows[k][c]) for c in COMPARED[name])
        ]
        explained: dict[str, int] = {}
        unexplained: list[str] = list(only_seed)
        if name == "customers_updated":
            no_cards = [k for k in only_ours if k not in with_cards]
            explained["customers without cards (seed drops them)"] = len(no_cards)
            unexplained += [k for k in only_ours if k in with_cards]
            unclamped = []
            for k in differing:
                seed_score, ours_score = _int(seed_rows[k]["credit_score"]), _int(ours_rows[k]["credit_score"])
                if (
                    seed_score is not None
                    and not SCORE_RANGE[0] <= seed_score <= SCORE_RANGE[1]
                    and ours_score == max(SCORE_RANGE[0], min(SCORE_RANGE[1], seed_score))
                ):
                    unclamped.append(k)
            explained["scores out of 300..850 (seed does not clamp)"] = len(unclamped)
            unexplained += [k for k in differing if k not in set(unclamped)]
        else:
            unexplained += only_ours + differing
        report[name] = {
            "seed_rows": len(seed_rows),
            "ours_rows": len(ours_rows),
            "differing": len(differing),
            "only_in_seed": len(only_seed),
            "only_in_ours": len(only_ours),
            "explained": explained,
            "unexplained": len(unexplained),
            "unexplained_examples": [
                {"key": k, "seed": seed_rows.get(k), "ours": ours_rows.get(k)} for k in unexplained[:3]
            ],
        }
    report["all_explained"] = all(report[name]["unexplained"] == 0 for name in OUTPUTS)
    return report


def run_compare_tool(seed_dir: Path, ours_dir: Path, prepared: Path, where: Path) -> dict[str, Any]:
    """``compare_results.py SEED OURS`` on two folders of links to the outputs (and the same stream file, which
    the tool compares too); its exit status, its lines, and per table the rows that agree."""
    dirs = {"seed": fresh_dir(where / "seed"), "ours": fresh_dir(where / "ours")}
    for side, source in (("seed", seed_dir), ("ours", ours_dir)):
        for name in OUTPUTS:
            (dirs[side] / f"{name}.csv").symlink_to(source / f"{name}.csv")
        (dirs[side] / STREAM_FILE).symlink_to(prepared / STREAM_FILE)
    done = subprocess.run(
        [sys.executable, str(COMPARE_TOOL), str(dirs["seed"]), str(dirs["ours"])],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    tables: dict[str, Any] = {}
    for line in lines:
        found = re.match(r"(\w+): (\d+)/(\d+) rows agree, (\d+) extra", line)
        if found:
            tables[found[1]] = {
                "agree": int(found[2]),
                "expected": int(found[3]),
                "extra": int(found[4]),
                "differing": int(found[3]) - int(found[2]) + int(found[4]),
            }
    return {
        "command": f"compare_results.py {dirs['seed']} {dirs['ours']}",
        "exit_status": done.returncode,
        "verdict": lines[-1] if lines else done.stderr.strip()[-500:],
        "tables": tables,
        "lines": [line[:400] for line in lines],
    }


# --- main -----------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each job, alternated: seed, ours, ...")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "seed-batch.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folders (bench/out/work/seed-batch)")
    parser.add_argument("--engine", choices=("embedded", "spark"), default="embedded", help="cardpipe's batch engine")
    parser.add_argument(
        "--ours-only", action="store_true", help="time cardpipe batch alone (no seed run, no comparison: e.g. 10M)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    data = dataset(args.transactions, args.seed)
    prepared = prepared_results(data)
    report["dataset"] = {
        "path": str(data),
        "counts": dataset_counts(data),
        "prepared_results": str(prepared),
        "prepared": json.loads((prepared / ".complete.json").read_text()),
        "stream_csv_mb": round((prepared / STREAM_FILE).stat().st_size / 2**20, 1),
        "cardpipe_db_mb": round((prepared / SQLITE_FILE).stat().st_size / 2**20, 1),
    }
    work = fresh_dir(WORK_DIR / "seed-batch")
    runs: list[dict[str, Any]] = []
    first: dict[str, Path] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for job in ("ours",) if args.ours_only else ("seed", "ours"):
                folder = work / f"r{round_no}-{job}"
                say(f"round {round_no}: {job} on {args.transactions:,} transactions")
                if job == "seed":
                    result = run_seed(data, prepared, folder)
                    outputs = folder / "results"
                else:
                    result = run_ours(prepared, folder, args.engine)
                    outputs = folder
                say(
                    f"  {job}: {result['wall_seconds']:.1f}s, peak {result['peak_tree_rss_mb']:,.0f} MB, "
                    f"CPU {result['cpu_seconds']:.1f}s"
                )
                runs.append({"round": round_no, "job": job, "folder": str(folder), **result})
                first.setdefault(job, outputs)
                if round_no > 1 and not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
            if round_no == 1 and not args.ours_only:
                say("comparing the outputs of round 1 (compare_results.py SEED OURS)")
                tool = run_compare_tool(first["seed"], first["ours"], prepared, work / "compare")
                report["comparison"] = {
                    "compare_results": tool,
                    "differences": explain_differences(first["seed"], first["ours"], data),
                }
                print(f"\ncompare_results.py: {tool['verdict']} (exit status {tool['exit_status']})")
                for line in tool["lines"]:
                    print(f"  {line[:200]}")
    finally:
        report["runs"] = runs
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print_table(
        f"Batch settlement of {args.transactions:,} transactions: the seed's batch_processor.py vs cardpipe batch "
        "(wall from process start to exit)",
        ["round", "job", "wall s", "peak MB", "CPU s", "load before", "load after"],
        [
            [
                r["round"],
                r["job"],
                r["wall_seconds"],
                r["peak_tree_rss_mb"],
                r["cpu_seconds"],
                r["load_average_before"][0],
                r["load_average_after"][0],
            ]
            for r in runs
        ],
    )
    if args.ours_only:
        walls = [r["wall_seconds"] for r in runs]
        report["summary"] = {"ours_median_wall_seconds": _median(walls), "target_10m": "<= 15 s"}
        print(f"\ncardpipe batch alone: median wall {_median(walls)} s over {len(walls)} run(s)")
        write_json(args.out, report)
        say(f"wrote {args.out}")
        return
    medians = {
        job: {
            "wall_seconds": _median([r["wall_seconds"] for r in runs if r["job"] == job]),
            "peak_tree_rss_mb": _median([r["peak_tree_rss_mb"] for r in runs if r["job"] == job]),
            "cpu_seconds": _median([r["cpu_seconds"] for r in runs if r["job"] == job]),
        }
        for job in ("seed", "ours")
    }
    speed = round(medians["seed"]["wall_seconds"] / medians["ours"]["wall_seconds"], 2)
    memory = round(medians["ours"]["peak_tree_rss_mb"] / medians["seed"]["peak_tree_rss_mb"], 3)
    report["summary"] = {
        "medians": medians,
        "speedup_seed_over_ours": speed,
        "speedup_target": ">= 10",
        "speedup_met": speed >= 10,
        "memory_ours_over_seed": memory,
        "memory_target": "<= 1.0",
        "memory_met": memory <= 1.0,
    }
    differences = report["comparison"]["differences"]
    tool_tables = report["comparison"]["compare_results"]["tables"]
    print_table(
        "Summary (medians over the rounds)",
        ["", "seed wall s", "ours wall s", "seed/ours", "target", "seed MB", "ours MB", "ours/seed", "target"],
        [
            [
                "seed vs ours",
                medians["seed"]["wall_seconds"],
                medians["ours"]["wall_seconds"],
                speed,
                ">= 10 " + ("met" if speed >= 10 else "MISSED"),
                medians["seed"]["peak_tree_rss_mb"],
                medians["ours"]["peak_tree_rss_mb"],
                memory,
                "<= 1.0 " + ("met" if memory <= 1.0 else "MISSED"),
            ]
        ],
    )
    print_table(
        "Output differences, round 1 (seed = expected; numbers within 0.005)",
        [
            "output",
            "seed rows",
            "ours rows",
            "tool: differing",
            "differ",
            "only seed",
            "only ours",
            "explained",
            "unexplained",
        ],
        [
            [
                name,
                differences[name]["seed_rows"],
                differences[name]["ours_rows"],
                tool_tables.get(name, {}).get("differing"),
                differences[name]["differing"],
                differences[name]["only_in_seed"],
                differences[name]["only_in_ours"],
                sum(differences[name]["explained"].values()),
                differences[name]["unexplained"],
            ]
            for name in OUTPUTS
        ],
    )
    for name in OUTPUTS:
        for what, count in differences[name]["explained"].items():
            print(f"  {name}: {count:,} {what}")
    print(f"  all differences explained by the seed's documented deviations: {differences['all_explained']}")
    print(f"  ours' summary line: {next(r['summary_line'] for r in runs if r['job'] == 'ours')}")
    report["load_average_at_end"] = load_average()
    write_json(args.out, report)


if __name__ == "__main__":
    main()
