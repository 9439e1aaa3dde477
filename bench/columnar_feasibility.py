"""Feasibility of a columnar stream core: Apache Arrow compute deciding a batch, ADBC writing it into SQLite.

    python3 bench/columnar_feasibility.py [--transactions 500000] [--batch 5000] [--rounds 2]

An experiment, not the product. It needs ``pyarrow`` and ``adbc-driver-sqlite``, which cardpipe does not
install; put them beside the benchmark, not in the project's environment:

    .venv/bin/pip install --target bench/out/columnar-deps pyarrow adbc-driver-sqlite

Three ways over one dataset's messages in checkpoint batches of ``--batch`` (no broker), alternated ``--rounds``
times, each on a fresh SQLite serving file set up and loaded by the product (not timed):

- ``product``: the consumer's loop without polling: ``StreamProcessor.process`` (with the lookup of decided ids
  on the store), then ``StreamStore.commit``;
- ``columnar``: each batch read by Arrow's JSON reader and checked as the product's column-by-column path does
  (``ColumnarDecider.read`` of ``cardpipe.stream.columnar``); the rules as column kernels for each card's first
  transaction in the batch, and one by one for its later ones (a few percent), each card's state in lists of
  integer cents; then one transaction on an ADBC connection: the lookup of decided ids, the decisions
  appended from the Arrow table (``adbc_ingest``), ``card_states`` upserted and the partition's offset,
  the checkpoint log row and the lease written, the settlement in force read;
- ``columnar/sqlite3``: the same, but the Arrow tables' columns handed as Python lists to the standard
  ``sqlite3`` module's ``executemany`` (the product's driver): what the columnar decide gives without ADBC.

The figure is each way's wall and CPU time (``time.process_time``) from the first batch to the last commit;
for the columnar ways also their decide part alone. Every row of ``stream_transactions``, ``card_states`` and
``stream_offsets`` is compared between the ways (each value with its SQLite type): a difference fails the run.
A batch the columnar checks do not take would go to the product's per-message path; this dataset has none.
The product's column-by-column path (built after this experiment) keeps the authorizer's cards and writes
through ``sqlite3``; this one measures what ADBC adds. Its rule kernels restate those of
``cardpipe.domain.authorization`` for this measurement only; the comparison is what makes its figure mean
anything.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sqlite3
import sys
import time
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

from common import OUT_DIR, WORK_DIR, cards_and_messages, dataset, fresh_dir, load_average, print_table, say
from split_feasibility import TOPIC, prepared_store

DEPS = OUT_DIR / "columnar-deps"
if DEPS.is_dir():
    sys.path.append(str(DEPS))
try:
    import adbc_driver_sqlite.dbapi as adbc_sqlite
    import pyarrow as pa
    import pyarrow.compute as pc
except ImportError as exc:
    raise SystemExit(
        f"{exc}: this experiment needs pyarrow and adbc-driver-sqlite; "
        f".venv/bin/pip install --target {DEPS} pyarrow adbc-driver-sqlite"
    ) from None

from cardpipe.domain.authorization import zip_head  # noqa: E402
from cardpipe.domain.records import AMOUNT_OVER_HALF_LIMIT, LOCATION_TOO_FAR, OVER_CREDIT_LIMIT  # noqa: E402
from cardpipe.stream.columnar import ColumnarDecider  # noqa: E402

UPSERT_CARD = (
    "INSERT INTO card_states (card_id, pending_balance, pending_count) VALUES (?, ?, ?) ON CONFLICT (card_id) "
    "DO UPDATE SET pending_balance = excluded.pending_balance, pending_count = card_states.pending_count + "
    "excluded.pending_count"
)


class ColumnarCore:
    """The cards as columns (sorted ids, limits and owner's zip heads in cents and text) and each card's running
    pending balance; decides a batch of message values, or returns None for a batch it does not take."""

    def __init__(self, cards: dict[int, Any]) -> None:
        ids = sorted(cards)
        self.card_ids = pa.array(ids, pa.int64())
        self.limits = pa.array([int(cards[c].credit_limit * 100) for c in ids], pa.int64())
        self.heads = pa.array([zip_head(cards[c].customer_zip) for c in ids], pa.string())
        self.pending = [0] * len(ids)
        self.reader = ColumnarDecider()  # the product's reading and checks of a batch (cardpipe.stream.columnar)

    def decide(self, values: list[bytes]) -> tuple[Any, ...] | None:
        t = self.reader.read(values)
        if t is None or not pc.all(pc.string_is_ascii(t.column("location"))).as_py():  # ASCII zips only, here
            return None
        cid, loc, amount = t.column("card_id"), t.column("location"), t.column("amount")
        slots = pc.index_in(cid, value_set=self.card_ids)
        if slots.null_count:  # an unknown card: the per-message path records it
            return None
        cents = pc.cast(pc.replace_substring(amount, ".", ""), pa.int64())
        last = pc.struct_field(pc.extract_regex(loc, r"(?P<z>\S+)\s*$"), "z")
        merchant_head = pc.if_else(pc.greater_equal(pc.utf8_length(last), 5), pc.utf8_slice_codeunits(last, 0, 1), None)
        limit = pc.take(self.limits, slots)
        half = pc.greater_equal(pc.multiply(pc.abs(cents), 2), limit)
        far = pc.invert(pc.fill_null(pc.equal(pc.take(self.heads, slots), merchant_head), False))
        pending = self.pending
        slot_list = slots.to_pylist()
        balance = pa.array([pending[s] for s in slot_list], pa.int64())
        over = pc.greater(pc.add(balance, cents), limit)
        reason = pc.case_when(
            pc.make_struct(half, far, over), AMOUNT_OVER_HALF_LIMIT, LOCATION_TOO_FAR, OVER_CREDIT_LIMIT
        )
        reasons, amounts, limits = reason.to_pylist(), cents.to_pylist(), limit.to_pylist()
        seen: set[int] = set()
        first = [s not in seen and not seen.add(s) for s in slot_list]  # type: ignore[func-returns-value]
        halves = fars = None
        after = []
        for i, s in enumerate(slot_list):
            if not first[i]:  # a card's later transaction in the batch: its balance moved since
                if halves is None:
                    halves, fars = half.to_pylist(), far.to_pylist()
                r = (
                    AMOUNT_OVER_HALF_LIMIT
                    if halves[i]
                    else LOCATION_TOO_FAR
                    if fars[i]  # type: ignore[index]
                    else OVER_CREDIT_LIMIT
                    if pending[s] + amounts[i] > limits[i]
                    else None
                )
                reasons[i] = r
            if reasons[i] is None:
                pending[s] += amounts[i]
            after.append(pending[s])
        reason = pa.array(reasons, pa.string())
        return t, reason, pa.array(after, pa.int64()), limit, sorted(seen)


def _money(cents: Any) -> Any:
    """Cents as the REAL SQLite's NUMERIC affinity keeps for the text (the nearest double; integral: INTEGER)."""
    return pc.divide(pc.cast(cents, pa.float64()), 100.0)


def run_columnar(
    work: Path, data: Path, cards: dict[int, Any], messages: list[Any], size: int, *, driver: str = "adbc"
) -> dict[str, Any]:
    """``driver``: ``adbc`` appends the Arrow tables; ``sqlite3`` hands their columns, as Python lists, to the
    standard module's ``executemany`` (the product's driver) in the same statements."""
    store = prepared_store(fresh_dir(work), data)
    path, owner = str(store.engine.url.database), store.owner
    store.engine.dispose()
    core = ColumnarCore(cards)
    conn: Any
    if driver == "adbc":  # autocommit, so that the pragma may be set; each checkpoint BEGINs its transaction
        conn = adbc_sqlite.connect(path, autocommit=True)
        conn.cursor().execute("PRAGMA synchronous=NORMAL")
    else:
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    cur = conn.cursor()
    insert = f"INSERT INTO stream_transactions VALUES ({', '.join('?' * 14)})"
    decide_cpu = 0.0
    gc.collect()
    gc.freeze()
    cpu0, started = time.process_time(), time.perf_counter()
    for seq, start in enumerate(range(0, len(messages), size), start=1):
        batch = messages[start : start + size]
        d0 = time.process_time()
        decided = core.decide([m.value for m in batch])
        decide_cpu += time.process_time() - d0
        if decided is None:
            raise SystemExit(f"batch {seq}: the columnar checks did not take it")
        t, reason, after, limit, touched = decided
        n = t.num_rows
        ids = t.column("transaction_id")
        if driver == "adbc":
            cur.execute("BEGIN")
        cur.execute(
            "SELECT count(*) FROM stream_transactions WHERE transaction_id IN (SELECT value FROM json_each(?))",
            (str(ids.to_pylist()),),
        )
        if cur.fetchone()[0]:
            raise SystemExit("redelivered ids: not this experiment's")
        rows = pa.table(
            {
                **{name: t.column(name) for name in ("transaction_id", "card_id", "merchant_name")},
                "timestamp": pc.binary_join_element_wise(t.column("timestamp"), ".000000", ""),
                **{name: t.column(name) for name in ("amount", "location", "transaction_type")},
                "related_transaction_id": t.column("related_transaction_id"),
                "status": pc.if_else(pc.is_null(reason), "pending", "declined"),
                "pending_balance": _money(after),
                "decline_reason": reason,
                "credit_limit": _money(limit),
                "kafka_partition": pa.array([0] * n, pa.int32()),
                "checkpoint_seq": pa.array([seq] * n, pa.int64()),
            }
        )
        if driver == "adbc":
            cur.adbc_ingest("stream_transactions", rows, mode="append")
        else:
            cur.executemany(insert, zip(*(column.to_pylist() for column in rows.columns), strict=True))
        added = pc.value_counts(pc.filter(t.column("card_id"), pc.is_null(reason)))
        added_by_card = dict(zip(added.field("values").to_pylist(), added.field("counts").to_pylist(), strict=True))
        card_ids = pc.take(core.card_ids, pa.array(touched)).to_pylist()
        states = pa.table(
            {
                "card_id": pa.array(card_ids, pa.int64()),
                "pending_balance": _money(pa.array([core.pending[s] for s in touched], pa.int64())),
                "pending_count": pa.array([added_by_card.get(c, 0) for c in card_ids], pa.int64()),
            }
        )
        if driver == "adbc":
            cur.executemany(UPSERT_CARD, states)
        else:
            cur.executemany(UPSERT_CARD, zip(*(column.to_pylist() for column in states.columns), strict=True))
        cur.execute(
            "INSERT INTO stream_offsets (topic, kafka_partition, next_offset, checkpoint_seq) VALUES (?, 0, ?, ?) "
            "ON CONFLICT (topic, kafka_partition) DO UPDATE SET next_offset = excluded.next_offset, "
            "checkpoint_seq = excluded.checkpoint_seq",
            (TOPIC, batch[-1].offset + 1, seq),
        )
        cur.execute(
            "INSERT INTO stream_checkpoint_log (topic, owner, committed_ms, messages, pending, declined, rejected, "
            "duplicates, reasons) VALUES (?, ?, ?, ?, ?, ?, 0, 0, '{}')",
            (TOPIC, owner, int(time.time() * 1000), n, n - reason.null_count, reason.null_count),
        )
        cur.execute("UPDATE stream_leases SET expires_at = ? WHERE owner = ?", (time.time() + 30, owner))
        cur.execute("SELECT settlement_id FROM serving_state")
        cur.fetchall()
        if driver == "adbc":
            cur.execute("COMMIT")
        else:
            conn.commit()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    gc.unfreeze()
    cur.close()
    conn.close()
    return {"way": f"columnar/{driver}", "wall": wall, "cpu": cpu, "decide_cpu": decide_cpu, "path": path}


def run_product(work: Path, data: Path, cards: dict[int, Any], messages: list[Any], size: int) -> dict[str, Any]:
    from cardpipe.stream.processing import StreamProcessor

    store = prepared_store(fresh_dir(work), data)
    processor = StreamProcessor(TOPIC, cards, dict.fromkeys(cards, Decimal("0.00")), store.lookup_decided)
    gc.collect()
    gc.freeze()  # as the consumer does once its cards are loaded
    cpu0, started = time.process_time(), time.perf_counter()
    for start in range(0, len(messages), size):
        store.commit(processor.process(messages[start : start + size]))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    gc.unfreeze()
    store.engine.dispose()
    return {"way": "product", "wall": wall, "cpu": cpu, "decide_cpu": None, "path": str(store.engine.url.database)}


def digest(path: str) -> dict[str, str]:
    """Each compared table's rows in key order, every value quoted with its SQLite type, hashed."""
    keys = {
        "stream_transactions": "transaction_id",
        "card_states": "card_id",
        "stream_offsets": "topic, kafka_partition",
    }
    out = {}
    with sqlite3.connect(path) as db:
        for table, key in keys.items():
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            quoted = " || ',' || ".join(f"quote({c})" for c in columns)
            h = hashlib.sha256()
            for (line,) in db.execute(f"SELECT {quoted} FROM {table} ORDER BY {key}"):
                h.update(line.encode() + b"\n")
            out[table] = h.hexdigest()[:16]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=5000, help="messages per checkpoint (the consumer's)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = dataset(args.transactions, args.seed)
    cards, messages = cards_and_messages(data)
    say(f"load average {load_average()}; pyarrow {pa.__version__}")
    rows = []
    for round_ in range(1, args.rounds + 1):
        digests = {}
        ways = (run_product, run_columnar, partial(run_columnar, driver="sqlite3"))
        for number, run in enumerate(ways):
            r = run(WORK_DIR / f"columnar-{number}", data, cards, messages, args.batch)
            digests[r["way"]] = digest(r["path"])
            per = 1e6 / len(messages)
            decide = "" if r["decide_cpu"] is None else f"{r['decide_cpu'] * per:.2f}"
            rows.append([round_, r["way"], f"{len(messages) / r['wall']:,.0f}", f"{r['cpu'] * per:.2f}", decide])
            say(f"round {round_} {r['way']}: {rows[-1][2]} msg/s, {rows[-1][3]} µs CPU per message")
        if len(set(map(str, digests.values()))) != 1:
            raise SystemExit(f"the two ways wrote different rows: {digests}")
        say(f"round {round_}: every row of the three tables identical {digests['product']}")
    print_table(
        f"the loop without polling, {len(messages):,} messages in batches of {args.batch:,}",
        ["round", "way", "msg/s", "CPU µs/msg", "of it decide"],
        rows,
    )
    say(f"load average {load_average()}")


if __name__ == "__main__":
    main()
