"""Crashes and outages: kill -9 the node, cut or stall RabbitMQ and Redis."""

from __future__ import annotations

import time

import pytest_twisted
from conftest import (
    Client,
    InProcessNode,
    listen_port,
    node_config,
    sleep,
    wait_for,
    wait_healthy,
)
from faultproxy import FaultProxy
from twisted.internet import reactor


@pytest_twisted.ensureDeferred
async def test_kill_9_while_dispatching_then_restart_completes_the_task(node_process, apps, app_id):
    """C22/C26: the node dies mid-dispatch; after a restart the task runs and completes."""
    first = node_process()
    first.start()
    await wait_healthy(first.port)
    client = Client(f"http://127.0.0.1:{first.port}", app_id, apps)
    code, _ = await client.enqueue(name="nightly", url=client.task_url("/n?sleep=3&sleep_first=1"))
    assert code == 201
    await wait_for(lambda: client.received("nightly"), 10, "the first attempt")
    first.kill()
    second = node_process()
    second.start()
    await wait_healthy(second.port)
    client = Client(f"http://127.0.0.1:{second.port}", app_id, apps)
    code, body = await client.enqueue(name="nightly", url=client.task_url("/n"))
    assert (code, body["error"]["code"]) == (409, "TASK_ALREADY_EXISTS")
    await client.wait_state("nightly", "completed", timeout=30)
    assert len(client.received("nightly")) >= 2


@pytest_twisted.ensureDeferred
async def test_kill_9_while_a_retry_waits_then_restart_completes_it(node_process, apps, app_id):
    first = node_process()
    first.start()
    await wait_healthy(first.port)
    client = Client(f"http://127.0.0.1:{first.port}", app_id, apps)
    code, _ = await client.enqueue(
        name="retry-wait", url=client.task_url("/r?fail=1"),
        retry_options={"min_backoff_seconds": 4, "max_backoff_seconds": 4},
    )
    assert code == 201
    code, _ = await client.enqueue(
        name="retry-short", url=client.task_url("/r?fail=1"),
        retry_options={"min_backoff_seconds": 1.5, "max_backoff_seconds": 1.5},
    )
    assert code == 201
    await wait_for(
        lambda: client.received("retry-wait") and client.received("retry-short"), 10, "attempts"
    )
    await sleep(0.3)
    first.kill()
    await sleep(5)
    second = node_process()
    second.start()
    await wait_healthy(second.port)
    client = Client(f"http://127.0.0.1:{second.port}", app_id, apps)
    await client.wait_state("retry-wait", "completed", timeout=30)
    await client.wait_state("retry-short", "completed", timeout=30)


@pytest_twisted.ensureDeferred
async def test_every_acknowledged_task_survives_repeated_kill_9(node_process, apps, app_id):
    """Tasks enqueued while nodes are killed at random moments all complete in the end."""
    accepted: list[str] = []
    proc = node_process()
    proc.start()
    await wait_healthy(proc.port)
    for round_ in range(3):
        client = Client(f"http://127.0.0.1:{proc.port}", app_id, apps)
        for i in range(30):
            name = f"k{round_}-{i}"
            code, _ = await client.enqueue(
                name=name, url=client.task_url("/k?sleep=0.2&fail=1"),
                retry_options={"min_backoff_seconds": 0.5, "max_backoff_seconds": 3},
            )
            if code == 201:
                accepted.append(name)
        await sleep(0.5)
        proc.kill()
        proc = node_process()
        proc.start()
        await wait_healthy(proc.port)
    client = Client(f"http://127.0.0.1:{proc.port}", app_id, apps)
    assert len(accepted) == 90
    for name in accepted:
        await client.wait_state(name, "completed", timeout=60)


async def _proxied_node(amqp_url, redis_url, apps, app_id, *, amqp=False, redis=False):
    from urllib.parse import urlsplit, urlunsplit

    proxies = {}
    if amqp:
        proxies["amqp"] = FaultProxy(reactor, "127.0.0.1", 5672)
        parts = urlsplit(amqp_url)
        amqp_url = urlunsplit(parts._replace(
            netloc=f"guest:guest@127.0.0.1:{proxies['amqp'].listen_port}"))
    if redis:
        proxies["redis"] = FaultProxy(reactor, "127.0.0.1", 6379)
        parts = urlsplit(redis_url)
        redis_url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxies['redis'].listen_port}"))
    config = node_config(amqp_url, redis_url, apps.lb_url, app_id)
    node = InProcessNode(config)
    await node.start()
    client = Client(f"http://127.0.0.1:{listen_port(config)}", app_id, apps)
    return node, client, proxies


