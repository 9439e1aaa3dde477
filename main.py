"""Seed command: all layers end to end. Same as ``cardpipe run``.

The embedded broker it uses is stopped when it is done (also one that ``stream_processor.py produce`` left).
Runs with any ``python3`` (see ``_seed_entry.py``).
"""

import sys

from _seed_entry import STOP_WHEN_DONE, run_seed_command

if __name__ == "__main__":
    run_seed_command(["run", *sys.argv[1:]], broker=STOP_WHEN_DONE)
