"""What the seed's scripts (db_setup.py, serving_processor.py, stream_processor.py, batch_processor.py, main.py)
share: run a ``cardpipe`` command with an interpreter that has cardpipe's packages, and stop the embedded
broker once the stream that needed it is done.

* Interpreter: the current one when it has cardpipe and its dependencies installed; else the script starts
  again with the project's virtual environment (``.venv/bin/python`` next to this file), so that
  ``python3 db_setup.py`` works without activating it; else one line naming ``bash scripts/install.sh``.
* Embedded broker (it keeps messages in memory only, and outlives the command that started it):
  ``stream_processor.py produce`` never stops it (the consumer has yet to read what it published) but notes
  when it started it; ``stream_processor.py consume`` and ``main.py`` stop it when they are done, if they
  started it or ``produce`` did. A broker started otherwise (``cardpipe broker start``, another consumer)
  is left running.

Standard library only up to the point where the interpreter is known to have cardpipe's packages.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parent
VENV_DIR = REPO_ROOT / ".venv"
VENV_PYTHON = VENV_DIR / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
#: Set in the environment of the restarted script (only restart once).
RESTARTED_ENV = "CARDPIPE_SEED_RESTARTED"
#: In the results folder: the pid of the embedded broker a seed ``produce`` started (for ``consume`` to stop).
PRODUCER_BROKER_FILE = ".cardpipe-broker.seed-producer"
EXIT_ERROR = 2

#: What the scripts do with the embedded broker (see the module's docstring).
KEEP, NOTE_STARTED, STOP_WHEN_DONE = "keep", "note", "stop"


def missing_packages() -> list[str]:
    """cardpipe's distribution and its (unconditional) requirements that this interpreter lacks."""
    from importlib import metadata

    try:
        requirements = metadata.requires("cardpipe") or []
    except metadata.PackageNotFoundError:
        return ["cardpipe"]
    missing = []
    for requirement in requirements:
        if ";" in requirement:  # extras (spark, mysql, test) and platform-specific ones
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        if not match:
            continue
        try:
            metadata.distribution(match.group(0))
        except metadata.PackageNotFoundError:
            missing.append(match.group(0))
    return missing


def _in_project_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV_DIR.resolve()
    except OSError:
        return False


def ensure_interpreter() -> None:
    """Return when this interpreter can run cardpipe; else run the script again with the project's venv
    (never returns), or exit with one line saying how to install cardpipe."""
    restarted = os.environ.pop(RESTARTED_ENV, None) is not None
    if _in_project_venv():
        return
    missing = missing_packages()
    if not missing:
        return
    script = os.path.abspath(sys.argv[0])
    if VENV_PYTHON.is_file() and not restarted:
        env = {**os.environ, RESTARTED_ENV: "1"}
        try:
            os.execve(VENV_PYTHON, [str(VENV_PYTHON), script, *sys.argv[1:]], env)
        except OSError as exc:
            _fail(f"cannot start {VENV_PYTHON} ({exc.strerror or exc}): run `bash scripts/install.sh` again")
    names = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    if restarted:
        _fail(f"the virtual environment {VENV_DIR} lacks cardpipe's packages ({names}): run `bash scripts/install.sh`")
    _fail(
        f"cardpipe is not installed for {sys.executable} (missing: {names}) and there is no virtual environment "
        f"at {VENV_DIR}: run `bash scripts/install.sh` first, or activate an environment where cardpipe is installed"
    )


def _fail(message: str) -> NoReturn:
    print(f"cardpipe: error: {message}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def run_seed_command(argv: list[str], *, broker: str = KEEP) -> NoReturn:
    """Run ``cardpipe ARGV`` (after :func:`ensure_interpreter`) and exit with its status; ``broker`` is
    :data:`KEEP`, :data:`NOTE_STARTED` (``produce``) or :data:`STOP_WHEN_DONE` (``consume``, ``run``)."""
    ensure_interpreter()
    try:
        from cardpipe.cli import main
    except ImportError as exc:  # a venv missing a package
        _fail(f"{sys.executable} cannot import {exc.name or exc}: run `bash scripts/install.sh`")
    if broker == KEEP:
        sys.exit(main(argv))
    try:
        sys.exit(_run_minding_broker(argv, broker))
    except KeyboardInterrupt:  # a second Ctrl-C while the broker is stopped
        sys.exit(130)


def _run_minding_broker(argv: list[str], policy: str) -> int:
    from cardpipe.cli import build_parser, main
    from cardpipe.config import Settings
    from cardpipe.stream import broker

    try:
        args = build_parser().parse_args(argv)
        settings = Settings.from_env(results_dir=args.results_dir)
    except (SystemExit, Exception):  # bad usage or settings: the command itself reports them
        return main(argv)
    if not settings.uses_embedded_broker:
        return main(argv)
    work_dir = settings.results_dir
    before = broker.broker_status(work_dir)
    status = 1
    try:
        status = main(argv)
    finally:
        after = broker.broker_status(work_dir)
        note = work_dir / PRODUCER_BROKER_FILE
        noted = _read_pid(note)
        if after is None or (noted is not None and noted != after["pid"]):
            note.unlink(missing_ok=True)  # that broker is gone
            noted = None
        started_here = after is not None and (before is None or before["pid"] != after["pid"])
        if policy == NOTE_STARTED and started_here and after is not None:
            note.write_text(f"{after['pid']}\n", encoding="utf-8")
        elif policy == STOP_WHEN_DONE and after is not None and (started_here or noted == after["pid"]):
            if broker.stop_broker(work_dir) and not args.quiet:
                print("cardpipe: stopped the embedded broker started for this stream", file=sys.stderr)
            note.unlink(missing_ok=True)
    return status


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
