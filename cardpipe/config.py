"""Configuration: one immutable value object built from the environment and an optional ``.env`` file.

Every setting is documented in ``.env.example``. With nothing configured, cardpipe runs on embedded
defaults: a SQLite file inside the results folder, an embedded Kafka-protocol broker, Spark ``local[*]``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cardpipe.errors import ConfigError, os_error_advice

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"
DEFAULT_TOPIC = "credit-card-transactions"
SQLITE_FILENAME = "cardpipe.db"
MAX_CONSUMER_BATCH_SIZE = 1_000_000  # confluent-kafka refuses to consume more messages per call
#: Messages per poll and per checkpoint (CONSUMER_BATCH_SIZE): a backlog is decided in checkpoints this large.
DEFAULT_CONSUMER_BATCH_SIZE = 20_000


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """``env[name]`` (lower case) if it is one of ``choices``, the first of them when unset."""
    value = (env.get(name) or choices[0]).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {env.get(name)!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:,}, got {value:,}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


#: cardpipe's own ``KAFKA_*`` settings; every other ``KAFKA_X_Y`` is the Kafka client's ``x.y`` (see below).
OWN_KAFKA_SETTINGS = frozenset(
    {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC", "KAFKA_PARTITIONS", "KAFKA_GROUP_ID", "KAFKA_REPLICATION_FACTOR"}
)


def kafka_client_settings(env: Mapping[str, str]) -> dict[str, str]:
    """Kafka client (librdkafka) settings passed through from the environment: ``KAFKA_SECURITY_PROTOCOL`` ->
    ``security.protocol``, ``KAFKA_SASL_MECHANISM`` -> ``sasl.mechanism``, ``KAFKA_SSL_CA_LOCATION`` ->
    ``ssl.ca.location``, and so on for every ``KAFKA_*`` that is not one of cardpipe's own."""
    return {
        name[len("KAFKA_") :].lower().replace("_", "."): value
        for name, value in sorted(env.items())
        if name.startswith("KAFKA_") and name not in OWN_KAFKA_SETTINGS and value.strip()
    }


@dataclass(frozen=True)
class Settings:
    """All of cardpipe's settings. Build with :meth:`from_env`; change with :meth:`with_`."""

    results_dir: Path
    data_dir: Path
    database_url: URL
    kafka_bootstrap_servers: str | None = None
    kafka_topic: str = DEFAULT_TOPIC
    kafka_partitions: int = 8
    kafka_group_id: str = "cardpipe"
    spark_master: str = "local[*]"
    consumer_idle_seconds: float = 5.0
    consumer_batch_size: int = DEFAULT_CONSUMER_BATCH_SIZE
    spark_shuffle_partitions: int = 0  # 0: chosen from the data size
    batch_engine: str = "auto"  # auto | embedded | spark (cardpipe.batch.engines.choose_engine)
    spark_remote: str | None = None  # a Spark Connect URL, sc://host:port
    #: librdkafka settings for every Kafka client (security, SASL, SSL...), from ``KAFKA_*`` (a configured cluster)
    kafka_client: Mapping[str, str] = field(default_factory=dict)
    #: replication factor of the topics cardpipe creates (None: 1 on the embedded broker, the cluster's default)
    kafka_replication_factor: int | None = None
    #: the stream's column-by-column path (cardpipe.stream.columnar): auto (when pyarrow is installed) | on | off
    stream_columnar: str = "auto"

    @property
    def kafka_client_in_use(self) -> Mapping[str, str]:
        """The passed-through client settings, for a configured cluster (the embedded broker takes none)."""
        return {} if self.uses_embedded_broker else self.kafka_client

    @property
    def topic_replication_factor(self) -> int:
        """What topics are created with: the setting, else 1 (embedded) or -1 (the cluster's default)."""
        if self.kafka_replication_factor is not None:
            return self.kafka_replication_factor
        return 1 if self.uses_embedded_broker else -1

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.kafka_topic}.dlq"

    @property
    def is_mysql(self) -> bool:
        return self.database_url.get_backend_name() in ("mysql", "mariadb")

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.kafka_bootstrap_servers

    def publishing_processes(self, requested: int | None, cores: int) -> int:
        """:func:`publishing_processes` for this database."""
        return publishing_processes(requested, cores, self.database_url.get_backend_name())

    def describe_database(self) -> str:
        """The database URL with the password hidden, safe for logs and errors."""
        return self.database_url.render_as_string(hide_password=True)

    def check_results_dir(self) -> None:
        """Create the results folder if needed and make sure files can be written in it, before any work is done
        (a command must not commit decisions and then fail writing their CSVs)."""
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            _probe_writable(self.results_dir)
        except OSError as exc:
            what, todo = os_error_advice(exc)
            raise ConfigError(
                f"results folder {self.results_dir} cannot be written ({what}): {todo} "
                "(--results-dir or CARDPIPE_RESULTS_DIR)"
            ) from None

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        results_dir: str | Path | None = None,
        data_dir: str | Path | None = None,
        load_dotenv_file: bool = True,
    ) -> Settings:
        """Read settings from ``env`` (default: ``os.environ`` plus ``./.env``, environment wins)."""
        if env is None:
            merged: dict[str, str] = {}
            if load_dotenv_file and Path(".env").is_file():
                from dotenv import dotenv_values

                merged.update({k: v for k, v in dotenv_values(".env").items() if v is not None})
            merged.update(os.environ)
            env = merged

        results = Path(results_dir or env.get("CARDPIPE_RESULTS_DIR") or "results").expanduser()
        data = Path(data_dir or env.get("CARDPIPE_DATA_DIR") or SAMPLE_DATA_DIR).expanduser()
        return cls(
            results_dir=results.resolve(),
            data_dir=data.resolve(),
            database_url=_database_url(env, results.resolve()),
            kafka_bootstrap_servers=(env.get("KAFKA_BOOTSTRAP_SERVERS") or "").strip() or None,
            kafka_topic=(env.get("KAFKA_TOPIC") or DEFAULT_TOPIC).strip(),
            kafka_partitions=_int(env, "KAFKA_PARTITIONS", 8),
            kafka_group_id=(env.get("KAFKA_GROUP_ID") or "cardpipe").strip(),
            spark_master=(env.get("SPARK_MASTER") or "local[*]").strip(),
            consumer_idle_seconds=_float(env, "CONSUMER_IDLE_SECONDS", 5.0),
            consumer_batch_size=_int(
                env, "CONSUMER_BATCH_SIZE", DEFAULT_CONSUMER_BATCH_SIZE, maximum=MAX_CONSUMER_BATCH_SIZE
            ),
            spark_shuffle_partitions=_int(env, "SPARK_SHUFFLE_PARTITIONS", 0, minimum=0),
            batch_engine=(env.get("CARDPIPE_BATCH_ENGINE") or "auto").strip().lower(),
            spark_remote=(env.get("SPARK_REMOTE") or "").strip() or None,
            kafka_client=kafka_client_settings(env),
            kafka_replication_factor=_int(env, "KAFKA_REPLICATION_FACTOR", 0) or None,
            stream_columnar=_choice(env, "CARDPIPE_COLUMNAR", ("auto", "on", "off")),
        )


