"""A checkpoint committed on its own thread while the next batch is decided: a commit that fails rewinds the
consumer to the last checkpoint, and the batch decided on it is decided again; the results are those of a run
where nothing failed, pipelined or not."""

import threading
import time

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.exc import IntegrityError

from cardpipe.config import SAMPLE_DATA_DIR, Settings
from cardpipe.domain.records import STREAM_COLUMNS
from cardpipe.errors import SettlementChanged
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.broker import broker_session
from cardpipe.stream.consumer import ConsumeOptions, consume

pytestmark = pytest.mark.kafka


class FailingOnce(StreamStore):
    """Fails one commit, slowly (the next batch is decided meanwhile when pipelined), before writing anything: the
    first committed on the checkpoint thread (``in_thread``), else the third."""

    def __init__(self, *args, error: BaseException | None, in_thread: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.error, self.in_thread, self.calls, self.threads = error, in_thread, 0, set()
        self.failed_call: int | None = None
        self.failing: tuple[float, float] | None = None  # when the failing commit ran
        self.lookups: list[float] = []  # when batches were decided (each looks its ids up)

    def commit_durably(self, batch, **kwargs):
        started = time.monotonic()
        self.calls += 1
        thread = threading.current_thread()
        self.threads.add(thread.name)
        due = thread is not threading.main_thread() if self.in_thread else self.calls == 3
        if self.error is not None and self.failed_call is None and due:
            self.failed_call = self.calls
            time.sleep(0.3)
            self.failing = (started, time.monotonic())
            raise self.error
        super().commit_durably(batch, **kwargs)

    def lookup_decided(self, transaction_ids, **kwargs):
        self.lookups.append(time.monotonic())
        return super().lookup_decided(transaction_ids, **kwargs)


def run(tmp_path, name, *, pipelined, error):
    settings = Settings.from_env(env={}, results_dir=tmp_path / name, data_dir=SAMPLE_DATA_DIR)
    commands.setup(settings)
    commands.load(settings)
    engine = create_engine(settings.database_url)
    try:
        with broker_session(None, settings.results_dir) as broker:
            published = commands.produce(settings, broker=broker).published
            store = FailingOnce(engine, settings.kafka_topic, error=error, in_thread=bool(pipelined))
            summary = consume(
                broker.bootstrap_servers,
                settings.kafka_topic,
                store,
                options=ConsumeOptions(until_caught_up=True, batch_size=10, pipelined=pipelined),
            )
        t = schema.stream_transactions
        with engine.connect() as conn:
            rows = conn.execute(
                select(*(t.c[c] for c in (*STREAM_COLUMNS, "credit_limit"))).order_by(t.c.transaction_id)
            ).all()
    finally:
        engine.dispose()
    assert summary.messages == published == len(rows)
    return summary, store, rows


@pytest.mark.parametrize(
    "error, counted",
    [
        (SettlementChanged(), "settlement_changes"),
        (IntegrityError("INSERT …", {}, Exception("duplicate key")), "checkpoint_conflicts"),
    ],
    ids=["settlement-changed", "integrity-error"],
)
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "in-place"])
def test_a_failed_commit_rewinds_and_the_results_are_a_clean_runs(tmp_path, pipelined, error, counted):
    _, _, expected = run(tmp_path, "clean", pipelined=False, error=None)
    summary, store, rows = run(tmp_path, "failing", pipelined=pipelined, error=error)
    assert summary.counts[counted] == 1
    assert rows == expected
    # The batches up to the failing one were decided before it failed, and pipelined the next one too (on the
    # failing one, in flight).
    assert store.failing is not None and store.failed_call is not None
    assert sum(t < store.failing[1] for t in store.lookups) == store.failed_call + (1 if pipelined else 0)
    # The full batches' commits ran on the checkpoint thread (pipelined), the others on the consumer's own.
    here = threading.current_thread().name
    assert store.threads - {here} == ({"cardpipe-checkpoint_0"} if pipelined else set())
