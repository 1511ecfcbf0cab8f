"""queue.yaml parsing: DESIGN §3 (queue config, queue without a rate, pull queues) and
CASES C15–C20, C31–C33; the sample files are /work/shared/queue-yaml, copied to
tests/data/queue-yaml so the suite never depends on the outside folder."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appscale_tq.backoff import DEFAULT_MAX_BACKOFF, RetryOptions, may_retry, retry_delay
from appscale_tq.errors import HTTP_STATUS, TaskQueueError
from appscale_tq.queues import (
    DEFAULT_CONFIG,
    DEFAULT_QUEUE,
    QueueConfig,
    QueueDef,
    QueueYamlError,
    age_limit_seconds,
    parse_queue_yaml,
    rate_per_second,
    storage_limit_bytes,
)

DATA = Path(__file__).resolve().parent / "data" / "queue-yaml"
SAMPLES = [f"Q{i}.yaml" for i in range(1, 11)]


def sample(name: str) -> QueueConfig:
    return parse_queue_yaml((DATA / name).read_text())


def refused(text: str, **kwargs) -> QueueYamlError:
    with pytest.raises(QueueYamlError) as info:
        parse_queue_yaml(text, **kwargs)
    error = info.value
    assert isinstance(error, TaskQueueError)
    assert error.code in HTTP_STATUS and error.http_status == 400
    assert error.errors and all(isinstance(e, str) for e in error.errors)
    return error


def one_queue(body: str, name: str = "q") -> str:
    lines = "".join(f"  {line}\n" for line in body.strip().splitlines())
    return f"queue:\n- name: {name}\n{lines}"


def never_random():
    raise AssertionError("a queue with schedule parameters must not use jitter")


# --- the sample files --------------------------------------------------------------------------


def test_the_repo_holds_all_ten_samples():
    assert sorted(p.name for p in DATA.glob("*.yaml")) == sorted(SAMPLES)


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_parses_and_serialises_to_json(name):
    config = sample(name)
    assert "default" in config.queues
    assert config.queues["default"].mode == "push"
    json.dumps(config.as_dict())


def test_q1_default_overridden_with_target_retry_and_age():
    config = sample("Q1.yaml")
    assert list(config.queues) == ["default"]
    q = config.queues["default"]
    assert q.target == "notifier-svc"
    assert q.rate == 2.0 and q.rate_text == "2/s" and not q.rate_defaulted
    assert q.retry == RetryOptions(task_retry_limit=4, task_age_limit=259200.0)
    assert q.bucket_size == 5  # the commented-out bucket_size: 30 is a comment
    assert q.max_concurrent_requests is None
    assert config.total_storage_limit is None  # commented out too
    assert config.warnings == ()


def test_q2_per_minute_rates_bucket_concurrency_and_retry_limit_zero():
    config = sample("Q2.yaml")
    assert list(config.queues) == ["default", "mail-queue", "archive-queue"]
    mail, archive = config.queues["mail-queue"], config.queues["archive-queue"]
    assert mail.rate == pytest.approx(0.5) and mail.rate_text == "30/m"
    assert archive.rate == pytest.approx(1 / 60) and round(archive.rate, 4) == 0.0167
    assert (mail.bucket_size, mail.max_concurrent_requests) == (8, 8)
    assert (archive.bucket_size, archive.max_concurrent_requests) == (8, 1)
    assert mail.retry == RetryOptions()
    assert archive.retry == RetryOptions(task_retry_limit=0)
    # C16: task_retry_limit 0 = one attempt, never retried
    assert not may_retry(1, 0.0, archive.retry)
    assert config.queues["default"] == DEFAULT_QUEUE


def test_q3_targets_high_rates_and_the_default_max_backoff():
    config = sample("Q3.yaml")
    fanout, inbound = config.queues["commit-fanout"], config.queues["inbound"]
    assert (fanout.target, fanout.rate, fanout.max_concurrent_requests) == ("hub", 20.0, 20)
    assert (inbound.target, inbound.rate, inbound.max_concurrent_requests) == (
        "default", 250.0, 80)
    assert fanout.retry == RetryOptions(
        task_retry_limit=3, min_backoff_seconds=5.0, max_doublings=4)
    assert inbound.retry == RetryOptions(
        task_retry_limit=2, min_backoff_seconds=100.0, max_doublings=2)
    # unspecified max_backoff_seconds stays unset here and means GAE's 3600 s in the schedule
    assert fanout.retry.max_backoff_seconds is None
    delays = [retry_delay(n, inbound.retry, never_random) for n in range(1, 12)]
    assert delays[:5] == [100, 200, 400, 800, 1200]
    assert delays[-1] == DEFAULT_MAX_BACKOFF == 3600
    assert retry_delay(100, fanout.retry, never_random) == 3600


def test_q4_big_buckets_age_limit_only_and_targets_everywhere():
    config = sample("Q4.yaml")
    assert list(config.queues) == ["default", "request-queue", "event-queue", "sync-queue"]
    for name in ("request-queue", "event-queue", "sync-queue"):
        assert config.queues[name].target == "tfc"
    request, event, sync = (config.queues[n] for n in ("request-queue", "event-queue",
                                                        "sync-queue"))
    assert (request.rate, request.bucket_size, request.max_concurrent_requests) == (25, 5, None)
    assert (event.rate, event.bucket_size, event.max_concurrent_requests) == (150, 350, 150)
    assert (sync.rate, sync.bucket_size, sync.max_concurrent_requests) == (250, 350, 90)
    assert sync.retry == RetryOptions(task_age_limit=3600.0)
    # no count limit: retries until one hour has passed
    assert may_retry(1000, 3599.0, sync.retry)
    assert not may_retry(1, 3600.0, sync.retry)


def test_q4_bucket_of_501_is_refused():
    text = (DATA / "Q4.yaml").read_text().replace("bucket_size: 350", "bucket_size: 501", 1)
    error = refused(text)
    assert error.code == "INVALID_REQUEST"
    assert error.errors == ["queue 'event-queue': bucket_size: '501' must be between 1 and 500"]


def test_q5_pull_queue_needs_no_rate():
    config = sample("Q5.yaml")
    q = config.queues["pull-work"]
    assert q.mode == "pull" and q.is_pull
    assert q.rate is None and q.rate_text is None and not q.rate_defaulted
    assert config.warnings == ()
    assert q.as_dict()["rate"] is None


def test_q6_blank_lines_comments_and_trailing_spaces():
    config = sample("Q6.yaml")
    assert list(config.queues) == ["default", "backup-request"]
    q = config.queues["backup-request"]
    assert q.rate == 4.0
    assert q.retry == RetryOptions(
        task_retry_limit=2, task_age_limit=900.0, min_backoff_seconds=3.0,
        max_backoff_seconds=12.0)


def test_q7_queue_without_a_rate_gets_the_default_and_a_warning():
    config = sample("Q7.yaml")
    assert list(config.queues) == ["default", "crm", "messaging"]
    assert config.queues["default"].rate == 8.0
    crm = config.queues["crm"]
    assert crm.rate == 8.0
    assert crm.retry == RetryOptions(task_retry_limit=6, task_age_limit=86400.0)
    messaging = config.queues["messaging"]
    assert messaging.rate == 5.0 and messaging.bucket_size == 5
    assert messaging.rate_defaulted and messaging.rate_text == "5/s"
    assert config.warnings == ("queue 'messaging': no rate given, using the default 5/s",)


def test_q8_inline_comments_and_bucket_one():
    config = sample("Q8.yaml")
    new, refresh = config.queues["new-items"], config.queues["refresh-items"]
    assert new.rate == pytest.approx(0.05) and new.rate_text == "3/m" and new.bucket_size == 1
    assert refresh.rate == pytest.approx(0.8) and refresh.bucket_size == 6


def test_q9_storage_limit_and_rate_only_queues():
    config = sample("Q9.yaml")
    assert config.total_storage_limit == 800 * 1024**2
    assert list(config.queues) == ["default", "stats-queue", "log-queue", "slow-queue"]
    assert [q.rate for q in list(config.queues.values())[1:]] == [4.0, 70.0, 1.0]
    assert config.queues["default"] == DEFAULT_QUEUE  # not in the file: the implicit one
    assert config.as_dict()["total_storage_limit"] == 838860800


def test_q10_high_rate_and_concurrency_and_single_attempt_queue():
    config = sample("Q10.yaml")
    default, job, edit = (config.queues[n] for n in ("default", "job-queue", "edit-queue"))
    assert (default.rate, default.max_concurrent_requests) == (400.0, 4000)
    assert default.retry == RetryOptions(task_retry_limit=1)
    assert job.retry == RetryOptions(task_retry_limit=0)
    assert not may_retry(1, 0.0, job.retry)
    assert edit.rate == pytest.approx(0.2)
    assert all(q.bucket_size == 5 for q in config.queues.values())


# --- defaults and the empty file ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "\n", "# only a comment\n", "---\n", "queue:\n", "queue: []\n", "{}\n",
             "  \n# x\n\n"])
def test_empty_files_give_only_the_default_queue(text):
    config = parse_queue_yaml(text)
    assert config == DEFAULT_CONFIG
    assert list(config.queues) == ["default"]


def test_the_default_config():
    q = DEFAULT_CONFIG.queues["default"]
    assert (q.name, q.mode, q.rate, q.bucket_size) == ("default", "push", 5.0, 5)
    assert q.max_concurrent_requests is None and q.target is None and q.retry == RetryOptions()
    assert DEFAULT_CONFIG.total_storage_limit is None
    assert DEFAULT_CONFIG.resume_paused_queues is None
    assert DEFAULT_CONFIG.warnings == ()
    assert DEFAULT_CONFIG.as_dict() == {
        "queues": [{
            "name": "default", "mode": "push", "rate": 5.0, "rate_text": "5/s",
            "bucket_size": 5, "max_concurrent_requests": None, "target": None,
            "retry_parameters": {}, "acl": [],
        }],
        "total_storage_limit": None,
        "resume_paused_queues": None,
        "warnings": [],
    }


def test_as_dict_keeps_only_the_retry_keys_that_were_set():
    config = parse_queue_yaml(one_queue("rate: 1/s\nretry_parameters: {max_doublings: 0}"))
    assert config.as_dict()["queues"][1]["retry_parameters"] == {"max_doublings": 0}


def test_queues_keep_file_order_and_default_may_come_last():
    config = parse_queue_yaml(
        "queue:\n- name: b\n  rate: 1/s\n- name: a\n  rate: 1/s\n- name: default\n  rate: 2/s\n")
    assert list(config.queues) == ["b", "a", "default"]
    assert config.queues["default"].rate == 2.0


# --- rates (C32) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("1.5/s", 1.5), ("0.5/s", 0.5), ("2/m", 2 / 60), ("64/m", 64 / 60), ("1/d", 1 / 86400),
     ("0/s", 0.0), ("0", 0.0), ("3/h", 3 / 3600), ("1./s", 1.0), ("500/s", 500.0),
     ("2000/d", 2000 / 86400)],
)
def test_c32_valid_rates(text, per_second):
    assert rate_per_second(text) == pytest.approx(per_second)
    config = parse_queue_yaml(one_queue(f"rate: '{text}'"))
    assert config.queues["q"].rate == pytest.approx(per_second)
    assert config.queues["q"].rate_text == text


@pytest.mark.parametrize(
    "text", ["5", "5/x", "5/sec", "-1/s", "1e3/s", "5 /s", "5/ s", "/s", ".5/s", "5/S", "5/s ",
             " 5/s", "5/s\n", "five/s", "5//s", "1/s/s", "00", "0.0", "", "٥/s", "inf/s",
             "nan/s", "0x10/s", "1_0/s"],
)
def test_c32_invalid_rates(text):
    with pytest.raises(ValueError):
        rate_per_second(text)
    error = refused(one_queue(f"rate: {json.dumps(text)}", name="mail-queue"))
    assert error.code == "INVALID_QUEUE_RATE"
    assert error.errors == [
        f"queue 'mail-queue': rate: {text!r} is not N/s, N/m, N/h or N/d"]


def test_c32_message_names_queue_and_key_exactly():
    error = refused(one_queue("rate: 5/sec", name="mail-queue"))
    assert error.message == "queue 'mail-queue': rate: '5/sec' is not N/s, N/m, N/h or N/d"
    assert str(error) == "INVALID_QUEUE_RATE: " + error.message


def test_c32_yaml_numbers_are_read_as_written():
    assert parse_queue_yaml(one_queue("rate: 0")).queues["q"].rate == 0.0
    for written in ("5", "0.5", "1e3", "0x0", "0o0", "00"):
        error = refused(one_queue(f"rate: {written}"))
        assert error.code == "INVALID_QUEUE_RATE"
        assert f"rate: {written!r}" in error.message


def test_rate_zero_holds_tasks():  # C19
    q = parse_queue_yaml(one_queue("rate: 0/s\nbucket_size: 1\nmax_concurrent_requests: 1"))
    q = q.queues["q"]
    assert (q.rate, q.bucket_size, q.max_concurrent_requests) == (0.0, 1, 1)


def test_rate_above_the_maximum_is_refused():
    error = refused(one_queue("rate: 501/s"))
    assert error.code == "INVALID_QUEUE_RATE"
    assert error.errors == ["queue 'q': rate: '501/s' is above the maximum 500/s"]
    assert parse_queue_yaml(one_queue("rate: 500/s")).queues["q"].rate == 500.0
    assert parse_queue_yaml(one_queue("rate: 30000/m")).queues["q"].rate == 500.0
    refused(one_queue("rate: 30001/m"))
    # max_rate is a parameter
    assert parse_queue_yaml(one_queue("rate: 501/s"), max_rate=1000).queues["q"].rate == 501
    assert refused(one_queue("rate: 2/s"), max_rate=1).code == "INVALID_QUEUE_RATE"


def test_huge_rates_are_refused_not_infinite():
    refused(one_queue("rate: " + "9" * 400 + "/s"))
    with pytest.raises(ValueError):
        rate_per_second("9" * 400 + "/s")


def test_only_rate_problems_give_invalid_queue_rate_else_invalid_request():
    both = refused("queue:\n- name: a\n  rate: 5/x\n- name: b\n  rate: 1/s\n  bucket_size: 0\n")
    assert both.code == "INVALID_REQUEST"
    assert len(both.errors) == 2
    rates = refused("queue:\n- name: a\n  rate: 5/x\n- name: b\n  rate: 600/s\n")
    assert rates.code == "INVALID_QUEUE_RATE"
    assert len(rates.errors) == 2


# --- the other keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [
    ("1", True), ("500", True), ("0", False), ("501", False), ("-1", False), ("5.0", False),
    ("yes", False), ("'8'", True), ("5.5", False), ("[5]", False), ("{a: 1}", False),
    ("99999999999999999999999999999999999", False), ("!!int 7", True), ("!!bool true", False),
])
def test_bucket_size(value, ok):
    text = one_queue(f"rate: 1/s\nbucket_size: {value}")
    if ok:
        assert 1 <= parse_queue_yaml(text).queues["q"].bucket_size <= 500
    else:
        error = refused(text)
        assert error.code == "INVALID_REQUEST"
        assert error.errors[0].startswith("queue 'q': bucket_size: ")


@pytest.mark.parametrize(("value", "ok"), [
    ("1", True), ("5000", True), ("0", False), ("5001", False), ("-3", False), ("on", False),
    ("2.5", False),
])
def test_max_concurrent_requests(value, ok):
    text = one_queue(f"rate: 1/s\nmax_concurrent_requests: {value}")
    if ok:
        assert parse_queue_yaml(text).queues["q"].max_concurrent_requests == int(value)
    else:
        assert refused(text).errors[0].startswith("queue 'q': max_concurrent_requests: ")


@pytest.mark.parametrize("name", ["a", "A-list-queue-fast", "0", "x" * 100, "default", "a-b-c"])
def test_good_queue_names(name):
    assert name in parse_queue_yaml(one_queue("rate: 1/s", name=json.dumps(name))).queues


@pytest.mark.parametrize("name", ["x" * 101, "a_b", "a b", "a.b", "ü", "''", "!!int 5", "[a]", "~"])
def test_bad_queue_names(name):
    error = refused(one_queue("rate: 1/s", name=name))
    assert error.code == "INVALID_REQUEST"
    assert error.errors[0].startswith("queue #1: name: ")


def test_name_is_required():
    error = refused("queue:\n- rate: 1/s\n")
    assert error.errors == ["queue #1: name: required"]


def test_duplicate_queue_names_are_refused():
    error = refused("queue:\n- name: a\n  rate: 1/s\n- name: a\n  rate: 2/s\n")
    assert error.errors == ["queue 'a': name: defined more than once"]


def test_duplicate_keys_are_refused():
    error = refused("queue:\n- name: a\n  rate: 1/s\n  rate: 2/s\n")
    assert "duplicate key 'rate'" in error.message


@pytest.mark.parametrize("value", ["push", "pull"])
def test_modes(value):
    body = "rate: 1/s\n" if value == "push" else ""
    assert parse_queue_yaml(one_queue(body + f"mode: {value}")).queues["q"].mode == value


@pytest.mark.parametrize("value", ["PULL", "Push", "fast", "1", "[pull]", "true"])
def test_bad_modes(value):
    error = refused(one_queue(f"mode: {value}"))
    assert error.errors[0].startswith("queue 'q': mode: ")


@pytest.mark.parametrize("key", ["rate: 1/s", "bucket_size: 5", "max_concurrent_requests: 2",
                                 "target: svc"])
def test_pull_queues_must_not_set_push_keys(key):
    error = refused(one_queue(f"mode: pull\n{key}"))
    assert error.errors == [f"queue 'q': {key.split(':')[0]}: not allowed on a pull queue"]
    assert error.code == "INVALID_REQUEST"


def test_pull_queues_may_set_only_task_retry_limit():
    config = parse_queue_yaml(one_queue("mode: pull\nretry_parameters: {task_retry_limit: 3}"))
    assert config.queues["q"].retry == RetryOptions(task_retry_limit=3)
    for key in ("task_age_limit: 1d", "min_backoff_seconds: 1", "max_backoff_seconds: 2",
                "max_doublings: 1"):
        error = refused(one_queue(f"mode: pull\nretry_parameters: {{{key}}}"))
        assert error.errors == [
            f"queue 'q': retry_parameters.{key.split(':')[0]}: not allowed on a pull queue "
            "(only task_retry_limit is)"]


def test_the_default_queue_cannot_be_a_pull_queue():
    error = refused(one_queue("mode: pull", name="default"))
    assert error.errors == ["queue 'default': mode: the default queue must be a push queue"]


@pytest.mark.parametrize("target", ["svc", "notifier-svc", "v2.svc", "Svc", "a1.b-2", "default",
                                    "x" * 63, "v" * 100 + ".s"])
def test_good_targets(target):
    assert parse_queue_yaml(one_queue(f"rate: 1/s\ntarget: {target}")).queues["q"].target == target


@pytest.mark.parametrize("target", ["-svc", "svc_1", "a.b.c", "a..b", "", "'  '", "svc.",
                                    ".svc", "x" * 64, "s/v", "[a]", "1.2.3"])
def test_bad_targets(target):
    error = refused(one_queue(f"rate: 1/s\ntarget: {target or json.dumps(target)}"))
    assert error.errors[0].startswith("queue 'q': target: ")


def test_c33_unknown_target_is_a_clear_error():
    known = {"svc", "v1.svc"}.__contains__
    assert parse_queue_yaml(one_queue("rate: 1/s\ntarget: svc"), known_targets=known)
    error = refused(one_queue("rate: 1/s\ntarget: svc-missing"), known_targets=known)
    assert error.errors == ["queue 'q': target: unknown target 'svc-missing'"]
    assert error.code == "INVALID_REQUEST"


# --- retry_parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("3d", 259200), ("15m", 900), ("1h", 3600), ("60s", 60), ("1.5m", 90), ("1s", 1),
    ("0.5m", 30), ("2.d", 172800), (" 15m ", 900), ("1.9s", 1),
])
def test_age_limits(text, seconds):
    assert age_limit_seconds(text) == seconds
    body = f"rate: 1/s\nretry_parameters: {{task_age_limit: {text.strip()}}}"
    config = parse_queue_yaml(one_queue(body))
    assert config.queues["q"].retry.task_age_limit == seconds


@pytest.mark.parametrize("text", ["60", "0s", "0.5s", "-1s", "1e3s", "5 m", "5x", "m", "1w",
                                  "", "1.5", "inf s"])
def test_bad_age_limits(text):
    with pytest.raises(ValueError):
        age_limit_seconds(text)
    body = f"rate: 1/s\nretry_parameters: {{task_age_limit: {json.dumps(text)}}}"
    error = refused(one_queue(body))
    assert error.errors[0].startswith("queue 'q': retry_parameters.task_age_limit: ")


def test_bare_number_age_limit_is_refused():
    error = refused(one_queue("rate: 1/s\nretry_parameters:\n  task_age_limit: 60"))
    assert error.errors == ["queue 'q': retry_parameters.task_age_limit: '60' is not a number "
                            "followed by s, m, h or d"]


def test_retry_parameters_all_keys():
    config = parse_queue_yaml(one_queue(
        "rate: 1/s\nretry_parameters:\n  task_retry_limit: 7\n  task_age_limit: 2d\n"
        "  min_backoff_seconds: 0.1\n  max_backoff_seconds: 200\n  max_doublings: 3"))
    assert config.queues["q"].retry == RetryOptions(7, 172800.0, 0.1, 200.0, 3)


def test_c15_backoff_schedules_from_yaml():
    linear = parse_queue_yaml(one_queue(
        "rate: 1/s\nretry_parameters: {min_backoff_seconds: 10, max_backoff_seconds: 200, "
        "max_doublings: 0}")).queues["q"].retry
    assert [retry_delay(n, linear, never_random) for n in range(1, 22)] == [
        10 * n for n in range(1, 20)] + [200, 200]
    doubling = parse_queue_yaml(one_queue(
        "rate: 1/s\nretry_parameters: {min_backoff_seconds: 10, max_backoff_seconds: 300, "
        "max_doublings: 3}")).queues["q"].retry
    assert [retry_delay(n, doubling, never_random) for n in range(1, 9)] == [
        10, 20, 40, 80, 160, 240, 300, 300]


def test_c17_both_limits_from_yaml():
    retry = parse_queue_yaml(one_queue(
        "rate: 1/s\nretry_parameters: {task_retry_limit: 2, task_age_limit: 60s, "
        "min_backoff_seconds: 1}")).queues["q"].retry
    assert retry == RetryOptions(task_retry_limit=2, task_age_limit=60.0, min_backoff_seconds=1.0)
    assert may_retry(5, 10.0, retry) and may_retry(1, 100.0, retry)
    assert not may_retry(3, 60.0, retry)


@pytest.mark.parametrize(("body", "key"), [
    ("task_retry_limit: -1", "task_retry_limit"),
    ("task_retry_limit: 1.5", "task_retry_limit"),
    ("task_retry_limit: yes", "task_retry_limit"),
    ("max_doublings: -2", "max_doublings"),
    ("min_backoff_seconds: -0.5", "min_backoff_seconds"),
    ("max_backoff_seconds: abc", "max_backoff_seconds"),
    ("max_backoff_seconds: .inf", "max_backoff_seconds"),
    ("max_backoff_seconds: nan", "max_backoff_seconds"),
    ("min_backoff_seconds: 1e12", "min_backoff_seconds"),
    ("task_retry_limit: 99999999999", "task_retry_limit"),
])
def test_bad_retry_values_name_queue_and_key(body, key):
    error = refused(one_queue(f"rate: 1/s\nretry_parameters:\n  {body}"))
    assert error.code == "INVALID_REQUEST"
    assert len(error.errors) == 1
    assert error.errors[0].startswith(f"queue 'q': retry_parameters.{key}: ")


def test_min_backoff_above_max_is_refused():
    error = refused(one_queue(
        "rate: 1/s\nretry_parameters: {min_backoff_seconds: 10, max_backoff_seconds: 5}"))
    assert error.errors == [
        "queue 'q': retry_parameters.min_backoff_seconds: must not exceed max_backoff_seconds"]


def test_unknown_retry_key_and_non_mapping_retry_parameters():
    error = refused(one_queue("rate: 1/s\nretry_parameters: {task_retry_limt: 1}"))
    assert error.errors[0].startswith("queue 'q': retry_parameters: unknown key 'task_retry_limt'")
    error = refused(one_queue("rate: 1/s\nretry_parameters: 5"))
    assert error.errors == ["queue 'q': retry_parameters: must be a mapping, not '5'"]


def test_retry_number_formats():
    retry = parse_queue_yaml(one_queue(
        "rate: 1/s\nretry_parameters: {min_backoff_seconds: 1e2, max_backoff_seconds: '300',"
        " task_retry_limit: +3, max_doublings: 0}")).queues["q"].retry
    assert retry == RetryOptions(task_retry_limit=3, min_backoff_seconds=100.0,
                                 max_backoff_seconds=300.0, max_doublings=0)


# --- acl ---------------------------------------------------------------------------------------


def test_acl_on_a_pull_queue():
    config = parse_queue_yaml(one_queue(
        "mode: pull\nacl:\n- user_email: bar@foo.com\n- writer_email: user@gmail.com\n"
        "- writer_email: bar@foo.com"))
    q = config.queues["q"]
    assert q.acl == ({"user_email": "bar@foo.com"}, {"writer_email": "user@gmail.com"},
                     {"writer_email": "bar@foo.com"})
    assert q.as_dict()["acl"][0] == {"user_email": "bar@foo.com"}
    assert config.warnings == ()


def test_acl_on_a_push_queue_is_kept_with_a_warning():
    config = parse_queue_yaml(one_queue("rate: 1/s\nacl:\n- user_email: a@b.c"))
    assert config.queues["q"].acl == ({"user_email": "a@b.c"},)
    assert config.warnings == ("queue 'q': acl applies to pull queues only; ignored",)


@pytest.mark.parametrize("acl", ["a@b.c", "[a@b.c]", "[{reader_email: a@b.c}]",
                                 "[{user_email: !!int 5}]", "[{user_email: [a]}]", "[{}]",
                                 "[{user_email: ''}]"])
def test_bad_acls(acl):
    error = refused(one_queue(f"mode: pull\nacl: {acl}"))
    assert error.errors[0].startswith("queue 'q': acl")


# --- top level (C31) ---------------------------------------------------------------------------


C31 = """\
total_storage_limit: 120M
queue:
- name: fine
  rate: 1/s
