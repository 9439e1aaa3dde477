"""The ``cardpipe`` command line: a thin layer over :mod:`cardpipe.orchestration.commands`."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cardpipe import __version__
from cardpipe.config import MAX_CONSUMER_BATCH_SIZE, Settings, backend_named, publishing_processes
from cardpipe.errors import (
    DEBUG_VARIABLE,
    EXIT_ERROR,
    EXIT_INTERNAL,
    ErrorContext,
    internal_error_line,
    user_message,
)

if TYPE_CHECKING:
    from cardpipe.orchestration.commands import BatchResult
    from cardpipe.progress import Reporter
    from cardpipe.stream.consumer import ConsumeSummary

log = logging.getLogger("cardpipe")


#: What ``produce``'s publishing processes import, done ahead in the server they are forked from.
_PUBLISHER_MODULES = (
    "cardpipe.orchestration.publisher",
    "cardpipe.serving.database",
    "cardpipe.serving.transaction_source",
    "cardpipe.stream.producer",
    "sqlite3",
)
#: What a consumer worker imports, for the server it is forked from to import ahead: the modules of its entry point
#: and of the store opener its job names (both pickled by name), SQLite's driver and the stop events' module. (With
#: MySQL/MariaDB, an extra, each worker imports the driver itself.) Then what the export process forked from the
#: same server beside them imports (on SQLite, :class:`~cardpipe.batch.apart.ExportProcess`): DuckDB and the engine.
_WORKER_MODULES = (
    "cardpipe.stream.workers",
    "cardpipe.orchestration.runtime",
    "sqlite3",
    "multiprocessing.synchronize",
    "cardpipe.batch.embedded",
    "duckdb",
)


def _say(message: str) -> None:
    log.info(message)


def _reporter(args: argparse.Namespace) -> Reporter:
    """The command's progress display: bars on a terminal (text logs only), plain lines elsewhere, none when
    info lines are not logged (``-q``, ``--log-level warning``)."""
    from cardpipe.logs import FORMAT_ENV
    from cardpipe.progress import Reporter

    text_logs = (getattr(args, "log_format", None) or os.environ.get(FORMAT_ENV, "text")) == "text"
    return Reporter(enabled=log.isEnabledFor(logging.INFO), bars=None if text_logs else False)


def _settings(args: argparse.Namespace) -> Settings:
    """The command's settings; the results folder is checked writable first when the command writes in it."""
    settings = Settings.from_env(results_dir=args.results_dir, data_dir=getattr(args, "data_dir", None))
    args.settings = settings  # named in error messages (database, broker, folder)
    if args.writes_results and not (args.func is cmd_broker and args.action != "start"):
        settings.check_results_dir()
    return settings


