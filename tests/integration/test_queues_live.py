"""queue.yaml through the real RabbitMQ, Redis and HAProxy: deploying, retry parameters, hot
redeploys, pause / resume / purge, statistics and isolation between apps (issue 3; CASES C15–C17,
C31–C33)."""

from __future__ import annotations

import time

import pytest_twisted
from conftest import (
    AppConfig,
    client_for,
    consuming_now,
    deploy_yaml,
    free_port,
    sleep,
    wait_for,
)
from twisted.internet import defer

FAST = "  rate: 500/s\n  bucket_size: 100\n"


def queue_yaml(*queues: str, top: str = "") -> str:
    """A queue.yaml of queue blocks, each ``- name: x`` plus indented keys."""
    return top + "queue:\n" + "".join(queues)


def fast(name: str, extra: str = "") -> str:
    return f"- name: {name}\n{FAST}{extra}"


async def queue_info(client, queue: str) -> dict:
    code, body = await client.request("GET", f"/v1/apps/{client.app}/queues/{queue}")
    assert code == 200, body
    return body


def gaps(records: list[dict]) -> list[float]:
    times = [r["time"] for r in records]
    return [round(b - a, 2) for a, b in zip(times, times[1:])]


# --- deploying ----------------------------------------------------------------------------------

TWELVE = [
    "A-list-queue-fast", "mail", "mail-slow", "reports", "feeds", "push-notify", "sms",
    "image-resize", "search-index", "cleanup", "billing", "plain",
]
TWELVE_YAML = """\
total_storage_limit: 120M
queue:
- name: A-list-queue-fast
  rate: 500/s
  bucket_size: 100
- name: mail
  rate: 100/s
  bucket_size: 40
  max_concurrent_requests: 10
- name: mail-slow
  rate: 60/m
- name: reports
  rate: 20/s
  retry_parameters:
    task_retry_limit: 3
    task_age_limit: 2h
- name: feeds
  rate: 10/s
  bucket_size: 10
- name: push-notify
  mode: push
  rate: 50/s
  retry_parameters:
    min_backoff_seconds: 0.5
    max_backoff_seconds: 30
    max_doublings: 3
- name: sms
  rate: 5/s
  max_concurrent_requests: 2
- name: image-resize
  rate: 1.5/s
  bucket_size: 3
- name: search-index
  rate: 3600/h
- name: cleanup
  rate: 86400/d
- name: billing
  rate: 200/s
  retry_parameters:
    task_retry_limit: 0
- name: plain
"""


@pytest_twisted.ensureDeferred
async def test_twelve_queues_deploy_and_every_one_takes_and_runs_a_task(cluster, apps, app_id):
    """C33: all 12 queues usable; a rate-less push queue gets 5/s; unknown queue → 404."""
    [node] = await cluster()
    client = client_for(node, app_id, apps)
    code, body = await deploy_yaml(client, TWELVE_YAML)
    assert code == 200, body
    assert [q["name"] for q in body["queues"]] == ["default", *TWELVE]
    assert body["total_storage_limit"] == 120 * 1024**2
    assert any("plain" in w for w in body["warnings"])

    for name in TWELVE:
        code, body = await client.enqueue(name, name=f"one-{name}", url=client.task_url(f"/{name}"))
        assert code == 201, (name, body)
    await wait_for(lambda: len(client.received()) >= 12, 15, "one task from each queue")
    got = {r["headers"]["x-appengine-queuename"]: r for r in client.received()}
    assert sorted(got) == sorted(TWELVE)
    for name, record in got.items():
        assert record["path"] == f"/{app_id}/{name}"
        assert record["headers"]["x-appengine-taskname"] == f"one-{name}"

    plain = await queue_info(client, "plain")
    assert (plain["rate"], plain["rate_per_second"], plain["bucket_size"]) == ("5/s", 5.0, 5)
    assert plain["state"] == "running" and plain["mode"] == "push"
    fastest = await queue_info(client, "A-list-queue-fast")
    assert fastest["rate_per_second"] == 500.0 and fastest["bucket_size"] == 100
    mail_slow = await queue_info(client, "mail-slow")
    assert mail_slow["rate"] == "60/m" and mail_slow["rate_per_second"] == 1.0
    code, listing = await client.request("GET", f"/v1/apps/{app_id}/queues")
    assert code == 200
    assert [q["name"] for q in listing["queues"]] == ["default", *TWELVE]

    code, body = await client.enqueue("nope", url=client.task_url("/nope"))
    assert (code, body["error"]["code"]) == (404, "UNKNOWN_QUEUE")
    assert "nope" in body["error"]["message"]
    code, body = await client.request("GET", f"/v1/apps/{app_id}/queues/nope")
    assert (code, body["error"]["code"]) == (404, "UNKNOWN_QUEUE")


