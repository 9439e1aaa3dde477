"""The pipeline runs on every peer dataset (other implementations' data) and agrees with the domain rules."""

import pytest

from tests.orchestration.helpers import assert_results_match_reference, cardpipe, env_without_services
from tests.reference import PEER_DATASETS_DIR

PEERS = PEER_DATASETS_DIR

pytestmark = [pytest.mark.kafka, pytest.mark.spark]


@pytest.mark.parametrize("name", sorted(p.name for p in PEERS.iterdir()) if PEERS.is_dir() else ["missing"])
def test_run_on_peer_dataset(name, tmp_path):
    data = PEERS / name
    assert data.is_dir(), f"peer dataset {data} not found"
    cardpipe(["run", "--data-dir", str(data), "--results-dir", str(tmp_path)], env_without_services())
    assert_results_match_reference(tmp_path, data)
