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
    """Fails its ``fail_at``-th commit once (slowly: the next batch is decided meanwhile), before writing."""

    def __init__(self, *args, fail_at: int, error: BaseException | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.error, self.calls, self.threads = fail_at, error, 0, set()
        self.failing: tuple[float, float] | None = None  # when the failing commit ran
        self.lookups: list[float] = []  # when batches were decided (each looks its ids up)

    def commit_durably(self, batch, **kwargs):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.calls == self.fail_at and self.error is not None:
            started = time.monotonic()
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
            store = FailingOnce(engine, settings.kafka_topic, fail_at=3, error=error)
            summary = consume(
                broker.bootstrap_servers,
                settings.kafka_topic,
                store,
                options=ConsumeOptions(until_caught_up=True, batch_size=50, pipelined=pipelined),
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
    # Batches 1-3 were decided before commit 3 failed, and pipelined, batch 4 too (on batch 3, in flight).
    assert store.failing is not None
    assert sum(t < store.failing[1] for t in store.lookups) == (4 if pipelined else 3)
    # Every commit ran on the checkpoint thread (pipelined), or on the consumer's own (in place).
    assert store.threads == ({"cardpipe-checkpoint_0"} if pipelined else {threading.current_thread().name})
