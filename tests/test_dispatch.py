"""The dispatcher, through StubTreq over a small twisted.web resource (no network)."""

from __future__ import annotations

import email.utils
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appscale_tq.dispatch import (
    MAX_RETRY_AFTER,
    USER_IP,
    Dispatcher,
    Outcome,
    dispatch_headers,
    parse_retry_after,
)
from appscale_tq.tasks import Task

T0 = 1_700_000_000.0
LB = "http://lb.test:8080"


@attrs.frozen
class Seen:
    method: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


class App(Resource):
    """Answers every request with ``code``, ``headers`` and ``body``; records what it saw.

    ``hang``: never answer; ``partial``: send the headers and part of the body, never finish.
    """

    isLeaf = True

    def __init__(self, code: int = 200, headers: dict[bytes, bytes] | None = None,
                 body: bytes = b"ok", hang: bool = False, partial: bool = False) -> None:
        super().__init__()
        self.code = code
        self.headers = headers or {}
        self.body = body
        self.hang = hang
        self.partial = partial
        self.seen: list[Seen] = []
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.seen.append(
            Seen(
                request.method,
                request.uri,
                {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                request.content.read(),
            )
        )
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        for key, value in self.headers.items():
            request.setHeader(key, value)
        if self.partial:
            request.setHeader(b"content-length", b"1000")
            request.write(b"partial")
            self.pending.append(request)
            return NOT_DONE_YET
        return self.body


def make_task(**changes: Any) -> Task:
    base = Task(
        app="myapp",
        queue="mail",
        name="t1",
        url="/work?x=1&y=%20z",
        payload=bytes(range(256)) * 3,
        eta=T0 + 0.125,
        created=T0,
        tid="tid",
        deadline=30.0,
    )
    return attrs.evolve(base, **changes)


def appengine(seen: Seen) -> dict[bytes, bytes]:
    out = {}
    for key, values in seen.headers.items():
        if key.startswith(b"x-appengine-"):
            assert len(values) == 1, (key, values)
            out[key] = values[0]
    return out


class DispatchTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def dispatch(self, app: App, task: Task) -> Deferred[Outcome]:
        self.stub = StubTreq(app)
        dispatcher = Dispatcher(self.stub, self.clock, {"myapp": LB})
        return Deferred.fromCoroutine(dispatcher.dispatch(task))

    def roundtrip(self, app: App, task: Task) -> tuple[Outcome, Seen]:
        outcome = self.successResultOf(self.dispatch(app, task))
        [seen] = app.seen
        return outcome, seen


class RequestTests(DispatchTestCase):
    def test_request_as_enqueued(self) -> None:
        task = make_task(headers=(("X-Custom", "v1"), ("X-Multi", "a"), ("X-Multi", "b")))
        outcome, seen = self.roundtrip(App(), task)
        self.assertEqual(outcome, Outcome(200, "", None, True))
        self.assertTrue(outcome.ok)
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.uri, b"/work?x=1&y=%20z")
        self.assertEqual(seen.body, task.payload)  # byte-identical, binary
        self.assertEqual(seen.headers[b"x-custom"], [b"v1"])
        self.assertEqual(seen.headers[b"x-multi"], [b"a", b"b"])
        self.assertEqual(seen.headers[b"content-type"], [b"application/octet-stream"])
        self.assertEqual(seen.headers[b"content-length"], [str(len(task.payload)).encode()])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the deadline timer is gone

    def test_appengine_headers_on_a_first_attempt(self) -> None:
        _, seen = self.roundtrip(App(), make_task(previous_response=500, retry_reason="ignored"))
        self.assertEqual(
            appengine(seen),
            {
                b"x-appengine-queuename": b"mail",
                b"x-appengine-taskname": b"t1",
                b"x-appengine-taskretrycount": b"0",
                b"x-appengine-taskexecutioncount": b"0",
                b"x-appengine-tasketa": b"1700000000.125000",
                b"x-appengine-user-ip": USER_IP.encode(),
            },
        )

    def test_appengine_headers_on_a_retry(self) -> None:
        task = make_task(
            retry_count=3, execution_count=2, previous_response=503, retry_reason="HTTP 503"
        )
        _, seen = self.roundtrip(App(), task)
        self.assertEqual(
            appengine(seen),
            {
                b"x-appengine-queuename": b"mail",
                b"x-appengine-taskname": b"t1",
                b"x-appengine-taskretrycount": b"3",
                b"x-appengine-taskexecutioncount": b"2",
                b"x-appengine-tasketa": b"1700000000.125000",
                b"x-appengine-user-ip": b"0.1.0.2",
                b"x-appengine-taskpreviousresponse": b"503",
                b"x-appengine-taskretryreason": b"HTTP 503",
            },
        )

    def test_retry_without_an_http_answer(self) -> None:
        task = make_task(retry_count=1, retry_reason="no answer from the load balancer")
        _, seen = self.roundtrip(App(), task)
        headers = appengine(seen)
        self.assertNotIn(b"x-appengine-taskpreviousresponse", headers)
        self.assertEqual(
            headers[b"x-appengine-taskretryreason"], b"no answer from the load balancer"
        )

    def test_caller_cannot_spoof_appengine_headers(self) -> None:
        task = make_task(headers=(("X-AppEngine-TaskName", "spoof"), ("X-AppEngine-User-IP", "1")))
        _, seen = self.roundtrip(App(), task)
        self.assertEqual(seen.headers[b"x-appengine-taskname"], [b"t1"])
        self.assertEqual(seen.headers[b"x-appengine-user-ip"], [b"0.1.0.2"])

    def test_caller_content_type_is_kept(self) -> None:
        task = make_task(headers=(("Content-Type", "application/json; charset=utf-8"),),
                         payload=b'{"a": 1}')
        _, seen = self.roundtrip(App(), task)
        self.assertEqual(seen.headers[b"content-type"], [b"application/json; charset=utf-8"])
        self.assertEqual(seen.body, b'{"a": 1}')

    def test_non_ascii_header_value(self) -> None:
        task = make_task(headers=(("X-Name", "café"),))
        _, seen = self.roundtrip(App(), task)
        self.assertEqual(seen.headers[b"x-name"], ["café".encode()])

    def test_methods(self) -> None:
        for method in ("PUT", "DELETE", "GET", "HEAD"):
            with self.subTest(method=method):
                payload = b"body" if method == "PUT" else b""
                outcome, seen = self.roundtrip(App(), make_task(method=method, payload=payload))
                self.assertTrue(outcome.ok)
                self.assertEqual(seen.method, method.encode())
                self.assertEqual(seen.body, payload)
                if method == "PUT":
                    self.assertEqual(seen.headers[b"content-type"], [b"application/octet-stream"])
                else:
                    self.assertNotIn(b"content-type", seen.headers)

    def test_empty_post(self) -> None:
        outcome, seen = self.roundtrip(App(), make_task(payload=b""))
        self.assertTrue(outcome.ok)
        self.assertEqual(seen.body, b"")

    def test_url_per_app(self) -> None:
        client = RecordingClient()
        dispatcher = Dispatcher(client, self.clock, {"myapp": LB})
        dispatcher.set_lb_url("other", "http://other.test:81/")
        Deferred.fromCoroutine(dispatcher.dispatch(make_task(app="other", url="/a")))
        Deferred.fromCoroutine(dispatcher.dispatch(make_task(url="/b?c")))
        self.assertEqual(
            [call[1] for call in client.calls], ["http://other.test:81/a", LB + "/b?c"]
        )
        self.assertTrue(all(call[2]["allow_redirects"] is False for call in client.calls))
        self.assertTrue(all(call[2]["unbuffered"] is True for call in client.calls))


