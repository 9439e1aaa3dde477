"""Settings rules that need no service: how many processes ``produce`` publishes in, and the database backend
the environment names (read before SQLAlchemy is imported, so it must agree with the parsed URL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cardpipe.config import Settings, backend_named, publishing_processes

ENVIRONMENTS = [
    {},
    {"DB_HOST": "db.example"},
    {"DB_HOST": "  "},
    {"DATABASE_URL": "sqlite:////tmp/x.db"},
    {"DATABASE_URL": "sqlite+pysqlite:///x.db", "DB_HOST": "ignored"},
    {"DATABASE_URL": "mysql+pymysql://u:p@h/db"},
    {"DATABASE_URL": "mysql://u@h/db"},
    {"DATABASE_URL": "mariadb+pymysql://u:p@h:3307/db"},
    {"DATABASE_URL": "  mysql://u@h/db "},
]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_backend_named_is_the_settings_backend(env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.from_env(env=env, results_dir=tmp_path)
    assert backend_named(env) == settings.database_url.get_backend_name()


def test_produce_publishes_in_one_process_per_core_on_sqlite_and_in_one_elsewhere(tmp_path: Path) -> None:
    assert publishing_processes(None, 4, "sqlite") == 4
    assert publishing_processes(None, 4, "mysql") == 1
    assert publishing_processes(None, 4, "mariadb") == 1
    assert publishing_processes(3, 1, "mysql") == 3  # asked for: the command says when it cannot
    sqlite = Settings.from_env(env={}, results_dir=tmp_path)
    mysql = Settings.from_env(env={"DB_HOST": "db.example"}, results_dir=tmp_path)
    assert (sqlite.publishing_processes(None, 2), mysql.publishing_processes(None, 2)) == (2, 1)
