"""Bulk load into MariaDB: the product's ``commands.load`` of a whole dataset (``--transactions`` rows,
plus its customers and cards) against the seed's way, one INSERT per row with PyMySQL, timed on a sample
and extrapolated, in two variants:

* commit per row (``--commit-sample`` rows): every row durable on its own, one log flush per row;
* one commit at the end (``--row-sample`` rows): the seed's own loader, which SPEC section 8 measured at
  ~6,100 rows/s (mysql-connector does not autocommit).

Ratio = product transactions/s over row-by-row rows/s, for each variant.

    python3 bench/load_bench.py [--transactions 10000000] [--row-sample 200000] [--commit-sample 20000]

Uses (and drops at the end) its own database ``cardpipe_bench`` on the private MariaDB of
scripts/mariadb.sh.
"""

from __future__ import annotations

import argparse
import csv
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


def product_load(env: dict[str, str], work: Path, data: Path) -> dict[str, Any]:
    from sqlalchemy import func, select

    from cardpipe.orchestration import commands
    from cardpipe.serving import schema
    from cardpipe.serving.database import make_engine

    s = settings(env, work, data)
    commands.setup(s)
    started = time.perf_counter()
    summary = commands.load(s)
    seconds = time.perf_counter() - started
    engine = make_engine(s.database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(schema.transactions)).scalar_one()
    finally:
        engine.dispose()
    return {"rows": summary.rows, "seconds": round(seconds, 3), "stored_transactions": stored}


def row_by_row(env: dict[str, str], data: Path, sample: int, commit_every_row: bool) -> dict[str, Any]:
    """The seed's load: read the CSV, one INSERT per row; a commit per row or one at the end."""
    conn = common.pymysql_connect(env, autocommit=False)
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS seed_transactions")
    cur.execute(ROW_TABLE_SQL)
    conn.commit()
    insert = "INSERT INTO seed_transactions VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    done = 0
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
    cur.execute("SELECT COUNT(*) FROM seed_transactions")
    stored = cur.fetchone()[0]
    cur.execute("DROP TABLE seed_transactions")
    conn.commit()
    conn.close()
    return {"rows": done, "stored": stored, "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument("--row-sample", type=int, default=200_000, help="rows, row by row, one commit")
    parser.add_argument("--commit-sample", type=int, default=20_000, help="rows, row by row, commit per row")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bench-db", default=common.DEFAULT_BENCH_DB)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "load.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"benchmark": "load", "machine": machine(),
                               "config": {"transactions": args.transactions, "row_sample": args.row_sample,
                                          "commit_sample": args.commit_sample}}
    data = dataset(args.transactions, args.seed)
    counts = dataset_counts(data)
    results["config"]["dataset"] = {"path": str(data), "counts": counts}
    env = mysql_env(args.bench_db)
    work = fresh_dir(WORK_DIR / "load")
    try:
        drop_mysql_database(env, recreate=True)
        for variant, sample, every in (("row_commit_each", args.commit_sample, True),
                                       ("row_commit_end", args.row_sample, False)):
            sample = min(sample, args.transactions)
            if sample <= 0:
                continue
            say(f"row by row: {sample:,} INSERTs, " + ("a COMMIT per row" if every else "one COMMIT at the end"))
            before = load_average()
            rows, _ = run_worker(row_by_row, {**env}, data, sample, every)
            rows.update({"rate": rate(rows["rows"], rows["seconds"]), "load_average_before": before,
                         "load_average_after": load_average()})
            rows["extrapolated_seconds"] = round(args.transactions / rows["rate"], 1) if rows["rate"] else None
            results[variant] = rows
            say(f"row by row: {rows['rate']:,.0f} rows/s")
        drop_mysql_database(env, recreate=True)
        say(f"product: commands.load of {counts['transactions']:,} transactions (+ customers, cards)")
        before = load_average()
        loaded, peak = run_worker(product_load, env, work, data)
        total_rows = sum(loaded["rows"].values())
        loaded.update({"rate_transactions": rate(loaded["rows"]["transactions"], loaded["seconds"]),
                       "rate_all_rows": rate(total_rows, loaded["seconds"]), "peak_rss_mb": peak,
                       "load_average_before": before, "load_average_after": load_average(),
                       "complete": loaded["stored_transactions"] == counts["transactions"]})
        results["product"] = loaded
        say(f"product: {loaded['rate_transactions']:,.0f} transactions/s")
    finally:
        drop_mysql_database(env)
        fresh_dir(work)
    product = results["product"]
    results["machine"]["load_average_at_end"] = load_average()
    table = [["commands.load", product["rows"]["transactions"], product["seconds"], product["rate_transactions"],
              product["seconds"], None, "/".join(str(x) for x in product["load_average_after"])]]
    results["ratios"] = {}
    for variant, label in (("row_commit_each", "row by row, COMMIT per row"),
                           ("row_commit_end", "row by row, one COMMIT")):
        rows = results.get(variant)
        if not rows:
            continue
        ratio = round(product["rate_transactions"] / rows["rate"], 1) if rows["rate"] else None
        results["ratios"][variant] = ratio
        table.append([label, rows["rows"], rows["seconds"], rows["rate"], rows["extrapolated_seconds"], ratio,
                      "/".join(str(x) for x in rows["load_average_after"])])
    print_table(f"bulk load of {args.transactions:,} transactions into MariaDB (product time covers all four "
                "tables; row-by-row extrapolated from its sample)",
                ["method", "rows", "seconds", "rows/s", "est. s for all", "product/this", "load avg"], table)
    print("\n(seed's own loader, SPEC section 8: ~6,100 rows/s)")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
