"""The read-only HTTP API of SPEC §9 (``cardpipe serve``): the merged views as JSON, health, metrics, docs.

``create_app(engine)`` builds the FastAPI application. Every view is read in one snapshot on one pooled
connection per request (:mod:`cardpipe.serving.views`). Money is a decimal string with two decimals; card
numbers are masked in every answer, and the access log's paths are masked too (:class:`CardNumberLogFilter`).
With a ``token``, every endpoint but ``/health`` and the dashboard's page needs ``Authorization: Bearer <token>``.
The docs page (``/docs``) is served offline: Swagger UI's files come from the ``fastapi-offline`` wheel when it
is installed, else the page is a self-contained list of the endpoints.
"""

from __future__ import annotations

import hmac
import html
import importlib.resources
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cardpipe import __version__
from cardpipe.errors import DatabaseUnavailable
from cardpipe.serving import views
from cardpipe.serving.dashboard import DashboardData, dashboard_page
from cardpipe.serving.database import describe_error
from cardpipe.serving.metrics import StreamCollector

__all__ = ["CardNumberLogFilter", "create_app", "docs_assets_dir"]

log = logging.getLogger(__name__)

#: How long /health and /metrics reuse the counts they read from the database.
COUNTS_TTL_SECONDS = 1.0
#: On SQLite the API's connections memory-map the database file (``PRAGMA mmap_size``): a card's decisions are
#: then read without a system call per page (card view with 1M decisions stored: ~0.45 -> ~0.25 ms).
SQLITE_MMAP_BYTES = 1 << 30
StatusFn = Callable[[], dict[str, Any]]


# ------------------------------------------------------------------------------------------ JSON models
# For the OpenAPI document only: answers are built by cardpipe.serving.views.to_json and sent as they are.
Money = Annotated[str, Field(pattern=r"^-?[0-9]+\.[0-9]{2}$", examples=["1234.50"])]


class CardOut(BaseModel):
    card_id: int
    customer_id: int
    card_type_id: int
    card_number: str = Field(examples=["****-****-****-7934"], description="masked: only the last four digits")
    credit_limit: Money = Field(description="the settlement in force's limit (the original before any)")
    settled_balance: Money = Field(description="the settlement in force's balance (the original before any)")
    pending_amount: Money = Field(description="sum of the pending decisions the settlement in force does not cover")
    pending_count: int
    available_credit: Money = Field(description="credit_limit - settled_balance - pending_amount; may be negative")
    settlement_id: int | None = Field(description="the settlement in force; null before any")


class CustomerOut(BaseModel):
    customer_id: int
    name: str
    credit_score: int = Field(description="the settlement in force's score (the original before any)")
    card_ids: list[int]
    settlement_id: int | None


class TransactionOut(BaseModel):
    transaction_id: int
    card_id: int | None
    merchant_name: str | None
    timestamp: str | None = Field(examples=["2025-04-01 03:32:20"])
    amount: Money | None
    location: str | None
    transaction_type: str | None
    related_transaction_id: int | None
    status: Literal["pending", "declined", "rejected", "approved"]
    decline_reason: str | None = Field(description="amount_over_half_limit, location_too_far or over_credit_limit")
    pending_balance: Money | None = Field(description="the card's running balance right after this decision")
    credit_limit: Money | None = Field(description="the limit this transaction was judged against")
    settlement_id: int | None = Field(description="the first settlement that included it; null until one does")
    response_code: str = Field(
        description="ISO 8583 response code: 00 approved or pending, 51 over the credit limit, 61 amount over half "
        "the limit, 59 location (suspected fraud), 30 rejected input (format error)",
        examples=["00"],
    )
    rejection_reason: str | None
    rejection_detail: str | None


class HealthOut(BaseModel):
    status: str = Field(examples=["ok"])
    decided: int | None = Field(description="decisions committed so far: pending, declined and rejected")
    lag: int | None = Field(description="messages on the topic not yet decided, as last measured (null: unknown)")
    settlement_id: int | None


class ErrorOut(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
    503: {"model": ErrorOut, "description": "the database is unavailable"},
}


