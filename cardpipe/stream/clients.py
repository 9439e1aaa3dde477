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

#: What every client starts from, under its own configuration. librdkafka waits at least half of
#: ``reconnect.backoff.ms`` (100 ms by default) between two choices of a broker for its cluster requests, and at a
#: client's start several requests choose one (the leader query, a consumer's coordinator lookup, the first metadata
#: request): one that comes within that interval of another could wait 50 ms for its answer. At 10 ms the wait is 11 ms
#: at most. Reconnecting to a lost broker still backs off exponentially, up to ``reconnect.backoff.max.ms``.
CLIENT_DEFAULTS: dict[str, Any] = {"reconnect.backoff.ms": 10}


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
        **CLIENT_DEFAULTS,
        **config,
        "bootstrap.servers": bootstrap_servers,
        **(_client_settings if client_settings is None else client_settings),
    }