C31_YAML = """\
total_storage_limit: 120M
queue:
- name: has-foo
  rate: 5/s
  foo: 1
- name: negative
  rate: 5/s
  retry_parameters:
    task_retry_limit: -1
"""


@pytest_twisted.ensureDeferred
async def test_bad_queue_yaml_is_a_400_naming_queue_and_key_never_a_500(cluster, apps, app_id):
    """C31: unknown key and negative value → 400 naming queue + key; storage limit accepted."""
    [node] = await cluster()
    client = client_for(node, app_id, apps)
    code, body = await deploy_yaml(client, C31_YAML)
    assert code == 400, body
    assert body["error"]["code"] == "INVALID_REQUEST"
    errors = body["error"]["errors"]
    assert len(errors) == 2, errors
    assert any("'has-foo'" in e and "foo" in e.replace("has-foo", "") for e in errors), errors
    assert any("'negative'" in e and "task_retry_limit" in e for e in errors), errors
    assert not any("total_storage_limit" in e for e in errors), errors

    # the storage limit alone is fine
    code, body = await deploy_yaml(
        client, "total_storage_limit: 120M\nqueue:\n- name: kept\n  rate: 2/s\n")
    assert code == 200, body
    assert body["total_storage_limit"] == 120 * 1024**2

    # whatever arrives, the answer is a 400 that says why, and the deployment in force stays
    for bad in (b"queue: [\n", b"\xff\xfe not utf-8", b"queue: 5\n", b"- just\n- a list\n",
                b"queue:\n- name: 'bad name'\n", b"queue:\n- rate: 5/s\n",
                b"queue:\n- name: a\n  rate: 5/s\n- name: a\n  rate: 5/s\n",
                b"queue:\n- name: a\n  bucket_size: 501\n  rate: 1/s\n",
                b"queue:\n- name: a\n  rate: 1/s\n  retry_parameters:\n    task_age_limit: 5x\n",
                b"unknown_top: 1\n", b"queue:\n- name: a\n  rate: 1/s\n  mode: poll\n"):
        code, body = await deploy_yaml(client, bad)
        assert code == 400, (bad, code, body)
        assert body["error"]["code"] in ("INVALID_REQUEST", "INVALID_QUEUE_RATE"), body
        assert body["error"]["message"], body
    assert (await queue_info(client, "kept"))["rate_per_second"] == 2.0
    code, body = await client.enqueue("negative", url=client.task_url("/x"))
    assert (code, body["error"]["code"]) == (404, "UNKNOWN_QUEUE")


VALID_RATES = {"1.5/s": 1.5, "0.5/s": 0.5, "2/m": 2 / 60, "64/m": 64 / 60, "1/d": 1 / 86400,
               "0/s": 0.0, "0": 0.0}
INVALID_RATES = ["5", "5/x", "5/sec", "-1/s", "1e3/s", "5 /s", "501/s"]


@pytest_twisted.ensureDeferred
async def test_rate_grammar_through_the_api(cluster, apps, app_id):
    """C32: the valid group deploys with the right rates; each invalid one → INVALID_QUEUE_RATE."""
    [node] = await cluster()
    client = client_for(node, app_id, apps)
    text = queue_yaml(*(f"- name: r{i}\n  rate: {rate}\n" for i, rate in enumerate(VALID_RATES)))
    code, body = await deploy_yaml(client, text)
    assert code == 200, body
    rates = {q["rate_text"]: q["rate"] for q in body["queues"] if q["name"] != "default"}
    assert rates == VALID_RATES
    for i, rate in enumerate(VALID_RATES):
        info = await queue_info(client, f"r{i}")
        assert info["rate"] == rate
        assert info["state"] == ("disabled" if VALID_RATES[rate] == 0 else "running")

    for rate in INVALID_RATES:
        code, body = await deploy_yaml(client, f"queue:\n- name: bad-rate\n  rate: {rate}\n")
        assert code == 400, (rate, body)
        assert body["error"]["code"] == "INVALID_QUEUE_RATE", (rate, body)
        [error] = body["error"]["errors"]
        assert "'bad-rate'" in error and "rate" in error, error
    # none of the refused files replaced the deployment
    assert (await queue_info(client, "r0"))["rate_per_second"] == 1.5


