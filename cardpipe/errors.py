"""User-facing errors: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


class CardpipeError(Exception):
    """An error the user can act on (bad configuration, unreachable service, bad input file)."""


class ConfigError(CardpipeError):
    """The configuration is invalid or points at something that does not exist."""


class DatabaseUnavailable(CardpipeError):
    """The serving database cannot be reached or refuses the credentials."""


class BrokerUnavailable(CardpipeError):
    """The Kafka-protocol broker cannot be reached or started."""


class InputFileError(CardpipeError):
    """An input CSV is missing, lacks a column or holds a malformed row (file, line, column named)."""


class BrokerLost(BrokerUnavailable):
    """The broker went away while the stream was being consumed (its messages may be gone with it)."""


class PartitionsHeld(CardpipeError):
    """Every partition this consumer would decide is owned by another live consumer."""


class LeaseLost(CardpipeError):
    """Another consumer took over a partition this one was deciding (its lease had expired)."""


class SettlementChanged(Exception):
    """A settlement was published while a batch was decided with the previous limits: decide it again."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): one line for a report."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------------
# The one place where library exceptions become one line saying what went wrong and what to do (in the spirit of
# httpx's ``map_httpcore_exceptions``): the database (SQLAlchemy, PyMySQL, sqlite3), Kafka (confluent-kafka), Spark
# (py4j, pyspark) and the operating system (OSError). A library is looked up in ``sys.modules`` only: an error of a
# library that was never imported cannot happen, and the CLI does not pay for importing it.
# ----------------------------------------------------------------------------------------------------------------
EXIT_ERROR = 2  #: an error the user can act on (also argparse's usage errors)
EXIT_INTERNAL = 70  #: a bug (sysexits' EX_SOFTWARE)
DEBUG_VARIABLE = "CARDPIPE_DEBUG"
_MAX_DETAIL = 200  # characters of a library's own message quoted in a line

#: MySQL/MariaDB client and server error numbers: what happened and what to do.
_MYSQL_MESSAGES = {
    0: "connection closed (the server went away?): check it is running, then run the command again",
    1044: "access denied to the database: grant the user rights on it (GRANT ALL ON <db>.* TO <user>), "
    "or set DB_NAME to a database it may use",
    1045: "access denied (wrong user or password): check DB_USER and DB_PASSWORD (or DATABASE_URL)",
    1049: "unknown database: create it, or give the user the right to create it",
    1040: "too many connections: close other clients or raise the server's max_connections",
    1142: "the user lacks a privilege for this statement: grant it ALL on the database",
    1146: "a cardpipe table is missing: run `cardpipe setup` first",
    1205: "lock wait timeout: another session holds a lock; wait for it to end, then run the command again",
    1213: "deadlock with another session: run the command again",
    1021: "the database server's disk is full: free space on it",
    1114: "a table is full (the database server's disk?): free space on it",
    2002: "cannot connect (is the server running and the host/port right?)",
    2003: "cannot connect (is the server running and the host/port right?)",
    2005: "unknown host: check DB_HOST",
    2006: "lost connection to the server (it went away): check it is running, then run the command again",
    2013: "lost connection during query: check the server is running, then run the command again",
}
#: SQLite primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``).
_SQLITE_MESSAGES = {
    5: "the SQLite file is locked by another process: wait for the other cardpipe command to end, or stop it",
    8: "the SQLite file is read-only: make it and its folder writable, or choose another --results-dir",
    10: "disk I/O error on the SQLite file: check the disk and free space, then run the command again",
    11: "the SQLite file is corrupt: move it away and run `cardpipe setup` and `cardpipe load` again",
    13: "the disk holding the SQLite file is full: free some space, or choose another --results-dir",
    14: "cannot open the SQLite file: check its folder exists and is writable, or choose another --results-dir",
    26: "the file is not a SQLite database: move it away, or choose another --results-dir",
}
#: OS error numbers: what happened (the path follows) and what to do.
_OS_MESSAGES = {
    errno.ENOSPC: ("no space left on device", "free some space, or choose a folder on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or choose a folder on another disk"),
    errno.EACCES: ("permission denied", "make it writable (and readable) for this user, or choose another folder"),
    errno.EPERM: ("operation not permitted", "check its owner and permissions, or choose another folder"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable file system"),
    errno.ENOENT: ("no such file or folder", "check the path, or create the folder"),
    errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "check the path"),
    errno.EEXIST: ("already exists", "move it away, or choose another path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n), then run the command again"),
    errno.ENFILE: ("too many open files in the system", "close other programs, then run the command again"),
    errno.ENOMEM: ("out of memory", "close other programs or use a smaller dataset, then run the command again"),
    errno.EIO: ("input/output error", "check the disk, then run the command again"),
}
_KAFKA_UNREACHABLE = frozenset(
    {"_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE", "BROKER_NOT_AVAILABLE", "NETWORK_EXCEPTION", "_NOENT"}
)
_KAFKA_TIMEOUT = frozenset({"_TIMED_OUT", "_MSG_TIMED_OUT", "REQUEST_TIMED_OUT", "_TIMED_OUT_QUEUE"})
_KAFKA_NO_TOPIC = frozenset({"UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC", "_UNKNOWN_PARTITION"})
_KAFKA_DENIED = frozenset(
    {
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        "_AUTHENTICATION",
        "SASL_AUTHENTICATION_FAILED",
        "_SSL",
    }
)
_KAFKA_CONFIG = frozenset({"_INVALID_ARG", "_UNSUPPORTED_FEATURE", "_NOT_IMPLEMENTED"})
_SPARK_HINT = "see Spark's log above, or set CARDPIPE_DEBUG=1 for the Java trace"


