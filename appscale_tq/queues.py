"""An app's ``queue.yaml``: App Engine's whole schema, parsed and validated; pure.

App Engine's ``queueinfo.py`` is the authority; DESIGN §3 decides the rest:

* every problem in the file is reported at once, each message naming the queue and the key
  (``queue 'mail-queue': rate: '5/sec' is not N/s, N/m, N/h or N/d``); the code is
  ``INVALID_QUEUE_RATE`` when only rates are wrong, else ``INVALID_REQUEST``;
* a push queue without a rate gets App Engine's default 5/s (``rate_defaulted``) and a warning;
* the ``default`` push queue always exists (5/s, bucket 5 unless the file says otherwise);
* nothing but :class:`QueueYamlError` is ever raised for a bad file, whatever it contains.

Scalars are read as the text written (as App Engine's own YAML builder does), so ``rate: 0``
is the valid rate ``"0"``, ``rate: 5`` is the invalid rate ``"5"`` and ``bucket_size: yes`` is
not a number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs
import yaml

from appscale_tq.backoff import RETRY_KEYS, RetryOptions, retry_options_from_mapping
from appscale_tq.errors import TaskQueueError
from appscale_tq.names import QUEUE_NAME

# --- limits and defaults (App Engine's) -----------------------------------------------------

DEFAULT_QUEUE_NAME = "default"
DEFAULT_RATE_TEXT = "5/s"
DEFAULT_RATE = 5.0
DEFAULT_BUCKET_SIZE = 5
MAX_RATE = 500.0  # tokens per second
MAX_BUCKET_SIZE = 500
MAX_CONCURRENT_REQUESTS = 5000
MAX_SHOWN_ERRORS = 50  # in the message; ``QueueYamlError.errors`` has them all

TOP_LEVEL_KEYS = ("queue", "total_storage_limit", "resume_paused_queues", "application")
QUEUE_KEYS = (
    "name",
    "mode",
    "rate",
    "bucket_size",
    "max_concurrent_requests",
    "target",
    "retry_parameters",
    "acl",
)
ACL_KEYS = ("user_email", "writer_email")
# Keys a pull queue must not set (App Engine: they are push-queue elements).
PUSH_ONLY_KEYS = ("rate", "bucket_size", "max_concurrent_requests", "target")
PULL_RETRY_KEYS = ("task_retry_limit",)

RATE = re.compile(r"0|[0-9]+(\.[0-9]*)?/[smhd]", re.ASCII)
AGE_LIMIT = re.compile(r"[0-9]+(\.[0-9]*)?[smhd]", re.ASCII)
STORAGE_LIMIT = re.compile(r"([0-9]+(\.[0-9]*)?)([BKMGT]?)", re.ASCII)
# [version.]service, App Engine's _VERSION_REGEX, upper case accepted too.
TARGET = re.compile(r"((?!-)[a-zA-Z0-9-]{1,100}\.)?(?!-)[a-zA-Z0-9-]{1,63}", re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_TRUE = frozenset("y Y yes Yes YES true True TRUE on On ON".split())
_FALSE = frozenset("n N no No NO false False FALSE off Off OFF".split())


class QueueYamlError(TaskQueueError):
    """A refused ``queue.yaml``: every problem found, each naming the queue and the key."""

    def __init__(self, errors: list[str], *, rate_only: bool = False) -> None:
        shown = errors[:MAX_SHOWN_ERRORS]
        if len(errors) > len(shown):
            shown = [*shown, f"... and {len(errors) - len(shown)} more"]
        super().__init__("INVALID_QUEUE_RATE" if rate_only else "INVALID_REQUEST", "; ".join(shown))
        self.errors = list(errors)


def _acl_factory(entries: Any) -> tuple[dict[str, str], ...]:
    return tuple(dict(entry) for entry in entries)


@attrs.frozen
class QueueDef:
    """One queue of ``queue.yaml``; ``rate`` in tokens per second, None for a pull queue."""

    name: str
    mode: str = "push"
    rate: float | None = DEFAULT_RATE
    rate_text: str | None = DEFAULT_RATE_TEXT
    bucket_size: int = DEFAULT_BUCKET_SIZE
    max_concurrent_requests: int | None = None
    target: str | None = None
    retry: RetryOptions = RetryOptions()
    acl: tuple[dict[str, str], ...] = attrs.field(default=(), converter=_acl_factory)
    rate_defaulted: bool = False

    @property
    def is_pull(self) -> bool:
        return self.mode == "pull"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "rate": None if self.rate is None else float(self.rate),
            "rate_text": self.rate_text,
            "bucket_size": self.bucket_size,
            "max_concurrent_requests": self.max_concurrent_requests,
            "target": self.target,
            "retry_parameters": self.retry.as_dict(),
            "acl": [dict(entry) for entry in self.acl],
        }


DEFAULT_QUEUE = QueueDef(DEFAULT_QUEUE_NAME, rate_defaulted=True)


def _queues_factory(queues: Any) -> dict[str, QueueDef]:
    return dict(queues)


@attrs.frozen
class QueueConfig:
    """An app's queues (in file order; ``default`` always there) and top-level settings."""

    queues: Mapping[str, QueueDef] = attrs.field(
        factory=lambda: {DEFAULT_QUEUE_NAME: DEFAULT_QUEUE}, converter=_queues_factory
    )
    total_storage_limit: int | None = None  # bytes
    resume_paused_queues: bool | None = None
    warnings: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queues": [queue.as_dict() for queue in self.queues.values()],
            "total_storage_limit": self.total_storage_limit,
            "resume_paused_queues": self.resume_paused_queues,
            "warnings": list(self.warnings),
        }


