"""A task's whole way: HTTP enqueue → RabbitMQ → dispatch through HAProxy to an app server."""

from __future__ import annotations

import base64
import time

import pytest_twisted
from conftest import sleep, wait_for
from twisted.internet import defer


@pytest_twisted.ensureDeferred
async def test_task_arrives_with_method_path_query_body_and_headers(client):
    payload = bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0xFF, 0xFE, 0x00])
    before = time.time()
    code, body = await client.enqueue(
        name="t1",
        url=client.task_url("/run?x=1&y=two%20words"),
        method="PUT",
        headers={"X-Custom": "v1", "X-AppEngine-TaskName": "forged", "Host": "evil.example"},
        payload_base64=base64.b64encode(payload).decode(),
    )
    assert code == 201, body
    assert body["name"] == "t1" and body["queue"] == "default"
    [got] = await wait_for(lambda: client.received("t1"), 10, "the task")
    assert got["method"] == "PUT"
    assert got["path"] == f"/{client.app}/run"
    assert got["query"] == "x=1&y=two%20words"
    assert base64.b64decode(got["body_b64"]) == payload
    h = got["headers"]
    assert h["x-custom"] == "v1"
    assert h["content-type"] == "application/octet-stream"
    assert h["x-appengine-queuename"] == "default"
    assert h["x-appengine-taskname"] == "t1"
    assert h["x-appengine-taskretrycount"] == "0"
    assert h["x-appengine-taskexecutioncount"] == "0"
    assert h["x-appengine-user-ip"] == "0.1.0.2"
    assert before - 1 <= float(h["x-appengine-tasketa"]) <= time.time()
    assert "x-appengine-taskpreviousresponse" not in h
    assert h["host"] != "evil.example"
    state = await client.wait_state("t1", "completed")
    assert state["last_response"] == 200 and state["execution_count"] == 1


@pytest_twisted.ensureDeferred
async def test_default_url_and_text_payload(client):
    code, body = await client.enqueue(payload="héllo")
    assert code == 201, body
    records = await wait_for(
        lambda: [r for r in client.app_servers.received(body["name"])], 10, "the task"
    )
    assert records[0]["path"] == "/_ah/queue/default"
    assert base64.b64decode(records[0]["body_b64"]) == "héllo".encode()


@pytest_twisted.ensureDeferred
async def test_thousand_tasks_arrive_exactly_once(client):
    url = client.task_url("/bulk")
    names = [f"bulk-{i}" for i in range(1000)]
    for start in range(0, 1000, 100):
        code, body = await client.request(
            "POST",
            f"/v1/apps/{client.app}/queues/default/tasks:batch",
            {"tasks": [{"name": n, "url": url} for n in names[start:start + 100]]},
        )
        assert code == 200
        assert all("name" in r for r in body["results"]), body
    await wait_for(lambda: len(client.received()) >= 1000, 60, "1000 deliveries")
    await sleep(1.0)  # anything more would be a duplicate
    counts: dict[str, int] = {}
    for record in client.received():
        name = record["headers"]["x-appengine-taskname"]
        counts[name] = counts.get(name, 0) + 1
    assert sorted(counts) == sorted(names)
    assert set(counts.values()) == {1}
    # both app servers behind the load balancer took a share
    instances = {r["instance"] for r in client.received()}
    assert instances == {"app1", "app2"}


@pytest_twisted.ensureDeferred
async def test_named_task_duplicate_while_queued_then_tombstoned(client):
    code, _ = await client.enqueue(name="report-42", url=client.task_url("/r"), countdown=3)
    assert code == 201
    code, body = await client.enqueue(name="report-42", url=client.task_url("/r"))
    assert (code, body["error"]["code"]) == (409, "TASK_ALREADY_EXISTS")
    await wait_for(lambda: client.received("report-42"), 10, "the task")
    await client.wait_state("report-42", "completed")
    code, body = await client.enqueue(name="report-42", url=client.task_url("/r"))
    assert (code, body["error"]["code"]) == (409, "TOMBSTONED_TASK")
    await sleep(1.0)
    assert len(client.received("report-42")) == 1


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_enqueues_of_one_name_accept_exactly_one(client):
    results = await defer.gatherResults([
        defer.Deferred.fromCoroutine(client.enqueue(name="once", url=client.task_url("/once")))
        for _ in range(20)
    ])
    codes = sorted(code for code, _ in results)
    assert codes.count(201) == 1, results
    assert {body["error"]["code"] for code, body in results if code != 201} <= {
        "TASK_ALREADY_EXISTS", "TOMBSTONED_TASK"}
    await wait_for(lambda: client.received("once"), 10, "the task")
    await sleep(1.0)
    assert len(client.received("once")) == 1


@pytest_twisted.ensureDeferred
async def test_deleted_task_never_runs_and_its_name_is_tombstoned(client):
    """C02: delete a task waiting for its ETA; the same name is refused, a new one runs."""
    code, _ = await client.enqueue(name="m1-upcoming", url=client.task_url("/m"), countdown=3)
    assert code == 201
    code, _ = await client.request(
        "DELETE", f"/v1/apps/{client.app}/queues/default/tasks/m1-upcoming")
    assert code == 204
    code, body = await client.enqueue(name="m1-upcoming", url=client.task_url("/m"), countdown=7200)
    assert (code, body["error"]["code"]) == (409, "TOMBSTONED_TASK")
    code, _ = await client.enqueue(name="m1-upcoming-2", url=client.task_url("/m"), countdown=1)
    assert code == 201
    await wait_for(lambda: client.received("m1-upcoming-2"), 10, "the other task")
    await sleep(3.0)
    assert client.received("m1-upcoming") == []
    code, state = await client.state("m1-upcoming")
    assert state["state"] == "deleted"
