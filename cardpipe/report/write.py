"""Writing ``results/run.json`` and ``results/report.html``, each atomically (a temporary file, then
``os.replace``): a reader never sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from cardpipe.report.facts import RunFacts, gather_facts, stage_seconds_from_json
from cardpipe.report.html import render_report

RUN_JSON = "run.json"
REPORT_HTML = "report.html"


def _write_atomically(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_run_json(results_dir: Path, facts: RunFacts | Mapping[str, Any]) -> Path:
    """Write ``results_dir/run.json``; returns its path."""
    document = facts.to_json() if isinstance(facts, RunFacts) else facts
    return _write_atomically(Path(results_dir) / RUN_JSON, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def write_report(results_dir: Path, facts: RunFacts | Mapping[str, Any]) -> Path:
    """Write ``results_dir/report.html``; returns its path."""
    document = facts.to_json() if isinstance(facts, RunFacts) else facts
    return _write_atomically(Path(results_dir) / REPORT_HTML, render_report(document))


def read_run_json(results_dir: Path) -> dict[str, Any] | None:
    """An existing ``results_dir/run.json``, or None when there is none or it cannot be read."""
    try:
        document = json.loads((Path(results_dir) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def write_run_report(
    engine: Engine, results_dir: Path, stage_seconds: Mapping[str, float] | None = None
) -> tuple[Path, Path]:
    """Gather the facts and write run.json and report.html; returns their paths.

    Without ``stage_seconds`` (``cardpipe report``), those of an existing run.json are carried over.
    """
    if stage_seconds is None:
        previous = read_run_json(results_dir)
        stage_seconds = stage_seconds_from_json(previous) if previous is not None else {}
    facts = gather_facts(engine, stage_seconds)
    document = facts.to_json()
    return write_run_json(results_dir, document), write_report(results_dir, document)
