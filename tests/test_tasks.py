"""Task validation (DESIGN §3, CASES C04–C08, C36) and the AMQP wire form."""

from __future__ import annotations

import base64
import datetime
import json

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appscale_tq.backoff import NO_OPTIONS, RetryOptions
from appscale_tq.errors import TaskQueueError
from appscale_tq.tasks import (
    Limits,
    MessageError,
    Task,
    check_url,
    parse_eta,
    rfc3339,
    task_from_headers,
    task_from_request,
    task_to_headers,
)

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.25Z
DAY = 86400


def tokens():
    n = iter(range(10**6))
    return lambda: f"tok{next(n)}"


def make(body, queue="default", limits=Limits(), now=NOW):
    task, _ = task_from_request("guestbook", queue, body, now, limits, tokens())
    return task


def refused(body, code, field=None, limits=Limits(), now=NOW):
    with pytest.raises(TaskQueueError) as info:
        make(body, limits=limits, now=now)
    assert info.value.code == code, info.value
    if field is not None:
        assert info.value.message.startswith(field + ":"), info.value.message
    return info.value


# --- the whole request ------------------------------------------------------------------------


def test_minimal_request_gets_all_defaults():
    task, generated = task_from_request("guestbook", "mail", {}, NOW, Limits(), tokens())
    assert generated
    assert task == Task(
        app="guestbook",
        queue="mail",
        name="task-tok0",
        url="/_ah/queue/mail",
        method="POST",
        headers=(),
        payload=b"",
        eta=NOW,
        created=NOW,
        tid="tok1",
        retry_count=0,
        execution_count=0,
        first_attempt=None,
        retry=NO_OPTIONS,
        deadline=600.0,
        previous_response=None,
        retry_reason=None,
    )


def test_full_request():
    task, generated = task_from_request(
        "guestbook",
        "default",
        {
            "name": "report-42",
            "url": "/tasks/run?x=1",
            "method": "put",
            "headers": {"Content-Type": "application/json", "X-Custom": "v"},
            "payload": '{"a": 1}',
            "countdown": 30,
            "retry_options": {"task_retry_limit": 5, "min_backoff_seconds": 1},
            "dispatch_deadline": 30,
        },
        NOW,
        Limits(),
        tokens(),
    )
    assert not generated
    assert task.name == "report-42"
    assert task.url == "/tasks/run?x=1"
    assert task.method == "PUT"
    assert task.headers == (("Content-Type", "application/json"), ("X-Custom", "v"))
    assert task.header("content-type") == "application/json"
    assert task.header("missing") is None
    assert task.payload == b'{"a": 1}'
    assert task.eta == NOW + 30
    assert task.retry == RetryOptions(task_retry_limit=5, min_backoff_seconds=1.0)
    assert task.deadline == 30.0
    assert task.tid == "tok0"


def test_each_enqueue_gets_its_own_tid():
    one, _ = task_from_request("a", "q", {"name": "n"}, NOW)
    two, _ = task_from_request("a", "q", {"name": "n"}, NOW)
    assert one.tid != two.tid


@pytest.mark.parametrize("body", [None, [], "task", 5, [{"name": "a"}]])
def test_body_must_be_an_object(body):
    refused(body, "INVALID_REQUEST", "task")


def test_unknown_field_is_named():
    error = refused({"name": "a", "tagg": "x"}, "INVALID_REQUEST", "tagg")
    assert "known" in error.message
    refused({"target": "svc"}, "INVALID_REQUEST", "target")


# --- URL (C36) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://169.254.169.254/computeMetadata/v1/",
        "https://example.com/x",
        "//evil.example/x",
        "///evil",
        "tasks/no-slash",
        "/x#frag",
        "/" + "a" * 2083,
        "",
        "/a b",
        "/a\r\nHost: evil",
        "/a\\..\\b",
        "/\\evil.example",
        "/ü",
        "/a\x00",
        " /a",
        "\t/a",
    ],
)
def test_c36_bad_urls_are_invalid_url(url):
    refused({"url": url}, "INVALID_URL", "url")
    with pytest.raises(TaskQueueError):
        check_url(url)