class _JSON(JSONResponse):
    """JSON rendered by orjson (the views' values are already JSON-ready: see ``views.to_json``)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# ----------------------------------------------------------------------------------------------- logging
_CARD_NUMBER = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){11,18}(?![0-9])")


def _mask_text(text: str) -> str:
    return _CARD_NUMBER.sub(lambda m: views.mask_card_number(m.group()), text) if text else text


class CardNumberLogFilter(logging.Filter):
    """Masks anything shaped like a card number (12 to 19 digits, maybe grouped) in a log record.

    Installed on uvicorn's loggers by :func:`create_app`: a path like ``/cards/4109166102317934`` (a client
    that sent a card number as an id) is logged as ``/cards/************7934``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _mask_text(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_mask_text(a) if isinstance(a, str) else a for a in record.args)
        return True


def _install_log_filter() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, CardNumberLogFilter) for f in logger.filters):
            logger.addFilter(CardNumberLogFilter())


class _Throttled:
    """Logs a recurring warning at most once per ``every`` seconds, saying how many were left out meanwhile:
    a database outage under load must not write one line per request."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._skipped = 0

    def warning(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        log.warning("%s%s", message, f" (and {skipped} more like it)" if skipped else "")


# ------------------------------------------------------------------------------------------------ docs
def docs_assets_dir() -> FilePath | None:
    """The folder of Swagger UI's files in the ``fastapi-offline`` wheel, or None when it is not installed."""
    try:
        folder = importlib.resources.files("fastapi_offline") / "static"
    except ModuleNotFoundError:
        return None
    path = FilePath(str(folder))
    return path if (path / "swagger-ui-bundle.js").is_file() and (path / "swagger-ui.css").is_file() else None


_DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def _endpoint_list(openapi: dict[str, Any]) -> str:
    items = []
    for path, operations in openapi.get("paths", {}).items():
        for method, op in operations.items():
            params = ", ".join(f"{p['name']} ({p.get('schema', {}).get('type', '')})" for p in op.get("parameters", []))
            codes = ", ".join(sorted(op.get("responses", {})))
            items.append(
                f"<li><code>{html.escape(method.upper())} {html.escape(path)}</code> — "
                f"{html.escape(op.get('summary', ''))}"
                + (f"; parameters: {html.escape(params)}" if params else "")
                + f"; answers: {html.escape(codes)}</li>"
            )
    return "<ul>\n" + "\n".join(items) + "\n</ul>"


def _docs_page(openapi: dict[str, Any], root: str, assets: bool) -> str:
    title = html.escape(f"{openapi['info']['title']} {openapi['info']['version']}")
    listing = _endpoint_list(openapi)
    spec = f'<p>OpenAPI document: <a href="{root}/openapi.json">{root}/openapi.json</a></p>'
    if not assets:
        return (
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>\n"
            f"<body><h1>{title}</h1>\n{spec}\n{listing}\n</body></html>\n"
        )
    config = orjson.dumps(
        {
            "url": f"{root}/openapi.json",
            "dom_id": "#swagger-ui",
            "validatorUrl": None,
            "deepLinking": True,
            "layout": "BaseLayout",
            "showExtensions": True,
        }
    ).decode()
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="{root}/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="{root}/docs/favicon.png"></head>
<body>
<div id="swagger-ui"></div>
<noscript><h1>{title}</h1>{spec}{listing}</noscript>
<script src="{root}/docs/swagger-ui-bundle.js"></script>
<script>
const config = {config};
config.presets = [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset];
window.ui = SwaggerUIBundle(config);
</script>
</body></html>
"""


# ------------------------------------------------------------------------------------- counts and metrics
class _CountsCache:
    """``views.service_counts`` read at most once per ``ttl`` seconds, whatever the number of callers."""

    def __init__(self, engine: Engine, ttl: float = COUNTS_TTL_SECONDS) -> None:
        self.engine, self.ttl = engine, ttl
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = float("-inf")

    def fresh(self) -> dict[str, Any] | None:
        """The cached counts when younger than ``ttl``, else None (no database access)."""
        return self._value if time.monotonic() - self._at < self.ttl else None

    def get(self) -> dict[str, Any]:
        """Fresh counts; while another caller refreshes them, the last ones (single flight)."""
        value = self.fresh()
        if value is not None:
            return value
        if not self._lock.acquire(blocking=self._value is None):
            assert self._value is not None
            return self._value
        try:
            value = self.fresh()
            if value is None:
                with self.engine.connect() as conn:
                    value = views.service_counts(conn)
                self._value, self._at = value, time.monotonic()
            return value
        finally:
            self._lock.release()


def _known(status: StatusFn | None) -> dict[str, Any]:
    if status is None:
        return {}
    try:
        return dict(status() or {})
    except Exception as exc:  # the service's own report failing must not fail /health
        log.warning("status callback failed: %s", type(exc).__name__)
        return {}


class _ServingCollector(Collector):
    """Gauges of the service's state: decided, settlement in force, database reachability (the lag, the decisions
    and the settlements in detail: :class:`~cardpipe.serving.metrics.StreamCollector`)."""

    NAMES = ("cardpipe_decided", "cardpipe_settlement_in_force", "cardpipe_database_up")

    def __init__(self, counts: _CountsCache, status: StatusFn | None) -> None:
        self.counts, self.status = counts, status

    def collect(self) -> Iterable[GaugeMetricFamily]:
        known = _known(self.status)
        up = 1
        if "decided" not in known or "settlement_id" not in known:
            try:
                known = {**self.counts.get(), **known}
            except (SQLAlchemyError, DatabaseUnavailable):
                up = 0
        if known.get("decided") is not None:
            yield GaugeMetricFamily(
                self.NAMES[0], "Decisions committed so far (pending, declined, rejected).", value=known["decided"]
            )
        if up:
            yield GaugeMetricFamily(
                self.NAMES[1], "The settlement in force (0: none yet).", value=known.get("settlement_id") or 0
            )
        yield GaugeMetricFamily(self.NAMES[2], "1 when the serving database answered the last count.", value=up)


_ROUTES = ("/cards/{card_id}", "/customers/{customer_id}", "/transactions/{transaction_id}", "/health", "/metrics")
Answer = Callable[[int], Any]  # an id -> an awaitable Response


class _Route:
    """What the request metrics read of a matched route (``scope["route"].path``)."""

    def __init__(self, path: str) -> None:
        self.path = path


class _FastReads:
    """ASGI layer for the hot path: ``GET /cards|customers|transactions/<positive integer>`` is answered by the same
    view functions and JSON as the FastAPI routes, without FastAPI's per-request routing and validation. Anything
    else (other paths, ids that are not plain positive integers: FastAPI's 404/422) goes to the app.

    ``answers`` maps the collection name to ``answer(id)``; it is filled once the routes are defined.
    """

    _PATH = re.compile(r"/(cards|customers|transactions)/([1-9][0-9]{0,18})")

    def __init__(self, app: ASGIApp, *, answers: dict[str, Answer], on_database_error: Callable[[Exception], Any]):
        self.app = app
        self.answers = answers
        self.on_database_error = on_database_error
        self.routes = {
            name: _Route(path) for name, path in zip(("cards", "customers", "transactions"), _ROUTES, strict=False)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = self._PATH.fullmatch(scope["path"])
            if match is not None and not scope.get("query_string"):
                collection = match[1]
                scope["route"] = self.routes[collection]
                try:
                    response = await self.answers[collection](int(match[2]))
                except (SQLAlchemyError, DatabaseUnavailable) as exc:
                    response = self.on_database_error(exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Guard:
    """ASGI middleware: bearer-token check (all but /health) and request metrics per route."""

    def __init__(self, app: ASGIApp, *, token: str | None, requests: Counter, seconds: Histogram) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.requests, self.seconds = requests, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_status(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            if self.token is not None and not self._public(scope) and not self._authorized(scope):
                await _JSON(
                    {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            label = route if route in _ROUTES else "other"
            self.requests.labels(label, str(code)).inc()
            self.seconds.labels(label).observe(time.perf_counter() - started)

    @staticmethod
    def _public(scope: Scope) -> bool:
        """/health, and the dashboard's page (a shell with no data: a browser cannot send a bearer header when it
        opens a page, so the page sends the token of its address's ``#token=...`` with its data requests)."""
        root = scope.get("root_path", "")
        return scope["path"] in ("/health", root + "/health", "/", root + "/")

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)
        return False


# ----------------------------------------------------------------------------------------------------- app
def _sqlite_mmap(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Pool checkout hook: memory-map the SQLite file, once per connection (a dict lookup afterwards)."""
    if not record.info.get("cardpipe_mmap"):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA mmap_size={int(SQLITE_MMAP_BYTES)}")
        finally:
            cursor.close()
        record.info["cardpipe_mmap"] = True


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    status: StatusFn | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The HTTP API over ``engine``'s serving database.

    ``token``: require ``Authorization: Bearer <token>`` everywhere but ``/health``. ``status()``: what the
    running service knows (``decided``, ``lag``, ``settlement_id``); what it leaves out is read from the
    database, at most once a second. ``registry``: the service's Prometheus metrics, served by ``/metrics``
    with the API's own (request counts and latencies; the serving gauges unless ``registry`` has them).
    On SQLite, the engine's connections are memory-mapped when checked out (:data:`SQLITE_MMAP_BYTES`).
    """
    if token is not None and not token.strip():
        raise ValueError("the API token must not be empty (None: no token)")  # never "configured" to no check
    _install_log_filter()
    if engine.dialect.name == "sqlite" and not event.contains(engine, "checkout", _sqlite_mmap):
        event.listen(engine, "checkout", _sqlite_mmap)
    counts = _CountsCache(engine)
    database_warnings = _Throttled()
    serving = CollectorRegistry(auto_describe=False)
    serving.register(_ServingCollector(counts, status))
    stream = CollectorRegistry(auto_describe=False)
    stream.register(StreamCollector(engine, status))
    http = CollectorRegistry(auto_describe=False)
    requests = Counter(
        "cardpipe_api_requests", "HTTP requests answered, by route and status code.", ["route", "code"], registry=http
    )
    seconds = Histogram(
        "cardpipe_api_request_seconds",
        "Time to answer an HTTP request, by route.",
        ["route"],
        registry=http,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    )

    app = FastAPI(
        title="cardpipe",
        version=__version__,
        summary="Merged (batch + stream) views of the card transaction pipeline: cards, customers, transactions.",
        docs_url=None,
        redoc_url=None,
    )
    answers: dict[str, Answer] = {}
    app.add_middleware(_FastReads, answers=answers, on_database_error=lambda exc: database_answer(exc))
    app.add_middleware(_Guard, token=token, requests=requests, seconds=seconds)  # added last: outermost
    assets = docs_assets_dir()

    if token is not None:
        _document_bearer(app)

    def database_answer(exc: Exception) -> Response:
        database_warnings.warning(f"answered 503: {_mask_text(describe_error(engine.url, exc))}")
        return _JSON({"detail": "database unavailable, try again later"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(DatabaseUnavailable)
    async def database_error(_request: Request, exc: Exception) -> Response:
        return database_answer(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own answer, without the echoed input (which could be a card number).
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return _JSON({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        log.error("answered 500: %s", type(exc).__name__)
        return _JSON({"detail": "internal error"}, status_code=500)

    # A SQLite read is a local call of ~0.1 ms: made on the event loop, it costs less than the threadpool hop.
    # A network database's may wait: it runs in the threadpool, so a slow query never stalls other requests.
    inline = engine.dialect.name == "sqlite"

    def read(view: Callable[[Connection, int], dict[str, Any] | None], ident: int) -> dict[str, Any] | None:
        with engine.connect() as conn:  # one pooled connection per request
            return view(conn, ident)

    async def answer(view: Callable[[Connection, int], dict[str, Any] | None], ident: int, what: str) -> Response:
        found = read(view, ident) if inline else await run_in_threadpool(read, view, ident)
        if found is None:
            return _JSON({"detail": f"{what} not found"}, status_code=404)
        return _JSON(views.to_json(found))

    answers["cards"] = lambda ident: answer(views.card_view, ident, "card")
    answers["customers"] = lambda ident: answer(views.customer_view, ident, "customer")
    answers["transactions"] = lambda ident: answer(views.transaction_view, ident, "transaction")

    @app.get(
        "/cards/{card_id}",
        response_class=_JSON,
        summary="A card's position (settled + pending)",
        responses={200: {"model": CardOut}, 404: {"model": ErrorOut, "description": "unknown card"}, **_ERRORS},
    )
    async def get_card(card_id: Annotated[int, Path(description="the card's id")]) -> Response:
        """The card's limit and settled balance (settlement in force), its pending decisions after the
        settlement's watermark and the available credit; the card number is masked."""
        return await answer(views.card_view, card_id, "card")

    @app.get(
        "/customers/{customer_id}",
        response_class=_JSON,
        summary="A customer's score and cards",
        responses={200: {"model": CustomerOut}, 404: {"model": ErrorOut, "description": "unknown customer"}, **_ERRORS},
    )
    async def get_customer(customer_id: Annotated[int, Path(description="the customer's id")]) -> Response:
        """The customer's credit score (settlement in force), card ids and the settlement in force."""
        return await answer(views.customer_view, customer_id, "customer")

    @app.get(
        "/transactions/{transaction_id}",
        response_class=_JSON,
        summary="A decided transaction",
        responses={
            200: {"model": TransactionOut},
            404: {"model": ErrorOut, "description": "unknown or not yet decided"},
            **_ERRORS,
        },
    )
    async def get_transaction(transaction_id: Annotated[int, Path(description="the transaction's id")]) -> Response:
        """The transaction's fields and its decision: pending, declined, rejected, or approved once settled."""
        return await answer(views.transaction_view, transaction_id, "transaction")

    @app.get(
        "/health",
        response_class=_JSON,
        summary="Liveness and progress (no token needed)",
        responses={200: {"model": HealthOut}, 503: {"model": HealthOut, "description": "database unavailable"}},
    )
    async def health() -> Response:
        """Answers within milliseconds: counts come from the service or a cache of at most one second."""
        known = _known(status)
        code = 200
        if "decided" not in known or "settlement_id" not in known:
            cached = counts.fresh()
            try:
                cached = cached if cached is not None else await run_in_threadpool(counts.get)
            except (SQLAlchemyError, DatabaseUnavailable) as exc:
                database_warnings.warning(f"health: {_mask_text(describe_error(engine.url, exc))}")
                cached, code = {"decided": None, "settlement_id": None}, 503
            known = {**cached, **known}
        body = {
            "status": "ok" if code == 200 else "unavailable",
            "decided": known.get("decided"),
            "lag": known.get("lag"),
            "settlement_id": known.get("settlement_id"),
        }
        return _JSON(body, status_code=code)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, **_ERRORS},
    )
    def metrics() -> Response:
        """Prometheus text format: the service's registry, the serving gauges and the API's request metrics."""
        parts = []
        taken: set[str] = set()
        if registry is not None:
            parts.append(generate_latest(registry))
            taken = {m.name for m in registry.collect()}
        if not taken & set(_ServingCollector.NAMES):
            parts.append(generate_latest(serving))
        if not any(name.startswith(("cardpipe_decisions", "cardpipe_consumer_lag")) for name in taken):
            parts.append(generate_latest(stream))
        if not taken & {"cardpipe_api_requests", "cardpipe_api_request_seconds"}:
            parts.append(generate_latest(http))
        return Response(b"".join(parts), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = html.escape(request.scope.get("root_path", "").rstrip("/"))
        return HTMLResponse(_docs_page(app.openapi(), root, assets is not None))

    dashboard_data = DashboardData(engine, status)

    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_page(), headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/data", include_in_schema=False)
    def dashboard_json() -> Response:
        return Response(dashboard_data.get(), media_type="application/json", headers={"Cache-Control": "no-store"})

    if assets is not None:
        for name, media_type in _DOCS_FILES.items():
            if (assets / name).is_file():
                _add_asset(app, assets / name, name, media_type)
    return app


def _add_asset(app: FastAPI, path: FilePath, name: str, media_type: str) -> None:
    async def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})

    app.add_api_route(f"/docs/{name}", asset, methods=["GET"], include_in_schema=False)


def _document_bearer(app: FastAPI) -> None:
    """Declare the bearer token in the OpenAPI document (the check itself is :class:`_Guard`'s)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if path != "/health":
                    for op in operations.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
