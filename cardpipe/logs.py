"""How cardpipe logs: plain ``cardpipe: message`` lines, or one JSON object per line for log collectors.

The format is chosen once per command (``--log-format``) and recorded in the environment
(``CARDPIPE_LOG_FORMAT``) so that the child processes a command spawns log the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

FORMAT_ENV = "CARDPIPE_LOG_FORMAT"
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message (and the exception's first
    line, never a traceback)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.prefix + record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}".splitlines()[0]
        return json.dumps(entry, ensure_ascii=False)


def configure(level: int, text_format: str, log_format: str | None = None, *, json_prefix: str = "") -> None:
    """Log to stderr at ``level``: as ``text_format`` lines, or as JSON when ``log_format`` (default: the
    environment's ``CARDPIPE_LOG_FORMAT``) is ``json``."""
    chosen = log_format or os.environ.get(FORMAT_ENV, "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(json_prefix) if chosen == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    os.environ[FORMAT_ENV] = chosen  # inherited by the child processes this command starts
