"""The App Engine SDK protocol (``POST /rpc_http`` and AppScale's ``POST /``) through StubTreq,
over the memory store, a fake broker and a queue registry.

Requests are built with the SDK's own message classes (``appengine-python-standard``, a test
dependency), so the node's descriptors are checked against the real wire format.
"""

from __future__ import annotations

import itertools
from typing import Any

from google.appengine.api.taskqueue import taskqueue_service_bytes_pb2 as tq_pb
from google.appengine.ext.remote_api import remote_api_bytes_pb2 as remote_pb
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appscale_tq import sdkproto as pb
from appscale_tq.api import TaskQueue
from appscale_tq.config import AppConfig, NodeConfig
from appscale_tq.registry import QueueRegistry
from appscale_tq.sdk import SDKService, check_ticket, mint_ticket
from appscale_tq.sdkweb import Root, SDKResource
from appscale_tq.testing import FakeBroker, MemoryStore
from appscale_tq.web import build_root

T0 = 1_700_000_000.0
SECRET = "unit-test-secret"
BASE = "http://tq.test"
RPC = BASE + "/rpc_http"
E = tq_pb.TaskQueueServiceError
QUEUES = """
queue:
- name: default
  rate: 500/s
- name: mail
  rate: 5/s
  bucket_size: 10
  retry_parameters:
    task_retry_limit: 3
"""
OTHER_QUEUES = "queue:\n- name: default\n  rate: 1/s\n"
# the headers the SDK sends with every call
SDK_HEADERS = {
    "X-Google-RPC-Service-Endpoint": "app-engine-apis",
    "X-Google-RPC-Service-Method": "/VMRemoteAPI.CallRemoteAPI",
    "X-Google-RPC-Service-Deadline": "5",
    "Content-Type": "application/octet-stream",
}


class Broker(FakeBroker):
    """FakeBroker with the queue operations TaskQueue also calls."""

    def __init__(self) -> None:
        super().__init__()
        self.purged: list[tuple[str, str]] = []
        self.ensured: list[tuple[str, str]] = []

    async def ensure_queue(self, app: str, queue: str) -> None:
        self.ensured.append((app, queue))

    async def purge(self, app: str, queue: str) -> None:
        self.purged.append((app, queue))

    def consuming(self) -> set[tuple[str, str]]:
        return set(self.handlers)


class Node:
    def __init__(self, test: SynchronousTestCase, *, secret: str | None = SECRET,
                 trust_appdata: bool = False, apps: tuple[str, ...] = ("myapp", "other"),
                 app: str | None = None) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock, tombstone_seconds=3600)
        self.broker = Broker()
        config = NodeConfig(apps={a: AppConfig() for a in apps}, secret=secret,
                            trust_appdata=trust_appdata)
        self.registry = QueueRegistry(self.clock, self.store, config.apps)
        tokens = itertools.count()
        self.tq = TaskQueue(self.clock, config, self.store, self.broker,
                            token=lambda: f"tok{next(tokens)}", registry=self.registry)
        for name in apps:
            self.wait(self.tq.deploy(name, QUEUES if name == "myapp" else OTHER_QUEUES))
        self.sdk = SDKService(self.tq, self.clock)
        resource = SDKResource(self.sdk, config.apps, app=app, secret=secret,
                               trust_appdata=trust_appdata)
        self.client = StubTreq(Root(build_root(self.tq, self._health, secret), resource))

    async def _health(self) -> dict[str, str]:
        return {}

    def wait(self, coroutine: Any) -> Any:
        return self.test.successResultOf(Deferred.fromCoroutine(coroutine))

    def post(self, body: bytes, url: str = RPC, headers: dict[str, str] | None = None) -> Any:
        """POST a raw body; the reply must be HTTP 200 with a remote_api Response."""
        response = self.test.successResultOf(
            self.client.post(url, data=body, headers={**SDK_HEADERS, **(headers or {})}))
        content = self.test.successResultOf(response.content())
        self.test.assertEqual(response.code, 200, content[:200])
        self.test.assertEqual(response.headers.getRawHeaders(b"content-type"),
                              [b"application/octet-stream"])
        return remote_pb.Response.FromString(content)

    def call(self, method: str, request: Any, *, app: str | None = "myapp",
             ticket: str | None = None, service: str = "taskqueue", url: str = RPC,
             headers: dict[str, str] | None = None, partial: bool = False) -> Any:
        envelope = remote_pb.Request(service_name=service, method=method)
        if isinstance(request, bytes):
            envelope.request = request
        else:
            envelope.request = (request.SerializePartialToString() if partial
                                else request.SerializeToString())
        if ticket is not None:
            envelope.request_id = ticket
        elif app is not None:
            envelope.request_id = mint_ticket(SECRET, app)
        return self.post(envelope.SerializeToString(), url=url, headers=headers)

    def ok(self, method: str, request: Any, response_class: Any, **kw: Any) -> Any:
        response = self.call(method, request, **kw)
        self.test.assertFalse(response.HasField("application_error"), response)
        self.test.assertFalse(response.HasField("rpc_error"), response)
        return response_class.FromString(response.response)

    def bulk_add(self, *adds: Any, **kw: Any) -> list[tuple[int, str | None]]:
        """BulkAdd of AddRequests (the SDK's, or ours for values the SDK's enums refuse)."""
        reply = self.ok("BulkAdd", bulk(*adds), tq_pb.TaskQueueBulkAddResponse, **kw)
        return [(r.result, r.chosen_task_name.decode() if r.HasField("chosen_task_name")
                 else None) for r in reply.taskresult]

    def published(self) -> dict[str, Any]:
        return {task.name: (task, delay) for task, delay in self.broker.published}


