"""Where the tests find the shared reference data (the seed dataset, the peer datasets, the compare tool): one
definition for every test.

The folder ``shared`` beside the checkout, else ``/work/shared`` (a clone made elsewhere on this machine, such as
``/tmp/cleanclone``); ``CARDPIPE_SHARED_DIR`` names another. ``CARDPIPE_REFERENCE_DIR`` and ``CARDPIPE_COMPARE_TOOL``
override the reference folder and the compare tool alone.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    named = os.environ.get("CARDPIPE_SHARED_DIR")
    if named:
        return Path(named)
    candidates = (REPO_ROOT.parent / "shared", Path("/work/shared"))
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_DIR = _shared_dir()
REFERENCE_DIR = Path(os.environ.get("CARDPIPE_REFERENCE_DIR", SHARED_DIR / "reference"))
SEED_DATASET = REFERENCE_DIR / "seed_dataset_22"
PEER_DATASETS_DIR = REFERENCE_DIR / "peer_datasets"
COMPARE_TOOL = Path(os.environ.get("CARDPIPE_COMPARE_TOOL", SHARED_DIR / "tools" / "compare_results.py"))
