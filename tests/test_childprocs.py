"""The child-process helper: messages through the pipe, results and errors reported, exits described, stopping."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import pytest

from cardpipe import childprocs
from cardpipe.childprocs import ChildProcess, describe_exit, prepare_child, remove_orphaned_dirs, report_to_parent
from cardpipe.errors import ConfigError
from tests.orchestration.helpers import REPO_ROOT


def _echo(conn: Connection, words: list[str]) -> None:
    prepare_child(30, "%(message)s")
    for word in words:
        conn.send(("progress", word))
    report_to_parent(conn, lambda: len(words))


def _fail(conn: Connection, unexpected: bool) -> None:
    def work() -> None:
        raise (ValueError("bad value\nsecond line") if unexpected else ConfigError("bad setting"))

    report_to_parent(conn, work, lambda exc: f"failed: {exc}".splitlines()[0])


def _stubborn(conn: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send(("ready", None))
    while True:
        time.sleep(0.1)


def _received(child: ChildProcess, timeout: float = 30.0) -> list[tuple[str, object]]:
    messages: list[tuple[str, object]] = []
    deadline = time.monotonic() + timeout
    while child.open and time.monotonic() < deadline:
        messages += child.receive()
        time.sleep(0.01)
    return messages


def test_a_child_sends_its_messages_then_its_result_and_exits_cleanly() -> None:
    child = ChildProcess(_echo, ["a", "b"], name="cardpipe-test-echo")
    try:
        assert _received(child) == [("progress", "a"), ("progress", "b"), ("done", 2)]
        child.join(10)
        assert child.exitcode == 0 and child.name == "cardpipe-test-echo"
    finally:
        child.stop(1)


def test_a_child_forked_from_the_server_started_ahead_reports_as_a_spawned_one() -> None:
    # In a process of its own: the server lives as long as the process that started it.
    code = (
        "from cardpipe.childprocs import CONTEXT, ChildProcess, start_forkserver, worker_context\n"
        "from tests.test_childprocs import _echo, _received\n"
        "start_forkserver(['tests.test_childprocs'])\n"
        "context = worker_context()\n"
        "assert context is not CONTEXT and context.get_start_method() == 'forkserver'\n"
        "child = ChildProcess(_echo, ['a', 'b'], name='cardpipe-test-echo', context=context)\n"
        "print(_received(child))\n"
        "child.join(10)\n"
        "print(child.exitcode)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[('progress', 'a'), ('progress', 'b'), ('done', 2)]", "0"], done.stdout


def test_the_workers_are_spawned_when_their_server_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot(*_args: object) -> None:
        raise OSError("no room for its socket")

    monkeypatch.setattr(childprocs.multiprocessing.forkserver, "ensure_running", cannot)
    monkeypatch.setattr(childprocs, "_worker_context", childprocs.CONTEXT)
    childprocs.start_forkserver(["json"])
    assert childprocs.worker_context() is childprocs.CONTEXT


@pytest.mark.parametrize(("unexpected", "line"), [(False, "failed: bad setting"), (True, "failed: bad value")])
def test_an_error_is_one_line_to_the_parent_and_status_1(unexpected: bool, line: str) -> None:
    child = ChildProcess(_fail, unexpected, name="cardpipe-test-fail")
    try:
        assert _received(child) == [("error", line)]
        child.join(10)
        assert child.exitcode == 1
    finally:
        child.stop(1)


def test_stop_sends_sigterm_then_sigkill_after_the_grace_time() -> None:
    child = ChildProcess(_stubborn, name="cardpipe-test-stubborn")
    deadline = time.monotonic() + 30
    while not list(child.receive()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    child.stop(0.5)
    assert time.monotonic() - started >= 0.5
    assert not child.is_alive() and child.exitcode == -signal.SIGKILL
    assert child.describe_exit() == "was killed (SIGKILL) before finishing"
    child.stop(0.5)  # a second stop is harmless


def test_exits_are_described_in_one_line() -> None:
    assert describe_exit(-signal.SIGTERM) == "was killed (SIGTERM) before finishing"
    assert describe_exit(-99) == "was killed (signal 99) before finishing"
    assert describe_exit(3) == "exited (status 3) without a result"


def test_a_signal_held_by_signals_deferred_is_delivered_on_the_way_out():
    import signal

    from cardpipe.childprocs import signals_deferred

    seen: list[str] = []

    def handler(signum, _frame):
        seen.append("handled")

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with signals_deferred(signal.SIGUSR1):
            signal.raise_signal(signal.SIGUSR1)
            seen.append("inside")
        assert seen == ["inside", "handled"]
        assert signal.getsignal(signal.SIGUSR1) is handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_working_folders_of_processes_gone_are_removed_and_the_others_kept(tmp_path) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    orphan = tmp_path / f".work-{dead.pid}-ab12"
    (orphan / "spill").mkdir(parents=True)
    (orphan / "spill" / "big.tmp").write_bytes(b"x" * 1000)
    mine = tmp_path / f".work-{os.getpid()}-cd34"
    mine.mkdir()
    not_a_pid = tmp_path / ".work-abc-ef56"
    not_a_pid.mkdir()
    a_file = tmp_path / f".work-{dead.pid}-file"
    a_file.write_text("kept: not a folder")
    other = tmp_path / f".other-{dead.pid}-gh78"
    other.mkdir()
    assert remove_orphaned_dirs(tmp_path, ".work-") == [orphan]
    assert not orphan.exists()
    assert mine.is_dir() and not_a_pid.is_dir() and a_file.is_file() and other.is_dir()