def add_request(name: str = "", queue: str = "default", *, eta: float = T0,
                url: str = "/work", body: bytes | None = None, **fields: Any) -> Any:
    """An AddRequest as the SDK fills it: mode PUSH, eta_usec always, namespace header."""
    values: dict[str, Any] = dict(queue_name=queue.encode(), task_name=name.encode(),
                                  eta_usec=int(eta * 1e6), url=url.encode(), mode=0)
    values.update(fields)
    add = tq_pb.TaskQueueAddRequest(**values)
    if body is not None:
        add.body = body
    header = add.header.add()
    header.key, header.value = b"X-AppEngine-Current-Namespace", b""
    return add


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def bulk(*adds: Any) -> bytes:
    """A serialized BulkAddRequest (field 1: each AddRequest)."""
    return b"".join(b"\x0a" + _varint(len(raw)) + raw
                    for raw in (a.SerializePartialToString() for a in adds))


def raw_add(name: str = "", queue: str = "default", *, eta: float = T0, url: str = "/work",
            **fields: Any) -> Any:
    """An AddRequest of the node's own descriptors (``method`` is a plain int32 there)."""
    values: dict[str, Any] = dict(queue_name=queue.encode(), task_name=name.encode(),
                                  eta_usec=int(eta * 1e6), url=url.encode())
    values.update(fields)
    return pb.AddRequest(**values)


def app_error(response: Any) -> tuple[int, str] | None:
    if response.HasField("application_error"):
        return response.application_error.code, response.application_error.detail
    return None


class SDKTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = Node(self)

    def assertAppError(self, response: Any, code: int) -> None:  # noqa: N802
        self.assertFalse(response.HasField("rpc_error"), response)
        self.assertTrue(response.HasField("application_error"), response)
        self.assertEqual(response.application_error.code, code, response.application_error)
        self.assertTrue(response.application_error.detail)

    def assertRpcError(self, response: Any, code: int) -> None:  # noqa: N802
        self.assertTrue(response.HasField("rpc_error"), response)
        self.assertEqual(response.rpc_error.code, code, response.rpc_error)
        self.assertFalse(response.HasField("application_error"))