@pytest_twisted.ensureDeferred
async def test_pull_queue_is_accepted_and_a_push_enqueue_into_it_is_refused(cluster, apps, app_id):
    """Q5 shape: a pull queue with no rate; push enqueue → INVALID_QUEUE_MODE; no consumer."""
    [node] = await cluster()
    client = client_for(node, app_id, apps)
    code, body = await deploy_yaml(client, "queue:\n- name: pull-work\n  mode: pull\n")
    assert code == 200, body
    [pull] = [q for q in body["queues"] if q["name"] == "pull-work"]
    assert pull["mode"] == "pull" and pull["rate"] is None
    code, body = await client.enqueue("pull-work", url=client.task_url("/pull"))
    assert (code, body["error"]["code"]) == (400, "INVALID_QUEUE_MODE"), body
    code, body = await client.request(
        "POST", f"/v1/apps/{app_id}/queues/pull-work/tasks:batch",
        {"tasks": [{"url": client.task_url("/pull")}]})
    assert (code, body["error"]["code"]) == (400, "INVALID_QUEUE_MODE"), body
    info = await queue_info(client, "pull-work")
    assert info["state"] == "pull" and info["tasks"] == 0
    assert not consuming_now(node, app_id, "pull-work")
    assert (app_id, "pull-work") not in node.node.broker.consuming()
    # purging it is fine too, and leaves the node's AMQP channel alone
    channel = node.node.broker._pub
    code, body = await client.request("POST", f"/v1/apps/{app_id}/queues/pull-work:purge")
    assert code == 200 and body["state"] == "pull", body
    code, body = await client.enqueue(name="after-purge", url=client.task_url("/after"))
    assert code == 201, body
    await client.wait_state("after-purge", "completed")
    assert node.node.broker._pub is channel and channel.is_open
    # a push-only key on a pull queue is refused with the queue and key named
    code, body = await deploy_yaml(client, "queue:\n- name: pw\n  mode: pull\n  rate: 1/s\n")
    assert code == 400, body
    [error] = body["error"]["errors"]
    assert "'pw'" in error and "rate" in error, error