DEFAULT_CONFIG = QueueConfig()


# --- value grammars ---------------------------------------------------------------------------


def rate_per_second(text: str) -> float:
    """``N/s``, ``N/m``, ``N/h``, ``N/d`` or ``0`` as tokens per second; ValueError otherwise."""
    if not isinstance(text, str) or not RATE.fullmatch(text):
        raise ValueError(f"{_show(text)} is not N/s, N/m, N/h or N/d")
    if text == "0":
        return 0.0
    number, unit = text.split("/")
    value = float(number) / _UNIT_SECONDS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{_show(text)} is too large")
    return value


def age_limit_seconds(text: str) -> float:
    """``task_age_limit`` (``N`` then s, m, h or d) in whole seconds, as App Engine truncates.

    ValueError for anything else, and for a limit under one second (App Engine: must be > 0).
    """
    if not isinstance(text, str) or not AGE_LIMIT.fullmatch(text.strip()):
        raise ValueError(f"{_show(text)} is not a number followed by s, m, h or d")
    text = text.strip()
    value = float(text[:-1]) * _UNIT_SECONDS[text[-1]]
    if not math.isfinite(value):
        raise ValueError(f"{_show(text)} is too large")
    seconds = float(math.floor(value))
    if seconds <= 0:
        raise ValueError(f"{_show(text)} must be at least 1 s")
    return seconds


def storage_limit_bytes(text: str) -> int:
    """``total_storage_limit``: a number with an optional B, K, M, G or T (powers of 1024)."""
    if not isinstance(text, str):
        raise ValueError(f"{_show(text)} is not a size")
    match = STORAGE_LIMIT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{_show(text)} is not a number followed by B, K, M, G or T")
    number, fraction, unit = match.groups()
    if not unit and fraction:
        raise ValueError(f"{_show(text)}: fractional bytes (add a unit: B, K, M, G or T)")
    value = float(number) * _BYTE_UNITS[unit]
    if not math.isfinite(value) or value > 2**63 - 1:
        raise ValueError(f"{_show(text)} is too large")
    return int(value) if fraction else int(number) * _BYTE_UNITS[unit]


