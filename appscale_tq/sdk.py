"""The App Engine SDK's TaskQueue service over its own wire protocol.

An unmodified app using ``google.appengine.api.taskqueue`` posts a remote_api ``Request`` to
``/rpc_http`` (or, from AppScale's older Python 2 app servers, to ``/`` with ``AppData``); this
module answers it with the same operations, validation and error codes as the JSON API.

Who is calling: the SDK never names its app. A node tells apps apart by the port the call
arrives on (``sdk_listen`` per app) or by a ticket signed with the deployment secret, which
the load balancer injects into the app's requests as ``X-AppEngine-Api-Ticket`` and the SDK
sends back as the envelope's ``request_id``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from google.protobuf.message import DecodeError
from twisted.logger import Logger

from appscale_tq import sdkproto as pb
from appscale_tq.backoff import retry_options_from_mapping
from appscale_tq.errors import TaskQueueError, Unavailable
from appscale_tq.queues import QueueYamlError
from appscale_tq.tasks import MAX_ETA_SECONDS, Task

log = Logger()

TICKET_PREFIX = "tq1"
# headers the SDK sets that tasks keep (App Engine restores the namespace from them)
KEPT_APPENGINE_HEADERS = ("x-appengine-current-namespace", "x-appengine-default-namespace")
# ... and Host, which the SDK sets from ``target=`` (``<target>.<default hostname>``) or from
# the enqueuing request: App Engine routes a task by it, so the dispatch keeps it and the
# app's load balancer can route on it (the request still only goes to the app's own
# load balancer, whatever the Host says).
KEPT_HOST = "host"


def mint_ticket(secret: str, app: str) -> str:
    """The API ticket of ``app``: the load balancer injects it into the app's requests."""
    mac = hmac.new(secret.encode(), f"{TICKET_PREFIX}:{app}".encode(), hashlib.sha256)
    return f"{TICKET_PREFIX}:{app}:{mac.hexdigest()}"


def check_ticket(secret: str, ticket: str | bytes) -> str | None:
    """The app a ticket was minted for, or None if it is not one of ours."""
    if isinstance(ticket, bytes):  # the envelope's request_id is not always valid UTF-8
        try:
            ticket = ticket.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(ticket, str):
        return None
    parts = ticket.rsplit(":", 1)
    if len(parts) != 2 or not parts[0].startswith(TICKET_PREFIX + ":"):
        return None
    app = parts[0][len(TICKET_PREFIX) + 1:]
    if not app:
        return None
    return app if hmac.compare_digest(mint_ticket(secret, app), ticket) else None


def rate_text(per_second: float) -> str:
    """A rate in queue.yaml's grammar (no exponents): per second, or per day when slow."""
    if not per_second > 0:  # negative or NaN: keep it visible, so validation names it
        return "0" if per_second == 0 else f"{per_second}/s"
    unit, value = ("s", per_second) if per_second >= 1 else ("d", per_second * 86400)
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return f"{text}/{unit}" if text not in ("", "0") else "0"


class RpcFailure(Exception):
    """A failure of the call itself (not of the TaskQueue operation): remote_api RpcError."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def envelope_text(value: str | bytes) -> str | None:
    """A string field of the envelope as text: the parser hands back bytes for invalid UTF-8."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _bare_app_id(app: str) -> str:
    """An app id without its partition prefix (``s~guestbook`` is ``guestbook``)."""
    head, sep, tail = app.partition("~")
    return tail if sep and head.isalpha() and tail else app


