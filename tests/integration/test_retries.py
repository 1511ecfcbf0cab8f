"""Failures, retries, deadlines and deferred tasks against the real servers."""

from __future__ import annotations

import time

import pytest_twisted
from conftest import sleep, wait_for


@pytest_twisted.ensureDeferred
async def test_500_twice_then_200_gives_three_attempts_with_counting_headers(client):
    """C14/C29: every non-2xx is a failure; headers count the attempts."""
    code, _ = await client.enqueue(
        name="t1", url=client.task_url("/h?fail=2&status=500"),
        retry_options={"task_retry_limit": 5, "min_backoff_seconds": 0.2},
    )
    assert code == 201
    state = await client.wait_state("t1", "completed", timeout=20)
    attempts = client.received("t1")
    assert [r["headers"]["x-appengine-taskretrycount"] for r in attempts] == ["0", "1", "2"]
    assert [r["headers"]["x-appengine-taskexecutioncount"] for r in attempts] == ["0", "1", "2"]
    assert "x-appengine-taskpreviousresponse" not in attempts[0]["headers"]
    assert [r["headers"]["x-appengine-taskpreviousresponse"] for r in attempts[1:]] == ["500"] * 2
    assert all("x-appengine-taskretryreason" in r["headers"] for r in attempts[1:])
    etas = [float(r["headers"]["x-appengine-tasketa"]) for r in attempts]
    assert etas == sorted(etas) and etas[1] > etas[0]
    assert state["retry_count"] == 2 and state["last_response"] == 200


@pytest_twisted.ensureDeferred
async def test_422_then_404_then_200(client):
    """C14: 4xx answers are retried too."""
    code, _ = await client.enqueue(
        name="c14", url=client.task_url("/h?fail=1&status=422"),
        retry_options={"min_backoff_seconds": 0.1, "max_backoff_seconds": 0.2},
    )
    assert code == 201
    await client.wait_state("c14", "completed", timeout=20)
    assert len(client.received("c14")) == 2


@pytest_twisted.ensureDeferred
async def test_redirect_is_a_failure_and_its_location_is_never_fetched(client):
    """C28."""
    trap = client.task_url("/trap")
    code, _ = await client.enqueue(
        name="r302", url=client.task_url(f"/h?fail=1&status=302&location={trap}"),
        retry_options={"min_backoff_seconds": 0.1},
    )
    assert code == 201
    await client.wait_state("r302", "completed", timeout=20)
    attempts = client.received("r302")
    assert len(attempts) == 2
    assert attempts[1]["headers"]["x-appengine-taskpreviousresponse"] == "302"
    assert not [r for r in client.received() if r["path"].endswith("/trap")]


@pytest_twisted.ensureDeferred
async def test_retry_limit_zero_means_exactly_one_attempt(client):
    """C16."""
    code, _ = await client.enqueue(
        name="once", url=client.task_url("/h?status=500"),
        retry_options={"task_retry_limit": 0},
    )
    assert code == 201
    state = await client.wait_state("once", "error")
    await sleep(2.5)
    assert len(client.received("once")) == 1
    assert state["last_response"] == 500
    code, body = await client.enqueue(name="once", url=client.task_url("/h"))
    assert (code, body["error"]["code"]) == (409, "TOMBSTONED_TASK")


@pytest_twisted.ensureDeferred
async def test_retry_limit_without_age_limit_gives_limit_plus_one_attempts(client):
    """C17, second half: task_retry_limit 2 → exactly 3 attempts."""
    code, _ = await client.enqueue(
        name="three", url=client.task_url("/h?status=500"),
        retry_options={"task_retry_limit": 2, "min_backoff_seconds": 0.1},
    )
    assert code == 201
    await client.wait_state("three", "error", timeout=20)
    await sleep(1.0)
    assert len(client.received("three")) == 3


@pytest_twisted.ensureDeferred
async def test_hung_handler_is_cut_at_the_deadline_and_retried(client):
    """C27: dispatch_deadline 15 s, the handler sleeps 60 s on the first attempt."""
    started = time.monotonic()
    code, _ = await client.enqueue(
        name="hang", url=client.task_url("/h?sleep=60&sleep_first=1"),
        dispatch_deadline=15, retry_options={"min_backoff_seconds": 0.1},
    )
    assert code == 201
    state = await client.wait_state("hang", "completed", timeout=40)
    elapsed = time.monotonic() - started
    assert 14 < elapsed < 30, elapsed
    attempts = client.received("hang")
    assert len(attempts) == 2
    assert attempts[1]["headers"]["x-appengine-taskretrycount"] == "1"
    assert state["retry_count"] == 1


@pytest_twisted.ensureDeferred
async def test_short_countdown_is_not_held_up_by_a_long_one(client):
    """C11: an hour-long countdown and a 5 s one in the same queue; the 5 s one runs at ~5 s."""
    code, _ = await client.enqueue(name="hour", url=client.task_url("/late"), countdown=3600)
    assert code == 201
    enqueued = time.time()
    code, _ = await client.enqueue(name="five", url=client.task_url("/soon"), countdown=5)
    assert code == 201
    [got] = await wait_for(lambda: client.received("five"), 15, "the 5 s task")
    assert 4.0 <= got["time"] - enqueued <= 6.5, got["time"] - enqueued
    assert client.received("hour") == []
    code, state = await client.state("hour")
    assert state["state"] == "queued"


@pytest_twisted.ensureDeferred
async def test_backoff_longer_than_the_short_wait_goes_through_the_broker(client, node):
    """A 3 s backoff (above short_wait_seconds) waits in the delay ladder, not in memory."""
    code, _ = await client.enqueue(
        name="slow-retry", url=client.task_url("/h?fail=1"),
        retry_options={"min_backoff_seconds": 3, "max_backoff_seconds": 3},
    )
    assert code == 201
    await wait_for(lambda: client.received("slow-retry"), 10, "first attempt")
    await sleep(0.5)
    assert node.node.worker.in_flight == 0  # nothing held while the retry waits
    await client.wait_state("slow-retry", "completed", timeout=15)
    first, second = client.received("slow-retry")
    assert 2.5 <= second["time"] - first["time"] <= 5.0
