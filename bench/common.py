"""Shared helpers of the benchmarks: datasets, settings, the private MariaDB, isolated workers, output.

Every benchmark runs its measurements in fresh worker processes (``run_worker``): each gets its own
peak RSS and leaves no state (imports, caches, connections) behind for the next one. Each measurement
records the machine's load average before and after it: the machine has 2 cores, so another job
(a Spark run, a test suite) shows there and slows every figure.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:  # `python3 bench/x.py` puts bench/ first, not the project
    sys.path.insert(0, str(ROOT))


def _compile_package() -> None:
    """Compile the package's modules (written beside them, in ``__pycache__``) unless they are already.

    With ``PYTHONDONTWRITEBYTECODE`` set, as on these machines, a checkout whose modules were never compiled (a
    fresh ``git worktree`` of the code before, compared with this one) would compile them from source in every
    process a benchmark starts, the timed children included: that side of the comparison would pay for it."""
    import compileall

    compileall.compile_dir(ROOT / "cardpipe", quiet=1)


_compile_package()

OUT_DIR = BENCH_DIR / "out"
DATA_CACHE = OUT_DIR / "data"
WORK_DIR = OUT_DIR / "work"
MARIADB_SCRIPT = ROOT / "scripts" / "mariadb.sh"
DEFAULT_BENCH_DB = "cardpipe_bench"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the machine ----------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float | None:
    """A /proc/PID/status memory field in MB (VmRSS now, VmHWM peak), None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS so far: VmHWM of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux keeps that across ``execve``, so a process that multiprocessing
    spawns (fork, then exec of a fresh interpreter) reports the RSS of the parent it was forked from
    when that was larger (the latency benchmark's parent holding 200k messages: 964 MB reported for a
    consumer that never used 80 MB). VmHWM belongs to the address space exec creates.
    """
    peak = rss_mb("self", "VmHWM")
    return peak if peak is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- statistics and output ------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(pct / 100 * len(ordered) + 0.5)) - 1))
    return round(ordered[rank], 2)


def latency_stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "samples": len(values),
        "p50_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
        "max_ms": round(max(values), 2) if values else None,
    }


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")


# --- datasets -------------------------------------------------------------------------------------


def dataset(transactions: int, seed: int = 7, customers: int | None = None) -> Path:
    """A generated dataset of ``transactions`` rows, cached under bench/out/data (reused when complete)."""
    from cardpipe.generate import GeneratorConfig, generate_dataset

    name = f"tx{transactions}_seed{seed}" + (f"_cust{customers}" if customers else "")
    path = DATA_CACHE / name
    marker = path / ".complete.json"
    if marker.is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    say(f"generating {transactions:,} transactions into {path}")
    counts = generate_dataset(path, GeneratorConfig(transactions=transactions, seed=seed, customers=customers))
    marker.write_text(json.dumps({"counts": counts, "seconds": round(time.perf_counter() - started, 1)}))
    return path


def cards_and_messages(data: Path) -> tuple[dict[int, Any], list[Any]]:
    """A dataset's card profiles (limit, owner's zip) and its transactions as the topic's messages, in file order
    (all on partition 0): what the decide stage takes. Imports cardpipe only when called."""
    import csv
    from decimal import Decimal

    from cardpipe.domain.authorization import zip_of
    from cardpipe.domain.records import CardProfile
    from cardpipe.stream.codec import encode_fields
    from cardpipe.stream.processing import RawMessage

    with open(data / "customers.csv", newline="") as f:
        zips = {int(r["customer_id"]): zip_of(r["address"]) for r in csv.DictReader(f)}
    with open(data / "cards.csv", newline="") as f:
        cards = {
            int(r["card_id"]): CardProfile(int(r["card_id"]), Decimal(r["credit_limit"]), zips[int(r["customer_id"])])
            for r in csv.DictReader(f)
        }
    messages = []
    with open(data / "transactions.csv", newline="") as f:
        for offset, r in enumerate(csv.DictReader(f)):
            related = int(r["related_transaction_id"]) if r["related_transaction_id"] else None
            key, value = encode_fields(
                int(r["transaction_id"]),
                int(r["card_id"]),
                r["merchant_name"],
                r["timestamp"],
                r["amount"],
                r["location"],
                r["transaction_type"],
                related,
            )
            messages.append(RawMessage(0, offset, key, value, 1_700_000_000_000 + offset))
    return cards, messages


def dataset_counts(path: Path) -> dict[str, int]:
    return json.loads((path / ".complete.json").read_text())["counts"]


# --- settings and the serving database ------------------------------------------------------------


#: Settings taken from the benchmark's own environment (the rest come from the sink's): what a run compares.
PASSED_SETTINGS = ("CARDPIPE_COLUMNAR", "CONSUMER_BATCH_SIZE")


def sqlite_env() -> dict[str, str]:
    return {}


_leases: list[Path] = []


def mysql_env(database: str = DEFAULT_BENCH_DB) -> dict[str, str]:
    """Start (or reuse) the private MariaDB of scripts/mariadb.sh; its DB_* settings with our database.

    Takes a lease like scripts/test.sh does, so a test run ending meanwhile does not stop the server
    under the benchmark. ``CARDPIPE_MARIADB_DIR``/``CARDPIPE_MARIADB_PORT`` select another instance.
    """
    subprocess.run(["bash", str(MARIADB_SCRIPT), "start"], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run(["bash", str(MARIADB_SCRIPT), "env"], check=True, capture_output=True, text=True).stdout
    env: dict[str, str] = {}
    for token in shlex.split(out.replace("export ", " ")):
        key, _, value = token.partition("=")
        env[key] = value
    env["DB_NAME"] = database
    _take_lease()
    return env


def _take_lease() -> None:
    if _leases:
        return
    state = Path(os.environ.get("CARDPIPE_MARIADB_DIR", "/tmp/cardpipe-mariadb"))
    lease = state / "leases" / str(os.getpid())
    with contextlib.suppress(OSError):
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.touch()
        _leases.append(lease)
        import atexit

        atexit.register(lambda: lease.unlink(missing_ok=True))


def sink_env(sink: str, database: str = DEFAULT_BENCH_DB) -> dict[str, str]:
    if sink == "sqlite":
        return sqlite_env()
    if sink == "mysql":
        return mysql_env(database)
    raise SystemExit(f"unknown sink {sink!r} (sqlite or mysql)")


def settings(env: Mapping[str, str], results_dir: Path, data_dir: Path, **extra: str) -> Any:
    from cardpipe.config import Settings

    passed = {name: os.environ[name] for name in PASSED_SETTINGS if name in os.environ}
    merged = {**passed, **env, **extra}
    return Settings.from_env(env=merged, results_dir=results_dir, data_dir=data_dir)


def drop_mysql_database(env: Mapping[str, str], *, recreate: bool = False) -> None:
    """Drop the benchmark's own database (never the project's); ``recreate``: then create it empty.

    The benchmarks create the database themselves: cardpipe's ``make_engine`` does not (its
    ``url.set(database=None)`` keeps the database name, so the server connection fails with 1049).
    """
    import pymysql

    name = env["DB_NAME"]
    if name in ("cardpipe", "mysql", "information_schema", "performance_schema", "sys"):
        raise ValueError(f"refusing to drop {name!r}")
    conn = pymysql.connect(
        host=env["DB_HOST"], port=int(env["DB_PORT"]), user=env["DB_USER"], password=env.get("DB_PASSWORD") or ""
    )
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            if recreate:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.commit()
    finally:
        conn.close()


def pymysql_connect(env: Mapping[str, str], **kwargs: Any) -> Any:
    """A PyMySQL connection to the benchmark's database (created when missing)."""
    import pymysql

    server = pymysql.connect(
        host=env["DB_HOST"], port=int(env["DB_PORT"]), user=env["DB_USER"], password=env.get("DB_PASSWORD") or ""
    )
    try:
        with server.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{env['DB_NAME']}` CHARACTER SET utf8mb4")
    finally:
        server.close()
    return pymysql.connect(
        host=env["DB_HOST"],
        port=int(env["DB_PORT"]),
        user=env["DB_USER"],
        password=env.get("DB_PASSWORD") or "",
        database=env["DB_NAME"],
        charset="utf8mb4",
        **kwargs,
    )


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def embedded_broker(work_dir: Path) -> Iterator[Any]:
    """A fresh embedded Tansu for one measurement (in memory: stopping it frees the messages)."""
    from cardpipe.stream.broker import broker_session

    with broker_session(None, work_dir) as handle:
        yield handle
        handle_rss = rss_mb(handle.pid, "VmHWM") if handle.pid else None
        if handle_rss is not None:
            say(f"broker peak RSS {handle_rss:,.0f} MB")


# --- isolated workers -----------------------------------------------------------------------------


def _worker_main(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], queue: Any) -> None:
    try:
        result = fn(*args, **kwargs)
        queue.put(("ok", result, peak_rss_mb()))
    except BaseException as exc:  # report everything to the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", peak_rss_mb()))


def run_worker(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn`` in a fresh (spawned) process; return its result and that process's peak RSS in MB."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker_main, args=(fn, args, kwargs, queue))
    proc.start()
    try:
        status, payload, peak = queue.get()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(f"worker {getattr(fn, '__name__', fn)} failed: {payload}")
    return payload, peak


def timed_phase(name: str) -> dict[str, Any]:
    return {"phase": name, "load_average_before": load_average()}
