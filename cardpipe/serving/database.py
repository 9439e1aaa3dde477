"""Connecting to the serving database, with failures turned into one-line errors."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from cardpipe.errors import ConfigError, DatabaseUnavailable, describe_database_error
from cardpipe.serving import schema

log = logging.getLogger(__name__)

# MySQL client/server error numbers of a connection-level failure (the rest propagate as they are).
_CONNECTION_ERRORS = frozenset({1044, 1045, 2003, 2005, 2013})
#: A one-line explanation of a database failure, never containing the password (the one mapping in errors.py).
describe_error = describe_database_error


def make_engine(url: URL, *, create_database: bool = True) -> Engine:
    """An engine for ``url``; creates the SQLite folder or the MySQL database when missing."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database and url.database != ":memory:":
            from pathlib import Path

            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        _bind_none_as_null()
        return engine
    try:
        import pymysql  # noqa: F401
    except ImportError:
        raise ConfigError(
            "a MySQL/MariaDB serving database needs the mysql extra: pip install 'cardpipe[mysql]'"
        ) from None
    if create_database and url.database:
        _ensure_mysql_database(url)
    return create_engine(
        url, pool_pre_ping=True, pool_recycle=3600, connect_args={"connect_timeout": 10, "local_infile": True}
    )


def _bind_none_as_null() -> None:
    """Let Python's ``sqlite3`` bind ``None`` without searching for a way to adapt it first.

    A parameter that is not exactly an ``int``, ``float``, ``str`` or ``bytearray`` is looked up among the
    registered adapters; finding none, the module asks the protocol for ``__adapt__`` (an ``AttributeError`` raised,
    its message formatted, then cleared) and the object for ``__conform__``. For ``None`` that is several times the
    cost of binding it, in every row with an empty column. An adapter registered for ``None`` is found at once and
    gives ``None`` back, which is bound as NULL as before. Process-wide, as the module's adapters are."""
    sqlite3.register_adapter(type(None), _null)


def _null(_value: None) -> None:
    return None


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _ensure_mysql_database(url: URL) -> None:
    """Create the configured database unless it exists: a user granted rights on that database alone (without
    CREATE on the server) can use it, since MariaDB checks the CREATE privilege even for ``IF NOT EXISTS``."""
    assert url.database, "the caller checks that the URL names a database"
    server = create_engine(url._replace(database=None), connect_args={"connect_timeout": 10})
    try:
        with server.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :name"), {"name": url.database}
            ).first()
            if exists is None:
                # The name is from configuration, never from data; quote it as an identifier.
                quoted = server.dialect.identifier_preparer.quote_identifier(url.database)
                conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {quoted} CHARACTER SET utf8mb4"))
    except (OperationalError, DBAPIError) as exc:
        raise DatabaseUnavailable(describe_error(url, exc)) from None
    finally:
        server.dispose()


def check_connection(engine: Engine) -> None:
    """Raise :class:`DatabaseUnavailable` unless a trivial query succeeds."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(describe_error(engine.url, exc)) from None


@contextmanager
def translated_errors(engine: Engine) -> Iterator[None]:
    """Turn connection-level database failures inside the block into :class:`DatabaseUnavailable`."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        if isinstance(exc, DBAPIError) and not exc.connection_invalidated and not _is_connection_error(exc):
            raise
        raise DatabaseUnavailable(describe_error(engine.url, exc)) from None


def _is_connection_error(exc: DBAPIError) -> bool:
    orig = getattr(exc, "orig", None)
    code = orig.args[0] if orig is not None and getattr(orig, "args", None) else None
    return isinstance(code, int) and code in _CONNECTION_ERRORS or isinstance(exc, OperationalError)


def create_clean_schema(engine: Engine) -> None:
    """Drop every cardpipe table and create the schema anew (like the seed's ``db_setup.py``)."""
    with translated_errors(engine), engine.begin() as conn:
        if engine.dialect.name == "mysql":
            conn.execute(text("SET FOREIGN_KEY_CHECKS=0"))
        schema.drop_views(conn)
        schema.metadata.drop_all(conn)
        schema.metadata.create_all(conn)
        schema.create_views(conn)
        if engine.dialect.name == "mysql":
            conn.execute(text("SET FOREIGN_KEY_CHECKS=1"))
    log.info("created a clean schema in %s", engine.url.render_as_string(hide_password=True))


def ensure_schema(engine: Engine) -> None:
    """Create any missing cardpipe table, keeping existing data; :class:`ConfigError` when an existing table
    lacks a column this version writes (a database set up by an older cardpipe)."""
    with translated_errors(engine), engine.begin() as conn:
        schema.metadata.create_all(conn, checkfirst=True)
        inspector = inspect(conn)
        for table in schema.metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            missing = [column.name for column in table.columns if column.name not in present]
            if missing:
                raise ConfigError(
                    f"the serving database {engine.url.render_as_string(hide_password=True)} was set up by an "
                    f"older cardpipe (table {table.name} has no column {', '.join(missing)}): run `cardpipe "
                    "setup` then `cardpipe load`, or `cardpipe run`, to recreate it"
                )
        if not set(schema.BATCH_VIEWS) <= set(inspect(conn).get_view_names()):
            schema.drop_views(conn)  # tables of that name from an older schema
            schema.create_views(conn)
        elif conn.execute(select(schema.serving_state.c.id)).first() is None:
            schema.create_views(conn)


def existing_tables(engine: Engine) -> set[str]:
    with translated_errors(engine):
        return set(inspect(engine).get_table_names())
