"""Acceptance: bad configuration gets a clear one-line error, not a traceback."""

import shutil

import pytest

from tests.orchestration.helpers import cardpipe, env_without_services


def assert_one_line_error(proc, *fragments: str, secret: str | None = None) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cardpipe: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if secret:
        assert secret not in proc.stderr and secret not in proc.stdout
    return lines[0]


def test_database_unreachable(tmp_path):
    env = env_without_services(DB_HOST="127.0.0.1", DB_PORT="1", DB_USER="u", DB_PASSWORD="pw-not-shown")
    proc = cardpipe(["setup", "--results-dir", str(tmp_path)], env, check=False)
    assert_one_line_error(proc, "cannot connect", "127.0.0.1:1", secret="pw-not-shown")


@pytest.mark.mysql
def test_wrong_database_password(tmp_path, mysql_env):
    env = env_without_services(**{**mysql_env, "DB_PASSWORD": "wrong-pw-not-shown"})
    proc = cardpipe(["setup", "--results-dir", str(tmp_path)], env, check=False)
    assert_one_line_error(proc, "access denied", secret="wrong-pw-not-shown")


@pytest.mark.kafka
def test_broker_unreachable(tmp_path, seed_dataset):
    env = env_without_services(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    cardpipe(["setup", "--results-dir", str(tmp_path)], env)
    cardpipe(["load", "--results-dir", str(tmp_path), "--data-dir", str(seed_dataset / "input")], env)
    proc = cardpipe(["produce", "--results-dir", str(tmp_path)], env, check=False, timeout=120)
    assert_one_line_error(proc, "127.0.0.1:1", "unreachable")


def test_missing_data_folder(tmp_path):
    proc = cardpipe(
        ["run", "--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r")],
        env_without_services(),
        check=False,
    )
    assert_one_line_error(proc, "nowhere", "does not exist")


def test_csv_with_a_missing_column(tmp_path, seed_dataset):
    data = tmp_path / "data"
    shutil.copytree(seed_dataset / "input", data)
    text = (data / "customers.csv").read_text().replace("credit_score,", "score,", 1)
    (data / "customers.csv").write_text(text)
    proc = cardpipe(
        ["load", "--data-dir", str(data), "--results-dir", str(tmp_path / "r")], env_without_services(), check=False
    )
    assert_one_line_error(proc, "customers.csv", "missing column(s) credit_score")


def test_bad_setting_value(tmp_path):
    proc = cardpipe(
        ["setup", "--results-dir", str(tmp_path)], env_without_services(KAFKA_PARTITIONS="many"), check=False
    )
    assert_one_line_error(proc, "KAFKA_PARTITIONS must be an integer")
