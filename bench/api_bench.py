"""HTTP API throughput and latency: ``GET /cards/{random id}`` with 1M decisions stored.

Builds a serving database (a generated dataset's customers and cards, ``--decisions`` stream decisions
written with executemany, and one published settlement whose watermark covers ~80% of them, so a card
view reads settled values and the pending decisions after the watermark), starts uvicorn with
``cardpipe.serving.api.create_app`` on a free loopback port in a subprocess, then runs ``--clients``
threads, each with one keep-alive ``http.client`` connection, for ``--seconds``. Prints p50/p99 latency
and requests/s and writes them to ``--out`` (JSON). Also times ``views.card_view`` in-process.

    python3 bench/api_bench.py [--decisions 1000000] [--clients 8] [--seconds 10]
                               [--database-url mysql+pymysql://root@127.0.0.1:3306/cardpipe_bench]

The database is kept under bench/out/work/api_bench and reused when it holds the same number of
decisions (``--rebuild`` to build it again). Uvicorn runs without access logs unless ``--access-log``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from common import OUT_DIR, WORK_DIR, dataset, latency_stats, load_average, machine, print_table, rate, say, write_json

PARTITIONS = 8
CHECKPOINT_ROWS = 5000  # decisions per (partition) checkpoint
SETTLED_SHARE = 0.8  # the settlement's watermark covers ~this share of the decisions
CUSTOMERS = 25_000  # cardpipe.generate's default for 1M transactions (and ~45,000 cards)
SERVER_URL_VARIABLE = "CARDPIPE_API_BENCH_URL"  # the server process's database URL


# --------------------------------------------------------------------------------------------- the data
def build_database(url: Any, decisions: int, seed: int, rebuild: bool) -> dict[str, Any]:
    """Fill the database at ``url`` (unless it already holds ``decisions``); return what it holds."""
    from sqlalchemy import func, select

    from cardpipe.serving import schema
    from cardpipe.serving.database import create_clean_schema, ensure_schema, make_engine
    from cardpipe.serving.loader import load_inputs

    engine = make_engine(url)
    try:
        if not rebuild:
            try:
                ensure_schema(engine)
                with engine.connect() as conn:
                    stored = conn.execute(select(func.count()).select_from(schema.stream_transactions)).scalar_one()
                    cards = conn.execute(select(func.count()).select_from(schema.cards)).scalar_one()
                    in_force = conn.execute(select(schema.serving_state.c.settlement_id)).scalar()
                if stored == decisions and cards and in_force is not None:
                    say(f"reusing {url.render_as_string(hide_password=True)}: {stored:,} decisions, {cards:,} cards")
                    return {"decisions": stored, "cards": cards, "reused": True}
            except Exception as exc:  # a broken leftover: build anew
                say(f"rebuilding ({type(exc).__name__})")
        started = time.perf_counter()
        create_clean_schema(engine)
        data = dataset(1000, seed=seed, customers=CUSTOMERS)
        load_inputs(engine, data)
        with engine.connect() as conn:
            cards = [
                (r.card_id, r.credit_limit, r.current_balance)
                for r in conn.execute(
                    select(schema.cards.c.card_id, schema.cards.c.credit_limit, schema.cards.c.current_balance)
                )
            ]
        say(f"loaded {len(cards):,} cards in {time.perf_counter() - started:.1f} s; writing {decisions:,} decisions")
        _write_decisions(engine, cards, decisions, seed)
        seconds = round(time.perf_counter() - started, 1)
        say(f"database built in {seconds} s")
        return {"decisions": decisions, "cards": len(cards), "reused": False, "build_seconds": seconds}
    finally:
        engine.dispose()


def _write_decisions(engine: Any, cards: list[tuple[int, Any, Any]], decisions: int, seed: int) -> None:
    from cardpipe.serving import schema

    rng = random.Random(seed)
    limits = {card_id: limit for card_id, limit, _ in cards}
    card_ids = list(limits)
    start = datetime(2025, 4, 1)
    seq = [0] * PARTITIONS
    in_partition = [0] * PARTITIONS
    chunk: list[dict[str, Any]] = []
    settled_seq = [0] * PARTITIONS
    cut = int(decisions * SETTLED_SHARE)
    # The per-card counters the card view reads: running pending balance and count (card_states), and how many
    # of the card's pending decisions the settlement approved (settled_cards.settled_count).
    running_cents = {card_id: int(balance * 100) for card_id, _, balance in cards}
    running_count: dict[int, int] = {}
    settled_count: dict[int, int] = {}
    with engine.begin() as conn:
        for i in range(1, decisions + 1):
            card_id = rng.choice(card_ids)
            partition = card_id % PARTITIONS
            in_partition[partition] += 1
            if in_partition[partition] % CHECKPOINT_ROWS == 1:
                seq[partition] += 1
            declined = rng.random() < 0.1
            cents = rng.randint(-2000, 40000)
            chunk.append(
                {
                    "transaction_id": i,
                    "card_id": card_id,
                    "merchant_name": "Bench Shop",
                    "timestamp": start + timedelta(seconds=i),
                    "amount": f"{cents / 100:.2f}",
                    "location": "1 Main St, Albany, NY 12207",
                    "transaction_type": "purchase",
                    "related_transaction_id": None,
                    "status": "declined" if declined else "pending",
                    "pending_balance": "100.00",
                    "decline_reason": "over_credit_limit" if declined else None,
                    "credit_limit": str(limits[card_id]),
                    "kafka_partition": partition,
                    "checkpoint_seq": seq[partition],
                }
            )
            if not declined:
                running_cents[card_id] += cents
                running_count[card_id] = running_count.get(card_id, 0) + 1
                if i <= cut:
                    settled_count[card_id] = settled_count.get(card_id, 0) + 1
            if i == cut:
                settled_seq = list(seq)
            if len(chunk) == 20_000:
                conn.execute(schema.stream_transactions.insert(), chunk)
                chunk.clear()
        if chunk:
            conn.execute(schema.stream_transactions.insert(), chunk)
        conn.execute(
            schema.card_states.insert(),
            [
                {"card_id": c, "pending_balance": f"{running_cents[c] / 100:.2f}", "pending_count": n}
                for c, n in running_count.items()
            ],
        )
    # One published settlement: limits and balances changed a little, watermark at ~SETTLED_SHARE.
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        conn.execute(
            schema.settlements.insert().values(
                settlement_id=1,
                status=schema.SETTLEMENT_PUBLISHED,
                owner="bench",
                engine="bench",
                started_at=now,
                heartbeat_at=time.time(),
                finished_at=now,
            )
        )
        conn.execute(
            schema.settlement_watermarks.insert(),
            [{"settlement_id": 1, "kafka_partition": p, "checkpoint_seq": settled_seq[p]} for p in range(PARTITIONS)],
        )
        rows = conn.execute(schema.cards.select()).mappings().all()
        settled = [
            dict(
                r,
                settlement_id=1,
                settled_count=settled_count.get(r["card_id"], 0),
                current_balance=str(r["current_balance"] + 100),
                credit_limit=str(r["credit_limit"]),
                issue_date=r["issue_date"],
            )
            for r in rows
        ]
        for lo in range(0, len(settled), 20_000):
            conn.execute(schema.settled_cards.insert(), settled[lo : lo + 20_000])
        customers = [
            dict(r, settlement_id=1, annual_income=str(r["annual_income"]))
            for r in conn.execute(schema.customers.select()).mappings()
        ]
        for lo in range(0, len(customers), 20_000):
            conn.execute(schema.settled_customers.insert(), customers[lo : lo + 20_000])
        conn.execute(schema.serving_state.update().values(settlement_id=1))


def time_views(url: Any, card_ids: list[int], samples: int = 2000) -> dict[str, Any]:
    """``views.card_view`` called directly (one pooled connection), milliseconds per call."""
    from cardpipe.serving import views
    from cardpipe.serving.database import make_engine

    engine = make_engine(url, create_database=False)
    rng = random.Random(1)
    timings = []
    try:
        with engine.connect() as conn:
            for _ in range(samples):
                card_id = rng.choice(card_ids)
                started = time.perf_counter()
                view = views.card_view(conn, card_id)
                timings.append((time.perf_counter() - started) * 1000)
                assert view is not None
                conn.rollback()
    finally:
        engine.dispose()
    return latency_stats(timings)


# ------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(url: str, port: int, access_log: bool) -> None:
    """The server process: uvicorn with the API (``--serve`` mode of this script)."""
    import uvicorn
    from sqlalchemy.engine import make_url

    from cardpipe.serving.api import create_app
    from cardpipe.serving.database import make_engine

    engine = make_engine(make_url(url), create_database=False)
    uvicorn.run(create_app(engine), host="127.0.0.1", port=port, log_level="warning", access_log=access_log)


def start_server(url: Any, port: int, access_log: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, __file__, "--serve", "--port", str(port)] + (["--access-log"] if access_log else [])
    env = {**os.environ, SERVER_URL_VARIABLE: url.render_as_string(hide_password=False)}  # not in argv: a password
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            ready = conn.getresponse().status == 200
            conn.close()
            if ready:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not answer /health within 30 s")


# ------------------------------------------------------------------------------------------- the clients
WRK_SCRIPT = """
math.randomseed(7)
local ids = {%s}
request = function()
  return wrk.format("GET", "/cards/" .. ids[math.random(1, #ids)])
end
"""
_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(port: int, card_ids: list[int], clients: int, seconds: float) -> dict[str, Any]:
    """The same load from ``wrk`` (one thread, ``clients`` keep-alive connections, random card ids): a client
    in C leaves the server the CPU that Python client threads would take on a small machine."""
    import re
    import shutil
    import tempfile

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), or use --client python")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % ",".join(map(str, card_ids)))
    load_before = load_average()
    out = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", script.name, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)

    def latency(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([0-9.]+)(us|ms|s)$", out, re.M).groups()  # type: ignore[union-attr]
        return round(float(value) * _WRK_UNITS[unit], 2)

    requests = int(re.search(r"^\s*([0-9]+) requests in", out, re.M).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", out)
    return {
        "client": "wrk",
        "clients": clients,
        "seconds": seconds,
        "requests": requests,
        "errors": int(errors.group(1)) if errors else 0,
        "requests_per_second": round(float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))),  # type: ignore[union-attr]
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "max_ms": None,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "wrk_output": out,
    }


def run_clients(port: int, card_ids: list[int], clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    begin = threading.Barrier(clients + 1)
    window: dict[str, float] = {}

    def client(index: int) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = latencies[index]
        begin.wait()
        measure_from, stop_at = window["from"], window["to"]
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                break
            try:
                conn.request("GET", f"/cards/{rng.choice(card_ids)}")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            elapsed = time.perf_counter() - started
            if started >= measure_from:
                if ok:
                    mine.append(elapsed * 1000)
                else:
                    errors[index] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    window["from"], window["to"] = now + warmup, now + warmup + seconds
    load_before = load_average()
    begin.wait()
    for t in threads:
        t.join()
    samples = [x for per_client in latencies for x in per_client]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(samples),
        "errors": sum(errors),
        "requests_per_second": rate(len(samples), seconds),
        **latency_stats(samples),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--client",
        choices=["python", "wrk"],
        default="python",
        help="python: client threads in this process; wrk: the C load generator (apt-get install wrk)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--database-url",
        default=None,
        help="default: a SQLite file under bench/out/work/api_bench (MySQL: its database is created)",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the database even when it can be reused")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log (to stderr)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "api_bench.json")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(os.environ[SERVER_URL_VARIABLE], args.port, args.access_log)
        return 0

    import uvicorn
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from cardpipe.serving import schema
    from cardpipe.serving.database import make_engine

    default_db = WORK_DIR / "api_bench" / f"api_{args.decisions}.db"
    url = make_url(args.database_url) if args.database_url else make_url(f"sqlite:///{default_db}")
    built = build_database(url, args.decisions, args.seed, args.rebuild)
    engine = make_engine(url, create_database=False)
    with engine.connect() as conn:
        card_ids = list(conn.execute(select(schema.cards.c.card_id)).scalars())
    engine.dispose()

    direct = time_views(url, card_ids)
    say(f"card_view in-process: p50 {direct['p50_ms']} ms, p99 {direct['p99_ms']} ms")
    port = free_port()
    server = start_server(url, port, args.access_log)
    try:
        # uvicorn's "auto" HTTP implementation: httptools when installed, else h11.
        http_impl = "httptools" if _importable("httptools") else "h11"
        loop_impl = "uvloop" if _importable("uvloop") else "asyncio"
        say(f"serving on 127.0.0.1:{port} ({http_impl}, {loop_impl}); {args.clients} clients for {args.seconds:g} s")
        if args.client == "wrk":
            result = run_wrk(port, card_ids, args.clients, args.seconds)
        else:
            result = run_clients(port, card_ids, args.clients, args.seconds, args.warmup)
    finally:
        server.terminate()
        server.wait(timeout=10)

    print_table(
        f"GET /cards/{{id}}: {built['decisions']:,} decisions, {len(card_ids):,} cards "
        f"({url.get_backend_name()}, uvicorn {uvicorn.__version__} + {http_impl} + {loop_impl})",
        ["measure", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"],
        [
            [
                f"HTTP, {args.clients} clients ({args.client})",
                result["requests"],
                result["requests_per_second"],
                result["p50_ms"],
                result["p99_ms"],
                result["max_ms"],
                result["errors"],
            ],
            ["card_view in-process", direct["samples"], None, direct["p50_ms"], direct["p99_ms"], direct["max_ms"], 0],
        ],
    )
    write_json(
        args.out,
        {
            "benchmark": "api_bench",
            "machine": machine(),
            "database": url.render_as_string(hide_password=True),
            "data": built,
            "server": {
                "uvicorn": uvicorn.__version__,
                "http": http_impl,
                "loop": loop_impl,
                "access_log": args.access_log,
                "workers": 1,
            },
            "http": result,
            "card_view_in_process": direct,
            "targets": {"p99_ms": 10, "requests_per_second": 2000},
            "argv": sys.argv[1:],
        },
    )
    return 0 if result["errors"] == 0 else 1


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
