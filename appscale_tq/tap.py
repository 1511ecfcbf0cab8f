"""The twistd-facing module: command-line options and makeService."""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage

from appscale_tq.config import ConfigError, NodeConfig, check_config, load_config_file

CONFIG_ENV = "APPSCALE_TQ_CONFIG"


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT] [--amqp-url URL] [--redis-url URL]"
    longdesc = (
        "Run one appscale-tq node: an HTTP API that takes push tasks, stores them in RabbitMQ "
        "and dispatches them to each app's load balancer, with names and states in Redis. "
        "Without --config the node runs on built-in defaults: API on 127.0.0.1:17446, "
        "RabbitMQ and Redis on 127.0.0.1, one app 'default' behind http://127.0.0.1:8080."
    )
    optParameters = [
        ["config", "c", None, "Node config file (YAML)."],
        ["listen", None, None, "Twisted endpoint for the HTTP API (overrides the config)."],
        ["amqp-url", None, None, "RabbitMQ URL (overrides the config)."],
        ["redis-url", None, None, "Redis URL (overrides the config)."],
    ]

    def postOptions(self) -> None:  # noqa: N802
        try:
            config = load_config_file(self["config"]) if self["config"] else NodeConfig()
            overrides = {
                key: self[opt]
                for key, opt in (("listen", "listen"), ("amqp_url", "amqp-url"),
                                 ("redis_url", "redis-url"))
                if self[opt]
            }
            if overrides:
                config = check_config(attrs.evolve(config, **overrides))
        except ConfigError as e:
            raise usage.UsageError(f"bad config: {e}") from None
        self.node_config = config


def makeService(options: Any) -> IService:  # noqa: N802
    from twisted.internet import reactor

    from appscale_tq.service import build_service

    return build_service(options.node_config, reactor)


def options_from_env() -> Options:
    """For tq.tac: the same options, taken from $APPSCALE_TQ_CONFIG (a config file path)."""
    options = Options()
    argv = ["--config", os.environ[CONFIG_ENV]] if os.environ.get(CONFIG_ENV) else []
    options.parseOptions(argv)
    return options
