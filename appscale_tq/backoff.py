"""Retry policy arithmetic: when to retry and how long to wait; pure."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import attrs

from appscale_tq.errors import invalid

DEFAULT_MAX_BACKOFF = 3600.0
# App Engine's defaults for the schedule when any of its parameters is set.
AE_MIN_BACKOFF = 0.1
AE_MAX_DOUBLINGS = 16

MAX_PARAMETER = 1e9  # larger retry parameters mean nothing (a day is 86,400 s)

RETRY_KEYS = (
    "task_retry_limit",
    "task_age_limit",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "max_doublings",
)


@attrs.frozen
class RetryOptions:
    """App Engine retry parameters; None means "not set here"."""

    task_retry_limit: int | None = None
    task_age_limit: float | None = None
    min_backoff_seconds: float | None = None
    max_backoff_seconds: float | None = None
    max_doublings: int | None = None

    def over(self, fallback: RetryOptions) -> RetryOptions:
        """These options, each unset one taken from ``fallback``."""
        return RetryOptions(
            **{
                k: getattr(self, k) if getattr(self, k) is not None else getattr(fallback, k)
                for k in RETRY_KEYS
            }
        )

    @property
    def uses_schedule(self) -> bool:
        return (
            self.min_backoff_seconds is not None
            or self.max_backoff_seconds is not None
            or self.max_doublings is not None
        )

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in RETRY_KEYS if getattr(self, k) is not None}


NO_OPTIONS = RetryOptions()


def _number(field: str, value: object, *, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(field, f"must be a {'whole ' if integer else ''}number, not {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise invalid(field, "must be finite")
    if integer and value != int(value):
        raise invalid(field, f"must be a whole number, not {value!r}")
    if value < 0:
        raise invalid(field, f"must not be negative, not {value!r}")
    if value > MAX_PARAMETER:
        raise invalid(field, f"must be at most {MAX_PARAMETER:g}")
    return int(value) if integer else float(value)


def retry_options_from_mapping(data: object, field: str = "retry_options") -> RetryOptions:
    """Validate a JSON/YAML mapping of retry parameters (``task_age_limit`` in seconds)."""
    if not isinstance(data, Mapping):
        raise invalid(field, "must be an object")
    values: dict[str, float | int] = {}
    for key, value in data.items():
        if key not in RETRY_KEYS:
            raise invalid(f"{field}.{key}", f"unknown key; known: {', '.join(RETRY_KEYS)}")
        if value is None:
            continue
        integer = key in ("task_retry_limit", "max_doublings")
        values[key] = _number(f"{field}.{key}", value, integer=integer)
    options = RetryOptions(**values)  # type: ignore[arg-type]
    lo, hi = options.min_backoff_seconds, options.max_backoff_seconds
    if lo is not None and hi is not None and lo > hi:
        raise invalid(f"{field}.min_backoff_seconds", "must not exceed max_backoff_seconds")
    return options


def retry_delay(failures: int, options: RetryOptions, random: Callable[[], float]) -> float:
    """Seconds to wait before the next attempt after ``failures`` failed attempts (>= 1).

    Without schedule parameters: uniform random in [0, 2^n], capped at max_backoff_seconds
    (default one hour). With any of them: App Engine's schedule, min * 2^(n-1) while n-1 <= d,
    then min * 2^d * (n - d), capped at max.
    """
    if failures < 1:
        raise ValueError("failures must be >= 1")
    if not options.uses_schedule:
        # (a max_backoff_seconds of its own would make this the App Engine schedule)
        return random() * min(2.0 ** min(failures, 64), DEFAULT_MAX_BACKOFF)
    hi = DEFAULT_MAX_BACKOFF
    if options.max_backoff_seconds is not None:
        hi = options.max_backoff_seconds
    if options.min_backoff_seconds is not None:
        lo = options.min_backoff_seconds
        hi = max(hi, lo)  # an explicit minimum wins over a maximum below it (merged options)
    else:
        lo = min(AE_MIN_BACKOFF, hi)  # an explicit maximum below the default minimum wins
    doublings = options.max_doublings if options.max_doublings is not None else AE_MAX_DOUBLINGS
    if failures - 1 <= doublings:
        delay = _doubled(lo, failures - 1)
    else:
        delay = _doubled(lo, doublings) * (failures - doublings)
    return min(delay, hi)


def _doubled(value: float, times: int) -> float:
    """``value * 2**times`` without OverflowError (``2.0 ** 1024`` raises; this gives inf)."""
    try:
        return math.ldexp(value, times)
    except OverflowError:
        return math.inf


def may_retry(failures: int, age: float, options: RetryOptions) -> bool:
    """Whether a task that failed ``failures`` times, first run ``age`` seconds ago, retries.

    ``task_retry_limit`` counts retries (0 = one attempt only). With both limits set the task
    retries until both are exceeded, as App Engine does.
    """
    limit, age_limit = options.task_retry_limit, options.task_age_limit
    count_left = limit is None or failures <= limit
    age_left = age_limit is None or age < age_limit
    if limit is not None and age_limit is not None:
        return count_left or age_left
    return count_left and age_left
