"""Seed command: all layers end to end. Same as ``cardpipe run``."""

import sys

from cardpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
