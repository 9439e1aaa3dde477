"""The batch layer's two engines behind one call: the embedded one (DuckDB) and Spark.

Both compute SPEC §4 from the ORIGINAL ``cards`` and ``customers`` and the decisions at or below a
watermark (SPEC §9), and write the same three CSV files (:data:`~cardpipe.batch.outputs.OUTPUTS`) into a
folder; neither writes the database (publishing a settlement is the caller's). ``auto`` picks Spark only
when a cluster is configured (a Spark master other than ``local[...]``, or a Spark Connect remote).

On SQLite the embedded engine runs in a process of its own (:mod:`cardpipe.batch.apart`).

Spark reads the serving database over JDBC on MySQL/MariaDB (a subquery filtered by the watermark) and,
on SQLite, from CSV exports of the settling decisions, cards and customers in a temporary folder inside the
output folder. A Spark cluster (a master that is not local, or Spark Connect) reads and writes files on its
own machines: the output folder must then be on a file system they share, at the same path.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cardpipe.batch.apart import SettleProcess, settle_embedded_apart
from cardpipe.batch.outputs import SettledRows, SettlementSummary
from cardpipe.batch.spark import local_cores
from cardpipe.errors import ConfigError, DatabaseUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from cardpipe.config import Settings

log = logging.getLogger(__name__)

AUTO, EMBEDDED, SPARK = "auto", "embedded", "spark"
ENGINES = (AUTO, EMBEDDED, SPARK)
Progress = Callable[[str], None]


def choose_engine(requested: str, spark_master: str | None, spark_remote: str | None) -> str:
    """The engine to run, ``embedded`` or ``spark``, for the requested one (``auto|embedded|spark``).

    ``auto`` is Spark only when a cluster is configured: a Spark Connect remote (``sc://…``) or a Spark
    master other than ``local``/``local[...]``; else the embedded engine. :class:`ConfigError` for any other
    name, or a remote that is no ``sc://`` URL.
    """
    name = (requested or "").strip().lower()
    if name not in ENGINES:
        raise ConfigError(
            f"batch engine must be one of {', '.join(ENGINES)} (CARDPIPE_BATCH_ENGINE), got {requested!r}"
        )
    remote = (spark_remote or "").strip()
    if remote and not remote.startswith("sc://"):
        raise ConfigError("SPARK_REMOTE must be a Spark Connect URL sc://host:port")
    if name != AUTO:
        return name
    master = (spark_master or "").strip()
    if remote or (master and local_cores(master) is None):
        return SPARK
    return EMBEDDED


#: The folder (inside the output folder) of the inputs the Spark engine reads on SQLite, one per settlement.
SPARK_INPUTS_PREFIX = ".spark-inputs-"


def run_engine(
    name: str,
    settings: Settings,
    watermark: Mapping[int, int],
    out_dir: Path,
    *,
    progress: Progress | None = None,
    on_settled: Callable[[SettledRows], None] | None = None,
    settle_process: SettleProcess | None = None,
) -> SettlementSummary:
    """Settle the decisions at or below ``watermark`` (partition → last checkpoint_seq) of
    ``settings.database_url`` with the engine ``name`` (``auto`` resolved by :func:`choose_engine`) and write
    ``batch_transactions.csv``, ``cards_updated.csv`` and ``customers_updated.csv`` into ``out_dir``.

    ``on_settled``: the embedded engine calls it with the settled rows while it writes the files (the Spark
    engine does not: its rows are in the files, :attr:`SettlementSummary.settled` is None).
    ``settle_process``: an embedded settlement's process started ahead, used on SQLite (stopped either way)."""
    engine = choose_engine(name, settings.spark_master, settings.spark_remote)
    out_dir = Path(out_dir)
    apart = engine == EMBEDDED and settings.database_url.get_backend_name() == "sqlite"
    if settle_process is not None and not apart:
        settle_process.stop()  # not needed: the engine runs here, or on Spark
    if engine == EMBEDDED:
        if progress:
            progress("settling with the embedded engine (DuckDB)")
        if apart:
            return settle_embedded_apart(
                settings.database_url,
                watermark,
                out_dir,
                progress=progress,
                on_settled=on_settled,
                process=settle_process,
            )
        from cardpipe.batch.embedded import settle_embedded

        return settle_embedded(settings.database_url, watermark, out_dir, progress=progress, on_settled=on_settled)
    try:
        with spark_session(settings, progress) as spark:
            return settle_spark(spark, settings, watermark, out_dir, progress=progress)
    finally:
        # An interrupted settlement's inputs are removed only now, once its session is stopped: a job it left running
        # would fail on the missing files and log that failure while Ctrl-C goes through.
        for left in out_dir.glob(f"{SPARK_INPUTS_PREFIX}*"):
            shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def spark_session(settings: Settings, progress: Progress | None = None) -> Iterator[SparkSession]:
    """The Spark session of ``settings`` (Spark Connect when ``spark_remote`` is set), stopped afterwards; a
    classic session already active in this process is used as it is and left running.

    On MySQL/MariaDB the JDBC driver's jar is looked for before the JVM starts (:class:`ConfigError` naming
    it when missing). Interrupted (Ctrl-C, SIGTERM: any ``BaseException`` that is not an ``Exception``), the
    session's jobs are cancelled and it is stopped without a word from the JVM; the interrupt is what is
    raised, also when a call made while unwinding from it failed (py4j's lost connection).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("the Spark batch engine needs pyspark: pip install 'cardpipe[spark]'") from None
    from cardpipe.batch.spark import (
        build_connect_session,
        build_spark_session,
        describe_remote,
        interruption,
        jdbc_driver_jar,
        quiet_when_interrupted,
        remove_scratch_dir,
        stop_spark_session,
    )

    spark: SparkSession | None = None
    if settings.spark_remote:
        if progress:
            progress(f"connecting to Spark Connect ({describe_remote(settings.spark_remote)})")
        spark = build_connect_session(settings.spark_remote)
        owned = True
    else:
        spark = SparkSession.getActiveSession()
        owned = spark is None
    interrupted = False
    try:
        if spark is None:
            jars = [str(jdbc_driver_jar())] if settings.is_mysql else []
            if progress:
                progress(f"starting Spark ({settings.spark_master})")
            spark = build_spark_session(
                settings.spark_master, shuffle_partitions=settings.spark_shuffle_partitions, jars=jars
            )
        with quiet_when_interrupted(spark):
            yield spark
    except BaseException as exc:
        interrupt = interruption(exc)
        interrupted = interrupt is not None
        if interrupt is not None and interrupt is not exc:
            raise interrupt from None  # not the failure of a call made while unwinding from it
        raise
    finally:
        if owned and spark is not None:
            stop_spark_session(spark, interrupted=interrupted)
        elif owned:  # the session did not start
            remove_scratch_dir()


def jdbc_partitions(spark_master: str) -> int:
    """Parallel JDBC reads of the stream results: two per local core (4 for a cluster)."""
    return max(2, 2 * (local_cores(spark_master) or 2))


def settle_spark(
    spark: SparkSession,
    settings: Settings,
    watermark: Mapping[int, int],
    out_dir: Path,
    *,
    progress: Progress | None = None,
) -> SettlementSummary:
    """:func:`run_engine`'s Spark engine on a given session: read the inputs (JDBC on MySQL/MariaDB; CSV
    exports on SQLite, in a temporary folder inside ``out_dir``), settle, write the three CSV files."""
    from cardpipe.batch.settlement_job import read_csv_inputs, read_jdbc_inputs, run_settlement
    from cardpipe.batch.spark import jdbc_options_from_url

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.is_mysql:
        options = jdbc_options_from_url(settings.database_url)
        if progress:
            progress(f"settling with Spark, reading {options.describe()} over JDBC")
        inputs = read_jdbc_inputs(
            spark, options, partitions=jdbc_partitions(settings.spark_master), watermark=watermark
        )
        return run_settlement(spark, inputs, out_dir, progress)
    from cardpipe.batch.spark import interruption

    staging = out_dir / f"{SPARK_INPUTS_PREFIX}{uuid.uuid4().hex[:12]}"
    interrupted = False
    try:
        if progress:
            progress("exporting the settling decisions, cards and customers for Spark")
        paths = export_inputs(settings, watermark, staging)
        if progress:
            progress("settling with Spark")
        inputs = read_csv_inputs(spark, paths["stream_transactions"], paths["cards"], paths["customers"])
        return run_settlement(spark, inputs, out_dir, progress)
    except BaseException as exc:
        interrupted = interruption(exc) is not None
        raise
    finally:
        if not interrupted:  # else a job may still read them: the session's owner removes them (run_engine)
            shutil.rmtree(staging, ignore_errors=True)


def export_inputs(settings: Settings, watermark: Mapping[int, int], folder: Path) -> dict[str, Path]:
    """Write the settling decisions (:data:`~cardpipe.domain.records.STREAM_COLUMNS`, at or below
    ``watermark``), the cards and the customers as CSV into ``folder``; their paths by table name."""
    from cardpipe.domain.records import CARD_COLUMNS, CUSTOMER_COLUMNS
    from cardpipe.serving import schema
    from cardpipe.serving.csv_io import export_table
    from cardpipe.serving.database import make_engine, translated_errors
    from cardpipe.serving.settlement_source import export_settling_decisions

    url = settings.database_url
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise DatabaseUnavailable(f"database {settings.describe_database()}: no SQLite file at {url.database}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.csv" for name in ("stream_transactions", "cards", "customers")}
    engine = make_engine(url, create_database=False)
    try:
        with translated_errors(engine), engine.connect() as conn:
            export_settling_decisions(conn, watermark, paths["stream_transactions"])
            export_table(conn, schema.cards, paths["cards"], CARD_COLUMNS)
            export_table(conn, schema.customers, paths["customers"], CUSTOMER_COLUMNS)
    finally:
        engine.dispose()
    return paths
