"""MySQL/MariaDB: the large reads through the server's own command-line client (``mariadb``, or ``mysql``).

PyMySQL parses every row of a result in Python. For the two reads that move every row, the client does that in C,
in a process of its own:

* the messages ``produce`` publishes, already rendered by the server (:func:`client_rows`): the client's output is
  read beside the publisher, each row a line, its values separated by tabs, as they are (``--batch --raw``); only
  values that hold no tab and no line break may be read this way;
* the lines of ``stream_transactions.csv``, rendered by the server too (:func:`write_lines`): several clients
  write ranges of the key into files at once, each followed by its ``FOUND_ROWS()``, and the files are joined.

``CARDPIPE_MYSQL_CLIENT``: ``auto`` (the default) uses the client when it is on the ``PATH``, ``off`` never does, and
any other value is the client's path. The client is used only for a URL it can be told in full (host, port, user,
password, database, ``unix_socket``, ``charset=utf8mb4``); a URL with other options (TLS, say) is read through the
driver. So is every read when the client cannot start or cannot connect: the functions here say so by returning
None before anything was read or written, and the caller falls back.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Engine, Select, func, select
from sqlalchemy.engine import URL

from cardpipe.errors import CardpipeError, ConfigError
from cardpipe.serving.driver_query import DriverQuery

__all__ = ["CLIENT_ENV", "client_command", "client_rows", "read_rows", "write_lines"]

log = logging.getLogger(__name__)

#: The environment variable that chooses the client: ``auto``, ``off`` or a path.
CLIENT_ENV = "CARDPIPE_MYSQL_CLIENT"

#: The URL options the client is told (any other keeps the read on the driver).
_UNDERSTOOD_OPTIONS = frozenset({"charset", "unix_socket"})

#: How much of the client's output is read at a time.
_BLOCK = 1 << 20

#: How many clients write a file's lines at once (:func:`write_lines`), each a range of its key: one more than a
#: two-core host's cores, since a client and the server's thread for it take turns (docs/performance.md).
_PARTS = 3


def _executable() -> str | None:
    """The client to run, from :data:`CLIENT_ENV`; None when off or not installed."""
    choice = os.environ.get(CLIENT_ENV, "auto").strip() or "auto"
    if choice == "off":
        return None
    if choice == "auto":
        return shutil.which("mariadb") or shutil.which("mysql")
    found = shutil.which(choice)
    if found is None:
        raise ConfigError(f"{CLIENT_ENV}={choice}: no such executable (set it to auto, off or the client's path)")
    return found


def client_command(url: URL) -> tuple[list[str], dict[str, str]] | None:
    """The client's command line for a query on ``url`` (the query itself to be appended) and its environment
    (the password in ``MYSQL_PWD``, which only this user can read): None when the client is off, not installed,
    or not told everything the URL says."""
    if url.get_backend_name() not in ("mysql", "mariadb"):
        return None
    options = dict(url.query)
    if set(options) - _UNDERSTOOD_OPTIONS or options.get("charset", "utf8mb4") != "utf8mb4":
        return None
    executable = _executable()
    if executable is None:
        return None
    command = [executable, "--no-defaults"]  # no option file of the user's: the output's form is fixed here
    if isinstance(options.get("unix_socket"), str):
        command += ["--protocol=SOCKET", f"--socket={options['unix_socket']}"]
    else:
        command += ["--protocol=TCP", f"--host={url.host or 'localhost'}", f"--port={url.port or 3306}"]
    if url.username:
        command.append(f"--user={url.username}")
    if url.database:
        command.append(f"--database={url.database}")
    command += [
        "--batch",  # tab-separated lines, no table drawing
        "--raw",  # values as they are, not escaped
        "--skip-column-names",
        "--quick",  # each row written as it comes, the result not held
        "--default-character-set=utf8mb4",
        "--connect-timeout=10",
    ]
    environment = {key: value for key, value in os.environ.items() if key != "MYSQL_PWD"}
    if url.password is not None:
        environment["MYSQL_PWD"] = str(url.password)
    return command, environment


def client_rows(engine: Engine, statement: Select[Any]) -> Iterator[list[tuple[bytes, ...]]] | None:
    """``statement``'s rows read by the command-line client (:func:`read_rows`), or None when it is not used for
    this engine or failed before its first row: the caller then reads through the driver."""
    command = client_command(engine.url)
    if command is None:
        return None
    with engine.connect() as conn:
        text = DriverQuery(statement).rendered(conn)
    return _read(command, text)


def read_rows(url: URL, sql: str) -> Iterator[list[tuple[bytes, ...]]] | None:
    """The rows of the query ``sql`` read by the command-line client, a list of rows at a time, each row the tuple
    of its values as bytes; None, having read nothing, when the client is not used for ``url`` or failed before
    its first row. A failure after that raises :class:`CardpipeError`.

    Every value must be free of tabs and line breaks (the client's separators), and not NULL (written ``NULL``).
    """
    command = client_command(url)
    return None if command is None else _read(command, sql)


def _read(command: tuple[list[str], dict[str, str]], sql: str) -> Iterator[list[tuple[bytes, ...]]] | None:
    """:func:`read_rows` with the client's command line and environment from :func:`client_command`."""
    args, environment = command
    errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _rows, which reads the client's output)
    try:
        process = subprocess.Popen(
            [*args, f"--execute={sql}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=environment,
        )
    except OSError as exc:
        errors.close()
        log.info("reading through the driver: the MySQL client %s did not start (%s)", args[0], exc)
        return None
    assert process.stdout is not None
    first = process.stdout.read(_BLOCK)
    if not first and process.wait() != 0:
        log.info(
            "reading through the driver: the MySQL client %s failed (%s)", args[0], _message(errors, process.returncode)
        )
        process.stdout.close()
        errors.close()
        return None
    return _rows(process, args[0], first, errors)


def _rows(
    process: subprocess.Popen[bytes], client: str, first: bytes, errors: IO[bytes]
) -> Iterator[list[tuple[bytes, ...]]]:
    """The client's output split into rows, then values; its exit checked at the end (or it is stopped early)."""
    assert process.stdout is not None
    stdout = process.stdout
    rest = b""
    block = first
    ended = False
    try:
        while block:
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            if lines:
                yield [tuple(line.split(b"\t")) for line in lines]
            block = stdout.read(_BLOCK)
        status = process.wait()
        if status != 0 or rest:
            raise CardpipeError(f"reading the database through {client} failed: {_message(errors, status)}")
        ended = True
    finally:
        if not ended and process.poll() is None:  # the reader stopped early: so does the client
            process.kill()
            process.wait()
        stdout.close()
        errors.close()


def _message(errors: IO[bytes], status: int | None) -> str:
    """The client's error output (its last line), or its exit status."""
    errors.seek(0)
    lines = errors.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {status}"


def write_lines(conn: Connection, statement: Select[Any], key: Any, path: Path, header: bytes) -> int | None:
    """Write ``path`` (created or replaced whole): ``header``, then the one text column of ``statement``'s rows,
    each followed by a line feed. ``statement`` is ordered by the integer ``key`` and read in :data:`_PARTS` ranges
    of it by as many command-line clients at once (the server renders each range on a thread of its own), each into
    a file of its own beside ``path``; the files are then joined. The row count; None, having written nothing, when
    the client is not used or one of them failed.

    A value may hold any character: each client is asked for ``FOUND_ROWS()`` after its rows, which is its
    output's last line (cut off), so no line needs to be told from a line break inside a value."""
    command = client_command(conn.engine.url)
    if command is None:
        return None
    low, high = conn.execute(select(func.min(key), func.max(key))).one()
    texts = [DriverQuery(statement.where(key.between(a, b))).rendered(conn) for a, b in _ranges(low, high, _PARTS)]
    args, environment = command
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{path.name}.part-{os.getpid()}"
    parts = [path.with_name(f"{stem}-{i}") for i in range(len(texts))]
    staged = path.with_name(f"{stem}-joined")
    processes: list[subprocess.Popen[bytes]] = []
    messages: list[IO[bytes]] = []  # each client's error output
    try:
        for text, part in zip(texts, parts, strict=True):
            messages.append(tempfile.TemporaryFile())  # noqa: SIM115 (closed below, once the clients ended)
            with part.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [*args, f"--execute={text}; SELECT FOUND_ROWS()"],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=messages[-1],
                        env=environment,
                    )
                )
        statuses = [process.wait() for process in processes]
        failed = [_message(m, status) for m, status in zip(messages, statuses, strict=True) if status != 0]
        if failed:
            log.info("writing %s through the driver: the MySQL client %s failed (%s)", path.name, args[0], failed[0])
            return None
        count = sum(_cut_count_line(part) for part in parts)
        with staged.open("wb") as joined:
            joined.write(header)
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, joined, _BLOCK)
        os.replace(staged, path)
        return count
    except OSError as exc:
        log.info("writing %s through the driver: the MySQL client %s (%s)", path.name, args[0], exc)
        return None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for message in messages:
            message.close()
        for leftover in (*parts, staged):
            leftover.unlink(missing_ok=True)


def _ranges(low: int | None, high: int | None, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges of integers covering ``low`` to ``high`` (one when there is nothing to split)."""
    if low is None or high is None:
        return [(0, -1)]  # an empty table: one client, no row
    step = max(1, -(-(high - low + 1) // parts))
    return [(start, min(start + step - 1, high)) for start in range(low, high + 1, step)]


def _cut_count_line(path: Path) -> int:
    """Cut the last line (``FOUND_ROWS()``) off a client's output; the row count it says."""
    with path.open("r+b") as part:
        size = part.seek(0, os.SEEK_END)
        part.seek(max(0, size - 32))
        tail = part.read()
        count_line = tail[tail.rstrip(b"\n").rfind(b"\n") + 1 :]
        if not count_line.endswith(b"\n") or not count_line[:-1].isdigit():
            raise OSError(f"the client's output does not end with its row count: {count_line[-40:]!r}")
        part.truncate(size - len(count_line))
    return int(count_line)
