"""The Spark session (local, a cluster master, or Spark Connect) and JDBC connection options of the batch layer.

``build_spark_session`` tunes a session for this workload (small dimension tables, one large fact table,
a machine with few cores): quiet logging, no UI, no console progress bars, adaptive execution, UTC
everywhere (so DATETIME columns and CSV timestamps are never shifted), the throughput (parallel) garbage
collector and a driver heap sized for 10M transactions, and the MariaDB JDBC driver on the class path when
it is installed (:func:`jdbc_driver_jar`). :func:`build_connect_session` opens a Spark Connect session
instead (a remote ``sc://host:port``). :func:`job_conf` sizes file splits and shuffle partitions per job.

Files: what is worth keeping between runs (the class-data archive, the log4j2 settings) lives in the cache
folder (:func:`cache_dir`, size-capped); the JVM's and Spark's temporary files go to a scratch folder of
this process in the temporary directory (``$TMPDIR/cardpipe-spark-<pid>``), removed by
:func:`stop_spark_session` (and at exit; a killed process's is removed by the next session).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cardpipe.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession
    from sqlalchemy.engine import URL

#: Debian's ``libmariadb-java``.
MARIADB_JAR = Path("/usr/share/java/mariadb-java-client.jar")
MARIADB_DRIVER = "org.mariadb.jdbc.Driver"
#: Another MariaDB Connector/J jar to use instead of :data:`MARIADB_JAR`.
JDBC_JAR_ENV = "CARDPIPE_JDBC_JAR"
#: The cache folder (default ``$XDG_CACHE_HOME/cardpipe``, else ``~/.cache/cardpipe``).
CACHE_DIR_ENV = "CARDPIPE_CACHE_DIR"
#: Most megabytes of class-data archives kept in the cache (least recently used dropped first; the archive
#: in use is always kept).
CDS_MAX_MB_ENV = "CARDPIPE_SPARK_CDS_MAX_MB"
DEFAULT_CDS_MAX_MB = 1024
#: Prefix of a process's scratch folder in the temporary directory (``<prefix><pid>``).
SCRATCH_PREFIX = "cardpipe-spark-"
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


def cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """cardpipe's cache folder: ``CARDPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cardpipe``, else
    ``~/.cache/cardpipe``; ``None`` when there is no home folder to put it in."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_DIR_ENV):
        return Path(env[CACHE_DIR_ENV]).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "cardpipe"
    try:
        return Path.home() / ".cache" / "cardpipe"
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


def _spark_cache(sub: str = "") -> Path | None:
    """``<cache>/spark[/sub]``, created (private); ``None`` when it cannot be."""
    root = cache_dir()
    if root is None:
        return None
    folder = root / "spark" / sub if sub else root / "spark"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None


def _log4j2_config_file() -> Path:
    """The log4j2 settings (:data:`_LOG4J2_PROPERTIES`), in the cache folder (a stable path: it is part of the
    JVM options that key the class-data archive), else in this process's scratch folder."""
    digest = hashlib.sha1(_LOG4J2_PROPERTIES.encode()).hexdigest()[:12]
    path = (_spark_cache() or scratch_dir()) / f"log4j2-{digest}.properties"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(_LOG4J2_PROPERTIES, encoding="utf-8")
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------- temporary files


_scratch_lock = threading.Lock()
_scratch_registered = False


def scratch_dir() -> Path:
    """This process's scratch folder for Spark and its JVM (``java.io.tmpdir``, ``spark.local.dir``):
    ``$TMPDIR/cardpipe-spark-<pid>``, created when missing; removed by :func:`remove_scratch_dir`."""
    global _scratch_registered
    folder = Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{os.getpid()}"
    with _scratch_lock:
        folder.mkdir(mode=0o700, exist_ok=True)
        if not _scratch_registered:
            atexit.register(remove_scratch_dir)
            _scratch_registered = True
    return folder


