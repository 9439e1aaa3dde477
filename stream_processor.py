"""Seed command: ``produce`` publishes transactions to Kafka (``cardpipe produce``); ``consume``
authorizes them (``cardpipe consume``).

Without ``KAFKA_BOOTSTRAP_SERVERS`` the first of them starts the embedded broker. ``produce`` leaves it
running (the consumer has yet to read what it published); ``consume`` stops it when it is done, if it
started it or ``produce`` did. Runs with any ``python3`` (see ``_seed_entry.py``).
"""

import sys

from _seed_entry import NOTE_STARTED, STOP_WHEN_DONE, run_seed_command

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("produce", "consume"):
        print("usage: python stream_processor.py produce|consume [options]", file=sys.stderr)
        sys.exit(2)
    run_seed_command(sys.argv[1:], broker=NOTE_STARTED if sys.argv[1] == "produce" else STOP_WHEN_DONE)
