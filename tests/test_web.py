"""The JSON API through StubTreq over build_root, with the memory store and the fake broker."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appscale_tq.api import TaskQueue
from appscale_tq.config import AppConfig, NodeConfig
from appscale_tq.errors import Unavailable
from appscale_tq.tasks import REQUEST_KEYS, rfc3339
from appscale_tq.testing import FakeBroker, MemoryStore
from appscale_tq.web import build_root

T0 = 1_700_000_000.0
BASE = "http://tq.test"
TASKS = BASE + "/v1/apps/myapp/queues/default/tasks"
BATCH = BASE + "/v1/apps/myapp/queues/default/tasks:batch"
TOMBSTONE = 3600.0


class Node:
    """One API over a clock, a memory store and a fake broker."""

    def __init__(self, test: SynchronousTestCase, secret: str | None = None) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock, tombstone_seconds=TOMBSTONE)
        self.broker = FakeBroker()
        config = NodeConfig(apps={"myapp": AppConfig(), "other": AppConfig()}, secret=secret)
        tokens = itertools.count()
        self.tq = TaskQueue(
            self.clock, config, self.store, self.broker, token=lambda: f"tok{next(tokens)}"
        )
        self.client = StubTreq(build_root(self.tq, self.health, secret))

    async def health(self) -> dict[str, str]:
        checks = {"rabbitmq": "ok" if self.broker.connected else "not connected"}
        try:
            await self.store.ping()
            checks["redis"] = "ok"
        except Unavailable as e:
            checks["redis"] = e.why
        return checks

    def call(
        self, method: str, url: str, body: Any = None, raw: bytes | None = None, **kw: Any
    ) -> tuple[int, Any, Any]:
        """(status, decoded JSON body or None, response)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = self.test.successResultOf(self.client.request(method, url, data=data, **kw))
        content = self.test.successResultOf(response.content())
        decoded = json.loads(content) if content else None
        return response.code, decoded, response

    def add(self, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, decoded, _ = self.call("POST", TASKS, {} if body is None else body, **kw)
        return status, decoded


class WebTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = Node(self)

    def assertError(self, result: tuple[int, Any], status: int, code: str) -> None:
        got_status, body = result[0], result[1]
        self.assertEqual((got_status, _code(body)), (status, code), body)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), {"code", "message"})
        self.assertIsInstance(body["error"]["message"], str)
        self.assertTrue(body["error"]["message"])


def _code(body: Any) -> str | None:
    try:
        return body["error"]["code"]
    except (TypeError, KeyError):
        return None


class AddTests(WebTestCase):
    def test_created(self) -> None:
        status, decoded, response = self.node.call(
            "POST", TASKS, {"name": "t1", "payload": "hello"}
        )
        self.assertEqual(status, 201)
        self.assertEqual(decoded, {"name": "t1", "queue": "default", "eta": rfc3339(T0)})
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        [(task, delay)] = self.node.broker.published
        self.assertEqual((task.name, task.payload, delay), ("t1", b"hello", 0.0))
        # confirmed: the record is kept, not left to expire
        self.assertEqual(self.node.store.fields("myapp", "default", "t1")["state"], "queued")
        self.assertIsNone(self.node.store.expires("myapp", "default", "t1"))

    def test_generated_name_and_countdown(self) -> None:
        status, body = self.node.add({"countdown": 90})
        self.assertEqual(status, 201)
        self.assertTrue(body["name"].startswith("task-"), body)
        self.assertEqual(body["eta"], rfc3339(T0 + 90))
        [(task, delay)] = self.node.broker.published
        self.assertEqual(delay, 90.0)

    def test_two_unnamed_tasks_get_two_names(self) -> None:
        first = self.node.add()[1]["name"]
        second = self.node.add()[1]["name"]
        self.assertNotEqual(first, second)

    def test_named_twice(self) -> None:
        self.assertEqual(self.node.add({"name": "once"})[0], 201)
        self.assertError(self.node.add({"name": "once"}), 409, "TASK_ALREADY_EXISTS")
        self.assertEqual(len(self.node.broker.published), 1)

    def test_same_name_in_another_app_is_independent(self) -> None:
        self.assertEqual(self.node.add({"name": "n"})[0], 201)
        other = BASE + "/v1/apps/other/queues/default/tasks"
        self.assertEqual(self.node.call("POST", other, {"name": "n"})[0], 201)


