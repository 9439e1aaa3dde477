"""User-facing errors: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class CardpipeError(Exception):
    """An error the user can act on (bad configuration, unreachable service, bad input file)."""


class ConfigError(CardpipeError):
    """The configuration is invalid or points at something that does not exist."""


class DatabaseUnavailable(CardpipeError):
    """The serving database cannot be reached or refuses the credentials."""


class BrokerUnavailable(CardpipeError):
    """The Kafka-protocol broker cannot be reached or started."""


class InputFileError(CardpipeError):
    """An input CSV is missing, lacks a column or holds a malformed row (file, line, column named)."""


class BrokerLost(BrokerUnavailable):
    """The broker went away while the stream was being consumed (its messages may be gone with it)."""


class PartitionsHeld(CardpipeError):
    """Every partition this consumer would decide is owned by another live consumer."""


class LeaseLost(CardpipeError):
    """Another consumer took over a partition this one was deciding (its lease had expired)."""


class SettlementChanged(Exception):
    """A settlement was published while a batch was decided with the previous limits: decide it again."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): one line for a report."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
