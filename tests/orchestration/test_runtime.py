"""The runtime: each resource opened once, on first use; on exit, what it started stopped, whatever happened."""

from __future__ import annotations

import pytest

from cardpipe.config import Settings
from cardpipe.orchestration import runtime as runtime_module
from cardpipe.orchestration.runtime import Runtime
from cardpipe.stream.broker import broker_status, ensure_broker, is_alive, stop_broker

pytestmark = pytest.mark.kafka


class Child:
    """Stands for a child process: counts its stops."""

    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.from_env(env={}, results_dir=tmp_path / "results", data_dir=tmp_path / "data")


def test_the_engine_is_opened_once_and_disposed_on_exit(settings, monkeypatch):
    checks = []
    monkeypatch.setattr(runtime_module, "check_connection", checks.append)
    with Runtime(settings) as rt:
        engine = rt.ensure_schema()
        assert rt.engine is engine and rt.stream_store().engine is engine
        assert checks == [engine]
    with pytest.raises(RuntimeError, match="closed"):
        rt.engine  # noqa: B018


def test_children_are_stopped_on_exit_whatever_happened(settings):
    released, kept = Child(), Child()
    with pytest.raises(KeyboardInterrupt), Runtime(settings) as rt:
        assert rt.adopt(released) is released
        rt.adopt(kept)
        rt.release(released)
        assert (released.stops, kept.stops) == (1, 0)
        raise KeyboardInterrupt
    assert kept.stops == 1
    late = Child()
    with pytest.raises(RuntimeError, match="closed"):
        rt.adopt(late)
    assert late.stops == 1, "a child given to a closed runtime is stopped at once"


def test_topics_are_ensured_once_per_broker(settings, monkeypatch):
    ensured = []
    monkeypatch.setattr(
        runtime_module, "ensure_topics", lambda servers, wanted, **_: ensured.extend(wanted) or dict(wanted)
    )
    handle = ensure_broker(None, settings.results_dir)
    try:
        with Runtime(settings, broker=handle) as rt:
            assert rt.has_broker and rt.broker is handle
            assert rt.ensure_topics() == rt.ensure_topics() == settings.kafka_partitions
            assert sorted(ensured) == sorted([settings.kafka_topic, settings.dead_letter_topic])
        assert is_alive(handle.pid), "a broker given to the runtime is never stopped by it"
    finally:
        stop_broker(settings.results_dir)


@pytest.mark.parametrize("stop_on_exit", [True, False])
def test_the_broker_it_started_is_stopped_on_exit_only_when_asked(settings, stop_on_exit):
    try:
        with Runtime(settings, stop_broker_on_exit=stop_on_exit) as rt:
            assert not rt.has_broker
            handle = rt.broker
            assert handle.started_here and rt.broker is handle
        assert (broker_status(settings.results_dir) is None) == stop_on_exit
        assert is_alive(handle.pid) != stop_on_exit  # type: ignore[arg-type]
    finally:
        stop_broker(settings.results_dir)


def test_a_broker_it_did_not_start_is_left_running(settings):
    handle = ensure_broker(None, settings.results_dir)
    try:
        with Runtime(settings, stop_broker_on_exit=True) as rt:
            assert not rt.broker.started_here
        assert is_alive(handle.pid)  # type: ignore[arg-type]
    finally:
        stop_broker(settings.results_dir)