@pytest_twisted.ensureDeferred
async def test_targets_route_to_their_service_and_an_unknown_target_is_refused(
        cluster, apps, app_id):
    """C33: `target: svc-missing` → 400 at deploy; `svc` and `v2.svc` go to svc's balancer."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # the app's own balancer is not listening
    [node] = await cluster(
        app_configs={app_id: AppConfig(lb_url=nowhere, targets={"svc": apps.lb_url})})
    client = client_for(node, app_id, apps)
    code, body = await deploy_yaml(
        client, "queue:\n- name: to-missing\n  rate: 5/s\n  target: svc-missing\n")
    assert code == 400, body
    [error] = body["error"]["errors"]
    assert "'to-missing'" in error and "target" in error and "svc-missing" in error, error

    code, body = await deploy_yaml(client, queue_yaml(
        fast("to-svc", "  target: svc\n"), fast("to-version", "  target: v2.svc\n")))
    assert code == 200, body
    assert {q["name"]: q["target"] for q in body["queues"]}["to-version"] == "v2.svc"
    for queue in ("to-svc", "to-version"):
        code, body = await client.enqueue(queue, name=f"via-{queue}",
                                          url=client.task_url(f"/{queue}"))
        assert code == 201, body
    for queue in ("to-svc", "to-version"):
        await client.wait_state(f"via-{queue}", "completed", queue=queue)
    assert len(client.received()) == 2


@pytest_twisted.ensureDeferred
async def test_queues_from_the_node_config_file_take_tasks_even_when_not_consumed(
        cluster, apps, app_id, tmp_path):
    """A queue.yaml named in the node config: a 0/s queue (no consumer, so never declared by
    consuming) still takes tasks, counts them and purges them; the node keeps its channel."""
    path = tmp_path / "queue.yaml"
    path.write_text("queue:\n- name: default\n  rate: 500/s\n- name: held\n  rate: 0/s\n")
    [node] = await cluster(None, app_configs={
        app_id: AppConfig(lb_url=apps.lb_url, queue_yaml=str(path))})
    client = client_for(node, app_id, apps)
    await wait_for(lambda: "held" in node.node.registry.queue_names(app_id), 10,
                   "the file's queues")
    code, body = await client.enqueue("held", name="h1", url=client.task_url("/held"))
    assert code == 201, body
    info = await queue_info(client, "held")
    assert (info["state"], info["tasks"]) == ("disabled", 1), info
    channel = node.node.broker._pub
    code, body = await client.request("POST", f"/v1/apps/{app_id}/queues/held:purge")
    assert code == 200 and body["tasks"] == 0, body
    code, state = await client.state("h1", queue="held")
    assert state["state"] == "deleted", state
    code, body = await client.enqueue(name="d1", url=client.task_url("/d"))
    assert code == 201, body
    await client.wait_state("d1", "completed")
    assert node.node.broker._pub is channel and channel.is_open
    assert client.received("h1") == []


# --- retry parameters from queue.yaml -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_linear_backoff_with_max_doublings_zero(cluster, apps, app_id):
    """C15 (scaled): min 1, max 4, max_doublings 0 → gaps 1, 2, 3, 4 s."""
    [node] = await cluster(queue_yaml(fast("c15", """\
  retry_parameters:
    task_retry_limit: 4
    min_backoff_seconds: 1
    max_backoff_seconds: 4
    max_doublings: 0
""")))
    client = client_for(node, app_id, apps)
    code, body = await client.enqueue("c15", name="c15", url=client.task_url("/h?status=500"))
    assert code == 201, body
    state = await client.wait_state("c15", "error", timeout=25, queue="c15")
    await sleep(1.0)
    attempts = client.received("c15")
    assert len(attempts) == 5, gaps(attempts)
    for got, want in zip(gaps(attempts), [1, 2, 3, 4]):
        assert abs(got - want) <= 0.6, gaps(attempts)
    assert [r["headers"]["x-appengine-taskretrycount"] for r in attempts] == list("01234")
    assert state["retry_count"] == 4 and state["last_response"] == 500


@pytest_twisted.ensureDeferred
async def test_queue_retry_limit_zero_means_one_attempt(cluster, apps, app_id):
    """C16: `task_retry_limit: 0` in queue.yaml → one attempt, state error, name tombstoned."""
    [node] = await cluster(queue_yaml(fast("c16", """\
  retry_parameters:
    task_retry_limit: 0
""")))
    client = client_for(node, app_id, apps)
    code, _ = await client.enqueue("c16", name="once", url=client.task_url("/h?status=500"))
    assert code == 201
    state = await client.wait_state("once", "error", queue="c16")
    await sleep(2.5)
    assert len(client.received("once")) == 1
    assert state["last_response"] == 500 and state["retry_count"] == 0
    code, body = await client.enqueue("c16", name="once", url=client.task_url("/h"))
    assert (code, body["error"]["code"]) == (409, "TOMBSTONED_TASK")


@pytest_twisted.ensureDeferred
async def test_retry_and_age_limits_both_must_be_exceeded(cluster, apps, app_id):
    """C17 (scaled): limit 2, age 6 s, min backoff 1 → retries until ≥3 attempts AND ≥6 s."""
    [node] = await cluster(queue_yaml(fast("c17", """\
  retry_parameters:
    task_retry_limit: 2
    task_age_limit: 6s
    min_backoff_seconds: 1