@pytest.mark.parametrize("url", [5, ["/a"], {"/a": 1}, True])
def test_non_string_url_is_invalid_url(url):
    refused({"url": url}, "INVALID_URL", "url")


@pytest.mark.parametrize("url", ["/tasks/run?x=1", "/", "/" + "a" * 2082, "/a/%2Fb?c=d&e=%20"])
def test_c36_relative_urls_are_kept(url):
    assert make({"url": url}).url == url
    assert check_url(url) == url


def test_c36_default_url_names_the_queue():
    assert make({}, queue="mail-out").url == "/_ah/queue/mail-out"
    assert make({"url": None}).url == "/_ah/queue/default"


# --- payload (C06, C07) -----------------------------------------------------------------------


def test_c06_payload_at_the_limit_is_accepted():
    assert len(make({"payload": "x" * 102400}).payload) == 102400


def test_c06_payload_over_the_limit_is_task_too_large():
    error = refused({"payload": "x" * 102401}, "TASK_TOO_LARGE", "payload")
    assert error.http_status == 413
    refused({"payload": "x" * 10 * 1024 * 1024}, "TASK_TOO_LARGE")


def test_c06_size_is_counted_in_bytes_not_characters():
    make({"payload": "é" * 51200})  # 102400 bytes
    refused({"payload": "é" * 51200 + "x"}, "TASK_TOO_LARGE")


def test_c06_limit_is_configurable():
    limits = Limits(max_task_bytes=10)
    assert make({"payload": "x" * 10}, limits=limits).payload == b"x" * 10
    refused({"payload": "x" * 11}, "TASK_TOO_LARGE", limits=limits)
    refused({"payload_base64": base64.b64encode(b"\0" * 11).decode()}, "TASK_TOO_LARGE",
            limits=limits)


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "get"])
def test_c06_bodyless_method_with_payload_is_invalid_request(method):
    refused({"method": method, "payload": "x"}, "INVALID_REQUEST", "payload")
    refused({"method": method, "payload_base64": "eA=="}, "INVALID_REQUEST", "payload")
    assert make({"method": method}).method == method.upper()
    assert make({"method": method, "payload": ""}).payload == b""


def test_c07_binary_payload_is_byte_identical():
    raw = bytes.fromhex("89504E470D0A1A0AFFFE00")
    task = make({"payload_base64": base64.b64encode(raw).decode("ascii")})
    assert task.payload == raw


@given(st.binary(max_size=2000))
def test_base64_payload_round_trips(raw):
    assert make({"payload_base64": base64.b64encode(raw).decode()}).payload == raw


def test_text_payload_is_utf8():
    assert make({"payload": "héllo ✓"}).payload == "héllo ✓".encode()


@pytest.mark.parametrize("value", ["not base64!", "eA=", "ü", 5, ["eA=="]])
def test_bad_base64(value):
    refused({"payload_base64": value}, "INVALID_REQUEST", "payload_base64")


@pytest.mark.parametrize("value", [5, b"x", ["x"], {"x": 1}, True])
def test_payload_must_be_a_string(value):
    refused({"payload": value}, "INVALID_REQUEST", "payload")


def test_payload_and_payload_base64_together():
    refused({"payload": "x", "payload_base64": "eA=="}, "INVALID_REQUEST", "payload")


# --- ETA and countdown (C08) ------------------------------------------------------------------


def test_c08_countdown_over_30_days_is_invalid_eta():
    refused({"countdown": 2592001}, "INVALID_ETA", "countdown")
    assert make({"countdown": 2591990}).eta == NOW + 2591990


