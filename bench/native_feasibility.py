"""Feasibility of a native stream core: would DuckDB deciding and writing a batch be faster than the Python path?

    python3 bench/native_feasibility.py [--transactions 500000] [--batch 5000] [--threads 1]

An experiment, not the product: it measures, on one dataset's messages in batches of ``--batch``, CPU time per
message (``time.process_time``) of

1. the product's decide stage (``StreamProcessor.process``; no broker, no database);
2. DuckDB deciding each batch: the raw messages written as NDJSON to a temporary file and read with
   ``read_json``, the rules in SQL (the running pending balance as a recursive CTE over each card's
   transactions in the batch), the cards' balances updated; then, timed apart, the decisions fetched to Python
   and compared with the product's, message by message (a difference fails the run);
3. DuckDB writing each batch's rows into a SQLite file with the product's ``stream_transactions`` table,
   through the scanner extension, one transaction per batch (no rules, no other table);
4. the floor of any core that runs in this process and stores through Python's ``sqlite3``: each batch decoded
   by msgspec in one call (no checks beyond the JSON types), made rows by C-level ``map`` (the decision's
   columns constant: no rules), inserted with ``executemany`` into the same table, one transaction per batch.

The SQL restates the rules of ``cardpipe.domain.authorization`` for this measurement only; the check in 2 is
what makes its figure mean anything.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from common import cards_and_messages, dataset, print_table, say

_COLUMNS = (
    "{transaction_id: 'BIGINT', card_id: 'BIGINT', merchant_name: 'VARCHAR', timestamp: 'VARCHAR', "
    "amount: 'DECIMAL(12,2)', location: 'VARCHAR', transaction_type: 'VARCHAR', related_transaction_id: 'BIGINT'}"
)

#: The rules of SPEC §3 over one batch (``{path}``: its NDJSON file), in arrival order per card.
DECIDE_SQL = """
WITH RECURSIVE
m AS (SELECT *, row_number() OVER () AS pos
      FROM read_json('{path}', format = 'newline_delimited', columns = {columns})),
b AS (
  SELECT m.pos, m.card_id, m.amount, c.credit_limit,
         row_number() OVER (PARTITION BY m.card_id ORDER BY m.pos) AS rn,
         abs(m.amount) * 2 >= c.credit_limit AS over_half,
         c.zip_head IS NULL OR c.zip_head IS DISTINCT FROM (
           CASE WHEN length(regexp_extract(m.location, '(\\S+)\\s*$', 1)) >= 5
                THEN left(regexp_extract(m.location, '(\\S+)\\s*$', 1), 1) END) AS far
  FROM m JOIN cards c USING (card_id)),
r AS (
  SELECT c.card_id, 0::BIGINT AS rn, c.balance, NULL::VARCHAR AS reason, NULL::BIGINT AS pos
  FROM cards c WHERE c.card_id IN (SELECT card_id FROM b)
  UNION ALL
  SELECT b.card_id, b.rn,
         (CASE WHEN NOT b.over_half AND NOT b.far AND r.balance + b.amount <= b.credit_limit
               THEN r.balance + b.amount ELSE r.balance END)::DECIMAL(18,2),
         CASE WHEN b.over_half THEN 'amount_over_half_limit' WHEN b.far THEN 'location_too_far'
              WHEN r.balance + b.amount > b.credit_limit THEN 'over_credit_limit' END,
         b.pos
  FROM r JOIN b ON b.card_id = r.card_id AND b.rn = r.rn + 1)
SELECT pos, card_id, rn, balance, reason FROM r WHERE rn > 0
"""

UPDATE_BALANCES = (
    "UPDATE cards SET balance = d.balance FROM (SELECT card_id, arg_max(balance, rn) AS balance FROM decided "
    "GROUP BY card_id) d WHERE cards.card_id = d.card_id"
)

INSERT_ROWS = """
INSERT INTO target.stream_transactions
SELECT transaction_id, card_id, merchant_name, strptime(timestamp, '%Y-%m-%d %H:%M:%S'), amount, location,
       transaction_type, related_transaction_id, 'pending', amount, NULL, 1000.00, 0, {seq}