class AnswerTests(DispatchTestCase):
    def test_any_2xx_is_success(self) -> None:
        for code in (200, 201, 202, 204, 299):
            with self.subTest(code=code):
                outcome, _ = self.roundtrip(App(code), make_task())
                self.assertEqual(outcome, Outcome(code, "", None, True))

    def test_other_statuses_fail(self) -> None:
        for code in (100, 199, 301, 304, 400, 404, 500, 503):
            with self.subTest(code=code):
                app = App(code, body=b"" if code in (100, 199, 304) else b"no")
                if code in (100, 199):
                    continue  # informational codes never end an exchange
                outcome, _ = self.roundtrip(app, make_task())
                self.assertFalse(outcome.ok)
                self.assertEqual(outcome, Outcome(code, f"HTTP {code}", None, True))

    def test_redirect_is_a_failure_and_not_followed(self) -> None:
        app = App(302, {b"location": LB + "/elsewhere"})
        outcome, seen = self.roundtrip(app, make_task())
        self.assertEqual(outcome, Outcome(302, "HTTP 302", None, True))
        self.assertFalse(outcome.ok)
        self.assertEqual(len(app.seen), 1)  # nobody went to /elsewhere

    def test_retry_after_seconds(self) -> None:
        outcome, _ = self.roundtrip(App(503, {b"retry-after": b"120"}), make_task())
        self.assertEqual(outcome, Outcome(503, "HTTP 503", 120.0, True))

    def test_retry_after_date(self) -> None:
        when = email.utils.formatdate(T0 + 90, usegmt=True).encode()
        outcome, _ = self.roundtrip(App(429, {b"retry-after": when}), make_task())
        self.assertEqual(outcome.retry_after, 90.0)

    def test_retry_after_ignored_on_success(self) -> None:
        outcome, _ = self.roundtrip(App(200, {b"retry-after": b"10"}), make_task())
        self.assertIsNone(outcome.retry_after)

    def test_large_answer_body_is_read(self) -> None:
        outcome, _ = self.roundtrip(App(500, body=b"x" * 1_000_000), make_task())
        self.assertEqual(outcome.status, 500)


