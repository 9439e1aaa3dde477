"""Batch settlement at scale: the product's Spark job against the seed's approach, on the same stream results.

    python3 bench/batch_bench.py [--transactions 10000000] [--seed-sample 0] [--master local[2]]

1. Data (cached under bench/out/data): a ``cardpipe.generate`` dataset of N transactions, and its stream
   results ``stream_transactions.csv`` computed WITHOUT Kafka by the pure domain (``decline_reason`` of
   :mod:`cardpipe.domain.authorization`, per card in (timestamp, transaction_id) order, as the consumer
   decides), written in the shape the stream layer exports.
2. **ours**, in a fresh process: ``build_spark_session(master)`` + ``run_settlement(spark,
   read_csv_inputs(...), out)``. Wall time includes the session start.
3. **seed**, in a fresh process: the seed's approach as SPEC section 8 measured it (CSV in with
   ``inferSchema`` = floats, Python UDFs for the per-row rules: settled status, score change, new credit
   limit; ``orderBy(key).coalesce(1)`` before writing each CSV, the part file then renamed), on a session
   with Spark's defaults (``local[2]``, 1 GB driver, 200 shuffle partitions). One deviation: customers
   without cards are kept (the seed dropped them), so that the outputs compare row for row.
   ``--seed-sample K`` runs it on the first K stream rows and extrapolates: session start + (rest of the
   wall time) x N / K, labelled as extrapolated.
4. The outputs are compared row by row (streamed, both sorted by key) on the columns
   ``../shared/tools/compare_results.py`` checks, numbers within 0.005.

Memory: the parent samples every 0.5 s the RSS of the worker's process tree (python driver + the JVM
child) from /proc; the JSON has the peaks of the JVM, of the python driver and of the whole tree.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import filecmp
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import common  # noqa: I001  (puts the project on sys.path)
from common import (
    OUT_DIR,
    WORK_DIR,
    dataset,
    dataset_counts,
    fresh_dir,
    load_average,
    machine,
    print_table,
    rate,
    say,
    write_json,
)

STREAM_FILE = "stream_transactions.csv"
OUTPUT_KEYS = {"batch_transactions": "transaction_id", "cards_updated": "card_id", "customers_updated": "customer_id"}
#: Columns compared (those of ../shared/tools/compare_results.py).
COMPARED = {
    "batch_transactions": ("card_id", "amount", "status"),
    "cards_updated": ("customer_id", "credit_limit", "current_balance"),
    "customers_updated": ("credit_score",),
}
SAMPLE_SECONDS = 0.5


# --- data -----------------------------------------------------------------------------------------


def stream_results(data_dir: Path) -> Path:
    """``stream_transactions.csv`` for the dataset in ``data_dir`` (cached next to it): every transaction
    decided by the pure domain rules, per card in (timestamp, transaction_id) order.

    The generator writes transactions.csv in (timestamp, transaction_id) order already, so one streaming
    pass decides them (checked as it goes). Text fields are copied as they are; money is written with
    two decimals, as the stream layer's export does.
    """
    from cardpipe.domain.authorization import decline_reason, zip_of
    from cardpipe.domain.money import format_money, parse_money_lenient
    from cardpipe.domain.records import DECLINED, PENDING, REJECTED, STREAM_COLUMNS, TRANSACTION_COLUMNS, CardProfile

    folder = data_dir.with_name(data_dir.name + "_stream")
    path = folder / STREAM_FILE
    marker = folder / ".complete.json"
    if marker.is_file():
        return path
    fresh_dir(folder)
    say(f"deciding the stream results of {data_dir.name} into {path}")
    started = time.perf_counter()
    with (data_dir / "customers.csv").open(newline="", encoding="utf-8") as handle:
        zips = {row["customer_id"]: zip_of(row["address"]) for row in csv.DictReader(handle)}
    profiles: dict[str, CardProfile] = {}
    balances: dict[str, Decimal] = {}
    with (data_dir / "cards.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            profiles[row["card_id"]] = CardProfile(
                int(row["card_id"]), parse_money_lenient(row["credit_limit"]), zips.get(row["customer_id"])
            )
            balances[row["card_id"]] = parse_money_lenient(row["current_balance"])
    counts = {PENDING: 0, DECLINED: 0, REJECTED: 0}
    previous = ("", 0)
    tmp = path.with_name(path.name + ".tmp")
    with (
        (data_dir / "transactions.csv").open(newline="", encoding="utf-8") as src,
        tmp.open("w", newline="", encoding="utf-8") as dst,
    ):
        reader = csv.reader(src)
        header = next(reader)
        if tuple(header) != TRANSACTION_COLUMNS:
            raise SystemExit(f"unexpected columns in transactions.csv: {header}")
        writer = csv.writer(dst, lineterminator="\n")
        writer.writerow(STREAM_COLUMNS)
        write = writer.writerow
        for row in reader:
            order = (row[3], int(row[0]))
            if order < previous:
                raise SystemExit("transactions.csv is not in (timestamp, transaction_id) order")
            previous = order
            card_id = row[1]
            card = profiles.get(card_id)
            if card is None:  # the stream layer keeps these, status rejected, no balance
                counts[REJECTED] += 1
                write((*row, REJECTED, "", "unknown_card"))
                continue
            amount = Decimal(row[4])
            balance = balances[card_id]
            reason = decline_reason(amount, row[5], card, balance)
            if reason is None:
                balance = balances[card_id] = balance + amount
                counts[PENDING] += 1
                write((*row, PENDING, format_money(balance), ""))
            else:
                counts[DECLINED] += 1
                write((*row, DECLINED, format_money(balance), reason))
    tmp.replace(path)
    seconds = round(time.perf_counter() - started, 1)
    marker.write_text(json.dumps({"counts": counts, "seconds": seconds}))
    say(f"stream results: {counts} in {seconds}s")
    return path


def stream_sample(stream_csv: Path, rows: int) -> Path:
    """The first ``rows`` stream results (cached beside the full file)."""
    path = stream_csv.with_name(f"stream_transactions_first{rows}.csv")
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    with stream_csv.open("rb") as src, tmp.open("wb") as dst:
        for i, line in enumerate(src):
            if i > rows:
                break
            dst.write(line)
    tmp.replace(path)
    return path


# --- measuring a worker ---------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree_rss(root: int) -> dict[str, float]:
    """RSS (MB) of ``root`` ("python"), of its java descendants ("jvm") and of the whole tree ("tree")."""
    tree = _children()
    todo, pids = [root], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, ()))
    sizes = {"python": 0.0, "jvm": 0.0, "tree": 0.0}
    for pid in pids:
        mb = common.rss_mb(pid) or 0.0
        sizes["tree"] += mb
        if pid == root:
            sizes["python"] += mb
        else:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = ""
            if exe.endswith("/java"):
                sizes["jvm"] += mb
    return sizes


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its descendants still running (the
    JVM): on a shared machine this moves much less with the load than the wall time."""
    tree = _children()
    todo, total = [os.getpid()], 0.0
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += _cpu_seconds(pid)
        todo.extend(tree.get(pid, ()))
    return round(total, 2)


