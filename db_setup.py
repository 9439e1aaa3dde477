"""Seed command: (re)create a clean schema. Same as ``cardpipe setup``."""

import sys

from cardpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["setup", *sys.argv[1:]]))
