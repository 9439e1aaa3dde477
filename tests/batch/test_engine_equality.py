"""The two batch engines give the same results: embedded (DuckDB) and Spark write byte-identical files (every
DECIMAL, every status, every field) on the seed dataset, the five peer datasets and 50,000 generated
transactions, at full and partial watermarks, from SQLite (CSV exports) and MariaDB (JDBC). Plus the engine
choice, the Spark Connect set-up errors, and the rule that pyspark is an optional extra."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from cardpipe.config import Settings
from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS
from cardpipe.errors import ConfigError
from cardpipe.serving import schema
from cardpipe.serving.csv_io import read_typed_rows
from cardpipe.serving.database import make_engine
from cardpipe.serving.settlement_source import settled_counts
from tests.batch.test_embedded_engine import (
    GENERATED_TRANSACTIONS,
    OUTPUT_FILES,
    PEER_NAMES,
    SEED_DATASET,
    Serving,
    assert_matches_reference,
    assert_only_outputs,
    build_serving,
    serving_database,
)
from tests.reference import PEER_DATASETS_DIR


def settings_for(url: URL, tmp_path: Path, **changes: Any) -> Settings:
    return Settings(results_dir=tmp_path, data_dir=tmp_path, database_url=url, spark_master="local[2]", **changes)


def counts(summary: Any) -> dict[str, int]:
    """A summary's counts (not its timings, nor what only one engine reports)."""
    timings = ("seconds", "steps", "sorted_globally", "settled")
    return {k: v for k, v in dataclasses.asdict(summary).items() if k not in timings}