class ValidationTests(WebTestCase):
    CASES: list[tuple[Any, int, str]] = [
        ({"name": "bad name"}, 400, "INVALID_TASK_NAME"),
        ({"name": "x" * 501}, 400, "INVALID_TASK_NAME"),
        ({"name": 7}, 400, "INVALID_TASK_NAME"),
        ({"url": "http://elsewhere/"}, 400, "INVALID_URL"),
        ({"url": "//host/x"}, 400, "INVALID_URL"),
        ({"url": "/" + "a" * 2083}, 400, "INVALID_URL"),
        ({"url": 5}, 400, "INVALID_URL"),
        ({"eta": "yesterday"}, 400, "INVALID_ETA"),
        ({"eta": True}, 400, "INVALID_ETA"),
        ({"eta": [1]}, 400, "INVALID_ETA"),
        ({"countdown": 31 * 86400}, 400, "INVALID_ETA"),
        ({"countdown": "10"}, 400, "INVALID_ETA"),
        ({"countdown": 10, "eta": T0}, 400, "INVALID_REQUEST"),
        ({"payload": "x" * 102401}, 413, "TASK_TOO_LARGE"),
        ({"payload": 5}, 400, "INVALID_REQUEST"),
        ({"payload": "a", "payload_base64": "YQ=="}, 400, "INVALID_REQUEST"),
        ({"payload_base64": "!!!"}, 400, "INVALID_REQUEST"),
        ({"method": "PATCH"}, 400, "INVALID_REQUEST"),
        ({"method": 3}, 400, "INVALID_REQUEST"),
        ({"method": "GET", "payload": "x"}, 400, "INVALID_REQUEST"),
        ({"headers": "x"}, 400, "INVALID_REQUEST"),
        ({"headers": {"bad header": "v"}}, 400, "INVALID_REQUEST"),
        ({"headers": {"X-A": "a\r\nb"}}, 400, "INVALID_REQUEST"),
        ({"headers": [["X-A"]]}, 400, "INVALID_REQUEST"),
        ({"retry_options": {"task_retry_limit": -1}}, 400, "INVALID_REQUEST"),
        ({"retry_options": {"nope": 1}}, 400, "INVALID_REQUEST"),
        ({"retry_options": []}, 400, "INVALID_REQUEST"),
        ({"dispatch_deadline": 5}, 400, "INVALID_REQUEST"),
        ({"dispatch_deadline": "600"}, 400, "INVALID_REQUEST"),
        ({"unknown_field": 1}, 400, "INVALID_REQUEST"),
    ]

    def test_each_error_is_json_with_its_status(self) -> None:
        for body, status, code in self.CASES:
            with self.subTest(body=str(body)[:80]):
                self.assertError(self.node.add(body), status, code)
        self.assertEqual(self.node.broker.published, [])

    RAW: list[tuple[bytes, str]] = [
        (b"", "INVALID_REQUEST"),
        (b"{", "INVALID_REQUEST"),
        (b"[]", "INVALID_REQUEST"),
        (b'"a string"', "INVALID_REQUEST"),
        (b"null", "INVALID_REQUEST"),
        (b"42", "INVALID_REQUEST"),
        (b"\xff\xfe{}", "INVALID_REQUEST"),
        (b'{"payload": "\xc3("}', "INVALID_REQUEST"),
        (b"NaN", "INVALID_REQUEST"),
        (b'{"countdown": NaN}', "INVALID_REQUEST"),
        (b'{"countdown": Infinity}', "INVALID_REQUEST"),
        (b'{"countdown": -Infinity}', "INVALID_REQUEST"),
        (b'{"countdown": 1e999}', "INVALID_ETA"),
        (b'{"eta": 1e999}', "INVALID_ETA"),
        (b'{"countdown": ' + b"9" * 400 + b"}", "INVALID_ETA"),
        (b'{"countdown": ' + b"9" * 5000 + b"}", "INVALID_REQUEST"),
        (b'{"dispatch_deadline": ' + b"9" * 400 + b"}", "INVALID_REQUEST"),
        (b'{"retry_options": {"task_age_limit": 1e999}}', "INVALID_REQUEST"),
        (b'{"retry_options": {"task_retry_limit": ' + b"9" * 400 + b"}}", "INVALID_REQUEST"),
        (b"[" * 100_000 + b"]" * 100_000, "INVALID_REQUEST"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "INVALID_REQUEST"),
        (b'{"payload": "\\ud800"} trailing', "INVALID_REQUEST"),
    ]

    def test_malformed_bodies_are_400(self) -> None:
        for raw, code in self.RAW:
            with self.subTest(raw=raw[:60]):
                status, body, _ = self.node.call("POST", TASKS, raw=raw)
                self.assertError((status, body), 400, code)

    def test_lone_surrogate_payload_is_refused_naming_the_field(self) -> None:
        status, body, _ = self.node.call("POST", TASKS, raw=b'{"payload": "\\ud800"}')
        self.assertError((status, body), 400, "INVALID_REQUEST")
        self.assertIn("payload", body["error"]["message"])

    def test_unknown_app_or_queue(self) -> None:
        for url in (
            BASE + "/v1/apps/nobody/queues/default/tasks",
            BASE + "/v1/apps/myapp/queues/missing/tasks",
            BASE + "/v1/apps/nobody/queues/default/tasks/x",
        ):
            with self.subTest(url=url):
                method = "GET" if url.endswith("/x") else "POST"
                status, body, _ = self.node.call(method, url, {})
                self.assertError((status, body), 404, "UNKNOWN_QUEUE")

    def test_invalid_queue_name(self) -> None:
        status, body, _ = self.node.call(
            "POST", BASE + "/v1/apps/myapp/queues/bad_queue/tasks", {}
        )
        self.assertError((status, body), 400, "INVALID_QUEUE_NAME")


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=-(10**600), max_value=10**600)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=40)
        | st.sampled_from(["/", "/x?y=1", "2024-01-01T00:00:00Z", "GET", "POST", "YQ==", ""])
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(sorted(REQUEST_KEYS)) | st.text(max_size=8), inner,
                          max_size=4),
        max_leaves=12,
    )


