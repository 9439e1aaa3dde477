"""Two candidates for the embedded batch engine, side by side: DuckDB SQL (the product's) and SQLFrame.

    python3 bench/engine_candidates.py [--transactions 1000000] [--runs 3] [--threads 2]

Both settle (SPEC §4) the same inputs: a ``cardpipe.generate`` dataset of N transactions (cached under
bench/out/data) and its stream results ``stream_transactions.csv``, decided without Kafka by the pure domain
(``batch_bench.stream_results``). Each writes ``batch_transactions.csv``, ``cards_updated.csv`` and
``customers_updated.csv``.

* **duckdb**: the product's own code path, :func:`cardpipe.batch.embedded.settle_embedded` (its SQL from
  :mod:`cardpipe.batch.rules_sql`, its ``COPY`` writers, its summary), run by the project's interpreter
  (.venv). The only change: its ``connect`` (which attaches the serving database) is replaced by one whose
  ``serving`` schema holds three views over ``read_csv`` of the CSV files (typed as the serving schema; one
  Kafka partition, every decision at checkpoint 1, watermark ``{0: 1}``).
* **sqlframe**: the PySpark DataFrame API on DuckDB (``sqlframe.duckdb.DuckDBSession``), written here the
  way the Spark job (``cardpipe/batch/settlement_job.py``) builds its frames, rules from the constants of
  :mod:`cardpipe.domain.settlement`, exact decimals throughout. It runs in its own venv,
  bench/out/venv-sqlframe (created on first use: ``sqlframe[duckdb]`` + the product's duckdb version),
  never in the project's. Two variants (``--sqlframe-variants``, default both): ``plain``, and ``table``, the
  per-card approved sums saved with ``saveAsTable`` before the writes (SQLFrame ignores ``cache()`` on DuckDB,
  so in ``plain`` each of the three writes scans the stream file again).

Every run is a fresh process (``<venv python> bench/engine_candidates.py --worker ENGINE``), the candidates
alternated run by run, ``--runs`` times each; the table gives the median wall time of the process
(interpreter start, imports, settlement, files written), the median settlement time inside it, and the
peak RSS (``VmHWM`` of the worker; DuckDB runs in-process, so this is all of it). Both use ``--threads``
DuckDB threads.

Afterwards: the outputs of the last run of each are compared with ``/work/shared/tools/compare_results.py``
(duckdb as expected; the stream file is linked into both folders, as the tool also checks that table) and
byte for byte. Lines of code: code lines (no blanks, comments, docstrings) of what each candidate needs:
the product's SQL (rules_sql.py + the settlement part of embedded.py) plus this file's CSV adapter, against
this file's SQLFrame functions; the Spark job's module for reference. The SQLFrame side also probes which
PySpark calls of the Spark job SQLFrame's DuckDB engine lacks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import filecmp
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common  # noqa: I001  (puts the project on sys.path)
from common import (
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

from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS, STREAM_COLUMNS

PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
SQLFRAME_VENV = OUT_DIR / "venv-sqlframe"
COMPARE_TOOL = Path("/work/shared/tools/compare_results.py")
OUTPUT_FILES = ("batch_transactions.csv", "cards_updated.csv", "customers_updated.csv")
RESULT_MARK = "@@result "
#: The input columns' types (DuckDB's names), as the serving schema and the Spark job type them.
COLUMN_TYPES = {
    "transaction_id": "BIGINT",
    "card_id": "BIGINT",
    "merchant_name": "VARCHAR",
    "timestamp": "TIMESTAMP",
    "amount": "DECIMAL(12,2)",
    "location": "VARCHAR",
    "transaction_type": "VARCHAR",
    "related_transaction_id": "BIGINT",
    "status": "VARCHAR",
    "pending_balance": "DECIMAL(12,2)",
    "decline_reason": "VARCHAR",
    "customer_id": "BIGINT",
    "card_type_id": "BIGINT",
    "card_number": "VARCHAR",
    "expiration_date": "VARCHAR",
    "credit_limit": "DECIMAL(12,2)",
    "current_balance": "DECIMAL(12,2)",
    "issue_date": "DATE",
    "name": "VARCHAR",
    "phone_number": "VARCHAR",
    "address": "VARCHAR",
    "email": "VARCHAR",
    "credit_score": "INTEGER",
    "annual_income": "DECIMAL(12,2)",
}


# --- the duckdb candidate (the project's interpreter) ---------------------------------------------


def csv_views(conn: Any, stream_csv: Path, data_dir: Path) -> None:
    """Schema ``serving`` with the tables the embedded engine reads, as views over the CSV files."""
    from cardpipe.batch.rules_sql import sql_string

    conn.execute("CREATE SCHEMA serving")
    sources = {
        "stream_transactions": (stream_csv, STREAM_COLUMNS, ", 0 AS kafka_partition, 1 AS checkpoint_seq"),
        "cards": (data_dir / "cards.csv", CARD_COLUMNS, ""),
        "customers": (data_dir / "customers.csv", CUSTOMER_COLUMNS, ""),
    }
    for table, (path, columns, extra) in sources.items():
        typed = ", ".join(f"{sql_string(c)}: {sql_string(COLUMN_TYPES[c])}" for c in columns)
        conn.execute(
            f"CREATE VIEW serving.{table} AS SELECT *{extra} FROM read_csv({sql_string(str(path))}, header = true, "
            f"delim = ',', quote = '\"', escape = '\"', nullstr = '', auto_detect = false, columns = {{{typed}}})"
        )


def settle_duckdb(stream_csv: Path, data_dir: Path, out_dir: Path, threads: int, variant: str) -> dict[str, Any]:
    """``settle_embedded`` as the product runs it, its connection reading the CSV files instead."""
    import duckdb
    from sqlalchemy.engine import make_url

    from cardpipe.batch import embedded, rules_sql

    def connect(database_url: Any, *, threads: int | None = None, temp_dir: Path | None = None) -> Any:
        config: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        if threads is not None:
            config["threads"] = threads
        conn = duckdb.connect(":memory:", config=config)
        if temp_dir is not None:
            conn.execute(f"SET temp_directory = {rules_sql.sql_string(str(temp_dir))}")
        csv_views(conn, stream_csv, data_dir)
        return conn

    embedded.connect = connect  # the one replacement: everything else is the product's
    summary = embedded.settle_embedded(make_url(f"sqlite:///{stream_csv}"), {0: 1}, out_dir, threads=threads)
    return {
        "summary": {k: v for k, v in summary.__dict__.items() if k not in ("steps", "sorted_globally")},
        "steps": summary.steps,
        "duckdb": duckdb.__version__,
    }


# --- the sqlframe candidate (its own venv) --------------------------------------------------------


def sqlframe_types() -> dict[str, Any]:
    """COLUMN_TYPES as SQLFrame (PySpark) types; TIMESTAMP is TimestampNTZType: TimestampType is DuckDB's
    TIMESTAMPTZ, which the CSV writer prints with an offset ("2025-04-01 00:00:38+00")."""
    from sqlframe.duckdb import types as T

    by_name = {
        "BIGINT": T.LongType(),
        "INTEGER": T.IntegerType(),
        "VARCHAR": T.StringType(),
        "DATE": T.DateType(),
        "TIMESTAMP": T.TimestampNTZType(),
        "DECIMAL(12,2)": T.DecimalType(12, 2),
    }
    return {column: by_name[kind] for column, kind in COLUMN_TYPES.items()}


def bround_hundreds(value: Any, money: Any) -> Any:
    """``bround(value, -2)`` on exact decimals: SQLFrame has no ``bround`` on DuckDB (and DuckDB's
    ``round_even`` returns a DOUBLE), so half to even is spelt out: floor of the hundreds, plus one above a
    half, or at exactly a half when the floor is odd."""
    from decimal import Decimal

    from sqlframe.duckdb import functions as F

    hundreds = value * F.lit(Decimal("0.01"))
    whole = F.floor(hundreds)
    rest = hundreds - whole
    half = F.lit(Decimal("0.5"))
    up = F.when((rest > half) | ((rest == half) & (whole % F.lit(2) != F.lit(0))), F.lit(1)).otherwise(F.lit(0))
    return ((whole + up) * F.lit(100)).cast(money)


def sqlframe_rules() -> tuple[Any, Any, Any]:
    """(score change, limit factor, new score) column builders from the constants of the domain, as the Spark
    job's ``score_change_expr``, ``limit_factor_expr``, ``new_credit_score_expr``."""
    from sqlframe.duckdb import functions as F
    from sqlframe.duckdb import types as T

    from cardpipe.domain import settlement as rules

    def score_change(balance: Any, limit: Any) -> Any:
        first = rules.SCORE_STEPS[0][1]
        expr = F.when(
            limit <= F.lit(0), F.when(balance <= F.lit(0), F.lit(first)).otherwise(F.lit(rules.SCORE_CHANGE_ABOVE))
        )
        for bound, change in rules.SCORE_STEPS:
            expr = expr.when(balance * F.lit(100) <= F.lit(bound) * limit, F.lit(change))
        return expr.otherwise(F.lit(rules.SCORE_CHANGE_ABOVE)).cast(T.IntegerType())

    factors = [f for _, f in rules.LIMIT_FACTOR_STEPS] + [rules.LIMIT_FACTOR_OTHER_NEGATIVE]
    scale = max(-int(f.as_tuple().exponent) for f in factors)
    factor_type = T.DecimalType(max(max(f.adjusted() + 1, 1) for f in factors) + scale, scale)

    def limit_factor(change: Any) -> Any:
        expr = F.when(change >= F.lit(0), F.lit(None).cast(factor_type))
        for bound, factor in rules.LIMIT_FACTOR_STEPS:
            expr = expr.when(change <= F.lit(bound), F.lit(factor).cast(factor_type))
        return expr.otherwise(F.lit(rules.LIMIT_FACTOR_OTHER_NEGATIVE).cast(factor_type))

    def new_score(score: Any, change: Any) -> Any:
        clamped = F.greatest(F.lit(rules.SCORE_MIN), F.least(F.lit(rules.SCORE_MAX), score + change))
        return F.when(change.isNull(), score).otherwise(clamped.cast(T.IntegerType()))

    return score_change, limit_factor, new_score


