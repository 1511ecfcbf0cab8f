"""Cluster-wide rates and concurrency from queue.yaml, through the real RabbitMQ, Redis and
HAProxy (issue 3; CASES C18–C20): several nodes together keep one queue's rate, bucket and
max_concurrent_requests; 503 + Retry-After is honoured; a redeployed rate applies at once."""

from __future__ import annotations

import time

import pytest_twisted
from conftest import client_for, deploy_yaml, sleep, wait_for
from twisted.internet import defer


async def queue_info(client, queue: str) -> dict:
    code, body = await client.request("GET", f"/v1/apps/{client.app}/queues/{queue}")
    assert code == 200, body
    return body


async def enqueue_many(client, queue: str, names: list[str], path: str) -> None:
    for start in range(0, len(names), 100):
        code, body = await client.request(
            "POST", f"/v1/apps/{client.app}/queues/{queue}/tasks:batch",
            {"tasks": [{"name": n, "url": client.task_url(path)}
                       for n in names[start:start + 100]]},
        )
        assert code == 200, body
        assert all("name" in r for r in body["results"]), body


def arrival_times(client) -> list[float]:
    return [r["time"] for r in client.received()]


def most_in_window(times: list[float], window: float) -> int:
    """The largest number of arrivals within any ``window`` seconds."""
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t - start <= window))
    return best


def dispatched(nodes) -> list[int]:
    return [n.node.worker.stats.dispatched for n in nodes]


@pytest_twisted.ensureDeferred
async def test_rate_zero_holds_tasks_until_a_rate_is_deployed(cluster, apps, app_id):
    """C19: 0/s stores tasks and dispatches none; redeployed at 1/s they run ≤ 1/s, 1 at a time."""
    held = "- name: c19\n  rate: {rate}\n  bucket_size: 1\n  max_concurrent_requests: 1\n"
    nodes = await cluster("queue:\n" + held.format(rate="0/s"), count=2)
    one, two = (client_for(n, app_id, apps) for n in nodes)
    for i in range(3):
        code, body = await (one, two)[i % 2].enqueue(
            "c19", name=f"c19-{i}", url=one.task_url("/c19?sleep=0.4"))
        assert code == 201, body
    await sleep(3.0)
    assert one.received() == []
    info = await queue_info(two, "c19")
    assert info["state"] == "disabled" and info["tasks"] == 3, info
    assert (info["rate_per_second"], info["bucket_size"], info["max_concurrent_requests"]) == (
        0.0, 1, 1)

    code, body = await deploy_yaml(two, "queue:\n" + held.format(rate="1/s"))
    assert code == 200, body
    await wait_for(lambda: len(one.received()) >= 3, 10, "the held tasks at 1/s")
    for i in range(3):
        await one.wait_state(f"c19-{i}", "completed", queue="c19")
    await sleep(1.0)
    times = arrival_times(one)
    assert len(times) == 3
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 0.8 for g in gaps), gaps  # ≤ 1/s (+ the bucket of 1)
    assert all(g >= 0.4 for g in gaps), gaps  # never two in flight (each takes 0.4 s)


@pytest_twisted.ensureDeferred
async def test_three_nodes_share_one_rate(cluster, apps, app_id):
    """C20: rate 2/s, bucket 1, three nodes, 20 tasks → ~2/s overall (+1 burst), not 6/s."""
    nodes = await cluster("queue:\n- name: c20\n  rate: 2/s\n  bucket_size: 1\n", count=3)
    client = client_for(nodes[1], app_id, apps)
    names = [f"c20-{i}" for i in range(20)]
    before = dispatched(nodes)
    await enqueue_many(client, "c20", names, "/c20")
    await wait_for(lambda: len(client.received()) >= 20, 25, "20 tasks at 2/s")
    await sleep(0.5)
    times = arrival_times(client)
    assert sorted(r["headers"]["x-appengine-taskname"] for r in client.received()) == sorted(names)
    span = times[-1] - times[0]
    assert span >= (20 - 2) / 2 - 1.0, span  # 9.5 s at 2/s; 3.2 s if each node had 2/s
    assert most_in_window(times, 2.0) <= 6, times  # 2/s × 2 s + the bucket (+1 for jitter)
    assert most_in_window(times, 5.0) <= 12, times
    share = [after - b for after, b in zip(dispatched(nodes), before)]
    assert sum(share) == 20 and sum(1 for s in share if s) >= 2, share  # several nodes at work


@pytest_twisted.ensureDeferred
async def test_max_concurrent_requests_one_across_two_nodes(cluster, apps, app_id):
    """max_concurrent_requests: 1 with a 2 s handler → never two in flight, cluster-wide."""
    nodes = await cluster(
        "queue:\n- name: one-at-a-time\n  rate: 500/s\n  bucket_size: 50\n"
        "  max_concurrent_requests: 1\n", count=2)
    one, two = (client_for(n, app_id, apps) for n in nodes)
    before = dispatched(nodes)
    for i in range(4):
        code, _ = await (one, two)[i % 2].enqueue(
            "one-at-a-time", name=f"slow-{i}", url=one.task_url("/slow?sleep=2"))
        assert code == 201
    in_flight = []
    deadline = time.monotonic() + 20
    while len(one.received()) < 4 and time.monotonic() < deadline:
        in_flight.append((await queue_info(two, "one-at-a-time"))["in_flight"])
        await sleep(0.25)
    for i in range(4):
        await one.wait_state(f"slow-{i}", "completed", queue="one-at-a-time")
    times = arrival_times(one)
    assert len(times) == 4
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 1.9 for g in gaps), gaps  # each starts after the previous one answered
    assert max(in_flight) == 1, in_flight
    share = [after - b for after, b in zip(dispatched(nodes), before)]
    assert sum(share) == 4 and all(share), share