""")))
    client = client_for(node, app_id, apps)
    code, _ = await client.enqueue("c17", name="c17", url=client.task_url("/h?status=500"))
    assert code == 201
    await client.wait_state("c17", "error", timeout=25, queue="c17")
    await sleep(1.0)
    attempts = client.received("c17")
    times = [r["time"] - attempts[0]["time"] for r in attempts]
    assert len(attempts) >= 3, times
    assert times[-1] >= 6.0 - 0.3, times  # kept going past 3 attempts until 6 s
    assert times[-2] < 6.0 + 0.3, times  # and stopped at the first failure after both
    # backoff 1, 2, 4 s (the queue's schedule): attempts at ~0, 1, 3, 7 s
    assert len(attempts) == 4, times


@pytest_twisted.ensureDeferred
async def test_task_retry_options_override_the_queue_key_by_key(cluster, apps, app_id):
    """A task's own retry_options win over the queue's; keys it does not set stay the queue's."""
    [node] = await cluster(queue_yaml(
        fast("never", "  retry_parameters:\n    task_retry_limit: 0\n"),
        fast("linear", """\
  retry_parameters:
    task_retry_limit: 4
    min_backoff_seconds: 1
    max_backoff_seconds: 4
    max_doublings: 0
""")))
    client = client_for(node, app_id, apps)
    code, _ = await client.enqueue(
        "never", name="three", url=client.task_url("/h?status=500"),
        retry_options={"task_retry_limit": 2, "min_backoff_seconds": 0.1})
    assert code == 201
    code, _ = await client.enqueue(
        "linear", name="two", url=client.task_url("/h?status=500"),
        retry_options={"task_retry_limit": 1})
    assert code == 201
    await client.wait_state("three", "error", timeout=15, queue="never")
    await client.wait_state("two", "error", timeout=15, queue="linear")
    await sleep(1.5)
    assert len(client.received("three")) == 3
    two = client.received("two")
    assert len(two) == 2
    assert abs(gaps(two)[0] - 1.0) <= 0.6, gaps(two)  # the queue's min_backoff_seconds


# --- hot redeploys -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_new_queue_gets_consumers_on_every_node_and_a_removed_one_keeps_its_tasks(
        cluster, apps, app_id):
    """A queue added while two nodes run is consumed by both; a removed queue is 404 to enqueue
    and its stored task survives until the queue is back."""
    nodes = await cluster(queue_yaml(fast("default"), fast("A")), count=2)
    one, two = (client_for(n, app_id, apps) for n in nodes)

    code, body = await deploy_yaml(one, queue_yaml(fast("default"), fast("A"), fast("B")))
    assert code == 200, body
    await wait_for(lambda: all(consuming_now(n, app_id, "B") for n in nodes), 5,
                   "consumers of B on both nodes")
    assert all((app_id, "B") in n.node.broker.consuming() for n in nodes)
    for i, client in enumerate((one, two)):
        code, body = await client.enqueue("B", name=f"b-{i}", url=client.task_url("/b"))
        assert code == 201, body
    await wait_for(lambda: len(one.received()) == 2, 10, "both tasks of B")

    # A holds a task (countdown 3 s) when it is removed
    code, _ = await two.enqueue("A", name="kept", url=two.task_url("/kept"), countdown=3)
    assert code == 201
    code, body = await deploy_yaml(one, queue_yaml(fast("default"), fast("B")))
    assert code == 200, body
    assert [q["name"] for q in body["queues"]] == ["default", "B"]
    await wait_for(lambda: not any(consuming_now(n, app_id, "A") for n in nodes), 5,
                   "A's consumers to stop")
    for client in (one, two):
        code, body = await client.enqueue("A", url=client.task_url("/late"))
        assert (code, body["error"]["code"]) == (404, "UNKNOWN_QUEUE"), body
    await sleep(5.0)  # its ETA passed while the queue was gone
    assert one.received("kept") == []

    code, body = await deploy_yaml(two, queue_yaml(fast("default"), fast("A"), fast("B")))
    assert code == 200, body
    await wait_for(lambda: one.received("kept"), 10, "the kept task once A is back")
    await one.wait_state("kept", "completed", queue="A")
    await sleep(0.5)
    assert len(one.received("kept")) == 1


