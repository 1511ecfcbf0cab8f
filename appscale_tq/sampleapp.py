"""A tiny twisted.web application server used by tests, demos and benchmarks.

Every request outside ``/_sample/`` is recorded and answered according to
its query string, so several instances behind a load balancer behave the
same way (the behaviour is stateless).  Supported query parameters (all
optional):

``fail=N``
    Answer ``status`` (default 500) while the request's
    ``X-AppEngine-TaskRetryCount`` header (default 0) is lower than ``N``,
    then 200.
``status=CODE``
    The status to answer: always when ``fail`` is absent, or for failing
    attempts when ``fail`` is present.
``location=URL``
    Add a ``Location`` header to a ``status`` answer (e.g. for 302 tests).
``retry_after=S``
    Add a ``Retry-After: S`` header to a ``status`` answer.
``sleep=S``
    Answer after ``S`` seconds (float).  Cancelled cleanly if the client
    disconnects first.
``sleep_first=N``
    Apply ``sleep`` only while the retry count is lower than ``N``.
``trickle=S``
    Send the status and headers at once, then one byte every second for
    ``S`` seconds, then finish (stops if the client disconnects).

Without parameters the answer is ``200`` with the body ``ok``.

Control endpoints:

``GET /_sample/received[?since=K]``
    JSON list of the records (from index ``K``).
``GET /_sample/count``
    ``{"count": n}``.
``GET /_sample/by_task``
    JSON object mapping task names to the number of requests received.
``POST /_sample/reset``
    Clear the records and counters.

Run it with::

    python -m appscale_tq.sampleapp --port 8081 --name app1 \
        [--interface 127.0.0.1] [--quiet]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

__all__ = ["SampleApp", "main", "Record"]

Record = dict[str, Any]
ReceiveCallback = Callable[[Record], object]

TASK_NAME_HEADER = b"X-AppEngine-TaskName"
RETRY_COUNT_HEADER = b"X-AppEngine-TaskRetryCount"
CONTROL_PREFIX = b"/_sample/"
TRICKLE_INTERVAL = 1.0


class _BadParameter(ValueError):
    """A query parameter could not be parsed."""


def _param(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    return values[-1].decode("latin-1")


def _int_param(request: Request, name: str) -> int | None:
    raw = _param(request, name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise _BadParameter(f"{name} must be an integer, got {raw!r}")


def _float_param(request: Request, name: str) -> float | None:
    raw = _param(request, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _BadParameter(f"{name} must be a number, got {raw!r}")
    if value != value or value < 0:
        raise _BadParameter(f"{name} must be a non-negative number")
    return value


def _retry_count(request: Request) -> int:
    raw = request.getHeader(RETRY_COUNT_HEADER)
    if raw is None:
        return 0
    try:
        return int(raw.strip())
    except ValueError:
        return 0


class _PendingResponse:
    """Writes one (possibly delayed, possibly trickled) answer.

    Cancels its timers when the client goes away before the answer is
    complete, so nothing is ever written to a closed request.
    """

    log = Logger()

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        code: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        trickle: float | None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._code = code
        self._headers = headers
        self._body = body
        self._trickle = trickle
        self._call: DelayedCall | None = None
        self._done = False
        self._trickle_started = 0.0
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: object) -> None:
        # Fires when the answer completed or when the client disconnected.
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if isinstance(result, Failure):
            self.log.debug(
                "client went away before the answer to {uri} was complete",
                uri=self._request.uri,
            )

    def start(self, delay: float) -> None:
        if delay > 0:
            self._call = self._clock.callLater(delay, self._respond)
        else:
            self._respond()

    def _respond(self) -> None:
        self._call = None
        if self._done:
            return
        request = self._request
        request.setResponseCode(self._code)
        for name, value in self._headers:
            request.setHeader(name, value)
        if self._trickle is None:
            if self._code not in http.NO_BODY_CODES:
                request.setHeader(
                    b"Content-Length", b"%d" % (len(self._body),)
                )
                request.write(self._body)
            request.finish()
            return
        # Trickle: status and headers now, then one byte per second.
        request.write(b"")
        self._trickle_started = self._clock.seconds()
        self._schedule_trickle()

    def _schedule_trickle(self) -> None:
        assert self._trickle is not None
        remaining = self._trickle - (
            self._clock.seconds() - self._trickle_started
        )
        if remaining <= 0:
            self._request.finish()
            return
        self._call = self._clock.callLater(
            min(TRICKLE_INTERVAL, remaining), self._trickle_tick
        )

    def _trickle_tick(self) -> None:
        self._call = None
        if self._done:
            return
        self._request.write(b".")
        self._schedule_trickle()


class SampleApp(Resource):
    """A stateless, query-driven HTTP endpoint recording what it receives."""

    isLeaf = True
    log = Logger()

    def __init__(self, name: str, clock: IReactorTime) -> None:
        super().__init__()
        self.name = name
        self.clock = clock
        self.received: list[Record] = []
        self.by_task: dict[str, int] = {}
        self._callbacks: list[ReceiveCallback] = []

    # -- public helpers ---------------------------------------------------

    def on_receive(self, callback: ReceiveCallback) -> Callable[[], None]:
        """Call ``callback(record)`` for each recorded request.

        Returns a function that unregisters the callback.
        """
        self._callbacks.append(callback)

        def unregister() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unregister

    def reset(self) -> None:
        """Forget every recorded request."""
        self.received.clear()
        self.by_task.clear()

    # -- rendering --------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        path = request.path or b"/"
        if path.startswith(CONTROL_PREFIX):
            return self._render_control(request, path[len(CONTROL_PREFIX):])
        self._record(request)
        try:
            return self._render_task(request)
        except _BadParameter as exc:
            request.setResponseCode(http.BAD_REQUEST)
            request.setHeader(b"Content-Type", b"text/plain")
            return str(exc).encode("utf-8")

    def _record(self, request: Request) -> None:
        uri = request.uri or b""
        query = uri.partition(b"?")[2]
        headers: dict[str, str] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            if values:
                headers[name.decode("latin-1").lower()] = values[-1].decode(
                    "latin-1"
                )
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read()
            request.content.seek(0)
        record: Record = {
            "instance": self.name,
            "time": self.clock.seconds(),
            "method": (request.method or b"").decode("latin-1"),
            "path": (request.path or b"").decode("latin-1"),
            "uri": uri.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": headers,
            "body_b64": base64.b64encode(body).decode("ascii"),
        }
        self.received.append(record)
        task = request.getHeader(TASK_NAME_HEADER)
        if task is not None:
            task_name = task.decode("latin-1")
            self.by_task[task_name] = self.by_task.get(task_name, 0) + 1
        self.log.debug(
            "{instance} received {method} {uri}",
            instance=self.name,
            method=record["method"],
            uri=record["uri"],
        )
        for callback in list(self._callbacks):
            try:
                callback(record)
            except Exception:
                self.log.failure("on_receive callback failed")

    def _render_task(self, request: Request) -> bytes | int:
        retries = _retry_count(request)
        fail = _int_param(request, "fail")
        status = _int_param(request, "status")
        sleep = _float_param(request, "sleep")
        sleep_first = _int_param(request, "sleep_first")
        trickle = _float_param(request, "trickle")
        location = _param(request, "location")
        retry_after = _param(request, "retry_after")
        if status is not None and not 100 <= status <= 999:
            raise _BadParameter(f"status must be in 100..999, got {status}")

        if fail is not None:
            use_status = retries < fail
            code = (status or http.INTERNAL_SERVER_ERROR) if use_status else (
                http.OK
            )
        else:
            use_status = status is not None
            code = status if status is not None else http.OK

        headers: list[tuple[bytes, bytes]] = [(b"Content-Type", b"text/plain")]
        if use_status:
            if location is not None:
                headers.append((b"Location", location.encode("latin-1")))
            if retry_after is not None:
                headers.append((b"Retry-After", retry_after.encode("latin-1")))
        body = b"ok" if code == http.OK else b"status %d" % (code,)

        delay = sleep or 0.0
        if sleep_first is not None and retries >= sleep_first:
            delay = 0.0

        pending = _PendingResponse(
            request, self.clock, code, headers, body, trickle
        )
        pending.start(delay)
        return NOT_DONE_YET

    def _render_control(self, request: Request, name: bytes) -> bytes:
        method = request.method
        if name == b"received":
            if method not in (b"GET", b"HEAD"):
                return self._not_allowed(request, [b"GET"])
            try:
                since = _int_param(request, "since") or 0
            except _BadParameter as exc:
                request.setResponseCode(http.BAD_REQUEST)
                return str(exc).encode("utf-8")
            return self._json(request, self.received[max(since, 0):])
        if name == b"count":
            if method not in (b"GET", b"HEAD"):
                return self._not_allowed(request, [b"GET"])
            return self._json(request, {"count": len(self.received)})
        if name == b"by_task":
            if method not in (b"GET", b"HEAD"):
                return self._not_allowed(request, [b"GET"])
            return self._json(request, self.by_task)
        if name == b"reset":
            if method != b"POST":
                return self._not_allowed(request, [b"POST"])
            self.reset()
            return self._json(request, {"reset": True})
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"unknown control endpoint"

    @staticmethod
    def _json(request: Request, value: object) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(value).encode("utf-8")

    @staticmethod
    def _not_allowed(request: Request, allowed: list[bytes]) -> bytes:
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader(b"Allow", b", ".join(allowed))
        request.setHeader(b"Content-Type", b"text/plain")
        return b"method not allowed"


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m appscale_tq.sampleapp",
        description="Run a sample application server for appscale-tq.",
    )
    parser.add_argument("--port", type=int, default=8081,
                        help="TCP port to listen on (0 picks a free one)")
    parser.add_argument("--name", default="app",
                        help="instance name stored in each record")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--quiet", action="store_true",
                        help="only log warnings and errors")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a :class:`SampleApp` on the global reactor until stopped."""
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.web.server import Site

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    level = LogLevel.warn if args.quiet else LogLevel.info
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=level)],
            )
        ],
        redirectStandardIO=False,
    )

    app = SampleApp(args.name, reactor)  # type: ignore[arg-type]
    site = Site(app)
    site.noisy = False
    port = reactor.listenTCP(  # type: ignore[attr-defined]
        args.port, site, interface=args.interface
    )
    address = port.getHost()
    print(
        f"sampleapp {args.name} listening on "
        f"http://{address.host}:{address.port}/",
        flush=True,
    )
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
