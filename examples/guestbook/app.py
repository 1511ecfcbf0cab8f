"""Guestbook: an App Engine app written against Google's own SDK, run on appscale-tq.

Nothing in here knows about appscale-tq: it is a plain WSGI app wrapped with
``google.appengine.api.wrap_wsgi_app`` that uses ``google.appengine.api.taskqueue`` and
``google.appengine.ext.deferred`` as on App Engine. The SDK sends its calls to
``http://$API_HOST:$API_PORT/rpc_http`` with the request's ``X-AppEngine-Api-Ticket``, which the
app's load balancer injects (see ``lb.py``).

Pages (JSON in, JSON out, for the example's tests and for trying things with curl):

- ``GET /`` the guestbook; ``POST /sign`` (form ``author``, ``message``) signs it through a task
- ``POST /api/add``: ``taskqueue.add(...)`` with params, payload, countdown, name, retry
  options, target, headers, method, namespace
- ``POST /api/batch``: ``Queue.add([...])`` of up to 100 tasks; answers the names chosen
- ``POST /api/defer``: ``deferred.defer(remember, *args, **kwargs)``
- ``POST /api/delete``: ``Queue.delete_tasks(...)`` or ``Queue.delete_tasks_by_name(...)``
- ``POST /api/purge``: ``Queue.purge()``
- ``GET /api/stats?queue=a&queue=b``: ``QueueStatistics.fetch(...)``
- ``POST /api/error``: triggers one task queue error and reports where it was raised
- ``GET /recorded``: what the task handlers ran (also in the ``$GUESTBOOK_RECORDS`` file)
- ``/tasks/...`` task handlers: record the request (``/tasks/fail`` answers 500)
- ``/_ah/queue/deferred``: the SDK's own deferred handler (``use_deferred=True``)
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from google.appengine.api import namespace_manager, taskqueue, wrap_wsgi_app
from google.appengine.ext import deferred

SERVICE = os.environ.get("GAE_SERVICE", "default")
RECORDS = os.environ.get("GUESTBOOK_RECORDS") or os.path.join(
    tempfile.gettempdir(), f"guestbook-{os.environ.get('GAE_APPLICATION', 'app')}.jsonl")
SERVER_SOFTWARE = "Google App Engine/appscale-tq guestbook"  # not "Development": the SDK's
# deferred handler then insists on REMOTE_ADDR 0.1.0.2, as in production
_lock = threading.Lock()

StartResponse = Callable[..., Any]


# --- what ran ---------------------------------------------------------------------------------
def record(entry: dict[str, Any]) -> None:
    """Append one JSON line; every app server process of the example shares the file."""
    entry = {"time": time.time(), "service": SERVICE, "pid": os.getpid(), **entry}
    line = (json.dumps(entry, sort_keys=True, default=repr) + "\n").encode()
    with _lock:
        fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write of an O_APPEND file: lines never interleave
        finally:
            os.close(fd)


def recorded() -> list[dict[str, Any]]:
    try:
        with open(RECORDS, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def remember(*args: Any, **kwargs: Any) -> None:
    """The deferred function: runs in the task request, under /_ah/queue/deferred."""
    record({
        "kind": "deferred",
        "args": list(args),
        "kwargs": kwargs,
        "args_repr": repr(args),
        "kwargs_repr": repr(sorted(kwargs.items())),
        "task_name": os.environ.get("HTTP_X_APPENGINE_TASKNAME"),
        "queue_name": os.environ.get("HTTP_X_APPENGINE_QUEUENAME"),
        "remote_addr": os.environ.get("REMOTE_ADDR"),
        "namespace": namespace_manager.get_namespace(),
    })


def _appengine_headers(environ: dict[str, Any]) -> dict[str, str]:
    """The request's X-AppEngine-* headers (the API ticket shown only as present)."""
    out = {}
    for key, value in environ.items():
        if key.startswith("HTTP_X_APPENGINE_"):
            name = "X-AppEngine-" + key[len("HTTP_X_APPENGINE_"):].replace("_", "-").title()
            out[name] = "(present)" if name == "X-AppEngine-Api-Ticket" else value
    return out


