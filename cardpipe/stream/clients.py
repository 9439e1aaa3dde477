"""What every Kafka client of this process is configured with beyond its own settings.

A real cluster needs security settings (``security.protocol``, SASL, SSL...) on every client: the consumer,
the producer, the admin client and the short-lived clients that read offsets. They come from the
environment (:func:`cardpipe.config.kafka_client_settings`) and are set once per process
(:func:`use_client_settings`: by the command's runtime, and by each child process from the settings it gets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_client_settings: dict[str, str] = {}


def use_client_settings(settings: Mapping[str, str]) -> None:
    """Give every Kafka client created from now on in this process ``settings`` (librdkafka keys)."""
    _client_settings.clear()
    _client_settings.update(settings)


def client_config(
    bootstrap_servers: str, config: Mapping[str, Any], client_settings: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A client's configuration: its own ``config`` on ``bootstrap_servers``, then the client settings (which win:
    a cluster's security settings apply to every client): ``client_settings``, else the process's."""
    return {
        **config,
        "bootstrap.servers": bootstrap_servers,
        **(_client_settings if client_settings is None else client_settings),
    }