- name: odd-queue
  rate: 1/s
  foo: 1
- name: negative-queue
  rate: 1/s
  retry_parameters:
    task_retry_limit: -1
"""


def test_c31_storage_limit_accepted_unknown_key_and_negative_value_refused():
    error = refused(C31)
    assert error.code == "INVALID_REQUEST" and error.http_status == 400
    assert error.errors == [
        "queue 'odd-queue': unknown key 'foo'; known: name, mode, rate, bucket_size, "
        "max_concurrent_requests, target, retry_parameters, acl",
        "queue 'negative-queue': retry_parameters.task_retry_limit: must not be negative, "
        "not -1",
    ]
    assert "total_storage_limit" not in error.message
    fixed = C31.replace("  foo: 1\n", "").replace("-1", "1")
    config = parse_queue_yaml(fixed)
    assert config.total_storage_limit == 120 * 1024**2
    assert list(config.queues) == ["default", "fine", "odd-queue", "negative-queue"]


@pytest.mark.parametrize(("text", "size"), [
    ("120M", 120 * 2**20), ("800M", 800 * 2**20), ("1024", 1024), ("10B", 10), ("2K", 2048),
    ("1.5G", 3 * 2**29), ("1T", 2**40), ("0", 0), ("0.5K", 512),
])
def test_storage_limits(text, size):
    assert storage_limit_bytes(text) == size
    assert parse_queue_yaml(f"total_storage_limit: {text}").total_storage_limit == size


@pytest.mark.parametrize("text", ["120MB", "1.5", "-1M", "M", "1 M", "lots", "1m", "1e3",
                                  "9" * 30 + "T", "[1]"])
def test_bad_storage_limits(text):
    error = refused(f"total_storage_limit: {text}")
    assert error.errors[0].startswith("queue.yaml: total_storage_limit: ")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("yes", True),
                                             ("False", False), ("on", True)])
def test_resume_paused_queues(text, value):
    assert parse_queue_yaml(f"resume_paused_queues: {text}").resume_paused_queues is value


def test_bad_resume_paused_queues():
    error = refused("resume_paused_queues: maybe")
    assert error.errors == ["queue.yaml: resume_paused_queues: 'maybe' is not true or false"]


def test_unknown_top_level_key_is_named():
    error = refused("queues:\n- name: a\n  rate: 1/s\n")
    assert error.errors[0].startswith("queue.yaml: unknown top-level key 'queues'")


def test_application_key_is_ignored_with_a_warning():
    config = parse_queue_yaml("application: myapp\nqueue:\n- name: a\n  rate: 1/s\n")
    assert list(config.queues) == ["default", "a"]
    assert config.warnings == ("queue.yaml: application: ignored (the API names the app)",)


def test_all_problems_are_reported_at_once():
    error = refused(
        "bogus: 1\nqueue:\n- name: a\n  rate: 5/sec\n  bucket_size: 0\n"
        "- name: b\n  rate: 1/s\n  max_concurrent_requests: 0\n  bar: 2\n"
        "- name: c\n  mode: pull\n  rate: 1/s\n- 7\n")
    assert len(error.errors) == 7
    for fragment in ("'bogus'", "queue 'a': rate", "queue 'a': bucket_size",
                     "queue 'b': max_concurrent_requests", "queue 'b': unknown key 'bar'",
                     "queue 'c': rate: not allowed", "queue #4: must be a mapping"):
        assert fragment in error.message


def test_a_long_list_of_problems_is_cut_in_the_message_but_kept_whole():
    text = "queue:\n" + "".join(f"- name: q{i}\n  rate: bad\n" for i in range(80))
    error = refused(text)
    assert len(error.errors) == 80
    assert error.message.endswith("... and 30 more")


# --- C33 ---------------------------------------------------------------------------------------


C33 = """\
queue:
- name: default
  rate: 10/s
