"""The sample dataset published to an embedded broker and consumed into a fresh SQLite serving file, through a
checkpoint store a test makes (a subclass of the real one that fails or records): for consumer tests with the
real broker and database."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, select

from cardpipe.config import SAMPLE_DATA_DIR, Settings
from cardpipe.domain.records import STREAM_COLUMNS
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.stream.broker import broker_session
from cardpipe.stream.consumer import ConsumeOptions, ConsumeSummary, consume


def consume_sample(
    folder: Path,
    make_store: Callable[[Engine, str], Any],
    options: ConsumeOptions,
    *,
    after_produce: Callable[[str, str], None] | None = None,
) -> tuple[ConsumeSummary, Any, list[Any], int]:
    """Set up and load the sample in ``folder``, publish it, call ``after_produce(bootstrap_servers, topic)``, then
    consume it with ``make_store(engine, topic)``. Returns the summary, the store, the stored decisions (their
    columns and credit limit, by id) and how many messages ``produce`` published."""
    settings = Settings.from_env(env={}, results_dir=folder, data_dir=SAMPLE_DATA_DIR)
    commands.setup(settings)
    commands.load(settings)
    engine = create_engine(settings.database_url)
    try:
        with broker_session(None, settings.results_dir) as broker:
            published = commands.produce(settings, broker=broker).published
            if after_produce is not None:
                after_produce(broker.bootstrap_servers, settings.kafka_topic)
            store = make_store(engine, settings.kafka_topic)
            summary = consume(broker.bootstrap_servers, settings.kafka_topic, store, options=options)
        t = schema.stream_transactions
        with engine.connect() as conn:
            rows = conn.execute(
                select(*(t.c[c] for c in (*STREAM_COLUMNS, "credit_limit"))).order_by(t.c.transaction_id)
            ).all()
    finally:
        engine.dispose()
    return summary, store, list(rows), published
