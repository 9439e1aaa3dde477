"""Issue 4: ``cardpipe consume --workers N`` on the real embedded broker, SQLite and MariaDB.

N consumer processes, worker i owning the partitions p with p % N == i: the results are those of one
consumer, row for row; a worker that dies fails the command with a one-line error; a transaction id that
reaches two workers with different card ids is decided once and rejected once, whatever the timing.
"""

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import create_engine, func, select

from cardpipe.config import SAMPLE_DATA_DIR, Settings
from cardpipe.domain.authorization import Authorizer
from cardpipe.domain.records import Transaction
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.broker import broker_session, broker_status, ensure_broker, ensure_topic, stop_broker
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.consumer import ConsumeOptions, consume, log_end_offsets
from cardpipe.stream.workers import WorkerFailed, assign_partitions
from tests.orchestration.helpers import (
    REPO_ROOT,
    cardpipe,
    child_pids,
    command_line,
    env_without_services,
    process_group,
    reference_results,
)

pytestmark = pytest.mark.kafka
N_TRANSACTIONS = 20_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=404))
    return data


@pytest.fixture(scope="module")
def expected(dataset):
    """stream_transactions as the pure domain decides it, full rows by transaction id."""
    decisions, _ = reference_results(dataset)
    return {k: _row(tx, status, balance, reason) for k, (tx, status, balance, reason) in decisions.items()}


def _row(tx, status, balance, reason):
    return (
        tx.card_id,
        tx.merchant_name,
        tx.timestamp,
        tx.amount,
        tx.location,
        tx.transaction_type,
        tx.related_transaction_id,
        status,
        balance,
        reason,
    )


def stream_rows(url) -> dict:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            t = schema.stream_transactions
            return {
                r.transaction_id: (
                    r.card_id,
                    r.merchant_name,
                    r.timestamp,
                    r.amount,
                    r.location,
                    r.transaction_type,
                    r.related_transaction_id,
                    r.status,
                    r.pending_balance,
                    r.decline_reason,
                )
                for r in conn.execute(select(t))
            }
    finally:
        engine.dispose()


def count_rows(url, table) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(table)).scalar_one()
    finally:
        engine.dispose()


def prepared(settings: Settings) -> None:
    """Clean schema, inputs loaded, every transaction published to the results folder's embedded broker."""
    commands.setup(settings)
    commands.load(settings)
    commands.produce(settings, broker=ensure_broker(None, settings.results_dir))


def test_partitions_are_dealt_round_robin():
    assert assign_partitions(range(8), 2) == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert assign_partitions(range(8), 3) == [(0, 3, 6), (1, 4, 7), (2, 5)]
    assert assign_partitions(range(2), 3) == [(0,), (1,), ()]


def test_two_workers_on_sqlite_decide_like_one_consumer(dataset, expected, tmp_path):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    try:
        prepared(settings)
        proc = cardpipe(
            ["consume", "--results-dir", str(results), "--workers", "2", "--until-caught-up", "--batch-size", "1000"],
            env_without_services(),
        )
        ends = log_end_offsets(ensure_broker(None, results).bootstrap_servers, settings.kafka_topic)
    finally:
        stop_broker(results)
    assert proc.stdout.strip().startswith(f"decided {N_TRANSACTIONS:,} messages in ")
    assert stream_rows(settings.database_url) == expected
    assert count_rows(settings.database_url, schema.rejected_transactions) == 0
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        so = schema.stream_offsets
        offsets = dict(conn.execute(select(so.c.kafka_partition, so.c.next_offset)).all())
    engine.dispose()
    assert offsets == ends and len(offsets) == settings.kafka_partitions
    assert (results / "stream_transactions.csv").read_text().count("\n") == N_TRANSACTIONS + 1


