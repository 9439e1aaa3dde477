"""Issue 3: SIGKILL anywhere in the stream or the batch; the restarted pipeline loses and duplicates nothing.

Real processes (``python -m cardpipe``), the real embedded broker (Tansu, started once per test and reused
by every subprocess through ``--results-dir``), a real MariaDB and a real local Spark. Processes die in two
ways: at an exact place in the code (``CARDPIPE_CRASH_AT=point:n``, see ``cardpipe/faults.py``: the process
SIGKILLs itself the n-th time it gets there), and by an external ``os.kill(pid, SIGKILL)`` at a moment picked
by watching its progress in the database. Every result is compared with the pure-Python computation of the
same dataset (``reference_results``), i.e. with what an uninterrupted run produces.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select, text
from sqlalchemy.engine import URL

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.serving.csv_io import format_cell
from cardpipe.serving.results import BATCH_OUTPUTS
from cardpipe.stream.broker import ensure_broker, stop_broker
from cardpipe.stream.consumer import FIRST_BATCH_SIZE, log_end_offsets
from tests.orchestration.helpers import (
    REPO_ROOT,
    RESULT_TABLES,
    assert_results_match_reference,
    compare_results,
    env_without_services,
    read_csv_rows,
    reference_results,
    table_matches_csv,
)

pytestmark = pytest.mark.kafka

N_TRANSACTIONS = 50_000
BATCH_SIZE = 2_000  # ~25 checkpoints over the stream
SIGKILLED = -signal.SIGKILL
WAIT_SECONDS = 300  # the machine is shared: generous, a hang still fails

# Consumer crash plan, in order. A crash point with n hits leaves n-1 committed batches (n for
# consume.committed); a number is an external SIGKILL that many seconds after the run's first commit. Each run
# starts with batches of 500 and 1,000 messages, then BATCH_SIZE (FIRST_BATCH_SIZE doubling): 2 batches are
# 1,500 transactions, 3 are 3,500. The crash points alone advance 28,000 of the 50,000 (past half whatever the
# external kills add, which depends on the machine's speed), so the final, clean run has work left.
CONSUMER_PLAN: tuple[str | float, ...] = (
    "consume.polled:3",
    "checkpoint.written:3",
    "consume.committed:2",
    0.0,
    "consume.decided:3",
    "checkpoint.written:4",
    0.05,
    "consume.committed:3",
    "consume.polled:4",
    0.1,  # external kills early enough that work remains: the rest of the stream takes well under a second
    "checkpoint.written:3",
    "consume.decided:4",
    "consume.committed:2",
    "checkpoint.written:3",
    "consume.committed:3",
)
# produce.sent is hit every 1,000 messages handed to the producer.
PRODUCER_KILLS = (3, 15, 27, 36, 45)


# --------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A ``python -m cardpipe`` subprocess; its output goes to files (no pipe to fill up)."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs after {timeout:.0f} s\n{self.describe()}") from None

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def describe(self) -> str:
        return f"{self.name}: exit {self.popen.returncode}\n--- stdout\n{self.stdout()}\n--- stderr\n{self.stderr()}"


class Processes:
    """Starts cardpipe subprocesses; whatever still runs at the end of the test is killed (by pid)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str], name: str, crash: str | None = None) -> Proc:
        full_env = {k: v for k, v in env.items() if k != "CARDPIPE_CRASH_AT"}
        full_env["PYTHONPATH"] = str(REPO_ROOT)
        if crash:
            full_env["CARDPIPE_CRASH_AT"] = crash
        self.logs.mkdir(parents=True, exist_ok=True)
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with out.open("wb") as out_fh, err.open("wb") as err_fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", "cardpipe", *args],
                env=full_env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out_fh,
                stderr=err_fh,
            )
        proc = Proc(name, popen, out, err)
        self.started.append(proc)
        return proc

    def run(self, args: list[str], env: dict[str, str], name: str, crash: str | None = None) -> Proc:
        """Start and wait; the exit status is the caller's to check."""
        proc = self.start(args, env, name, crash)
        proc.wait()
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, what: str, proc: Proc | None = None, timeout: float = WAIT_SECONDS) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} ended before {what}\n{proc.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------- expected


@dataclass(frozen=True)
class Expected:
    decisions: dict[int, tuple[str, Decimal | None, str | None]]  # id -> (status, pending_balance, reason)
    balances: dict[int, Decimal]  # card -> pending balance after its last transaction


def expected_stream(data: Path) -> Expected:
    decisions, _ = reference_results(data)
    balances = {}
    for tx, _status, balance, _reason in decisions.values():  # in decision order: the last one wins
        balances[tx.card_id] = balance
    return Expected({k: v[1:] for k, v in decisions.items()}, balances)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data50k")
    generate_dataset(data, GeneratorConfig(transactions=N_TRANSACTIONS, seed=4711))
    return data


@pytest.fixture(scope="module")
def expected(dataset: Path) -> Expected:
    return expected_stream(dataset)


# --------------------------------------------------------------------------------------------- database


def count_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one())