# --- pause / resume / purge / statistics --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pause_holds_tasks_on_every_node_and_resume_runs_them(cluster, apps, app_id):
    nodes = await cluster(queue_yaml(fast("default"), fast("pq")), count=2)
    one, two = (client_for(n, app_id, apps) for n in nodes)
    code, body = await one.request("POST", f"/v1/apps/{app_id}/queues/pq:pause")
    assert code == 200, body
    assert body["state"] == "paused"
    for i in range(4):  # through both nodes, at once after the pause
        client = (one, two)[i % 2]
        code, body = await client.enqueue("pq", name=f"p{i}", url=client.task_url("/p"))
        assert code == 201, body
    await sleep(3.0)
    assert one.received() == []
    info = await queue_info(two, "pq")
    assert info["state"] == "paused" and info["tasks"] == 4, info
    code, listing = await two.request("GET", f"/v1/apps/{app_id}/queues")
    assert {q["name"]: q["state"] for q in listing["queues"]} == {
        "default": "running", "pq": "paused"}
    assert not any(consuming_now(n, app_id, "pq") for n in nodes)

    code, body = await two.request("POST", f"/v1/apps/{app_id}/queues/pq:resume")
    assert code == 200 and body["state"] == "running", body
    await wait_for(lambda: len(one.received()) >= 4, 10, "the paused tasks after resume")
    for i in range(4):
        await one.wait_state(f"p{i}", "completed", queue="pq")
    await sleep(0.5)
    assert sorted(r["headers"]["x-appengine-taskname"] for r in one.received()) == [
        f"p{i}" for i in range(4)]
    info = await queue_info(one, "pq")
    assert info["tasks"] == 0 and info["executed_last_minute"] == 4, info


@pytest_twisted.ensureDeferred
async def test_purge_drops_ready_and_delayed_tasks_but_not_later_ones(cluster, apps, app_id):
    """Tasks waiting in the broker and in its delay path when the queue is purged never run;
    tasks enqueued after the purge do."""
    [node] = await cluster(queue_yaml(fast("default"), fast("pg")))
    client = client_for(node, app_id, apps)
    code, _ = await client.request("POST", f"/v1/apps/{app_id}/queues/pg:pause")
    assert code == 200
    for i in range(3):
        code, _ = await client.enqueue("pg", name=f"ready-{i}", url=client.task_url("/old"))
        assert code == 201
        code, _ = await client.enqueue("pg", name=f"delayed-{i}", url=client.task_url("/old"),
                                       countdown=5)
        assert code == 201
    delayed_at = time.monotonic()
    assert (await queue_info(client, "pg"))["tasks"] == 6
    code, body = await client.request("POST", f"/v1/apps/{app_id}/queues/pg:purge")
    assert code == 200, body
    assert body["tasks"] == 0, body
    for i in range(3):
        code, _ = await client.enqueue("pg", name=f"later-{i}", url=client.task_url("/new"))
        assert code == 201
    code, _ = await client.enqueue("pg", name="later-delayed", url=client.task_url("/new"),
                                   countdown=2)
    assert code == 201
    code, _ = await client.request("POST", f"/v1/apps/{app_id}/queues/pg:resume")
    assert code == 200
    await wait_for(lambda: len(client.received()) >= 4, 10, "the tasks enqueued after the purge")
    await sleep(max(0.0, 7.5 - (time.monotonic() - delayed_at)))  # the delayed ones are due
    names = sorted(r["headers"]["x-appengine-taskname"] for r in client.received())
    assert names == ["later-0", "later-1", "later-2", "later-delayed"], names
    for name in ("ready-0", "delayed-0"):  # purged: ended, not queued forever
        code, state = await client.state(name, queue="pg")
        assert code == 200 and state["state"] == "deleted", (name, state)
        code, body = await client.enqueue("pg", name=name, url=client.task_url("/new"))
        assert (code, body["error"]["code"]) == (409, "TOMBSTONED_TASK"), (name, body)
    info = await queue_info(client, "pg")
    assert info["tasks"] == 0 and info["executed_last_minute"] == 4, info


