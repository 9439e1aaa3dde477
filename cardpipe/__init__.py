"""cardpipe: a credit-card transaction pipeline in the Lambda Architecture.

Layers (each a subpackage) around a pure domain core:

* ``cardpipe.domain``        — records and business rules, exact decimal money, no I/O
* ``cardpipe.serving``       — the relational serving database (SQLAlchemy Core; SQLite or MySQL/MariaDB)
* ``cardpipe.stream``        — Kafka producer/consumer doing real-time authorization
* ``cardpipe.batch``         — the settlement: embedded DuckDB SQL, or PySpark for clusters (one set of rules)
* ``cardpipe.orchestration`` — the end-to-end commands
"""

__version__ = "0.1.0"