def test_countdown_of_exactly_30_days_survives_rounding():
    # (now + countdown) - now rounds above 2592000 for this now: compare the countdown itself
    now = 2146249397.7480867
    assert (now + 30 * DAY) - now > 30 * DAY
    assert make({"countdown": 30 * DAY}, now=now).eta == now + 30 * DAY


@given(st.floats(0, 1e10, allow_nan=False), st.floats(0, 30 * DAY))
def test_countdown_up_to_exactly_30_days_is_always_accepted(now, countdown):
    assert make({"countdown": countdown}, now=now).eta == now + countdown


def test_negative_countdown_is_now():
    assert make({"countdown": -100}).eta == NOW
    assert make({"countdown": 0}).eta == NOW
    assert make({"countdown": 0.5}).eta == NOW + 0.5


@pytest.mark.parametrize("value", ["10", True, [10], {"s": 1}, float("nan"), float("inf"),
                                   10**400, -(10**400)])
def test_bad_countdown_is_invalid_eta(value):
    refused({"countdown": value}, "INVALID_ETA", "countdown")


def test_null_countdown_is_no_countdown():
    assert make({"countdown": None}).eta == NOW


def test_eta_forms():
    iso = rfc3339(NOW + 3600)
    assert iso == "2023-11-14T23:13:20.250000Z"
    assert make({"eta": iso}).eta == NOW + 3600
    assert make({"eta": "2023-11-14T23:13:20.25z"}).eta == NOW + 3600
    assert make({"eta": "2023-11-15T00:13:20.25+01:00"}).eta == NOW + 3600
    assert make({"eta": "2023-11-14T18:13:20.25-05:00"}).eta == NOW + 3600
    assert make({"eta": "2023-11-14T23:13:20.25"}).eta == NOW + 3600  # naive = UTC
    assert make({"eta": "2023-11-14 23:13:20.25"}).eta == NOW + 3600
    assert make({"eta": NOW + 3600}).eta == NOW + 3600  # epoch seconds
    assert make({"eta": int(NOW) + 3600}).eta == int(NOW) + 3600


def test_past_eta_is_now():
    assert make({"eta": NOW - 10}).eta == NOW
    assert make({"eta": 0}).eta == NOW
    assert make({"eta": "2001-01-01T00:00:00Z"}).eta == NOW
    # before 1970 is just as past
    assert make({"eta": "1969-12-31T23:59:59Z"}).eta == NOW
    assert make({"eta": "0001-01-01T00:00:00+14:00"}).eta == NOW
    assert make({"eta": -5}).eta == NOW


def test_eta_more_than_30_days_ahead_is_invalid_eta():
    refused({"eta": NOW + 30 * DAY + 1}, "INVALID_ETA", "eta")
    refused({"eta": rfc3339(NOW + 31 * DAY)}, "INVALID_ETA", "eta")
    refused({"eta": "9999-12-31T23:59:59Z"}, "INVALID_ETA", "eta")
    assert make({"eta": NOW + 30 * DAY}).eta == NOW + 30 * DAY


@pytest.mark.parametrize(
    "value",
    ["tomorrow", "", "2023-13-01T00:00:00Z", "2023-11-14T25:00:00Z", "2023-11-14T23:13:20+25:00",
     "nan", "inf", "1e9x", "2023-11-14T23:13:20Z junk", True, False, [NOW], {"t": NOW},
     float("nan"), float("inf"), float("-inf"), 10**400],
)
def test_garbage_eta_is_invalid_eta(value):
    refused({"eta": value}, "INVALID_ETA", "eta")
    with pytest.raises(TaskQueueError) as info:
        parse_eta(value)
    assert info.value.code == "INVALID_ETA"


def test_countdown_and_eta_together_are_refused():
    refused({"countdown": 5, "eta": NOW + 5}, "INVALID_REQUEST", "countdown")
    # an explicit null does not count
    assert make({"countdown": None, "eta": NOW + 5}).eta == NOW + 5


