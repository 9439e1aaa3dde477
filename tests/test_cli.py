"""The command line (issue 12, parts 4 and 5): options validated by argparse, one line and a clear exit status for
every failure (a read-only or full folder, a dead worker, Ctrl-C, SIGTERM), never a traceback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from cardpipe import cli
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.serving import schema
from tests.orchestration.helpers import REPO_ROOT, child_pids, env_without_services

#: As root, drop the capabilities that ignore file permissions, so that a folder's mode applies.
_UNPRIVILEGED = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)


def _cardpipe_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "cardpipe", *args]


def run(
    args: Sequence[str], env: dict[str, str] | None = None, *, prefix: Sequence[str] = (), timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``cardpipe ARGS`` (after ``prefix``, e.g. setpriv) in a subprocess."""
    return subprocess.run(
        [*prefix, *_cardpipe_argv(args)],
        env={**(env if env is not None else env_without_services()), "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str, status: int = 2) -> str:
    """The single ``cardpipe: error:`` line of a failed run, holding every fragment; no traceback."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cardpipe: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def on_tmpfs(folder: Path, options: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``cardpipe ARGS`` with a small tmpfs (mount ``options``) on ``folder``, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a private tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    script = f'mount -t tmpfs -o {options} tmpfs "{folder}" && exec "$@"'
    return run(args, prefix=["unshare", "-rm", "sh", "-c", script, "sh"])


# ---------------------------------------------------------------------------------------------------------------
# Part 5: numeric options are validated by argparse (exit 2 with the usage line)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["consume", "--batch-size", "-5"], "argument --batch-size: must be at least 1, got -5"),
        (["consume", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["consume", "--batch-size", "1000001"], "argument --batch-size: must be at most 1,000,000, got 1,000,001"),
        (["consume", "--batch-size", "many"], "argument --batch-size: not an integer: 'many'"),
        (["consume", "--idle-seconds", "-1"], "argument --idle-seconds: must not be negative, got -1"),
        (["consume", "--idle-seconds", "nan"], "argument --idle-seconds: must be a finite number, got nan"),
        (["generate", "out", "--transactions", "-3"], "argument --transactions: must be at least 1, got -3"),
        (["generate", "out", "--transactions", "0"], "argument --transactions: must be at least 1, got 0"),
        (["generate", "out", "--transactions", "9", "--customers", "0"], "argument --customers: must be at least 1"),
        (["generate", "out", "--transactions", "9", "--cards", "-1"], "argument --cards: must be at least 1"),
        (["generate", "out", "--transactions", "9", "--seed", "1.5"], "argument --seed: not an integer: '1.5'"),
    ],
)
def test_numeric_options_are_checked_by_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("usage: cardpipe ") and message in err, err


def test_numeric_options_at_their_bounds_are_accepted():
    parser = cli.build_parser()
    args = parser.parse_args(["consume", "--batch-size", "1000000", "--idle-seconds", "0"])
    assert args.batch_size == 1_000_000 and args.idle_seconds == 0.0
    args = parser.parse_args(["generate", "out", "--transactions", "1", "--customers", "1", "--cards", "1"])
    assert (args.transactions, args.customers, args.cards, args.seed) == (1, 1, 1, 42)


# ---------------------------------------------------------------------------------------------------------------
# Part 4: the results folder is checked before any work; OS errors are one line naming the path and what to do
# ---------------------------------------------------------------------------------------------------------------
def test_results_folder_without_write_permission(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        proc = run(["setup", "--results-dir", str(results)], prefix=_UNPRIVILEGED)
    finally:
        results.chmod(stat.S_IRWXU)
    one_error_line(proc, f"results folder {results} cannot be written (permission denied)", "--results-dir")
    assert list(results.iterdir()) == []


def test_results_folder_on_a_read_only_file_system(tmp_path):
    proc = on_tmpfs(tmp_path / "ro", "size=1m,ro", ["setup", "--results-dir", str(tmp_path / "ro" / "results")])
    one_error_line(proc, "cannot be written (read-only file system)", "choose a folder on a writable file system")


def test_results_folder_on_a_full_disk(tmp_path):
    proc = on_tmpfs(tmp_path / "full", "size=256k", ["setup", "--results-dir", str(tmp_path / "full")])
    one_error_line(proc, f"results folder {tmp_path / 'full'} cannot be written (no space left on device)")


def test_results_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run(["setup", "--results-dir", str(tmp_path / "file" / "results")])
    one_error_line(proc, "cannot be written (a part of the path is not a folder)")


def test_generate_on_a_full_disk(tmp_path):
    out = tmp_path / "small" / "data"
    proc = on_tmpfs(tmp_path / "small", "size=2m", ["generate", str(out), "--transactions", "300000"])
    one_error_line(proc, "no space left on device", str(out), "free some space")


def test_generate_into_a_folder_without_write_permission(tmp_path):
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        proc = run(["generate", str(tmp_path / "data"), "--transactions", "10"], prefix=_UNPRIVILEGED)
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    one_error_line(proc, "permission denied", str(tmp_path / "data"), "make it writable")


@pytest.mark.mysql
@pytest.mark.kafka
def test_consume_into_a_read_only_results_folder_decides_nothing(tmp_path, mysql_env, mysql_database, seed_dataset):
    """On MariaDB, `consume` used to commit every decision and then crash writing the CSVs."""
    env = env_without_services(**mysql_env)
    results = tmp_path / "results"
    for args in (["setup"], ["load", "--data-dir", str(seed_dataset / "input")], ["produce"]):
        assert run([*args, "--results-dir", str(results)], env).returncode == 0
    try:
        results.chmod(stat.S_IRUSR | stat.S_IXUSR)
        proc = run(["consume", "--results-dir", str(results), "--until-caught-up"], env, prefix=_UNPRIVILEGED)
    finally:
        results.chmod(stat.S_IRWXU)
        run(["broker", "stop", "--results-dir", str(results)], env)
    one_error_line(proc, f"results folder {results} cannot be written (permission denied)")
    engine = create_engine(mysql_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar() == 0
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C, SIGTERM and dead workers: one line, exit 130 / 143 / 2
# ---------------------------------------------------------------------------------------------------------------
def _start(args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _cardpipe_argv(args),
        env={**env_without_services(), "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_line(proc: subprocess.Popen[str], fragment: str) -> list[str]:
    """Read stderr up to a line holding ``fragment``; the lines read."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if fragment in line:
            return seen
    raise AssertionError(f"no line with {fragment!r} (exit {proc.wait()}):\n{''.join(seen)}")


def _finish(proc: subprocess.Popen[str], seen: list[str]) -> tuple[int, str]:
    """Wait for the end (killing the process group's leader and its children if it hangs); exit status, stderr."""
    try:
        _, rest = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in (*child_pids(proc.pid), proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, "".join(seen) + rest


SIGNALS = [(signal.SIGINT, 130, "cardpipe: interrupted"), (signal.SIGTERM, 143, "cardpipe: terminated")]


@pytest.mark.parametrize(("signum", "status", "line"), SIGNALS, ids=["ctrl-c", "sigterm"])
def test_signal_during_generate(tmp_path, signum, status, line):
    proc = _start(["generate", str(tmp_path / "data"), "--transactions", "4000000"])
    seen = _wait_for_line(proc, "generated 1,000,000 transactions")
    proc.send_signal(signum)
    returncode, err = _finish(proc, seen)
    assert returncode == status and err.splitlines()[-1] == line and "Traceback" not in err, err
    assert not list((tmp_path / "data").glob(".transactions.csv.part*")), "part files left behind"


@pytest.fixture(scope="module")
def dataset_300k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data300k")
    generate_dataset(data, GeneratorConfig(transactions=300_000, seed=12))
    return data


@pytest.mark.parametrize(("signum", "status", "line"), SIGNALS, ids=["ctrl-c", "sigterm"])
def test_signal_during_load(tmp_path, dataset_300k, signum, status, line):
    results = tmp_path / "results"
    assert run(["setup", "-q", "--results-dir", str(results)]).returncode == 0
    proc = _start(["load", "--results-dir", str(results), "--data-dir", str(dataset_300k)])
    seen = _wait_for_line(proc, "loading transactions")
    proc.send_signal(signum)
    returncode, err = _finish(proc, seen)
    assert returncode == status and err.splitlines()[-1] == line and "Traceback" not in err, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_dead_generator_worker_fails_generate_with_one_line(tmp_path, signum):
    """A worker used to print a `Terminated` traceback, and the pool waited forever for its chunk."""
    proc = _start(["generate", str(tmp_path / "data"), "--transactions", "4000000"])
    seen = _wait_for_line(proc, "generated 1,000,000 transactions")
    workers = child_pids(proc.pid)
    assert workers, "no worker process"
    os.kill(workers[0], signum)
    returncode, err = _finish(proc, seen)
    assert returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        f"cardpipe: error: a generator worker process died (killed, or out of memory?): {tmp_path / 'data'} "
        "is incomplete; run `cardpipe generate` again"
    )


def test_log_format_json_and_log_level(tmp_path):
    """--log-format json: every log line is one JSON object; --log-level warning: no info lines."""
    import json as _json

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_URL", "KAFKA_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    base = [sys.executable, "-m", "cardpipe", "setup", "--results-dir", str(tmp_path / "r")]
    proc = subprocess.run([*base, "--log-format", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    entries = [_json.loads(line) for line in proc.stderr.splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("clean schema" in e["message"] for e in entries)
    proc = subprocess.run([*base, "--log-level", "warning"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Progress and the run summary (issue 13, parts 1 and 2)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.kafka
def test_run_off_a_terminal_prints_plain_progress_lines_and_the_summary_table(tmp_path):
    proc = run(["run", "--results-dir", str(tmp_path / "results")])
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr + proc.stdout, "no terminal: no escape codes"
    progress = [line for line in proc.stderr.splitlines() if line.startswith("cardpipe: consume: ")]
    assert progress and "done in" in progress[-1], proc.stderr
    assert "limits lowered" in proc.stdout and "approved amount" in proc.stdout and "total" in proc.stdout
    quiet = run(["run", "-q", "--results-dir", str(tmp_path / "quiet")])
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "limits lowered" in quiet.stdout, "-q silences the progress, not the summary"


@pytest.mark.parametrize(
    ("signalled", "status", "line"),
    [(cli.Terminated, 143, "cardpipe: terminated"), (KeyboardInterrupt, 130, "cardpipe: interrupted")],
)
def test_a_signal_reported_as_a_system_error_still_ends_as_the_signal(monkeypatch, capsys, signalled, status, line):
    """CPython may turn the exception a signal handler raised inside a C call into a ``SystemError`` ("<function
    Settings.dead_letter_topic> returned a result with an exception set", seen once in CI on SIGTERM to `run`),
    with the handler's exception as its cause: that is still SIGTERM (or Ctrl-C), not an internal error."""

    def wrapped(_args):
        try:
            raise signalled
        except BaseException as exc:
            raise SystemError("<function f> returned a result with an exception set") from exc

    monkeypatch.setattr(cli, "cmd_persist", wrapped)
    assert cli.main(["persist"]) == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_an_error_raised_in_place_of_sigterms_exception_still_ends_as_sigterm(monkeypatch, capsys):
    """A C call that ran the SIGTERM handler may lose its exception and raise its own: confluent-kafka's client
    configuration reported "TypeError: expected configuration property name as type unicode string" when SIGTERM
    reached `run` while it made a client (seen once in CI). SIGTERM came: the command ends as terminated."""

    def masked(_args):
        lost = False
        try:
            signal.raise_signal(signal.SIGTERM)
        except cli.Terminated:
            lost = True
        if lost:
            raise TypeError("expected configuration property name as type unicode string")

    monkeypatch.setattr(cli, "cmd_persist", masked)
    assert cli.main(["persist"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cardpipe: terminated"
    # The next command in this process starts afresh: its own error is an error again.
    monkeypatch.setattr(cli, "cmd_persist", lambda _args: (_ for _ in ()).throw(TypeError("a bug")))
    assert cli.main(["persist"]) == 70


def test_a_system_error_of_its_own_is_still_an_internal_error(monkeypatch, capsys):
    def broken(_args):
        raise SystemError("a bug")

    monkeypatch.setattr(cli, "cmd_persist", broken)
    assert cli.main(["persist"]) == 70
    assert "internal error: SystemError: a bug" in capsys.readouterr().err


def test_the_workers_server_imports_ahead_all_of_cardpipe_a_worker_job_names(tmp_path):
    import logging
    import pickle

    from cardpipe.config import Settings
    from cardpipe.orchestration.runtime import open_stream_store
    from cardpipe.stream.consumer import ConsumeOptions
    from cardpipe.stream.workers import WorkerJob, _worker_main

    job = WorkerJob(
        0,
        Settings.from_env(env={}, results_dir=tmp_path),
        "127.0.0.1:9092",
        ConsumeOptions(),
        None,
        logging.INFO,
        open_stream_store,
    )
    payload = pickle.dumps((_worker_main, job))
    code = (
        "import pickle, sys\n"
        f"for name in {cli._WORKER_MODULES!r}: __import__(name)\n"
        "before = set(sys.modules)\n"
        f"pickle.loads({payload!r})\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('cardpipe')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_executable_exits_with_mains_status_and_the_collector_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cardpipe`` (``cli.run``) exits with what the command returned, every object frozen first so that the
    interpreter's shutdown does not collect them all once more."""
    import gc

    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
