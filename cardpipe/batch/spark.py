"""The Spark session (local, a cluster master, or Spark Connect) and JDBC connection options of the batch layer.

``build_spark_session`` tunes a session for this workload (small dimension tables, one large fact table,
a machine with few cores): quiet logging, no UI, no console progress bars, adaptive execution, UTC
everywhere (so DATETIME columns and CSV timestamps are never shifted), the throughput (parallel) garbage
collector and a driver heap sized for 10M transactions, and the Debian MariaDB JDBC driver on the class
path when it is installed. :func:`build_connect_session` opens a Spark Connect session instead (a remote
``sc://host:port``). :func:`job_conf` sizes file splits and shuffle partitions per job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession
    from sqlalchemy.engine import URL

#: Debian's ``libmariadb-java``.
MARIADB_JAR = Path("/usr/share/java/mariadb-java-client.jar")
MARIADB_DRIVER = "org.mariadb.jdbc.Driver"
#: Driver heap (local mode: the executors' too). 10M transactions read over JDBC are cached (~0.6 GB
#: columnar); a heap of 3 GB spent ~3x more time collecting garbage than 4 GB (measured at 10M). The heap
#: only grows as needed (a small job stays well below it).
DEFAULT_DRIVER_MEMORY = "4g"
#: Session setting that marks shuffle partitions chosen automatically (sized per job from its input).
AUTO_SHUFFLE_PARTITIONS = "spark.cardpipe.autoShufflePartitions"
#: Input bytes per shuffle partition when sized automatically (adaptive execution's advisory size).
SHUFFLE_PARTITION_BYTES = 64 * 1024 * 1024
#: Largest file split of a settlement's input (Spark's default ``spark.sql.files.maxPartitionBytes``).
FILE_PARTITION_BYTES = 128 * 1024 * 1024
MAX_SHUFFLE_PARTITIONS = 400

# Spark's own log4j2 defaults print INFO start-up lines; this keeps the console to warnings and errors.
_LOG4J2_PROPERTIES = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop_native.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop_native.level = error
logger.spark_utils.name = org.apache.spark.util.Utils
logger.spark_utils.level = error
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
"""

_LOCAL_MASTER = re.compile(r"^local(?:\[(\*|\d+)(?:\s*,\s*\d+)?\])?$")


def local_cores(master: str) -> int | None:
    """The number of worker threads of a ``local``/``local[N]``/``local[*]`` master, else ``None``."""
    match = _LOCAL_MASTER.match(master.strip())
    if not match:
        return None
    threads = match.group(1)
    if threads is None:
        return 1
    if threads == "*":
        return os.cpu_count() or 1
    return max(1, int(threads))


def default_shuffle_partitions(master: str) -> int | None:
    """Auto shuffle partitions: two per core for a local master; ``None`` (Spark's default) otherwise.

    Adaptive execution coalesces small shuffle partitions, so this only bounds the parallelism.
    """
    cores = local_cores(master)
    return None if cores is None else max(2, 2 * cores)


def job_conf(spark: SparkSession, input_bytes: int | None) -> dict[str, str]:
    """SQL settings for one settlement of about ``input_bytes`` of transactions (none when unknown):

    * file splits: the fewest of at most :data:`FILE_PARTITION_BYTES` that are a multiple of the cores,
      all the same size (no last wave where one core reads alone while the other waits);
    * shuffle partitions, when the session's are automatic (``build_spark_session(shuffle_partitions=0)``):
      one per :data:`SHUFFLE_PARTITION_BYTES` of input, at least the session's own (two per core), at most
      :data:`MAX_SHUFFLE_PARTITIONS`. Only a global sort of the transactions (input not in id order)
      shuffles that much; the per-card sums shuffle a few rows per card, and adaptive execution coalesces
      small partitions anyway.
    """
    if not input_bytes:
        return {}
    conf = {}
    if input_bytes > FILE_PARTITION_BYTES:  # smaller inputs: Spark already splits them in one per core
        cores = default_parallelism(spark)
        splits = _ceil_div(_ceil_div(input_bytes, FILE_PARTITION_BYTES), cores) * cores
        conf["spark.sql.files.maxPartitionBytes"] = str(_ceil_div(input_bytes, splits))
    if spark.conf.get(AUTO_SHUFFLE_PARTITIONS, "false") == "true":
        floor = int(spark.conf.get("spark.sql.shuffle.partitions") or 200)
        wanted = min(MAX_SHUFFLE_PARTITIONS, _ceil_div(input_bytes, SHUFFLE_PARTITION_BYTES))
        conf["spark.sql.shuffle.partitions"] = str(max(floor, wanted))
    return conf