_TASK_BODIES = st.fixed_dictionaries(
    {}, optional={key: _json_values() for key in sorted(REQUEST_KEYS)}
)


class FuzzTests(SynchronousTestCase):
    """Whatever a client sends, the answer is never a 500."""

    def _check(self, status: int, body: Any) -> None:
        self.assertNotEqual(status, 500, body)
        self.assertIn(status, (200, 201, 400, 404, 409, 413), body)
        if status >= 400:
            self.assertIsNotNone(_code(body), body)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300))
    def test_random_bytes(self, raw: bytes) -> None:
        node = Node(self)
        for url in (TASKS, BATCH):
            status, body, _ = node.call("POST", url, raw=raw)
            self._check(status, body)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_json_values() | _TASK_BODIES)
    def test_random_json(self, value: Any) -> None:
        node = Node(self)
        raw = json.dumps(value).encode()  # NaN / Infinity come out as bare words
        status, body, _ = node.call("POST", TASKS, raw=raw)
        self._check(status, body)
        status, body, _ = node.call("POST", BATCH, {"tasks": [value, value]})
        self._check(status, body)

    @settings(max_examples=100, deadline=None)
    @given(st.text(max_size=30))
    def test_random_task_names_in_paths(self, name: str) -> None:
        node = Node(self)
        url = TASKS + "/" + json.dumps(name)[1:-1].replace("/", "%2F").replace("?", "%3F")
        for method in ("GET", "DELETE"):
            status, body, _ = node.call(method, url.replace("#", "%23"))
            self.assertNotEqual(status, 500, body)


class BatchTests(WebTestCase):
    def test_results_in_order(self) -> None:
        tasks = [
            {"name": "a", "payload": "1"},
            {"name": "bad name"},
            {"name": "a"},
            {"countdown": 5},
            {"payload": "x" * 102401},
        ]
        status, body, _ = self.node.call("POST", BATCH, {"tasks": tasks})
        self.assertEqual(status, 200)
        results = body["results"]
        self.assertEqual(len(results), 5)
        self.assertEqual(results[0], {"name": "a", "queue": "default", "eta": rfc3339(T0)})
        self.assertEqual(_code(results[1]), "INVALID_TASK_NAME")
        self.assertEqual(_code(results[2]), "DUPLICATE_TASK_NAME")
        self.assertTrue(results[3]["name"].startswith("task-"))
        self.assertEqual(results[3]["eta"], rfc3339(T0 + 5))
        self.assertEqual(_code(results[4]), "TASK_TOO_LARGE")
        self.assertEqual(
            sorted(t.name for t, _ in self.node.broker.published),
            sorted(["a", results[3]["name"]]),
        )

    def test_hundred_is_fine_hundred_and_one_is_not(self) -> None:
        status, body, _ = self.node.call("POST", BATCH, {"tasks": [{}] * 100})
        self.assertEqual(status, 200)
        self.assertEqual(len(body["results"]), 100)
        self.assertTrue(all("name" in r for r in body["results"]))
        self.assertEqual(len(self.node.broker.published), 100)
        status, body, _ = self.node.call("POST", BATCH, {"tasks": [{}] * 101})
        self.assertError((status, body), 400, "TOO_MANY_TASKS")
        self.assertEqual(len(self.node.broker.published), 100)

    def test_existing_name_fails_alone(self) -> None:
        self.node.add({"name": "taken"})
        status, body, _ = self.node.call(
            "POST", BATCH, {"tasks": [{"name": "taken"}, {"name": "free"}]}
        )
        self.assertEqual(status, 200)
        self.assertEqual(_code(body["results"][0]), "TASK_ALREADY_EXISTS")
        self.assertEqual(body["results"][1]["name"], "free")

    def test_store_down_is_per_task_transient(self) -> None:
        self.node.store.down = True
        status, body, _ = self.node.call("POST", BATCH, {"tasks": [{}, {"name": "x"}]})
        self.assertEqual(status, 200)
        self.assertEqual([_code(r) for r in body["results"]], ["TRANSIENT_ERROR"] * 2)

    def test_bad_envelopes(self) -> None:
        for envelope in ([], {"tasks": {}}, {"tasks": [], "more": 1}, {}, "x"):
            with self.subTest(envelope=envelope):
                status, body, _ = self.node.call("POST", BATCH, envelope)
                self.assertError((status, body), 400, "INVALID_REQUEST")

    def test_unknown_queue(self) -> None:
        url = BASE + "/v1/apps/myapp/queues/nope/tasks:batch"
        status, body, _ = self.node.call("POST", url, {"tasks": []})
        self.assertError((status, body), 404, "UNKNOWN_QUEUE")