@pytest_twisted.ensureDeferred
async def test_503_with_retry_after_is_honoured_and_slows_the_queue(cluster, apps, app_id):
    """C18 (scaled): 503 + Retry-After: 3 once, then 200; min backoff 0.1 → 2nd try ≥ 3 s later;
    the queue's enforced rate drops while its configured rate stays as deployed."""
    [node] = await cluster(
        "queue:\n- name: c18\n  rate: 100/s\n  bucket_size: 10\n"
        "  retry_parameters:\n    min_backoff_seconds: 0.1\n    task_retry_limit: 5\n")
    client = client_for(node, app_id, apps)
    code, _ = await client.enqueue(
        "c18", name="busy", url=client.task_url("/h?fail=1&status=503&retry_after=3"))
    assert code == 201
    await wait_for(lambda: client.received("busy"), 10, "the first attempt")
    await sleep(0.3)
    info = await queue_info(client, "c18")
    assert info["rate"] == "100/s" and info["rate_per_second"] == 100.0, info
    assert info["enforced_rate_per_second"] < 100.0, info
    await client.wait_state("busy", "completed", queue="c18", timeout=15)
    first, second = client.received("busy")
    assert 3.0 - 0.05 <= second["time"] - first["time"] <= 5.5, second["time"] - first["time"]
    assert second["headers"]["x-appengine-taskpreviousresponse"] == "503"


@pytest_twisted.ensureDeferred
async def test_a_redeployed_rate_applies_while_tasks_flow(cluster, apps, app_id):
    """Hot redeploy: 1/s → 50/s while 30 tasks wait; the node that did not deploy follows."""
    nodes = await cluster("queue:\n- name: flow\n  rate: 1/s\n  bucket_size: 1\n", count=2)
    one, two = (client_for(n, app_id, apps) for n in nodes)
    names = [f"flow-{i}" for i in range(30)]
    await enqueue_many(one, "flow", names, "/flow")
    await wait_for(lambda: len(one.received()) >= 3, 10, "the first tasks at 1/s")
    await sleep(1.0)
    times = arrival_times(one)
    slow_part = len(times)
    assert slow_part <= 6, times  # ~1/s so far
    assert times[-1] - times[0] >= slow_part - 2, times

    changed = time.time()
    code, body = await deploy_yaml(two, "queue:\n- name: flow\n  rate: 50/s\n  bucket_size: 1\n")
    assert code == 200, body
    await wait_for(lambda: len(one.received()) >= 30, 10, "the rest at 50/s")
    finished = max(arrival_times(one))
    assert finished - changed < 5.0, finished - changed  # 25+ s at the old rate
    info = await queue_info(one, "flow")
    assert info["rate_per_second"] == 50.0
    await defer.gatherResults([
        defer.Deferred.fromCoroutine(one.wait_state(n, "completed", queue="flow"))
        for n in names])


@pytest_twisted.ensureDeferred
async def test_a_delivery_waiting_for_a_slot_goes_back_to_the_broker(cluster, apps, app_id,
                                                                      monkeypatch):
    """A delivery waiting for a concurrency slot is not held unacked for long (a slot can be
    taken for a whole dispatch deadline, longer than RabbitMQ's consumer_timeout): past the
    hold limit it waits in the broker, and the cap still holds."""
    import appscale_tq.worker

    monkeypatch.setattr(appscale_tq.worker, "MAX_GATE_HOLD", 1.0)
    [node] = await cluster(
        "queue:\n- name: capped\n  rate: 500/s\n  bucket_size: 50\n"
        "  max_concurrent_requests: 1\n")
    client = client_for(node, app_id, apps)
    broker = node.node.broker
    published: list[tuple[str, float]] = []
    real_publish = broker.publish

    async def publish(task, delay=0.0):
        published.append((task.name, delay))
        return await real_publish(task, delay)

    monkeypatch.setattr(broker, "publish", publish)
    for i in range(3):
        code, _ = await client.enqueue("capped", name=f"cap-{i}", url=client.task_url("/c?sleep=3"))
        assert code == 201
    for i in range(3):
        await client.wait_state(f"cap-{i}", "completed", queue="capped", timeout=20)
    times = arrival_times(client)
    assert len(times) == 3
    assert all(b - a >= 2.9 for a, b in zip(times, times[1:])), times
    mine = [(n, d) for n, d in published if n.startswith("cap-")]
    waited_in_broker = [(n, d) for i, (n, d) in enumerate(mine)
                        if n in {m for m, _ in mine[:i]}]  # every publish after the enqueue
    assert waited_in_broker, published  # the 3 s dispatches outlast the 1 s hold limit
    assert all(d >= node.config.short_wait_seconds for _, d in waited_in_broker), published