FROM read_json('{path}', format = 'newline_delimited', columns = {columns})
"""


@contextmanager
def charged(spent: dict[str, float], step: str) -> Iterator[None]:
    """Add the CPU time (``time.process_time``) the block takes to ``spent[step]``."""
    began = time.process_time()
    try:
        yield
    finally:
        spent[step] = spent.get(step, 0.0) + time.process_time() - began


def per_message(seconds: float, messages: int) -> float:
    return round(seconds / messages * 1e6, 2)


def python_decisions(cards: dict[int, Any], messages: list[Any], batch: int) -> tuple[float, list[tuple[Any, ...]]]:
    from cardpipe.stream.processing import StreamProcessor

    processor = StreamProcessor("bench", cards, dict.fromkeys(cards, Decimal("0.00")), lambda ids: {})
    decided: list[tuple[Any, ...]] = []
    spent = {"process": 0.0}
    for start in range(0, len(messages), batch):
        with charged(spent, "process"):
            result = processor.process(messages[start : start + batch])
        decided.extend((row["decline_reason"], row["pending_balance"]) for row in result.decided)
    return spent["process"], decided


def duckdb_decisions(
    cards: dict[int, Any], messages: list[Any], batch: int, threads: int, folder: Path
) -> tuple[dict[str, float], list[tuple[Any, ...]]]:
    import duckdb

    from cardpipe.domain.authorization import zip_head

    con = duckdb.connect(config={"threads": threads})
    con.execute(
        "CREATE TABLE cards (card_id BIGINT PRIMARY KEY, credit_limit DECIMAL(12,2), zip_head VARCHAR, "
        "balance DECIMAL(18,2))"
    )
    con.executemany(
        "INSERT INTO cards VALUES (?, ?, ?, 0)",
        [(c, p.credit_limit, zip_head(p.customer_zip)) for c, p in cards.items()],
    )
    con.execute(
        "CREATE TEMP TABLE decided (pos BIGINT, card_id BIGINT, rn BIGINT, balance DECIMAL(18,2), reason VARCHAR)"
    )
    path = folder / "batch.ndjson"
    decide = "INSERT INTO decided " + DECIDE_SQL.format(path=path, columns=_COLUMNS)
    spent = {"write the batch file": 0.0, "decode + rules": 0.0, "card balances": 0.0, "fetch (check only)": 0.0}
    decided: list[tuple[Any, ...]] = []
    for start in range(0, len(messages), batch):
        with charged(spent, "write the batch file"):
            path.write_bytes(b"\n".join(m.value for m in messages[start : start + batch]))
        with charged(spent, "decode + rules"):
            con.execute("DELETE FROM decided")
            con.execute(decide)
        with charged(spent, "card balances"):
            con.execute(UPDATE_BALANCES)
        with charged(spent, "fetch (check only)"):
            decided.extend(con.execute("SELECT reason, balance FROM decided ORDER BY pos").fetchall())
    con.close()
    return spent, decided


def duckdb_sqlite_writes(messages: list[Any], batch: int, threads: int, folder: Path) -> dict[str, float]:
    import duckdb
    from sqlalchemy import create_engine

    from cardpipe.batch.embedded import extension_path
    from cardpipe.serving import schema

    database = folder / "target.db"
    engine = create_engine(f"sqlite:///{database}")
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    schema.stream_transactions.create(engine)
    engine.dispose()
    con = duckdb.connect(config={"threads": threads, "autoinstall_known_extensions": False})
    con.execute(f"LOAD '{extension_path('sqlite')}'")
    con.execute(f"ATTACH '{database}' AS target (TYPE sqlite)")
    path = folder / "batch.ndjson"
    spent = {"write the batch file": 0.0, "insert into SQLite": 0.0, "commit": 0.0}
    for seq, start in enumerate(range(0, len(messages), batch), 1):
        with charged(spent, "write the batch file"):
            path.write_bytes(b"\n".join(m.value for m in messages[start : start + batch]))
        with charged(spent, "insert into SQLite"):
            con.execute("BEGIN")
            con.execute(INSERT_ROWS.format(path=path, columns=_COLUMNS, seq=seq))
        with charged(spent, "commit"):
            con.execute("COMMIT")
    con.close()
    return spent


def floor_sqlite_writes(messages: list[Any], batch: int, folder: Path) -> dict[str, float]:
    import sqlite3
    from itertools import repeat

    import msgspec
    from decoder_bench import Message  # the message's fields as on the wire, no checks
    from sqlalchemy import create_engine

    from cardpipe.serving import schema

    database = folder / "floor.db"
    engine = create_engine(f"sqlite:///{database}")
    schema.stream_transactions.create(engine)
    engine.dispose()
    con = sqlite3.connect(database, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    insert = f"INSERT INTO stream_transactions VALUES ({', '.join(['?'] * 14)})"
    decode = msgspec.json.Decoder(list[Message]).decode
    astuple = msgspec.structs.astuple
    spent = {"decode (msgspec, one call)": 0.0, "rows (C map)": 0.0, "insert (sqlite3 executemany)": 0.0, "commit": 0.0}
    for seq, start in enumerate(range(0, len(messages), batch), 1):
        with charged(spent, "decode (msgspec, one call)"):
            decoded = decode(b"[" + b",".join(m.value for m in messages[start : start + batch]) + b"]")
        with charged(spent, "rows (C map)"):
            decision = ("pending", "0.00", None, "1000.00", 0, seq)
            rows = list(map(tuple.__add__, map(astuple, decoded), repeat(decision)))
        with charged(spent, "insert (sqlite3 executemany)"):
            con.execute("BEGIN")
            con.executemany(insert, rows)
        with charged(spent, "commit"):
            con.execute("COMMIT")
    con.close()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="DuckDB's threads (the consumer has one core)")
    args = parser.parse_args()
    cards, messages = cards_and_messages(dataset(args.transactions, args.seed))
    n = len(messages)
    gc.collect()
    gc.freeze()
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None) as tmp:
        folder = Path(tmp)
        say(f"the product's decide stage on {n:,} messages")
        python_seconds, expected = python_decisions(cards, messages, args.batch)
        say("DuckDB deciding the same batches")
        native, decided = duckdb_decisions(cards, messages, args.batch, args.threads, folder)
        mismatches = sum(a != b for a, b in zip(expected, decided, strict=True))
        say("DuckDB writing the batches into SQLite through the scanner")
        writes = duckdb_sqlite_writes(messages, args.batch, args.threads, folder)
        say("the floor: msgspec decoding, sqlite3 inserting")
        floor = floor_sqlite_writes(messages, args.batch, folder)
    rows = [["python: StreamProcessor.process", per_message(python_seconds, n)]]
    rows += [[f"duckdb: {k}", per_message(v, n)] for k, v in native.items()]
    rows += [[f"duckdb → sqlite: {k}", per_message(v, n)] for k, v in writes.items()]
    rows += [[f"floor: {k}", per_message(v, n)] for k, v in floor.items()]
    print_table(f"CPU µs per message, {n:,} messages, batches of {args.batch:,}", ["step", "µs/message"], rows)
    print(f"decisions identical to the product's: {n - mismatches:,} of {n:,}")
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