def _text(raw: bytes, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TaskQueueError("INVALID_REQUEST", f"{field}: not UTF-8") from None


def application_error(code: str, detail: str) -> bytes:
    response = pb.Response()
    response.application_error.code = pb.ERROR_CODES.get(code, pb.ERROR_CODES["INTERNAL_ERROR"])
    response.application_error.detail = detail
    return response.SerializeToString()


def rpc_error(code: int, detail: str) -> bytes:
    response = pb.Response()
    response.rpc_error.code = code
    response.rpc_error.detail = detail
    return response.SerializeToString()


def ok_response(payload: bytes) -> bytes:
    response = pb.Response()
    response.response = payload
    return response.SerializeToString()


def parse_envelope(body: bytes) -> Any:
    request = pb.Request()
    try:
        request.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise RpcFailure(pb.PARSE_ERROR, f"not a remote_api Request: {e}") from None
    if not request.IsInitialized():
        raise RpcFailure(pb.PARSE_ERROR, "remote_api Request lacks service_name/method/request")
    return request


def _task_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TaskQueueError("INVALID_TASK_NAME", "task_name: not UTF-8") from None


def _parse(message_class: Any, raw: bytes, method: str) -> Any:
    message = message_class()
    try:
        message.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise TaskQueueError("INVALID_REQUEST", f"{method}: malformed request ({e})") from None
    if not message.IsInitialized():
        missing = ", ".join(message.FindInitializationErrors())
        raise TaskQueueError("INVALID_REQUEST", f"{method}: missing {missing}")
    return message


def _retry_options(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, key in (("retry_limit", "task_retry_limit"), ("age_limit_sec", "task_age_limit"),
                       ("min_backoff_sec", "min_backoff_seconds"),
                       ("max_backoff_sec", "max_backoff_seconds"),
                       ("max_doublings", "max_doublings")):
        if params.HasField(field):
            out[key] = getattr(params, field)
    return out


class SDKService:
    """Dispatches a remote_api call for one app to the shared TaskQueue operations."""

    def __init__(self, tq: Any, clock: Any) -> None:
        self._tq = tq
        self._clock = clock
        self._methods: dict[str, Callable[[str, bytes], Awaitable[bytes]]] = {
            "BulkAdd": self._bulk_add,
            "Add": self._add,
            "Delete": self._delete,
            "PurgeQueue": self._purge,
            "PauseQueue": self._pause,
            "FetchQueueStats": self._fetch_queue_stats,
            "FetchQueues": self._fetch_queues,
            "UpdateQueue": self._update_queue,
        }

    async def handle(self, app: str, envelope: Any) -> bytes:
        """The serialized remote_api Response for one parsed Request."""
        service = envelope_text(envelope.service_name)
        if service != "taskqueue":
            return rpc_error(pb.CALL_NOT_FOUND,
                             f"unknown service {envelope.service_name!r}"[:200])
        name = envelope_text(envelope.method)
        method = self._methods.get(name) if name is not None else None
        if method is None:
            return rpc_error(pb.CALL_NOT_FOUND,
                             f"unknown taskqueue method {envelope.method!r}"[:200])
        try:
            return ok_response(await method(app, envelope.request))
        except QueueYamlError as e:
            return application_error(e.code, e.message)
        except TaskQueueError as e:
            return application_error(e.code, e.message)
        except Unavailable as e:
            return application_error("TRANSIENT_ERROR", str(e))

    # --- adding ----------------------------------------------------------------------------------
    def _task(self, app: str, add: Any) -> Task:
        if add.HasField("transaction") or add.HasField("datastore_transaction"):
            raise TaskQueueError("INVALID_REQUEST", "transaction: transactional tasks are not "
                                 "supported by this task queue")
        if add.HasField("mode") and add.mode == 1:
            raise TaskQueueError("INVALID_QUEUE_MODE", "mode: pull tasks are not supported")
        self._own_app(app, add)
        queue = _text(add.queue_name, "queue_name")
        self._tq.check_push_queue(app, queue)
        now = self._clock.seconds()
        eta = add.eta_usec / 1e6
        if eta - now > MAX_ETA_SECONDS:
            raise TaskQueueError("INVALID_ETA", "eta_usec: more than 30 days in the future")
        headers = []
        for h in add.header:
            key = _text(h.key, "header")
            value = _text(h.value, f"header {key}")
            headers.append([key, value])
        body: dict[str, Any] = {
            "name": _task_name(add.task_name),
            "url": _text(add.url, "url") if add.HasField("url") else None,
            "method": pb.METHODS.get(add.method, ""),
            "headers": headers,
            "eta": max(eta, now),
        }
        if add.HasField("body") and add.body:
            body["payload_base64"] = base64.b64encode(add.body).decode()
        if add.HasField("retry_parameters"):
            retry = _retry_options(add.retry_parameters)
            try:
                retry_options_from_mapping(retry)
            except TaskQueueError as e:
                raise TaskQueueError("INVALID_RETRY_PARAMETERS", e.message) from None
            body["retry_options"] = retry
        if add.HasField("dispatch_deadline_usec"):
            body["dispatch_deadline"] = add.dispatch_deadline_usec / 1e6
        task = self._tq.parse(app, queue, body)
        kept = tuple(
            (k, v) for k, v in headers if k.lower() in KEPT_APPENGINE_HEADERS
        ) + tuple((k, v) for k, v in headers if k.lower() == KEPT_HOST)[:1]
        if kept:
            task = attrs.evolve(task, headers=task.headers + kept)
        return task

    async def _bulk_add(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.BulkAddRequest, raw, "BulkAdd")
        if len(request.add_request) > 100:
            raise TaskQueueError("TOO_MANY_TASKS", "add_request: at most 100 tasks in one call")
        results: list[tuple[str, str]] = [("SKIPPED", "")] * len(request.add_request)
        tasks: list[tuple[int, Task, bool]] = []
        failed = False
        seen: set[str] = set()
        for i, add in enumerate(request.add_request):
            try:
                task = self._task(app, add)
            except TaskQueueError as e:
                results[i] = (e.code, "")
                failed = True
                continue
            named = bool(add.task_name)
            if named and task.name in seen:
                results[i] = ("DUPLICATE_TASK_NAME", "")
                failed = True
                continue
            seen.add(task.name)
            tasks.append((i, task, named))
        if failed:  # App Engine adds none of a batch that has an invalid task
            return self._bulk_response(results)

        added = await self._tq.add_many([t for _, t, _ in tasks])
        for (i, task, named), result in zip(tasks, added):  # each task on its own
            if isinstance(result, TaskQueueError):
                results[i] = (result.code, "")
            elif isinstance(result, Unavailable):
                results[i] = ("TRANSIENT_ERROR", "")
            else:
                results[i] = ("OK", "" if named else task.name)
        return self._bulk_response(results)

    @staticmethod
    def _bulk_response(results: list[tuple[str, str]]) -> bytes:
        response = pb.BulkAddResponse()
        for code, chosen in results:
            result = response.taskresult.add()
            result.result = pb.ERROR_CODES[code]
            if chosen:
                result.chosen_task_name = chosen.encode()
        return response.SerializeToString()

    async def _add(self, app: str, raw: bytes) -> bytes:
        add = _parse(pb.AddRequest, raw, "Add")
        task = self._task(app, add)
        await self._tq.add(task)
        response = pb.AddResponse()
        if not add.task_name:
            response.chosen_task_name = task.name.encode()
        return response.SerializeToString()

    # --- tasks and queues ------------------------------------------------------------------------
    def _own_app(self, app: str, message: Any) -> None:
        """A request may name its app (``app_id``), but only the calling app."""
        if message.HasField("app_id") and message.app_id:
            named = message.app_id.decode("utf-8", "replace")
            if _bare_app_id(named) != _bare_app_id(app):
                raise TaskQueueError("PERMISSION_DENIED", "app_id: not the calling app")

    async def _delete(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.DeleteRequest, raw, "Delete")
        self._own_app(app, request)
        queue = _text(request.queue_name, "queue_name")
        self._tq.check_queue(app, queue)
        response = pb.DeleteResponse()
        for raw_name in request.task_name:
            try:
                await self._tq.delete(app, queue, _text(raw_name, "task_name"))
                response.result.append(0)
            except TaskQueueError as e:
                response.result.append(pb.ERROR_CODES.get(e.code, 3))
        return response.SerializeToString()

    async def _purge(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.PurgeQueueRequest, raw, "PurgeQueue")
        self._own_app(app, request)
        await self._tq.purge(app, _text(request.queue_name, "queue_name"))
        return pb.PurgeQueueResponse().SerializeToString()

    async def _pause(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.PauseQueueRequest, raw, "PauseQueue")
        self._own_app(app, request)
        await self._tq.set_paused(app, _text(request.queue_name, "queue_name"), request.pause)
        return pb.PauseQueueResponse().SerializeToString()

    async def _fetch_queue_stats(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.FetchQueueStatsRequest, raw, "FetchQueueStats")
        self._own_app(app, request)
        response = pb.FetchQueueStatsResponse()
        for raw_name in request.queue_name:
            info = await self._tq.queue_info(app, _text(raw_name, "queue_name"))
            stats = response.queuestats.add()
            stats.num_tasks = info["tasks"]
            oldest = info.get("oldest_eta_seconds")
            stats.oldest_eta_usec = int(oldest * 1e6) if oldest is not None else -1
            stats.scanner_info.executed_last_minute = info["executed_last_minute"]
            stats.scanner_info.executed_last_hour = info["executed_last_minute"]
            stats.scanner_info.sampling_duration_seconds = 60.0
            stats.scanner_info.requests_in_flight = info["in_flight"]
            stats.scanner_info.enforced_rate = info["enforced_rate_per_second"]
        return response.SerializeToString()

    async def _fetch_queues(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.FetchQueuesRequest, raw, "FetchQueues")
        self._own_app(app, request)
        response = pb.FetchQueuesResponse()
        for info in (await self._tq.list_queues(app))[: max(0, request.max_rows)]:
            q = response.queue.add()
            q.queue_name = info["name"].encode()
            q.bucket_refill_per_second = info["rate_per_second"] or 0.0
            q.bucket_capacity = float(info["bucket_size"] or 0)
            if info.get("rate"):
                q.user_specified_rate = info["rate"]
            q.paused = info["state"] == "paused"
            q.mode = 1 if info["mode"] == "pull" else 0
            if info.get("max_concurrent_requests"):
                q.max_concurrent_requests = info["max_concurrent_requests"]
            retry = info.get("retry_parameters") or {}
            for key, field in (("task_retry_limit", "retry_limit"),
                               ("task_age_limit", "age_limit_sec"),
                               ("min_backoff_seconds", "min_backoff_sec"),
                               ("max_backoff_seconds", "max_backoff_sec"),
                               ("max_doublings", "max_doublings")):
                if key in retry:
                    value = retry[key]
                    setattr(q.retry_parameters, field,
                            int(value) if field in ("retry_limit", "age_limit_sec",
                                                    "max_doublings") else float(value))
        return response.SerializeToString()

    async def _update_queue(self, app: str, raw: bytes) -> bytes:
        request = _parse(pb.UpdateQueueRequest, raw, "UpdateQueue")
        self._own_app(app, request)
        queue = _text(request.queue_name, "queue_name")
        definition: dict[str, Any] = {
            "name": queue,
            "rate": request.user_specified_rate
            if request.HasField("user_specified_rate")
            else rate_text(request.bucket_refill_per_second),
            "bucket_size": request.bucket_capacity,
        }
        if request.HasField("max_concurrent_requests"):
            definition["max_concurrent_requests"] = request.max_concurrent_requests
        if request.HasField("mode") and request.mode == 1:
            definition = {"name": queue, "mode": "pull"}
        if request.HasField("retry_parameters"):
            retry = _retry_options(request.retry_parameters)
            if "task_age_limit" in retry:
                retry["task_age_limit"] = f"{int(retry['task_age_limit'])}s"
            definition["retry_parameters"] = retry
        await self._tq.update_queue(app, definition)
        return pb.UpdateQueueResponse().SerializeToString()
