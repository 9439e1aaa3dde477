"""``cardpipe card ID``, ``cardpipe customer ID``, ``cardpipe transaction ID``: one merged view in the terminal.

The same views (and, with ``--json``, the same JSON) as the HTTP API's ``/cards``, ``/customers`` and
``/transactions`` (:mod:`cardpipe.serving.views`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from sqlalchemy import Connection

from cardpipe.config import Settings
from cardpipe.orchestration.runtime import Runtime
from cardpipe.serving import views
from cardpipe.serving.database import translated_errors

#: kind -> the view that shows it.
VIEWS: dict[str, Callable[[Connection, int], dict[str, Any] | None]] = {
    "card": views.card_view,
    "customer": views.customer_view,
    "transaction": views.transaction_view,
}


def show(settings: Settings, kind: str, ident: int, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the ``kind`` view of ``ident`` (a ``key  value`` table, or one JSON object); return the exit code.

    An unknown (or not yet decided) id prints ``cardpipe: no <kind> <id> in <database>`` on stderr and returns 1.
    Database failures raise :class:`~cardpipe.errors.DatabaseUnavailable` (the CLI prints it as one line).
    """
    if kind not in VIEWS:
        raise ValueError(f"unknown view {kind!r} (one of {', '.join(VIEWS)})")
    with Runtime(settings, lock=None) as runtime:
        engine = runtime.loaded_engine(f"cardpipe {kind}")  # NotReady (what to run first) on a database never loaded
        with translated_errors(engine), engine.connect() as conn:
            view = VIEWS[kind](conn, ident)
    if view is None:
        print(f"cardpipe: no {kind} {ident} in {settings.describe_database()}", file=sys.stderr)
        return 1
    data = views.to_json(view)
    if as_json:
        out.write(json.dumps(data) + "\n")
    else:
        out.write(format_table(data))
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def format_table(data: dict[str, Any]) -> str:
    """``key  value`` lines, the values aligned in one column (``-`` for none)."""
    width = max((len(key) for key in data), default=0)
    return "".join(f"{key.ljust(width)}  {_cell(value)}\n" for key, value in data.items())