@given(
    st.datetimes(
        min_value=datetime.datetime(1970, 1, 2),
        max_value=datetime.datetime(9999, 1, 1),
        timezones=st.none() | st.timezones(),
    )
)
def test_parse_eta_agrees_with_datetime(moment):
    expected = moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)
    assert parse_eta(moment.isoformat()) == max(expected.timestamp(), 0.0)


@given(st.floats(0, 253402300799, allow_nan=False))
def test_rfc3339_round_trips_to_the_microsecond(seconds):
    text = rfc3339(seconds)
    assert text.endswith("Z")
    assert abs(parse_eta(text) - seconds) < 1e-3


# --- headers ----------------------------------------------------------------------------------


def test_reserved_headers_are_dropped():
    task = make(
        {
            "headers": {
                "X-AppEngine-QueueName": "other",
                "x-appengine-taskname": "spoof",
                "X-AppEngine-User-IP": "1.2.3.4",
                "Host": "evil.example",
                "Content-Length": "5",
                "Transfer-Encoding": "chunked",
                "Connection": "close",
                "Content-Type": "text/plain",
                "X-AppEngineNot": "kept",
            }
        }
    )
    assert task.headers == (("Content-Type", "text/plain"), ("X-AppEngineNot", "kept"))


def test_headers_as_a_list_of_pairs_keep_order_and_repeats():
    task = make({"headers": [["X-A", "1"], ["X-B", "2"], ["X-A", "3"], ["Host", "h"]]})
    assert task.headers == (("X-A", "1"), ("X-B", "2"), ("X-A", "3"))


@pytest.mark.parametrize(
    "value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x01b", "a\x7fb", "\ud800"]
)
def test_header_values_with_control_characters_are_refused(value):
    refused({"headers": {"X-A": value}}, "INVALID_REQUEST", "headers.X-A")


def test_header_values_may_hold_tabs_and_non_ascii():
    assert make({"headers": {"X-A": "a\tb ü ✓"}}).headers == (("X-A", "a\tb ü ✓"),)


@pytest.mark.parametrize("name", ["X A", "X:A", "X\r\nA", "", "ü", "X(A)"])
def test_bad_header_names_are_refused(name):
    refused({"headers": {name: "v"}}, "INVALID_REQUEST", "headers")


@pytest.mark.parametrize(
    "headers",
    ["X-A: 1", 5, [["X-A"]], [["X-A", "1", "2"]], ["X-A"], [[1, "v"]], {"X-A": 1}, {"X-A": None},
     [["X-A", ["v"]]]],
)
def test_malformed_headers_are_refused(headers):
    refused({"headers": headers}, "INVALID_REQUEST")


def test_header_count_and_size_limits():
    many = {f"X-H{i}": "v" for i in range(101)}
    refused({"headers": many}, "INVALID_REQUEST", "headers")
    assert len(make({"headers": dict(list(many.items())[:100])}).headers) == 100
    refused({"headers": {"X-Big": "v" * 16384}}, "INVALID_REQUEST", "headers")


# --- method and deadline ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET", "HEAD", "PUT", "DELETE", "post", "Put"])
def test_methods(method):
    assert make({"method": method}).method == method.upper()


@pytest.mark.parametrize("method", ["PATCH", "OPTIONS", "CONNECT", "", 0, False, [], "POST ", 1])
def test_bad_methods_are_refused(method):
    refused({"method": method}, "INVALID_REQUEST", "method")


@pytest.mark.parametrize("deadline", [15, 15.0, 30, 600, 86400])
def test_dispatch_deadline_in_bounds(deadline):
    assert make({"dispatch_deadline": deadline}).deadline == float(deadline)


@pytest.mark.parametrize("deadline", [14.99, 0, -1, 86400.5, 10**400, float("nan"),
                                      float("inf"), "30", True, [30]])
def test_dispatch_deadline_out_of_bounds(deadline):
    refused({"dispatch_deadline": deadline}, "INVALID_REQUEST", "dispatch_deadline")