def default_parallelism(spark: SparkSession) -> int:
    """The session's default parallelism (Spark Connect has no SparkContext: its configured value, else 2)."""
    try:
        return max(1, int(spark.sparkContext.defaultParallelism))
    except Exception:  # Spark Connect: PySparkNotImplementedError (pyspark's own class, no common base)
        value = spark.conf.get("spark.default.parallelism", None)
        return max(1, int(value)) if value else 2


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _log4j2_config_file() -> Path:
    digest = hashlib.sha1(_LOG4J2_PROPERTIES.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"cardpipe-spark-log4j2-{digest}.properties"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(_LOG4J2_PROPERTIES, encoding="utf-8")
        os.replace(tmp, path)
    return path


#: A JDK dynamic class-data-sharing archive's first bytes (its header, which the JVM writes last).
_CDS_MAGIC = (0xF00BABA8).to_bytes(4, "little")
#: An unfinished dump older than this was abandoned (its JVM killed while writing it).
_CDS_STALE_SECONDS = 600


def class_data_sharing_options(java_options: str) -> list[str]:
    """JVM options for class-data sharing: the classes a Spark driver loads, archived by one JVM when it
    exits and mapped by the next ones, which then start a session and run its first job with about half
    the CPU (two cores: 15 -> 8 CPU seconds, 5 s less wall time). None when ``CARDPIPE_SPARK_CDS=0`` or the
    archive folder is not usable.

    One archive per pyspark installation, java executable and ``java_options``, in a private folder of the
    temporary directory. Without one, this JVM dumps it at exit (unless another JVM is dumping it now);
    the next session renames a finished dump (its JVM gone and its header written) into place. The JVM
    ignores an archive it cannot use (other JDK, other class path) without a word.
    """
    if os.environ.get("CARDPIPE_SPARK_CDS", "1") == "0":
        return []
    try:
        import pyspark

        java_home = os.environ.get("JAVA_HOME")
        java = (Path(java_home) / "bin" / "java") if java_home else Path(shutil.which("java") or "java")
        java = java.resolve()
        stat = java.stat()
        identity = [
            pyspark.__version__,
            str(Path(pyspark.__file__).resolve().parent),
            str(java),
            str(stat.st_mtime_ns),
            str(stat.st_size),
            java_options,
        ]
        key = hashlib.sha1("\0".join(identity).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"cardpipe-spark-cds-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        archive = folder / f"{key}.jsa"
        dumping = _settle_dumps(folder, key, archive)
    except OSError:
        return []
    quiet = ["-Xlog:cds=off", "-Xlog:cds+dynamic=off"]
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}", *quiet]
    if dumping:
        return []
    return [f"-XX:ArchiveClassesAtExit={folder / f'{key}.{os.getpid()}.dump'}", *quiet]


def _settle_dumps(folder: Path, key: str, archive: Path) -> bool:
    """Move a finished dump to ``archive`` (or drop it when there is one already), drop abandoned ones;
    True while another JVM is still writing one."""
    dumping = False
    for dump in folder.glob(f"{key}.*.dump"):
        pid = dump.name.split(".")[1]
        with dump.open("rb") as handle:
            finished = handle.read(4) == _CDS_MAGIC
        if finished and not _alive(pid):
            if archive.is_file():
                dump.unlink(missing_ok=True)
            else:
                os.replace(dump, archive)
        elif not finished and time.time() - dump.stat().st_mtime > _CDS_STALE_SECONDS:
            dump.unlink(missing_ok=True)
        else:
            dumping = True
    return dumping


def _alive(pid: str) -> bool:
    """Whether the (python) process that started a dumping JVM still runs; its JVM exits after it."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def build_spark_session(
    master: str,
    *,
    app_name: str = "cardpipe-batch",
    shuffle_partitions: int = 0,
    jars: list[str] | None = None,
    driver_memory: str = DEFAULT_DRIVER_MEMORY,
    extra_java_options: str = "",
) -> SparkSession:
    """A SparkSession tuned for the settlement job.

    ``shuffle_partitions`` 0 chooses automatically (two per core for ``local`` masters). ``jars`` are
    added to ``spark.jars``, after the MariaDB JDBC driver when that is installed. If a session already
    runs in this process it is reused and its SQL settings are updated (static settings cannot change).
    """
    from pyspark.sql import SparkSession

    if shuffle_partitions < 0:
        raise ValueError("shuffle_partitions must be 0 (auto) or positive")
    cores = local_cores(master)
    if cores is not None:
        # Bind to loopback: no host-name lookup, no "resolves to a loopback address" warning.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    partitions = shuffle_partitions or default_shuffle_partitions(master)

    all_jars = [str(MARIADB_JAR)] if MARIADB_JAR.is_file() else []
    all_jars += [j for j in (jars or []) if j not in all_jars]

    java_options = " ".join(
        [
            "-Duser.timezone=UTC",  # JDBC DATETIME values are converted in the JVM's zone
            # Throughput collector: parsing and writing millions of rows makes short-lived garbage; on two
            # cores it costs ~20-25% less CPU than G1 (measured with bench/batch_bench.py).
            "-XX:+UseParallelGC",
            "-XX:MetaspaceSize=256m",  # no full collections while Spark loads its classes
            f"-Dlog4j2.configurationFile={_log4j2_config_file().as_uri()}",
            *extra_java_options.split(),
        ]
    )
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", driver_memory)
        .config("spark.driver.extraJavaOptions", " ".join([java_options, *class_data_sharing_options(java_options)]))
        .config("spark.executor.extraJavaOptions", java_options)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
        .config("spark.sql.adaptive.skewJoin.enabled", "true")
        # Cards and customers are small: let the planner broadcast them (explicit hints do too).
        .config("spark.sql.autoBroadcastJoinThreshold", str(32 * 1024 * 1024))
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        # Room for 2^18 groups in the aggregation's fast hash map (default 2^16): a card per group, per task.
        .config("spark.sql.codegen.aggregate.fastHashMap.capacityBit", "18")
        # Cached frames are re-read once or twice and memory is not short: skip the costly encoding.
        .config("spark.sql.inMemoryColumnarStorage.compressed", "false")
    )
    if cores is not None:
        builder = builder.config("spark.driver.host", "127.0.0.1")
        builder = builder.config("spark.driver.bindAddress", "127.0.0.1")
    if partitions:
        builder = builder.config("spark.sql.shuffle.partitions", str(partitions))
    if all_jars:
        builder = builder.config("spark.jars", ",".join(all_jars))

    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    # getOrCreate may return a running session: make the runtime SQL settings hold anyway.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    spark.conf.set("spark.sql.adaptive.enabled", "true")
    if partitions:
        spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    spark.conf.set(AUTO_SHUFFLE_PARTITIONS, "true" if shuffle_partitions == 0 else "false")
    return spark


class JdbcOptions(dict):
    """Spark JDBC options (a plain ``dict`` for Spark) whose ``repr``/``str`` hide the password."""

    def __repr__(self) -> str:
        shown = {k: ("***" if k.lower() == "password" else v) for k, v in self.items()}
        return f"JdbcOptions({shown!r})"

    __str__ = __repr__

    def describe(self) -> str:
        """The JDBC URL and user, safe for logs and error messages."""
        return f"{self.get('url')} as {self.get('user')!r}"


def jdbc_options_from_url(url: URL) -> JdbcOptions:
    """Spark JDBC options (url, driver, user, password) for a MySQL/MariaDB SQLAlchemy URL.

    The URL uses the ``jdbc:mysql:`` scheme with ``permitMysqlScheme`` so that Spark picks its MySQL
    dialect (backtick quoting) while the MariaDB driver serves it (SPEC §7). The password is only in the
    ``password`` option, never in the URL, and the mapping's repr hides it.
    """
    from cardpipe.errors import ConfigError

    backend = url.get_backend_name()
    if backend not in ("mysql", "mariadb"):
        raise ConfigError(f"Spark JDBC needs a MySQL/MariaDB database, not {backend!r}")
    if not url.database:
        raise ConfigError("the database URL names no database")
    host = url.host or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    port = url.port or 3306
    options = JdbcOptions(
        url=f"jdbc:mysql://{host}:{port}/{url.database}?permitMysqlScheme",
        driver=MARIADB_DRIVER,
        user=url.username or "root",
    )
    if url.password is not None:
        options["password"] = str(url.password)
    return options


#: Modules the Spark Connect client needs beyond pyspark (``pip install 'pyspark[connect]'``) → their package.
CONNECT_PACKAGES = {
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "grpc": "grpcio",
    "grpc_status": "grpcio-status",
    "google.rpc": "googleapis-common-protos",
    "zstandard": "zstandard",
}


def missing_connect_packages() -> list[str]:
    """The packages of :data:`CONNECT_PACKAGES` that are not installed."""
    missing = []
    for module, package in CONNECT_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing
            found = False
        if not found:
            missing.append(package)
    return missing


def describe_remote(remote: str) -> str:
    """A Spark Connect URL without its parameters (``;token=…``), safe for logs and errors."""
    return remote.split(";", 1)[0]


def build_connect_session(remote: str, *, app_name: str = "cardpipe-batch") -> SparkSession:
    """A Spark Connect session on ``remote`` (``sc://host:port``, parameters such as ``;token=…`` allowed),
    with the SQL settings of :func:`build_spark_session` that a client may set.

    :class:`~cardpipe.errors.ConfigError` when ``remote`` is no ``sc://`` URL or the client's packages are
    missing (naming them and ``pip install 'pyspark[connect]'``).
    """
    from cardpipe.errors import ConfigError

    if not remote.startswith("sc://"):
        raise ConfigError(f"SPARK_REMOTE must be a Spark Connect URL sc://host:port, got {describe_remote(remote)!r}")
    missing = missing_connect_packages()
    if missing:
        raise ConfigError(
            f"Spark Connect ({describe_remote(remote)}) needs the package(s) {', '.join(missing)}: "
            "pip install 'pyspark[connect]'"
        )
    from pyspark.sql import SparkSession

    from cardpipe.errors import CardpipeError, first_line

    where = describe_remote(remote)
    try:
        spark = SparkSession.builder.remote(remote).appName(app_name).getOrCreate()
        spark.conf.set("spark.sql.session.timeZone", "UTC")
        spark.conf.set("spark.sql.adaptive.enabled", "true")
        spark.conf.set(AUTO_SHUFFLE_PARTITIONS, "true")
    except ImportError as exc:  # a client package too old (pyspark checks versions on its own)
        raise ConfigError(f"Spark Connect ({where}): {first_line(exc)}; pip install 'pyspark[connect]'") from None
    except Exception as exc:  # unreachable server, refused token...
        message = first_line(exc).replace(remote, where)
        for parameter in remote.split(";")[1:]:
            value = parameter.partition("=")[2]
            if value:
                message = message.replace(value, "***")
        raise CardpipeError(f"cannot use Spark Connect at {where}: {message}") from None
    return spark
