"""Task, queue and app names: the rules of DESIGN §3 and CASES C04/C05."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appscale_tq.errors import HTTP_STATUS, TaskQueueError, Unavailable, invalid
from appscale_tq.names import (
    check_queue_name,
    check_task_name,
    generate_task_name,
    is_app_id,
    new_token,
)
from appscale_tq.tasks import task_from_request

TASK_CHARS = string.ascii_letters + string.digits + "_-"
QUEUE_CHARS = string.ascii_letters + string.digits + "-"


def refused(check, value, code):
    with pytest.raises(TaskQueueError) as info:
        check(value)
    assert info.value.code == code
    assert info.value.http_status == 400
    return info.value


# --- task names -------------------------------------------------------------------------------


def test_c04_500_characters_is_the_longest_name():
    assert check_task_name("a" * 500) == "a" * 500


@pytest.mark.parametrize(
    "name",
    ["a" * 501, "bad name", "a.b", "ü", "t1\r\nX-Evil: 1", "a\n", "\na", "a\x00", "", "a/b", "é1"],
)
def test_c04_c05_bad_names_are_invalid_task_name(name):
    error = refused(check_task_name, name, "INVALID_TASK_NAME")
    assert error.message.startswith("name:")


@pytest.mark.parametrize("name", [None, 5, 5.0, b"abc", ["a"], {"a": 1}, True])
def test_non_string_task_names_are_invalid_task_name(name):
    refused(check_task_name, name, "INVALID_TASK_NAME")


def test_task_name_message_is_short_even_for_a_huge_name():
    error = refused(check_task_name, "x y" * 10000, "INVALID_TASK_NAME")
    assert len(error.message) < 200


def test_typical_names():
    for name in ("report-42", "m1-upcoming", "A_b-9", "-", "_", "0"):
        assert check_task_name(name) == name


@given(st.text(alphabet=TASK_CHARS, min_size=1, max_size=500))
def test_any_name_matching_the_rule_is_accepted(name):
    assert check_task_name(name) == name


@given(
    st.text(alphabet=TASK_CHARS, max_size=20),
    st.characters().filter(lambda c: c not in TASK_CHARS),
    st.text(alphabet=TASK_CHARS, max_size=20),
)
def test_a_name_with_any_other_character_is_rejected(before, bad, after):
    refused(check_task_name, before + bad + after, "INVALID_TASK_NAME")


@given(st.text(max_size=600))
def test_task_name_check_agrees_with_the_documented_regex(name):
    ok = re.fullmatch(r"[a-zA-Z0-9_-]{1,500}", name, re.ASCII) is not None
    if ok:
        assert check_task_name(name) == name
    else:
        refused(check_task_name, name, "INVALID_TASK_NAME")


@pytest.mark.parametrize("name", [None, ""])
def test_c04_empty_or_absent_name_is_generated_by_task_from_request(name):
    body = {} if name is None else {"name": name}
    task, generated = task_from_request("app", "default", body, 1000.0)
    assert generated is True
    assert check_task_name(task.name) == task.name


def test_c05_injection_name_rejected_by_task_from_request():
    with pytest.raises(TaskQueueError) as info:
        task_from_request("app", "default", {"name": "t1\r\nX-Evil: 1"}, 1000.0)
    assert info.value.code == "INVALID_TASK_NAME"
    # the next, valid task is accepted
    task, generated = task_from_request("app", "default", {"name": "t1"}, 1000.0)
    assert (task.name, generated) == ("t1", False)


# --- generated names --------------------------------------------------------------------------


def test_generated_names_are_valid_and_unique():
    names = {generate_task_name() for _ in range(2000)}
    assert len(names) == 2000
    for name in names:
        assert check_task_name(name) == name


def test_generated_name_uses_the_given_token():
    assert generate_task_name(lambda: "abc") == "task-abc"


def test_new_token_is_32_hex_digits_and_unique():
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    for token in tokens:
        assert re.fullmatch(r"[0-9a-f]{32}", token)


# --- queue names ------------------------------------------------------------------------------


def test_queue_name_limits():
    assert check_queue_name("default") == "default"
    assert check_queue_name("A-list-queue-fast") == "A-list-queue-fast"
    assert check_queue_name("q" * 100) == "q" * 100


@pytest.mark.parametrize(
    "name", ["", "q" * 101, "a_b", "a.b", "a b", "ü", "q\n", "q\r\nX: 1", None, 3, ["default"]]
)
def test_bad_queue_names_are_invalid_queue_name(name):
    error = refused(check_queue_name, name, "INVALID_QUEUE_NAME")
    assert error.message.startswith("queue:")


@given(st.text(alphabet=QUEUE_CHARS, min_size=1, max_size=100))
def test_any_queue_name_matching_the_rule_is_accepted(name):
    assert check_queue_name(name) == name


@given(st.text(max_size=120))
def test_queue_name_check_agrees_with_the_documented_regex(name):
    if re.fullmatch(r"[a-zA-Z0-9-]{1,100}", name, re.ASCII):
        assert check_queue_name(name) == name
    else:
        refused(check_queue_name, name, "INVALID_QUEUE_NAME")


# --- app ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["default", "guestbook", "s~my-app", "example.com:my-app", "a"])
def test_app_ids_accepted(app):
    assert is_app_id(app)


@pytest.mark.parametrize("app", ["", "-app", "my app", "app/x", "ü", "a" * 101, "app\n", "*"])
def test_app_ids_rejected(app):
    assert not is_app_id(app)


# --- errors -----------------------------------------------------------------------------------


def test_error_codes_map_to_the_design_statuses():
    expected = {
        "INVALID_TASK_NAME": 400,
        "INVALID_URL": 400,
        "INVALID_ETA": 400,
        "INVALID_REQUEST": 400,
        "INVALID_QUEUE_MODE": 400,
        "UNKNOWN_QUEUE": 404,
        "UNKNOWN_TASK": 404,
        "TASK_ALREADY_EXISTS": 409,
        "TOMBSTONED_TASK": 409,
        "TASK_TOO_LARGE": 413,
        "TRANSIENT_ERROR": 503,
    }
    for code, status in expected.items():
        assert TaskQueueError(code, "x").http_status == status
    assert set(HTTP_STATUS.values()) <= {400, 403, 404, 409, 413, 500, 503}


def test_error_json_and_text():
    error = TaskQueueError("TOMBSTONED_TASK", "name: 'a' was used")
    assert error.as_json() == {
        "error": {"code": "TOMBSTONED_TASK", "message": "name: 'a' was used"}
    }
    assert str(error) == "TOMBSTONED_TASK: name: 'a' was used"


def test_unknown_error_code_is_a_programming_error():
    with pytest.raises(ValueError):
        TaskQueueError("NOT_A_CODE", "x")


def test_invalid_names_the_field():
    error = invalid("retry_options.max_doublings", "must not be negative")
    assert error.code == "INVALID_REQUEST"
    assert error.message == "retry_options.max_doublings: must not be negative"


def test_unavailable_becomes_transient_error():
    error = Unavailable("redis", "no answer in 3 s")
    assert str(error) == "redis unavailable: no answer in 3 s"
    converted = error.as_task_queue_error()
    assert (converted.code, converted.http_status) == ("TRANSIENT_ERROR", 503)
    assert "redis" in converted.message