@pytest.mark.mysql
def test_two_workers_on_mariadb_decide_like_one_consumer(dataset, expected, tmp_path, mysql_env, mysql_database):
    results = tmp_path / "results"
    settings = Settings.from_env(env=mysql_env, results_dir=results, data_dir=dataset)
    lines = []
    try:
        prepared(settings)
        summary = commands.consume(
            settings,
            ConsumeOptions(until_caught_up=True, batch_size=1000, progress_every=0.5),
            workers=2,
            progress=lines.append,
        )
    finally:
        stop_broker(results)
    assert stream_rows(mysql_database) == expected
    statuses = [row[7] for row in expected.values()]
    assert summary.messages == N_TRANSACTIONS
    assert (summary.counts["pending"], summary.counts["declined"]) == (
        statuses.count("pending"),
        statuses.count("declined"),
    )
    assert summary.seconds > 0 and len(summary.latencies_ms) == N_TRANSACTIONS
    assert {line.split(":")[0] for line in lines} <= {"worker 0", "worker 1"}


def test_a_worker_killed_fails_the_command_and_stops_the_other(dataset, tmp_path):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    killed = []

    def kill_worker_1(line: str) -> None:
        if "decided 0 messages" in line:
            return  # once something is committed
        for child in multiprocessing.active_children():
            if child.name == "cardpipe-consume-1" and not killed:
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)

    try:
        prepared(settings)
        with pytest.raises(WorkerFailed) as failure:
            commands.consume(
                settings,
                ConsumeOptions(until_caught_up=True, batch_size=500, progress_every=0),
                workers=2,
                progress=kill_worker_1,
            )
    finally:
        stop_broker(results)
    assert killed
    assert str(failure.value) == (
        "consume worker 1 (partitions 1, 3, 5, 7) was killed (SIGKILL) before finishing; the other worker was stopped"
    )
    assert not multiprocessing.active_children(), "every worker is gone"
    decided = count_rows(settings.database_url, schema.stream_transactions)
    assert 0 < decided < N_TRANSACTIONS
    # What was committed is exported, as on Ctrl-C.
    assert (results / "stream_transactions.csv").read_text().count("\n") == decided + 1


def test_a_lost_broker_is_a_clear_error_with_workers(dataset, tmp_path):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)

    busy = set()

    def kill_broker(line: str) -> None:
        if "decided 0 messages" not in line:
            busy.add(line.split(":")[0])
        record = broker_status(results)
        if record and len(busy) == 2:  # both workers are consuming
            os.kill(record["pid"], signal.SIGKILL)

    try:
        prepared(settings)
        with pytest.raises(
            WorkerFailed,
            match=r"^consume worker [01] \(partitions [0-7, ]+\) failed: the broker at "
            r"127\.0\.0\.1:\d+ stopped while consuming 'credit-card-transactions' "
            r"\(with --workers above 1 a lost embedded broker is not replaced: "
            r"run consume again.*; the other worker (was stopped|failed too)$",
        ):
            commands.consume(
                settings,
                ConsumeOptions(until_caught_up=True, batch_size=500, progress_every=0),
                workers=2,
                progress=kill_broker,
            )
    finally:
        stop_broker(results)


def test_a_crashing_worker_exits_non_zero_with_one_line_and_a_rerun_completes(dataset, expected, tmp_path):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    args = ["consume", "--results-dir", str(results), "--workers", "2", "--until-caught-up", "--batch-size", "500"]
    try:
        prepared(settings)
        crashed = cardpipe(args, env_without_services(CARDPIPE_CRASH_AT="consume.committed:3"), check=False)
        assert crashed.returncode == 2, crashed.stderr
        last = crashed.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            r"cardpipe: error: consume worker [01] \(partitions [0-7, ]+\) was killed \(SIGKILL\) "
            r"before finishing; the other worker (was stopped|failed too)",
            last,
        ), crashed.stderr
        assert "Traceback" not in crashed.stderr
        assert 0 < count_rows(settings.database_url, schema.stream_transactions) < N_TRANSACTIONS
        # Each worker resumes after its partitions' checkpoints: nothing lost, nothing decided twice.
        cardpipe(args, env_without_services())
    finally:
        stop_broker(results)
    assert stream_rows(settings.database_url) == expected