class EnvelopeTests(SDKTestCase):
    def test_garbage_bodies_are_parse_errors(self) -> None:
        for body in (b"", b"hello world", b"\xff" * 17, b"\x00\x01\x02", b"{\"json\": 1}",
                     b"\x12\x09taskqueue", b"\x08" * 10, b"\x0b\x0c" * 50):
            with self.subTest(body=body):
                self.assertRpcError(self.node.post(body), remote_pb.RpcError.PARSE_ERROR)
        self.assertEqual(self.node.broker.published, [])

    def test_truncated_envelope(self) -> None:
        envelope = remote_pb.Request(service_name="taskqueue", method="BulkAdd",
                                     request=b"x" * 40, request_id=mint_ticket(SECRET, "myapp"))
        raw = envelope.SerializeToString()
        for cut in (1, 5, 20, len(raw) - 1):
            with self.subTest(cut=cut):
                self.assertRpcError(self.node.post(raw[:cut]), remote_pb.RpcError.PARSE_ERROR)

    def test_truncated_inner_request_is_invalid_request(self) -> None:
        request = tq_pb.TaskQueueBulkAddRequest()
        request.add_request.add().CopyFrom(add_request("t1", body=b"payload"))
        raw = request.SerializeToString()
        for cut in (1, len(raw) // 2, len(raw) - 1):
            envelope = remote_pb.Request(service_name="taskqueue", method="BulkAdd",
                                         request=raw[:cut],
                                         request_id=mint_ticket(SECRET, "myapp"))
            with self.subTest(cut=cut):
                self.assertAppError(self.node.post(envelope.SerializeToString()),
                                    E.INVALID_REQUEST)
        self.assertEqual(self.node.broker.published, [])

    def test_unknown_service(self) -> None:
        for service in ("datastore_v3", "memcache", "", "taskqueue ", "TASKQUEUE"):
            with self.subTest(service=service):
                response = self.node.call("BulkAdd", tq_pb.TaskQueueBulkAddRequest(),
                                          service=service)
                self.assertRpcError(response, remote_pb.RpcError.CALL_NOT_FOUND)

    def test_unknown_method(self) -> None:
        for method in ("QueryTasks", "QueryAndOwnTasks", "DeleteQueue", "bulkadd", "",
                       "__init__", "_bulk_add", "handle"):
            with self.subTest(method=method):
                response = self.node.call(method, tq_pb.TaskQueueBulkAddRequest())
                self.assertRpcError(response, remote_pb.RpcError.CALL_NOT_FOUND)

    def test_service_and_method_not_utf8(self) -> None:
        # proto2 strings are not checked for UTF-8 on parse: the parser hands back bytes
        ticket = mint_ticket(SECRET, "myapp").encode()
        for service, method in ((b"\xfftaskqueue", b"BulkAdd"), (b"taskqueue", b"Bulk\xffAdd")):
            raw = (b"\x12" + bytes([len(service)]) + service + b"\x1a" + bytes([len(method)])
                   + method + b"\x22\x00" + b"\x2a" + bytes([len(ticket)]) + ticket)
            with self.subTest(service=service, method=method):
                self.assertRpcError(self.node.post(raw), remote_pb.RpcError.CALL_NOT_FOUND)

    def test_ticket_not_utf8_is_permission_denied(self) -> None:
        raw = b"\x12\x09taskqueue\x1a\x07BulkAdd\x22\x00\x2a\x04\xff\xfe\xfd\xfc"
        self.assertAppError(self.node.post(raw), E.PERMISSION_DENIED)

    def test_get_is_refused_without_a_crash(self) -> None:
        response = self.successResultOf(self.node.client.get(RPC))
        self.assertEqual(response.code, 405)


class MissingFieldTests(SDKTestCase):
    def test_required_fields(self) -> None:
        no_eta = tq_pb.TaskQueueBulkAddRequest()
        no_eta.add_request.add(queue_name=b"default", task_name=b"")
        cases = [
            ("BulkAdd", no_eta),
            ("Add", tq_pb.TaskQueueAddRequest(queue_name=b"default", eta_usec=1)),
            ("Add", tq_pb.TaskQueueAddRequest(task_name=b"", eta_usec=1)),
            ("Delete", tq_pb.TaskQueueDeleteRequest(task_name=[b"a"])),
            ("PurgeQueue", tq_pb.TaskQueuePurgeQueueRequest()),
            ("PauseQueue", tq_pb.TaskQueuePauseQueueRequest(app_id=b"myapp",
                                                            queue_name=b"default")),
            ("FetchQueues", tq_pb.TaskQueueFetchQueuesRequest()),
            ("UpdateQueue", tq_pb.TaskQueueUpdateQueueRequest(queue_name=b"q",
                                                              bucket_refill_per_second=1)),
        ]
        for method, request in cases:
            with self.subTest(method=method, request=request):
                response = self.node.call(method, request, partial=True)
                self.assertAppError(response, E.INVALID_REQUEST)
                self.assertIn("missing", response.application_error.detail)
        self.assertEqual(self.node.broker.published, [])


class BulkAddTests(SDKTestCase):
    def test_empty_name_gets_a_chosen_name(self) -> None:
        [(code, chosen)] = self.node.bulk_add(add_request(""))
        self.assertEqual(code, E.OK)
        self.assertTrue(chosen and chosen.startswith("task-"), chosen)
        self.assertIn(chosen, self.node.published())

    def test_named_task_has_no_chosen_name(self) -> None:
        self.assertEqual(self.node.bulk_add(add_request("named")), [(E.OK, None)])
        self.assertIn("named", self.node.published())

    def test_batch_of_100_returns_every_chosen_name(self) -> None:
        results = self.node.bulk_add(*[add_request("") for _ in range(100)])
        self.assertEqual([code for code, _ in results], [E.OK] * 100)
        names = [name for _, name in results]
        self.assertEqual(len(set(names)), 100)
        self.assertEqual(set(names), set(self.node.published()))

    def test_over_100_is_too_many_tasks(self) -> None:
        request = tq_pb.TaskQueueBulkAddRequest()
        for _ in range(101):
            request.add_request.add().CopyFrom(add_request(""))
        self.assertAppError(self.node.call("BulkAdd", request), E.TOO_MANY_TASKS)

    def test_one_invalid_task_skips_the_others_with_its_own_code(self) -> None:
        cases = [
            (add_request("bad name!"), E.INVALID_TASK_NAME),
            (add_request("a", queue="nope"), E.UNKNOWN_QUEUE),
            (add_request("a", queue="bad_queue!"), E.INVALID_QUEUE_NAME),
            (add_request("a", eta=T0 + 31 * 86400), E.INVALID_ETA),
            (add_request("a", body=b"x" * 102401), E.TASK_TOO_LARGE),
            (add_request("a", url="http://elsewhere/"), E.INVALID_URL),
            (add_request("a", mode=1), E.INVALID_QUEUE_MODE),
            (add_request("a", app_id=b"other"), E.PERMISSION_DENIED),
            (add_request("a", retry_parameters=tq_pb.TaskQueueRetryParameters(
                min_backoff_sec=10, max_backoff_sec=1)), E.INVALID_RETRY_PARAMETERS),
            (add_request("a", retry_parameters=tq_pb.TaskQueueRetryParameters(
                retry_limit=-1)), E.INVALID_RETRY_PARAMETERS),
            (add_request("a", dispatch_deadline_usec=1), E.INVALID_REQUEST),
            (add_request("a", datastore_transaction=b"tx"), E.INVALID_REQUEST),
            (raw_add("a", transaction=b""), E.INVALID_REQUEST),
            (raw_add("a", method=9), E.INVALID_REQUEST),
            (raw_add("a", task_name=b"\xff"), E.INVALID_TASK_NAME),
            (raw_add("a", queue_name=b"\xff"), E.INVALID_REQUEST),
        ]
        for bad, code in cases:
            self.node.broker.published.clear()
            with self.subTest(code=code):
                results = self.node.bulk_add(add_request("first"), bad, add_request(""))
                self.assertEqual([r for r, _ in results], [E.SKIPPED, code, E.SKIPPED])
                self.assertEqual([n for _, n in results], [None, None, None])
                self.assertEqual(self.node.broker.published, [])

    def test_duplicate_names_in_a_batch(self) -> None:
        results = self.node.bulk_add(add_request("a"), add_request("b"), add_request("a"))
        self.assertEqual([r for r, _ in results], [E.SKIPPED, E.SKIPPED, E.DUPLICATE_TASK_NAME])
        self.assertEqual(self.node.broker.published, [])

    def test_existing_and_tombstoned_names_fail_alone(self) -> None:
        self.node.bulk_add(add_request("exists"), add_request("gone"))
        self.node.wait(self.node.store.delete("myapp", "default", "gone"))
        results = self.node.bulk_add(add_request("new1"), add_request("exists"),
                                     add_request("gone"), add_request(""))
        self.assertEqual([r for r, _ in results],
                         [E.OK, E.TASK_ALREADY_EXISTS, E.TOMBSTONED_TASK, E.OK])
        self.assertIn("new1", self.node.published())
        self.assertIn(results[3][1], self.node.published())

    def test_store_down_is_transient(self) -> None:
        self.node.store.down = True
        self.assertEqual(self.node.bulk_add(add_request("a")), [(E.TRANSIENT_ERROR, None)])

    def test_task_fields_reach_the_task(self) -> None:
        add = add_request("full", queue="mail", eta=T0 + 90, url="/mail/send?x=1",
                          body=b"a=1&b=2", dispatch_deadline_usec=30_000_000,
                          retry_parameters=tq_pb.TaskQueueRetryParameters(
                              retry_limit=2, min_backoff_sec=0.5, max_backoff_sec=4,
                              age_limit_sec=600, max_doublings=3))
        for key, value in ((b"content-type", b"application/x-www-form-urlencoded"),
                           (b"Host", b"worker.guestbook.example"),
                           (b"X-AppEngine-TaskName", b"forged"),
                           (b"X-AppEngine-User-IP", b"0.1.0.2"),
                           (b"X-Custom", b"kept")):
            header = add.header.add()
            header.key, header.value = key, value
        self.assertEqual(self.node.bulk_add(add), [(E.OK, None)])
        task, delay = self.node.published()["full"]
        self.assertEqual((task.app, task.queue, task.url, task.method, task.payload),
                         ("myapp", "mail", "/mail/send?x=1", "POST", b"a=1&b=2"))
        self.assertEqual((task.eta, delay, task.deadline), (T0 + 90, 90.0, 30.0))
        self.assertEqual(task.retry.as_dict(), {
            "task_retry_limit": 2, "task_age_limit": 600.0, "min_backoff_seconds": 0.5,
            "max_backoff_seconds": 4.0, "max_doublings": 3})
        headers = {k.lower(): v for k, v in task.headers}
        self.assertEqual(headers, {
            "content-type": "application/x-www-form-urlencoded", "x-custom": "kept",
            "x-appengine-current-namespace": "", "host": "worker.guestbook.example"})

    def test_methods(self) -> None:
        for number, method in ((1, "GET"), (2, "POST"), (3, "HEAD"), (4, "PUT"), (5, "DELETE")):
            self.node.bulk_add(add_request(f"m{number}", method=number))
            self.assertEqual(self.node.published()[f"m{number}"][0].method, method)
        self.assertEqual(self.node.bulk_add(raw_add("m9", method=9))[0][0], E.INVALID_REQUEST)
        self.assertEqual(self.node.bulk_add(add_request("g", method=1, body=b"x"))[0][0],
                         E.INVALID_REQUEST)

    def test_past_eta_is_now(self) -> None:
        self.node.bulk_add(add_request("past", eta=T0 - 1000))
        task, delay = self.node.published()["past"]
        self.assertEqual((task.eta, delay), (T0, 0.0))

    def test_single_add(self) -> None:
        reply = self.node.ok("Add", add_request(""), tq_pb.TaskQueueAddResponse)
        self.assertIn(reply.chosen_task_name.decode(), self.node.published())
        reply = self.node.ok("Add", add_request("one"), tq_pb.TaskQueueAddResponse)
        self.assertFalse(reply.HasField("chosen_task_name"))
        self.assertAppError(self.node.call("Add", add_request("one")), E.TASK_ALREADY_EXISTS)
        self.assertAppError(self.node.call("Add", add_request("x", queue="nope")),
                            E.UNKNOWN_QUEUE)


class QueueOperationTests(SDKTestCase):
    def test_delete(self) -> None:
        self.node.bulk_add(add_request("a", eta=T0 + 60), add_request("b", eta=T0 + 60))
        request = tq_pb.TaskQueueDeleteRequest(
            queue_name=b"default", task_name=[b"a", b"missing", b"bad name", b"b"])
        reply = self.node.ok("Delete", request, tq_pb.TaskQueueDeleteResponse)
        self.assertEqual(list(reply.result),
                         [E.OK, E.UNKNOWN_TASK, E.INVALID_TASK_NAME, E.OK])
        reply = self.node.ok("Delete", tq_pb.TaskQueueDeleteRequest(
            queue_name=b"default", task_name=[b"a"]), tq_pb.TaskQueueDeleteResponse)
        self.assertEqual(list(reply.result), [E.TOMBSTONED_TASK])
        self.assertAppError(self.node.call("Delete", tq_pb.TaskQueueDeleteRequest(
            queue_name=b"nope", task_name=[b"a"])), E.UNKNOWN_QUEUE)

    def test_purge(self) -> None:
        self.node.ok("PurgeQueue", tq_pb.TaskQueuePurgeQueueRequest(queue_name=b"mail"),
                     tq_pb.TaskQueuePurgeQueueResponse)
        self.assertEqual(self.node.broker.purged, [("myapp", "mail")])
        self.assertEqual(self.node.store.gens[("myapp", "mail")], 1)
        self.assertAppError(self.node.call("PurgeQueue", tq_pb.TaskQueuePurgeQueueRequest(
            queue_name=b"nope")), E.UNKNOWN_QUEUE)
        self.assertAppError(self.node.call("PurgeQueue", tq_pb.TaskQueuePurgeQueueRequest(
            queue_name=b"mail", app_id=b"other")), E.PERMISSION_DENIED)

    def test_fetch_queue_stats(self) -> None:
        self.node.bulk_add(add_request("a", eta=T0 + 30), add_request("b", eta=T0 + 10))
        request = tq_pb.TaskQueueFetchQueueStatsRequest(queue_name=[b"default", b"mail"])
        reply = self.node.ok("FetchQueueStats", request, tq_pb.TaskQueueFetchQueueStatsResponse)
        default, mail = reply.queuestats
        self.assertEqual((default.num_tasks, default.oldest_eta_usec), (2, int((T0 + 10) * 1e6)))
        self.assertEqual((mail.num_tasks, mail.oldest_eta_usec), (0, -1))
        self.assertEqual(mail.scanner_info.enforced_rate, 5.0)
        self.assertAppError(self.node.call("FetchQueueStats", tq_pb.TaskQueueFetchQueueStatsRequest(
            queue_name=[b"nope"])), E.UNKNOWN_QUEUE)
        self.node.store.down = True
        self.assertAppError(self.node.call("FetchQueueStats", request), E.TRANSIENT_ERROR)

    def test_pause_and_fetch_queues(self) -> None:
        self.node.ok("PauseQueue", tq_pb.TaskQueuePauseQueueRequest(
            app_id=b"myapp", queue_name=b"mail", pause=True), tq_pb.TaskQueuePauseQueueResponse)
        reply = self.node.ok("FetchQueues", tq_pb.TaskQueueFetchQueuesRequest(max_rows=10),
                             tq_pb.TaskQueueFetchQueuesResponse)
        queues = {q.queue_name.decode(): q for q in reply.queue}
        self.assertEqual(set(queues), {"default", "mail"})
        self.assertTrue(queues["mail"].paused)
        self.assertFalse(queues["default"].paused)
        self.assertEqual(queues["mail"].bucket_refill_per_second, 5.0)
        self.assertEqual(queues["mail"].bucket_capacity, 10.0)
        self.assertEqual(queues["mail"].retry_parameters.retry_limit, 3)
        reply = self.node.ok("FetchQueues", tq_pb.TaskQueueFetchQueuesRequest(max_rows=1),
                             tq_pb.TaskQueueFetchQueuesResponse)
        self.assertEqual(len(reply.queue), 1)
        # PauseQueue names its app (a required field): only the caller's
        self.assertAppError(self.node.call("PauseQueue", tq_pb.TaskQueuePauseQueueRequest(
            app_id=b"other", queue_name=b"default", pause=True)), E.PERMISSION_DENIED)

    def test_update_queue(self) -> None:
        self.node.ok("UpdateQueue", tq_pb.TaskQueueUpdateQueueRequest(
            queue_name=b"fresh", bucket_refill_per_second=2.5, bucket_capacity=7,
            user_specified_rate="2.5/s",
            retry_parameters=tq_pb.TaskQueueRetryParameters(retry_limit=4, age_limit_sec=120)),
            tq_pb.TaskQueueUpdateQueueResponse)
        reply = self.node.ok("FetchQueues", tq_pb.TaskQueueFetchQueuesRequest(max_rows=10),
                             tq_pb.TaskQueueFetchQueuesResponse)
        fresh = {q.queue_name.decode(): q for q in reply.queue}["fresh"]
        self.assertEqual((fresh.bucket_refill_per_second, fresh.bucket_capacity), (2.5, 7.0))
        self.assertEqual((fresh.retry_parameters.retry_limit,
                          fresh.retry_parameters.age_limit_sec), (4, 120))
        self.assertEqual(self.node.bulk_add(add_request("f", queue="fresh")), [(E.OK, None)])
        self.assertAppError(self.node.call("UpdateQueue", tq_pb.TaskQueueUpdateQueueRequest(
            queue_name=b"bad", bucket_refill_per_second=-1, bucket_capacity=1)),
            E.INVALID_QUEUE_RATE)


class CallerTests(SynchronousTestCase):
    def test_mint_and_check(self) -> None:
        ticket = mint_ticket(SECRET, "myapp")
        self.assertEqual(check_ticket(SECRET, ticket), "myapp")
        self.assertEqual(check_ticket(SECRET, ticket.encode()), "myapp")
        self.assertEqual(check_ticket(SECRET, mint_ticket(SECRET, "dom.com:app")), "dom.com:app")
        self.assertNotEqual(mint_ticket(SECRET, "a"), mint_ticket("other-secret", "a"))

    def test_forged_tickets(self) -> None:
        ticket = mint_ticket(SECRET, "myapp")
        mac = ticket.rsplit(":", 1)[1]
        forged = [
            mint_ticket("other-secret", "myapp"),
            ticket[:-1] + ("0" if ticket[-1] != "0" else "1"),
            f"tq1:other:{mac}",  # myapp's MAC on another app
            "tq1:myapp", "tq1::" + mac, "myapp", "", ":", "tq1:myapp:", ticket + "0",
            "tq2" + ticket[3:], b"\xff\xfe", 12345, None,
        ]
        for bad in forged:
            with self.subTest(ticket=bad):
                self.assertIsNone(check_ticket(SECRET, bad))  # type: ignore[arg-type]

    def test_other_tickets_are_permission_denied(self) -> None:
        node = Node(self)
        request = tq_pb.TaskQueueBulkAddRequest()
        request.add_request.add().CopyFrom(add_request("t"))
        for ticket in (mint_ticket("other-secret", "myapp"), mint_ticket(SECRET, "stranger"),
                       "", "not a ticket"):
            with self.subTest(ticket=ticket):
                response = node.call("BulkAdd", request, ticket=ticket, app=None)
                self.assertEqual(app_error(response)[0], E.PERMISSION_DENIED)
        response = node.call("BulkAdd", request, app=None)  # no ticket at all
        self.assertEqual(app_error(response)[0], E.PERMISSION_DENIED)
        self.assertEqual(node.broker.published, [])

    def test_a_ticket_reaches_only_its_own_apps_queues(self) -> None:
        node = Node(self)
        # "mail" is myapp's queue; "other" has only its own default queue
        self.assertEqual(node.bulk_add(add_request("t", queue="mail"), app="other"),
                         [(E.UNKNOWN_QUEUE, None)])
        self.assertEqual(node.bulk_add(add_request("t", app_id=b"myapp"), app="other"),
                         [(E.PERMISSION_DENIED, None)])
        self.assertEqual(node.bulk_add(add_request("t"), app="other"), [(E.OK, None)])
        [(task, _)] = node.broker.published
        self.assertEqual((task.app, task.queue), ("other", "default"))
        self.assertAppError = SDKTestCase.assertAppError.__get__(self)  # type: ignore
        for method, request in (
            ("PurgeQueue", tq_pb.TaskQueuePurgeQueueRequest(queue_name=b"mail")),
            ("FetchQueueStats", tq_pb.TaskQueueFetchQueueStatsRequest(queue_name=[b"mail"])),
            ("Delete", tq_pb.TaskQueueDeleteRequest(queue_name=b"mail", task_name=[b"x"])),
        ):
            with self.subTest(method=method):
                self.assertAppError(node.call(method, request, app="other"), E.UNKNOWN_QUEUE)
        self.assertEqual(node.broker.purged, [])

    def test_partitioned_app_id_is_the_caller(self) -> None:
        node = Node(self)
        self.assertEqual(node.bulk_add(add_request("t", app_id=b"s~myapp")), [(E.OK, None)])

    def test_ticket_in_header(self) -> None:
        node = Node(self)
        request = tq_pb.TaskQueueBulkAddRequest()
        request.add_request.add().CopyFrom(add_request("h"))
        envelope = remote_pb.Request(service_name="taskqueue", method="BulkAdd",
                                     request=request.SerializeToString())
        response = node.post(envelope.SerializeToString(),
                             headers={"X-AppEngine-Api-Ticket": mint_ticket(SECRET, "myapp")})
        self.assertFalse(response.HasField("application_error"), response)
        self.assertIn("h", node.published())

    def test_legacy_form_with_trusted_appdata(self) -> None:
        node = Node(self, trust_appdata=True)
        request = tq_pb.TaskQueueBulkAddRequest()
        request.add_request.add().CopyFrom(add_request("legacy", body=b"p"))
        legacy = {"ProtocolBufferType": "Request", "AppData": "myapp", "Module": "default",
                  "Version": "v1"}
        response = node.call("BulkAdd", request, ticket="appscale-request-id", app=None,
                             url=BASE + "/", headers=legacy)
        self.assertFalse(response.HasField("application_error"), response)
        task, _ = node.published()["legacy"]
        self.assertEqual((task.app, task.payload), ("myapp", b"p"))
        # AppData naming an app this node does not serve
        response = node.call("BulkAdd", request, ticket="", app=None, url=BASE + "/",
                             headers={**legacy, "AppData": "stranger"})
        self.assertEqual(app_error(response)[0], E.PERMISSION_DENIED)
        # AppData counts on the legacy form only
        response = node.call("BulkAdd", request, ticket="", app=None,
                             headers={"AppData": "myapp"})
        self.assertEqual(app_error(response)[0], E.PERMISSION_DENIED)

    def test_untrusted_appdata(self) -> None:
        node = Node(self, trust_appdata=False)
        request = tq_pb.TaskQueueBulkAddRequest()
        request.add_request.add().CopyFrom(add_request("legacy"))
        response = node.call("BulkAdd", request, ticket="", app=None, url=BASE + "/",
                             headers={"ProtocolBufferType": "Request", "AppData": "myapp"})
        self.assertEqual(app_error(response)[0], E.PERMISSION_DENIED)
        self.assertEqual(node.broker.published, [])

    def test_per_app_endpoint(self) -> None:
        node = Node(self, app="other")
        self.assertEqual(node.bulk_add(add_request("p"), ticket=""), [(E.OK, None)])
        # the port tells the app, whatever the ticket says
        self.assertEqual(node.bulk_add(add_request("q"), app="myapp"), [(E.OK, None)])
        self.assertEqual({t.app for t, _ in node.broker.published}, {"other"})

    def test_single_app_without_secret(self) -> None:
        node = Node(self, secret=None, apps=("solo",))
        self.assertEqual(node.bulk_add(add_request("s"), ticket=""), [(E.OK, None)])
        two = Node(self, secret=None)
        response = two.call("BulkAdd", tq_pb.TaskQueueBulkAddRequest(), ticket="")
        self.assertEqual(app_error(response)[0], E.PERMISSION_DENIED)


class FuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = Node(self)

    def check(self, response: Any) -> None:
        filled = [f for f in ("response", "application_error", "rpc_error")
                  if response.HasField(f)]
        self.assertLessEqual(len(filled), 1, response)
        if response.HasField("application_error"):
            self.assertNotEqual(response.application_error.code, E.INTERNAL_ERROR, response)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bodies(self, body: bytes) -> None:
        self.check(self.node.post(body))

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["BulkAdd", "Add", "Delete", "PurgeQueue", "PauseQueue",
                            "FetchQueueStats", "FetchQueues", "UpdateQueue"]),
           st.binary(max_size=200))
    def test_random_requests(self, method: str, raw: bytes) -> None:
        envelope = remote_pb.Request(service_name="taskqueue", method=method, request=raw,
                                     request_id=mint_ticket(SECRET, "myapp"))
        self.check(self.node.post(envelope.SerializeToString()))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.builds(
        lambda name, queue, eta, url, method, body: raw_add(
            name, queue, eta=eta, url=url, method=method, body=body),
        st.sampled_from(["", "a", "b", "bad name", "x" * 501]),
        st.sampled_from(["default", "mail", "nope", "bad!"]),
        st.floats(min_value=0, max_value=T0 * 2),
        st.sampled_from(["/x", "", "http://h/", "/" + "a" * 3000]),
        st.integers(min_value=0, max_value=7),
        st.binary(max_size=20)), max_size=8))
    def test_random_batches(self, adds: list[Any]) -> None:
        results = self.node.bulk_add(*adds)
        self.assertEqual(len(results), len(adds))
        codes = [code for code, _ in results]
        if any(code not in (E.OK, E.SKIPPED, E.TASK_ALREADY_EXISTS, E.TOMBSTONED_TASK)
               for code in codes):
            # an invalid task: nothing of the batch was added
            self.assertNotIn(E.OK, codes)
        for add, (code, chosen) in zip(adds, results):
            self.assertEqual(chosen is not None, code == E.OK and not add.task_name)


def test_update_queue_rates_are_written_in_queue_yaml_grammar():
    from appscale_tq.queues import rate_per_second
    from appscale_tq.sdk import rate_text

    for per_second in (500.0, 5.0, 1.0, 0.5, 1 / 3600, 1 / 86400, 0.0):
        text = rate_text(per_second)
        assert "e" not in text, text
        assert abs(rate_per_second(text) - per_second) <= per_second * 1e-6, (per_second, text)
