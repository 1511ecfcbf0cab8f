"""Retry policy arithmetic: DESIGN §3 (backoff, task_retry_limit) and CASES C15–C17."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from appscale_tq.backoff import (
    DEFAULT_MAX_BACKOFF,
    NO_OPTIONS,
    RetryOptions,
    may_retry,
    retry_delay,
    retry_options_from_mapping,
)
from appscale_tq.errors import TaskQueueError


def fixed(value):
    return lambda: value


def never_called():
    raise AssertionError("the App Engine schedule must not be random")


# --- seed jitter (no schedule parameters) -----------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2, 3, 5, 10, 11])
def test_jitter_spans_zero_to_two_to_the_n(failures):
    assert retry_delay(failures, NO_OPTIONS, fixed(0.0)) == 0.0
    assert retry_delay(failures, NO_OPTIONS, fixed(1.0)) == 2.0**failures
    assert retry_delay(failures, NO_OPTIONS, fixed(0.5)) == 2.0**failures / 2


@pytest.mark.parametrize("failures", [12, 13, 20, 64, 65, 1000, 10**6])
def test_jitter_is_capped_at_one_hour(failures):
    assert retry_delay(failures, NO_OPTIONS, fixed(1.0)) == DEFAULT_MAX_BACKOFF == 3600.0
    assert retry_delay(failures, NO_OPTIONS, fixed(0.5)) == 1800.0
    assert retry_delay(failures, NO_OPTIONS, fixed(0.0)) == 0.0


def test_jitter_ignores_limits_that_are_not_schedule_parameters():
    options = RetryOptions(task_retry_limit=3, task_age_limit=100.0)
    assert not options.uses_schedule
    assert retry_delay(4, options, fixed(1.0)) == 16.0


@given(st.integers(1, 10**6), st.floats(0.0, 1.0))
def test_jitter_within_bounds(failures, r):
    delay = retry_delay(failures, NO_OPTIONS, fixed(r))
    assert 0.0 <= delay <= min(2.0 ** min(failures, 64), 3600.0)


def test_failures_below_one_is_a_programming_error():
    with pytest.raises(ValueError):
        retry_delay(0, NO_OPTIONS, fixed(0.5))


# --- App Engine schedule ----------------------------------------------------------------------


def schedule(options, count):
    return [retry_delay(n, options, never_called) for n in range(1, count + 1)]


def test_c15_no_doublings_grows_linearly():
    options = RetryOptions(min_backoff_seconds=10.0, max_backoff_seconds=200.0, max_doublings=0)
    assert schedule(options, 22) == [10.0 * n for n in range(1, 21)] + [200.0, 200.0]


def test_c15_three_doublings_then_linear():
    options = RetryOptions(min_backoff_seconds=10.0, max_backoff_seconds=300.0, max_doublings=3)
    assert schedule(options, 8) == [10.0, 20.0, 40.0, 80.0, 160.0, 240.0, 300.0, 300.0]


def test_c15_from_a_mapping():
    options = retry_options_from_mapping(
        {"min_backoff_seconds": 10, "max_backoff_seconds": 200, "max_doublings": 0}
    )
    assert schedule(options, 3) == [10.0, 20.0, 30.0]


def test_schedule_defaults_when_only_one_parameter_is_set():
    # App Engine's defaults: min 0.1 s, 16 doublings, max one hour here
    assert schedule(RetryOptions(max_doublings=2), 4) == [0.1, 0.2, 0.4, 0.4 * 2]
    only_min = schedule(RetryOptions(min_backoff_seconds=1.0), 14)
    assert only_min[:12] == [2.0**k for k in range(12)]  # 1 ... 2048
    assert only_min[12:] == [3600.0, 3600.0]  # 4096, 8192 capped at one hour


def test_schedule_with_only_a_small_maximum_respects_it():
    # the default minimum (0.1 s) must not push the delay over an explicit smaller maximum
    assert schedule(RetryOptions(max_backoff_seconds=0.05), 3) == [0.05, 0.05, 0.05]


def test_explicit_minimum_above_the_maximum_wins():
    # merged task + queue options can disagree; the minimum is kept
    options = RetryOptions(min_backoff_seconds=100.0).over(RetryOptions(max_backoff_seconds=50.0))
    assert schedule(options, 3) == [100.0, 100.0, 100.0]


def test_zero_minimum_means_no_wait():
    assert schedule(RetryOptions(min_backoff_seconds=0.0), 5) == [0.0] * 5


@pytest.mark.parametrize("failures", [1024, 1025, 1100, 5000, 10**6])
def test_huge_exponents_do_not_overflow(failures):
    options = RetryOptions(min_backoff_seconds=1.0, max_doublings=10**9)
    assert retry_delay(failures, options, never_called) == 3600.0
    linear = RetryOptions(min_backoff_seconds=1.0, max_doublings=1500)
    assert retry_delay(failures, linear, never_called) == 3600.0
    tiny = RetryOptions(min_backoff_seconds=0.0, max_doublings=10**9)
    assert retry_delay(failures, tiny, never_called) == 0.0


schedule_options = st.builds(
    RetryOptions,
    min_backoff_seconds=st.none() | st.floats(0.0, 1e6),
    max_backoff_seconds=st.none() | st.floats(0.0, 1e9),
    max_doublings=st.none() | st.integers(0, 10**9),
).filter(lambda o: o.uses_schedule)


@given(schedule_options, st.integers(1, 3000))
def test_schedule_is_monotone_and_between_min_and_max(options, failures):
    lo, hi = options.min_backoff_seconds, options.max_backoff_seconds
    assume(lo is None or hi is None or lo <= hi)
    now = retry_delay(failures, options, never_called)
    after = retry_delay(failures + 1, options, never_called)
    assert math.isfinite(now) and math.isfinite(after)
    assert now <= after
    assert now <= (hi if hi is not None else 3600.0 if lo is None else max(lo, 3600.0))
    if lo is not None:
        assert now >= lo
    else:
        assert now >= min(0.1, hi if hi is not None else 0.1)


@given(schedule_options, st.integers(1, 60))
def test_schedule_follows_the_formula(options, failures):
    lo = 0.1 if options.min_backoff_seconds is None else options.min_backoff_seconds
    hi = 3600.0 if options.max_backoff_seconds is None else options.max_backoff_seconds
    assume(lo <= hi)
    d = 16 if options.max_doublings is None else options.max_doublings
    if failures - 1 <= d:
        expected = lo * 2 ** (failures - 1)
    else:
        expected = lo * 2**d * (failures - d)
    assert retry_delay(failures, options, never_called) == pytest.approx(min(expected, hi))


# --- may_retry --------------------------------------------------------------------------------


def attempts(options, gap=1.0, give_up_after=1000):
    """How many attempts run when each fails, ``gap`` seconds apart."""
    failures = 1
    while may_retry(failures, (failures - 1) * gap, options):
        failures += 1
        if failures > give_up_after:
            return math.inf
    return failures


def test_c16_retry_limit_zero_is_one_attempt():
    options = retry_options_from_mapping({"task_retry_limit": 0})
    assert attempts(options) == 1
    assert not may_retry(1, 0.0, options)


def test_retry_limit_five_is_six_attempts():
    assert attempts(RetryOptions(task_retry_limit=5)) == 6


def test_c17_without_age_limit_exactly_three_attempts():
    assert attempts(RetryOptions(task_retry_limit=2), gap=1.0) == 3


def test_c17_both_limits_retry_until_both_are_exceeded():
    options = RetryOptions(task_retry_limit=2, task_age_limit=60.0)
    # fast failures: the count is used up first, the age keeps it going until 60 s
    assert may_retry(3, 59.9, options)
    assert may_retry(10, 59.0, options)
    assert not may_retry(3, 60.0, options)
    assert attempts(options, gap=1.0) == 61
    # slow failures: the age is used up first, the count keeps it going to 3 attempts
    assert may_retry(1, 1000.0, options)
    assert may_retry(2, 1000.0, options)
    assert not may_retry(3, 1000.0, options)
    assert attempts(options, gap=100.0) == 3


def test_age_limit_alone():
    options = RetryOptions(task_age_limit=60.0)
    assert may_retry(1000, 59.0, options)
    assert not may_retry(1, 60.0, options)
    assert attempts(options, gap=10.0) == 7  # attempts at 0, 10, ..., 60 s


def test_no_limits_retry_forever():
    assert attempts(NO_OPTIONS) == math.inf
    assert may_retry(10**9, 1e12, NO_OPTIONS)


@given(
    st.none() | st.integers(0, 100),
    st.none() | st.floats(0, 1e6),
    st.integers(1, 200),
    st.floats(0, 1e7),
)
def test_may_retry_rule(limit, age_limit, failures, age):
    options = RetryOptions(task_retry_limit=limit, task_age_limit=age_limit)
    count_left = limit is None or failures <= limit
    age_left = age_limit is None or age < age_limit
    if limit is not None and age_limit is not None:
        assert may_retry(failures, age, options) == (count_left or age_left)
    else:
        assert may_retry(failures, age, options) == (count_left and age_left)


# --- options ----------------------------------------------------------------------------------


def test_options_from_a_full_mapping():
    options = retry_options_from_mapping(
        {
            "task_retry_limit": 7,
            "task_age_limit": 86400,
            "min_backoff_seconds": 0.5,
            "max_backoff_seconds": 60,
            "max_doublings": 4.0,
        }
    )
    assert options == RetryOptions(7, 86400.0, 0.5, 60.0, 4)
    assert isinstance(options.task_retry_limit, int)
    assert isinstance(options.max_doublings, int)
    assert isinstance(options.task_age_limit, float)
    assert options.uses_schedule


def test_none_values_mean_unset():
    assert retry_options_from_mapping({"task_retry_limit": None}) == NO_OPTIONS
    assert retry_options_from_mapping({}) == NO_OPTIONS


def test_as_dict_round_trips():
    options = RetryOptions(task_retry_limit=3, max_backoff_seconds=9.5)
    assert options.as_dict() == {"task_retry_limit": 3, "max_backoff_seconds": 9.5}
    assert retry_options_from_mapping(options.as_dict()) == options
    assert NO_OPTIONS.as_dict() == {}


def test_over_takes_unset_values_from_the_fallback():
    task = RetryOptions(task_retry_limit=0)
    queue = RetryOptions(task_retry_limit=5, min_backoff_seconds=1.0)
    assert task.over(queue) == RetryOptions(task_retry_limit=0, min_backoff_seconds=1.0)
    assert NO_OPTIONS.over(queue) == queue


def refused(data, field):
    with pytest.raises(TaskQueueError) as info:
        retry_options_from_mapping(data)
    assert info.value.code == "INVALID_REQUEST"
    assert info.value.message.startswith(field + ":"), info.value.message
    return info.value


@pytest.mark.parametrize("key", ["task_retry_limit", "task_age_limit", "min_backoff_seconds",
                                 "max_backoff_seconds", "max_doublings"])
@pytest.mark.parametrize(
    "value", [-1, -0.5, True, False, float("nan"), float("inf"), float("-inf"), 10**400,
              1e10, "5", "1d", [], {}]
)
def test_bad_values_name_the_field(key, value):
    refused({key: value}, f"retry_options.{key}")


@pytest.mark.parametrize("key", ["task_retry_limit", "max_doublings"])
def test_whole_number_fields_refuse_fractions(key):
    refused({key: 2.5}, f"retry_options.{key}")


def test_unknown_key_is_named():
    error = refused({"task_retry_limt": 3}, "retry_options.task_retry_limt")
    assert "task_retry_limit" in error.message  # lists the known keys


def test_not_a_mapping():
    refused([1, 2], "retry_options")
    refused("task_retry_limit=3", "retry_options")


def test_min_above_max_is_refused():
    refused(
        {"min_backoff_seconds": 10, "max_backoff_seconds": 5}, "retry_options.min_backoff_seconds"
    )
    assert retry_options_from_mapping({"min_backoff_seconds": 5, "max_backoff_seconds": 5})


def test_field_prefix_is_configurable():
    with pytest.raises(TaskQueueError) as info:
        retry_options_from_mapping({"max_doublings": -1}, field="queue.retry_parameters")
    assert info.value.message.startswith("queue.retry_parameters.max_doublings:")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["task_retry_limit", "task_age_limit",
                                        "min_backoff_seconds", "max_backoff_seconds",
                                        "max_doublings", "other"]), json_values))
def test_options_from_anything_only_raise_task_queue_error(data):
    try:
        options = retry_options_from_mapping(data)
    except TaskQueueError as e:
        assert e.code == "INVALID_REQUEST"
        return
    for value in options.as_dict().values():
        assert 0 <= value <= 1e9