def settle_sqlframe(stream_csv: Path, data_dir: Path, out_dir: Path, threads: int, variant: str) -> dict[str, Any]:
    """The settlement as SQLFrame DataFrame code; ``variant`` ``table`` saves the approved sums first."""
    import duckdb
    from sqlframe.duckdb import DuckDBSession
    from sqlframe.duckdb import functions as F
    from sqlframe.duckdb import types as T

    from cardpipe.domain.records import APPROVED, PENDING

    steps: dict[str, float] = {}
    money = T.DecimalType(12, 2)
    types = sqlframe_types()
    score_change, limit_factor, new_score = sqlframe_rules()
    with stage(steps, "session+read"):
        session = DuckDBSession(conn=duckdb.connect(":memory:", config={"threads": threads}))

        def read(path: Path, columns: tuple[str, ...]) -> Any:
            # A TimestampNTZType in a read schema reaches read_csv as "timestamp_ntz", a type DuckDB lacks:
            # read as text, then cast (a cast is translated).
            ntz = [c for c in columns if isinstance(types[c], T.TimestampNTZType)]
            schema = T.StructType([T.StructField(c, T.StringType() if c in ntz else types[c]) for c in columns])
            frame = session.read.csv(str(path), header=True, schema=schema)
            return frame.withColumns({c: F.col(c).cast(types[c]) for c in ntz}) if ntz else frame

        transactions = read(stream_csv, STREAM_COLUMNS)
        cards = read(data_dir / "cards.csv", CARD_COLUMNS)
        customers = read(data_dir / "customers.csv", CUSTOMER_COLUMNS)
    status = F.col("status")
    settled = transactions.withColumn("status", F.when(status == F.lit(PENDING), F.lit(APPROVED)).otherwise(status))
    approved = settled.where(status == F.lit(APPROVED)).groupBy("card_id").agg(F.sum("amount").alias("_approved"))
    if variant == "table":
        with stage(steps, "save:approved"):
            approved.write.saveAsTable("approved_sums")
            approved = session.table("approved_sums")
    balanced = cards.join(approved, on="card_id", how="left").withColumn(
        "current_balance", (F.col("current_balance") + F.coalesce(F.col("_approved"), F.lit(0))).cast(money)
    )
    changes = (
        balanced.groupBy("customer_id")
        .agg(F.sum("current_balance").alias("_balance"), F.sum("credit_limit").alias("_limit"))
        .select("customer_id", score_change(F.col("_balance"), F.col("_limit")).alias("_change"))
        .withColumn("_factor", limit_factor(F.col("_change")))
    )
    factor = F.col("_factor")
    limit = F.when(factor.isNull(), F.col("credit_limit")).otherwise(
        bround_hundreds(F.col("credit_limit") * factor, money)
    )
    outputs = {
        "batch_transactions": (settled.select(*STREAM_COLUMNS), "transaction_id"),
        "cards_updated": (
            balanced.join(changes, on="customer_id", how="left")
            .withColumn("credit_limit", limit)
            .select(*CARD_COLUMNS),
            "card_id",
        ),
        "customers_updated": (
            customers.join(changes.select("customer_id", "_change"), on="customer_id", how="left")
            .withColumn("credit_score", new_score(F.col("credit_score"), F.col("_change")))
            .select(*CUSTOMER_COLUMNS),
            "customer_id",
        ),
    }
    for name, (frame, key) in outputs.items():
        with stage(steps, f"csv:{name}"):  # one file each: SQLFrame's DuckDB writer COPYs the query to the path
            frame.orderBy(key).write.csv(str(out_dir / f"{name}.csv"), mode="overwrite", header=True)
    return {"steps": steps, "duckdb": duckdb.__version__, "sqlframe": _version("sqlframe")}


