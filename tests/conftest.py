"""Shared fixtures: paths, a clean environment, and MariaDB databases for the MySQL tests.

MariaDB: ``scripts/test.sh`` starts the private server (``scripts/mariadb.sh``) and exports
``DB_HOST``/``DB_PORT``/``DB_USER``/``DB_PASSWORD``. Run pytest directly and, without
``DB_HOST``, the fixtures start that server themselves (it keeps running afterwards:
``bash scripts/mariadb.sh stop``). A test that needs MariaDB fails when none can be had;
it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.reference import SEED_DATASET

REPO_ROOT = Path(__file__).resolve().parent.parent
MARIADB_SCRIPT = REPO_ROOT / "scripts" / "mariadb.sh"

DB_ENV_VARS = ("DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME")
SERVICE_ENV_VARS = (*DB_ENV_VARS, "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def seed_dataset() -> Path:
    return SEED_DATASET


@pytest.fixture
def clean_env() -> dict[str, str]:
    """``os.environ`` without the database and Kafka settings: the embedded defaults apply."""
    return {k: v for k, v in os.environ.items() if k not in SERVICE_ENV_VARS}


def _mariadbd_available() -> bool:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("mariadbd", path=path) is not None


def _start_private_mariadb() -> dict[str, str]:
    """Start ``scripts/mariadb.sh`` (idempotent) and return the env it prints."""
    for action in ("start", "env"):
        proc = subprocess.run(
            ["bash", str(MARIADB_SCRIPT), action],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"`bash scripts/mariadb.sh {action}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
                pytrace=False,
            )
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if words and words[0] == "export":
            for word in words[1:]:
                name, _, value = word.partition("=")
                env[name] = value
    missing = [name for name in DB_ENV_VARS if name not in env]
    if missing:
        pytest.fail(f"`scripts/mariadb.sh env` printed no {', '.join(missing)}", pytrace=False)
    return env


@pytest.fixture(scope="session")
def mysql_url() -> URL:
    """URL of the MariaDB server, without a database (tests create their own)."""
    if os.environ.get("DB_HOST"):
        env = dict(os.environ)
    elif _mariadbd_available():
        env = _start_private_mariadb()
    else:
        pytest.fail(
            "MySQL tests need a MariaDB server: set DB_HOST/DB_PORT/DB_USER/DB_PASSWORD, "
            "or install mariadb-server (`bash scripts/install.sh --test`) so that "
            "scripts/mariadb.sh can start a private one; `bash scripts/test.sh` does both.",
            pytrace=False,
        )
    return URL.create(
        "mysql+pymysql",
        username=env.get("DB_USER") or "root",
        password=env.get("DB_PASSWORD") or None,
        host=env["DB_HOST"],
        port=int(env.get("DB_PORT") or 3306),
    )


@pytest.fixture
def mysql_database(mysql_url: URL) -> Iterator[URL]:
    """A fresh, empty database (``cardpipe_test_<hex>``), dropped after the test."""
    name = f"cardpipe_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(
        mysql_url.set(query={"charset": "utf8mb4"}),
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=True,
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    except Exception as exc:
        admin.dispose()
        pytest.fail(
            f"cannot create a database on MariaDB at {mysql_url.host}:{mysql_url.port} as {mysql_url.username}: {exc}",
            pytrace=False,
        )
    try:
        yield mysql_url.set(database=name, query={"charset": "utf8mb4"})
    finally:
        try:
            with admin.connect() as conn:
                # Connections the test left open (an open transaction holds metadata locks
                # that would block DROP DATABASE): end them first.
                own_id = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
                ids = conn.execute(
                    text("SELECT id FROM information_schema.processlist WHERE db = :db AND id <> :own"),
                    {"db": name, "own": own_id},
                ).scalars()
                for conn_id in list(ids):
                    with contextlib.suppress(Exception):  # it may have ended meanwhile
                        conn.execute(text(f"KILL CONNECTION {int(conn_id)}"))
                conn.execute(text("SET SESSION lock_wait_timeout = 60"))
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        finally:
            admin.dispose()


@pytest.fixture
def mysql_env(mysql_database: URL) -> dict[str, str]:
    """``DB_*`` variables that point a subprocess (the CLI) at ``mysql_database``."""
    return {
        "DB_HOST": str(mysql_database.host),
        "DB_PORT": str(mysql_database.port or 3306),
        "DB_USER": str(mysql_database.username),
        "DB_PASSWORD": mysql_database.password or "",
        "DB_NAME": str(mysql_database.database),
    }


@pytest.fixture(params=["sqlite", "mysql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """The same test on the embedded SQLite file and on a fresh MariaDB database."""
    if request.param == "sqlite":
        return URL.create("sqlite", database=str(tmp_path / "cardpipe.db"))
    return request.getfixturevalue("mysql_database")