def assert_engines_agree(spark: Any, url: URL, watermark: Mapping[int, int], tmp_path: Path) -> tuple[Any, Any]:
    """Both engines on the same database and watermark: the same bytes in each file, the same counts."""
    from cardpipe.batch.embedded import settle_embedded
    from cardpipe.batch.engines import settle_spark

    embedded_out, spark_out = tmp_path / "embedded", tmp_path / "spark"
    embedded = settle_embedded(url, watermark, embedded_out)
    spark_summary = settle_spark(spark, settings_for(url, tmp_path), watermark, spark_out)
    for name in OUTPUT_FILES:
        assert (spark_out / name).read_bytes() == (embedded_out / name).read_bytes(), name
    assert counts(spark_summary) == counts(embedded)
    # The embedded engine's approved count per card (the card view's settled count) is the database's own.
    engine = make_engine(url, create_database=False)
    try:
        with engine.connect() as conn:
            counted = settled_counts(conn, watermark)
    finally:
        engine.dispose()
    assert {c["card_id"]: c["settled_count"] for c in embedded.settled.cards if c["settled_count"]} == counted
    assert spark_summary.settled is None  # `cardpipe batch` reads its files and counts in the database
    # The rows it hands over for the database are those of its files, value for value.
    settled = embedded.settled
    for rows, name, table, columns, key in (
        (settled.cards, "cards_updated.csv", schema.settled_cards, CARD_COLUMNS, "card_id"),
        (settled.customers, "customers_updated.csv", schema.settled_customers, CUSTOMER_COLUMNS, "customer_id"),
    ):
        handed = sorted(({c: row[c] for c in columns} for row in rows), key=lambda row: row[key])
        assert handed == list(read_typed_rows(embedded_out / name, table, columns)), name
    assert_only_outputs(spark_out)  # the exported inputs are gone
    return embedded, spark_summary


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One local Spark session for the module (an active one is used and left running)."""
    from pyspark.sql import SparkSession

    from cardpipe.batch.spark import build_spark_session

    active = SparkSession.getActiveSession()
    session = active or build_spark_session("local[2]", app_name="cardpipe-engine-tests")
    yield session
    if active is None:
        session.stop()


# ------------------------------------------------------------------------------------------ Spark vs embedded


@pytest.mark.spark
@pytest.mark.parametrize("peer", PEER_NAMES)
def test_spark_equals_embedded_on_the_peer_datasets(
    spark: Any, peer: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    serving = serving_database(tmp_path_factory, f"peer-{peer}", PEER_DATASETS_DIR / peer)
    watermark = serving.full_watermark()
    embedded, _ = assert_engines_agree(spark, serving.url, watermark, tmp_path)
    assert_matches_reference(tmp_path / "spark", serving, watermark)
    assert embedded.transactions == len(serving.decisions)


@pytest.mark.spark
def test_spark_equals_embedded_on_generated_transactions(
    spark: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    serving = serving_database(tmp_path_factory, "generated", transactions=GENERATED_TRANSACTIONS)
    full = serving.full_watermark()
    embedded, spark_summary = assert_engines_agree(spark, serving.url, full, tmp_path / "full")
    assert embedded.transactions == len(serving.decisions) >= GENERATED_TRANSACTIONS
    assert_matches_reference(tmp_path / "full" / "spark", serving, full)
    # A partial watermark (a partition absent): Spark reads only the settling decisions too.
    partial = {0: full[0] // 3, 2: full[2] - 1, 3: 2}
    embedded, _ = assert_engines_agree(spark, serving.url, partial, tmp_path / "partial")
    assert embedded.transactions == len(serving.settling(partial)) < len(serving.decisions)
    assert_matches_reference(tmp_path / "partial" / "spark", serving, partial)
    print(f"\n50k settlement: embedded {embedded.seconds:.2f}s, spark {spark_summary.seconds:.2f}s (session running)")


@pytest.mark.spark
def test_run_engine_runs_either_engine_on_the_seed_dataset(
    spark: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """run_engine with each name; Spark's files equal the embedded engine's byte for byte (and the seed's
    expected results, which test_embedded_engine.py checks for the embedded engine)."""
    from cardpipe.batch.engines import run_engine

    serving = serving_database(tmp_path_factory, "seed", SEED_DATASET / "input", unknown_cards=0)
    watermark = serving.full_watermark()
    messages: list[str] = []
    summaries = {}
    for name in ("embedded", "spark", "auto"):
        out = tmp_path / name
        summaries[name] = run_engine(
            name, settings_for(serving.url, tmp_path), watermark, out, progress=messages.append
        )
        assert_matches_reference(out, serving, watermark)
        assert_only_outputs(out)
    for name in OUTPUT_FILES:
        assert (tmp_path / "spark" / name).read_bytes() == (tmp_path / "embedded" / name).read_bytes(), name
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "embedded" / name).read_bytes(), name
    assert counts(summaries["spark"]) == counts(summaries["embedded"]) == counts(summaries["auto"])
    assert summaries["embedded"].transactions == 400 and summaries["spark"].sorted_globally == ()
    assert any("embedded" in m for m in messages) and any("Spark" in m for m in messages)
    assert not spark.sparkContext._jsc.sc().isStopped()  # the active session was used, not stopped


@pytest.mark.spark
def test_an_interrupted_spark_settlement_keeps_its_inputs_until_the_session_is_done_with(
    spark: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: Ctrl-C while a job ran removed the CSV inputs it was reading, before the session was stopped; the
    job then failed on the missing file and the JVM logged the failure (the Ctrl-C test's rare noise)."""
    from cardpipe.batch import settlement_job
    from cardpipe.batch.engines import SPARK_INPUTS_PREFIX, run_engine, settle_spark

    serving = serving_database(tmp_path_factory, "seed", SEED_DATASET / "input", unknown_cards=0)
    watermark = serving.full_watermark()
    read: list[Path] = []

    def interrupted(spark_: Any, inputs: Any, out_dir: Path, progress: Any = None) -> Any:
        read.extend(sorted(out_dir.glob(f"{SPARK_INPUTS_PREFIX}*")))
        raise KeyboardInterrupt

    monkeypatch.setattr(settlement_job, "run_settlement", interrupted)
    with pytest.raises(KeyboardInterrupt):
        settle_spark(spark, settings_for(serving.url, tmp_path), watermark, tmp_path / "alone")
    assert read and all(folder.is_dir() for folder in read), "left for the session's owner"
    read.clear()
    with pytest.raises(KeyboardInterrupt):
        run_engine("spark", settings_for(serving.url, tmp_path), watermark, tmp_path / "engine")
    assert read and not any(folder.exists() for folder in read), "removed once the session is done with"
    # Not interrupted: removed by settle_spark itself (the equality tests above leave only the outputs).


# ------------------------------------------------------------------------------------------ MariaDB over JDBC


