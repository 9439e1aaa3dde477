"""Would a consumer that decides in one process and writes in another be faster? A feasibility measurement,
with no broker: the product's own stages on a generated dataset's messages, in checkpoint batches.

    python3 bench/split_feasibility.py [--transactions 500000] [--batch 5000] [--rounds 2]

Two ways, alternated ``--rounds`` times, each on a fresh SQLite serving file (set up and loaded by the product's
``setup`` and ``load``, not timed):

- ``one``: one process decides a batch (``StreamProcessor.process``, the lookup of decided ids on the store),
  then commits it (``StreamStore.commit``), as the consumer's loop does;
- ``split``: the deciding process hands each decided batch (pickled, through a pipe) to a second process that
  commits it; the decider goes on with the next batch meanwhile (the pipe's buffer bounds how far ahead);
- ``split-columns``: as ``split``, but the decider also converts the decisions to the values the database
  driver takes (``BulkWriter``'s own conversion: text and integers, columns of them) and sends those, so
  neither side pickles a ``Decimal``, a ``datetime`` or a row object per decision.

The figure is the wall time from the first batch decided to the last committed, and each process's CPU time
(``time.process_time``). Both write the same rows (checked: row count and the sum of pending balances). What
this leaves out of the consumer: polling the broker, the export process, start and stop.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from common import WORK_DIR, cards_and_messages, dataset, fresh_dir, load_average, say, settings

TOPIC = "credit-card-transactions"


def prepared_store(work: Path, data: Path) -> Any:
    """A fresh SQLite serving file with the dataset loaded; its StreamStore holding every partition."""
    from cardpipe.orchestration import commands
    from cardpipe.serving.database import make_engine
    from cardpipe.serving.stream_store import StreamStore

    s = settings({}, work, data)
    commands.setup(s)
    commands.load(s)
    store = StreamStore(make_engine(s.database_url), s.kafka_topic)
    store.acquire([0])
    return store


def _committer(url: Any, topic: str, batches: Any, done: Any) -> None:
    """The writing process: commit each batch it is given until None; report its CPU seconds. A batch comes
    as it is, or as (the decisions' converted columns, the batch with placeholders for its decisions)."""
    from cardpipe.serving.database import make_engine
    from cardpipe.serving.stream_store import StreamStore

    store = StreamStore(make_engine(url), topic, owner="bench-split")
    store.acquire([0])
    writer = store._decisions  # noqa: SLF001
    done.send("ready")
    while (item := batches.recv()) is not None:
        if isinstance(item, tuple):
            converted, batch = item
            # The commit's decisions are the converted columns (the placeholders only carry the count).
            writer.write_columns = lambda conn, _values, c=converted: writer._execute(conn, list(zip(*c, strict=True)))  # type: ignore[method-assign]  # noqa: SLF001
            store.commit(batch)
        else:
            store.commit(item)
    done.send(time.process_time())


def _converted(store: Any, batch: Any, seq: int) -> tuple[list[Any], Any]:
    """(``batch``'s decisions as the driver's values, column by column; ``batch`` with placeholders instead)."""
    from cardpipe.serving.stream_store import _decision_columns

    columns = store._decisions._processed(_decision_columns(batch, dict.fromkeys(batch.next_offsets, seq)))  # noqa: SLF001
    count = len(batch.decided)
    batch.decided, batch.positions = [()] * count, [(0, None)] * count
    return columns, batch
    store.engine.dispose()


def run(mode: str, work: Path, data: Path, batch_size: int) -> dict[str, Any]:
    """One pass of ``mode`` on a fresh serving file: wall, CPU per process, what was written."""
    from sqlalchemy import text

    from cardpipe.stream.processing import StreamProcessor

    store = prepared_store(fresh_dir(work), data)
    cards, messages = cards_and_messages(data)
    processor = StreamProcessor(TOPIC, cards, dict.fromkeys(cards, Decimal("0.00")), store.lookup_decided)
    gc.collect()
    gc.freeze()  # as the consumer does once its cards are loaded
    result: dict[str, Any] = {"mode": mode, "messages": len(messages)}
    if mode == "one":
        cpu0, started = time.process_time(), time.perf_counter()
        for start in range(0, len(messages), batch_size):
            store.commit(processor.process(messages[start : start + batch_size]))
        result.update(wall=time.perf_counter() - started, cpu_decider=time.process_time() - cpu0, cpu_writer=0.0)
    else:
        store.release()
        ctx = multiprocessing.get_context("spawn")
        batches_r, batches_w = ctx.Pipe(duplex=False)
        done_r, done_w = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_committer, args=(store.engine.url, TOPIC, batches_r, done_w))
        child.start()
        if done_r.recv() != "ready":
            raise SystemExit("the writing process did not start")
        # The pipe's buffer bounds the queue: the decider waits when the writer is a batch or so behind.
        cpu0, started = time.process_time(), time.perf_counter()
        for seq, start in enumerate(range(0, len(messages), batch_size), start=1):
            batch = processor.process(messages[start : start + batch_size])
            batches_w.send(_converted(store, batch, seq) if mode == "split-columns" else batch)
        batches_w.send(None)
        decided_at = time.perf_counter() - started
        writer_cpu = done_r.recv()
        result.update(
            wall=time.perf_counter() - started,
            decided_at=decided_at,
            cpu_decider=time.process_time() - cpu0,
            cpu_writer=writer_cpu,
        )
        child.join()
    with store.engine.connect() as conn:
        rows, pending = conn.execute(
            text("SELECT count(*), sum(CAST(pending_balance AS REAL)) FROM stream_transactions")
        ).one()
    store.engine.dispose()
    result.update(rows=rows, pending_sum=round(pending or 0.0, 2))
    result["tx_per_s"] = round(len(messages) / result["wall"])
    for key in ("wall", "decided_at", "cpu_decider", "cpu_writer"):
        if key in result:
            result[key] = round(result[key], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=5000, help="messages per checkpoint (the consumer's)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = dataset(args.transactions, args.seed)
    work = WORK_DIR / "split"
    say(f"load average {load_average()}")
    results = []
    for round_ in range(args.rounds):
        for mode in ("one", "split", "split-columns"):
            r = run(mode, work, data, args.batch)
            results.append(r)
            say(f"round {round_ + 1} {mode}: {r}")
    rows = {(r["rows"], r["pending_sum"]) for r in results}
    if len(rows) != 1:
        raise SystemExit(f"the ways wrote different rows: {rows}")
    say(f"load average {load_average()}")


if __name__ == "__main__":
    main()
