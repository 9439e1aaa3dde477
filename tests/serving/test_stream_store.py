"""The consumer's checkpoint store on SQLite and MariaDB: commit, restore, lookup, atomicity."""

from datetime import datetime
from decimal import Decimal as D

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from cardpipe.domain.records import Transaction
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.codec import encode_transaction
from cardpipe.stream.processing import RawMessage, StreamProcessor


@pytest.fixture
def store(database_url, seed_dataset):
    engine = make_engine(database_url)
    create_clean_schema(engine)
    load_inputs(engine, seed_dataset / "input")
    yield StreamStore(engine, "topic-a")
    engine.dispose()


def messages(txs, partition=0, start=0):
    return [RawMessage(partition, start + i, *encode_transaction(t), None) for i, t in enumerate(txs)]


TX1 = Transaction(
    1,
    26,
    "Shop 'A', \"B\"",
    datetime(2025, 4, 1, 1, 21, 9),
    D("131.76"),
    "4395 Brenda Lake, Queens, NY 10859",
    "bill_payment",
    None,
)
TX2 = Transaction(2, 26, "Ünïcode ✓", datetime(2025, 4, 1, 2, 0, 0), D("-5.01"), "x, NY 10001", "refund", 1)


def processor(store):
    balances, _ = store.restore()
    return StreamProcessor(store.topic, store.card_profiles(), balances, store.lookup_decided)


def test_commit_then_restore_resumes_exactly(store):
    proc = processor(store)
    batch = proc.process(messages([TX1, TX2, TX1]) + [RawMessage(3, 41, b"k", b"\x00garbage", None)])
    store.commit(batch)
    balances, offsets = store.restore()
    assert balances[26] == D("22.65") + D("131.76") - D("5.01")  # card 26 starts at 22.65
    assert offsets == {0: 3, 3: 42}
    assert store.lookup_decided([1, 2, 99]) == {1: TX1, 2: TX2}
    with store.engine.connect() as conn:
        rejected = conn.execute(select(schema.rejected_transactions)).one()
    assert (rejected.reason, rejected.kafka_partition, rejected.kafka_offset) == ("not_json", 3, 41)
    assert rejected.message_value == b"\x00garbage" and rejected.message_key == b"k"


def test_a_failing_checkpoint_leaves_nothing_behind(store):
    proc = processor(store)
    store.commit(proc.process(messages([TX1])))
    batch = proc.process(messages([TX2], start=1))
    batch.decided.append(dict(batch.decided[0], transaction_id=1))  # collides with the committed row
    batch.positions.append(batch.positions[0])
    with pytest.raises(IntegrityError):
        store.commit(batch)
    balances, offsets = store.restore()
    assert offsets == {0: 1} and balances[26] == D("22.65") + D("131.76")
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one() == 1


def test_start_at_and_reset_offsets(store):
    store.start_at({0: 10, 1: 20})
    assert store.restore()[1] == {0: 10, 1: 20}
    store.reset_offsets([0])
    assert store.restore()[1] == {1: 20}
    store.start_at({0: 5, 2: 7})
    store.reset_offsets()
    assert store.restore()[1] == {}


def test_commit_durably_retries_transient_failures(store):
    from sqlalchemy.exc import OperationalError

    batch = processor(store).process(messages([TX1]))
    real_commit, failures, sleeps = store.commit, [2], []

    def flaky(b):
        if failures[0]:
            failures[0] -= 1
            raise OperationalError("INSERT", {}, Exception("server has gone away"))
        real_commit(b)

    store.commit = flaky
    store.commit_durably(batch, sleep=sleeps.append)
    assert sleeps == [0.2, 0.4]
    assert store.restore()[1] == {0: 1}


def test_commit_whose_acknowledgement_was_lost_is_not_written_twice(store):
    batch = processor(store).process(messages([TX1]))
    store.commit(batch)  # committed, but suppose the consumer never heard back and retries
    store.commit_durably(batch)
    assert store.lookup_decided([1]) == {1: TX1}


def test_commit_durably_gives_up_with_a_clear_error(store):
    from sqlalchemy.exc import OperationalError

    from cardpipe.errors import DatabaseUnavailable

    batch = processor(store).process(messages([TX1]))

    def down(_b):
        raise OperationalError("INSERT", {}, Exception("cannot connect"))

    store.commit = down
    store._is_committed = lambda _b: False
    with pytest.raises(DatabaseUnavailable):
        store.commit_durably(batch, give_up_after=0.0, sleep=lambda _s: None)


def test_committed_offsets_and_undecided_count(store):
    """What `consume` compares to finish a stream: the committed offsets, and the transactions not decided yet."""
    from cardpipe.serving.transaction_source import count_undecided

    loaded = count_undecided(store.engine)
    assert loaded > 0 and store.committed_offsets() == {}
    store.commit(processor(store).process(messages([TX1])))
    store.start_at({1: 7})
    assert store.committed_offsets() == {0: 1, 1: 7}
    store.reset_offsets([1])
    assert store.committed_offsets() == {0: 1, 1: None}
    assert count_undecided(store.engine) == loaded - 1  # transaction 1 is in the seed dataset


def test_other_consumers_are_live_leases_of_others(store):
    import socket
    import subprocess
    import sys

    other = StreamStore(store.engine, "topic-a")
    assert other.acquire([0, 1]) == [0, 1]
    assert store.other_consumers() == {other.owner: [0, 1]}
    assert other.other_consumers() == {}
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with store.engine.begin() as conn:
        conn.execute(schema.stream_leases.update().values(owner=f"{socket.gethostname()}:{dead_pid.stdout.strip()}:1"))
    assert store.other_consumers() == {}, "a dead process's leases are no one's"
