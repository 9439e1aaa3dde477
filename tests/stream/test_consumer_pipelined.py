"""A checkpoint committed on its own thread while the next batch is decided: a commit that fails rewinds the
consumer to the last checkpoint, and the batch decided on it is decided again; the results are those of a run
where nothing failed, pipelined or not."""

import threading
import time

import pytest
from sqlalchemy.exc import IntegrityError

from cardpipe.errors import SettlementChanged
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.consumer import ConsumeOptions
from tests.stream.helpers import consume_sample

pytestmark = pytest.mark.kafka


class FailingOnce(StreamStore):
    """Fails one commit, slowly (the next batch is decided meanwhile when pipelined), before writing anything: the
    first committed on the checkpoint thread (``in_thread``), else the third."""

    def __init__(self, *args, error: BaseException | None, in_thread: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.error, self.in_thread, self.calls, self.threads = error, in_thread, 0, set()
        self.failed_call: int | None = None
        self.failing: tuple[float, float] | None = None  # when the failing commit ran
        self.checks: list[float] = []  # when batches were decided (each checks the settlement first), or resumed

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

    def settlement_in_force(self):
        self.checks.append(time.monotonic())
        return super().settlement_in_force()


def run(tmp_path, name, *, pipelined, error):
    summary, store, rows, published = consume_sample(
        tmp_path / name,
        lambda engine, topic: FailingOnce(engine, topic, error=error, in_thread=bool(pipelined)),
        ConsumeOptions(until_caught_up=True, batch_size=10, pipelined=pipelined),
    )
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
    # failing one, in flight); the first check is the consumer's start.
    assert store.failing is not None and store.failed_call is not None
    assert sum(t < store.failing[1] for t in store.checks) == 1 + store.failed_call + (1 if pipelined else 0)
    # The full batches' commits ran on the checkpoint thread (pipelined), the others on the consumer's own.
    here = threading.current_thread().name
    assert store.threads - {here} == ({"cardpipe-checkpoint_0"} if pipelined else set())
