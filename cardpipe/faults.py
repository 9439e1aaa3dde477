"""Crash points for fault-injection tests: kill this process at an exact place in the code.

``CARDPIPE_CRASH_AT="point:n"`` makes the process SIGKILL itself the n-th time it reaches ``point``
(no cleanup, no flush: exactly like a power cut or ``kill -9``). Unset (always, in production), a
crash point costs one global lookup. Points:

- ``consume.polled``      a batch was polled, nothing of it decided yet (inside a batch)
- ``consume.decided``     a batch was decided, not yet written
- ``checkpoint.written``  the batch's rows are written inside the open database transaction, before COMMIT
- ``consume.committed``   the checkpoint is committed, the next poll has not happened
- ``produce.sent``        every 1,000 messages handed to the producer
- ``produce.acked``       every 1,000 messages the broker acknowledged (the run has really published)
- ``batch.staged``        the batch results are computed and written aside, not yet swapped in
"""

from __future__ import annotations

import os
import signal

_ENV = "CARDPIPE_CRASH_AT"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    point, _, count = value.partition(":")
    return point, int(count or 1)


_target = _parse(os.environ.get(_ENV))
_hits = 0


def armed(name: str) -> bool:
    """Whether ``CARDPIPE_CRASH_AT`` names ``name`` (a caller may then do the work its crash point counts)."""
    return _target is not None and _target[0] == name


def crash_point(name: str) -> None:
    """SIGKILL this process if ``CARDPIPE_CRASH_AT`` names ``name`` and this is its n-th hit."""
    global _hits
    if _target is None or _target[0] != name:
        return
    _hits += 1
    if _hits >= _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
