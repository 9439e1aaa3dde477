"""Decoding the topic's messages: the product's decoder against orjson, json and msgspec, per message and as a batch.

    .venv/bin/python bench/decoder_bench.py [--messages 200000] [--repeats 5]   (needs msgspec in .venv)

Messages: the first N transactions of a ``cardpipe.generate`` dataset (cached under bench/out/data), each
encoded by the product's producer encoder (``cardpipe.stream.codec.encode_transaction``: compact JSON,
amount as a string, ``YYYY-MM-DD HH:MM:SS`` timestamp, related id null when empty), built before any clock
starts. Every candidate decodes all N values (a list comprehension over ``bytes`` values, as the consumer's
``decode_fields(m.value) for m in messages``):

* ``product decode_fields``: the consumer's decoder as is (orjson, then its checks, ``datetime`` and
  ``Decimal``; the strict json path only for messages it does not take: none here);
* ``orjson.loads``, ``json.loads``, ``msgspec.json.Decoder()`` (untyped): to dicts, nothing checked or
  converted;
* ``msgspec typed``: ``Decoder(Message)``, a Struct of the message's fields as on the wire (timestamp and
  amount strings);
* ``msgspec typed+convert``: ``Decoder(CheckedMessage)``, the fields the product returns (``datetime``,
  ``Decimal``) with what a Struct can declare of its checks (ids in 1..2^63-1, text lengths, transaction
  type one of SPEC's). Not all of them: control characters and the amount's two decimals and range are not
  checked, so it is no drop-in replacement; its values are compared with the product's for every message;
* batches: ``b"[" + b",".join(values) + b"]"`` decoded at once by ``orjson.loads`` and by
  ``Decoder(list[Message])``; the join is inside the timing (the consumer holds separate values), and the
  JSON also has the decode alone.

Each candidate runs ``--repeats`` times, the candidates alternated round by round, in one process with the
garbage collector off while timing (as ``timeit`` does); the table gives the best time as µs per message,
and msgspec's speed over orjson's (orjson time / msgspec time) for each comparable pair.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import orjson
from common import OUT_DIR, dataset, load_average, machine, print_table, say, write_json

from cardpipe.domain.checks import MAX_ID, TRANSACTION_TYPES
from cardpipe.domain.records import TRANSACTION_COLUMNS, Transaction
from cardpipe.stream.codec import decode_fields, decode_transaction, encode_transaction


class Message(msgspec.Struct):
    """The message's fields as on the wire."""

    transaction_id: int
    card_id: int
    merchant_name: str
    timestamp: str
    amount: str
    location: str
    transaction_type: str
    related_transaction_id: int | None = None


Id = Annotated[int, msgspec.Meta(gt=0, le=MAX_ID)]
TransactionType = Literal[tuple(sorted(TRANSACTION_TYPES))]  # type: ignore[valid-type]


class CheckedMessage(msgspec.Struct):
    """The fields the product's decoder returns, with the checks a Struct can declare."""

    transaction_id: Id
    card_id: Id
    merchant_name: Annotated[str, msgspec.Meta(max_length=255)]
    timestamp: datetime
    amount: Decimal
    location: Annotated[str, msgspec.Meta(max_length=512)]
    transaction_type: TransactionType
    related_transaction_id: Id | None = None