async def _timed_enqueue(client, **task):
    started = time.monotonic()
    code, body = await client.enqueue(**task)
    return code, body, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_broker_cut_then_back_503_fast_and_reconnects(amqp_url, redis_url, apps, app_id):
    node, client, proxies = await _proxied_node(amqp_url, redis_url, apps, app_id, amqp=True)
    proxy = proxies["amqp"]
    try:
        proxy.cut()
        code, body, took = await _timed_enqueue(client, name="during", url=client.task_url("/b"))
        assert (code, body["error"]["code"]) == (503, "TRANSIENT_ERROR")
        assert took <= 5.0
        code, health = await client.request("GET", "/healthz")
        assert code == 503 and health["rabbitmq"] != "ok"
        proxy.heal()
        await wait_for(lambda: node.node.broker.connected, 15, "reconnection")
        # the name of the refused task was released
        code, body = await client.enqueue(name="during", url=client.task_url("/b"))
        assert code == 201, body
        await client.wait_state("during", "completed", timeout=15)
    finally:
        await node.stop()
        proxy.close()


@pytest_twisted.ensureDeferred
async def test_broker_stalled_enqueue_answers_503_within_5_s(amqp_url, redis_url, apps, app_id):
    node, client, proxies = await _proxied_node(amqp_url, redis_url, apps, app_id, amqp=True)
    proxy = proxies["amqp"]
    try:
        proxy.stall()
        code, body, took = await _timed_enqueue(client, name="stalled", url=client.task_url("/b"))
        assert (code, body["error"]["code"]) == (503, "TRANSIENT_ERROR")
        assert took <= 5.5
        proxy.cut()  # the stalled connection is dead for good; drop it like a network would
        await sleep(0.2)
        proxy.heal()
        await wait_for(lambda: node.node.broker.connected, 20, "reconnection")
        code, body = await client.enqueue(name="after", url=client.task_url("/b"))
        assert code == 201, body
        await client.wait_state("after", "completed", timeout=15)
    finally:
        await node.stop()
        proxy.close()


@pytest_twisted.ensureDeferred
async def test_consumer_resumes_after_the_broker_closes_the_connection(client, node):
    code, _ = await client.enqueue(name="before", url=client.task_url("/c"))
    assert code == 201
    await client.wait_state("before", "completed")
    node.node.broker._proto.transport.abortConnection()  # as a broker restart would
    await sleep(0.2)
    await wait_for(lambda: node.node.broker.connected, 15, "reconnection")
    code, _ = await client.enqueue(name="after", url=client.task_url("/c"))
    assert code == 201
    await client.wait_state("after", "completed")


@pytest_twisted.ensureDeferred
async def test_redis_down_503_fast_and_in_flight_results_recorded_later(
    amqp_url, redis_url, apps, app_id
):
    """C25: enqueue fails fast while Redis is away; tasks in flight finish once it is back."""
    node, client, proxies = await _proxied_node(amqp_url, redis_url, apps, app_id, redis=True)
    proxy = proxies["redis"]
    try:
        for i in range(5):
            code, _ = await client.enqueue(name=f"fly{i}", url=client.task_url("/f?sleep=2"))
            assert code == 201
        await wait_for(lambda: len(client.received()) >= 5, 10, "5 tasks in flight")
        proxy.stall()
        code, body, took = await _timed_enqueue(client, name="x", url=client.task_url("/f"))
        assert (code, body["error"]["code"]) == (503, "TRANSIENT_ERROR")
        assert took <= 5.0
        code, health = await client.request("GET", "/healthz")
        assert code == 503 and health["redis"] != "ok"
        proxy.cut()
        code, body, took = await _timed_enqueue(client, name="y", url=client.task_url("/f"))
        assert (code, body["error"]["code"]) == (503, "TRANSIENT_ERROR")
        assert took <= 5.0
        await sleep(3)
        proxy.heal()
        for i in range(5):
            await client.wait_state(f"fly{i}", "completed", timeout=30)
        for i in range(5):
            assert len(client.received(f"fly{i}")) == 1
        code, _ = await client.enqueue(name="x", url=client.task_url("/f"))
        assert code == 201
    finally:
        await node.stop()
        proxy.close()