def run_measured(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh (spawned) process while sampling the RSS of its process tree."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    before = load_average()
    started = time.perf_counter()
    proc = ctx.Process(target=common._worker_main, args=(fn, args, {}, queue))
    proc.start()
    peaks = {"python": 0.0, "jvm": 0.0, "tree": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _tree_rss(proc.pid).items():  # type: ignore[arg-type]
                peaks[key] = max(peaks[key], value)
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        status, payload, python_peak = queue.get()
    finally:
        done.set()
        proc.join()
        sampler.join()
    wall = time.perf_counter() - started
    if status != "ok":
        raise RuntimeError(f"worker {fn.__name__} failed: {payload}")
    return {
        **payload,
        "process_seconds": round(wall, 3),
        "peak_rss_mb": {"jvm": round(peaks["jvm"], 1), "python_driver": python_peak, "tree": round(peaks["tree"], 1)},
        "load_average_before": before,
        "load_average_after": load_average(),
    }


# --- ours -----------------------------------------------------------------------------------------


def ours(stream_csv: str, data_dir: str, out_dir: str, master: str, shuffle_partitions: int) -> dict[str, Any]:
    """The product's job: session start + read_csv_inputs + run_settlement (its CSV outputs)."""
    started = time.perf_counter()
    from cardpipe.batch.settlement_job import read_csv_inputs, run_settlement
    from cardpipe.batch.spark import build_spark_session

    spark = build_spark_session(master, shuffle_partitions=shuffle_partitions)
    session_seconds = time.perf_counter() - started
    try:
        data = Path(data_dir)
        inputs = read_csv_inputs(spark, Path(stream_csv), data / "cards.csv", data / "customers.csv")
        summary = run_settlement(spark, inputs, Path(out_dir))
        conf = {k: spark.conf.get(k) for k in ("spark.sql.shuffle.partitions", "spark.driver.memory")}
        cpu = tree_cpu_seconds()
    finally:
        spark.stop()
    return {
        "wall_seconds": round(time.perf_counter() - started, 3),
        "session_seconds": round(session_seconds, 3),
        "cpu_seconds": cpu,
        "job_seconds": summary.seconds,
        "summary": summary.__dict__,
        "conf": conf,
    }


# --- ours over JDBC (MariaDB) ---------------------------------------------------------------------

LOADS = {  # table -> (file in the data or stream folder, columns, SET clause)
    "stream_transactions": (
        STREAM_FILE,
        "transaction_id, card_id, merchant_name, `timestamp`, amount, location, transaction_type, @related, status, "
        "@pending, decline_reason",
        # One partition, one checkpoint: the bench settles every decision (watermark {0: 1}).
        "SET related_transaction_id = NULLIF(@related, ''), pending_balance = NULLIF(@pending, ''), "
        "kafka_partition = 0, checkpoint_seq = 1",
    ),
    "customers": ("customers.csv", "customer_id, name, phone_number, address, email, credit_score, annual_income", ""),
    "cards": (
        "cards.csv",
        "card_id, customer_id, card_type_id, card_number, expiration_date, credit_limit, current_balance, issue_date",
        "",
    ),
}


def load_jdbc_inputs(env: dict[str, str], stream_csv: Path, data_dir: Path) -> dict[str, Any]:
    """The benchmark's own database, emptied, with the product's schema; the three batch inputs loaded with
    LOAD DATA LOCAL INFILE (not timed as part of the job)."""
    from cardpipe.serving import schema

    common.drop_mysql_database(env, recreate=True)
    engine = _engine(env)
    try:
        schema.metadata.create_all(engine)
    finally:
        engine.dispose()
    started = time.perf_counter()
    conn = common.pymysql_connect(env, local_infile=True, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SET foreign_key_checks = 0, unique_checks = 0")
            for table, (file, columns, extra) in LOADS.items():
                path = stream_csv if file == STREAM_FILE else data_dir / file
                cur.execute(
                    f"LOAD DATA LOCAL INFILE %s INTO TABLE `{table}` CHARACTER SET utf8mb4 FIELDS TERMINATED BY ',' "
                    f"OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' LINES TERMINATED BY '\\n' IGNORE 1 LINES ({columns}) "
                    f"{extra}",
                    (str(path),),
                )
        conn.commit()
    finally:
        conn.close()
    return {"load_seconds": round(time.perf_counter() - started, 1)}


def _engine(env: dict[str, str]) -> Any:
    from cardpipe.serving.database import make_engine

    return make_engine(common.settings(env, WORK_DIR, WORK_DIR).database_url)


def ours_jdbc(env: dict[str, str], out_dir: str, master: str, read_partitions: int) -> dict[str, Any]:
    """The Spark engine on MySQL: read the three inputs over JDBC (the decisions at or below the watermark, in
    parallel id ranges), settle, write the CSV files (the job writes no table; publishing is left out)."""
    started = time.perf_counter()
    from cardpipe.batch.settlement_job import read_jdbc_inputs, run_settlement
    from cardpipe.batch.spark import build_spark_session, jdbc_options_from_url

    spark = build_spark_session(master)
    session_seconds = time.perf_counter() - started
    try:
        options = jdbc_options_from_url(common.settings(env, WORK_DIR, WORK_DIR).database_url)
        inputs = read_jdbc_inputs(spark, options, partitions=read_partitions, watermark={0: 1})
        partitions = inputs.transactions.rdd.getNumPartitions()
        summary = run_settlement(spark, inputs, Path(out_dir))
        cpu = tree_cpu_seconds()
    finally:
        spark.stop()
    return {
        "wall_seconds": round(time.perf_counter() - started, 3),
        "session_seconds": round(session_seconds, 3),
        "cpu_seconds": cpu,
        "job_seconds": summary.seconds,
        "read_partitions": partitions,
        "summary": summary.__dict__,
    }


# --- the seed's approach --------------------------------------------------------------------------


def seed(stream_csv: str, data_dir: str, out_dir: str, master: str) -> dict[str, Any]:
    """The seed's settlement: floats from inferSchema, Python UDFs, orderBy + coalesce(1) per output."""
    started = time.perf_counter()
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, IntegerType, StringType

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (
        SparkSession.builder.master(master)
        .appName("seed-batch")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    session_seconds = time.perf_counter() - started
    try:
        data = Path(data_dir)
        read = spark.read.option("header", "true").option("inferSchema", "true").option("escape", '"')
        transactions = read.csv(stream_csv)
        cards = read.csv(str(data / "cards.csv"))
        customers = read.csv(str(data / "customers.csv"))

        @F.udf(StringType())
        def settle_status(status: str) -> str:
            return "approved" if status == "pending" else status

        @F.udf(IntegerType())
        def score_change(balance: float, limit: float) -> int:
            utilization = balance / limit * 100 if limit else (0.0 if balance <= 0 else 101.0)
            if utilization <= 10:
                return 15
            if utilization <= 20:
                return 10
            if utilization <= 30:
                return 5
            if utilization <= 50:
                return -5
            if utilization <= 70:
                return -15
            return -25

        @F.udf(DoubleType())
        def new_limit(limit: float, change: int) -> float:
            if change is None or change >= 0:
                return limit
            factor = 0.85 if change <= -20 else 0.90 if change <= -10 else 0.95
            return float(round(limit * factor, -2))

        batch = transactions.withColumn("status", settle_status(F.col("status")))
        approved = (
            batch.filter(F.col("status") == "approved").groupBy("card_id").agg(F.sum("amount").alias("approved_total"))
        )
        balances = (
            cards.join(approved, "card_id", "left")
            .withColumn("current_balance", F.col("current_balance") + F.coalesce(F.col("approved_total"), F.lit(0.0)))
            .drop("approved_total")
        )
        changes = (
            balances.groupBy("customer_id")
            .agg(F.sum("current_balance").alias("total_balance"), F.sum("credit_limit").alias("total_limit"))
            .withColumn("score_change", score_change(F.col("total_balance"), F.col("total_limit")))
            .select("customer_id", "score_change")
        )
        cards_updated = (
            balances.join(changes, "customer_id", "left")
            .withColumn("credit_limit", new_limit(F.col("credit_limit"), F.col("score_change")))
            .select(*cards.columns)
        )
        customers_updated = (
            customers.join(changes, "customer_id", "left")
            .withColumn(
                "credit_score",
                F.when(F.col("score_change").isNull(), F.col("credit_score")).otherwise(
                    F.greatest(F.lit(300), F.least(F.lit(850), F.col("credit_score") + F.col("score_change")))
                ),
            )
            .select(*customers.columns)
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, df in (
            ("batch_transactions", batch),
            ("cards_updated", cards_updated),
            ("customers_updated", customers_updated),
        ):
            folder = out / f"{name}_spark"
            (
                df.orderBy(OUTPUT_KEYS[name])
                .coalesce(1)
                .write.mode("overwrite")
                .option("header", "true")
                .option("timestampFormat", "yyyy-MM-dd HH:mm:ss")
                .csv(str(folder))
            )
            part = next(folder.glob("part-*.csv"))
            shutil.move(str(part), str(out / f"{name}.csv"))
            shutil.rmtree(folder)
        cpu = tree_cpu_seconds()
    finally:
        spark.stop()
    return {
        "wall_seconds": round(time.perf_counter() - started, 3),
        "session_seconds": round(session_seconds, 3),
        "cpu_seconds": cpu,
    }


# --- comparing the outputs ------------------------------------------------------------------------


def _same(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 0.005
    except ValueError:
        return a.strip() == b.strip()


def compare_outputs(ours_dir: Path, seed_dir: Path) -> dict[str, Any]:
    """Row by row, both files sorted by key: rows, rows that agree (numbers within 0.005), examples."""
    report: dict[str, Any] = {}
    for name, key in OUTPUT_KEYS.items():
        with (
            (ours_dir / f"{name}.csv").open(newline="", encoding="utf-8") as a_file,
            (seed_dir / f"{name}.csv").open(newline="", encoding="utf-8") as b_file,
        ):
            a_rows, b_rows = csv.DictReader(a_file), csv.DictReader(b_file)
            rows = agree = extra = 0
            examples: list[Any] = []
            for a in a_rows:
                rows += 1
                b = next(b_rows, None)
                if b is not None and a[key] == b[key] and all(_same(a[c], b[c]) for c in COMPARED[name]):
                    agree += 1
                elif len(examples) < 3:
                    examples.append(
                        {
                            "ours": {c: a[c] for c in (key, *COMPARED[name])},
                            "seed": b and {c: b.get(c) for c in (key, *COMPARED[name])},
                        }
                    )
            extra = sum(1 for _ in b_rows)
        report[name] = {"rows": rows, "agree": agree, "seed_extra_rows": extra, "examples": examples}
    report["identical"] = all(
        r["rows"] == r["agree"] and not r["seed_extra_rows"] for r in report.values() if isinstance(r, dict)
    )
    return report


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--shuffle-partitions", type=int, default=0, help="ours: 0 = the job's automatic choice")
    parser.add_argument(
        "--seed-sample",
        type=int,
        default=0,
        help="run the seed's approach on the first K stream rows and extrapolate (0 = all)",
    )
    parser.add_argument("--skip", choices=("ours", "seed"), action="append", default=[])
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument(
        "--jdbc",
        action="store_true",
        help="also ours over JDBC on the private MariaDB (database --bench-db, dropped after)",
    )
    parser.add_argument("--jdbc-partitions", type=int, default=4, help="parallel reads of the stream table")
    parser.add_argument("--bench-db", default="cardpipe_batchbench")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "batch.json")
    args = parser.parse_args()

    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    data = dataset(args.transactions, args.seed)
    stream_csv = stream_results(data)
    report["dataset"] = {
        "path": str(data),
        "counts": dataset_counts(data),
        "stream": json.loads((stream_csv.parent / ".complete.json").read_text()),
        "stream_csv_mb": round(stream_csv.stat().st_size / 2**20, 1),
    }
    n = args.transactions
    work = WORK_DIR / "batch"
    rows: list[list[Any]] = []
    if "ours" not in args.skip:
        out = fresh_dir(work / "ours")
        say(f"ours: {n:,} transactions on {args.master}")
        result = run_measured(ours, str(stream_csv), str(data), str(out), args.master, args.shuffle_partitions)
        report["ours"] = result
        rows.append(
            [
                "ours",
                n,
                result["wall_seconds"],
                result["session_seconds"],
                rate(n, result["wall_seconds"]),
                result["cpu_seconds"],
                result["peak_rss_mb"]["jvm"],
                result["peak_rss_mb"]["python_driver"],
                result["peak_rss_mb"]["tree"],
                "",
            ]
        )
    if "seed" not in args.skip:
        sample = args.seed_sample if 0 < args.seed_sample < n else n
        seed_csv = stream_csv if sample == n else stream_sample(stream_csv, sample)
        out = fresh_dir(work / "seed")
        say(f"seed: {sample:,} transactions on {args.master}")
        result = run_measured(seed, str(seed_csv), str(data), str(out), args.master)
        result["sample"] = sample
        label = ""
        if sample < n:
            session = result["session_seconds"]
            result["extrapolated_wall_seconds"] = round(session + (result["wall_seconds"] - session) * n / sample, 1)
            label = f"EXTRAPOLATED from {sample:,} rows ({result['wall_seconds']:.1f}s)"
        report["seed"] = result
        seconds = result.get("extrapolated_wall_seconds", result["wall_seconds"])
        rows.append(
            [
                "seed",
                n,
                seconds,
                result["session_seconds"],
                rate(n, seconds),
                result["cpu_seconds"] if sample == n else None,
                result["peak_rss_mb"]["jvm"],
                result["peak_rss_mb"]["python_driver"],
                result["peak_rss_mb"]["tree"],
                label,
            ]
        )
        if "ours" in report and not args.no_compare:
            if sample == n:
                say("comparing the outputs")
                report["comparison"] = compare_outputs(work / "ours", work / "seed")
            else:
                report["comparison"] = "skipped: the seed ran on a sample"
    if args.jdbc:
        env = common.mysql_env(args.bench_db)
        try:
            say(f"loading the inputs into MariaDB database {args.bench_db}")
            loaded = load_jdbc_inputs(env, stream_csv, data)
            out = fresh_dir(work / "jdbc")
            say(f"ours over JDBC: {n:,} transactions on {args.master}")
            result = run_measured(ours_jdbc, env, str(out), args.master, args.jdbc_partitions)
            result.update(loaded)
            if "ours" in report:
                result["csv_identical_to_ours"] = all(
                    filecmp.cmp(out / f"{name}.csv", work / "ours" / f"{name}.csv", shallow=False)
                    for name in OUTPUT_KEYS
                )
        finally:
            common.drop_mysql_database(env)
        report["ours_jdbc"] = result
        rows.append(
            [
                "ours JDBC",
                n,
                result["wall_seconds"],
                result["session_seconds"],
                rate(n, result["wall_seconds"]),
                result["cpu_seconds"],
                result["peak_rss_mb"]["jvm"],
                result["peak_rss_mb"]["python_driver"],
                result["peak_rss_mb"]["tree"],
                f"read in {result['read_partitions']} ranges",
            ]
        )
    print_table(
        f"Batch settlement, {n:,} transactions, {args.master} (wall time includes the session start)",
        ["job", "transactions", "wall s", "session s", "tx/s", "CPU s", "JVM MB", "python MB", "tree MB", "note"],
        rows,
    )
    if "ours" in report and "seed" in report:
        seed_seconds = report["seed"].get("extrapolated_wall_seconds", report["seed"]["wall_seconds"])
        report["speedup_seed_over_ours"] = round(seed_seconds / report["ours"]["wall_seconds"], 2)
        comparison = report.get("comparison")
        identical = ("yes" if comparison["identical"] else "NO") if isinstance(comparison, dict) else comparison
        print_table(
            "Ratio",
            ["", "seed s / ours s", "target", "outputs agree"],
            [["ours vs seed", report["speedup_seed_over_ours"], ">= 3", identical]],
        )
        if isinstance(comparison, dict):
            print_table(
                "Output comparison (ours vs seed, numbers within 0.005)",
                ["output", "rows", "agree", "seed extra"],
                [
                    [k, v["rows"], v["agree"], v["seed_extra_rows"]]
                    for k, v in comparison.items()
                    if isinstance(v, dict)
                ],
            )
    for job in ("ours", "ours_jdbc"):
        if job in report:
            steps = report[job]["summary"].get("steps", {})
            print_table(
                f"{job}: where the time goes (s)",
                ["session start", "read + settle + write (job)", *steps],
                [[report[job]["session_seconds"], report[job]["job_seconds"], *steps.values()]],
            )
    report["load_average_at_end"] = load_average()
    write_json(args.out, report)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
