"""The long-lived resources of a command, owned in one place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cardpipe.config import Settings
from cardpipe.serving.database import check_connection, make_engine
from cardpipe.serving.stream_store import StreamStore


@contextmanager
def open_stream_store(settings: Settings) -> Iterator[StreamStore]:
    """A checkpoint store on its own engine, disposed of on exit (a consumer worker process's)."""
    engine = make_engine(settings.database_url, create_database=False)
    try:
        check_connection(engine)
        yield StreamStore(engine, settings.kafka_topic)
    finally:
        engine.dispose()
