"""The consumer's decide stage alone: ``StreamProcessor.process`` over a generated dataset's messages, in
process, with no broker and no database (cards given up front, nothing decided before).

    python3 bench/process_bench.py [--transactions 500000] [--batch 5000] [--runs 5] [--root CHECKOUT ...]

Each ``--root`` (default: this checkout) is timed in a process of its own, the roots alternated ``--rounds``
times: the figure is the CPU time (``time.process_time``, which the host's stolen time does not inflate) per
message, the minimum over ``--runs`` passes, and two of its parts alone (decoding, the rules). Use it to compare a
change of the decide stage with the code before it (``git worktree add /tmp/before HEAD``, then
``--root /tmp/before --root .``).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from common import ROOT, cards_and_messages, dataset, say  # (common puts this checkout on sys.path, after any --root)


def measure(root: Path, data: Path, batch: int, runs: int) -> dict[str, Any]:
    """Run in a fresh interpreter with ``root`` first on sys.path: the decide stage's CPU µs per message."""
    sys.path.insert(0, str(root))
    import cardpipe
    from cardpipe.stream.processing import StreamProcessor

    if not Path(cardpipe.__file__ or "").resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"imported {cardpipe.__file__}, not from {root}")
    cards, messages = cards_and_messages(data)
    gc.collect()
    gc.freeze()  # as the consumer does once its cards are loaded
    seconds = []
    for _ in range(runs):
        processor = StreamProcessor("bench", cards, dict.fromkeys(cards, Decimal("0.00")), lambda ids: {})
        started = time.process_time()
        for start in range(0, len(messages), batch):
            processor.process(messages[start : start + batch])
        seconds.append(time.process_time() - started)
    return {
        "root": str(root),
        "messages": len(messages),
        "us_per_message_min": round(min(seconds) / len(messages) * 1e6, 3),
        "us_per_message_runs": [round(s / len(messages) * 1e6, 3) for s in seconds],
        "parts": parts(cards, messages, runs),
    }


def parts(cards: dict[int, Any], messages: list[Any], runs: int) -> dict[str, float]:
    """Two parts of the stage alone, CPU µs per message (min over ``runs``): decoding and checking each message
    (``decode_fields``) and the rules with the running balance (``Authorizer.decide`` on the decoded fields).
    The rest of ``process`` is its bookkeeping (the batch's rows, positions, counts, offsets, card states)."""
    try:
        from cardpipe.domain.authorization import Authorizer
        from cardpipe.stream.codec import decode_fields
    except ImportError:  # a checkout from before these existed
        return {}

    def fastest(fn: Any) -> float:
        best = float("inf")
        for _ in range(runs):
            started = time.process_time()
            fn()
            best = min(best, time.process_time() - started)
        return round(best / len(messages) * 1e6, 3)

    values = [m.value for m in messages]
    decoded = [decode_fields(v) for v in values]

    def rules() -> None:
        decide = Authorizer(cards, dict.fromkeys(cards, Decimal("0.00"))).decide
        for fields in decoded:
            decide(fields[1], fields[4], fields[5])

    return {"decode_fields": fastest(lambda: [decode_fields(v) for v in values]), "rules": fastest(rules)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=5000, help="messages per process() call (the consumer's)")
    parser.add_argument("--runs", type=int, default=5, help="passes per process; the minimum is reported")
    parser.add_argument("--rounds", type=int, default=1, help="times the roots are alternated")
    parser.add_argument("--root", type=Path, action="append", help="checkout to time (repeatable)")
    parser.add_argument("--worker-data", type=Path, help=argparse.SUPPRESS)  # a worker: time this dataset
    args = parser.parse_args()
    roots = args.root or [ROOT]
    if args.worker_data:
        print(json.dumps(measure(roots[0], args.worker_data, args.batch, args.runs)))
        return
    data = dataset(args.transactions, args.seed)  # imports cardpipe: only in the parent, never in a worker
    results: dict[str, list[float]] = {str(r): [] for r in roots}
    for round_ in range(args.rounds):
        for root in roots:
            out = subprocess.run(
                [sys.executable, __file__, "--worker-data", str(data), "--root", str(root)]
                + ["--batch", str(args.batch), "--runs", str(args.runs)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(out.splitlines()[-1])
            results[str(root)].append(result["us_per_message_min"])
            figure, each = result["us_per_message_min"], result["us_per_message_runs"]
            say(f"round {round_ + 1}: {root}: {figure} µs/message (runs {each}); of it {result['parts']}")
    for root, figures in results.items():
        say(f"{root}: min {min(figures)} µs/message over {len(figures)} round(s): {figures}")


if __name__ == "__main__":
    main()