- name: A-list-queue-fast
  rate: 100/s
  bucket_size: 100
- name: A-list-queue-slow
  rate: 1/s
- name: B-list-queue
  rate: 20/m
- name: mail
  rate: 2000/d
  bucket_size: 10
- name: push-notifications
  rate: 50/s
  max_concurrent_requests: 10
- name: reports
  rate: 1/h
- name: exports
  rate: 0.5/s
  target: v2.exporter
- name: cleanup
  rate: 0/s
- name: imports
  rate: 3/s
  retry_parameters:
    task_retry_limit: 5
    min_backoff_seconds: 2
- name: pull-jobs
  mode: pull
- name: messaging
"""


def test_c33_twelve_queues_all_parsed():
    config = parse_queue_yaml(C33)
    assert list(config.queues) == [
        "default", "A-list-queue-fast", "A-list-queue-slow", "B-list-queue", "mail",
        "push-notifications", "reports", "exports", "cleanup", "imports", "pull-jobs",
        "messaging"]
    fast = config.queues["A-list-queue-fast"]
    assert (fast.rate, fast.bucket_size) == (100.0, 100)
    assert config.queues["mail"].rate == pytest.approx(2000 / 86400)
    assert config.queues["exports"].target == "v2.exporter"
    assert config.queues["pull-jobs"].mode == "pull"
    messaging = config.queues["messaging"]
    assert (messaging.rate, messaging.bucket_size, messaging.rate_defaulted) == (5.0, 5, True)
    assert config.warnings == ("queue 'messaging': no rate given, using the default 5/s",)
    assert [q.name for q in config.queues.values() if q.rate_defaulted] == ["messaging"]


def test_c33_default_defined_without_rate_also_gets_the_default_rate():
    config = parse_queue_yaml("queue:\n- name: default\n  bucket_size: 20\n")
    q = config.queues["default"]
    assert (q.rate, q.bucket_size, q.rate_defaulted) == (5.0, 20, True)
    assert config.warnings == ("queue 'default': no rate given, using the default 5/s",)


# --- whatever the input, only QueueYamlError ------------------------------------------------


@pytest.mark.parametrize("text", [
    "queue:\n\t- name: a\n",  # a tab
    "queue: [\n",
    "- a\n- b\n",
    "just a string",
    "42",
    "queue: 5",
    "queue: [1, 'x', null, [a]]",
    "queue:\n- name: a\n  rate: !!int x\n",
    "queue:\n- name: a\n  rate: !!python/object:os.system x\n",
    "queue:\n- name: a\n  rate: !!binary '###'\n",
    "queue:\n- name: a\n  rate: !!timestamp 2020-01-01\n",
    "queue:\n- name: a\n  rate: !!float 1.5\n",
    "? [a, b]\n: 1\n",
    "queue:\n- ? {a: 1}\n  : 2\n",
    "--- {}\n--- {}\n",
    "queue: &a\n- *a\n",
    "queue:\n- &q {name: a, rate: 1/s}\n- *q\n",
    "queue:\n- name: a\n  <<: {rate: 1/s}\n",
    "\x00",
    "queue: [\x07]",
    "[" * 5000,
    "queue:\n- name: a\n  rate: 1/s\n  retry_parameters: [1]\n  acl: {a: 1}\n",
    "queue:\n- name: a\n  bucket_size: " + "9" * 5000 + "\n",
    "queue:\n- name: a\n  retry_parameters: {task_retry_limit: " + "9" * 5000 + "}\n",
    "total_storage_limit: " + "9" * 5000 + "\n",
    "total_storage_limit: !!int " + "9" * 50 + "\n",
    "~: 1\n",
    "queue:\n- name: a\n  ~: 1\n  1: 2\n",
])
def test_garbage_gives_only_queue_yaml_error(text):
    refused(text)


def test_billion_laughs_is_refused_quickly_without_expanding():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("queue:\n- name: q\n  rate: *a9\n  bucket_size: *a9\n  target: *a9\n  acl: *a9")
    error = refused("\n".join(lines))
    assert len(error.message) < 5000


@pytest.mark.parametrize("value", [None, 5, b"\xff\xfe", ["queue:"]])
def test_non_text_input_gives_queue_yaml_error(value):
    with pytest.raises(QueueYamlError):
        parse_queue_yaml(value)


def test_bytes_input_is_decoded():
    assert parse_queue_yaml(b"queue:\n- name: a\n  rate: 1/s\n").queues["a"].rate == 1.0


def test_the_module_is_pure():
    import appscale_tq.queues as module

    source = Path(module.__file__).read_text()
    imports = {line.split()[1] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "math", "re", "collections.abc", "typing", "attrs", "yaml",
                       "appscale_tq.backoff", "appscale_tq.errors", "appscale_tq.names"}


# --- hypothesis --------------------------------------------------------------------------------

NAME_CHARS = string.ascii_letters + string.digits + "-"
names = st.text(NAME_CHARS, min_size=1, max_size=100)
numbers = st.from_regex(r"[0-9]{1,4}(\.[0-9]{0,3})?", fullmatch=True)
rates = st.one_of(
    st.just("0"),
    st.builds(lambda n, u: f"{n}/{u}", numbers, st.sampled_from("smhd")),
).filter(lambda r: rate_per_second(r) <= 500)
ages = st.builds(lambda n, u: f"{n}{u}", numbers, st.sampled_from("smhd")).filter(
    lambda a: float(a[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[a[-1]] >= 1)
label = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
targets = st.one_of(label, st.builds(lambda v, s: f"{v}.{s}", label, label))


@st.composite
def retry_parameters(draw, pull: bool):
    params: dict[str, object] = {}
    if draw(st.booleans()):
        params["task_retry_limit"] = draw(st.integers(0, 1000))
    if pull:
        return params
    if draw(st.booleans()):
        params["task_age_limit"] = draw(ages)
    backoff = sorted(draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2,
                                   max_size=2)))
    if draw(st.booleans()):
        params["min_backoff_seconds"] = backoff[0]
    if draw(st.booleans()):
        params["max_backoff_seconds"] = backoff[1]
    if draw(st.booleans()):
        params["max_doublings"] = draw(st.integers(0, 100))
    return params


@st.composite
def queue_definitions(draw):
    pull = draw(st.booleans())
    queue: dict[str, object] = {"name": draw(names)}
    if pull:
        queue["mode"] = "pull"
        if draw(st.booleans()):
            queue["acl"] = draw(st.lists(st.fixed_dictionaries(
                {}, optional={"user_email": st.emails(), "writer_email": st.emails()}
            ).filter(bool), max_size=3))
    else:
        if draw(st.booleans()):
            queue["mode"] = "push"
        if draw(st.booleans()):
            queue["rate"] = draw(rates)
        if draw(st.booleans()):
            queue["bucket_size"] = draw(st.integers(1, 500))
        if draw(st.booleans()):
            queue["max_concurrent_requests"] = draw(st.integers(1, 5000))
        if draw(st.booleans()):
            queue["target"] = draw(targets)
    retry = draw(retry_parameters(pull))
    if retry:
        queue["retry_parameters"] = retry
    if pull and queue["name"] == "default":
        queue["name"] = "default-pull"
    return queue


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(queue_definitions(), max_size=6, unique_by=lambda q: q["name"]),
       st.one_of(st.none(), st.integers(0, 2**40)), st.sampled_from([None, True, False]),
       st.booleans())
def test_valid_definitions_round_trip(queues, storage, resume, flow_style):
    document: dict[str, object] = {"queue": queues}
    if storage is not None:
        document["total_storage_limit"] = storage
    if resume is not None:
        document["resume_paused_queues"] = resume
    text = yaml.safe_dump(document, default_flow_style=flow_style, sort_keys=False)
    config = parse_queue_yaml(text)

    defined = [q["name"] for q in queues]
    expected_names = defined if "default" in defined else ["default", *defined]
    assert list(config.queues) == expected_names
    assert config.total_storage_limit == storage
    assert config.resume_paused_queues is resume
    defaulted = []
    for spec in queues:
        q = config.queues[spec["name"]]
        assert q.mode == spec.get("mode", "push")
        if q.mode == "pull":
            assert q.rate is None and q.rate_text is None
        elif "rate" in spec:
            assert q.rate_text == spec["rate"]
            assert q.rate == rate_per_second(spec["rate"])
            assert not q.rate_defaulted
        else:
            assert (q.rate, q.rate_text, q.rate_defaulted) == (5.0, "5/s", True)
            defaulted.append(q.name)
        assert q.bucket_size == spec.get("bucket_size", 5)
        assert q.max_concurrent_requests == spec.get("max_concurrent_requests")
        assert q.target == spec.get("target")
        assert q.acl == tuple(spec.get("acl", ()))
        retry = dict(spec.get("retry_parameters", {}))
        if "task_age_limit" in retry:
            retry["task_age_limit"] = age_limit_seconds(retry["task_age_limit"])
        assert q.retry.as_dict() == retry
        assert q.as_dict()["retry_parameters"] == retry
    assert config.warnings == tuple(
        f"queue {name!r}: no rate given, using the default 5/s" for name in defaulted)
    assert json.loads(json.dumps(config.as_dict())) == config.as_dict()


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_random_text_gives_a_config_or_queue_yaml_error(text):
    try:
        config = parse_queue_yaml(text)
    except QueueYamlError as error:
        assert error.errors and error.code in ("INVALID_REQUEST", "INVALID_QUEUE_RATE")
    else:
        assert isinstance(config, QueueConfig) and "default" in config.queues


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(),
    st.text(max_size=20), st.sampled_from(["5/s", "0", "1d", "pull", "push", "svc", "120M",
                                           "a@b.c", "default", "-1", "1e3/s", "yes"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
queue_keys = st.sampled_from([
    "name", "mode", "rate", "bucket_size", "max_concurrent_requests", "target",
    "retry_parameters", "acl", "foo"])
retry_keys = st.sampled_from([
    "task_retry_limit", "task_age_limit", "min_backoff_seconds", "max_backoff_seconds",
    "max_doublings", "bar"])
near_queues = st.dictionaries(
    queue_keys,
    st.one_of(yaml_values, st.dictionaries(retry_keys, yaml_values, max_size=5),
              st.lists(st.dictionaries(st.sampled_from(["user_email", "writer_email", "x"]),
                                       yaml_values, max_size=2), max_size=3)),
    max_size=8,
)
near_documents = st.one_of(
    yaml_values,
    st.dictionaries(
        st.sampled_from(["queue", "total_storage_limit", "resume_paused_queues",
                         "application", "other"]),
        st.one_of(yaml_values, st.lists(st.one_of(near_queues, yaml_values), max_size=5)),
        max_size=4,
    ),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(near_documents, st.booleans())
def test_random_structures_give_a_config_or_queue_yaml_error(document, flow_style):
    text = yaml.safe_dump(document, default_flow_style=flow_style)
    try:
        config = parse_queue_yaml(text)
    except QueueYamlError as error:
        assert error.errors and len(error.message) < 20000
    else:
        assert "default" in config.queues
        json.dumps(config.as_dict())
        for q in config.queues.values():
            assert isinstance(q, QueueDef)
            assert q.rate is None or (math.isfinite(q.rate) and 0 <= q.rate <= 500)
            assert 1 <= q.bucket_size <= 500
