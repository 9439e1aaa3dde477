"""Progress while a command works, and the run summary table printed at its end.

A :class:`Reporter` shows stages: on a terminal as rich bars (count, rate, ETA, lag) or spinners; elsewhere as one
plain log line per stage every few seconds and one when it is done; nothing when quiet. It is also a plain
``progress(message)`` callback (the message is logged), so the commands take either; :func:`stage_of` gives them
a :class:`Stage` in both cases (with a plain callback, each update is told as ``describe(completed)``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # rich is imported when something is drawn: a quiet command does without it
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

log = logging.getLogger("cardpipe")

#: Seconds between two plain progress lines of one stage.
PLAIN_EVERY = 5.0

#: A stage's rate is shown only when it ran at least this long.
MIN_RATE_SECONDS = 1.0


class Stage(Protocol):
    """One stage's progress."""

    def advance(self, n: int = 1) -> None: ...

    def update(
        self, completed: int | None = None, *, total: int | None = None, lag: int | None = None, note: str | None = None
    ) -> None: ...

    def done(self) -> None: ...


class _Silent:
    """A stage nobody watches."""

    def advance(self, n: int = 1) -> None:
        pass

    def update(
        self, completed: int | None = None, *, total: int | None = None, lag: int | None = None, note: str | None = None
    ) -> None:
        pass

    def done(self) -> None:
        pass


class _MessageStage:
    """A stage told to a plain ``progress(message)`` callback: ``describe(completed)`` on every update."""

    def __init__(self, progress: Callable[[str], None], describe: Callable[[int], str]) -> None:
        self.progress, self.describe, self.completed = progress, describe, 0

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(
        self, completed: int | None = None, *, total: int | None = None, lag: int | None = None, note: str | None = None
    ) -> None:
        if completed is not None:
            self.completed = completed
            self.progress(self.describe(completed))

    def done(self) -> None:
        pass


class _PlainStage:
    """A stage as log lines: at its first update, then every ``every`` seconds, and when it is done."""

    def __init__(self, name: str, total: int | None, unit: str, every: float) -> None:
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.completed, self.finished = 0, False
        self.lag: int | None = None
        self.note: str | None = None
        self.started = time.monotonic()
        self.last = self.started - every  # the first update is told at once

    def line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        count = f"{self.completed:,}" + (f"/{self.total:,}" if self.total is not None else "")
        counted = self.unit or self.completed or self.total is not None
        parts = [f"{self.name}: {count} {self.unit}".rstrip() if counted else self.name]
        rate = self.completed / elapsed if elapsed >= MIN_RATE_SECONDS and self.completed else None
        if rate:
            parts.append(f"{rate:,.0f} {self.unit}/s".strip())
        if self.lag is not None:
            parts.append(f"lag {self.lag:,}")
        if final:
            parts.append(f"done in {elapsed:.1f} s")
        elif rate and self.total is not None and self.total > self.completed:
            parts.append(f"ETA {(self.total - self.completed) / rate:,.0f} s")
        if self.note and not final:
            parts.append(self.note)
        return ", ".join(parts)

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(
        self, completed: int | None = None, *, total: int | None = None, lag: int | None = None, note: str | None = None
    ) -> None:
        if completed is not None:
            self.completed = completed
        self.total = total if total is not None else self.total
        self.lag = lag if lag is not None else self.lag
        self.note = note if note is not None else self.note
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line())

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            log.info(self.line(final=True))


