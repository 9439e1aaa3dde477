"""Who holds a lease or runs a settlement: ``host:pid``, and whether such a holder is known to be dead."""

from __future__ import annotations

import itertools
import os
import re
import socket
from pathlib import Path

_HOLDER = re.compile(r"(?P<host>[^:]*):(?P<pid>[0-9]+)(?::[0-9]+)?")
_serial = itertools.count(1)


def process_owner() -> str:
    """This process as a holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def unique_owner() -> str:
    """A holder name of its own for one object of this process: ``host:pid:n``."""
    return f"{process_owner()}:{next(_serial)}"


def holder_is_dead(owner: str) -> bool:
    """Whether ``owner`` (``host:pid`` or ``host:pid:n``) is a process of this host that no longer runs (a holder
    on another host, or one that cannot be checked, is not known to be dead)."""
    match = _HOLDER.fullmatch(owner)
    if match is None or match["host"] != socket.gethostname():
        return False
    pid = int(match["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that has exited but was not reaped yet (its parent, or a container's init, has not waited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