def test_default_deadline_comes_from_the_limits():
    assert make({}, limits=Limits(default_deadline=42.0)).deadline == 42.0
    assert make({}).deadline == 600.0


def test_retry_options_errors_name_the_field():
    refused({"retry_options": {"task_retry_limit": -1}}, "INVALID_REQUEST",
            "retry_options.task_retry_limit")
    refused({"retry_options": "5"}, "INVALID_REQUEST", "retry_options")
    refused({"retry_options": {"bogus": 1}}, "INVALID_REQUEST", "retry_options.bogus")


# --- anything at all --------------------------------------------------------------------------

REQUEST_KEYS = ["name", "url", "method", "headers", "payload", "payload_base64", "countdown",
                "eta", "retry_options", "dispatch_deadline", "other"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                   max_size=4),
    max_leaves=10,
)
plausible = {
    "name": st.text(max_size=10) | st.just("ok-name"),
    "url": st.text(max_size=10).map(lambda s: "/" + s),
    "method": st.sampled_from(["POST", "GET", "get", "PATCH"]),
    "headers": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    | st.lists(st.lists(st.text(max_size=8), min_size=2, max_size=2), max_size=3),
    "payload": st.text(max_size=20),
    "payload_base64": st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
    "countdown": st.floats() | st.integers(),
    "eta": st.floats() | st.integers() | st.datetimes().map(lambda d: d.isoformat()),
    "retry_options": st.dictionaries(
        st.sampled_from(["task_retry_limit", "task_age_limit", "min_backoff_seconds",
                         "max_backoff_seconds", "max_doublings"]),
        st.floats() | st.integers(),
    ),
    "dispatch_deadline": st.floats() | st.integers(),
}


def check_outcome(body):
    try:
        task, _ = task_from_request("guestbook", "default", body, NOW)
    except TaskQueueError as e:
        assert e.http_status in (400, 413)
        return
    # whatever is accepted obeys the rules and survives the wire
    assert task.url.startswith("/") and len(task.url) <= 2083
    assert NOW <= task.eta <= NOW + 30 * DAY
    assert 15 <= task.deadline <= 86400
    assert len(task.payload) <= 102400
    assert task_from_headers(task_to_headers(task), task.payload) == task


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(REQUEST_KEYS), json_values))
def test_any_json_raises_only_task_queue_error(body):
    check_outcome(body)


@settings(max_examples=300)
@given(st.fixed_dictionaries({}, optional=plausible))
def test_plausible_requests_raise_only_task_queue_error(body):
    check_outcome(body)


# --- wire form --------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False)
retry_options = st.builds(
    RetryOptions,
    task_retry_limit=st.none() | st.integers(0, 10**9),
    task_age_limit=st.none() | st.floats(0, 1e9),
    min_backoff_seconds=st.none() | st.floats(0, 1e3),
    max_backoff_seconds=st.none() | st.floats(1e3, 1e9),
    max_doublings=st.none() | st.integers(0, 10**9),
)
tasks = st.builds(
    Task,
    app=text,
    queue=text,
    name=text,
    url=text,
    method=st.sampled_from(["POST", "GET", "HEAD", "PUT", "DELETE"]),
    headers=st.lists(st.tuples(text, text), max_size=4).map(tuple),
    payload=st.binary(max_size=200),
    eta=finite,
    created=finite,
    tid=text,
    retry_count=st.integers(0, 2**40),
    execution_count=st.integers(0, 2**40),
    first_attempt=st.none() | finite,
    retry=st.just(NO_OPTIONS) | retry_options,
    deadline=finite,
    previous_response=st.none() | st.integers(100, 599),
    retry_reason=st.none() | text,
)


@given(tasks)
def test_wire_round_trip(task):
    headers = task_to_headers(task)
    for key, value in headers.items():
        assert key.startswith("tq-")
        assert type(value) in (str, int), (key, value)  # what pika carries as-is
    assert task_from_headers(headers, task.payload) == task


