"""The rich progress bars a :class:`~cardpipe.progress.Reporter` draws on a terminal (imported only then)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cardpipe.progress import MIN_RATE_SECONDS


def new_bars(console: Console) -> Progress:
    """Bars on ``console`` (not started): spinner, name, bar, count, rate, elapsed, ETA and a note (the lag)."""
    return Progress(
        SpinnerColumn(finished_text="✓"),
        TextColumn("{task.description}"),
        BarColumn(),
        _Count(),
        _Rate(),
        TimeElapsedColumn(),
        _Eta(),
        TextColumn("{task.fields[extra]}"),
        console=console,
        redirect_stderr=True,
    )


class _Count(ProgressColumn):
    """``done/total unit``, or ``done unit`` without a total."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("unit"):
            return Text("")
        total = f"/{task.total:,.0f}" if task.total is not None else ""
        return Text(f"{task.completed:,.0f}{total} {task.fields.get('unit', '')}".rstrip())


class _Eta(ProgressColumn):
    """``ETA h:mm:ss`` for a stage with a total."""

    def __init__(self) -> None:
        super().__init__()
        self.remaining = TimeRemainingColumn()

    def render(self, task: Task) -> Text:
        if task.total is None or not task.fields.get("unit"):
            return Text("")
        return Text("ETA ") + self.remaining.render(task)


class _Rate(ProgressColumn):
    """Items per second (once the stage has run a second)."""

    def render(self, task: Task) -> Text:
        speed, elapsed = task.finished_speed or task.speed, task.elapsed or 0.0
        if not speed or elapsed < MIN_RATE_SECONDS or not task.fields.get("unit"):
            return Text("")
        return Text(f"{speed:,.0f}/s")


class RichStage:
    """A stage drawn as one of the bars."""

    def __init__(self, bars: Progress, task: TaskID) -> None:
        self.bars, self.task = bars, task

    def advance(self, n: int = 1) -> None:
        self.bars.advance(self.task, n)

    def update(
        self, completed: int | None = None, *, total: int | None = None, lag: int | None = None, note: str | None = None
    ) -> None:
        extra: dict[str, Any] = {}
        if lag is not None:
            extra["extra"] = f"lag {lag:,}"
        elif note is not None:
            extra["extra"] = note
        self.bars.update(self.task, completed=completed, total=total, **extra)

    def done(self) -> None:
        task = next(t for t in self.bars.tasks if t.id == self.task)
        if task.total is None or task.completed < task.total:
            self.bars.update(self.task, total=task.completed or 1, completed=task.completed or 1)
        self.bars.stop_task(self.task)
