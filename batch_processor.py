"""Seed command: settle with Spark and write the batch results. Same as ``cardpipe batch``."""

import sys

from cardpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