@dataclass(frozen=True)
class ErrorContext:
    """What a command was working with, named in a message when the exception does not say it."""

    database_url: URL | None = None  #: named (password hidden) in database errors
    kafka_servers: str | None = None  #: the broker, named in Kafka errors
    folder: Path | None = None  #: where files were being written, for an OSError without a file name
    secrets: tuple[str, ...] = ()  #: never shown: replaced by ``***`` in every line

    def redact(self, text: str) -> str:
        secrets = list(self.secrets)
        if self.database_url is not None and self.database_url.password:
            secrets.append(str(self.database_url.password))
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def _clip(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 3] + "..."


def _library(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes ``module.<name>`` of a library already imported (none if it was not)."""
    loaded = sys.modules.get(module)
    found = (getattr(loaded, name, None) for name in names) if loaded is not None else ()
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))


def describe_database_error(url: URL | None, exc: BaseException) -> str:
    """One line for a database failure (SQLAlchemy's, PyMySQL's or sqlite3's), never containing the password."""
    where = f"database {url.render_as_string(hide_password=True)}" if url is not None else "serving database"
    orig = getattr(exc, "orig", None) or exc
    args: tuple[object, ...] = tuple(getattr(orig, "args", None) or ())
    code = args[0] if args and isinstance(args[0], int) else None
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if code in _MYSQL_MESSAGES:
        detail = f"{_MYSQL_MESSAGES[code]} [MySQL error {code}]"
    elif isinstance(sqlite_code, int) and sqlite_code & 0xFF in _SQLITE_MESSAGES:
        detail = f"{_SQLITE_MESSAGES[sqlite_code & 0xFF]} [{_clip(str(orig))}]"
    elif code is not None and len(args) > 1 and _clip(str(args[1])):  # PyMySQL: (number, the server's message)
        detail = f"{_clip(str(args[1]))} [MySQL error {code}]"
    elif code is not None:
        detail = f"MySQL error {code} without a message: check the server's log, then run the command again"
    else:
        detail = _clip(str(orig)) or type(orig).__name__
    return ErrorContext(database_url=url).redact(f"{where}: {detail}")


def os_error_advice(exc: OSError) -> tuple[str, str]:
    """What an operating-system error means and what to do about it: ("no space left on device", "free ...")."""
    if exc.errno in _OS_MESSAGES:
        return _OS_MESSAGES[exc.errno]
    return (exc.strerror or _clip(str(exc)) or type(exc).__name__), "check it, then run the command again"


def describe_os_error(exc: OSError, folder: Path | None = None) -> str:
    """One line for an operating-system error: what happened, to which path, and what to do."""
    what, todo = os_error_advice(exc)
    target = str(exc.filename) if exc.filename is not None else (f"writing in {folder}" if folder else "")
    if exc.filename2 is not None:
        target = f"{target} -> {exc.filename2}"
    return f"{what}: {target}: {todo}" if target else f"{what}: {todo}"


def kafka_error_text(exc: BaseException) -> str:
    """The text of a confluent-kafka error (the ``KafkaError`` inside a ``KafkaException``), else of ``exc``."""
    err = exc.args[0] if exc.args else None
    if err is not None and hasattr(err, "str"):
        return _clip(str(err.str()))
    return _clip(str(exc) or type(exc).__name__)


def describe_kafka_error(exc: BaseException, servers: str | None = None) -> str:
    """One line for a confluent-kafka ``KafkaException`` (the ``KafkaError`` inside names the failure)."""
    err = exc.args[0] if exc.args else None
    name = str(err.name()) if err is not None and hasattr(err, "name") else ""
    text = kafka_error_text(exc)
    broker = f"Kafka broker {servers}" if servers else "the Kafka broker"
    if name in _KAFKA_UNREACHABLE:
        todo = "start it, or check KAFKA_BOOTSTRAP_SERVERS (unset it for the embedded broker)"
        return f"{broker} is unreachable ({text}): {todo}"
    if name in _KAFKA_TIMEOUT:
        return f"{broker} did not answer in time ({text}): check it is running and not overloaded, then run again"
    if name in _KAFKA_NO_TOPIC:
        return f"{broker}: the topic does not exist ({text}): run `cardpipe produce` first, or check KAFKA_TOPIC"
    if name in _KAFKA_DENIED:
        return f"{broker} refused access ({text}): check the client's credentials and the broker's ACLs"
    if name in _KAFKA_CONFIG:
        return f"Kafka client settings refused ({text}): check the KAFKA_* settings"
    return f"{broker}: {text} [{name or 'Kafka error'}]: check the broker is running and healthy, then run again"


def _java_class(exc: BaseException) -> str:
    """The class of the Java exception behind a py4j/pyspark error ('' when unknown or the JVM is gone)."""
    throwable = getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)
    try:
        return str(throwable.getClass().getName()) if throwable is not None else ""
    except Exception:  # the JVM is gone
        return ""


def _spark_text(exc: BaseException) -> str:
    try:
        return str(exc)  # a Py4JJavaError asks the JVM for its trace
    except Exception:
        return str(getattr(exc, "errmsg", "") or type(exc).__name__)


def _java_causes(exc: BaseException) -> list[str]:
    """Messages of the Java exception chain behind a PySpark/Py4J error, outermost first."""
    throwable = getattr(exc, "_origin", None) or getattr(exc, "java_exception", None)
    messages: list[str] = []
    try:
        for _ in range(12):
            if throwable is None:
                break
            message = throwable.getMessage()
            if message:
                messages.append(f"{throwable.getClass().getSimpleName()}: {message}")
            throwable = throwable.getCause()
    except Exception:  # the gateway is gone, or not a Java error
        pass
    return messages


def spark_error_summary(exc: BaseException) -> str:
    """One line: the error's first line plus the root cause of a Java exception chain (the driver's
    SQL error: access denied, unknown database, connection refused...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    causes = _java_causes(exc)
    root = causes[-1].splitlines()[0].strip() if causes else ""
    if not root:
        match = re.search(r"(SQL\w*Exception: .+)", str(exc))
        root = match.group(1).strip() if match else ""
    if root and root not in first:
        return f"{first} (cause: {root})"
    return first


def describe_spark_error(exc: BaseException) -> str:
    """One line for a Spark failure: a Java exception (``Py4JJavaError``, pyspark's captured errors) or the lost
    Java process (``Py4JNetworkError``)."""
    network = _library("py4j.protocol", "Py4JNetworkError")
    text = _spark_text(exc)
    if (network and isinstance(exc, network)) or "Answer from Java side is empty" in text:
        return (
            "lost contact with Spark's Java process (it may have crashed, often out of memory): "
            "run the command again, or use `--engine embedded`; set CARDPIPE_DEBUG=1 for details"
        )
    java = _java_class(exc)
    if "OutOfMemoryError" in java or "OutOfMemoryError" in text:
        return "Spark ran out of memory: give it more (spark.driver.memory), or use `cardpipe batch --engine embedded`"
    if "No space left on device" in text:
        return "Spark: no space left on device: free space in its temp folder (spark.local.dir, default /tmp)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Py4JJavaError: "An error occurred while calling o42.save.", then "java.lang.X: message", then the trace.
    message = next((line for line in lines if ": " in line and not line.startswith("An error occurred")), "")
    detail = _clip(message or (lines[0] if lines else type(exc).__name__))
    if java and java.rsplit(".", 1)[-1] not in detail:
        detail = f"{java}: {detail}"
    return f"Spark failed: {detail}: {_SPARK_HINT}"


def user_message(exc: BaseException, context: ErrorContext | None = None) -> str | None:
    """The one line to show for ``exc``, or None when it is no error the user can act on (a bug).

    The single table of cardpipe's error mapping: cardpipe's own errors, then each library's.
    """
    context = context or ErrorContext()
    if isinstance(exc, CardpipeError):
        return context.redact(str(exc))
    if isinstance(exc, _library("confluent_kafka", "KafkaException")):
        return context.redact(describe_kafka_error(exc, context.kafka_servers))
    if isinstance(exc, _library("py4j.protocol", "Py4JError") + _library("pyspark.errors", "PySparkException")):
        return context.redact(describe_spark_error(exc))
    database = (
        _library("sqlalchemy.exc", "DBAPIError") + _library("pymysql.err", "MySQLError") + _library("sqlite3", "Error")
    )
    if isinstance(exc, database):
        return context.redact(describe_database_error(context.database_url, exc))
    if isinstance(exc, OSError):
        return context.redact(describe_os_error(exc, context.folder))
    if isinstance(exc, MemoryError):
        return "out of memory: close other programs or use a smaller dataset, then run the command again"
    return None


def internal_error_line(exc: BaseException, context: ErrorContext | None = None) -> str:
    """The line for a bug: its type and first line, and how to see the traceback."""
    detail = (context or ErrorContext()).redact(_clip(str(exc)))
    name = type(exc).__name__
    return (
        f"internal error: {name}: {detail} (set {DEBUG_VARIABLE}=1 for the traceback)"
        if detail
        else (f"internal error: {name} (set {DEBUG_VARIABLE}=1 for the traceback)")
    )


@contextmanager
def mapped_errors(context: ErrorContext | None = None) -> Iterator[None]:
    """Re-raise a library's exception the user can act on as a :class:`CardpipeError` with its one line."""
    try:
        yield
    except CardpipeError:
        raise
    except Exception as exc:
        message = user_message(exc, context)
        if message is None:
            raise
        raise CardpipeError(message) from exc