def cmd_setup(args: argparse.Namespace) -> int:
    from cardpipe.orchestration import commands

    settings = _settings(args)
    commands.setup(settings)
    print(f"clean schema created in {settings.describe_database()}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from cardpipe.orchestration import commands

    settings = _settings(args)
    with _reporter(args) as progress:
        summary = commands.load(settings, progress)
    rows = ", ".join(f"{table} {count:,}" for table, count in summary.rows.items())
    print(f"loaded {settings.data_dir} in {summary.seconds:.1f} s: {rows}")
    return 0


def start_publisher_server(processes: int | None, env: Mapping[str, str]) -> None:
    """When ``produce`` will publish from the database in several processes (``processes``, None for its
    default, with the database ``env`` names), start the server they fork from now, so that it imports their
    modules while this process imports its own (:func:`~cardpipe.childprocs.start_forkserver`)."""
    from cardpipe.childprocs import start_forkserver, usable_cores

    if publishing_processes(processes, usable_cores(), backend_named(env)) > 1:
        start_forkserver(_PUBLISHER_MODULES)


def cmd_produce(args: argparse.Namespace) -> int:
    if args.from_csv is None:
        start_publisher_server(args.processes, os.environ)
    from cardpipe.orchestration import commands

    settings = _settings(args)
    with _reporter(args) as progress:
        summary = commands.produce(
            settings, from_csv=args.from_csv, republish_all=args.all, processes=args.processes, progress=progress
        )
    print(f"published {summary.published:,} transactions in {summary.seconds:.1f} s ({summary.rate:,.0f}/s)")
    return 0


def _start_worker_server(args: argparse.Namespace) -> None:
    """With ``--workers`` above 1, start the server the workers fork from now, so that it imports their modules
    while this process imports its own (:func:`~cardpipe.childprocs.start_forkserver`)."""
    if args.workers > 1:
        from cardpipe.childprocs import start_forkserver

        start_forkserver(_WORKER_MODULES)


def cmd_consume(args: argparse.Namespace) -> int:
    _start_worker_server(args)
    from cardpipe.orchestration import commands
    from cardpipe.stream.consumer import ConsumeOptions

    settings = _settings(args)
    options = ConsumeOptions(
        follow=args.follow,
        idle_seconds=settings.consumer_idle_seconds if args.idle_seconds is None else args.idle_seconds,
        until_caught_up=args.until_caught_up,
        batch_size=args.batch_size or settings.consumer_batch_size,
    )
    with _reporter(args) as progress:
        summary = commands.consume(settings, options, progress=progress, workers=args.workers)
    print(_consume_line(summary))
    return 0


def _consume_line(summary: ConsumeSummary) -> str:
    counts = summary.counts
    reasons = sorted((k.split(":", 1)[1], v) for k, v in counts.items() if k.startswith("rejected:"))
    rejected = f" ({', '.join(f'{r} {n}' for r, n in reasons)})" if reasons else ""
    return (
        f"decided {summary.messages:,} messages in {summary.seconds:.1f} s: "
        f"{counts['pending']:,} pending, {counts['declined']:,} declined, "
        f"{counts['rejected']:,} rejected{rejected}, {counts['duplicate_ignored']:,} duplicates ignored"
    )


def _batch_line(result: BatchResult) -> str:
    if result.nothing_new:
        return (
            f"nothing to settle: no decision was committed after settlement "
            f"{result.settlement_id}'s watermark; it stays in force"
        )
    return (
        f"settlement {result.settlement_id} published ({result.engine} engine, "
        f"{result.seconds:.1f} s): {result.summary.describe()}"
    )


def cmd_batch(args: argparse.Namespace) -> int:
    from cardpipe.batch.apart import SettleProcess

    # The embedded engine's process imports DuckDB while this one imports the rest and claims the settlement;
    # stopped unused on Spark or MySQL (where the embedded engine runs in this process).
    ahead = SettleProcess() if args.engine != "spark" else None
    try:
        from cardpipe.orchestration import commands

        settings = _settings(args)
        with _reporter(args) as progress:
            result = commands.batch(settings, progress, engine_name=args.engine, settle_process=ahead)
    finally:
        if ahead is not None:
            ahead.stop()
    print(_batch_line(result))
    return 0


def cmd_persist(args: argparse.Namespace) -> int:
    from cardpipe.orchestration import commands

    counts = commands.persist(_settings(args))
    print(
        "in the database (batch writes its tables when it publishes a settlement): "
        + ", ".join(f"{t} {n:,}" for t, n in counts.items())
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cardpipe.orchestration import commands

    run_json, report_html = commands.report(_settings(args))
    print(f"wrote {report_html} (open it in a browser; it needs no network) and {run_json}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    _start_worker_server(args)
    from cardpipe.orchestration.service import serve

    stopped_by = serve(
        _settings(args),
        host=args.host,
        port=args.port,
        settle_every=args.settle_every,
        workers=args.workers,
        token=os.environ.get("CARDPIPE_API_TOKEN"),
    )
    print("cardpipe: service stopped", file=sys.stderr)
    return 130 if stopped_by == signal.SIGINT else 0


def cmd_view(args: argparse.Namespace) -> int:
    from cardpipe.orchestration.views import show

    return show(_settings(args), args.command, args.id, as_json=args.json)


def cmd_run(args: argparse.Namespace) -> int:
    _start_worker_server(args)
    from cardpipe.orchestration import commands

    settings = _settings(args)
    with _reporter(args) as progress:
        summary = commands.run(settings, progress, workers=args.workers)
    if summary.report is not None:
        from rich.console import Console

        from cardpipe.progress import summary_table

        Console(highlight=False).print(summary_table(summary.report))
    else:  # no run.json to read back: the one-line summaries
        print(_consume_line(summary.consume))
        print(_batch_line(summary.batch))
    print(
        f"settlement {summary.batch.settlement_id} published ({summary.batch.engine} engine); results in "
        f"{settings.results_dir} (report.html: charts and checks)"
    )
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from cardpipe.stream import broker

    settings = _settings(args)
    if args.action == "stop":
        stopped = broker.stop_broker(settings.results_dir)
        print("embedded broker stopped" if stopped else "no embedded broker running")
    elif args.action == "start":
        handle = broker.ensure_broker(None, settings.results_dir)
        print(f"embedded broker {'started' if handle.started_here else 'running'} at {handle.bootstrap_servers}")
    else:
        record = broker.broker_status(settings.results_dir)
        print(
            f"embedded broker running at {record['bootstrap_servers']} (pid {record['pid']})"
            if record
            else "no embedded broker running"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cardpipe.generate import GeneratorConfig, generate_dataset

    config = GeneratorConfig(transactions=args.transactions, customers=args.customers, cards=args.cards, seed=args.seed)
    counts = generate_dataset(args.out_dir, config, progress=lambda n: _say(f"generated {n:,} transactions"))
    print(f"wrote {args.out_dir}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return 0


def _int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,}, got {value:,}")
        return value

    return parse


_positive_int = _int_between(1)
_batch_size = _int_between(1, MAX_CONSUMER_BATCH_SIZE)


def _float_from(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float_from(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float_from(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="what to log on stderr (default info; warning with -q)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="text lines (default), or one JSON object per line (time, level, logger, message) for log collectors",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cardpipe",
        description=(
            "Credit-card transaction pipeline: serving DB, Kafka stream authorization, "
            "settlement (embedded DuckDB, or Spark on a cluster)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cardpipe {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="working folder: result CSVs, and on embedded defaults the SQLite file and the "
        "embedded broker's record (default: ./results or CARDPIPE_RESULTS_DIR)",
    )
    common.add_argument("-q", "--quiet", action="store_true", help="only print the summary and errors")
    _add_log_options(common)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with customers.csv, credit_card_types.csv, cards.csv, transactions.csv "
        "(default: the bundled sample or CARDPIPE_DATA_DIR)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_: str,
        *parents: argparse.ArgumentParser,
        writes_results: bool = True,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, *parents], help=help_, description=help_)
        p.set_defaults(func=func, writes_results=writes_results)
        return p

    add("setup", cmd_setup, "(re)create a clean schema in the serving database")
    add("load", cmd_load, "load the four input CSVs into the serving database", data)
    p = add("produce", cmd_produce, "publish transactions to the topic in timestamp order, keyed by card")
    p.add_argument("--from-csv", type=Path, default=None, help="publish this transactions CSV instead of the database")
    p.add_argument("--all", action="store_true", help="also republish transactions already decided")
    p.add_argument(
        "--processes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="publish from the database in N processes at once, each the cards of its own partitions "
        "(default: one per usable core on SQLite, one on MySQL/MariaDB; at most one per partition)",
    )
    p = add("consume", cmd_consume, "authorize the topic's transactions; stops when drained unless --follow")
    p.add_argument("--follow", action="store_true", help="keep running until interrupted (Ctrl-C)")
    p.add_argument(
        "--idle-seconds",
        type=_non_negative_float,
        default=None,
        help="stop after this long without a message (default 5, CONSUMER_IDLE_SECONDS)",
    )
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="stop as soon as every partition is read to its end (no idle wait)",
    )
    p.add_argument("--batch-size", type=_batch_size, default=None, help="messages per poll and checkpoint")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="consumer processes, each owning every N-th partition (default 1: in this process)",
    )
    p = add("batch", cmd_batch, "settle every decision committed so far and publish the settlement (tables and CSVs)")
    p.add_argument(
        "--engine",
        choices=["auto", "embedded", "spark"],
        default=None,
        help="batch engine (default: CARDPIPE_BATCH_ENGINE or auto: Spark only when SPARK_MASTER names "
        "a cluster or SPARK_REMOTE is set, else the embedded DuckDB engine)",
    )
    add(
        "persist",
        cmd_persist,
        "check that the latest settlement is in the serving database (the seed's 'updated')",
        writes_results=False,
    )
    add("report", cmd_report, "write results/report.html (charts, reconciliation) and results/run.json again")
    p = add("serve", cmd_serve, "run the stream consumer and the HTTP API (merged views) until Ctrl-C")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs CARDPIPE_API_TOKEN)"
    )
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument(
        "--settle-every",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="run a settlement this often (default: only when `cardpipe batch` is run)",
    )
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="consumer processes (default 1)")
    for kind in ("card", "customer", "transaction"):
        p = add(
            kind,
            cmd_view,
            f"show a {kind}'s current view (latest settlement merged with the live stream)",
            writes_results=False,
        )
        p.add_argument("id", type=_positive_int, help=f"the {kind} id")
        p.add_argument("--json", action="store_true", help="one JSON object, as the HTTP API answers")
    p = add("run", cmd_run, "all layers end to end on a clean schema", data)
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="consumer processes for the stream layer (default 1)",
    )
    p = add("broker", cmd_broker, "manage the embedded broker of a results folder")
    p.add_argument("action", choices=["start", "stop", "status"])
    p = sub.add_parser(
        "generate",
        help="write a synthetic dataset in the four-CSV shape",
        description="write a synthetic dataset in the four-CSV shape",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--transactions", type=_positive_int, required=True)
    p.add_argument("--customers", type=_positive_int, default=None)
    p.add_argument("--cards", type=_positive_int, default=None)
    p.add_argument("--seed", type=_int_between(-(2**63)), default=42)
    p.add_argument("-q", "--quiet", action="store_true")
    _add_log_options(p)
    p.set_defaults(func=cmd_generate, writes_results=False)
    return parser


class Terminated(BaseException):
    """SIGTERM outside the consumer loop (which finishes its batch instead): unwinds like Ctrl-C, so that
    ``finally`` blocks stop what the command started (the embedded broker, the producer, Spark)."""


#: Set once SIGTERM has come: an error that surfaces after it is reported as the termination (see :func:`main`).
_TERMINATED: list[bool] = []


def _terminate(_signum: int, _frame: object) -> None:
    _TERMINATED.append(True)
    raise Terminated


def _signal_wrapped(exc: BaseException) -> BaseException | None:
    """The ``Terminated`` or ``KeyboardInterrupt`` that ``exc`` stands for, if any: CPython reports an exception that
    a signal handler raised at some points inside a C call as a ``SystemError`` ("... returned a result with an
    exception set") whose cause is the handler's exception; other C calls lose the handler's exception and raise
    their own (confluent-kafka's client configuration reports any failure while reading its settings as a
    ``TypeError``), so any error after SIGTERM came stands for it."""
    cause = exc.__cause__
    if isinstance(exc, SystemError) and isinstance(cause, (Terminated, KeyboardInterrupt)):
        return cause
    return Terminated() if _TERMINATED else None


def _print_traceback_when_debugging(exc: BaseException) -> None:
    """The whole traceback on stderr when CARDPIPE_DEBUG is set (the command still ends with its one line)."""
    if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)