def _following_the_sample(settings: Settings, results: Path, **popen: Any) -> subprocess.Popen[str]:
    """``consume --workers 2 --follow`` on the prepared sample, once it has decided all 600 transactions."""
    prepared(settings)
    consumer = subprocess.Popen(
        [sys.executable, "-m", "cardpipe", "consume", "--results-dir", str(results), "--workers", "2", "--follow"],
        cwd=REPO_ROOT,
        env={**env_without_services(), "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    deadline = time.monotonic() + 60
    while count_rows(settings.database_url, schema.stream_transactions) < 600 and time.monotonic() < deadline:
        time.sleep(0.2)
    return consumer


def test_sigterm_stops_every_worker_gracefully(tmp_path):
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=SAMPLE_DATA_DIR)
    try:
        consumer = _following_the_sample(settings, results)
        # The CLI forks its workers from a server that imported their modules while it imported its own.
        servers = [child for child in child_pids(consumer.pid) if b"multiprocessing.forkserver" in command_line(child)]
        assert len(servers) == 1, servers
        assert len(child_pids(servers[0])) == 2
        consumer.send_signal(signal.SIGTERM)
        out, err = consumer.communicate(timeout=60)
    finally:
        stop_broker(results)
    deadline = time.monotonic() + 10
    while process_group(servers[0]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_group(servers[0]) is None, "the workers' server outlived the command"
    assert consumer.returncode == 0, err
    assert out.startswith("decided 600 messages in "), out + err
    assert (results / "stream_transactions.csv").read_text().count("\n") == 601


def test_ctrl_c_to_the_terminal_s_process_group_stops_every_worker_and_leaves_no_process(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the command, the workers' server, the workers and the
    export process. The command alone acts on it; everything it started ends with it."""
    results = tmp_path / "results"
    settings = Settings.from_env(env={}, results_dir=results, data_dir=SAMPLE_DATA_DIR)
    try:
        # Its own process group, as a shell gives a foreground job.
        consumer = _following_the_sample(settings, results, start_new_session=True)
        os.killpg(consumer.pid, signal.SIGINT)
        out, err = consumer.communicate(timeout=60)
    finally:
        stop_broker(results)
    assert consumer.returncode == 130, err
    assert err.splitlines()[-1] == "cardpipe: interrupted" and "Traceback" not in err, err
    assert count_rows(settings.database_url, schema.stream_transactions) == 600
    deadline = time.monotonic() + 10
    while _group_members(consumer.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_members(consumer.pid), "processes of the command outlived it"


def _group_members(pgid: int) -> list[int]:
    """The running processes of process group ``pgid``."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if process_group(pid) == pgid]


# --- the cross-worker race: one transaction id, two cards, two partitions ----------------------------------

CARD_A, CARD_B = 1, 2  # sample cards; A's messages go to partition 0, B's to partition 1
CONFLICTED = 900_003


def _tx(transaction_id: int, card_id: int, cents: int, second: int) -> Transaction:
    return Transaction(
        transaction_id,
        card_id,
        "Race Test LLC",
        datetime(2025, 6, 1, 12, 0, second),
        Decimal(cents) / 100,
        "1 Main St, Albany, NY 12207",
        "purchase",
    )


def _publish_to(bootstrap: str, topic: str, messages: list[tuple[int, Transaction]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for partition, tx in messages:
        key, value = encode_transaction(tx)
        producer.produce(topic, key=key, value=value, partition=partition)
    assert producer.flush(30) == 0


class RacingStore(StreamStore):
    """A store whose commit of the batch holding ``CONFLICTED`` first lets ``other`` run to completion:
    the other consumer commits that id between this one's lookup and its commit, deterministically."""

    def __init__(self, engine, topic, other):
        super().__init__(engine, topic)
        self.other = other
        self.raced = False

    def commit(self, batch):
        if not self.raced and any(row["transaction_id"] == CONFLICTED for row in batch.decided):
            self.raced = True
            self.other()
        super().commit(batch)


def _sample_settings(database_url, tmp_path) -> Settings:
    return Settings.from_env(
        env={"DATABASE_URL": database_url.render_as_string(hide_password=False)},
        results_dir=tmp_path / "results",
        data_dir=SAMPLE_DATA_DIR,
    ).with_(kafka_partitions=2)


def test_a_commit_that_loses_the_race_restarts_from_its_checkpoint(database_url, tmp_path):
    settings = _sample_settings(database_url, tmp_path)
    commands.setup(settings)
    commands.load(settings)
    a = [_tx(900_001, CARD_A, 1000, 1), _tx(CONFLICTED, CARD_A, 2000, 3), _tx(900_005, CARD_A, 3000, 5)]
    b = [_tx(900_002, CARD_B, 1100, 2), _tx(CONFLICTED, CARD_B, 2100, 3), _tx(900_004, CARD_B, 3100, 4)]
    engine = create_engine(settings.database_url)
    try:
        with broker_session(None, settings.results_dir) as broker:
            topic = settings.kafka_topic
            ensure_topic(broker.bootstrap_servers, topic, 2)
            _publish_to(broker.bootstrap_servers, topic, [(0, tx) for tx in a] + [(1, tx) for tx in b])
            store_a = StreamStore(engine, topic)
            worker_a = []

            def run_a() -> None:
                options = ConsumeOptions(until_caught_up=True, partitions=(0,))
                worker_a.append(consume(broker.bootstrap_servers, topic, store_a, options=options))

            store_b = RacingStore(engine, topic, run_a)
            summary_b = consume(
                broker.bootstrap_servers, topic, store_b, options=ConsumeOptions(until_caught_up=True, partitions=(1,))
            )
        profiles = store_a.card_profiles()
        balances, offsets = store_a.restore()
        with engine.connect() as conn:
            rejected = conn.execute(select(schema.rejected_transactions)).all()
    finally:
        engine.dispose()
    assert store_b.raced and worker_a[0].messages == 3
    assert summary_b.counts["checkpoint_conflicts"] == 1
    # B read its 3 messages once more from its checkpoint: counted once, none seen as a re-delivery.
    assert summary_b.messages == 3 and summary_b.counts["duplicate_ignored"] == 0
    assert summary_b.counts["rejected:duplicate_conflict"] == 1
    assert [(r.transaction_id, r.reason, r.kafka_partition, r.kafka_offset) for r in rejected] == [
        (CONFLICTED, "duplicate_conflict", 1, 1)
    ]
    assert offsets == {0: 3, 1: 3}
    # Every decision, and each card's balance, as if each card's own transactions were decided in order once.
    authorizer = Authorizer(profiles, _initial_balances(settings))
    want = {tx.transaction_id: _row(tx, *_decide(authorizer, tx)) for tx in [*a, b[0], b[2]]}
    assert stream_rows(settings.database_url) == want
    assert balances[CARD_A] == authorizer.balances[CARD_A] and balances[CARD_B] == authorizer.balances[CARD_B]


def _decide(authorizer: Authorizer, tx: Transaction):
    decision = authorizer.authorize(tx)
    return decision.status, decision.pending_balance, decision.reason


def _initial_balances(settings: Settings) -> dict[int, Decimal]:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return {
                cid: Decimal(b)
                for cid, b in conn.execute(select(schema.cards.c.card_id, schema.cards.c.current_balance))
            }
    finally:
        engine.dispose()


def test_ids_sent_to_two_workers_with_different_cards_are_decided_once(tmp_path):
    """Racy on purpose: after some ids of their own (so that both are running), the two workers walk the same
    ids in opposite orders, segment by segment, in batches of 200, so they meet in the middle of segments (most
    runs see a checkpoint conflict; the test above forces one). Whichever copy wins an id, it is decided once
    and the other copy rejected once."""
    settings = Settings.from_env(env={}, results_dir=tmp_path / "results", data_dir=SAMPLE_DATA_DIR).with_(
        kafka_partitions=2
    )
    commands.setup(settings)
    commands.load(settings)
    own_a = [_tx(tid, CARD_A, 1, 0) for tid in range(920_000, 930_000)]
    own_b = [_tx(tid, CARD_B, 1, 0) for tid in range(930_000, 940_000)]
    segments = [list(range(start, start + 1500)) for start in (910_000, 911_500, 913_000)]
    ids = [tid for segment in segments for tid in segment]
    a = own_a + [_tx(tid, CARD_A, 1 + tid % 300, tid % 60) for tid in ids]
    b = own_b + [_tx(tid, CARD_B, 2 + tid % 300, tid % 60) for segment in segments for tid in reversed(segment)]
    try:
        broker = ensure_broker(None, settings.results_dir)
        ensure_topic(broker.bootstrap_servers, settings.kafka_topic, 2)
        _publish_to(broker.bootstrap_servers, settings.kafka_topic, [(0, tx) for tx in a] + [(1, tx) for tx in b])
        summary = commands.consume(settings, ConsumeOptions(until_caught_up=True, batch_size=200), workers=2)
    finally:
        stop_broker(settings.results_dir)
    rows = stream_rows(settings.database_url)
    assert sorted(rows) == sorted(ids + [tx.transaction_id for tx in own_a + own_b])
    assert summary.messages == len(a) + len(b) and summary.counts["rejected:duplicate_conflict"] == len(ids)
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rt = schema.rejected_transactions
            rejected = {r.transaction_id: r for r in conn.execute(select(rt))}
        profiles = StreamStore(engine, settings.kafka_topic).card_profiles()
    finally:
        engine.dispose()
    assert sorted(rejected) == ids and {r.reason for r in rejected.values()} == {"duplicate_conflict"}
    # The other partition's copy of each id is the rejected one; each card's decisions replay exactly in its
    # partition's order (no balance applied twice by a restart).
    for tid in ids:
        assert rejected[tid].kafka_partition == (1 if rows[tid][0] == CARD_A else 0)
    authorizer = Authorizer(profiles, _initial_balances(settings))
    for tx in [*a, *b]:
        if rows[tx.transaction_id][0] == tx.card_id:
            assert rows[tx.transaction_id] == _row(tx, *_decide(authorizer, tx)), tx


@pytest.mark.parametrize(
    ("workers", "cores", "follows", "after_decisions"),
    [(1, 2, True, False), (2, 2, False, True), (2, 4, True, False), (1, 1, False, False)],
)
def test_the_export_process_copies_the_decisions_only_while_a_core_is_left(
    workers, cores, follows, after_decisions, tmp_path, monkeypatch
):
    """On SQLite, the process that writes stream_transactions.csv copies the decisions as they are committed only
    while a core is left beside the consumer processes; either way the file holds every decision. It starts with
    the command, except beside workers on every core: then once the first of them has committed a checkpoint."""
    from cardpipe.batch.apart import ExportProcess

    asked: list[object] = []
    decided_before: list[int] = []

    def recording(database_url, follow=None):
        asked.append(follow)
        decided_before.append(count_rows(database_url, schema.stream_transactions))
        return ExportProcess(database_url, follow=follow)

    monkeypatch.setattr(commands, "usable_cores", lambda: cores)
    monkeypatch.setattr(commands, "ExportProcess", recording)
    settings = Settings.from_env(env={}, results_dir=tmp_path / "results", data_dir=SAMPLE_DATA_DIR)
    try:
        prepared(settings)
        summary = commands.consume(settings, ConsumeOptions(until_caught_up=True), workers=workers)
    finally:
        stop_broker(settings.results_dir)
    assert [follow is not None for follow in asked] == [follows]
    assert [decided > 0 for decided in decided_before] == [after_decisions]
    lines = (settings.results_dir / "stream_transactions.csv").read_text().splitlines()
    assert len(lines) == summary.messages + 1 == count_rows(settings.database_url, schema.stream_transactions) + 1
