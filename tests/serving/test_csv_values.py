"""Cell parsing fast paths agree with the reference parsers (pure, no database)."""

import random
from datetime import datetime

import pytest

from cardpipe.domain.records import TIMESTAMP_FORMAT
from cardpipe.serving.csv_io import _to_timestamp


def _reference(text: str) -> datetime | str:
    try:
        return datetime.strptime(text.strip(), TIMESTAMP_FORMAT)
    except ValueError:
        return "invalid"


def _fast(text: str) -> datetime | str:
    try:
        return _to_timestamp(text)
    except ValueError:
        return "invalid"


@pytest.mark.parametrize(
    "text",
    [
        "2024-02-29 23:59:59",
        "2023-02-29 10:00:00",
        "2024-13-01 00:00:00",
        "2024-00-10 00:00:00",
        "2024-04-31 00:00:00",
        "2024-01-01 24:00:00",
        "2024-01-01 23:60:00",
        "2024-01-01 23:59:60",
        "0001-01-01 00:00:00",
        "0000-01-01 00:00:00",
        "9999-12-31 23:59:59",
        " 2024-01-05 01:02:03 ",
        "2024-1-5 1:2:3",
        "2024-01-05T01:02:03",
        "2024-01-05 01:02:03.5",
        "2024-01-05",
        "\uff12024-01-05 01:02:03",
        "2024-01-05 01:02:03+01:00",
        "",
    ],
)
def test_timestamp_fast_path_agrees_with_strptime_on_edges(text):
    assert _fast(text) == _reference(text)


def test_timestamp_fast_path_agrees_with_strptime_on_random_canonical_texts():
    rnd = random.Random(11)
    texts = []
    for _ in range(20_000):
        y, mo, d, h, mi, s = (rnd.randrange(n) for n in (10_000, 14, 33, 26, 62, 62))
        texts.append(f"{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}")
    results = [(_fast(t), _reference(t)) for t in texts]
    assert all(fast == ref for fast, ref in results)
    assert sum(ref != "invalid" for _, ref in results) > 1_000  # both kinds are exercised