_PROBE_BYTES = 1 << 20  # a full disk is found before the work, not by the first CSV


def _probe_writable(folder: Path) -> None:
    """Create, fill and remove a probe file in ``folder``; raise the OSError that stops it."""
    fd, name = tempfile.mkstemp(prefix=".cardpipe-probe-", dir=folder)
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
    try:
        if fallocate is not None:
            try:
                fallocate(fd, 0, _PROBE_BYTES)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it
                    raise
    finally:
        os.close(fd)
        os.unlink(name)


def publishing_processes(requested: int | None, cores: int, backend: str) -> int:
    """How many processes ``cardpipe produce`` publishes from the database in: ``requested``, or for None one
    per usable core (``cores``) on SQLite (``backend``), the only database read in shares, and one elsewhere.
    The topic's partitions cap it (one process per partition at most)."""
    if requested is not None:
        return requested
    return cores if backend == "sqlite" else 1


def backend_named(env: Mapping[str, str]) -> str:
    """The serving database's backend as the environment names it (``sqlite``, ``mysql``, ``mariadb``...),
    read without SQLAlchemy: for what the CLI starts before importing it. :class:`Settings` checks the URL."""
    raw = (env.get("DATABASE_URL") or "").strip()
    if raw:
        return raw.partition(":")[0].partition("+")[0].lower()
    return "mysql" if (env.get("DB_HOST") or "").strip() else "sqlite"


def _database_url(env: Mapping[str, str], results_dir: Path) -> URL:
    from sqlalchemy.engine import URL, make_url  # here: the CLI starts (and answers Ctrl-C) without SQLAlchemy

    raw = (env.get("DATABASE_URL") or "").strip()
    if raw:
        try:
            url = make_url(raw)
        except Exception:
            raise ConfigError("DATABASE_URL is not a valid database URL") from None
        if url.get_backend_name() == "mysql" and url.get_driver_name() in ("mysqldb", ""):
            url = url.set(drivername="mysql+pymysql")
        if url.get_backend_name() not in ("mysql", "mariadb", "sqlite"):
            raise ConfigError(f"DATABASE_URL: unsupported backend {url.get_backend_name()!r} (mysql or sqlite)")
        return url
    host = (env.get("DB_HOST") or "").strip()
    if host:
        return URL.create(
            "mysql+pymysql",
            username=env.get("DB_USER") or "root",
            password=env.get("DB_PASSWORD") or None,
            host=host,
            port=_int(env, "DB_PORT", 3306),
            database=env.get("DB_NAME") or "cardpipe",
            query={"charset": "utf8mb4"},
        )
    return URL.create("sqlite", database=str(results_dir / SQLITE_FILENAME))