def messages(count: int, seed: int) -> list[bytes]:
    """The first ``count`` transactions of a generated dataset, encoded by the product's encoder."""
    data = dataset(count, seed)
    values: list[bytes] = []
    with (data / "transactions.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        if tuple(next(reader)) != TRANSACTION_COLUMNS:
            raise SystemExit("unexpected columns in transactions.csv")
        for row in reader:
            tx = Transaction(
                int(row[0]),
                int(row[1]),
                row[2],
                datetime.fromisoformat(row[3]),
                Decimal(row[4]),
                row[5],
                row[6],
                int(row[7]) if row[7] else None,
            )
            values.append(encode_transaction(tx)[1])
            if len(values) == count:
                break
    return values


def candidates() -> dict[str, Callable[[list[bytes]], Any]]:
    untyped = msgspec.json.Decoder()
    typed = msgspec.json.Decoder(Message)
    checked = msgspec.json.Decoder(CheckedMessage)
    batch = msgspec.json.Decoder(list[Message])
    loads, json_loads = orjson.loads, json.loads
    untyped_decode, typed_decode, checked_decode = untyped.decode, typed.decode, checked.decode
    return {
        "product decode_fields": lambda values: [decode_fields(v) for v in values],
        "product decode_transaction": lambda values: [decode_transaction(v) for v in values],
        "orjson.loads": lambda values: [loads(v) for v in values],
        "json.loads": lambda values: [json_loads(v) for v in values],
        "msgspec untyped": lambda values: [untyped_decode(v) for v in values],
        "msgspec typed": lambda values: [typed_decode(v) for v in values],
        "msgspec typed+convert": lambda values: [checked_decode(v) for v in values],
        "batch orjson": lambda values: loads(b"[" + b",".join(values) + b"]"),
        "batch msgspec typed": lambda values: batch.decode(b"[" + b",".join(values) + b"]"),
    }


def time_once(fn: Callable[[list[bytes]], Any], values: list[bytes]) -> float:
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        result = fn(values)
        seconds = time.perf_counter() - started
    finally:
        gc.enable()
    del result
    return seconds


def check(values: list[bytes]) -> dict[str, Any]:
    """Every candidate reads the same values (checked on every message)."""
    product = [decode_fields(v) for v in values]
    rejected = sum(1 for p in product if not isinstance(p, tuple))
    batch = b"[" + b",".join(values) + b"]"
    checked = [msgspec.structs.astuple(m) for m in msgspec.json.Decoder(list[CheckedMessage]).decode(batch)]
    wire = [msgspec.structs.asdict(m) for m in msgspec.json.Decoder(list[Message]).decode(batch)]
    dicts = orjson.loads(batch)
    return {
        "product_rejected": rejected,
        "typed_convert_equals_product": checked == product,
        "typed_equals_orjson_dicts": wire == dicts,
        "json_equals_orjson": [json.loads(v) for v in values[:10_000]] == dicts[:10_000],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "decoder.json")
    args = parser.parse_args()

    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    report["versions"] = {
        "orjson": orjson.__version__,
        "msgspec": msgspec.__version__,
    }
    say(f"encoding {args.messages:,} messages with the product's encoder")
    values = messages(args.messages, args.seed)
    n = len(values)
    sizes = [len(v) for v in values]
    report["messages"] = {"count": n, "mean_bytes": round(sum(sizes) / n, 1), "example": values[0].decode()}
    say("checking that the candidates read the same values")
    report["check"] = check(values)
    fns = candidates()
    times: dict[str, list[float]] = {name: [] for name in fns}
    join_times: list[float] = []
    for i in range(args.repeats):
        say(f"round {i + 1}/{args.repeats} (load {load_average()})")
        for name, fn in fns.items():
            times[name].append(time_once(fn, values))
        join_times.append(time_once(lambda vs: b"[" + b",".join(vs) + b"]", values))
    join_best = min(join_times)
    report["join_best_seconds"] = round(join_best, 5)
    results: dict[str, Any] = {}
    for name, secs in times.items():
        best = min(secs)
        results[name] = {
            "best_seconds": round(best, 5),
            "us_per_message": round(best / n * 1e6, 3),
            "all_seconds": [round(s, 5) for s in secs],
        }
        if name.startswith("batch"):
            results[name]["us_per_message_decode_only"] = round((best - join_best) / n * 1e6, 3)
    report["results"] = results
    base = results["product decode_fields"]["best_seconds"]
    print_table(
        f"Decoding {n:,} messages ({report['messages']['mean_bytes']:.0f} bytes on average), best of {args.repeats}",
        ["decoder", "µs/message", "messages/s", "vs product"],
        [
            [name, r["us_per_message"], round(n / r["best_seconds"]), f"{base / r['best_seconds']:.2f}x"]
            for name, r in results.items()
        ],
    )
    pairs = [
        ("per message, to dicts", "orjson.loads", "msgspec untyped"),
        ("per message, typed Struct", "orjson.loads", "msgspec typed"),
        ("per message, typed+convert", "orjson.loads", "msgspec typed+convert"),
        ("batch (join + decode)", "batch orjson", "batch msgspec typed"),
    ]
    ratios = {label: round(results[a]["best_seconds"] / results[b]["best_seconds"], 2) for label, a, b in pairs}
    report["speed_ratio_msgspec_over_orjson"] = ratios
    print_table(
        "msgspec's speed over orjson's (orjson time / msgspec time; > 1: msgspec faster)",
        ["comparison", "orjson", "msgspec", "ratio"],
        [[label, a, b, f"{ratios[label]:.2f}"] for label, a, b in pairs],
    )
    print(
        f"batch join alone: {join_best / n * 1e6:.3f} µs/message; decode only: orjson "
        f"{results['batch orjson']['us_per_message_decode_only']} µs, msgspec "
        f"{results['batch msgspec typed']['us_per_message_decode_only']} µs"
    )
    print(f"checks: {report['check']}")
    report["load_average_at_end"] = load_average()
    write_json(args.out, report)


if __name__ == "__main__":
    main()