def offsets_total(engine: Engine) -> int:
    """Sum of the checkpointed next offsets: the messages the committed checkpoints cover."""
    with engine.connect() as conn:
        total = conn.execute(select(func.sum(schema.stream_offsets.c.next_offset))).scalar()
    return int(total or 0)


def stream_table(engine: Engine) -> dict[int, tuple[str, Decimal | None, str | None]]:
    t = schema.stream_transactions
    with engine.connect() as conn:
        return {
            r.transaction_id: (r.status, r.pending_balance, r.decline_reason)
            for r in conn.execute(select(t.c.transaction_id, t.c.status, t.c.pending_balance, t.c.decline_reason))
        }


def card_states(engine: Engine) -> dict[int, Decimal]:
    with engine.connect() as conn:
        return dict(conn.execute(select(schema.card_states.c.card_id, schema.card_states.c.pending_balance)).all())


def stream_outcome(engine: Engine, results: Path, expected: Expected) -> dict[str, int]:
    """Lost, duplicated and wrong decisions, in the table and in ``stream_transactions.csv``."""
    table = stream_table(engine)
    rows = read_csv_rows(results / "stream_transactions.csv")
    ids = Counter(int(r["transaction_id"]) for r in rows)
    from_csv = {
        int(r["transaction_id"]): (
            r["status"],
            Decimal(r["pending_balance"]) if r["pending_balance"] else None,
            r["decline_reason"] or None,
        )
        for r in rows
    }
    want = expected.decisions
    return {
        "table_rows": len(table),
        "table_lost": len(want.keys() - table.keys()),
        "table_extra": len(table.keys() - want.keys()),
        "table_wrong": sum(1 for k, v in table.items() if k in want and want[k] != v),
        "csv_rows": len(rows),
        "csv_lost": len(want.keys() - ids.keys()),
        "csv_duplicated": sum(n - 1 for n in ids.values()),
        "csv_wrong": sum(1 for k, v in from_csv.items() if want.get(k) != v),
        "card_states_wrong": sum(1 for k, v in card_states(engine).items() if expected.balances.get(k) != v)
        + len(expected.balances.keys() - card_states(engine).keys()),
    }


def assert_stream_exact(engine: Engine, results: Path, expected: Expected) -> dict[str, int]:
    outcome = stream_outcome(engine, results, expected)
    n = len(expected.decisions)
    assert outcome == {
        "table_rows": n,
        "table_lost": 0,
        "table_extra": 0,
        "table_wrong": 0,
        "csv_rows": n,
        "csv_lost": 0,
        "csv_duplicated": 0,
        "csv_wrong": 0,
        "card_states_wrong": 0,
    }, outcome
    # Belt and braces: the exact equalities the counts summarise.
    assert stream_table(engine) == expected.decisions
    assert card_states(engine) == expected.balances
    return outcome


