"""The Task value, its validation from API requests, and its wire form as AMQP headers; pure."""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from appscale_tq.backoff import NO_OPTIONS, RetryOptions, retry_options_from_mapping
from appscale_tq.errors import TaskQueueError, invalid
from appscale_tq.names import check_task_name, generate_task_name, new_token

MAX_ETA_SECONDS = 30 * 86400
MAX_URL_LENGTH = 2083
MIN_DEADLINE = 15.0
MAX_DEADLINE = 86400.0
DEFAULT_DEADLINE = 600.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16384
METHODS = ("POST", "GET", "HEAD", "PUT", "DELETE")
BODYLESS_METHODS = ("GET", "HEAD", "DELETE")
REQUEST_KEYS = frozenset(
    {
        "name",
        "url",
        "method",
        "headers",
        "payload",
        "payload_base64",
        "countdown",
        "eta",
        "retry_options",
        "dispatch_deadline",
    }
)
# Headers a caller may not set: the dispatcher owns them.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
RESERVED_PREFIX = "x-appengine-"
# date, 'T' (or a space), time with optional fraction, optional offset (none = UTC)
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([+-]\d{2}:\d{2})?", re.ASCII
)
_URL = re.compile(r"/[!-~]*", re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
# RFC 9110 field values: no control characters but HTAB; no lone surrogates (they cannot be
# encoded when the dispatcher sends the request, so they would fail every attempt).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


@attrs.frozen
class Task:
    """One push task, as stored in the broker and dispatched to the load balancer."""

    app: str
    queue: str
    name: str
    url: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    payload: bytes = b""
    eta: float = 0.0
    created: float = 0.0
    tid: str = ""  # unique per enqueue: tells this task from an earlier one of the same name
    retry_count: int = 0
    execution_count: int = 0
    first_attempt: float | None = None
    gen: int = 0  # the queue's purge generation at enqueue: a later purge makes the task moot
    retry: RetryOptions = NO_OPTIONS
    deadline: float = DEFAULT_DEADLINE
    previous_response: int | None = None
    retry_reason: str | None = None

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


@attrs.frozen
class Limits:
    max_task_bytes: int = 102400
    default_deadline: float = DEFAULT_DEADLINE


def rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_eta(value: object, field: str = "eta") -> float:
    """RFC 3339 (a naive one is UTC) or epoch seconds, to epoch seconds.

    A time before 1970 is in the past like any other: it comes back as 0.0, which the caller
    turns into "now" (DESIGN §3: past ETA = now).
    """
    if isinstance(value, bool):
        raise TaskQueueError("INVALID_ETA", f"{field}: must be RFC 3339 or epoch seconds")
    if isinstance(value, (int, float)):
        seconds = _finite(field, value, "INVALID_ETA")
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            if not _RFC3339.fullmatch(text):
                raise ValueError(text)
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise TaskQueueError(
                "INVALID_ETA", f"{field}: {value[:60]!r} is not RFC 3339 or epoch seconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        seconds = moment.timestamp()
    else:
        raise TaskQueueError("INVALID_ETA", f"{field}: must be RFC 3339 or epoch seconds")
    if not math.isfinite(seconds):
        raise TaskQueueError("INVALID_ETA", f"{field}: must be a finite time")
    return max(seconds, 0.0)


def check_url(url: object, field: str = "url") -> str:
    if not isinstance(url, str):
        raise TaskQueueError("INVALID_URL", f"{field}: must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise TaskQueueError("INVALID_URL", f"{field}: longer than {MAX_URL_LENGTH} characters")
    if not _URL.fullmatch(url) or url.startswith("//") or "#" in url or "\\" in url:
        raise TaskQueueError(
            "INVALID_URL",
            f"{field}: {url[:80]!r} must be a relative path starting with a single '/', "
            "in printable ASCII, without a fragment",
        )
    return url


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        pairs: Sequence[Any] = list(value.items())
    elif isinstance(value, list):
        pairs = value
    else:
        raise invalid("headers", "must be an object or a list of [name, value] pairs")
    if len(pairs) > MAX_HEADERS:
        raise invalid("headers", f"more than {MAX_HEADERS} headers")
    kept: list[tuple[str, str]] = []
    size = 0
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise invalid("headers", "each header must be a [name, value] pair")
        key, val = pair
        if not isinstance(key, str) or not _TOKEN.fullmatch(key):
            raise invalid("headers", f"{str(key)[:60]!r} is not a valid header name")
        if not isinstance(val, str) or _BAD_VALUE.search(val):
            raise invalid(
                f"headers.{key}",
                "value must be a string without control characters (CR, LF, NUL, ...)",
            )
        lowered = key.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_PREFIX):
            continue  # set by the dispatcher, never by the caller
        size += len(key) + len(val)
        kept.append((key, val))
    if size > MAX_HEADER_BYTES:
        raise invalid("headers", f"larger than {MAX_HEADER_BYTES} bytes in all")
    return tuple(kept)


def _payload(body: Mapping[str, Any]) -> bytes:
    if "payload" in body and "payload_base64" in body:
        raise invalid("payload", "give payload or payload_base64, not both")
    if body.get("payload") is not None:
        if not isinstance(body["payload"], str):
            raise invalid("payload", "must be a string (use payload_base64 for bytes)")
        try:
            return body["payload"].encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("payload", "is not valid Unicode text (lone surrogate); "
                          "use payload_base64 for bytes") from None
    if body.get("payload_base64") is not None:
        raw = body["payload_base64"]
        if not isinstance(raw, str):
            raise invalid("payload_base64", "must be a base64 string")
        try:
            return base64.b64decode(raw.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise invalid("payload_base64", "is not valid base64") from None
    return b""


def _eta(body: Mapping[str, Any], now: float) -> float:
    if body.get("countdown") is not None and body.get("eta") is not None:
        raise invalid("countdown", "give countdown or eta, not both")
    if body.get("countdown") is not None:
        countdown = _finite("countdown", body["countdown"], "INVALID_ETA")
        # compare the countdown itself: (now + countdown) - now can round above the limit
        ahead, eta, field = countdown, now + max(0.0, countdown), "countdown"
    elif body.get("eta") is not None:
        eta = max(parse_eta(body["eta"]), now)
        ahead, field = eta - now, "eta"
    else:
        return now
    if ahead > MAX_ETA_SECONDS:
        raise TaskQueueError(
            "INVALID_ETA", f"{field}: more than 30 days ({MAX_ETA_SECONDS} s) in the future"
        )
    return eta


def _finite(field: str, value: object, code: str = "INVALID_REQUEST") -> float:
    """A JSON number as a finite float, or the error naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TaskQueueError(code, f"{field}: must be a number of seconds")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise TaskQueueError(code, f"{field}: must be a finite number of seconds")
    return number


def _deadline(value: object, default: float) -> float:
    if value is None:
        return default
    value = _finite("dispatch_deadline", value)
    if not MIN_DEADLINE <= value <= MAX_DEADLINE:
        raise invalid(
            "dispatch_deadline", f"must be between {MIN_DEADLINE:g} and {MAX_DEADLINE:g} seconds"
        )
    return float(value)


def task_from_request(
    app: str,
    queue: str,
    body: object,
    now: float,
    limits: Limits = Limits(),
    token: Callable[[], str] = new_token,
) -> tuple[Task, bool]:
    """Validate one JSON task request; returns the Task and whether its name was generated."""
    if not isinstance(body, Mapping):
        raise invalid("task", "must be a JSON object")
    unknown = sorted(str(k) for k in body if k not in REQUEST_KEYS)
    if unknown:
        raise invalid(unknown[0], f"unknown field; known: {', '.join(sorted(REQUEST_KEYS))}")
    raw_name = body.get("name")
    generated = raw_name is None or raw_name == ""
    name = generate_task_name(token) if generated else check_task_name(raw_name)
    url = check_url(body["url"]) if body.get("url") is not None else f"/_ah/queue/{queue}"
    method = body.get("method")
    if method is None:
        method = "POST"
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise invalid("method", f"must be one of {', '.join(METHODS)}")
    method = method.upper()
    payload = _payload(body)
    if len(payload) > limits.max_task_bytes:
        raise TaskQueueError(
            "TASK_TOO_LARGE",
            f"payload: {len(payload)} bytes is over the limit of {limits.max_task_bytes}",
        )
    if payload and method in BODYLESS_METHODS:
        raise invalid("payload", f"a {method} task cannot carry a payload")
    headers = _headers(body["headers"]) if body.get("headers") is not None else ()
    eta = _eta(body, now)
    retry = NO_OPTIONS
    if body.get("retry_options") is not None:
        retry = retry_options_from_mapping(body["retry_options"])
    deadline = _deadline(body.get("dispatch_deadline"), limits.default_deadline)
    task = Task(
        app=app,
        queue=queue,
        name=name,
        url=url,
        method=method,
        headers=headers,
        payload=payload,
        eta=eta,
        created=now,
        tid=token(),
        retry=retry,
        deadline=deadline,
    )
    return task, generated


# --- wire form: AMQP message headers + body -------------------------------------------------


class MessageError(ValueError):
    """A broker message that is not a task of ours."""


def task_to_headers(task: Task) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "tq-app": task.app,
        "tq-queue": task.queue,
        "tq-name": task.name,
        "tq-tid": task.tid,
        "tq-gen": task.gen,
        "tq-url": task.url,
        "tq-method": task.method,
        "tq-eta": repr(task.eta),
        "tq-created": repr(task.created),
        "tq-retry-count": task.retry_count,
        "tq-exec-count": task.execution_count,
        "tq-deadline": repr(task.deadline),
    }
    if task.headers:
        headers["tq-headers"] = json.dumps(task.headers, separators=(",", ":"))
    if task.retry != NO_OPTIONS:
        headers["tq-retry"] = json.dumps(task.retry.as_dict(), separators=(",", ":"))
    if task.first_attempt is not None:
        headers["tq-first-attempt"] = repr(task.first_attempt)
    if task.previous_response is not None:
        headers["tq-prev-response"] = task.previous_response
    if task.retry_reason is not None:
        headers["tq-retry-reason"] = task.retry_reason
    return headers


def _text(headers: Mapping[str, Any], key: str) -> str:
    value = headers.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise MessageError(f"header {key} missing or not text")
    return value


def _float(headers: Mapping[str, Any], key: str) -> float:
    try:
        number = float(_text(headers, key))
    except ValueError:
        raise MessageError(f"header {key} is not a number") from None
    if not math.isfinite(number):
        raise MessageError(f"header {key} is not a finite number")
    return number


def _pairs(headers: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    if headers.get("tq-headers") is None:
        return ()
    pairs = json.loads(_text(headers, "tq-headers"))
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise MessageError("header tq-headers is not a list of [name, value] strings")
    return tuple((k, v) for k, v in pairs)


def _int(headers: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = headers.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"header {key} is not an integer")
    return value


def task_from_headers(headers: Mapping[str, Any] | None, body: bytes) -> Task:
    if not headers or "tq-app" not in headers:
        raise MessageError("not a task message (no tq-app header)")
    try:
        pairs = _pairs(headers)
        retry = NO_OPTIONS
        if headers.get("tq-retry") is not None:
            retry = retry_options_from_mapping(json.loads(_text(headers, "tq-retry")))
        first = _float(headers, "tq-first-attempt") if "tq-first-attempt" in headers else None
        prev = headers.get("tq-prev-response")
        reason = _text(headers, "tq-retry-reason") if "tq-retry-reason" in headers else None
        return Task(
            app=_text(headers, "tq-app"),
            queue=_text(headers, "tq-queue"),
            name=_text(headers, "tq-name"),
            tid=_text(headers, "tq-tid"),
            gen=_int(headers, "tq-gen"),
            url=_text(headers, "tq-url"),
            method=_text(headers, "tq-method"),
            headers=pairs,
            payload=bytes(body),
            eta=_float(headers, "tq-eta"),
            created=_float(headers, "tq-created"),
            retry_count=_int(headers, "tq-retry-count"),
            execution_count=_int(headers, "tq-exec-count"),
            deadline=_float(headers, "tq-deadline"),
            first_attempt=first,
            retry=retry,
            previous_response=prev if type(prev) is int else None,  # not bool
            retry_reason=reason,
        )
    except MessageError:
        raise
    except (TypeError, ValueError, RecursionError, TaskQueueError) as e:
        # RecursionError: json.loads of absurdly nested input
        raise MessageError(f"malformed task message: {e}") from None