@contextlib.contextmanager
def stage(steps: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = round(time.perf_counter() - started, 3)


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


#: DataFrame and Column methods (PySpark's) the probe looks for in the Spark job.
SPARK_METHODS = {
    "select", "withColumn", "groupBy", "agg", "join", "where", "orderBy", "crossJoin", "collect", "persist",
    "unpersist", "sortWithinPartitions", "try_cast", "rlike", "isNull", "isNotNull", "cast", "alias", "otherwise",
    "when", "asc_nulls_first",
}  # fmt: skip


def probe_spark_job_api() -> dict[str, list[str]]:
    """The PySpark calls of cardpipe/batch/settlement_job.py that SQLFrame's DuckDB engine lacks."""
    from sqlframe.duckdb import DuckDBDataFrame, DuckDBSession
    from sqlframe.duckdb import functions as F
    from sqlframe.duckdb.column import Column

    source = (ROOT / "cardpipe" / "batch" / "settlement_job.py").read_text()
    functions = sorted(set(re.findall(r"\bF\.(\w+)\(", source)))
    frame_or_column = set(re.findall(r"\.(\w+)\(", source)) & SPARK_METHODS
    DuckDBSession().createDataFrame([(1,)], ["x"]).cache()  # logs whether cache() does anything
    return {
        "functions_missing": [f for f in functions if not hasattr(F, f)],
        "methods_missing": sorted(
            m for m in frame_or_column if not hasattr(DuckDBDataFrame, m) and not hasattr(Column, m)
        ),
        "rdd_missing": [] if hasattr(DuckDBDataFrame, "rdd") else ["DataFrame.rdd"],
    }


def probe_io(folder: Path) -> dict[str, str]:
    """What SQLFrame's DuckDB reader and writer do with Spark's CSV options and timestamp types (tiny frames)."""
    from sqlframe.duckdb import DuckDBSession
    from sqlframe.duckdb import functions as F
    from sqlframe.duckdb import types as T

    folder.mkdir(parents=True, exist_ok=True)
    session = DuckDBSession()
    text = session.createDataFrame([("2025-04-01 00:00:38", None)], ["t", "n"])
    frames = {
        "TimestampType": text.select(F.col("t").cast(T.TimestampType()).alias("t")),
        "TimestampNTZType": text.select(F.col("t").cast(T.TimestampNTZType()).alias("t")),
    }
    trials = {
        "write TimestampType": lambda path: frames["TimestampType"].write.csv(path, mode="overwrite", header=True),
        "write timestampFormat='yyyy-MM-dd HH:mm:ss'": lambda path: frames["TimestampNTZType"].write.csv(
            path, mode="overwrite", header=True, timestampFormat="yyyy-MM-dd HH:mm:ss"
        ),
        "write nullValue=''": lambda path: text.write.csv(path, mode="overwrite", header=True, nullValue=""),
        "write quoteAll=True": lambda path: text.write.csv(path, mode="overwrite", header=True, quoteAll=True),
        "write mode='append'": lambda path: text.write.csv(path, mode="append", header=True),
        "read schema with TimestampNTZType": lambda path: session.read.csv(
            str(folder / "ntz-in.csv"), header=True, schema=T.StructType([T.StructField("t", T.TimestampNTZType())])
        ).collect(),
    }
    (folder / "ntz-in.csv").write_text("t\n2025-04-01 00:00:38\n")
    results = {}
    for i, (name, trial) in enumerate(trials.items()):
        path = folder / f"probe{i}.csv"
        try:
            trial(str(path))
        except Exception as exc:  # the outcome is what is reported
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            results[name] = f"fails: {type(exc).__name__}: {message[:100]}"
            continue
        results[name] = "ok: " + path.read_text().replace("\n", " | ").strip() if path.is_file() else "ok"
    return results


# --- a worker: one settlement in this process -----------------------------------------------------

ENGINES = {"duckdb": settle_duckdb, "sqlframe": settle_sqlframe}


def worker(engine: str, variant: str, stream_csv: Path, data_dir: Path, out_dir: Path, threads: int) -> None:
    import logging

    warnings = io.StringIO()
    logging.basicConfig(stream=warnings, level=logging.WARNING)
    if variant == "probe":  # not timed: run once, after the measurements
        probes = {"probe": probe_spark_job_api(), "probe_io": probe_io(out_dir)}
        probes["warnings"] = sorted(set(warnings.getvalue().splitlines()))
        print(RESULT_MARK + json.dumps(probes, default=str), flush=True)
        return
    started = time.perf_counter()
    if engine == "duckdb":
        import duckdb  # noqa: F401

        import cardpipe.batch.embedded  # noqa: F401
    else:
        import sqlframe.duckdb  # noqa: F401
    imported = time.perf_counter()
    result = ENGINES[engine](stream_csv, data_dir, out_dir, threads, variant)
    done = time.perf_counter()
    result.update(
        {
            "import_seconds": round(imported - started, 3),
            "settle_seconds": round(done - imported, 3),
            "peak_rss_mb": common.peak_rss_mb(),
            "warnings": sorted(set(warnings.getvalue().splitlines())),
        }
    )
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)