class StateTests(WebTestCase):
    def test_get(self) -> None:
        self.node.add({"name": "t", "countdown": 60})
        status, body, _ = self.node.call("GET", TASKS + "/t")
        self.assertEqual(status, 200)
        self.assertEqual(
            body,
            {
                "name": "t",
                "queue": "default",
                "state": "queued",
                "retry_count": 0,
                "execution_count": 0,
                "eta": rfc3339(T0 + 60),
                "last_response": None,
                "last_error": None,
            },
        )

    def test_get_missing(self) -> None:
        status, body, _ = self.node.call("GET", TASKS + "/nothing")
        self.assertError((status, body), 404, "UNKNOWN_TASK")

    def test_delete_then_tombstoned(self) -> None:
        self.node.add({"name": "t"})
        status, body, response = self.node.call("DELETE", TASKS + "/t")
        self.assertEqual((status, body), (204, None))
        self.assertEqual(self.node.call("GET", TASKS + "/t")[1]["state"], "deleted")
        self.assertError(self.node.add({"name": "t"}), 409, "TOMBSTONED_TASK")
        status, body, _ = self.node.call("DELETE", TASKS + "/t")
        self.assertError((status, body), 409, "TOMBSTONED_TASK")
        # the tombstone lasts its lifetime, then the name is free again
        self.node.clock.advance(TOMBSTONE - 1)
        self.assertError(self.node.add({"name": "t"}), 409, "TOMBSTONED_TASK")
        self.node.clock.advance(1)
        self.assertEqual(self.node.add({"name": "t"})[0], 201)

    def test_delete_missing(self) -> None:
        status, body, _ = self.node.call("DELETE", TASKS + "/ghost")
        self.assertError((status, body), 404, "UNKNOWN_TASK")

    def test_names_in_paths_are_validated(self) -> None:
        # an app id may hold ':', so a name with ':' could reach another app's key
        for method in ("GET", "DELETE"):
            for name in ("default%3Ax", "a%2Fb", "x" * 501):
                with self.subTest(method=method, name=name):
                    status, body, _ = self.node.call(method, TASKS + "/" + name)
                    self.assertError((status, body), 400, "INVALID_TASK_NAME")

    def test_store_down(self) -> None:
        self.node.add({"name": "t"})
        self.node.store.down = True
        self.assertError(self.node.add({"name": "u"}), 503, "TRANSIENT_ERROR")
        for method in ("GET", "DELETE"):
            status, body, _ = self.node.call(method, TASKS + "/t")
            self.assertError((status, body), 503, "TRANSIENT_ERROR")
        self.node.store.down = False
        self.assertEqual(self.node.add({"name": "u"})[0], 201)

    def test_broker_down_releases_the_name(self) -> None:
        self.node.broker.down = True
        self.assertError(self.node.add({"name": "t"}), 503, "TRANSIENT_ERROR")
        self.assertIsNone(self.node.store.fields("myapp", "default", "t"))
        status, body, _ = self.node.call("GET", TASKS + "/t")
        self.assertError((status, body), 404, "UNKNOWN_TASK")
        self.node.broker.down = False
        self.assertEqual(self.node.add({"name": "t"})[0], 201)
        self.assertEqual([t.name for t, _ in self.node.broker.published], ["t"])


class SecretTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = Node(self, secret="s3cret")

    def test_missing_or_wrong_secret(self) -> None:
        for headers in (
            None,
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ):
            with self.subTest(headers=headers):
                status, body = self.node.add({"name": "t"}, headers=headers)
                self.assertEqual((status, _code(body)), (403, "PERMISSION_DENIED"))
        self.assertEqual(self.node.broker.published, [])
        status, body, _ = self.node.call("GET", TASKS + "/t")
        self.assertEqual((status, _code(body)), (403, "PERMISSION_DENIED"))
        # refused before anything else, so an unknown app says nothing either
        status, body, _ = self.node.call("POST", BASE + "/v1/apps/nobody/queues/default/tasks")
        self.assertEqual((status, _code(body)), (403, "PERMISSION_DENIED"))

    def test_right_secret(self) -> None:
        auth = {"Authorization": "Bearer s3cret"}
        self.assertEqual(self.node.add({"name": "t"}, headers=auth)[0], 201)
        status, body, _ = self.node.call("GET", TASKS + "/t", headers=auth)
        self.assertEqual((status, body["state"]), (200, "queued"))

    def test_health_needs_no_secret(self) -> None:
        self.assertEqual(self.node.call("GET", BASE + "/healthz")[0], 200)


class OperationsTests(WebTestCase):
    def test_healthz(self) -> None:
        status, body, _ = self.node.call("GET", BASE + "/healthz")
        self.assertEqual((status, body), (200, {"rabbitmq": "ok", "redis": "ok"}))
        self.node.store.down = True
        status, body, _ = self.node.call("GET", BASE + "/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(body["rabbitmq"], "ok")
        self.assertNotEqual(body["redis"], "ok")
        self.node.store.down = False
        self.node.broker.down = True
        status, body, _ = self.node.call("GET", BASE + "/healthz")
        self.assertEqual((status, body["rabbitmq"], body["redis"]), (503, "not connected", "ok"))

    def test_wrong_method(self) -> None:
        for method, url in (
            ("GET", TASKS),
            ("PUT", TASKS),
            ("GET", BATCH),
            ("POST", TASKS + "/t"),
            ("PUT", TASKS + "/t"),
            ("POST", BASE + "/healthz"),
            ("HEAD", TASKS),
        ):
            with self.subTest(method=method, url=url):
                status, body, _ = self.node.call(method, url)
                self.assertEqual(status, 405)
                if method != "HEAD":
                    self.assertEqual(_code(body), "INVALID_REQUEST")

    def test_unknown_paths(self) -> None:
        for path in (
            "/",
            "/nope",
            "/v1",
            "/v1/apps/myapp",
            "/v1/apps/myapp/queues/default/other",
            "/v1/apps/myapp/queues/default/tasks/a/b",
            "/v1/apps/myapp/stacks/default/tasks",
            "/v2/apps/myapp/queues/default/tasks",
        ):
            with self.subTest(path=path):
                status, body, _ = self.node.call("POST", BASE + path, {})
                self.assertEqual(status, 404)
                self.assertEqual(set(body["error"]), {"code", "message"})

    def test_trailing_slash_is_the_same_endpoint(self) -> None:
        self.assertEqual(self.node.call("POST", TASKS + "/", {})[0], 201)


class LimitsAndMethodsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = Node(self)

    def test_a_body_over_the_limit_is_refused_before_it_is_read(self) -> None:
        from appscale_tq.web import MAX_BODY

        status, body, _ = self.node.call(
            "POST", TASKS, raw=b"{" + b" " * MAX_BODY + b"}")
        self.assertEqual(status, 413)
        self.assertEqual(body["error"]["code"], "TASK_TOO_LARGE")

    def test_a_queue_yaml_over_the_limit_is_refused(self) -> None:
        from appscale_tq.web import MAX_QUEUE_YAML

        status, body, _ = self.node.call(
            "PUT", BASE + "/v1/apps/myapp/queue.yaml", raw=b"#" * (MAX_QUEUE_YAML + 1))
        self.assertEqual(status, 413)
        self.assertIn("body", body["error"]["message"])

    def test_a_wrong_method_names_the_allowed_ones(self) -> None:
        status, body, response = self.node.call("DELETE", TASKS)
        self.assertEqual(status, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertEqual(body["error"]["code"], "INVALID_REQUEST")

    def test_eta_must_be_rfc3339_not_any_iso_form(self) -> None:
        for eta in ("2026-12-03", "2026-W49-4", "20261203T190000Z"):
            with self.subTest(eta=eta):
                status, body = self.node.add({"eta": eta})
                self.assertEqual((status, body["error"]["code"]), (400, "INVALID_ETA"))