@given(tasks)
def test_wire_round_trip_with_bytes_values(task):
    # pika hands back a long string it cannot decode as bytes; ours always decode
    headers = {k: v.encode() if isinstance(v, str) else v for k, v in task_to_headers(task).items()}
    assert task_from_headers(headers, task.payload) == task


def test_wire_form_of_a_retried_task():
    task = attrs.evolve(
        make({"name": "t1", "headers": {"X-A": "1"}, "retry_options": {"task_retry_limit": 0}}),
        retry_count=2,
        execution_count=1,
        first_attempt=NOW + 1,
        previous_response=503,
        retry_reason="HTTP 503",
    )
    headers = task_to_headers(task)
    assert headers["tq-name"] == "t1"
    assert headers["tq-retry-count"] == 2
    assert headers["tq-prev-response"] == 503
    assert json.loads(headers["tq-retry"]) == {"task_retry_limit": 0}
    assert json.loads(headers["tq-headers"]) == [["X-A", "1"]]
    assert task_from_headers(headers, task.payload) == task


def test_optional_headers_are_absent_when_unset():
    headers = task_to_headers(make({}))
    for key in ("tq-headers", "tq-retry", "tq-first-attempt", "tq-prev-response",
                "tq-retry-reason"):
        assert key not in headers


def valid_headers():
    return task_to_headers(make({"headers": {"X-A": "1"}, "retry_options": {"max_doublings": 2}}))


@pytest.mark.parametrize("headers", [None, {}, {"x-death": []}])
def test_foreign_messages_are_message_error(headers):
    with pytest.raises(MessageError):
        task_from_headers(headers, b"")


@pytest.mark.parametrize("key", ["tq-queue", "tq-name", "tq-tid", "tq-url", "tq-method",
                                 "tq-eta", "tq-created", "tq-deadline"])
def test_missing_required_header_is_message_error(key):
    headers = valid_headers()
    del headers[key]
    with pytest.raises(MessageError):
        task_from_headers(headers, b"")


@pytest.mark.parametrize(
    "key,value",
    [
        ("tq-app", 5),
        ("tq-eta", "soon"),
        ("tq-eta", 5),
        ("tq-eta", "nan"),
        ("tq-eta", "inf"),
        ("tq-created", "-inf"),
        ("tq-deadline", None),
        ("tq-first-attempt", "x"),
        ("tq-retry-count", "1"),
        ("tq-retry-count", True),
        ("tq-retry-count", 1.5),
        ("tq-exec-count", None),
        ("tq-headers", "not json"),
        ("tq-headers", '{"ab": "cd"}'),
        ("tq-headers", '"xy"'),
        ("tq-headers", '[["a"]]'),
        ("tq-headers", '[["a", 1]]'),
        ("tq-headers", '[[1, "a"]]'),
        ("tq-headers", "[" * 100000 + "]" * 100000),
        ("tq-headers", 7),
        ("tq-retry", "[]"),
        ("tq-retry", '{"task_retry_limit": -1}'),
        ("tq-retry", '{"bogus": 1}'),
        ("tq-retry", "{"),
        ("tq-retry-reason", 5),
    ],
)
def test_malformed_headers_are_message_error(key, value):
    headers = valid_headers()
    headers[key] = value
    with pytest.raises(MessageError):
        task_from_headers(headers, b"")


def test_unexpected_previous_response_is_ignored():
    headers = valid_headers()
    headers["tq-prev-response"] = True
    assert task_from_headers(headers, b"").previous_response is None
    headers["tq-prev-response"] = "503"
    assert task_from_headers(headers, b"").previous_response is None


def test_body_is_the_payload():
    headers = valid_headers()
    assert task_from_headers(headers, bytearray(b"\x00\xff")).payload == b"\x00\xff"
    with pytest.raises(MessageError):
        task_from_headers(headers, None)


def test_message_error_is_a_value_error():
    assert issubclass(MessageError, ValueError)
