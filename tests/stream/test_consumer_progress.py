"""When ``consume`` reports its progress: with its first checkpoint, then every ``progress_every`` seconds."""

import pytest
from sqlalchemy import create_engine

from cardpipe.config import SAMPLE_DATA_DIR, Settings
from cardpipe.orchestration import commands
from cardpipe.serving.stream_store import StreamStore
from cardpipe.stream.broker import broker_session
from cardpipe.stream.consumer import ConsumeOptions, ConsumeSummary, consume

pytestmark = pytest.mark.kafka


def test_the_first_progress_report_comes_with_the_first_checkpoint(tmp_path):
    settings = Settings.from_env(env={}, results_dir=tmp_path / "results", data_dir=SAMPLE_DATA_DIR)
    commands.setup(settings)
    commands.load(settings)
    seen: list[tuple[int, int]] = []

    def report(summary: ConsumeSummary) -> None:
        seen.append((summary.messages, summary.batches))  # the summary goes on changing: copy what it says now

    engine = create_engine(settings.database_url)
    try:
        with broker_session(None, settings.results_dir) as broker:
            published = commands.produce(settings, broker=broker).published
            summary = consume(
                broker.bootstrap_servers,
                settings.kafka_topic,
                StreamStore(engine, settings.kafka_topic),
                options=ConsumeOptions(until_caught_up=True, batch_size=100, progress_every=3600),
                progress=report,
            )
    finally:
        engine.dispose()
    assert summary.messages == published > 100 and summary.batches >= published // 100
    # One report, with the first batch of at most 100 messages committed; none again within the hour.
    assert len(seen) == 1 and seen[0][1] == 1 and 0 < seen[0][0] <= 100
