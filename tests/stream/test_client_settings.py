"""Kafka client settings passed through from the environment, and the topics' replication factor."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cardpipe.config import Settings, kafka_client_settings
from cardpipe.errors import ConfigError
from cardpipe.stream.broker import broker_session
from cardpipe.stream.clients import client_config, use_client_settings
from cardpipe.stream.producer import PRODUCER_DEFAULTS, producer_setting
from tests.orchestration.helpers import REPO_ROOT, env_without_services


def test_every_kafka_setting_but_cardpipes_own_is_the_clients():
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k1:9092",
        "KAFKA_TOPIC": "t",
        "KAFKA_PARTITIONS": "4",
        "KAFKA_GROUP_ID": "g",
        "KAFKA_REPLICATION_FACTOR": "3",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
        "KAFKA_CLIENT_ID": "",  # empty: not set
        "NOT_KAFKA_X": "1",
    }
    assert kafka_client_settings(env) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "ssl.ca.location": "/etc/ca.pem",
    }
    settings = Settings.from_env(env=env, load_dotenv_file=False)
    assert settings.kafka_client_in_use == kafka_client_settings(env)
    assert settings.topic_replication_factor == 3
    embedded = Settings.from_env(env={"KAFKA_SECURITY_PROTOCOL": "SSL"}, load_dotenv_file=False)
    assert embedded.kafka_client_in_use == {} and embedded.topic_replication_factor == 1
    assert Settings.from_env(env=env | {"KAFKA_REPLICATION_FACTOR": ""}).topic_replication_factor == -1


def test_a_bad_replication_factor_is_a_configuration_error():
    with pytest.raises(ConfigError, match="KAFKA_REPLICATION_FACTOR must be an integer"):
        Settings.from_env(env={"KAFKA_REPLICATION_FACTOR": "three"}, load_dotenv_file=False)


def test_client_settings_win_over_a_clients_own():
    try:
        use_client_settings({"security.protocol": "SSL", "client.id": "x"})
        assert client_config("b:1", {"client.id": "own", "acks": "all"}) == {
            "reconnect.backoff.ms": 10,
            "client.id": "x",
            "acks": "all",
            "bootstrap.servers": "b:1",
            "security.protocol": "SSL",
        }
    finally:
        use_client_settings({})


def test_every_client_starts_from_the_defaults_which_its_own_and_the_client_settings_override():
    """``reconnect.backoff.ms`` 10 (CLIENT_DEFAULTS): a client's first metadata request waits 11 ms at most for a
    broker to be chosen, not librdkafka's 50; a client's own value or a cluster's client settings win."""
    assert client_config("b:1", {})["reconnect.backoff.ms"] == 10
    assert client_config("b:1", {"reconnect.backoff.ms": 250})["reconnect.backoff.ms"] == 250
    assert client_config("b:1", {}, {"reconnect.backoff.ms": "500"})["reconnect.backoff.ms"] == "500"


@pytest.mark.kafka
def test_the_settings_reach_the_kafka_client(tmp_path):
    """A setting the client refuses proves it got there: one line naming it, exit 2."""
    with broker_session(None, tmp_path / "broker") as broker:
        env = env_without_services(
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            KAFKA_SECURITY_PROTOCOL="carrier-pigeon",
            PYTHONPATH=str(REPO_ROOT),
        )
        for step in ("setup", "load"):  # no Kafka client: the setting is not looked at
            proc = subprocess.run(
                [sys.executable, "-m", "cardpipe", step, "--results-dir", str(tmp_path / "r")],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cardpipe",
                "produce",
                "--from-csv",
                str(REPO_ROOT / "cardpipe/sample_data/transactions.csv"),
                "--results-dir",
                str(tmp_path / "r"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "security.protocol" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_producers_setting_is_the_client_settings_else_its_default():
    """:func:`producer_setting` applies :func:`client_config`'s precedence to the producer's defaults, whatever
    the process's own client settings are."""
    use_client_settings({"partitioner": "random"})  # the process's: not the ones asked about
    try:
        assert producer_setting("partitioner", {}) == PRODUCER_DEFAULTS["partitioner"] == "murmur2_random"
        assert producer_setting("partitioner", {"partitioner": "consistent"}) == "consistent"
        assert producer_setting("acks", {"security.protocol": "SSL"}) == "all"
        assert producer_setting("client.id", {}) is None
    finally:
        use_client_settings({})
