"""Node configuration: frozen values, loaded from YAML and validated; pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import yaml

from appscale_tq.names import is_app_id

DEFAULT_LISTEN = "tcp:17446:interface=127.0.0.1"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_LB_URL = "http://127.0.0.1:8080"
NINE_DAYS = 9 * 86400


class ConfigError(ValueError):
    """A bad node config; the message names the key."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key


@attrs.frozen
class AppConfig:
    lb_url: str = DEFAULT_LB_URL


@attrs.frozen
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None


@attrs.frozen
class NodeConfig:
    listen: str = DEFAULT_LISTEN
    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    apps: Mapping[str, AppConfig] = attrs.field(factory=lambda: {"default": AppConfig()})
    tombstone_seconds: float = NINE_DAYS
    max_task_bytes: int = 102400
    secret: str | None = None
    # Deliveries a node holds at once per queue (AMQP prefetch) = its dispatch concurrency.
    prefetch: int = 64
    # Waits up to this long are held in memory with the delivery unacked; longer ones wait
    # in the broker's delay ladder.
    short_wait_seconds: float = 2.0
    # Bound on every Redis call and on every publish confirm, in seconds.
    redis_timeout: float = 3.0
    amqp_timeout: float = 4.0
    # Names of AMQP exchanges and queues, and of Redis keys, start with this.
    namespace: str = "tq"

    @property
    def redis(self) -> RedisAddress:
        return parse_redis_url(self.redis_url)


def parse_redis_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigError("redis_url", f"{url!r} must start with redis://")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError("redis_url", f"database {db_text!r} must be a number")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError("redis_url", f"{url!r} has a bad port") from None
    password = unquote(parts.password) if parts.password else None
    return RedisAddress(parts.hostname or "127.0.0.1", port, int(db_text), password)


def _check_amqp_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError("amqp_url", f"{url!r} must start with amqp:// or amqps://")
    try:
        parts.port
    except ValueError:
        raise ConfigError("amqp_url", f"{url!r} has a bad port") from None


def _number(key: str, value: Any, *, minimum: float, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, not {value!r}")
    if integer and value != int(value):
        raise ConfigError(key, f"must be a whole number, not {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum:g}, not {value!r}")
    return int(value) if integer else float(value)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, not {value!r}")
    return value


def _apps(value: Any) -> dict[str, AppConfig]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("apps", "must map at least one app id to its settings")
    apps: dict[str, AppConfig] = {}
    for app, settings in value.items():
        if not isinstance(app, str) or not is_app_id(app):
            raise ConfigError(f"apps.{app}", "is not a valid app id")
        settings = settings or {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"apps.{app}", "must be a mapping")
        unknown = sorted(set(settings) - {"lb_url"})
        if unknown:
            raise ConfigError(f"apps.{app}.{unknown[0]}", "unknown key; known: lb_url")
        lb_url = _string(f"apps.{app}.lb_url", settings.get("lb_url", DEFAULT_LB_URL))
        parts = urlsplit(lb_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"apps.{app}.lb_url", f"{lb_url!r} must be an http(s) URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"apps.{app}.lb_url", f"{lb_url!r} must have no path or query")
        apps[app] = AppConfig(lb_url=lb_url.rstrip("/"))
    return apps


_FIELDS = {
    "listen": lambda k, v: _string(k, v),
    "amqp_url": lambda k, v: _string(k, v),
    "redis_url": lambda k, v: _string(k, v),
    "apps": lambda k, v: _apps(v),
    "tombstone_seconds": lambda k, v: _number(k, v, minimum=1),
    "max_task_bytes": lambda k, v: _number(k, v, minimum=1, integer=True),
    "secret": lambda k, v: None if v is None else _string(k, v),
    "prefetch": lambda k, v: _number(k, v, minimum=1, integer=True),
    "short_wait_seconds": lambda k, v: _number(k, v, minimum=0),
    "redis_timeout": lambda k, v: _number(k, v, minimum=0.1),
    "amqp_timeout": lambda k, v: _number(k, v, minimum=0.1),
    "namespace": lambda k, v: _string(k, v),
}


def config_from_mapping(data: Any) -> NodeConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("(top level)", "the config must be a YAML mapping")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise ConfigError(str(key), f"unknown key; known: {', '.join(sorted(_FIELDS))}")
        values[key] = _FIELDS[key](key, value)
    config = NodeConfig(**values)
    _check_amqp_url(config.amqp_url)
    parse_redis_url(config.redis_url)
    return config


def load_config(text: str) -> NodeConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("(yaml)", f"not valid YAML: {e}") from None
    return config_from_mapping(data)


def load_config_file(path: str) -> NodeConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    return load_config(text)
