"""The seed's scripts at the repo root run with a plain ``python3`` (not the venv) and leave no embedded broker
running once the stream is done (issue 12)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cardpipe.stream.broker import broker_status

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The interpreter the venv was made from; ``-S`` keeps its site-packages (whatever they hold) out of reach.
PLAIN_PYTHON = [str(Path(sys.base_prefix) / "bin" / "python3"), "-S"]


def _plain_env(**extra: str) -> dict[str, str]:
    """What ``env -i`` leaves, plus HOME: no venv on PATH, no VIRTUAL_ENV, no database or Kafka settings."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), **extra}


def _run(script: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PLAIN_PYTHON, str(script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_the_plain_interpreter_lacks_cardpipes_packages():
    """What the next tests rely on: without the venv, cardpipe's dependencies cannot be imported."""
    proc = subprocess.run([*PLAIN_PYTHON, "-c", "import sqlalchemy"], env=_plain_env(), capture_output=True)
    assert proc.returncode != 0


def test_db_setup_runs_with_a_plain_python(tmp_path):
    """Was: ModuleNotFoundError: No module named 'sqlalchemy' unless the venv was activated."""
    results = tmp_path / "results"
    proc = _run(REPO_ROOT / "db_setup.py", "--results-dir", str(results), env=_plain_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "clean schema created" in proc.stdout
    assert (results / "cardpipe.db").is_file()


def test_without_a_venv_the_error_is_one_line_naming_the_installer(tmp_path):
    checkout = tmp_path / "checkout"  # the scripts without an installed cardpipe or a .venv beside them
    checkout.mkdir()
    for name in ("_seed_entry.py", "db_setup.py"):
        shutil.copy(REPO_ROOT / name, checkout / name)
    proc = _run(checkout / "db_setup.py", env=_plain_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cardpipe: error: "), proc.stderr
    assert "bash scripts/install.sh" in proc.stderr and str(checkout / ".venv") in proc.stderr


@pytest.mark.kafka
def test_seed_flow_with_a_plain_python_leaves_no_broker_running(tmp_path):
    """setup, initial, produce then consume (the producer started the broker), batch, updated; produce again
    and main.py: the consumer and main.py stop the broker, the producer never does."""
    results = tmp_path / "results"
    env = _plain_env(CARDPIPE_RESULTS_DIR=str(results), CONSUMER_IDLE_SECONDS="1")

    def seed(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        proc = _run(REPO_ROOT / script, *args, env=env, cwd=tmp_path)
        assert proc.returncode == 0, f"{script} {' '.join(args)}: {proc.stderr}"
        return proc

    try:
        seed("db_setup.py")
        seed("serving_processor.py", "initial")
        seed("stream_processor.py", "produce")
        assert broker_status(results) is not None, "the producer's messages must wait for the consumer"
        consumed = seed("stream_processor.py", "consume")
        assert "547 pending, 53 declined" in consumed.stdout
        assert broker_status(results) is None, "consume must stop the broker the producer started for it"
        assert "published" in seed("batch_processor.py").stdout
        seed("serving_processor.py", "updated")

        seed("stream_processor.py", "produce")
        assert broker_status(results) is not None
        ran = seed("main.py")
        assert "results in" in ran.stdout
        assert broker_status(results) is None, "main.py must leave no broker running"
        assert not (results / ".cardpipe-broker.json").exists()
    finally:
        subprocess.run(
            [sys.executable, "-m", "cardpipe", "broker", "stop", "-q", "--results-dir", str(results)],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            timeout=60,
        )