@pytest_twisted.ensureDeferred
async def test_enqueues_racing_a_purge_each_end_one_way_or_the_other(cluster, apps, app_id):
    """Every task accepted while a purge runs either runs or ends purged: none is lost with
    its record left queued forever."""
    [node] = await cluster(queue_yaml(fast("default"), fast("race")))
    client = client_for(node, app_id, apps)
    code, _ = await client.request("POST", f"/v1/apps/{app_id}/queues/race:pause")
    assert code == 200
    names = [f"r{i}" for i in range(120)]

    async def one(name):
        return name, (await client.enqueue("race", name=name, url=client.task_url("/r")))[0]

    async def purge_later():
        await sleep(0.02)
        return (await client.request("POST", f"/v1/apps/{app_id}/queues/race:purge"))[0]

    results = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(one(n)) for n in names]
        + [defer.Deferred.fromCoroutine(purge_later())])
    assert results[-1] == 200
    accepted = [n for n, code in results[:-1] if code == 201]
    assert len(accepted) == len(names)
    code, _ = await client.request("POST", f"/v1/apps/{app_id}/queues/race:resume")
    assert code == 200
    await sleep(3.0)
    states = {}
    for name in accepted:
        code, body = await client.state(name, queue="race")
        states[name] = body["state"]
    ran = {r["headers"]["x-appengine-taskname"] for r in client.received()}
    assert set(states.values()) <= {"completed", "deleted"}, states
    assert ran == {n for n, s in states.items() if s == "completed"}


@pytest_twisted.ensureDeferred
async def test_purge_reaches_tasks_already_held_by_nodes(cluster, apps, app_id):
    """Tasks a node already took from the broker (waiting for a token at 1/s) never run once
    the queue is purged; tasks enqueued later run without waiting behind them."""
    nodes = await cluster(queue_yaml(fast("default"), "- name: slow\n  rate: 1/s\n"
                                     "  bucket_size: 1\n"), count=2)
    one, two = (client_for(n, app_id, apps) for n in nodes)
    for i in range(8):
        code, _ = await one.enqueue("slow", name=f"old-{i}", url=one.task_url("/old"))
        assert code == 201
    await wait_for(lambda: one.received(), 5, "the first task")
    code, body = await two.request("POST", f"/v1/apps/{app_id}/queues/slow:purge")
    assert code == 200, body
    purged_at = time.time()
    ran_before = {r["headers"]["x-appengine-taskname"] for r in one.received()}
    for i in range(2):
        code, _ = await one.enqueue("slow", name=f"new-{i}", url=one.task_url("/new"))
        assert code == 201
    await wait_for(lambda: len(one.received()) >= len(ran_before) + 2, 10,
                   "the tasks enqueued after the purge")
    await sleep(2.0)
    late = [r["headers"]["x-appengine-taskname"] for r in one.received()
            if r["time"] > purged_at]
    assert sorted(late) == ["new-0", "new-1"], late
    new = [r for r in one.received() if r["path"].endswith("/new")]
    # they wait only for their own tokens, not for the purged tasks' (1/s, bucket 1)
    assert new[-1]["time"] - purged_at < 4.0, new[-1]["time"] - purged_at


@pytest_twisted.ensureDeferred
async def test_queue_statistics(cluster, apps, app_id):
    [node] = await cluster(queue_yaml(fast("default"), fast("st")))
    client = client_for(node, app_id, apps)
    info = await queue_info(client, "st")
    assert (info["tasks"], info["oldest_eta"], info["in_flight"],
            info["executed_last_minute"]) == (0, None, 0, 0), info
    code, later = await client.enqueue("st", name="later", url=client.task_url("/later"),
                                       countdown=600)
    assert code == 201
    for i in range(2):
        code, _ = await client.enqueue("st", name=f"slow-{i}", url=client.task_url("/s?sleep=2"))
        assert code == 201
    await wait_for(lambda: len(client.received()) == 2, 5, "both slow tasks")
    info = await queue_info(client, "st")
    assert info["in_flight"] == 2 and info["tasks"] == 3, info
    assert info["state"] == "running"
    for i in range(2):
        await client.wait_state(f"slow-{i}", "completed", queue="st")
    info = await queue_info(client, "st")
    assert info["in_flight"] == 0 and info["tasks"] == 1, info
    assert info["executed_last_minute"] == 2, info
    assert info["oldest_eta"] == later["eta"], (info, later)
    assert info["rate_per_second"] == info["enforced_rate_per_second"] == 500.0


