"""Core statements run on the driver's own cursor, for the few hot reads where SQLAlchemy's execution layer
(its result objects, a ``Row`` per row, type processors) costs more than the query itself: the API's card view
(one row), the messages ``produce`` publishes (every transaction, already rendered by the database) and the lines
of ``stream_transactions.csv`` on MySQL/MariaDB (rendered by the server too).

The statement is compiled once per dialect by SQLAlchemy; it must bind only integers and plain strings (no bind
processors to apply), and its values come back as the driver gives them. Driver errors become SQLAlchemy's
:class:`~sqlalchemy.exc.DBAPIError`, a dead connection invalidated, as SQLAlchemy's own execution does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Select
from sqlalchemy.exc import DBAPIError

__all__ = ["DriverQuery"]


class DriverQuery:
    """A Core ``statement`` compiled once per dialect and run on the driver's cursor."""

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self.keys = [str(column.key) for column in statement.selected_columns]
        self._compiled: dict[tuple[str, str, str], tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}

    def first(self, conn: Connection, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The first row as a dict of the statement's column keys, or None."""
        sql, args = self._prepared(conn, params)
        with self._cursor(conn, sql, args, streaming=False) as cursor, _driver_errors(conn, sql, args, cursor):
            row = cursor.fetchone()
        return None if row is None else dict(zip(self.keys, row, strict=True))

    def rows(self, conn: Connection, params: Mapping[str, Any] | None = None, *, chunk: int) -> Iterator[Any]:
        """Every row as the driver's tuple, fetched ``chunk`` at a time: without holding the whole result (a
        server-side cursor on MySQL/MariaDB; SQLite's cursor steps as rows are fetched)."""
        for rows in self.chunks(conn, params, chunk=chunk):
            yield from rows

    def chunks(self, conn: Connection, params: Mapping[str, Any] | None = None, *, chunk: int) -> Iterator[list[Any]]:
        """:meth:`rows` a list of up to ``chunk`` rows at a time, as the driver fetched them."""
        sql, args = self._prepared(conn, params)
        with self._cursor(conn, sql, args, streaming=True) as cursor:
            fetch = cursor.fetchmany
            while True:
                with _driver_errors(conn, sql, args, cursor):
                    rows = fetch(chunk)
                if not rows:
                    return
                yield rows  # the list fetchmany made

    def rendered(self, conn: Connection, params: Mapping[str, Any] | None = None) -> str:
        """The statement's text with its values quoted in, exactly as PyMySQL sends it (MySQL/MariaDB)."""
        sql, args = self._prepared(conn, params)
        dbapi_connection: Any = conn.connection.dbapi_connection
        cursor = dbapi_connection.cursor()
        try:
            return str(cursor.mogrify(sql, args))
        finally:
            cursor.close()

    def _prepared(self, conn: Connection, params: Mapping[str, Any] | None) -> tuple[str, Any]:
        """The dialect's SQL and the driver's arguments for ``params`` (the statement's own constants included)."""
        dialect = conn.dialect
        key = (dialect.name, dialect.driver, dialect.paramstyle)
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.statement.compile(dialect=dialect)
            order = tuple(compiled.positiontup or ()) if dialect.positional else None
            entry = self._compiled[key] = (str(compiled), order, dict(compiled.construct_params(params)))
        sql, order, constants = entry
        values = {**constants, **params} if params else constants
        return sql, tuple(values[name] for name in order) if order is not None else values

    @contextmanager
    def _cursor(self, conn: Connection, sql: str, args: Any, *, streaming: bool) -> Iterator[Any]:
        """A cursor that has executed ``sql``; closed on leaving."""
        dbapi_connection: Any = conn.connection.dbapi_connection
        with _driver_errors(conn, sql, args):
            cursor = dbapi_connection.cursor(*_streaming_cursor(conn) if streaming else ())
        try:
            with _driver_errors(conn, sql, args, cursor):
                cursor.execute(sql, args)
            yield cursor
        finally:
            cursor.close()


def _streaming_cursor(conn: Connection) -> tuple[Any, ...]:
    """The driver's cursor class that streams a result from the server, as arguments of ``cursor()``: PyMySQL's
    ``SSCursor`` (its default cursor reads the whole result first); none is needed elsewhere."""
    if conn.dialect.driver == "pymysql":
        return (conn.dialect.loaded_dbapi.cursors.SSCursor,)
    return ()


@contextmanager
def _driver_errors(conn: Connection, sql: str, args: Any, cursor: Any = None) -> Iterator[None]:
    """A driver error as SQLAlchemy's execution would raise it: a DBAPIError, a dead connection discarded."""
    dialect = conn.dialect
    driver_error = dialect.loaded_dbapi.Error
    try:
        yield
    except driver_error as exc:
        lost = dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(sql, args, exc, driver_error, connection_invalidated=lost) from exc
