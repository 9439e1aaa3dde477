"""Fast multi-row writes on the DBAPI cursor of a SQLAlchemy connection (the stream's hot path).

SQLAlchemy's per-row parameter processing costs more than SQLite's own insert; here each column's
bind processor (the dialect's own value conversion, so stored values are identical) is applied once
per value and the rows go to ``cursor.executemany`` as tuples. PyMySQL turns an ``executemany`` of an
``INSERT … VALUES`` into multi-row inserts. Identifiers come from the schema, values are parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError


class BulkWriter:
    """Insert (or upsert) tuples into ``table``'s ``columns`` in the caller's transaction."""

    def __init__(self, dialect: Dialect, table: Table, columns: Sequence[str], *,
                 upsert_keys: Sequence[str] | None = None):
        self.columns = tuple(columns)
        quote = dialect.identifier_preparer.quote
        names = ", ".join(quote(c) for c in self.columns)
        marks = ", ".join(["?" if dialect.paramstyle == "qmark" else "%s"] * len(self.columns))
        sql = f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})"
        if upsert_keys:
            updates = [c for c in self.columns if c not in upsert_keys]
            if dialect.name == "mysql":
                sql += " ON DUPLICATE KEY UPDATE " + ", ".join(f"{quote(c)} = VALUES({quote(c)})" for c in updates)
            else:
                sql += (f" ON CONFLICT ({', '.join(quote(k) for k in upsert_keys)}) DO UPDATE SET "
                        + ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in updates))
        self.sql = sql
        self.processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, proc) for i, name in enumerate(self.columns)
            if (proc := table.c[name].type._cached_bind_processor(dialect)) is not None  # noqa: SLF001
        ]

    def prepare(self, row: Sequence[Any]) -> tuple[Any, ...]:
        if not self.processors:
            return tuple(row)
        values = list(row)
        for index, proc in self.processors:
            if values[index] is not None:
                values[index] = proc(values[index])
        return tuple(values)

    def write(self, conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
        """Write ``rows`` (tuples in ``columns`` order) on ``conn``'s current transaction."""
        if not rows:
            return
        prepare = self.prepare
        params = [prepare(r) for r in rows]
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(self.sql, params)
        except conn.dialect.loaded_dbapi.Error as exc:
            # The same exception types as the rest of the code sees (IntegrityError, OperationalError…).
            raise DBAPIError.instance(self.sql, None, exc, conn.dialect.loaded_dbapi.Error,
                                      dialect=conn.dialect) from exc
        finally:
            cursor.close()
