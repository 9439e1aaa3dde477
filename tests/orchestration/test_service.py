"""`cardpipe serve` as a user runs it: real processes, the real broker, the HTTP API, SQLite and MariaDB.

Two full cycles (publish half, serve decides, `cardpipe batch` beside it, publish the rest, batch again) are
checked view by view through the API against the plain reference model; serve killed with SIGKILL mid-stream
and restarted loses and doubles nothing; SIGTERM stops it within 3 s; two `consume` started at once on one
folder give exactly one consumer's results.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from cardpipe.config import Settings
from cardpipe.generate import GeneratorConfig, generate_dataset
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.stream.broker import broker_session, stop_broker
from tests.lambda_model import LambdaModel
from tests.orchestration.helpers import REPO_ROOT, env_without_services, read_csv_rows, reference_results
from tests.serving.test_api import parse_metrics

pytestmark = pytest.mark.kafka


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                return response.status, json.loads(body) if body.startswith(b"{") else body.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def health_within(self, seconds: float, wanted: Callable[[Any], bool]) -> Any:
        """/health once it answers what is ``wanted``, or as it answers after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            _, health = self.get("/health")
            if wanted(health) or time.monotonic() > deadline:
                return health
            time.sleep(0.1)

    def wait_decided(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        health: Any = None
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, self.describe()
            try:
                _, health = self.get("/health")
                if health["decided"] >= count:
                    return
            except (OSError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"decided {health} after {timeout} s, wanted {count}\n{self.describe()}")

    def describe(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_serve(results: Path, env: dict[str, str], *extra: str) -> Served:
    port = free_port()
    log = results.parent / f"serve-{port}.log"
    results.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "cardpipe", "serve", "--results-dir", str(results), "--port", str(port), *extra],
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(popen, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert popen.poll() is None, served.describe()
        try:
            if served.get("/health")[0] == 200:
                return served
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"serve did not answer within 60 s\n{served.describe()}")


def cardpipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "cardpipe", *args],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"cardpipe {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_half(source: Path, target: Path, first: bool) -> list[dict[str, str]]:
    rows = sorted(read_csv_rows(source), key=lambda r: (r["timestamp"], int(r["transaction_id"])))
    half = rows[: len(rows) // 2] if first else rows[len(rows) // 2 :]
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(half)
    return half


def model_of(data: Path) -> LambdaModel:
    def money(text: str) -> D:
        return D(text)

    cards = {
        int(c["card_id"]): {
            "card_id": int(c["card_id"]),
            "customer_id": int(c["customer_id"]),
            "credit_limit": money(c["credit_limit"]),
            "current_balance": money(c["current_balance"]),
        }
        for c in read_csv_rows(data / "cards.csv")
    }
    customers = {
        int(c["customer_id"]): {
            "customer_id": int(c["customer_id"]),
            "address": c["address"],
            "credit_score": int(c["credit_score"]),
        }
        for c in read_csv_rows(data / "customers.csv")
    }
    return LambdaModel(cards, customers)


def decide_all(model: LambdaModel, rows: list[dict[str, str]]) -> None:
    for r in rows:
        model.decide(
            {
                "transaction_id": int(r["transaction_id"]),
                "card_id": int(r["card_id"]),
                "amount": D(r["amount"]),
                "location": r["location"],
            }
        )


def assert_api_equals_model(served: Served, model: LambdaModel) -> None:
    def money(value: D | None) -> str | None:
        return None if value is None else f"{value:.2f}"

    for card_id in model.cards:
        status, got = served.get(f"/cards/{card_id}")
        want = model.card_view(card_id)
        assert status == 200, got
        assert {k: got[k] for k in want} == {k: money(v) if isinstance(v, D) else v for k, v in want.items()}, (
            f"card {card_id}"
        )
    for customer_id in model.customers:
        status, got = served.get(f"/customers/{customer_id}")
        want = model.customer_view(customer_id)
        assert status == 200 and {k: got[k] for k in want} == want, f"customer {customer_id}: {got}"
    for transaction_id in model.decided:
        status, got = served.get(f"/transactions/{transaction_id}")
        want = model.transaction_view(transaction_id)
        assert status == 200, got
        assert {k: got[k] for k in want} == {k: money(v) if isinstance(v, D) else v for k, v in want.items()}, (
            f"transaction {transaction_id}"
        )


def assert_metrics_equal_the_model(served: Served, model: LambdaModel, messages: int) -> None:
    """/metrics: decisions by status and reason as decided, no rejection, two settlements, lag 0 once drained."""
    want: Counter[str] = Counter()
    for decision in model.decided.values():
        assert decision.status in ("pending", "declined"), "the seed data has no message to reject"
        want[f"cardpipe_decisions_total{{reason={decision.reason or ''},status={decision.status}}}"] += 1
    deadline = time.monotonic() + 10
    while True:  # the lag is measured every second
        samples = parse_metrics(served.get("/metrics")[1])
        lags = {k: v for k, v in samples.items() if k.startswith("cardpipe_consumer_lag_messages")}
        if lags and not any(lags.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {k: v for k, v in samples.items() if k.startswith("cardpipe_decisions_total")} == want
    assert not any(k.startswith("cardpipe_rejected_total") for k in samples)
    assert lags and not any(lags.values()), lags
    assert samples["cardpipe_consumer_lag_seconds"] == 0
    assert samples["cardpipe_settlements_total{status=published}"] == 2
    assert samples["cardpipe_settlement_seconds_count"] == 2
    assert samples["cardpipe_decision_seconds_count"] == messages


def two_cycles(data: Path, results: Path, env: dict[str, str]) -> None:
    model = model_of(data)
    cardpipe(["setup", "--results-dir", str(results)], env)
    cardpipe(["load", "--results-dir", str(results), "--data-dir", str(data)], env)
    first = write_half(data / "transactions.csv", results.parent / "first.csv", True)
    second = write_half(data / "transactions.csv", results.parent / "second.csv", False)
    cardpipe(["produce", "--results-dir", str(results), "--from-csv", str(results.parent / "first.csv")], env)
    served = start_serve(results, env)
    try:
        served.wait_decided(len(first))
        decide_all(model, first)
        assert_api_equals_model(served, model)  # before any settlement
        settled = cardpipe(["batch", "--results-dir", str(results)], env)  # beside the running service
        assert "settlement 1 published" in settled.stdout
        model.settle()
        assert any(model.limits[c] < model.cards[c]["credit_limit"] for c in model.cards), "no limit lowered"
        assert_api_equals_model(served, model)
        cardpipe(["produce", "--results-dir", str(results), "--from-csv", str(results.parent / "second.csv")], env)
        served.wait_decided(len(first) + len(second))
        decide_all(model, second)  # judged with settlement 1's limits
        assert_api_equals_model(served, model)
        assert "settlement 2 published" in cardpipe(["batch", "--results-dir", str(results)], env).stdout
        model.settle()
        assert_api_equals_model(served, model)
        # /health reads its counts from a cache of at most one second: settlement 2 shows within it
        health = served.health_within(2.0, lambda h: h["settlement_id"] == 2)
        assert health["decided"] == len(first) + len(second) and health["settlement_id"] == 2
        assert_metrics_equal_the_model(served, model, len(first) + len(second))
        started = time.monotonic()
        served.popen.send_signal(signal.SIGTERM)
        assert served.popen.wait(10) == 0, served.describe()
        assert time.monotonic() - started <= 3.0, "serve took over 3 s to stop"
        assert "Traceback" not in served.describe()
    finally:
        if served.popen.poll() is None:
            served.popen.kill()
            served.popen.wait()
        stop_broker(results)


def test_two_cycles_through_the_api_on_sqlite(seed_dataset, tmp_path):
    two_cycles(seed_dataset / "input", tmp_path / "results", env_without_services())


@pytest.mark.mysql
def test_two_cycles_through_the_api_on_mariadb_and_an_external_broker(seed_dataset, tmp_path, mysql_env):
    """MariaDB, and a broker cardpipe did not start (KAFKA_BOOTSTRAP_SERVERS): nothing starts or stops one."""
    with broker_session(None, tmp_path / "external-broker") as broker:
        env = env_without_services(**mysql_env, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers)
        two_cycles(seed_dataset / "input", tmp_path / "results", env)
        assert not (tmp_path / "results" / ".cardpipe-broker.json").exists()


# --------------------------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("service-data")
    generate_dataset(folder, GeneratorConfig(transactions=30_000, customers=600, cards=1_000, seed=11))
    return folder


def stream_rows(url: Any) -> dict[int, tuple[str, Any, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            t = schema.stream_transactions
            return {
                r[0]: tuple(r[1:])
                for r in conn.execute(select(t.c.transaction_id, t.c.status, t.c.pending_balance, t.c.decline_reason))
            }
    finally:
        engine.dispose()


def expected_rows(data: Path) -> dict[int, tuple[str, Any, Any]]:
    decisions, _ = reference_results(data)
    return {i: (status, balance, reason) for i, (_tx, status, balance, reason) in decisions.items()}


def test_serve_killed_mid_stream_and_restarted_loses_and_doubles_nothing(dataset, tmp_path):
    results = tmp_path / "results"
    env = env_without_services(CONSUMER_BATCH_SIZE="500")
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    try:
        cardpipe(["produce", "--results-dir", str(results)], env)
        # SIGKILLed by itself right after its 6th checkpoint (of 500 each): mid-stream whatever the machine's speed.
        killed = subprocess.run(
            [sys.executable, "-m", "cardpipe", "serve", "--results-dir", str(results), "--port", str(free_port())],
            env={**env, "PYTHONPATH": str(REPO_ROOT), "CARDPIPE_CRASH_AT": "consume.committed:6"},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        partial = len(stream_rows(settings.database_url))
        assert 0 < partial < 30_000, "killed mid-stream"
        served = start_serve(results, env)  # the dead holder's partition leases are taken over at once
        try:
            served.wait_decided(30_000)
            assert served.get("/health")[1]["decided"] == 30_000
        finally:
            served.popen.send_signal(signal.SIGTERM)
            served.popen.wait(10)
    finally:
        stop_broker(results)
    assert stream_rows(settings.database_url) == expected_rows(dataset)


def test_two_consumers_at_once_decide_as_one(dataset, tmp_path):
    results = tmp_path / "results"
    env = {**env_without_services(CONSUMER_BATCH_SIZE="500"), "PYTHONPATH": str(REPO_ROOT)}
    settings = Settings.from_env(env={}, results_dir=results, data_dir=dataset)
    commands.setup(settings)
    commands.load(settings)
    try:
        cardpipe(["produce", "--results-dir", str(results)], env)
        args = [sys.executable, "-m", "cardpipe", "consume", "--results-dir", str(results), "--idle-seconds", "2"]
        procs = [
            subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        stop_broker(results)
    codes = [p.returncode for p in procs]
    # One takes every partition; the other refuses with one line naming the holder (or takes what was free).
    assert 0 in codes, outputs
    for code, (_out, err) in zip(codes, outputs, strict=True):
        if code != 0:
            assert "is being decided by another consumer" in err and "Traceback" not in err, err
    assert stream_rows(settings.database_url) == expected_rows(dataset)
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(schema.stream_leases)).scalar() == 0
    finally:
        engine.dispose()


def test_serve_refuses_a_public_address_without_a_token(tmp_path):
    env = {k: v for k, v in env_without_services().items() if k != "CARDPIPE_API_TOKEN"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cardpipe",
            "serve",
            "--results-dir",
            str(tmp_path),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cardpipe: error: refusing to serve on 0.0.0.0 without an API token: set CARDPIPE_API_TOKEN (clients send "
        "it as 'Authorization: Bearer <token>'), or bind 127.0.0.1"
    ]


def test_serve_on_a_port_in_use_says_so_before_starting_anything(seed_dataset, tmp_path):
    """The API's port is bound first: taken, the command fails at once with one line naming it, and no embedded
    broker is started (nor could one have taken the port from the API, as a broker choosing a free port once did)."""
    env = env_without_services()
    results = tmp_path / "results"
    cardpipe(["setup", "--results-dir", str(results)], env)
    cardpipe(["load", "--results-dir", str(results), "--data-dir", str(seed_dataset / "input")], env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "cardpipe", "serve", "--results-dir", str(results), "--port", str(port)],
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"cardpipe: error: could not serve on 127.0.0.1:{port}: Address already in use"
    ]
    assert not (results / ".cardpipe-broker.json").exists()


def test_listening_socket_is_bound_to_the_address_it_is_given():
    from cardpipe.orchestration.service import listening_socket

    port = free_port()
    with listening_socket("127.0.0.1", port) as sock:
        assert sock.getsockname() == ("127.0.0.1", port)
        assert not sock.get_inheritable()


def test_serve_on_a_public_address_requires_the_bearer_token(seed_dataset, tmp_path):
    results = tmp_path / "results"
    env = env_without_services(CARDPIPE_API_TOKEN="s3cret-token")
    cardpipe(["setup", "--results-dir", str(results)], env)
    cardpipe(["load", "--results-dir", str(results), "--data-dir", str(seed_dataset / "input")], env)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cardpipe",
                "serve",
                "--results-dir",
                str(results),
                "--host",
                "0.0.0.0",
                "--port",
                str(port),
            ],
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(popen, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if served.get("/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline and popen.poll() is None, served.describe()
                time.sleep(0.2)
        served.wait_decided(400)  # a fresh embedded broker: serve published what was loaded and undecided
        assert served.get("/cards/26")[0] == 401
        assert served.get("/cards/26", token="wrong")[0] == 401
        status, card = served.get("/cards/26", token="s3cret-token")
        assert status == 200 and card["card_number"].endswith("7596") and "*" in card["card_number"]
    finally:
        popen.send_signal(signal.SIGTERM)
        popen.wait(10)
        stop_broker(results)
    numbers = [c["card_number"] for c in read_csv_rows(seed_dataset / "input" / "cards.csv")]
    logged = log.read_text(errors="replace")
    assert not any(n in logged or n.replace("-", "") in logged for n in numbers)
    assert os.path.exists(results / "stream_transactions.csv")


def test_settle_every_runs_settlements_inside_the_service(seed_dataset, tmp_path):
    results = tmp_path / "results"
    env = env_without_services()
    cardpipe(["setup", "--results-dir", str(results)], env)
    cardpipe(["load", "--results-dir", str(results), "--data-dir", str(seed_dataset / "input")], env)
    served = start_serve(results, env, "--settle-every", "0.5")
    try:
        served.wait_decided(400)  # a fresh embedded broker: serve published what was loaded
        deadline = time.monotonic() + 60
        while served.get("/health")[1]["settlement_id"] is None:
            assert time.monotonic() < deadline, served.describe()
            time.sleep(0.2)
        time.sleep(1.5)  # more timer rounds: nothing new to settle, nothing published
        status, transaction = served.get("/transactions/5")
        assert status == 200 and transaction["status"] == "approved" and transaction["settlement_id"] == 1
        assert served.get("/health")[1]["settlement_id"] == 1
    finally:
        served.popen.send_signal(signal.SIGTERM)
        served.popen.wait(10)
        stop_broker(results)
    assert len(read_csv_rows(results / "batch_transactions.csv")) == 400
