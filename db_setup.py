"""Seed command: (re)create a clean schema. Same as ``cardpipe setup``.

Runs with any ``python3``: without cardpipe's packages it starts again with the project's ``.venv``
(``bash scripts/install.sh`` creates it); see ``_seed_entry.py``.
"""

import sys

from _seed_entry import run_seed_command

if __name__ == "__main__":
    run_seed_command(["setup", *sys.argv[1:]])