def task_handler(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Any task: write down what arrived (method, path, params, body, X-AppEngine-* headers)."""
    body = _body(environ)
    method = environ["REQUEST_METHOD"]
    content_type = environ.get("CONTENT_TYPE", "")
    params = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if content_type.startswith("application/x-www-form-urlencoded"):
        params.update(parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True))
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    path = environ.get("PATH_INFO", "")
    record({
        "kind": "task",
        "method": method,
        "path": path,
        "query": environ.get("QUERY_STRING", ""),
        "params": params,
        "body": text,
        "body_base64": base64.b64encode(body).decode(),
        "content_type": content_type,
        "host": environ.get("HTTP_HOST"),
        "headers": _appengine_headers(environ),
        "remote_addr": environ.get("REMOTE_ADDR"),
        "namespace": namespace_manager.get_namespace(),
    })
    if path == "/tasks/store":  # the guestbook's own task: a signed entry
        record({"kind": "greeting", "author": params.get("author", [""])[0],
                "message": params.get("message", [""])[0]})
    if path.startswith("/tasks/fail"):
        return _send(start_response, "500 Internal Server Error", b"failing on purpose\n")
    return _send(start_response, "200 OK", b"ok\n")


# --- the SDK calls ----------------------------------------------------------------------------
def _retry_options(spec: dict[str, Any] | None) -> taskqueue.TaskRetryOptions | None:
    return taskqueue.TaskRetryOptions(**spec) if spec else None


def _task_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """Task(...) keyword arguments from a JSON request."""
    kwargs: dict[str, Any] = {}
    for key in ("url", "params", "payload", "countdown", "name", "target", "headers", "method"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    if spec.get("retry_options"):
        kwargs["retry_options"] = _retry_options(spec["retry_options"])
    if spec.get("dispatch_deadline") is not None:
        kwargs["dispatch_deadline_usec"] = int(spec["dispatch_deadline"] * 1e6)
    return kwargs


def _task_view(task: taskqueue.Task) -> dict[str, Any]:
    return {"name": task.name, "queue": task.queue_name, "url": task.url,
            "eta": task.eta_posix, "was_enqueued": task.was_enqueued,
            "was_deleted": task.was_deleted, "target": str(task.target),
            "headers": dict(task.headers)}


def api_add(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("namespace") is not None:
        namespace_manager.set_namespace(spec["namespace"])
    task = taskqueue.add(queue_name=spec.get("queue", "default"), **_task_kwargs(spec))
    return _task_view(task)


def api_batch(spec: dict[str, Any]) -> dict[str, Any]:
    """``Queue.add`` of ``count`` tasks (named ``names[i]`` where given): the names it chose."""
    count = int(spec.get("count", 100))
    names = spec.get("names") or [None] * count
    tasks = [
        taskqueue.Task(url=spec.get("url", "/tasks/batch"), params={"i": str(i)},
                       countdown=spec.get("countdown"), name=names[i])
        for i in range(count)
    ]
    queue = taskqueue.Queue(spec.get("queue", "default"))
    try:
        queue.add(tasks)
    except taskqueue.Error as e:
        return {"error": _error_view(e, "add"), "names": [t.name for t in tasks],
                "enqueued": [t.was_enqueued for t in tasks]}
    return {"names": [t.name for t in tasks], "enqueued": [t.was_enqueued for t in tasks]}


def api_defer(spec: dict[str, Any]) -> dict[str, Any]:
    args = list(spec.get("args", []))
    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("python_values"):  # values only pickle carries: a tuple, bytes, a set
        args.append(("a", "tuple"))
        kwargs["raw"] = b"\x00bytes\xff"
        kwargs["tags"] = frozenset({"x", "y"})
    options = {f"_{k}": v for k, v in (spec.get("options") or {}).items()}
    task = deferred.defer(remember, *args, **kwargs, **options)
    return _task_view(task)


def api_delete(spec: dict[str, Any]) -> dict[str, Any]:
    queue = taskqueue.Queue(spec.get("queue", "default"))
    names = list(spec["names"])
    if spec.get("by_name"):
        tasks = queue.delete_tasks_by_name(names)
    else:
        tasks = queue.delete_tasks([taskqueue.Task(name=n) for n in names])
    return {"deleted": [t.was_deleted for t in tasks]}


def api_purge(spec: dict[str, Any]) -> dict[str, Any]:
    taskqueue.Queue(spec.get("queue", "default")).purge()
    return {"purged": spec.get("queue", "default")}


def api_stats(queues: list[str]) -> list[dict[str, Any]]:
    stats = taskqueue.QueueStatistics.fetch([taskqueue.Queue(q) for q in queues])
    return [{"queue": s.queue.name, "tasks": s.tasks, "oldest_eta_usec": s.oldest_eta_usec,
             "executed_last_minute": s.executed_last_minute, "in_flight": s.in_flight,
             "enforced_rate": s.enforced_rate} for s in stats]


def _error_view(e: BaseException, phase: str) -> dict[str, Any]:
    return {"phase": phase, "exception": type(e).__name__,
            "is_a": [c.__name__ for c in type(e).__mro__], "message": str(e)}


def api_error(spec: dict[str, Any]) -> dict[str, Any]:
    """Trigger one error; report the exception and where it came: building the Task
    (``construct``) or adding it (``add``), as on App Engine."""
    kind = spec["kind"]
    name = spec.get("name") or f"e-{os.urandom(6).hex()}"
    setup: Callable[[], Any] = lambda: None  # noqa: E731
    queue = "default"
    if kind == "already_exists":
        setup = lambda: taskqueue.Task(name=name, url="/tasks/held", countdown=600).add()  # noqa
        build = lambda: taskqueue.Task(name=name, url="/tasks/held", countdown=600)  # noqa
    elif kind == "tombstoned":
        def setup() -> None:
            taskqueue.Task(name=name, url="/tasks/held", countdown=600).add()
            taskqueue.Queue().delete_tasks_by_name(name)
        build = lambda: taskqueue.Task(name=name, url="/tasks/held")  # noqa: E731
    elif kind == "unknown_queue":
        queue = "no-such-queue"
        build = lambda: taskqueue.Task(url="/tasks/never")  # noqa: E731
    elif kind == "invalid_name":
        build = lambda: taskqueue.Task(name="not a valid name!", url="/tasks/never")  # noqa
    elif kind == "too_large":
        build = lambda: taskqueue.Task(payload=b"x" * (100 * 1024 + 1), url="/tasks/never")  # noqa
    elif kind == "eta_too_far":
        build = lambda: taskqueue.Task(countdown=31 * 86400, url="/tasks/never")  # noqa
    else:
        raise ValueError(f"unknown error kind {kind!r}")
    setup()
    try:
        task = build()
    except taskqueue.Error as e:
        return {"kind": kind, **_error_view(e, "construct")}
    try:
        task.add(queue)
    except taskqueue.Error as e:
        return {"kind": kind, **_error_view(e, "add")}
    return {"kind": kind, "phase": None, "exception": None, "name": task.name}


# --- the guestbook ----------------------------------------------------------------------------
def guestbook_page() -> bytes:
    greetings = [r for r in recorded() if r.get("kind") == "greeting"]
    items = "".join(f"<li><b>{html.escape(g['author'])}</b>: {html.escape(g['message'])}</li>"
                    for g in greetings)
    return (
        "<!doctype html><title>Guestbook</title><h1>Guestbook</h1>"
        f"<ul>{items}</ul>"
        '<form method="post" action="/sign"><input name="author" placeholder="name">'
        '<input name="message" placeholder="message"><button>Sign</button></form>'
    ).encode()


def sign(environ: dict[str, Any]) -> None:
    form = parse_qs(_body(environ).decode("utf-8", "replace"))
    taskqueue.add(url="/tasks/store", params={
        "author": form.get("author", ["anonymous"])[0],
        "message": form.get("message", [""])[0],
    })


# --- WSGI -------------------------------------------------------------------------------------
def _body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    return environ["wsgi.input"].read(length) if length > 0 else b""


def _send(start_response: StartResponse, status: str, body: bytes,
          content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body)))])
    return [body]


def _json(start_response: StartResponse, status: str, value: Any) -> list[bytes]:
    return _send(start_response, status, json.dumps(value, default=repr).encode() + b"\n",
                 "application/json")


API: dict[str, Callable[[dict[str, Any]], Any]] = {
    "/api/add": api_add, "/api/batch": api_batch, "/api/defer": api_defer,
    "/api/delete": api_delete, "/api/purge": api_purge, "/api/error": api_error,
}


def guestbook(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    method = environ["REQUEST_METHOD"]
    if path.startswith("/tasks/"):
        return task_handler(environ, start_response)
    try:
        if path == "/" and method == "GET":
            return _send(start_response, "200 OK", guestbook_page(), "text/html; charset=utf-8")
        if path == "/sign" and method == "POST":
            sign(environ)
            start_response("303 See Other", [("Location", "/"), ("Content-Length", "0")])
            return [b""]
        if path in API and method == "POST":
            spec = json.loads(_body(environ) or b"{}")
            return _json(start_response, "200 OK", API[path](spec))
        if path == "/api/stats" and method == "GET":
            queues = parse_qs(environ.get("QUERY_STRING", "")).get("queue", ["default"])
            return _json(start_response, "200 OK", api_stats(queues))
        if path == "/recorded" and method == "GET":
            return _json(start_response, "200 OK", recorded())
        if path == "/whoami" and method == "GET":
            return _json(start_response, "200 OK", {
                "remote_addr": environ.get("REMOTE_ADDR"), "service": SERVICE,
                "headers": _appengine_headers(environ)})
    except taskqueue.Error as e:
        return _json(start_response, "409 Conflict", {"error": _error_view(e, "call")})
    except Exception as e:  # e.g. the SDK's RPCFailedError: no ticket, node unreachable
        return _json(start_response, "500 Internal Server Error",
                     {"error": _error_view(e, "call")})
    return _send(start_response, "404 Not Found", b"not found\n")


def _with_server_software(app: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Any:
        environ.setdefault("SERVER_SOFTWARE", SERVER_SOFTWARE)
        return app(environ, start_response)
    return wrapped


# use_deferred: /_ah/queue/deferred runs deferred.defer()'s tasks
application = _with_server_software(wrap_wsgi_app(guestbook, use_deferred=True))
