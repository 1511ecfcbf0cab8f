"""Unit tests for appscale_tq.sampleapp, driven through treq's StubTreq."""

from __future__ import annotations

import base64
import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from appscale_tq.sampleapp import SampleApp

BASE = "http://app.example"


class SampleAppTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.app = SampleApp("a", self.clock)
        self.treq = StubTreq(self.app)

    # -- helpers ----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        retry: int | None = None,
        **kwargs: Any,
    ) -> tuple[int, dict[str, list[str]], bytes]:
        headers = dict(kwargs.pop("headers", {}) or {})
        if retry is not None:
            headers["X-AppEngine-TaskRetryCount"] = str(retry)
        d = self.treq.request(method, BASE + path, headers=headers, **kwargs)
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, self._headers(response), body

    @staticmethod
    def _headers(response: Any) -> dict[str, list[str]]:
        return {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in vals]
            for name, vals in response.headers.getAllRawHeaders()
        }

    def get_json(self, path: str) -> Any:
        code, _, body = self.request("GET", path)
        self.assertEqual(code, 200)
        return json.loads(body)

    # -- recording --------------------------------------------------------

    def test_default_answer(self) -> None:
        code, headers, body = self.request("GET", "/")
        self.assertEqual((code, body), (200, b"ok"))
        self.assertNotIn("location", headers)

    def test_records_request(self) -> None:
        code, _, _ = self.request(
            "POST",
            "/tasks/work?x=1&y=%20z",
            data=b"\x00payload\xff",
            headers={
                "X-AppEngine-TaskName": "task-1",
                "X-Custom": "v",
                "Content-Type": "application/octet-stream",
            },
        )
        self.assertEqual(code, 200)
        self.assertEqual(len(self.app.received), 1)
        record = self.app.received[0]
        self.assertEqual(record["instance"], "a")
        self.assertEqual(record["time"], 1000)
        self.assertEqual(record["method"], "POST")
        self.assertEqual(record["path"], "/tasks/work")
        self.assertEqual(record["uri"], "/tasks/work?x=1&y=%20z")
        self.assertEqual(record["query"], "x=1&y=%20z")
        self.assertEqual(record["headers"]["x-appengine-taskname"], "task-1")
        self.assertEqual(record["headers"]["x-custom"], "v")
        self.assertEqual(
            base64.b64decode(record["body_b64"]), b"\x00payload\xff"
        )
        self.assertEqual(self.app.by_task, {"task-1": 1})

    def test_repeated_header_keeps_last(self) -> None:
        self.request("GET", "/", headers={"X-Multi": ["one", "two"]})
        self.assertEqual(self.app.received[0]["headers"]["x-multi"], "two")

    def test_by_task_counts(self) -> None:
        for name in ["t1", "t2", "t1"]:
            self.request("POST", "/", headers={"X-AppEngine-TaskName": name})
        self.request("POST", "/")
        self.assertEqual(self.app.by_task, {"t1": 2, "t2": 1})
        self.assertEqual(len(self.app.received), 4)

    def test_on_receive(self) -> None:
        seen: list[dict[str, Any]] = []
        unregister = self.app.on_receive(seen.append)
        self.request("GET", "/one")
        self.assertEqual([r["path"] for r in seen], ["/one"])
        unregister()
        self.request("GET", "/two")
        self.assertEqual(len(seen), 1)

    def test_control_requests_not_recorded(self) -> None:
        self.request("GET", "/_sample/count")
        self.request("GET", "/_sample/received")
        self.assertEqual(self.app.received, [])

    # -- behaviour --------------------------------------------------------

    def test_fail_uses_retry_count(self) -> None:
        self.assertEqual(self.request("GET", "/?fail=2")[0], 500)
        self.assertEqual(self.request("GET", "/?fail=2", retry=0)[0], 500)
        self.assertEqual(self.request("GET", "/?fail=2", retry=1)[0], 500)
        code, _, body = self.request("GET", "/?fail=2", retry=2)
        self.assertEqual((code, body), (200, b"ok"))
        self.assertEqual(self.request("GET", "/?fail=2", retry=5)[0], 200)
        self.assertEqual(self.request("GET", "/?fail=0")[0], 200)

    def test_fail_with_status(self) -> None:
        code, headers, _ = self.request(
            "GET", "/?fail=1&status=503&retry_after=7"
        )
        self.assertEqual(code, 503)
        self.assertEqual(headers["retry-after"], ["7"])
        code, headers, _ = self.request(
            "GET", "/?fail=1&status=503&retry_after=7", retry=1
        )
        self.assertEqual(code, 200)
        self.assertNotIn("retry-after", headers)

    def test_status_always_without_fail(self) -> None:
        for retry in (0, 3, 100):
            self.assertEqual(
                self.request("GET", "/?status=404", retry=retry)[0], 404
            )

    def test_status_with_location(self) -> None:
        code, headers, _ = self.request(
            "GET",
            "/?status=302&location=http://elsewhere.example/x",
            allow_redirects=False,
        )
        self.assertEqual(code, 302)
        self.assertEqual(headers["location"], ["http://elsewhere.example/x"])

    def test_retry_after(self) -> None:
        code, headers, _ = self.request("GET", "/?status=429&retry_after=30")
        self.assertEqual(code, 429)
        self.assertEqual(headers["retry-after"], ["30"])

    def test_no_body_status(self) -> None:
        code, _, body = self.request("GET", "/?status=204")
        self.assertEqual((code, body), (204, b""))

    def test_bad_parameter(self) -> None:
        code, _, body = self.request("GET", "/?fail=abc")
        self.assertEqual(code, 400)
        self.assertIn(b"fail", body)
        self.assertEqual(len(self.app.received), 1)

    def test_sleep(self) -> None:
        d = self.treq.get(BASE + "/?sleep=2.5")
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(2)
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"ok")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sleep_with_fail(self) -> None:
        d = self.treq.get(BASE + "/?sleep=1&fail=1&status=503")
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 503)

    def test_sleep_first(self) -> None:
        d = self.treq.get(
            BASE + "/?sleep=5&sleep_first=1",
            headers={"X-AppEngine-TaskRetryCount": "0"},
        )
        self.treq.flush()
        self.assertNoResult(d)
        # A retry is answered at once.
        code, _, _ = self.request("GET", "/?sleep=5&sleep_first=1", retry=1)
        self.assertEqual(code, 200)
        self.clock.advance(5)
        self.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_sleep_cancelled_on_disconnect(self) -> None:
        d = self.treq.get(BASE + "/?sleep=10")
        self.treq.flush()
        self.assertNoResult(d)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.treq.flush()
        self.failureResultOf(d, CancelledError, ResponseNeverReceived)
        # The timer was cancelled: nothing will write to the closed request.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.treq.flush()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_trickle(self) -> None:
        d = self.treq.get(BASE + "/?trickle=3")
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body = response.content()
        self.assertNoResult(body)
        for _ in range(3):
            self.clock.advance(1)
            self.treq.flush()
        self.assertEqual(self.successResultOf(body), b"...")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickle_stops_on_disconnect(self) -> None:
        d = self.treq.get(BASE + "/?trickle=100")
        self.treq.flush()
        response = self.successResultOf(d)
        self.clock.advance(1)
        self.treq.flush()
        self.assertEqual(response.code, 200)
        # Abort the client side of the connection.
        for pump in list(self.treq._agent._pumps):
            pump.clientIO.abortConnection()
        self.treq.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.treq.flush()
        self.assertEqual(self.flushLoggedErrors(), [])

    # -- control endpoints --------------------------------------------------

    def test_control_count_received_reset(self) -> None:
        self.assertEqual(self.get_json("/_sample/count"), {"count": 0})
        self.request("GET", "/first")
        self.request("POST", "/second?fail=1")
        self.request("PUT", "/third", headers={"X-AppEngine-TaskName": "t"})
        self.assertEqual(self.get_json("/_sample/count"), {"count": 3})

        received = self.get_json("/_sample/received")
        self.assertEqual(
            [r["path"] for r in received], ["/first", "/second", "/third"]
        )
        self.assertEqual(received[1]["query"], "fail=1")
        since = self.get_json("/_sample/received?since=2")
        self.assertEqual([r["path"] for r in since], ["/third"])
        self.assertEqual(self.get_json("/_sample/received?since=9"), [])
        self.assertEqual(self.get_json("/_sample/by_task"), {"t": 1})

        code, _, _ = self.request("GET", "/_sample/reset")
        self.assertEqual(code, 405)
        code, _, _ = self.request("POST", "/_sample/reset")
        self.assertEqual(code, 200)
        self.assertEqual(self.get_json("/_sample/count"), {"count": 0})
        self.assertEqual(self.get_json("/_sample/received"), [])
        self.assertEqual(self.app.by_task, {})

    def test_unknown_control_endpoint(self) -> None:
        self.assertEqual(self.request("GET", "/_sample/nope")[0], 404)
