"""Seed command: ``initial`` loads the input CSVs (``cardpipe load``); ``updated`` loads the batch
results into the database (``cardpipe persist``).

Runs with any ``python3`` (see ``_seed_entry.py``).
"""

import sys

from _seed_entry import run_seed_command

COMMANDS = {"initial": "load", "updated": "persist"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python serving_processor.py initial|updated [options]", file=sys.stderr)
        sys.exit(2)
    run_seed_command([COMMANDS[sys.argv[1]], *sys.argv[2:]])