class Reporter:
    """The display of a command's progress (a context manager: the bars stop at its end).

    ``enabled`` False: silent (``-q``). ``console``: where the bars go (default stderr); bars only when it is a
    terminal and ``bars`` is not False, plain log lines every ``every`` seconds otherwise.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        console: Console | None = None,
        bars: bool | None = None,
        every: float = PLAIN_EVERY,
    ) -> None:
        self.enabled, self.every = enabled, every
        self._console = console
        self.bars = enabled and (self.console.is_terminal if bars is None else bars)
        self._progress: Progress | None = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    @property
    def console(self) -> Console:
        """Where the bars go (stderr unless one was given)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def __call__(self, message: str) -> None:
        """A plain progress message: logged (above the bars on a terminal)."""
        if self.enabled:
            log.info(message)

    def stage(self, name: str, total: int | None = None, unit: str = "") -> Stage:
        """Start showing a stage (``total`` None: a spinner, or a count without ETA)."""
        if not self.enabled:
            return _Silent()
        if not self.bars:
            return _PlainStage(name, total, unit, self.every)
        from cardpipe.bars import RichStage

        bars = self._start()
        return RichStage(bars, bars.add_task(name, total=total, unit=unit, extra=""))

    def _start(self) -> Progress:
        if self._progress is None:
            from cardpipe.bars import new_bars

            self._progress = new_bars(self.console)
            self._progress.start()
            # Log lines go through rich's stderr proxy, printed above the bars instead of through them.
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                    self._handlers.append((handler, handler.setStream(sys.stderr)))
        return self._progress

    def close(self) -> None:
        """Stop the bars (they stay on screen as they last were)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers.clear()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stage_of(
    progress: Callable[[str], None] | None,
    name: str,
    describe: Callable[[int], str],
    *,
    total: int | None = None,
    unit: str = "",
) -> Stage:
    """A stage of ``progress``: a :class:`Reporter`'s own, or updates told as ``describe(completed)`` messages."""
    if isinstance(progress, Reporter):
        return progress.stage(name, total, unit)
    if progress is None:
        return _Silent()
    return _MessageStage(progress, describe)


# ---------------------------------------------------------------------------------------------------------------
# The run summary
# ---------------------------------------------------------------------------------------------------------------
#: Stages whose rate is transactions per second.
RATED_STAGES = ("load", "stream.publish", "stream.consume", "batch")

SUMMARY_COLUMNS = ("", "count", "amount", "seconds", "per second")


def summary_rows(document: Mapping[str, Any]) -> list[list[tuple[str, str, str, str, str]]]:
    """The summary of a ``run.json`` document, in sections of rows (label, count, amount, seconds, rate)."""
    totals = document["totals"]
    counts = (document.get("settlement") or {}).get("counts", {})
    amounts = {s["status"]: Decimal(s["amount"]) for s in document["stream"]["by_status"]}
    rows = [
        ("transactions", f"{totals['transactions']:,}", "", "", ""),
        ("decided", f"{totals['decided']:,}", "", "", ""),
        ("cards", f"{totals['cards']:,}", "", "", ""),
        ("customers", f"{totals['customers']:,}", "", "", ""),
    ]
    decisions = []
    for status, label in (("pending", "approved (pending)"), ("declined", "declined"), ("rejected", "rejected")):
        amount = amounts.get(status)
        decisions.append((label, f"{totals[status]:,}", "" if amount is None else f"{amount:,.2f}", "", ""))
        for reason in document["stream"]["reasons"]:
            if reason["kind"] == status:
                decisions.append((f"  {reason['reason']}", f"{reason['count']:,}", "", "", ""))
    settled = [
        ("approved amount", "", f"{amounts.get('pending', Decimal(0)):,.2f}", "", ""),
        ("limits lowered", f"{counts.get('cards_limit_lowered', 0):,}", "", "", ""),
        ("scores down", f"{counts.get('customers_score_down', 0):,}", "", "", ""),
    ]
    stages, total = [], None
    for entry in document.get("stages", []):
        name, seconds = entry["stage"], float(entry["seconds"])
        if name == "run":
            total = seconds
            continue
        rate = ""
        if name in RATED_STAGES and seconds >= MIN_RATE_SECONDS and totals["transactions"]:
            rate = f"{totals['transactions'] / seconds:,.0f}"
        stages.append((name, "", "", f"{seconds:,.2f}", rate))
    sections = [rows, decisions, settled, stages]
    if total is not None:
        sections.append([("total", "", "", f"{total:,.2f}", "")])
    return [section for section in sections if section]


def summary_table(document: Mapping[str, Any], title: str = "cardpipe run") -> Table:
    """The run summary as one rich table (rates in transactions per second, only for stages of 1 s or more)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(SUMMARY_COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for section in summary_rows(document):
        for row in section:
            table.add_row(*row)
        table.add_section()
    return table
