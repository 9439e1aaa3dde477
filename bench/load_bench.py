"""e: bulk load into MariaDB. The product's load of a whole dataset (``--transactions`` rows, plus its
customers and cards) against row-by-row INSERTs, in one run.

* **product** (``--methods``, default ``auto``): ``commands.setup`` then ``commands.load`` (``auto``:
  LOAD DATA LOCAL INFILE of validated rows); ``load_data``, ``insert`` (the multi-row INSERT fallback)
  and ``rows`` (typed rows through SQLAlchemy's executemany, the load before LOAD DATA) call
  ``load_inputs(method=...)`` on a fresh schema. Timed on the whole dataset; the time covers all four
  tables, the rate counts transactions. Python CPU (the loading process, all threads) and MariaDB CPU
  (the server process, from /proc) say where the time goes; ``validate only`` is the Python side
  alone (parse, validate, write canonical CSV to /dev/null), without a database.
* **row by row**, the seed's way: PyMySQL, one INSERT per row, timed on a SAMPLE of the transactions and
  EXTRAPOLATED to all of them (clearly a lower bound on its total: the table is smaller while sampled):
  a COMMIT per row (``--commit-sample``, one log flush per row) and one COMMIT at the end
  (``--row-sample``; the seed's own loader, ~6,100 rows/s in SPEC section 8).

Ratio = product transactions/s over row-by-row rows/s.

    python3 bench/load_bench.py [--transactions 10000000] [--row-sample 200000] [--commit-sample 20000]
                                [--methods auto[,load_data,insert,rows]]

Uses (and drops at the end) its own database ``cardpipe_bench`` on the private MariaDB of
scripts/mariadb.sh.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import time
from pathlib import Path
from typing import Any

import common  # noqa: I001  (puts the project on sys.path)
from common import (
    OUT_DIR,
    WORK_DIR,
    dataset,
    dataset_counts,
    drop_mysql_database,
    fresh_dir,
    load_average,
    machine,
    mysql_env,
    print_table,
    rate,
    run_worker,
    say,
    settings,
    write_json,
)

ROW_TABLE_SQL = """CREATE TABLE seed_transactions (
    transaction_id BIGINT PRIMARY KEY, card_id BIGINT NOT NULL, merchant_name VARCHAR(255) NOT NULL,
    timestamp DATETIME NOT NULL, amount DECIMAL(12,2) NOT NULL, location VARCHAR(512) NOT NULL,
    transaction_type VARCHAR(32) NOT NULL, related_transaction_id BIGINT NULL)"""
METHODS = ("auto", "load_data", "insert", "rows")
METHOD_LABELS = {
    "auto": "product: cardpipe load",
    "load_data": "product: LOAD DATA",
    "insert": "product: multi-row INSERT",
    "rows": "product before: executemany",
}


def server_cpu_seconds() -> float | None:
    """CPU seconds the private MariaDB has used so far (user + system), None when unknown.

    It counts every client of the shared server: compare with the load average.
    """
    state = Path(os.environ.get("CARDPIPE_MARIADB_DIR", "/tmp/cardpipe-mariadb"))
    try:
        pid = int((state / "mariadb.pid").read_text().strip())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def product_load(env: dict[str, str], work: Path, data: Path, method: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from cardpipe.orchestration import commands
    from cardpipe.serving import schema
    from cardpipe.serving.database import make_engine
    from cardpipe.serving.loader import load_inputs

    s = settings(env, work, data)
    commands.setup(s)
    engine = make_engine(s.database_url)
    try:
        server_before, cpu_before = server_cpu_seconds(), _cpu_self()
        started = time.perf_counter()
        summary = commands.load(s) if method == "auto" else load_inputs(engine, s.data_dir, method=method)
        seconds = time.perf_counter() - started
        cpu, server_after = _cpu_self() - cpu_before, server_cpu_seconds()
        with engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(schema.transactions)).scalar_one()
    finally:
        engine.dispose()
    return {
        "method": method,
        "used": summary.method,
        "rows": summary.rows,
        "seconds": round(seconds, 3),
        "python_cpu_seconds": round(cpu, 1),
        "server_cpu_seconds": round(server_after - server_before, 1) if server_after is not None else None,
        "stored_transactions": stored,
    }


def validate_only(data: Path) -> dict[str, Any]:
    """The Python side of the bulk load alone: parse, validate, canonical CSV out (to /dev/null)."""
    from cardpipe.serving import schema
    from cardpipe.serving.csv_io import normalised_batches
    from cardpipe.serving.mysql_bulk import _csv_text  # what the product writes into the pipe

    started, cpu_before = time.perf_counter(), _cpu_self()
    rows = 0
    with open(os.devnull, "w", encoding="utf-8") as sink:
        for batch in normalised_batches(data / "transactions.csv", schema.transactions):
            sink.write(_csv_text(batch.rows))
            rows += len(batch.rows)
    return {
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 3),
        "python_cpu_seconds": round(_cpu_self() - cpu_before, 1),
    }


def row_by_row(env: dict[str, str], data: Path, sample: int, commit_every_row: bool) -> dict[str, Any]:
    """The seed's load: read the CSV, one INSERT per row; a commit per row or one at the end."""
    conn = common.pymysql_connect(env, autocommit=False)
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS seed_transactions")
    cur.execute(ROW_TABLE_SQL)
    conn.commit()
    insert = "INSERT INTO seed_transactions VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    done = 0
    server_before, cpu_before = server_cpu_seconds(), _cpu_self()
    started = time.perf_counter()
    with open(data / "transactions.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            cur.execute(insert, [cell if cell != "" else None for cell in row])
            if commit_every_row:
                conn.commit()
            done += 1
            if done >= sample:
                break
    conn.commit()
    seconds = time.perf_counter() - started
    cpu, server_after = _cpu_self() - cpu_before, server_cpu_seconds()
    cur.execute("SELECT COUNT(*) FROM seed_transactions")
    stored = cur.fetchone()[0]
    cur.execute("DROP TABLE seed_transactions")
    conn.commit()
    conn.close()
    return {
        "rows": done,
        "stored": stored,
        "seconds": round(seconds, 3),
        "python_cpu_seconds": round(cpu, 1),
        "server_cpu_seconds": round(server_after - server_before, 1) if server_after is not None else None,
    }


def _load_avg(values: list[float]) -> str:
    return "/".join(str(x) for x in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument("--row-sample", type=int, default=200_000, help="rows, row by row, one commit")
    parser.add_argument("--commit-sample", type=int, default=20_000, help="rows, row by row, commit per row")
    parser.add_argument(
        "--methods",
        default="auto",
        help=f"product methods to time on the whole dataset, comma-separated: {', '.join(METHODS)}",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bench-db", default=common.DEFAULT_BENCH_DB)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "load.json")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    results: dict[str, Any] = {
        "benchmark": "load",
        "machine": machine(),
        "config": {
            "transactions": args.transactions,
            "row_sample": args.row_sample,
            "commit_sample": args.commit_sample,
            "methods": methods,
        },
    }
    data = dataset(args.transactions, args.seed)
    counts = dataset_counts(data)
    results["config"]["dataset"] = {"path": str(data), "counts": counts}
    env = mysql_env(args.bench_db)
    work = fresh_dir(WORK_DIR / "load")
    results["product"] = {}
    try:
        say(f"validate only: parse + validate + canonical CSV of {counts['transactions']:,} transactions")
        before = load_average()
        checked, peak = run_worker(validate_only, data)
        checked.update(
            {
                "rate": rate(checked["rows"], checked["seconds"]),
                "peak_rss_mb": peak,
                "load_average_before": before,
                "load_average_after": load_average(),
            }
        )
        results["validate_only"] = checked
        drop_mysql_database(env, recreate=True)
        for variant, sample, every in (
            ("row_commit_each", args.commit_sample, True),
            ("row_commit_end", args.row_sample, False),
        ):
            sample = min(sample, args.transactions)
            if sample <= 0:
                continue
            say(f"row by row: {sample:,} INSERTs, " + ("a COMMIT per row" if every else "one COMMIT at the end"))
            before = load_average()
            rows, _ = run_worker(row_by_row, {**env}, data, sample, every)
            rows.update(
                {
                    "rate": rate(rows["rows"], rows["seconds"]),
                    "load_average_before": before,
                    "load_average_after": load_average(),
                }
            )
            rows["extrapolated_seconds"] = round(args.transactions / rows["rate"], 1) if rows["rate"] else None
            results[variant] = rows
            say(f"row by row: {rows['rate']:,.0f} rows/s")
        for method in methods:
            drop_mysql_database(env, recreate=True)
            say(f"{METHOD_LABELS[method]}: {counts['transactions']:,} transactions (+ customers, cards)")
            before = load_average()
            loaded, peak = run_worker(product_load, env, work, data, method)
            total_rows = sum(loaded["rows"].values())
            loaded.update(
                {
                    "rate_transactions": rate(loaded["rows"]["transactions"], loaded["seconds"]),
                    "rate_all_rows": rate(total_rows, loaded["seconds"]),
                    "peak_rss_mb": peak,
                    "load_average_before": before,
                    "load_average_after": load_average(),
                    "complete": loaded["stored_transactions"] == counts["transactions"],
                }
            )
            results["product"][method] = loaded
            say(f"{METHOD_LABELS[method]}: {loaded['rate_transactions']:,.0f} transactions/s ({loaded['used']})")
    finally:
        drop_mysql_database(env)
        fresh_dir(work)
    results["machine"]["load_average_at_end"] = load_average()
    headline = results["product"][methods[0]]
    table = []
    for method in methods:
        p = results["product"][method]
        ratio = round(headline["rate_transactions"] / p["rate_transactions"], 1) if p["rate_transactions"] else None
        table.append(
            [
                f"{METHOD_LABELS[method]} ({p['used']})",
                p["rows"]["transactions"],
                p["seconds"],
                p["rate_transactions"],
                p["seconds"],
                ratio,
                p["python_cpu_seconds"],
                p["server_cpu_seconds"],
                _load_avg(p["load_average_after"]),
            ]
        )
    v = results["validate_only"]
    table.append(
        [
            "validate only (Python, no database)",
            v["rows"],
            v["seconds"],
            v["rate"],
            v["seconds"],
            None,
            v["python_cpu_seconds"],
            None,
            _load_avg(v["load_average_after"]),
        ]
    )
    results["ratios"] = {}
    for variant, label in (
        ("row_commit_each", "row by row, COMMIT per row *"),
        ("row_commit_end", "row by row, one COMMIT *"),
    ):
        rows = results.get(variant)
        if not rows:
            continue
        ratio = round(headline["rate_transactions"] / rows["rate"], 1) if rows["rate"] else None
        results["ratios"][variant] = ratio
        table.append(
            [
                label,
                rows["rows"],
                rows["seconds"],
                rows["rate"],
                rows["extrapolated_seconds"],
                ratio,
                rows["python_cpu_seconds"],
                rows["server_cpu_seconds"],
                _load_avg(rows["load_average_after"]),
            ]
        )
    print_table(
        f"bulk load of {args.transactions:,} transactions into MariaDB (product: all four tables, rate = "
        "transactions/s)",
        [
            "method",
            "rows",
            "seconds",
            "rows/s",
            "est. s for all",
            f"{methods[0]}/this",
            "py cpu s",
            "db cpu s",
            "load avg",
        ],
        table,
    )
    print(
        f"\n* timed on a sample of {args.row_sample:,} / {args.commit_sample:,} rows, 'est. s for all' "
        "EXTRAPOLATED to every transaction (seed's own loader, SPEC section 8: ~6,100 rows/s)"
    )
    print("db cpu s: the shared MariaDB's CPU during the step (other clients count too: see load avg)")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