@pytest.mark.mysql
@pytest.mark.spark
def test_spark_over_jdbc_equals_embedded_on_mariadb(spark: Any, mysql_database: URL, tmp_path: Path) -> None:
    from cardpipe.batch.settlement_job import read_jdbc_inputs
    from cardpipe.batch.spark import jdbc_options_from_url

    build_serving(mysql_database, SEED_DATASET / "input")
    serving = Serving.read(mysql_database)
    full = serving.full_watermark()
    for label, watermark in (("full", full), ("partial", {0: 3, 1: full[1], 3: 1})):
        assert_engines_agree(spark, mysql_database, watermark, tmp_path / label)
        assert_matches_reference(tmp_path / label / "spark", serving, watermark)
    # The watermark is applied in the database: Spark reads only the settling decisions, in id ranges.
    inputs = read_jdbc_inputs(spark, jdbc_options_from_url(mysql_database), partitions=3, watermark={1: 2})
    ids = sorted(r["transaction_id"] for r in inputs.transactions.select("transaction_id").collect())
    assert ids == sorted(d["transaction_id"] for d in serving.settling({1: 2}))
    assert inputs.transactions.rdd.getNumPartitions() == 3


# ------------------------------------------------------------------------------------------ choosing an engine


@pytest.mark.parametrize(
    ("requested", "master", "remote", "expected"),
    [
        ("auto", "local[*]", None, "embedded"),
        ("auto", "local", None, "embedded"),
        ("auto", "local[2]", "", "embedded"),
        ("auto", None, None, "embedded"),
        ("AUTO", "spark://cluster:7077", None, "spark"),
        ("auto", "yarn", None, "spark"),
        ("auto", "local[*]", "sc://spark.example:15002", "spark"),
        ("embedded", "spark://cluster:7077", "sc://spark.example:15002", "embedded"),
        ("spark", "local[2]", None, "spark"),
        (" Spark ", None, None, "spark"),
    ],
)
def test_choose_engine(requested: str, master: str | None, remote: str | None, expected: str) -> None:
    from cardpipe.batch.engines import choose_engine

    assert choose_engine(requested, master, remote) == expected


def test_choose_engine_refuses_unknown_names_and_remotes() -> None:
    from cardpipe.batch.engines import choose_engine

    for name in ("duckdb", "", "local"):
        with pytest.raises(ConfigError, match="auto, embedded, spark"):
            choose_engine(name, "local[*]", None)
    with pytest.raises(ConfigError, match="sc://host:port"):
        choose_engine("auto", "local[*]", "http://spark.example:15002")


def test_settings_read_the_engine_and_the_remote() -> None:
    settings = Settings.from_env(
        {"CARDPIPE_BATCH_ENGINE": " Spark ", "SPARK_REMOTE": " sc://h:15002/;token=t "}, load_dotenv_file=False
    )
    assert (settings.batch_engine, settings.spark_remote) == ("spark", "sc://h:15002/;token=t")
    defaults = Settings.from_env({}, load_dotenv_file=False)
    assert (defaults.batch_engine, defaults.spark_remote) == ("auto", None)


def test_spark_connect_without_its_client_packages_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cardpipe.batch import spark as spark_module
    from cardpipe.batch.engines import run_engine

    monkeypatch.setattr(spark_module, "missing_connect_packages", lambda: ["grpcio", "pyarrow"])
    settings = settings_for(
        URL.create("sqlite", database=str(tmp_path / "x.db")),
        tmp_path,
        spark_remote="sc://spark.example:15002/;token=Secret-T0ken",
    )
    with pytest.raises(ConfigError, match=r"grpcio, pyarrow: pip install 'pyspark\[connect\]'") as failure:
        run_engine("auto", settings, {0: 1}, tmp_path / "out")
    assert "Secret-T0ken" not in str(failure.value) and "sc://spark.example:15002/" in str(failure.value)
    assert set(spark_module.CONNECT_PACKAGES.values()) >= {"grpcio", "pyarrow", "pandas"}
    # Not a Spark Connect URL at all.
    with pytest.raises(ConfigError, match="sc://host:port"):
        spark_module.build_connect_session("spark.example:15002")


def test_pyspark_is_only_imported_by_the_spark_engine() -> None:
    """Everything but settlement_job.py and spark.py imports without pyspark (the ``cardpipe[spark]`` extra)."""
    code = (
        "import sys\n"
        "import cardpipe.batch.outputs, cardpipe.batch.engines, cardpipe.batch.embedded, cardpipe.batch.rules_sql\n"
        "import cardpipe.batch.spark, cardpipe.serving.settlement_source, cardpipe.config\n"
        "assert not [m for m in sys.modules if m.startswith('pyspark')], 'pyspark imported'\n"
        "import cardpipe.batch.settlement_job\n"
        "assert 'pyspark' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from cardpipe.batch import outputs, settlement_job

    assert settlement_job.SettlementSummary is outputs.SettlementSummary and settlement_job.OUTPUTS is outputs.OUTPUTS