CONSUME_LINE = re.compile(r"decided ([\d,]+) messages in .*, ([\d,]+) duplicates ignored")


def consume_counts(proc: Proc) -> tuple[int, int]:
    """(messages, duplicates ignored) from the summary line ``cardpipe consume`` prints."""
    match = CONSUME_LINE.search(proc.stdout())
    assert match, proc.describe()
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


def topic_size(bootstrap: str, topic: str) -> int:
    return sum(log_end_offsets(bootstrap, topic).values())


# --------------------------------------------------------------------------------------------- 1. consumer


@pytest.mark.mysql
def test_consumer_sigkilled_at_many_points_resumes_exactly(
    dataset, expected, tmp_path, mysql_env, mysql_database, processes
):
    """15 SIGKILLs over a 50,000-transaction stream (12 crash points, 3 external): 0 lost, 0 duplicated."""
    assert (FIRST_BATCH_SIZE, 2 * FIRST_BATCH_SIZE) == (500, 1_000) < (BATCH_SIZE,) * 2  # the plan's arithmetic
    results = tmp_path / "results"
    settings = Settings.from_env(env=mysql_env, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    env = env_without_services(**mysql_env)
    args = ["consume", "--results-dir", str(results), "--batch-size", str(BATCH_SIZE), "--idle-seconds", "3"]
    engine = create_engine(mysql_database, pool_pre_ping=True)
    broker = ensure_broker(None, results)
    kills: list[tuple[str, int]] = []
    try:
        assert commands.produce(settings, broker=broker).published == N_TRANSACTIONS
        rows = 0
        for i, step in enumerate(CONSUMER_PLAN):
            if isinstance(step, str):
                how = step
                proc = processes.start(args, env, f"consume-{i}", crash=step)
            else:
                how = f"external SIGKILL {step:.2f} s after a commit"
                proc = processes.start(args, env, f"consume-{i}-external")
                wait_for(lambda before=rows: count_rows(engine) > before, "a committed batch", proc)
                time.sleep(step)
                os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == SIGKILLED, proc.describe()
            now = count_rows(engine)
            assert rows < now < N_TRANSACTIONS, f"kill {i} ({how}): {rows} -> {now} rows"
            # Atomic checkpoint: every committed offset has its decision, and no decision lacks its offset.
            assert offsets_total(engine) == now, f"kill {i} ({how}): offsets and rows disagree"
            kills.append((how, now))
            rows = now
        # Kills spread over the stream: the first in its first tenth, the last past its second half.
        assert kills[0][1] <= N_TRANSACTIONS // 10 and kills[-1][1] >= N_TRANSACTIONS // 2, kills

        final = processes.run(args, env, "consume-final")
        assert final.popen.returncode == 0, final.describe()
        messages, duplicates = consume_counts(final)
    finally:
        stop_broker(results)
    try:
        assert messages == N_TRANSACTIONS - rows, "the final run read again what was committed before"
        assert duplicates == 0
        assert offsets_total(engine) == N_TRANSACTIONS
        outcome = assert_stream_exact(engine, results, expected)
    finally:
        engine.dispose()
    print(
        f"\nconsumer kills (point, rows committed when it died): {kills}; final run decided {messages} "
        f"messages; outcome {outcome}"
    )


# --------------------------------------------------------------------------------------------- 2. producer


@pytest.mark.mysql
def test_producer_sigkilled_at_five_points_duplicates_are_absorbed(
    dataset, expected, tmp_path, mysql_env, mysql_database, processes
):
    """`produce` dies 5 times part-way (re-publishing from the start each time); every duplicate is ignored."""
    results = tmp_path / "results"
    settings = Settings.from_env(env=mysql_env, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    env = env_without_services(**mysql_env)
    engine = create_engine(mysql_database, pool_pre_ping=True)
    broker = ensure_broker(None, results)
    sizes = []
    try:
        for n in PRODUCER_KILLS:
            proc = processes.run(
                ["produce", "--results-dir", str(results)], env, f"produce-{n}", crash=f"produce.acked:{n}"
            )
            assert proc.popen.returncode == SIGKILLED, proc.describe()
            assert "published" not in proc.stdout()
            sizes.append(topic_size(broker.bootstrap_servers, settings.kafka_topic))
        # Each killed run dies after the broker acknowledged n thousand of its messages: they stay in the topic.
        added = [after - before for before, after in zip([0, *sizes], sizes, strict=False)]
        assert all(a >= n * 1000 for a, n in zip(added, PRODUCER_KILLS, strict=True)), (added, PRODUCER_KILLS)
        assert count_rows(engine) == 0
        full = processes.run(["produce", "--results-dir", str(results)], env, "produce-full")
        assert full.popen.returncode == 0, full.describe()
        assert f"published {N_TRANSACTIONS:,} transactions" in full.stdout()
        in_topic = topic_size(broker.bootstrap_servers, settings.kafka_topic)
        assert in_topic > N_TRANSACTIONS  # the killed runs' deliveries are in the topic too

        consumer = processes.run(["consume", "--results-dir", str(results), "--idle-seconds", "3"], env, "consume")
        assert consumer.popen.returncode == 0, consumer.describe()
        messages, duplicates = consume_counts(consumer)
    finally:
        stop_broker(results)
    try:
        assert messages == in_topic
        assert duplicates == in_topic - N_TRANSACTIONS
        outcome = assert_stream_exact(engine, results, expected)
    finally:
        engine.dispose()
    print(
        f"\nproducer kills after {[n * 1000 for n in PRODUCER_KILLS]} messages acknowledged; "
        f"topic size after each: {sizes}; "
        f"after the full produce {in_topic}; consumer: {messages} messages, {duplicates} duplicates ignored; "
        f"outcome {outcome}"
    )


# --------------------------------------------------------------------------------------------- 3. batch


def table_cells(url: URL, name: str) -> list[tuple[str, ...]]:
    """A table's or view's rows as text, in key order."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                tuple(format_cell(v) for v in row) for row in conn.execute(text(f"SELECT * FROM {name} ORDER BY 1"))
            ]
    finally:
        engine.dispose()


def snapshot(results: Path, url: URL, tables: tuple[str, ...]) -> dict[str, object]:
    """The result files and tables named by ``tables`` (file ``<table>.csv`` beside each)."""
    state: dict[str, object] = {}
    for name in tables:
        path = results / f"{name}.csv"
        state[f"{name}.csv"] = path.read_bytes() if path.exists() else None
        state[name] = table_cells(url, name)
    return state


def assert_same(actual: dict[str, object], expected: dict[str, object]) -> None:
    differing = sorted(k for k in expected if actual.get(k) != expected[k])
    assert not differing, f"changed by the killed run: {differing}"


BATCH_TABLES = tuple(BATCH_OUTPUTS)


def decide_more(url: URL, count: int) -> list[int]:
    """``count`` new pending decisions committed after the watermark in force (as a consumer's checkpoint would:
    the rows and their partition's advanced checkpoint sequence together); returns their ids."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            partition, seq = conn.execute(
                text("SELECT kafka_partition, checkpoint_seq FROM stream_offsets ORDER BY kafka_partition LIMIT 1")
            ).one()
            top = conn.execute(text("SELECT MAX(transaction_id) FROM stream_transactions")).scalar_one()
            template = (
                conn.execute(
                    select(schema.stream_transactions).where(schema.stream_transactions.c.status == "pending").limit(1)
                )
                .mappings()
                .one()
            )
            ids = list(range(top + 1, top + 1 + count))
            conn.execute(
                insert(schema.stream_transactions),
                [
                    {
                        **template,
                        "transaction_id": i,
                        "amount": Decimal("1.00"),
                        "kafka_partition": partition,
                        "checkpoint_seq": seq + 1,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                text("UPDATE stream_offsets SET checkpoint_seq = :s WHERE kafka_partition = :p"),
                {"s": seq + 1, "p": partition},
            )
        return ids
    finally:
        engine.dispose()


def settlement_statuses(url: URL) -> dict[int, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT settlement_id, status FROM settlements")).all())
    finally:
        engine.dispose()


def _killed_settlements_leave_the_previous_in_force(
    url: URL, results: Path, env: dict[str, str], processes: Processes, engine_name: str
) -> None:
    """Two settlements killed (after computing, after storing their rows): views, files and the settlement in
    force stay as they were; the next `batch` publishes the new decisions."""
    complete = snapshot(results, url, RESULT_TABLES)
    new_ids = decide_more(url, 25)
    for point in ("batch.computed:1", "batch.staged:1"):
        crashed = processes.run(
            ["batch", "--results-dir", str(results), "--engine", engine_name], env, f"batch-crash-{point}", crash=point
        )
        assert crashed.popen.returncode == SIGKILLED, crashed.describe()
        assert_same(
            snapshot(results, url, RESULT_TABLES),
            {k: v for k, v in complete.items() if not k.startswith("stream_transactions")},
        )
        assert settlement_statuses(url)[1] == "published"
    rerun = processes.run(["batch", "--results-dir", str(results), "--engine", engine_name], env, "batch-again")
    assert rerun.popen.returncode == 0, rerun.describe()
    statuses = settlement_statuses(url)
    assert statuses == {1: "published", 2: "failed", 3: "failed", 4: "published"}, statuses
    settled = {int(r["transaction_id"]): r["status"] for r in read_csv_rows(results / "batch_transactions.csv")}
    assert all(settled[i] == "approved" for i in new_ids)
    assert len(settled) == len(complete["batch_transactions"]) + 25  # type: ignore[arg-type]
    for name in BATCH_TABLES:
        table_matches_csv(url, name, results / f"{name}.csv")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:  # nothing of the killed settlements is left
            assert conn.execute(text("SELECT COUNT(*) FROM settled_cards WHERE settlement_id <> 4")).scalar() == 0
    finally:
        engine.dispose()
    assert not list(results.glob(f"{commands.BATCH_STAGING_DIR}*"))


@pytest.mark.slow
def test_killed_settlements_keep_the_previous_one_in_force_sqlite(seed_dataset, tmp_path, processes):
    """SQLite (embedded defaults): a full `run`, then settlements killed at each stage."""
    data = seed_dataset / "input"
    results = tmp_path / "results"
    db = URL.create("sqlite", database=str(results / "cardpipe.db"))
    env = env_without_services()
    try:
        run = processes.run(["run", "--data-dir", str(data), "--results-dir", str(results)], env, "run")
        assert run.popen.returncode == 0, run.describe()
        compare_results(seed_dataset / "expected", results)
        assert_results_match_reference(results, data)
        for name in RESULT_TABLES:
            table_matches_csv(db, name, results / f"{name}.csv")
        _killed_settlements_leave_the_previous_in_force(db, results, env, processes, "embedded")
    finally:
        stop_broker(results)


@pytest.mark.slow
@pytest.mark.mysql
@pytest.mark.spark
def test_killed_spark_settlements_keep_the_previous_one_in_force_mariadb(
    seed_dataset, tmp_path, mysql_env, mysql_database, processes
):
    """MariaDB, the Spark engine: killed settlements (and their Spark JVM) change nothing; the rerun publishes."""
    data = seed_dataset / "input"
    results = tmp_path / "results"
    env = env_without_services(**mysql_env)
    try:
        run = processes.run(["run", "--data-dir", str(data), "--results-dir", str(results)], env, "run")
        assert run.popen.returncode == 0, run.describe()
        compare_results(seed_dataset / "expected", results)
        _killed_settlements_leave_the_previous_in_force(mysql_database, results, env, processes, "spark")
    finally:
        stop_broker(results)
