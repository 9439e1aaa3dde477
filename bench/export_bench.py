"""How long writing ``stream_transactions.csv`` takes on SQLite: the end of ``consume``, once the topic is drained.

    python3 bench/export_bench.py [--transactions 500000] [--rounds 6] [--repeat 3] [--tree PATH ...]

On a serving file of ``--transactions`` decisions (the stream results that ``bench/seed_batch_bench.py`` prepares
and caches: ``setup``, ``load``, ``produce``, ``consume``), each round runs one fresh process per checkout named by
``--tree`` (default: this one; several, to compare code, alternated round by round). Each process attaches the
file as the export process does (:func:`cardpipe.batch.embedded.connect_for_export`), writes the file once (not
timed), then ``--repeat`` times more with :func:`cardpipe.batch.embedded.export_table_csv`, each timed (wall and
the process's CPU). The files of every checkout must be the same bytes: the bench says when they are not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import OUT_DIR, ROOT, WORK_DIR, dataset, fresh_dir, load_average, machine, print_table, say, write_json
from seed_batch_bench import SQLITE_FILE, prepared_results

#: What each process runs (its checkout first on ``sys.path``): argv = database, output, repeats.
CHILD = """
import json, sys, time
from pathlib import Path
from sqlalchemy.engine import make_url
from cardpipe.batch.embedded import connect_for_export, export_table_csv
from cardpipe.domain.records import STREAM_COLUMNS
url, out, repeat = make_url("sqlite:///" + sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
conn = connect_for_export(url)
times = []
for i in range(repeat + 1):
    wall, cpu = time.perf_counter(), time.process_time()
    rows = export_table_csv(url, "stream_transactions", STREAM_COLUMNS, "transaction_id", out, conn=conn)
    if i:
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
print(json.dumps({"rows": rows, "times": times}))
"""


def one_process(tree: Path, database: Path, out: Path, repeat: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(database), str(out), str(repeat)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["md5"] = hashlib.md5(out.read_bytes()).hexdigest()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each runs one process per checkout")
    parser.add_argument("--repeat", type=int, default=3, help="timed exports per process (after one untimed)")
    parser.add_argument("--tree", type=Path, action="append", help="a checkout to time (default: this one)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "export.json")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [ROOT]]
    database = prepared_results(dataset(args.transactions)) / SQLITE_FILE
    work = fresh_dir(WORK_DIR / "export")
    times: dict[str, list[tuple[float, float]]] = {str(tree): [] for tree in trees}
    digests: dict[str, set[str]] = {str(tree): set() for tree in trees}
    before = load_average()
    for round_ in range(1, args.rounds + 1):
        for k, tree in enumerate(trees):
            result = one_process(tree, database, work / f"stream_transactions_{k}.csv", args.repeat)
            times[str(tree)].extend((wall, cpu) for wall, cpu in result["times"])
            digests[str(tree)].add(result["md5"])
            say(
                f"round {round_}, {tree}: {result['rows']:,} rows, "
                + ", ".join(f"{w:.3f} s" for w, _ in result["times"])
            )
    rows = []
    for tree, pairs in times.items():
        walls, cpus = [w for w, _ in pairs], [c for _, c in pairs]
        rows.append([tree, len(pairs), statistics.median(walls), min(walls), max(walls), statistics.median(cpus)])
    print_table(
        f"stream_transactions.csv of {args.transactions:,} decisions (export_table_csv, seconds)",
        ["checkout", "exports", "median wall", "min", "max", "median CPU"],
        [[r[0], r[1], *(f"{v:.3f}" for v in r[2:])] for r in rows],
    )
    same = len(set().union(*digests.values())) == 1
    say("every checkout wrote the same bytes" if same else f"the files differ: {digests}")
    write_json(
        args.out,
        {
            "machine": machine(),
            "transactions": args.transactions,
            "load_average_before": before,
            "load_average_after": load_average(),
            "times": times,
            "same_bytes": same,
        },
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