def _show(value: object) -> str:
    """A value for a message: short, and never the repr of a big (or aliased) structure."""
    if isinstance(value, str):
        shown = repr(value)
        return shown if len(shown) <= 60 else shown[:57] + "...'"
    if value is None or isinstance(value, (bool, int, float)):
        shown = repr(value)
        return shown if len(shown) <= 60 else shown[:57] + "..."
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


# --- YAML -------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML where plain scalars stay text (only null is recognised) and keys are unique."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping node, but found {node.id}", node.start_mark
            )
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable) or isinstance(key, (list, dict, set)):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found an unhashable key",
                    key_node.start_mark,
                )
            try:
                duplicate = key in mapping
            except TypeError:  # a tuple/frozenset holding something unhashable
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found an unhashable key",
                    key_node.start_mark,
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {_show(key)}", key_node.start_mark,
                )
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


def _load(text: object) -> object:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            why = f"queue.yaml: not UTF-8 ({e.reason} at byte {e.start})"
            raise QueueYamlError([why]) from None
    if not isinstance(text, str):
        raise QueueYamlError([f"queue.yaml: must be text, not {_show(text)}"])
    loader = None
    try:
        loader = _Loader(text)
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise QueueYamlError([f"queue.yaml: not valid YAML: {_one_line(str(e))}"]) from None
    except RecursionError:
        raise QueueYamlError(["queue.yaml: nested too deeply"]) from None
    except Exception as e:  # e.g. ValueError from an explicit ``!!int x`` tag
        raise QueueYamlError([f"queue.yaml: not valid YAML: {_one_line(str(e))}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= 300 else message[:297] + "..."


# --- parsing ----------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.rate_only = True
        self.warnings: list[str] = []

    def add(self, message: str, *, rate: bool = False) -> None:
        self.errors.append(message)
        self.rate_only = self.rate_only and rate


def _integer(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value) and len(value) <= 30:
        return int(value)
    raise ValueError(f"{_show(value)} is not a whole number")


def _decimal(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a number")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{_show(value)} is too large") from None
    elif isinstance(value, str) and _DECIMAL.fullmatch(value) and len(value) <= 400:
        number = float(value)
    else:
        raise ValueError(f"{_show(value)} is not a number")
    if not math.isfinite(number):
        raise ValueError(f"{_show(value)} is not a finite number")
    return number


def _bounded_int(value: object, lo: int, hi: int) -> int:
    number = _integer(value)
    if not lo <= number <= hi:
        raise ValueError(f"{_show(value)} must be between {lo} and {hi}")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _TRUE:
        return True
    if isinstance(value, str) and value in _FALSE:
        return False
    raise ValueError(f"{_show(value)} is not true or false")


def _retry(where: str, data: object, mode: str, problems: _Problems) -> RetryOptions:
    if data is None:
        return RetryOptions()
    if not isinstance(data, Mapping):
        problems.add(f"{where}: retry_parameters: must be a mapping, not {_show(data)}")
        return RetryOptions()
    values: dict[str, float | int] = {}
    ok = True
    for key, value in data.items():
        field = f"{where}: retry_parameters.{key}" if isinstance(key, str) else where
        if key not in RETRY_KEYS:
            problems.add(
                f"{where}: retry_parameters: unknown key {_show(key)}; "
                f"known: {', '.join(RETRY_KEYS)}"
            )
            ok = False
            continue
        if mode == "pull" and key not in PULL_RETRY_KEYS:
            problems.add(f"{field}: not allowed on a pull queue (only task_retry_limit is)")
            ok = False
            continue
        if value is None:
            continue
        try:
            if key == "task_age_limit":
                if isinstance(value, str):
                    values[key] = age_limit_seconds(value)
                else:
                    raise ValueError(f"{_show(value)} is not a number followed by s, m, h or d")
            elif key in ("task_retry_limit", "max_doublings"):
                values[key] = _integer(value)
            else:
                values[key] = _decimal(value)
        except ValueError as e:
            problems.add(f"{field}: {e}")
            ok = False
            continue
        try:  # backoff's own rules for each value (not negative, not absurdly large)
            retry_options_from_mapping({key: values[key]}, field=f"{where}: retry_parameters")
        except TaskQueueError as e:
            problems.add(e.message)
            ok = False
    if not ok:
        return RetryOptions()
    try:
        return retry_options_from_mapping(values, field=f"{where}: retry_parameters")
    except TaskQueueError as e:
        problems.add(e.message)
        return RetryOptions()


def _acl(where: str, data: object, problems: _Problems) -> tuple[dict[str, str], ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.add(f"{where}: acl: must be a list, not {_show(data)}")
        return ()
    entries: list[dict[str, str]] = []
    for index, entry in enumerate(data, 1):
        field = f"{where}: acl #{index}"
        if not isinstance(entry, Mapping) or not entry:
            problems.add(f"{field}: must be a mapping with user_email or writer_email")
            continue
        good: dict[str, str] = {}
        for key, value in entry.items():
            if key not in ACL_KEYS:
                problems.add(f"{field}: unknown key {_show(key)}; known: {', '.join(ACL_KEYS)}")
            elif not isinstance(value, str) or not value.strip():
                problems.add(f"{field}: {key}: must be an email address, not {_show(value)}")
            else:
                good[key] = value
        if len(good) == len(entry):
            entries.append(good)
    return tuple(entries)


def _queue(
    index: int,
    entry: object,
    *,
    max_rate: float,
    known_targets: Callable[[str], bool] | None,
    problems: _Problems,
) -> QueueDef | None:
    if not isinstance(entry, Mapping):
        problems.add(f"queue #{index}: must be a mapping with a name, not {_show(entry)}")
        return None
    start = len(problems.errors)
    name = entry.get("name")
    if isinstance(name, str) and QUEUE_NAME.fullmatch(name):
        where = f"queue {name!r}"
    else:
        where = f"queue #{index}"
        if name is None:
            problems.add(f"{where}: name: required")
        else:
            problems.add(f"{where}: name: {_show(name)} must match ^[a-zA-Z0-9-]{{1,100}}$")
    for key in entry:
        if key not in QUEUE_KEYS:
            problems.add(f"{where}: unknown key {_show(key)}; known: {', '.join(QUEUE_KEYS)}")

    mode = entry.get("mode")
    if mode is None:
        mode = "push"
    elif mode not in ("push", "pull"):
        problems.add(f"{where}: mode: {_show(mode)} must be push or pull")
        mode = "push"
    if mode == "pull":
        if name == DEFAULT_QUEUE_NAME:
            problems.add(f"{where}: mode: the default queue must be a push queue")
        for key in PUSH_ONLY_KEYS:
            if entry.get(key) is not None:
                problems.add(f"{where}: {key}: not allowed on a pull queue")

    rate: float | None = None
    rate_text: str | None = None
    rate_defaulted = False
    if mode == "push":
        raw = entry.get("rate")
        if raw is None:
            rate, rate_text, rate_defaulted = DEFAULT_RATE, DEFAULT_RATE_TEXT, True
            problems.warnings.append(
                f"{where}: no rate given, using the default {DEFAULT_RATE_TEXT}"
            )
        else:
            try:
                rate = rate_per_second(raw)  # type: ignore[arg-type]
                rate_text = raw  # type: ignore[assignment]
                if rate > max_rate:
                    problems.add(
                        f"{where}: rate: {_show(raw)} is above the maximum {max_rate:g}/s",
                        rate=True,
                    )
            except ValueError as e:
                problems.add(f"{where}: rate: {e}", rate=True)

    bucket_size = DEFAULT_BUCKET_SIZE
    max_concurrent: int | None = None
    target: str | None = None
    if mode == "push":
        if entry.get("bucket_size") is not None:
            try:
                bucket_size = _bounded_int(entry["bucket_size"], 1, MAX_BUCKET_SIZE)
            except ValueError as e:
                problems.add(f"{where}: bucket_size: {e}")
        if entry.get("max_concurrent_requests") is not None:
            try:
                max_concurrent = _bounded_int(
                    entry["max_concurrent_requests"], 1, MAX_CONCURRENT_REQUESTS
                )
            except ValueError as e:
                problems.add(f"{where}: max_concurrent_requests: {e}")
        raw_target = entry.get("target")
        if raw_target is not None:
            if not isinstance(raw_target, str) or not TARGET.fullmatch(raw_target):
                problems.add(
                    f"{where}: target: {_show(raw_target)} is not [version.]service "
                    "(letters, digits and hyphens)"
                )
            elif known_targets is not None and not known_targets(raw_target):
                problems.add(f"{where}: target: unknown target {raw_target!r}")
            else:
                target = raw_target

    retry = _retry(where, entry.get("retry_parameters"), mode, problems)
    acl = _acl(where, entry.get("acl"), problems)
    if acl and mode == "push":
        problems.warnings.append(f"{where}: acl applies to pull queues only; ignored")

    if len(problems.errors) > start:
        return None
    return QueueDef(
        name=name,  # type: ignore[arg-type]
        mode=mode,
        rate=rate,
        rate_text=rate_text,
        bucket_size=bucket_size,
        max_concurrent_requests=max_concurrent,
        target=target,
        retry=retry,
        acl=acl,
        rate_defaulted=rate_defaulted,
    )


def parse_queue_yaml(
    text: str,
    *,
    max_rate: float = MAX_RATE,
    known_targets: Callable[[str], bool] | None = None,
) -> QueueConfig:
    """Parse and validate an app's ``queue.yaml``; QueueYamlError lists every problem."""
    data = _load(text)
    if data is None:
        return DEFAULT_CONFIG
    if not isinstance(data, Mapping):
        raise QueueYamlError(
            [f"queue.yaml: must be a mapping with a 'queue' list, not {_show(data)}"]
        )
    problems = _Problems()
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.add(
                f"queue.yaml: unknown top-level key {_show(key)}; "
                f"known: queue, total_storage_limit, resume_paused_queues"
            )

    storage: int | None = None
    if data.get("total_storage_limit") is not None:
        raw = data["total_storage_limit"]
        try:
            if isinstance(raw, int) and not isinstance(raw, bool):
                raw = str(raw)
            storage = storage_limit_bytes(raw)  # type: ignore[arg-type]
        except ValueError as e:
            problems.add(f"queue.yaml: total_storage_limit: {e}")

    resume: bool | None = None
    if data.get("resume_paused_queues") is not None:
        try:
            resume = _boolean(data["resume_paused_queues"])
        except ValueError as e:
            problems.add(f"queue.yaml: resume_paused_queues: {e}")

    if data.get("application") is not None:
        if isinstance(data["application"], str):
            problems.warnings.append("queue.yaml: application: ignored (the API names the app)")
        else:
            problems.add(f"queue.yaml: application: {_show(data['application'])} is not a name")

    entries = data.get("queue")
    queues: dict[str, QueueDef] = {}
    if entries is not None and not isinstance(entries, list):
        problems.add(f"queue.yaml: queue: must be a list of queues, not {_show(entries)}")
        entries = None
    seen: set[str] = set()
    for index, entry in enumerate(entries or (), 1):
        queue = _queue(
            index, entry, max_rate=max_rate, known_targets=known_targets, problems=problems
        )
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if isinstance(name, str) and QUEUE_NAME.fullmatch(name):
            if name in seen:
                problems.add(f"queue {name!r}: name: defined more than once")
            seen.add(name)
        if queue is not None and queue.name not in queues:
            queues[queue.name] = queue

    if problems.errors:
        raise QueueYamlError(problems.errors, rate_only=problems.rate_only)
    if DEFAULT_QUEUE_NAME not in queues:
        queues = {DEFAULT_QUEUE_NAME: DEFAULT_QUEUE, **queues}
    return QueueConfig(
        queues=queues,
        total_storage_limit=storage,
        resume_paused_queues=resume,
        warnings=tuple(problems.warnings),
    )