def _signal_exit(signalled: BaseException) -> int:
    """Say which signal stopped the command (Ctrl-C or SIGTERM); its exit status (130 or 143)."""
    if isinstance(signalled, KeyboardInterrupt):
        print("cardpipe: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    print("cardpipe: terminated", file=sys.stderr)
    return 128 + signal.SIGTERM


def _error_context(args: argparse.Namespace) -> ErrorContext:
    """What the command was working with, for messages whose exception does not name it."""
    settings: Settings | None = getattr(args, "settings", None)
    if settings is None:
        return ErrorContext(folder=getattr(args, "out_dir", None))
    return ErrorContext(
        database_url=settings.database_url,
        kafka_servers=settings.kafka_bootstrap_servers,
        folder=settings.results_dir,
    )


def _report(exc: Exception, args: argparse.Namespace) -> int:
    """Print one line for ``exc`` (the traceback too with CARDPIPE_DEBUG=1); return the exit status."""
    context = _error_context(args)
    _print_traceback_when_debugging(exc)
    message = user_message(exc, context)
    if message is None:
        print(f"cardpipe: {internal_error_line(exc, context)}", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"cardpipe: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _configure_logging(args: argparse.Namespace) -> None:
    from cardpipe.logs import configure

    level = logging.WARNING if args.quiet else logging.INFO
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    configure(level, "cardpipe: %(message)s", args.log_format)
    for noisy in ("py4j", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A connection that cannot be reset (its server restarted, or the command was interrupted mid-statement) is
    # logged by the pool with a traceback; cardpipe retries or reports the lost connection itself.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    logging.getLogger("cardpipe.librdkafka").setLevel(logging.CRITICAL)  # cardpipe reports broker trouble itself
    logging.getLogger("cardpipe.stream.broker.librdkafka").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr and an exit status:
    2 an error the user can act on (or bad usage), 70 a bug, 130 Ctrl-C, 143 SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    _TERMINATED.clear()
    args = argparse.Namespace()
    try:
        try:
            args = build_parser().parse_args(argv)
            _configure_logging(args)
            return int(args.func(args))
        except (KeyboardInterrupt, Terminated) as signalled:
            return _signal_exit(signalled)
        except Exception as exc:
            wrapped = _signal_wrapped(exc)
            if wrapped is None:
                return _report(exc, args)
            _print_traceback_when_debugging(exc)
            return _signal_exit(wrapped)
    except KeyboardInterrupt:  # a second Ctrl-C while the first failure was reported
        return 128 + signal.SIGINT
    except Terminated:
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The ``cardpipe`` executable: :func:`main`, then the exit. ``gc.freeze()`` first: the interpreter's last
    collections at shutdown then skip every object alive, which takes them a tenth of a second once SQLAlchemy
    is imported; nothing is lost (they run no finalizer that the exit itself does not)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
