"""End to end with the unmodified App Engine SDK: the example guestbook app (``examples/guestbook``,
``appengine-python-standard`` in real WSGI server processes behind HAProxy) enqueues through
the SDK → this node's ``/rpc_http`` → RabbitMQ → the dispatcher → HAProxy → the app's task
handlers, which record what they ran.

The node has a secret: the guestbook's HAProxy injects the app's ticket, the SDK hands it back
as the envelope's request_id, and the node knows the app by it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
import treq
from conftest import InProcessNode, node_config, sleep, wait_for
from google.appengine.api.taskqueue import taskqueue_service_bytes_pb2 as tq_pb
from google.appengine.ext.remote_api import remote_api_bytes_pb2 as remote_pb
from twisted.internet import threads

from appscale_tq.config import AppConfig
from appscale_tq.haproxy import free_port
from appscale_tq.sdk import mint_ticket

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.guestbook.run import (  # noqa: E402
    AppServer,
    Guestbook,
    start_app_server,
    wait_listening,
)

# (remember, ("pwned",), {}) as deferred.defer pickles it, written out by hand: importing the
# app here would run wrap_wsgi_app, which patches os.environ of this process
PWNED = b"(cexamples.guestbook.app\nremember\n(Vpwned\nt(dt."

APP = "gb" + uuid.uuid4().hex[:8]
OTHER = "gbo" + uuid.uuid4().hex[:8]  # another app on the same node
SECRET = "sdk-it-" + uuid.uuid4().hex
QUEUES = (ROOT / "examples" / "guestbook" / "queue.yaml").read_text() + (
    "- name: purgeable\n  rate: 500/s\n")
OTHER_QUEUES = "queue:\n- name: default\n  rate: 1/s\n"
E = tq_pb.TaskQueueServiceError


class Stack:
    def __init__(self, node: InProcessNode, book: Guestbook, by_port: AppServer) -> None:
        self.node = node
        self.book = book
        self.by_port = by_port  # an app server whose API_PORT is the app's own sdk_listen
        self.node_url = f"http://127.0.0.1:{int(node.config.listen.split(':')[1])}"
        assert book.lb is not None
        self.public = book.lb.public_url
        self.internal = book.lb.internal_url

    def app_server(self, service: str = "default") -> str:
        port = next(s.port for s in self.book.servers if s.service == service)
        return f"http://127.0.0.1:{port}"

    # --- the app ------------------------------------------------------------------------------
    async def call(self, path: str, spec: Any = None, *, base: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        url = (base or self.public) + path
        if spec is None:
            response = await treq.get(url, headers=headers, timeout=30)
        else:
            response = await treq.post(url, json.dumps(spec).encode(), timeout=30,
                                       headers={"Content-Type": "application/json",
                                                **(headers or {})})
        content = await response.content()
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def ok(self, path: str, spec: Any = None, **kw: Any) -> Any:
        code, body = await self.call(path, spec, **kw)
        assert code == 200, (code, body, self.book.logs()[-3000:])
        return body

    # --- what ran -----------------------------------------------------------------------------
    def records(self, **match: Any) -> list[dict[str, Any]]:
        try:
            lines = self.book.records.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = [json.loads(line) for line in lines if line.strip()]
        return [r for r in out if all(_get(r, k) == v for k, v in match.items())]

    async def ran(self, name: str, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        """The records of task ``name`` once it ran ``count`` times."""
        def enough() -> list[dict[str, Any]] | None:
            got = self.records(task=name)
            return got if len(got) >= count else None

        return await wait_for(enough, timeout, f"{count} run(s) of task {name}")

    async def state(self, name: str, queue: str = "default") -> str | None:
        try:
            return (await self.node.node.tq.get(APP, queue, name))["state"]
        except Exception:
            return None

    async def wait_state(self, name: str, state: str, queue: str = "default",
                         timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while (got := await self.state(name, queue)) != state:
            assert time.monotonic() < deadline, f"task {name} is {got}, not {state}"
            await sleep(0.05)

    # --- the node, raw ------------------------------------------------------------------------
    async def rpc(self, method: str, request: Any, *, ticket: str = "", path: str = "/rpc_http",
                  headers: dict[str, str] | None = None) -> Any:
        envelope = remote_pb.Request(service_name="taskqueue", method=method,
                                     request=request.SerializeToString(), request_id=ticket)
        return await self.post(envelope.SerializeToString(), path=path, headers=headers)

    async def post(self, body: bytes, *, path: str = "/rpc_http",
                   headers: dict[str, str] | None = None) -> Any:
        response = await treq.post(self.node_url + path, body, timeout=30, headers={
            "X-Google-RPC-Service-Endpoint": "app-engine-apis",
            "X-Google-RPC-Service-Method": "/VMRemoteAPI.CallRemoteAPI",
            "Content-Type": "application/octet-stream", **(headers or {})})
        content = await response.content()
        assert response.code == 200, (response.code, content)
        return remote_pb.Response.FromString(content)


def _get(record: dict[str, Any], key: str) -> Any:
    if key == "task":
        return record.get("task_name") or record.get("headers", {}).get("X-AppEngine-Taskname")
    return record.get(key)


@pytest_twisted.async_yield_fixture(scope="module")
async def stack(amqp_url: str, redis_url: str) -> Any:
    internal_port, public_port, sdk_port = free_port(), free_port(), free_port()
    config = node_config(
        amqp_url, redis_url, f"http://127.0.0.1:{internal_port}", APP,
        secret=SECRET, trust_appdata=True,
        apps={APP: AppConfig(lb_url=f"http://127.0.0.1:{internal_port}",
                             sdk_listen=f"tcp:{sdk_port}:interface=127.0.0.1"),
              OTHER: AppConfig(lb_url="http://127.0.0.1:9")},
    )
    node = InProcessNode(config)
    await node.start(queue_yaml=QUEUES)
    await node.node.tq.deploy(OTHER, OTHER_QUEUES)
    workdir = Path(tempfile.mkdtemp(prefix="tq-guestbook-"))
    book = Guestbook(APP, SECRET, int(config.listen.split(":")[1]), workdir=workdir)
    by_port = start_app_server(app_id=APP, service="by-port", api_host="127.0.0.1",
                               api_port=sdk_port, records=book.records,
                               log_path=workdir / "by-port.log")
    try:
        # blocking process starts off the reactor thread: the node keeps running meanwhile
        await threads.deferToThread(book.start, instances=2, workers=1,
                                    public_port=public_port, internal_port=internal_port)
        await threads.deferToThread(wait_listening, [by_port])
        yield Stack(node, book, by_port)
    finally:
        by_port.stop()
        book.stop()
        await node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- each SDK call ------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_taskqueue_add_with_params_countdown_name_retry_options(stack: Stack) -> None:
    name = unique("add")
    before = time.time()
    task = await stack.ok("/api/add", {
        "url": "/tasks/add", "params": {"greeting": "héllo wörld", "n": ["1", "2"]},
        "countdown": 1, "name": name, "namespace": "ns1",
        "retry_options": {"task_retry_limit": 3, "min_backoff_seconds": 0.1},
        "headers": {"X-Custom": "kept", "X-AppEngine-TaskName": "forged"},
    })
    assert task["name"] == name and task["was_enqueued"] and task["queue"] == "default"
    [run] = await stack.ran(name)
    assert run["kind"] == "task" and run["method"] == "POST" and run["path"] == "/tasks/add"
    assert run["params"] == {"greeting": ["héllo wörld"], "n": ["1", "2"]}
    assert run["content_type"] == "application/x-www-form-urlencoded"
    h = run["headers"]
    assert h["X-AppEngine-Taskname"] == name  # the forged one was dropped at enqueue
    assert h["X-AppEngine-Queuename"] == "default"
    assert h["X-AppEngine-Taskretrycount"] == "0"
    assert h["X-AppEngine-Current-Namespace"] == "ns1" and run["namespace"] == "ns1"
    assert run["remote_addr"] == "0.1.0.2"  # from X-AppEngine-User-IP, as the SDK expects
    assert abs(float(h["X-AppEngine-Tasketa"]) - task["eta"]) < 0.01
    assert run["time"] >= before + 0.9  # the countdown held it
    await stack.wait_state(name, "completed")


@pytest_twisted.ensureDeferred
async def test_target_routes_the_task_to_that_service(stack: Stack) -> None:
    task = await stack.ok("/api/add", {"url": "/tasks/target?x=1", "method": "GET",
                                       "target": "worker"})
    assert task["target"] == "worker"
    [run] = await stack.ran(task["name"])
    assert (run["service"], run["method"], run["query"]) == ("worker", "GET", "x=1")
    assert run["host"].startswith("worker.")
    plain = await stack.ok("/api/add", {"url": "/tasks/untargeted"})
    [run] = await stack.ran(plain["name"])
    assert run["service"] == "default"


@pytest_twisted.ensureDeferred
async def test_retry_options_of_the_task_are_honoured(stack: Stack) -> None:
    task = await stack.ok("/api/add", {
        "url": "/tasks/fail", "payload": "x",
        "retry_options": {"task_retry_limit": 2, "min_backoff_seconds": 0.1,
                          "max_backoff_seconds": 0.2}})
    runs = await stack.ran(task["name"], count=3)
    await stack.wait_state(task["name"], "error")
    runs = stack.records(task=task["name"])
    assert [r["headers"]["X-AppEngine-Taskretrycount"] for r in runs] == ["0", "1", "2"]
    assert runs[1]["headers"]["X-AppEngine-Taskpreviousresponse"] == "500"


@pytest_twisted.ensureDeferred
async def test_queue_add_of_100_tasks_returns_the_chosen_names(stack: Stack) -> None:
    result = await stack.ok("/api/batch", {"count": 100, "url": "/tasks/batch"})
    names = result["names"]
    assert len(set(names)) == 100 and all(names) and all(result["enqueued"])
    await wait_for(lambda: {r["headers"]["X-AppEngine-Taskname"]
                            for r in stack.records(path="/tasks/batch")} >= set(names),
                   20, "the 100 tasks")
    runs = [r for r in stack.records(path="/tasks/batch")
            if r["headers"]["X-AppEngine-Taskname"] in set(names)]
    assert len(runs) == 100  # each exactly once
    assert sorted(int(r["params"]["i"][0]) for r in runs) == list(range(100))
    assert {r["pid"] for r in runs} and {r["service"] for r in runs} == {"default"}


@pytest_twisted.ensureDeferred
async def test_a_batch_with_an_existing_name_adds_the_others(stack: Stack) -> None:
    existing = unique("exists")
    await stack.ok("/api/add", {"url": "/tasks/held", "name": existing, "countdown": 600,
                                "queue": "held"})
    first, last = unique("b1"), unique("b3")
    result = await stack.ok("/api/batch", {"count": 3, "queue": "held", "url": "/tasks/b",
                                           "names": [first, existing, last]})
    assert result["error"]["exception"] == "TaskAlreadyExistsError"
    assert result["enqueued"] == [True, False, True]
    await stack.ran(first)
    await stack.ran(last)


@pytest_twisted.ensureDeferred
async def test_deferred_defer_runs_the_function_with_its_arguments(stack: Stack) -> None:
    task = await stack.ok("/api/defer", {"args": ["hello", 42, [1, 2]],
                                         "kwargs": {"flag": True, "who": "guest"},
                                         "python_values": True})
    [run] = await stack.ran(task["name"])
    assert run["kind"] == "deferred"
    assert run["args"][:3] == ["hello", 42, [1, 2]]
    assert run["args_repr"] == repr(("hello", 42, [1, 2], ("a", "tuple")))
    assert run["kwargs"]["flag"] is True and run["kwargs"]["who"] == "guest"
    assert "b'\\x00bytes\\xff'" in run["kwargs_repr"] and "frozenset" in run["kwargs_repr"]
    assert (run["remote_addr"], run["queue_name"]) == ("0.1.0.2", "default")
    await stack.wait_state(task["name"], "completed")
    # a named, delayed deferred task on another queue
    name = unique("deferred")
    task = await stack.ok("/api/defer", {"args": ["later"],
                                         "options": {"name": name, "countdown": 0.5,
                                                     "queue": "mail"}})
    assert task["name"] == name
    [run] = await stack.ran(name)
    assert run["args"] == ["later"] and run["queue_name"] == "mail"


@pytest_twisted.ensureDeferred
async def test_delete_purge_and_statistics(stack: Stack) -> None:
    names = {k: unique(k) for k in ("a", "b", "c", "d", "keep")}
    [before] = await stack.ok("/api/stats?queue=held")  # other tests leave tasks there
    for key in ("a", "b", "keep"):
        await stack.ok("/api/add", {"url": "/tasks/held", "name": names[key], "countdown": 2,
                                    "queue": "held"})
    for key in ("c", "d"):
        await stack.ok("/api/add", {"url": "/tasks/purged", "name": names[key], "countdown": 2,
                                    "queue": "purgeable"})
    stats = await stack.ok("/api/stats?queue=held&queue=purgeable&queue=default")
    held, purgeable, default = stats
    assert (held["queue"], held["tasks"], purgeable["tasks"]) == ("held", before["tasks"] + 3, 2)
    assert held["oldest_eta_usec"] > time.time() * 1e6
    assert default["enforced_rate"] == 500.0 and default["in_flight"] is not None
    assert (await stack.ok("/api/delete", {"queue": "held", "names": [names["a"]]})
            )["deleted"] == [True]
    assert (await stack.ok("/api/delete", {"queue": "held", "by_name": True,
                                           "names": [names["b"], unique("never")]})
            )["deleted"] == [True, False]
    await stack.ok("/api/purge", {"queue": "purgeable"})
    held, purgeable = await stack.ok("/api/stats?queue=held&queue=purgeable")
    assert (held["tasks"], purgeable["tasks"]) == (before["tasks"] + 1, 0)
    assert purgeable["oldest_eta_usec"] is None
    await stack.ran(names["keep"])
    await sleep(0.5)
    for key in ("a", "b", "c", "d"):
        assert stack.records(task=names[key]) == [], key
    assert await stack.state(names["a"], "held") == "deleted"
    # deleting again: the SDK ignores tombstoned names
    assert (await stack.ok("/api/delete", {"queue": "held", "names": [names["a"]]})
            )["deleted"] == [False]


@pytest_twisted.ensureDeferred
async def test_errors_are_raised_where_app_engine_raises_them(stack: Stack) -> None:
    expected = {
        "already_exists": ("TaskAlreadyExistsError", "add"),
        "tombstoned": ("TombstonedTaskError", "add"),
        "unknown_queue": ("UnknownQueueError", "add"),
        "invalid_name": ("InvalidTaskNameError", "construct"),
        "too_large": ("TaskTooLargeError", "construct"),
        "eta_too_far": ("InvalidEtaError", "construct"),
    }
    for kind, (exception, phase) in expected.items():
        got = await stack.ok("/api/error", {"kind": kind})
        assert (got["exception"], got["phase"]) == (exception, phase), got
        assert "Error" in got["is_a"] and "Exception" in got["is_a"]
    eta = await stack.ok("/api/error", {"kind": "eta_too_far"})
    assert "InvalidTaskError" in eta["is_a"]  # App Engine's InvalidTaskError for a far ETA


@pytest_twisted.ensureDeferred
async def test_legacy_appdata_form_enqueues_the_same_task(stack: Stack) -> None:
    def bulk(name: str) -> Any:
        request = tq_pb.TaskQueueBulkAddRequest()
        add = request.add_request.add(
            queue_name=b"default", task_name=name.encode(), eta_usec=int(time.time() * 1e6),
            url=b"/tasks/legacy", method=tq_pb.TaskQueueAddRequest.POST, mode=0,
            body=urlencode({"greeting": "from python 2"}).encode())
        for key, value in ((b"content-type", b"application/x-www-form-urlencoded"),
                           (b"X-AppEngine-Current-Namespace", b"")):
            header = add.header.add()
            header.key, header.value = key, value
        return request

    legacy, modern = unique("legacy"), unique("modern")
    response = await stack.rpc("BulkAdd", bulk(legacy), ticket="appscale-request-id", path="/",
                               headers={"ProtocolBufferType": "Request", "AppData": APP,
                                        "Module": "default", "Version": "v1"})
    assert not response.HasField("application_error"), response
    reply = tq_pb.TaskQueueBulkAddResponse.FromString(response.response)
    assert [r.result for r in reply.taskresult] == [E.OK]
    response = await stack.rpc("BulkAdd", bulk(modern), ticket=mint_ticket(SECRET, APP))
    assert not response.HasField("application_error"), response
    [old], [new] = await stack.ran(legacy), await stack.ran(modern)
    same = ("method", "path", "params", "body", "content_type", "remote_addr", "service")
    assert {k: old[k] for k in same} == {k: new[k] for k in same}
    assert old["params"] == {"greeting": ["from python 2"]}
    # AppData naming an app the node does not serve; AppData off the legacy form
    for path, headers in (("/", {"ProtocolBufferType": "Request", "AppData": "stranger"}),
                          ("/rpc_http", {"AppData": APP})):
        response = await stack.rpc("BulkAdd", bulk(unique("no")), path=path, headers=headers)
        assert response.application_error.code == E.PERMISSION_DENIED, (path, response)


@pytest_twisted.ensureDeferred
async def test_foreign_tickets_are_refused_and_nothing_crashes(stack: Stack) -> None:
    direct = stack.app_server()  # the app server itself, not through HAProxy
    for ticket in (mint_ticket("another-secret", APP), mint_ticket(SECRET, "stranger"),
                   "tq1:" + APP + ":" + "0" * 64, "garbage"):
        code, body = await stack.call("/api/add", {"url": "/tasks/never"}, base=direct,
                                      headers={"X-AppEngine-Api-Ticket": ticket})
        assert (code, body["error"]["exception"]) == (409, "PermissionDeniedError"), body
    # another app's ticket: that app's queues only, and never in this app's name
    other = mint_ticket(SECRET, OTHER)
    add = tq_pb.TaskQueueAddRequest(queue_name=b"mail", task_name=b"", url=b"/x",
                                    eta_usec=int(time.time() * 1e6))
    request = tq_pb.TaskQueueBulkAddRequest()
    request.add_request.add().CopyFrom(add)
    reply = await stack.rpc("BulkAdd", request, ticket=other)
    assert [r.result for r in tq_pb.TaskQueueBulkAddResponse.FromString(
        reply.response).taskresult] == [E.UNKNOWN_QUEUE]
    purge = tq_pb.TaskQueuePurgeQueueRequest(queue_name=b"default", app_id=APP.encode())
    reply = await stack.rpc("PurgeQueue", purge, ticket=other)
    assert reply.application_error.code == E.PERMISSION_DENIED
    # garbage to the node: an rpc_error, HTTP 200
    for body in (b"", b"\xff" * 64, b"not a protobuf at all"):
        reply = await stack.post(body)
        assert reply.rpc_error.code == remote_pb.RpcError.PARSE_ERROR
    reply = await stack.rpc("QueryTasks", tq_pb.TaskQueueBulkAddRequest(),
                            ticket=mint_ticket(SECRET, APP))
    assert reply.rpc_error.code == remote_pb.RpcError.CALL_NOT_FOUND
    # a forged ticket from outside is replaced by HAProxy: the request is the app's own
    task = await stack.ok("/api/add", {"url": "/tasks/after-forgery"},
                          headers={"X-AppEngine-Api-Ticket": mint_ticket(SECRET, OTHER)})
    await stack.ran(task["name"])


@pytest_twisted.ensureDeferred
async def test_the_apps_own_sdk_port_tells_the_app(stack: Stack) -> None:
    direct = f"http://127.0.0.1:{stack.by_port.port}"
    # the SDK wants some ticket in the request; on the app's own port the node ignores it
    for ticket in ("anything", mint_ticket(SECRET, OTHER)):
        task = await stack.ok("/api/add", {"url": "/tasks/by-port", "params": {"t": ticket}},
                              base=direct, headers={"X-AppEngine-Api-Ticket": ticket})
        [run] = await stack.ran(task["name"])
        assert run["params"] == {"t": [ticket]} and run["service"] == "default"
        await stack.wait_state(task["name"], "completed")


@pytest_twisted.ensureDeferred
async def test_public_frontend_strips_appengine_headers(stack: Stack) -> None:
    forged = {"X-AppEngine-TaskName": "forged", "x-appengine-user-ip": "0.1.0.2",
              "X-APPENGINE-QUEUENAME": "default", "X-AppEngine-Api-Ticket": "forged"}
    seen = await stack.ok("/whoami", headers=forged)
    assert seen["remote_addr"] == "127.0.0.1"
    assert "X-AppEngine-Taskname" not in seen["headers"]
    assert "X-AppEngine-Queuename" not in seen["headers"]
    assert seen["headers"]["X-AppEngine-User-Ip"] == "127.0.0.1"
    assert seen["headers"]["X-AppEngine-Api-Ticket"] == "(present)"
    inside = await stack.ok("/whoami", base=stack.internal, headers=forged)
    assert inside["headers"]["X-AppEngine-Taskname"] == "forged"  # the dispatcher's side
    # so nobody outside can run a deferred function
    payload = PWNED
    response = await treq.post(stack.public + "/_ah/queue/deferred", payload,
                               headers=forged, timeout=10)
    assert response.code == 403, await response.content()
    assert stack.records(kind="deferred", args=["pwned"]) == []
    # the same request on the internal side (the dispatcher's) runs: the stripping is the guard
    inside_payload = PWNED.replace(b"Vpwned", b"Vinside")
    response = await treq.post(stack.internal + "/_ah/queue/deferred", inside_payload,
                               headers=forged, timeout=10)
    assert response.code == 200, await response.content()
    assert stack.records(kind="deferred", args=["inside"])


@pytest_twisted.ensureDeferred
async def test_signing_the_guestbook(stack: Stack) -> None:
    message = unique("hello")
    response = await treq.post(stack.public + "/sign", urlencode(
        {"author": "ada", "message": message}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10,
        allow_redirects=False)
    assert response.code == 303
    await wait_for(lambda: stack.records(kind="greeting", message=message), 10, "the greeting")
    page = await (await treq.get(stack.public + "/", timeout=10)).text()
    assert message in page

