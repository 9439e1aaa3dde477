"""Seed command: ``produce`` publishes transactions to Kafka (``cardpipe produce``); ``consume``
authorizes them (``cardpipe consume``)."""

import sys

from cardpipe.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("produce", "consume"):
        print("usage: python stream_processor.py produce|consume [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
