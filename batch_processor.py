"""Seed command: settle the stream results and publish the batch results. Same as ``cardpipe batch``.

The engine is the embedded one (DuckDB, no JVM) unless ``CARDPIPE_BATCH_ENGINE=spark``, or ``auto`` (the
default) with a Spark cluster configured (``SPARK_MASTER=spark://...`` or ``SPARK_REMOTE=sc://...``);
``python batch_processor.py --engine spark`` forces Spark.
"""

import sys

from cardpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
