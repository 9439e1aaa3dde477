"""``produce`` in several processes (SQLite), against the real (embedded) broker: each partition gets the same
messages in the same order as when one process publishes them all, every transaction once, and the command
line's ``--processes`` does it from a server started ahead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import create_engine

from cardpipe.config import SAMPLE_DATA_DIR, Settings
from cardpipe.errors import EXIT_ERROR
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.stream.broker import broker_session
from cardpipe.stream.partitioner import partition_of

pytestmark = pytest.mark.kafka

SAMPLE_TRANSACTIONS = 600  # the lines of cardpipe/sample_data/transactions.csv but its header


def _partitions(bootstrap_servers: str, topic: str, partitions: int) -> dict[int, list[tuple[bytes, bytes]]]:
    """Every partition's (key, value) messages, in order."""
    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "read-back", "enable.auto.commit": False})
    try:
        got: dict[int, list[tuple[bytes, bytes]]] = {}
        for p in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            consumer.assign([TopicPartition(topic, p, low)])
            messages: list[tuple[bytes, bytes]] = []
            while len(messages) < high - low:
                messages += [(m.key(), m.value()) for m in consumer.consume(1000, timeout=1) if m.error() is None]
            got[p] = messages
        return got
    finally:
        consumer.close()


def test_two_processes_write_each_partition_as_one_does(tmp_path: Path) -> None:
    settings = Settings.from_env(env={}, results_dir=tmp_path / "results", data_dir=SAMPLE_DATA_DIR)
    commands.setup(settings)
    commands.load(settings)
    with broker_session(None, settings.results_dir) as broker:
        alone = commands.produce(settings.with_(kafka_topic="alone"), broker=broker, processes=1)
        shared = commands.produce(settings.with_(kafka_topic="shared"), broker=broker, processes=2)
        assert alone.published == shared.published == SAMPLE_TRANSACTIONS
        one = _partitions(broker.bootstrap_servers, "alone", settings.kafka_partitions)
        two = _partitions(broker.bootstrap_servers, "shared", settings.kafka_partitions)
    assert two == one
    assert sum(map(len, two.values())) == SAMPLE_TRANSACTIONS
    assert sum(1 for messages in two.values() if messages) > 1
    for p, messages in two.items():
        assert all(partition_of(key, settings.kafka_partitions) == p for key, _ in messages)


def _produce_command(tmp_path: Path, data: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``cardpipe produce ARGS`` on embedded defaults after ``setup`` and ``load`` of ``data``, as a user runs it
    (the embedded broker stopped after); extra environment variables from ``env``."""
    results = tmp_path / "results"
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DB_HOST", "KAFKA_BOOTSTRAP_SERVERS")}
    cardpipe = [sys.executable, "-m", "cardpipe"]
    for step in (["setup"], ["load", "--data-dir", str(data)]):
        subprocess.run([*cardpipe, *step, "-q", "--results-dir", str(results)], env=base, check=True)
    try:
        return subprocess.run(
            [*cardpipe, "produce", *args, "--results-dir", str(results)],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run([*cardpipe, "broker", "stop", "--results-dir", str(results)], env=base, check=False)


def test_the_command_publishes_in_the_processes_asked_for(tmp_path: Path) -> None:
    done = _produce_command(tmp_path, SAMPLE_DATA_DIR, ["--processes", "3"])
    assert done.returncode == 0, done.stderr
    assert f"published {SAMPLE_TRANSACTIONS} transactions" in done.stdout
    assert "publishing in 3 processes" in done.stderr


def test_a_publishing_process_that_dies_fails_the_command_and_stops_the_others(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "data", GeneratorConfig(transactions=6_000, customers=200, seed=5))
    # a child dies at its 2,000th message
    died = _produce_command(tmp_path, tmp_path / "data", ["--processes", "2"], CARDPIPE_CRASH_AT="produce.sent:2")
    assert died.returncode == EXIT_ERROR, died.stderr
    assert "error: publishing failed: was killed (SIGKILL) before finishing, in publishing process" in died.stderr
    assert "of 2; the other was stopped" in died.stderr
    assert "published" not in died.stdout


def test_another_partitioner_set_for_the_cluster_publishes_in_one_process(tmp_path: Path) -> None:
    """The shares follow murmur2's partitions: with a client partitioner from the environment that places keys
    otherwise (``KAFKA_PARTITIONER``), one process publishes everything, so a partition never has two producers."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": "cluster.example:9092"}
    settings = Settings.from_env(env=env, results_dir=tmp_path / "results", data_dir=SAMPLE_DATA_DIR)
    commands.setup(settings)
    commands.load(settings)
    engine = create_engine(settings.database_url)
    try:
        assert len(commands._publishing_shares(settings, engine, 2, 8)) == 2
        for partitioner, shares in (("murmur2", 2), ("random", 0), ("consistent_random", 0)):
            passed = Settings.from_env(env={**env, "KAFKA_PARTITIONER": partitioner}, results_dir=tmp_path / "results")
            assert len(commands._publishing_shares(passed, engine, 2, 8)) == shares
    finally:
        engine.dispose()