# --- isolation ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_apps_with_the_same_queue_and_task_names_never_mix(cluster, apps, app_id):
    other = app_id + "b"
    [node] = await cluster(None, app_configs={app_id: AppConfig(lb_url=apps.lb_url),
                                             other: AppConfig(lb_url=apps.lb_url)})
    mine, theirs = client_for(node, app_id, apps), client_for(node, other, apps)
    code, _ = await deploy_yaml(mine, queue_yaml(fast("shared")))
    assert code == 200
    code, _ = await deploy_yaml(theirs, queue_yaml("- name: shared\n  rate: 0/s\n"))
    assert code == 200
    assert (await queue_info(mine, "shared"))["state"] == "running"
    assert (await queue_info(theirs, "shared"))["state"] == "disabled"

    for client in (mine, theirs):
        code, body = await client.enqueue("shared", name="same", url=client.task_url("/same"))
        assert code == 201, body
    await mine.wait_state("same", "completed", queue="shared")
    await sleep(1.5)
    assert len(mine.received("same")) == 1
    assert theirs.received() == []
    code, state = await theirs.state("same", queue="shared")
    assert state["state"] == "queued"
    code, body = await mine.enqueue("shared", name="same", url=mine.task_url("/same"))
    assert (code, body["error"]["code"]) == (409, "TOMBSTONED_TASK")
    code, body = await theirs.enqueue("shared", name="same", url=theirs.task_url("/same"))
    assert (code, body["error"]["code"]) == (409, "TASK_ALREADY_EXISTS")

    a, b = await queue_info(mine, "shared"), await queue_info(theirs, "shared")
    assert (a["tasks"], a["executed_last_minute"]) == (0, 1), a
    assert (b["tasks"], b["executed_last_minute"]) == (1, 0), b
    assert (a["rate_per_second"], b["rate_per_second"]) == (500.0, 0.0)

    # pausing or purging one app's queue leaves the other's alone
    code, _ = await mine.request("POST", f"/v1/apps/{app_id}/queues/shared:pause")
    assert code == 200
    assert (await queue_info(theirs, "shared"))["state"] == "disabled"
    code, _ = await mine.request("POST", f"/v1/apps/{app_id}/queues/shared:purge")
    assert code == 200
    assert (await queue_info(theirs, "shared"))["tasks"] == 1
    code, _ = await deploy_yaml(theirs, queue_yaml(fast("shared")))
    assert code == 200
    await theirs.wait_state("same", "completed", queue="shared")
    assert len(theirs.received("same")) == 1 and len(mine.received("same")) == 1
    assert (await queue_info(mine, "shared"))["state"] == "paused"



@pytest_twisted.ensureDeferred
async def test_deploy_while_rabbitmq_is_away_is_stored_and_works_once_it_is_back(
        amqp_url, redis_url, apps, app_id):
    """The deployment lives in Redis: with RabbitMQ unreachable PUT queue.yaml still answers
    (200, quickly; never a 500 or a hang), and the new queue works once the broker is back."""
    from urllib.parse import urlsplit, urlunsplit

    from conftest import InProcessNode, node_config
    from faultproxy import FaultProxy
    from twisted.internet import reactor

    proxy = FaultProxy(reactor, "127.0.0.1", 5672)
    parts = urlsplit(amqp_url)
    proxied = urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{proxy.listen_port}"))
    node = InProcessNode(node_config(proxied, redis_url, apps.lb_url, app_id))
    await node.start()
    client = client_for(node, app_id, apps)
    try:
        proxy.cut()
        started = time.monotonic()
        code, body = await deploy_yaml(client, queue_yaml(fast("default"), fast("late")))
        assert code == 200, body
        assert time.monotonic() - started < 5.0
        assert "late" in node.node.registry.queue_names(app_id)
        proxy.heal()
        await wait_for(lambda: node.node.broker.connected, 15, "reconnection")
        await wait_for(lambda: consuming_now(node, app_id, "late"), 10, "a consumer of late")
        code, body = await client.enqueue("late", name="late-1", url=client.task_url("/late"))
        assert code == 201, body
        await client.wait_state("late-1", "completed", queue="late")
    finally:
        await node.stop()
        proxy.close()
