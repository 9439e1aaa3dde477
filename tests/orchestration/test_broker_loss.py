"""Issue 3 groundwork: the embedded broker dies mid-stream; the stream recovers with identical results."""

import os
import signal

import pytest

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.stream.broker import broker_status, ensure_broker, stop_broker
from cardpipe.stream.consumer import ConsumeOptions
from tests.orchestration.helpers import read_csv_rows, reference_results

pytestmark = pytest.mark.kafka
N_TRANSACTIONS = 30_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=31))
    return data


def expected_stream(data):
    decisions, _ = reference_results(data)
    return {k: (v[1], str(v[2]), v[3] or "") for k, v in decisions.items()}


def actual_stream(results):
    return {
        int(r["transaction_id"]): (r["status"], r["pending_balance"], r["decline_reason"])
        for r in read_csv_rows(results / "stream_transactions.csv")
    }


def test_broker_killed_mid_stream_is_replaced_and_nothing_is_lost(dataset, tmp_path):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    broker = ensure_broker(None, results)
    killed = []

    def kill_once(_message: str) -> None:
        record = broker_status(results)
        if not killed and record:
            os.kill(record["pid"], signal.SIGKILL)
            killed.append(record["pid"])

    try:
        commands.produce(settings, broker=broker)
        # progress_every=0: the callback runs after every poll; the first call kills the broker.
        summary = commands.consume(
            settings,
            ConsumeOptions(until_caught_up=True, batch_size=1000, progress_every=0),
            broker=broker,
            progress=kill_once,
        )
    finally:
        stop_broker(results)
    assert killed, "the broker was never killed"
    assert summary.counts["broker_recoveries"] == 1
    assert summary.messages == N_TRANSACTIONS  # first leg + the re-published undecided ones
    assert actual_stream(results) == expected_stream(dataset)


def test_consume_after_the_embedded_broker_was_lost_between_commands(dataset, tmp_path):
    """`produce`, then the broker dies (SIGKILL: its in-memory log is gone), then `consume`: nothing lost."""
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    try:
        commands.produce(settings)
        os.kill(broker_status(results)["pid"], signal.SIGKILL)
        summary = commands.consume(settings, ConsumeOptions(until_caught_up=True, batch_size=5000))
    finally:
        stop_broker(results)
    assert summary.messages == N_TRANSACTIONS
    assert actual_stream(results) == expected_stream(dataset)