class RetryAfterTests(SynchronousTestCase):
    def test_forms(self) -> None:
        date = email.utils.formatdate(T0 + 30, usegmt=True).encode()
        cases: list[tuple[bytes | None, float | None]] = [
            (None, None),
            (b"", None),
            (b"0", 0.0),
            (b" 17 ", 17.0),
            (b"99999999", MAX_RETRY_AFTER),
            (b"9" * 400, MAX_RETRY_AFTER),
            (date, 30.0),
            (email.utils.formatdate(T0 - 30, usegmt=True).encode(), 0.0),
            (b"Tue, 14 Nov 2023 22:13:50 -0000", 30.0),  # "-0000": still GMT
            (b"-5", None),
            (b"1.5", None),
            (b"soon", None),
            (b"\xb2", None),  # '\xb2' (superscript two) passes str.isdigit()
            (b"\xff\xfe", None),
            (b"Tue, 99 Nov 2023 99:99:99 GMT", None),
            (b"0 0 0 0 0", None),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(parse_retry_after(value, T0), expected)


class DeadlineTests(DispatchTestCase):
    def test_no_answer_within_the_deadline(self) -> None:
        app = App(hang=True)
        task = make_task(deadline=20.0)
        d = self.dispatch(app, task)
        self.assertNoResult(d)
        self.clock.advance(19.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.status, None)
        self.assertTrue(outcome.reached_app)
        self.assertIn("deadline", outcome.reason)
        self.assertFalse(outcome.ok)
        # the late answer changes nothing
        request = app.pending[0]
        if not request._disconnected:
            request.setResponseCode(200)
            request.finish()
        self.stub.flush()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_body_cut_at_the_deadline(self) -> None:
        app = App(500, partial=True)
        d = self.dispatch(app, make_task(deadline=15.0))
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(15.0)
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.status, outcome.reached_app), (None, True))
        self.assertIn("deadline", outcome.reason)

    def test_deadline_cancels_the_request(self) -> None:
        client = RecordingClient()
        dispatcher = Dispatcher(client, self.clock, {"myapp": LB})
        d = Deferred.fromCoroutine(dispatcher.dispatch(make_task(deadline=600.0)))
        self.clock.advance(599)
        self.assertEqual(client.cancelled, 0)
        self.clock.advance(1)
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(
            self.successResultOf(d),
            Outcome(None, "no answer within the 600 s deadline", None, True),
        )

    def test_answer_in_time_cancels_the_timer(self) -> None:
        client = RecordingClient()
        dispatcher = Dispatcher(client, self.clock, {"myapp": LB})
        d = Deferred.fromCoroutine(dispatcher.dispatch(make_task()))
        client.pending[0].errback(ConnectionRefusedError())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.status, None)
        self.assertFalse(outcome.reached_app)

    def test_connection_refused(self) -> None:
        class Refusing:
            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        dispatcher = Dispatcher(Refusing(), self.clock, {"myapp": LB})
        outcome = self.successResultOf(Deferred.fromCoroutine(dispatcher.dispatch(make_task())))
        self.assertEqual(
            outcome,
            Outcome(None, "no answer from the load balancer: ConnectionRefusedError", None, False),
        )


class RecordingClient:
    """A treq-like client whose requests never answer unless the test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.pending: list[Deferred[Any]] = []
        self.cancelled = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url, kwargs))

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.pending.append(d)
        return d


class HeadersTests(SynchronousTestCase):
    def test_dispatch_headers_is_pure(self) -> None:
        headers = dispatch_headers(make_task(headers=(("A", "1"),)))
        self.assertEqual(headers.getRawHeaders(b"a"), [b"1"])
        self.assertEqual(headers.getRawHeaders(b"x-appengine-queuename"), [b"mail"])
