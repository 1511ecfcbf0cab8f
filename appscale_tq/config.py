"""Node configuration: frozen values, loaded from YAML and validated; pure."""

from __future__ import annotations

import math
import re
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
# Upper bounds: a bigger value is a typo, and some would break a library much later (AMQP's
# prefetch count is 16 bits; RabbitMQ's default max_message_size is 128 MiB; Redis expiries
# and twisted timers want finite numbers; a delivery held unacked for long meets RabbitMQ's
# consumer_timeout, DESIGN invariant 5).
MAX_SECONDS = 1e9
MAX_TASK_BYTES = 64 * 1024 * 1024
MAX_PREFETCH = 65535
MAX_SHORT_WAIT = 60.0
MAX_TIMEOUT = 3600.0
# Prefix of AMQP names and Redis keys; AMQP reserves names that start with "amq.".
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


class ConfigError(ValueError):
    """A bad node config; the message names the key."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key


@attrs.frozen
class AppConfig:
    lb_url: str = DEFAULT_LB_URL
    # queue.yaml "target: [version.]service" -> that service's load balancer on this node
    targets: Mapping[str, str] = attrs.field(factory=dict)
    # a queue.yaml file deployed for the app when the node starts
    queue_yaml: str | None = None
    # an endpoint of the App Engine SDK protocol for this app alone (the port tells the app)
    sdk_listen: str | None = None


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
    # App Engine caps a queue's rate at 500/s; operators may raise the cap.
    max_queue_rate: float = 500.0
    # Log every API request (twisted.web's access log); costs a few % of CPU at high rates.
    access_log: bool = False
    # Accept AppScale's legacy "POST /" calls that name their app in an AppData header.
    trust_appdata: bool = False
    # How often a node looks for a new queue.yaml deployment or paused queues.
    queue_poll_seconds: float = 1.0

    @property
    def redis(self) -> RedisAddress:
        return parse_redis_url(self.redis_url)


def parse_redis_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigError("redis_url", f"{url!r} must start with redis://")
    db_text = parts.path.strip("/") or "0"
    if not (db_text.isascii() and db_text.isdigit()):
        raise ConfigError("redis_url", f"database {db_text!r} must be a number")
    port = _port("redis_url", url, parts)
    port = 6379 if port is None else port
    password = unquote(parts.password) if parts.password else None
    return RedisAddress(parts.hostname or "127.0.0.1", port, int(db_text), password)


def _check_amqp_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError("amqp_url", f"{url!r} must start with amqp:// or amqps://")
    _port("amqp_url", url, parts)


def _port(key: str, url: str, parts: Any) -> int | None:
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, f"{url!r} has a bad port") from None
    if port == 0:
        raise ConfigError(key, f"{url!r} has a bad port")
    return port


def _number(
    key: str, value: Any, *, minimum: float, maximum: float, integer: bool = False
) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, not {value!r}")
    if integer and value != int(value):
        raise ConfigError(key, f"must be a whole number, not {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum:g}, not {value!r}")
    if value > maximum:
        raise ConfigError(key, f"must be at most {maximum:g}, not {str(value)[:40]}")
    return int(value) if integer else float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {value!r}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, not {value!r}")
    return value


_TARGET = re.compile(r"[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})?", re.ASCII)


def _lb_url(key: str, value: Any) -> str:
    lb_url = _string(key, value)
    parts = urlsplit(lb_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{lb_url!r} must be an http(s) URL")
    _port(key, lb_url, parts)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"{lb_url!r} must have no path or query")
    return lb_url.rstrip("/")


def _apps(value: Any) -> dict[str, AppConfig]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("apps", "must map at least one app id to its settings")
    apps: dict[str, AppConfig] = {}
    for app, settings in value.items():
        if not isinstance(app, str) or not is_app_id(app):
            raise ConfigError(f"apps.{app}", "is not a valid app id")
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"apps.{app}", "must be a mapping")
        known = ("lb_url", "targets", "queue_yaml", "sdk_listen")
        unknown = sorted(str(k) for k in settings if k not in known)  # YAML keys: any type
        if unknown:
            raise ConfigError(f"apps.{app}.{unknown[0]}", f"unknown key; known: {', '.join(known)}")
        lb_url = _lb_url(f"apps.{app}.lb_url", settings.get("lb_url", DEFAULT_LB_URL))
        targets = settings.get("targets") or {}
        if not isinstance(targets, Mapping):
            raise ConfigError(f"apps.{app}.targets", "must map [version.]service to a URL")
        checked_targets = {}
        for target, url in targets.items():
            key = f"apps.{app}.targets.{target}"
            if not isinstance(target, str) or not _TARGET.fullmatch(target):
                raise ConfigError(key, "is not a [version.]service name")
            checked_targets[target] = _lb_url(key, url)
        queue_yaml = settings.get("queue_yaml")
        if queue_yaml is not None:
            queue_yaml = _string(f"apps.{app}.queue_yaml", queue_yaml)
        sdk_listen = settings.get("sdk_listen")
        if sdk_listen is not None:
            sdk_listen = _string(f"apps.{app}.sdk_listen", sdk_listen)
        apps[app] = AppConfig(lb_url=lb_url, targets=checked_targets, queue_yaml=queue_yaml,
                              sdk_listen=sdk_listen)
    return apps


_FIELDS = {
    "listen": lambda k, v: _string(k, v),
    "amqp_url": lambda k, v: _string(k, v),
    "redis_url": lambda k, v: _string(k, v),
    "apps": lambda k, v: _apps(v),
    "tombstone_seconds": lambda k, v: _number(k, v, minimum=1, maximum=MAX_SECONDS),
    "max_task_bytes": lambda k, v: _number(
        k, v, minimum=1, maximum=MAX_TASK_BYTES, integer=True
    ),
    "secret": lambda k, v: None if v is None else _string(k, v),
    "prefetch": lambda k, v: _number(k, v, minimum=1, maximum=MAX_PREFETCH, integer=True),
    "short_wait_seconds": lambda k, v: _number(k, v, minimum=0, maximum=MAX_SHORT_WAIT),
    "redis_timeout": lambda k, v: _number(k, v, minimum=0.1, maximum=MAX_TIMEOUT),
    "amqp_timeout": lambda k, v: _number(k, v, minimum=0.1, maximum=MAX_TIMEOUT),
    "namespace": lambda k, v: _namespace(k, v),
    "max_queue_rate": lambda k, v: _number(k, v, minimum=0.001, maximum=1e6),
    "trust_appdata": lambda k, v: _bool(k, v),
    "access_log": lambda k, v: _bool(k, v),
    "queue_poll_seconds": lambda k, v: _number(k, v, minimum=0.05, maximum=60),
}


def _namespace(key: str, value: Any) -> str:
    value = _string(key, value)
    if not _NAMESPACE.fullmatch(value) or value == "amq" or value.startswith("amq."):
        raise ConfigError(
            key, f"{value[:80]!r} must match ^[A-Za-z0-9_.-]{{1,64}}$ and not start with 'amq.'"
        )
    return value


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
    return check_config(NodeConfig(**values))


def check_config(config: NodeConfig) -> NodeConfig:
    """The checks that span keys, for a config however it was made."""
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
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not UTF-8 text") from None
    return load_config(text)