def remove_scratch_dir() -> None:
    """Remove this process's scratch folder (a later session creates it again)."""
    shutil.rmtree(Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{os.getpid()}", ignore_errors=True)


def remove_stale_temporary_files() -> None:
    """Remove what killed cardpipe processes left in the temporary directory (their scratch folders), and
    the class-data archives and log4j2 settings that earlier versions kept there."""
    tmp = Path(tempfile.gettempdir())
    uid = os.getuid()
    try:
        entries = list(tmp.glob(f"{SCRATCH_PREFIX}*"))
    except OSError:
        return
    for entry in entries:
        suffix = entry.name[len(SCRATCH_PREFIX) :]
        try:
            owned = entry.lstat().st_uid == uid
        except OSError:
            continue
        if not owned:
            continue
        dead_process = suffix.isdigit() and int(suffix) != os.getpid() and not _alive(suffix)
        if dead_process or suffix == f"cds-{uid}":  # a scratch folder; the archive folder of earlier versions
            shutil.rmtree(entry, ignore_errors=True)
        elif suffix.startswith("log4j2-") and suffix.endswith(".properties"):
            with contextlib.suppress(OSError):
                entry.unlink()


#: A JDK dynamic class-data-sharing archive's first bytes (its header, which the JVM writes last).
_CDS_MAGIC = (0xF00BABA8).to_bytes(4, "little")
#: An unfinished dump older than this was abandoned (its JVM killed while writing it).
_CDS_STALE_SECONDS = 600


def class_data_sharing_options(java_options: str) -> list[str]:
    """JVM options for class-data sharing: the classes a Spark driver loads, archived by one JVM when it
    exits and mapped by the next ones, which then start a session and run its first job with about half
    the CPU (two cores: 15 -> 8 CPU seconds, 5 s less wall time). None when ``CARDPIPE_SPARK_CDS=0`` or the
    archive folder is not usable.

    One archive per pyspark installation, java executable and ``java_options``, in the cache folder
    (``<cache>/spark/cds``, :func:`cache_dir`). Without one, this JVM dumps it at exit (unless another JVM is
    dumping it now); the next session renames a finished dump (its JVM gone and its header written) into
    place, and drops the least recently used archives beyond ``CARDPIPE_SPARK_CDS_MAX_MB`` (default 1024).
    The JVM ignores an archive it cannot use (other JDK, other class path) without a word.
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
        folder = _spark_cache("cds")
        if folder is None:
            return []
        archive = folder / f"{key}.jsa"
        dumping = _settle_dumps(folder, key, archive)
        if archive.is_file():
            os.utime(archive)  # recently used: the last one the size cap drops
        _cap_archives(folder, keep=archive)
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


def _cap_archives(folder: Path, keep: Path) -> None:
    """Drop the least recently used archives of ``folder`` while they hold more than the size cap
    (``CARDPIPE_SPARK_CDS_MAX_MB``); ``keep`` stays."""
    try:
        cap = int(float(os.environ.get(CDS_MAX_MB_ENV) or DEFAULT_CDS_MAX_MB) * 1024 * 1024)
    except ValueError:
        cap = DEFAULT_CDS_MAX_MB * 1024 * 1024
    archives = []
    for path in folder.glob("*.jsa"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            archives.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in archives)
    for _, size, path in sorted(archives, key=lambda a: a[0]):
        if total <= cap:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size


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
    """A SparkSession tuned for the settlement job; stop it with :func:`stop_spark_session`.

    ``shuffle_partitions`` 0 chooses automatically (two per core for ``local`` masters). ``jars`` are
    added to ``spark.jars``, after the MariaDB JDBC driver when that is installed. If a session already
    runs in this process it is reused and its SQL settings are updated (static settings cannot change).
    The JVM's temporary files go to :func:`scratch_dir`; py4j's log records are silenced; Ctrl-C and
    SIGTERM wait until the session is up (then it is stopped), and afterwards reach this process's own
    handlers again (not pyspark's, which calls the JVM from the signal handler while the interrupted call
    waits for it).
    """
    from pyspark.sql import SparkSession

    if shuffle_partitions < 0:
        raise ValueError("shuffle_partitions must be 0 (auto) or positive")
    quiet_py4j_logging()
    cores = local_cores(master)
    if cores is not None:
        # Bind to loopback: no host-name lookup, no "resolves to a loopback address" warning.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    partitions = shuffle_partitions or default_shuffle_partitions(master)

    installed = _installed_jdbc_jar()
    all_jars = [str(installed)] if installed else []
    all_jars += [j for j in (jars or []) if j not in all_jars]

    remove_stale_temporary_files()
    scratch = scratch_dir()
    java_options = " ".join(
        [
            "-Duser.timezone=UTC",  # JDBC DATETIME values are converted in the JVM's zone
            # Throughput collector: parsing and writing millions of rows makes short-lived garbage; on two
            # cores it costs ~20-25% less CPU than G1 (measured with bench/batch_bench.py).
            "-XX:+UseParallelGC",
            "-XX:MetaspaceSize=256m",  # no full collections while Spark loads its classes
            "-XX:-UsePerfData",  # no /tmp/hsperfdata_<user>/<pid> file (jps/jstat do not see the JVM)
            f"-Dlog4j2.configurationFile={_log4j2_config_file().as_uri()}",
            *extra_java_options.split(),
        ]
    )
    # The temporary folder (also spark.local.dir's default: shuffle and spill files) is left out of the options
    # that key the class-data archive (it varies by pid).
    driver_options = [java_options, f"-Djava.io.tmpdir={scratch}", *class_data_sharing_options(java_options)]
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", driver_memory)
        .config("spark.driver.extraJavaOptions", " ".join(driver_options))
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

    try:
        with _signals_held():
            spark = builder.getOrCreate()
    except BaseException as exc:  # interrupted (held until the JVM was up), or the session failed to start
        if not isinstance(exc, Exception):
            _stop_active_context()
        raise
    spark.sparkContext.setLogLevel("WARN")
    # getOrCreate may return a running session: make the runtime SQL settings hold anyway.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    spark.conf.set("spark.sql.adaptive.enabled", "true")
    if partitions:
        spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    spark.conf.set(AUTO_SHUFFLE_PARTITIONS, "true" if shuffle_partitions == 0 else "false")
    return spark


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM over the block, then restore this process's handlers and give them what came.

    Interrupted while pyspark starts its JVM, Python gives up waiting for it but the JVM then runs on with
    nobody to stop it; once pyspark's context is up it installs its own SIGINT handler (cancel the jobs,
    ``KeyboardInterrupt``), which is replaced by this process's own again at the end of the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[signal.Signals] = []
    previous = {signum: signal.getsignal(signum) for signum in _INTERRUPTS}
    for signum in previous:
        signal.signal(signum, lambda received, _frame: held.append(signal.Signals(received)))
    try:
        yield
    finally:
        _restore_handlers(previous)
        if held:
            _pass_on(previous[held[0]], held[0], None)


#: The signals that interrupt a Spark session's owner.
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _restore_handlers(previous: Mapping[signal.Signals, Any]) -> None:
    for signum, handler in previous.items():
        if handler is not None:
            signal.signal(signum, handler)


def _pass_on(handler: Any, signum: int, frame: FrameType | None) -> None:
    """Give ``signum`` to ``handler`` (a signal's handler as ``signal.getsignal`` tells it): call it, or, when it
    is the default action, take that (this process ends as the signal says); an ignored signal stays so."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def quiet_when_interrupted(spark: SparkSession) -> Iterator[None]:
    """Over the block, Ctrl-C and SIGTERM first turn the JVM's logging off, then reach this process's handlers.

    The interrupt unwinds the py4j call that runs a job; the JVM then interrupts the job's thread, and the
    aborted job logs its errors with their stack traces, racing :func:`stop_spark_session`, which turns the
    logging off only afterwards. Here a thread of its own (its own py4j connection: the waiting one is busy)
    turns it off first, waiting for it at most :data:`_QUIETING_SECONDS`. Main thread only, and only with a
    SparkContext (Spark Connect has none: its server logs on its own host).
    """
    try:
        context = spark.sparkContext
    except Exception:  # Spark Connect
        context = None
    if context is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in _INTERRUPTS}

    def quiet_then_pass_on(received: int, frame: FrameType | None) -> None:
        quieting = threading.Thread(target=lambda: context.setLogLevel("OFF"), name="quiet-jvm", daemon=True)
        quieting.start()
        quieting.join(_QUIETING_SECONDS)
        _pass_on(previous[signal.Signals(received)], received, frame)

    for signum in previous:
        signal.signal(signum, quiet_then_pass_on)
    try:
        yield
    finally:
        _restore_handlers(previous)


#: How long an interrupt waits for the JVM's logging to be turned off before it is passed on.
_QUIETING_SECONDS = 2.0


def _stop_active_context() -> None:
    """Stop this process's SparkContext, if one started, without a word from its JVM."""
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    if context is not None:
        with contextlib.suppress(Exception):
            context.setLogLevel("OFF")
            context.stop()


def stop_spark_session(spark: SparkSession, *, interrupted: bool = False) -> None:
    """Stop ``spark`` and remove this process's scratch folder.

    ``interrupted`` (Ctrl-C or SIGTERM while a job may still run): the JVM's logging is turned off and the
    jobs cancelled first, so that stopping prints none of the aborted jobs' errors; when the JVM no longer
    answers (an interrupted call can leave the gateway unusable) it is killed, never left running.
    """
    try:
        if not interrupted:
            spark.stop()
            return
        with contextlib.suppress(Exception):  # Spark Connect has no SparkContext; the gateway may be gone
            context = spark.sparkContext
            context.setLogLevel("OFF")
            context.cancelAllJobs()
        try:
            spark.stop()
        except Exception:
            _kill_gateway_jvm()
    finally:
        remove_scratch_dir()


def _kill_gateway_jvm() -> None:
    """Kill the JVM pyspark started in this process (its gateway does not answer any more)."""
    from pyspark import SparkContext

    process = getattr(SparkContext._gateway, "proc", None)
    if process is not None and process.poll() is None:
        process.kill()
        with contextlib.suppress(Exception):
            process.wait(10)


def interruption(exc: BaseException) -> BaseException | None:
    """The interrupt (``KeyboardInterrupt``, SIGTERM's exception: any ``BaseException`` that is not an
    ``Exception``) that ``exc`` is or that it happened while handling (a py4j call made while unwinding from
    Ctrl-C fails with ``Py4JNetworkError``), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if not isinstance(current, Exception):
            return current
        seen.add(id(current))
        current = current.__context__
    return None


class _Py4jRootRecords(logging.Filter):
    """Drops the records py4j logs on the root logger (``logging.exception(...)`` with a traceback, when a
    call is interrupted or the JVM is gone); the exception itself reaches the caller anyway."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.pathname.startswith(self.folder))


def quiet_py4j_logging() -> None:
    """Silence py4j (the Java gateway): its own loggers, and its records on the root logger. Idempotent."""
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    try:
        import py4j
    except ImportError:  # pragma: no cover - pyspark depends on it
        return
    folder = os.path.dirname(os.path.abspath(py4j.__file__)) + os.sep
    root = logging.getLogger()
    if not any(isinstance(f, _Py4jRootRecords) for f in root.filters):
        root.addFilter(_Py4jRootRecords(folder))


def _installed_jdbc_jar() -> Path | None:
    try:
        return jdbc_driver_jar()
    except ConfigError:
        return None


def jdbc_driver_jar(environ: Mapping[str, str] | None = None) -> Path:
    """The MariaDB JDBC driver's jar: ``CARDPIPE_JDBC_JAR``, else :data:`MARIADB_JAR` (Debian's
    ``libmariadb-java``). :class:`~cardpipe.errors.ConfigError` naming the path looked at and how to get it
    when there is none (check it before starting a JVM)."""
    env = os.environ if environ is None else environ
    configured = (env.get(JDBC_JAR_ENV) or "").strip()
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        raise ConfigError(
            f"{JDBC_JAR_ENV}={configured}: no such file; point it at a MariaDB Connector/J jar, or unset it "
            f"to use {MARIADB_JAR} (apt-get install libmariadb-java)"
        )
    if MARIADB_JAR.is_file():
        return MARIADB_JAR
    raise ConfigError(
        f"Spark reads MySQL/MariaDB over JDBC and needs the MariaDB JDBC driver, which is not installed "
        f"(no {MARIADB_JAR}): install it with `apt-get install libmariadb-java`, set {JDBC_JAR_ENV} to a "
        "MariaDB Connector/J jar, or use the embedded engine (--engine embedded)"
    )


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
