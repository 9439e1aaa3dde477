"""The HTTP API: views as JSON, 404/422 (never 500), bearer token, health and its cache, metrics, offline docs,
and no full card number in any answer or log line."""

from __future__ import annotations

import csv
import logging
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from cardpipe.config import SAMPLE_DATA_DIR
from cardpipe.serving import api as api_module
from cardpipe.serving import views
from cardpipe.serving.api import CardNumberLogFilter, create_app
from tests.serving.test_views import CARD_1_JSON, sqlite_engine, whole_scenario

TOKEN = "s3cret-token"


@pytest.fixture
def serving(tmp_path: Path):
    engine = sqlite_engine(tmp_path / "serving.db")
    yield whole_scenario(engine)
    engine.dispose()


@pytest.fixture
def client(serving):
    with TestClient(create_app(serving.engine)) as c:
        yield c


def count_queries(engine, needle: str) -> list[str]:
    """Statements run on ``engine`` that contain ``needle`` (appended as they run)."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        if needle in statement:
            seen.append(statement)

    return seen


# ------------------------------------------------------------------------------------------------ the views
def test_card_customer_transaction_as_json(client):
    r = client.get("/cards/1")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == CARD_1_JSON
    assert client.get("/customers/2").json() == {
        "customer_id": 2,
        "name": "Kyle Silva",
        "credit_score": 803,
        "card_ids": [1, 2],
        "settlement_id": 2,
    }
    assert client.get("/transactions/2").json() == {
        "transaction_id": 2,
        "card_id": 1,
        "merchant_name": "Shop 2",
        "timestamp": "2025-04-01 10:00:02",
        "amount": "-20.50",
        "location": "1 Main St, Albany, NY 12207",
        "transaction_type": "purchase",
        "related_transaction_id": None,
        "status": "approved",
        "decline_reason": None,
        "pending_balance": "499.68",
        "credit_limit": "14300.00",
        "settlement_id": 1,
        "response_code": "00",
        "rejection_reason": None,
        "rejection_detail": None,
    }
    rejected = client.get("/transactions/12345").json()
    assert (rejected["status"], rejected["rejection_reason"], rejected["card_id"]) == (
        "rejected",
        "duplicate_conflict",
        None,
    )


def test_unknown_ids_are_404(client):
    for path in ("/cards/9999", "/customers/9999", "/transactions/9999", "/transactions/500"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert set(r.json()) == {"detail"} and "not found" in r.json()["detail"]


@pytest.mark.parametrize("ident", ["abc", "1.5", "1e3", "0x10", "", "%20", "9" * 5000])
def test_non_integer_ids_are_422_without_echo(client, ident):
    for kind in ("cards", "customers", "transactions"):
        r = client.get(f"/{kind}/{ident}")
        if ident in ("", "%20"):
            assert r.status_code in (404, 422)  # "/cards/" matches no route
            continue
        assert r.status_code == 422, (kind, ident)
        assert r.json()["detail"][0]["loc"] == ["path", kind[:-1] + "_id"]
        assert set(r.json()["detail"][0]) == {"loc", "msg", "type"}  # FastAPI's, without the echoed input
        assert ident not in r.text


@pytest.mark.parametrize("ident", ["-1", "0", str(2**63), str(2**70), str(-(2**70))])
def test_integers_that_cannot_be_ids_are_404(client, ident):
    for kind in ("cards", "customers", "transactions"):
        assert client.get(f"/{kind}/{ident}").status_code == 404


def test_read_only(client):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/cards/1").status_code == 405
    assert client.post("/health").status_code == 405


def test_database_errors_are_503_one_line(tmp_path, caplog):
    broken = sqlite_engine(tmp_path / "empty.db")  # no tables at all
    with TestClient(create_app(broken)) as c:
        for path in ("/cards/1", "/customers/1", "/transactions/1", "/health"):
            r = c.get(path)
            assert r.status_code == 503, path
            assert "SELECT" not in r.text and "Traceback" not in r.text and "\n" not in r.text
        assert c.get("/cards/1").json() == {"detail": "database unavailable, try again later"}
        assert c.get("/health").json()["status"] == "unavailable"
    broken.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cardpipe.serving.api"]
    assert len(warnings) == 1 and "no such table" in warnings[0]  # one line for the burst, not one per request


def test_recurring_warnings_are_throttled(caplog):
    throttled = api_module._Throttled(every=0.2)
    for _ in range(4):
        throttled.warning("database down")
    time.sleep(0.25)
    throttled.warning("database down")
    assert [r.getMessage() for r in caplog.records] == ["database down", "database down (and 3 more like it)"]


def test_unexpected_errors_are_500_without_traceback(serving, monkeypatch):
    def boom(_conn, _ident):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(views, "card_view", boom)
    with TestClient(create_app(serving.engine), raise_server_exceptions=False) as c:
        r = c.get("/cards/1")
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


# ------------------------------------------------------------------------------------------------- security
def test_bearer_token(serving):
    with TestClient(create_app(serving.engine, token=TOKEN)) as c:
        for path in (
            "/cards/1",
            "/customers/2",
            "/transactions/1",
            "/metrics",
            "/openapi.json",
            "/docs",
            "/docs/swagger-ui.css",
            "/nowhere",
        ):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": "Bearer"},
            ):
                r = c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/cards/1", headers=good).status_code == 200
        assert c.get("/cards/1", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        assert c.get("/openapi.json", headers=good).json()["components"]["securitySchemes"] == {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
        assert c.get("/health").status_code == 200  # no token needed


@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_token_is_refused(serving, token):
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(serving.engine, token=token)


def full_card_numbers() -> list[str]:
    with open(SAMPLE_DATA_DIR / "cards.csv", newline="") as f:
        numbers = [row["card_number"] for row in csv.DictReader(f)]
    return numbers + [re.sub(r"[^0-9]", "", n) for n in numbers]


def test_no_full_card_number_in_any_answer_or_log(serving, caplog):
    caplog.set_level(logging.DEBUG)
    numbers = full_card_numbers()
    bodies = []
    with TestClient(create_app(serving.engine)) as c:
        for card_id in range(1, 71):
            card = c.get(f"/cards/{card_id}")
            assert card.status_code == 200
            bodies.append(card.text)
            bodies.append(c.get(f"/customers/{card.json()['customer_id']}").text)
        for path in (
            "/transactions/1",
            "/transactions/9",
            "/transactions/12345",
            "/health",
            "/metrics",
            "/openapi.json",
            "/docs",
            "/cards/4109166102317934",
            "/cards/4109-1661-0231-7934",
        ):
            bodies.append(c.get(path).text)
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))  # not the client's
    everything = "\n".join(bodies) + server_log
    assert "****-****-****-7934" in everything  # the masked form is there ...
    leaked = [n for n in numbers if n in everything]
    assert leaked == []  # ... and no full number


def test_uvicorn_access_log_masks_card_numbers(serving, caplog):
    """A real uvicorn server: a client that sends a card number as an id gets it masked in the access log."""
    caplog.set_level(logging.INFO)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(serving.engine), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/cards/4109166102317934").status_code == 404
            assert http.get("/cards/4109-1661-0231-7934").status_code == 422
            assert http.get("/cards/1").json()["card_number"] == "****-****-****-7934"
    finally:
        server.should_exit = True
        thread.join(10)
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert len(access) == 3
    assert "/cards/************7934" in access[0] and "/cards/****-****-****-7934" in access[1]
    assert not [n for n in full_card_numbers() if any(n in line for line in access)]


def test_access_log_lines_are_masked():
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/cards/4109166102317934", "1.1", 404),
        None,
    )
    assert CardNumberLogFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /cards/************7934 HTTP/1.1" 404'
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "card 4109-1661-0231-7934 id 12345", None, None)
    CardNumberLogFilter().filter(record)
    assert record.getMessage() == "card ****-****-****-7934 id 12345"


def test_create_app_masks_uvicorns_loggers(serving):
    create_app(serving.engine)
    create_app(serving.engine)
    for name in ("uvicorn.access", "uvicorn.error"):
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, CardNumberLogFilter)]
        assert len(filters) == 1


def test_sqlite_connections_are_memory_mapped(serving):
    with serving.engine.connect() as conn:  # a pooled connection from before the app
        assert conn.exec_driver_sql("PRAGMA mmap_size").scalar() == 0
    create_app(serving.engine)
    create_app(serving.engine)  # registers its hook once
    with serving.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA mmap_size").scalar() == api_module.SQLITE_MMAP_BYTES
    assert len(serving.engine.pool.dispatch.checkout) == 1


# --------------------------------------------------------------------------------------------------- health
def test_health_from_the_database(client):
    assert client.get("/health").json() == {"status": "ok", "decided": 12, "lag": None, "settlement_id": 2}


def test_health_uses_what_the_service_knows(serving):
    queries = count_queries(serving.engine, "count(")
    with TestClient(create_app(serving.engine, status=lambda: {"decided": 42, "lag": 7, "settlement_id": 9})) as c:
        assert c.get("/health").json() == {"status": "ok", "decided": 42, "lag": 7, "settlement_id": 9}
    assert queries == []  # nothing read from the database
    with TestClient(create_app(serving.engine, status=lambda: {"lag": 3})) as c:
        assert c.get("/health").json() == {"status": "ok", "decided": 12, "lag": 3, "settlement_id": 2}

    def failing() -> dict:
        raise RuntimeError("the service's report failed")

    with TestClient(create_app(serving.engine, status=failing)) as c:
        assert c.get("/health").json() == {"status": "ok", "decided": 12, "lag": None, "settlement_id": 2}


def test_health_is_cached_for_at_most_a_second(serving):
    queries = count_queries(serving.engine, "SELECT count(*) AS count_1 \nFROM stream_transactions")
    with TestClient(create_app(serving.engine)) as c:
        started = time.perf_counter()
        for _ in range(50):
            assert c.get("/health").status_code == 200
        burst = time.perf_counter() - started
        assert len(queries) == 1  # one count for the whole burst
        slowest = 0.0
        for _ in range(5):
            started = time.perf_counter()
            c.get("/health")
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.1
        serving.decide(100, 1, "1.00", seq=9)
        assert c.get("/health").json()["decided"] == 12  # still the cached count
        time.sleep(api_module.COUNTS_TTL_SECONDS + 0.05)
        assert c.get("/health").json()["decided"] == 13
        assert len(queries) == 2
    assert burst < 50 * 0.1


# -------------------------------------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics_default_registry(client):
    client.get("/cards/1")
    client.get("/cards/9999")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(r.text)
    assert samples["cardpipe_decided"] == 12
    assert samples["cardpipe_settlement_in_force"] == 2
    assert samples["cardpipe_database_up"] == 1
    assert samples["cardpipe_api_requests_total{code=200,route=/cards/{card_id}}"] == 1
    assert samples["cardpipe_api_requests_total{code=404,route=/cards/{card_id}}"] == 1
    assert not any(name.startswith("cardpipe_consumer_lag_messages") for name in samples)  # unknown without the service


def test_metrics_with_the_services_registry(serving):
    registry = CollectorRegistry()
    Gauge("cardpipe_decided", "the service's own count", registry=registry).set(77)
    Gauge("cardpipe_consumer_batches", "a service metric", registry=registry).set(5)
    with TestClient(create_app(serving.engine, registry=registry, status=lambda: {"lag": 4})) as c:
        text = c.get("/metrics").text
    samples = parse_metrics(text)  # parses: no metric family twice
    assert samples["cardpipe_decided"] == 77 and samples["cardpipe_consumer_batches"] == 5
    assert text.count("# TYPE cardpipe_decided ") == 1
    assert "cardpipe_api_requests_total{code=200,route=/metrics}" not in samples  # counted once answered


# ----------------------------------------------------------------------------------------------------- docs
def test_openapi_lists_the_endpoints(client):
    doc = client.get("/openapi.json").json()
    assert {
        "/cards/{card_id}",
        "/customers/{customer_id}",
        "/transactions/{transaction_id}",
        "/health",
        "/metrics",
    } <= set(doc["paths"])
    assert not any(method != "get" for ops in doc["paths"].values() for method in ops)
    card = doc["paths"]["/cards/{card_id}"]["get"]
    assert {"200", "404", "422"} <= set(card["responses"])
    assert "CardOut" in doc["components"]["schemas"]


def other_hosts(page: str) -> list[str]:
    return re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+", page)


def test_docs_page_works_offline(client):
    assert api_module.docs_assets_dir() is not None  # fastapi-offline is installed: Swagger UI from the app
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert other_hosts(r.text) == []
    assert "/docs/swagger-ui-bundle.js" in r.text and '"validatorUrl":null' in r.text
    for asset, media_type in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
        got = client.get(f"/docs/{asset}")
        assert got.status_code == 200 and got.headers["content-type"].startswith(media_type)
    assert "/cards/{card_id}" in r.text  # the endpoint list (for browsers without JavaScript)


def test_docs_page_without_swagger_assets(serving, monkeypatch):
    monkeypatch.setattr(api_module, "docs_assets_dir", lambda: None)
    with TestClient(create_app(serving.engine)) as c:
        r = c.get("/docs")
        assert c.get("/docs/swagger-ui-bundle.js").status_code == 404
    assert r.status_code == 200 and other_hosts(r.text) == [] and "<script" not in r.text
    for path in ("/cards/{card_id}", "/customers/{customer_id}", "/transactions/{transaction_id}", "/health"):
        assert f"GET {path}" in r.text


def test_the_fast_read_path_answers_as_the_documented_routes(client):
    """Plain ids take the fast path; other spellings of the same id go through FastAPI: same answers, same
    route label in the metrics."""
    for path in ("/cards/26", "/customers/13", "/transactions/5"):
        fast = client.get(path)
        routed = client.get(path + "?x=1")  # with a query string: FastAPI's route
        leading_zero = client.get(path.rsplit("/", 1)[0] + "/0" + path.rsplit("/", 1)[1])
        assert fast.status_code == routed.status_code == leading_zero.status_code == 200
        assert fast.json() == routed.json() == leading_zero.json()
    metrics = client.get("/metrics").text
    assert 'cardpipe_api_requests_total{code="200",route="/cards/{card_id}"} 3.0' in metrics