# --- the parent -----------------------------------------------------------------------------------


def product_duckdb_version() -> str:
    return subprocess.run(
        [str(PROJECT_PYTHON), "-c", "import duckdb; print(duckdb.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def ensure_sqlframe_venv(duckdb_version: str) -> Path:
    """bench/out/venv-sqlframe with sqlframe[duckdb] and duckdb==the product's (created when missing)."""
    python = SQLFRAME_VENV / "bin" / "python"
    check = "import duckdb, sqlframe.duckdb; print(duckdb.__version__)"
    if python.is_file():
        found = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == duckdb_version:
            return python
    say(f"creating {SQLFRAME_VENV}: sqlframe[duckdb] with duckdb=={duckdb_version}")
    subprocess.run([sys.executable, "-m", "venv", str(SQLFRAME_VENV)], check=True)
    pip = [str(SQLFRAME_VENV / "bin" / "pip"), "install", "-q", "sqlframe[duckdb]", f"duckdb=={duckdb_version}"]
    subprocess.run(pip, check=True)
    return python


def run_candidate(
    python: Path, engine: str, variant: str, stream_csv: Path, data: Path, out: Path, threads: int
) -> dict:
    command = [str(python), str(Path(__file__).resolve()), "--worker", engine, "--variant", variant]
    command += [
        "--stream-csv",
        str(stream_csv),
        "--data-dir",
        str(data),
        "--out-dir",
        str(out),
        "--threads",
        str(threads),
    ]
    before = load_average()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine}/{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result.update({"wall_seconds": round(wall, 3), "load_average_before": before, "load_average_after": load_average()})
    return result


def run_probe(python: Path, folder: Path) -> dict[str, Any]:
    command = [str(python), str(Path(__file__).resolve()), "--worker", "sqlframe", "--variant", "probe"]
    proc = subprocess.run([*command, "--out-dir", str(folder)], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the SQLFrame probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def code_lines(path: Path, names: set[str] | None = None) -> int:
    """Lines holding code (no blank, comment or docstring lines) of a module, or of its top-level
    definitions ``names``."""
    source = path.read_text()
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    wanted: set[int] | None = None
    if names is not None:
        wanted = set()
        for node in tree.body:
            targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = [
                    t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)
                ]
            if set(targets) & names:
                wanted.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        if token.type == tokenize.ENDMARKER:
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    lines -= docstrings
    return len(lines if wanted is None else lines & wanted)


def lines_of_code() -> dict[str, Any]:
    here = Path(__file__).resolve()
    batch = ROOT / "cardpipe" / "batch"
    embedded_settle = {
        "_column_kinds", "_MONEY_COLUMNS", "csv_field", "_output_select", "_source_column", "_decisions_sql",
        "_settle_sql", "_SUMMARY_SQL", "_TABLES", "_copy_options", "settle_embedded",
    }  # fmt: skip
    product_sql = code_lines(batch / "rules_sql.py") + code_lines(batch / "embedded.py", embedded_settle)
    adapter = code_lines(here, {"csv_views", "settle_duckdb", "COLUMN_TYPES"})
    sqlframe = code_lines(here, {"sqlframe_types", "bround_hundreds", "sqlframe_rules", "settle_sqlframe"})
    return {
        "duckdb_product_sql": product_sql,
        "duckdb_csv_adapter": adapter,
        "duckdb_total": product_sql + adapter,
        "sqlframe": sqlframe + code_lines(here, {"COLUMN_TYPES"}),
        "spark_job_module_for_reference": code_lines(batch / "settlement_job.py"),
    }


def compare(expected: Path, actual: Path, stream_csv: Path) -> dict[str, Any]:
    """compare_results.py (it also checks stream_transactions: the same file is linked into both folders)
    and a byte-for-byte comparison of each output."""
    for folder in (expected, actual):
        link = folder / "stream_transactions.csv"
        link.unlink(missing_ok=True)
        link.symlink_to(stream_csv)
    proc = subprocess.run(
        ["nice", sys.executable, str(COMPARE_TOOL), str(expected), str(actual)], capture_output=True, text=True
    )
    return {
        "compare_results_exit": proc.returncode,
        "compare_results_output": proc.stdout.strip().splitlines() + proc.stderr.strip().splitlines()[-3:],
        "byte_identical": {name: filecmp.cmp(expected / name, actual / name, shallow=False) for name in OUTPUT_FILES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per candidate (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads of both candidates")
    parser.add_argument("--sqlframe-variants", default="plain,table", help="plain and/or table (comma separated)")
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "engine_candidates.json")
    # The worker side (run by the parent in the candidate's interpreter).
    parser.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--stream-csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.variant, args.stream_csv, args.data_dir, args.out_dir, args.threads)
        return

    from batch_bench import stream_results

    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    duckdb_version = product_duckdb_version()
    sqlframe_python = ensure_sqlframe_venv(duckdb_version)
    data = dataset(args.transactions, args.seed)
    stream_csv = stream_results(data)
    report["dataset"] = {"path": str(data), "counts": dataset_counts(data), "stream_csv": str(stream_csv)}
    candidates = [("duckdb", "product", PROJECT_PYTHON)]
    candidates += [("sqlframe", v.strip(), sqlframe_python) for v in args.sqlframe_variants.split(",") if v.strip()]
    work = WORK_DIR / "engine_candidates"
    runs: dict[str, list[dict[str, Any]]] = {f"{e}/{v}": [] for e, v, _ in candidates}
    for i in range(args.runs):
        for engine, variant, python in candidates:  # alternated: one of each per round
            label = f"{engine}/{variant}"
            out = fresh_dir(work / label.replace("/", "-"))
            say(f"run {i + 1}/{args.runs}: {label}, {args.transactions:,} transactions")
            result = run_candidate(python, engine, variant, stream_csv, data, out, args.threads)
            wall, settle, rss = result["wall_seconds"], result["settle_seconds"], result["peak_rss_mb"]
            say(f"  {wall:.2f}s wall, settle {settle:.2f}s, peak RSS {rss} MB")
            runs[label].append(result)
    report["runs"] = runs
    report["lines_of_code"] = loc = lines_of_code()
    rows = []
    for label, results in runs.items():
        versions = results[-1].get("duckdb"), results[-1].get("sqlframe")
        rows.append(
            [
                label,
                statistics.median(r["wall_seconds"] for r in results),
                statistics.median(r["import_seconds"] for r in results),
                statistics.median(r["settle_seconds"] for r in results),
                max(r["peak_rss_mb"] for r in results),
                loc["duckdb_total"] if label.startswith("duckdb") else loc["sqlframe"],
                "duckdb " + versions[0] + (f", sqlframe {versions[1]}" if versions[1] else ""),
            ]
        )
    report["medians"] = {
        r[0]: {"wall_seconds": r[1], "import_seconds": r[2], "settle_seconds": r[3], "peak_rss_mb": r[4]} for r in rows
    }
    print_table(
        f"Embedded batch engine candidates, {args.transactions:,} transactions, {args.threads} DuckDB threads "
        f"(median of {args.runs} fresh processes, alternated)",
        ["candidate", "wall s", "import s", "settle s", "peak RSS MB (max)", "code lines", "versions"],
        rows,
    )
    print(
        f"code lines: duckdb = product SQL {loc['duckdb_product_sql']} (rules_sql.py + embedded.py settlement) "
        f"+ CSV adapter {loc['duckdb_csv_adapter']}; sqlframe = {loc['sqlframe']} in this file; "
        f"the Spark job module: {loc['spark_job_module_for_reference']}"
    )
    for label, results in runs.items():
        names = list(results[-1]["steps"])
        other = statistics.median(r["settle_seconds"] - sum(r["steps"].values()) for r in results)
        print_table(
            f"{label}: where the settlement's time goes (median s; other: building the frames or SQL, the rest)",
            [*names, "other"],
            [[*(statistics.median(r["steps"].get(n, 0.0) for r in results) for n in names), other]],
        )
    if not args.no_compare:
        expected = work / "duckdb-product"
        comparisons = {}
        for engine, variant, _ in candidates[1:]:
            say(f"comparing duckdb/product with {engine}/{variant}")
            comparisons[f"{engine}/{variant}"] = compare(expected, work / f"{engine}-{variant}", stream_csv)
        report["comparison"] = comparisons
        print_table(
            "Outputs against duckdb/product (compare_results.py: numbers within 0.005; and byte for byte)",
            ["candidate", "compare_results", *[f"{n} bytes" for n in OUTPUT_FILES]],
            [
                [label, "PASS" if c["compare_results_exit"] == 0 else "FAIL"]
                + ["same" if c["byte_identical"][n] else "differ" for n in OUTPUT_FILES]
                for label, c in comparisons.items()
            ],
        )
        for label, c in comparisons.items():
            print(f"{label}: " + " | ".join(c["compare_results_output"]))
    if len(candidates) > 1:
        say("probing SQLFrame's API and CSV input/output")
        probes = run_probe(sqlframe_python, fresh_dir(work / "probe"))
        probe = probes["probe"]
        report["sqlframe_limits"] = {"spark_job_api_missing": probe, "warnings": probes["warnings"]}
        print("\nSQLFrame (DuckDB engine) lacks, of the Spark job's PySpark calls:")
        print("  functions: " + (", ".join(probe["functions_missing"]) or "-"))
        print("  methods:   " + (", ".join(probe["methods_missing"] + probe["rdd_missing"]) or "-"))
        for warning in report["sqlframe_limits"]["warnings"]:
            print(f"  logged: {warning}")
        report["sqlframe_limits"]["io"] = probes["probe_io"]
        print("SQLFrame's CSV reader and writer on DuckDB (Spark's options are passed to DuckDB's COPY as they are):")
        for trial, outcome in probes["probe_io"].items():
            print(f"  {trial}: {outcome}")
    report["load_average_at_end"] = load_average()
    write_json(args.out, report)
    with contextlib.suppress(OSError):
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
