"""The HTTP API: twisted.web resources for the JSON API (under /v1) and operations."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appscale_tq.api import TaskQueue, task_summary
from appscale_tq.errors import TaskQueueError, Unavailable

log = Logger()

# A full batch (100 tasks of 100 KiB, base64) is under 14 MiB.
MAX_BODY = 16 * 1024 * 1024
# App Engine's queue.yaml is a few KiB; 1,000 queues fit in well under this.
MAX_QUEUE_YAML = 1024 * 1024


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.body = {"error": {"code": code, "message": message}}
        self.headers = headers or {}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    if len(raw) > MAX_BODY:
        raise HTTPError(413, "TASK_TOO_LARGE", f"body: larger than {MAX_BODY} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError(400, "INVALID_REQUEST", f"body: not UTF-8 ({e.reason})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, "INVALID_REQUEST", f"body: not valid JSON ({e})") from None


def read_body(request: Request, limit: int, code: str) -> bytes:
    """The request body, refused (413) past ``limit`` without reading more than that."""
    length = request.getHeader(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise HTTPError(413, code, f"body: larger than {limit} bytes")
    raw = request.content.read(limit + 1) if request.content else b""
    if len(raw) > limit:
        raise HTTPError(413, code, f"body: larger than {limit} bytes")
    return raw


def _segments(request: Request) -> list[str]:
    out = []
    for seg in request.postpath:
        try:
            out.append(unquote_to_bytes(seg).decode("utf-8"))
        except UnicodeDecodeError:
            raise HTTPError(404, "INVALID_REQUEST", "path: not UTF-8") from None
    while out and out[-1] == "":
        out.pop()
    return out


Handler = Callable[..., Awaitable[tuple[int, Any]]]


class API(Resource):
    """One leaf resource that routes by path, so ``tasks:batch`` needs no special child."""

    isLeaf = True

    def __init__(self, queue: TaskQueue, health: Callable[[], Awaitable[dict[str, str]]],
                 secret: str | None = None) -> None:
        super().__init__()
        self._tq = queue
        self._health = health
        self._secret = secret

    def render(self, request: Request) -> Any:
        # Not cancelled when the client goes away: every step is bounded by its own timeout,
        # and an enqueue cut in half could free a name whose message the broker still confirms.
        Deferred.fromCoroutine(self._respond(request))
        return NOT_DONE_YET

    async def _respond(self, request: Request) -> None:
        try:
            status, body = await self._route(request)
        except HTTPError as e:
            status, body = e.status, e.body
            for key, value in e.headers.items():
                request.setHeader(key, value)
        except TaskQueueError as e:
            status, body = e.http_status, e.as_json()
            errors = getattr(e, "errors", None)
            if errors:
                body["error"]["errors"] = list(errors)
        except Unavailable as e:
            status, body = 503, e.as_task_queue_error().as_json()
        except Exception:
            log.failure("unexpected error answering {uri}", uri=request.uri)
            status, body = 500, {"error": {"code": "INTERNAL_ERROR", "message": "internal error"}}
        if request._disconnected or request.finished:
            return
        request.setResponseCode(status)
        if body is None:
            request.finish()
            return
        data = json.dumps(body).encode("utf-8")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()

    def _authorize(self, request: Request) -> None:
        if self._secret is None:
            return
        given = request.getHeader(b"authorization") or b""
        expected = b"Bearer " + self._secret.encode("utf-8")
        if not hmac.compare_digest(given, expected):
            raise HTTPError(403, "PERMISSION_DENIED", "authorization: missing or wrong secret")

    def _body(self, request: Request) -> Any:
        return parse_json(read_body(request, MAX_BODY, "TASK_TOO_LARGE"))

    async def _route(self, request: Request) -> tuple[int, Any]:
        path = _segments(request)
        method = request.method.decode("ascii", "replace")
        if path == ["healthz"]:
            self._allow(method, "GET", "HEAD")
            checks = await self._health()
            ok = all(v == "ok" for v in checks.values())
            return (200 if ok else 503), checks
        if path[:2] == ["v1", "apps"] and len(path) == 4 and path[3] == "queue.yaml":
            self._authorize(request)
            self._allow(method, "PUT", "POST")
            raw = read_body(request, MAX_QUEUE_YAML, "INVALID_REQUEST")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPError(400, "INVALID_REQUEST", "body: queue.yaml is not UTF-8") from None
            return 200, await self._tq.deploy(path[2], text)
        if path[:2] == ["v1", "apps"] and len(path) == 4 and path[3] == "queues":
            self._authorize(request)
            self._allow(method, "GET")
            return 200, {"queues": await self._tq.list_queues(path[2])}
        if path[:2] == ["v1", "apps"] and len(path) == 5 and path[3] == "queues":
            self._authorize(request)
            app, queue = path[2], path[4]
            for action, call in ((":pause", "pause"), (":resume", "resume"), (":purge", "purge")):
                if queue.endswith(action):
                    self._allow(method, "POST")
                    queue = queue[: -len(action)]
                    if call == "purge":
                        return 200, await self._tq.purge(app, queue)
                    return 200, await self._tq.set_paused(app, queue, call == "pause")
            self._allow(method, "GET")
            return 200, await self._tq.queue_info(app, queue)
        if path[:2] == ["v1", "apps"] and len(path) >= 5 and path[3] == "queues":
            self._authorize(request)
            app, queue, rest = path[2], path[4], path[5:]
            if rest == ["tasks"]:
                self._allow(method, "POST")
                task = await self._tq.add_json(app, queue, self._body(request))
                return 201, task_summary(task)
            if rest == ["tasks:batch"]:
                self._allow(method, "POST")
                body = self._body(request)
                if not isinstance(body, dict) or set(body) != {"tasks"}:
                    raise TaskQueueError("INVALID_REQUEST", 'body: must be {"tasks": [...]}')
                return 200, {"results": await self._tq.add_batch_json(app, queue, body["tasks"])}
            if len(rest) == 2 and rest[0] == "tasks":
                self._allow(method, "GET", "DELETE")
                if method == "DELETE":
                    await self._tq.delete(app, queue, rest[1])
                    return 204, None
                return 200, await self._tq.get(app, queue, rest[1])
        raise HTTPError(404, "INVALID_REQUEST", f"path: no such endpoint {request.path[:200]!r}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HTTPError(405, "INVALID_REQUEST", f"method: use {' or '.join(allowed)}",
                            {b"allow": ", ".join(allowed).encode("ascii")})


def build_root(queue: TaskQueue, health: Callable[[], Awaitable[dict[str, str]]],
               secret: str | None = None) -> Resource:
    return API(queue, health, secret)
