"""Seed command: settle the stream results and publish the batch results. Same as ``cardpipe batch``.

The engine is the embedded one (DuckDB, no JVM) unless ``CARDPIPE_BATCH_ENGINE=spark``, or ``auto`` (the
default) with a Spark cluster configured (``SPARK_MASTER=spark://...`` or ``SPARK_REMOTE=sc://...``);
``python batch_processor.py --engine spark`` forces Spark. Runs with any ``python3`` (see ``_seed_entry.py``).
"""

import sys

from _seed_entry import run_seed_command

if __name__ == "__main__":
    run_seed_command(["batch", *sys.argv[1:]])
