"""A guided tour of a one-machine appscale-tq: ``python -m appscale_tq.demo``.

What a newcomer runs after setup (RabbitMQ and Redis running on 127.0.0.1). It starts

- two sample app servers (``appscale_tq.sampleapp``) on 127.0.0.1:8081 and :8082,
- HAProxy on 127.0.0.1:8080 in front of them (the app's load balancer),
- the node itself, ``twistd -n --pidfile= appscale-tq`` with no config at all, so on its
  built-in defaults: API on 127.0.0.1:17446, app ``default`` behind http://127.0.0.1:8080,

then enqueues a few tasks through the JSON API (a plain one, a named one, a batch of 10, one
with a 3 s countdown and one that fails once and is retried), shows each one arriving at an app
server, and stops everything again. ``--keep-running`` leaves it all up until Ctrl-C.

Exit status: 0 when every task arrived, 1 on any failure, 2 when a port is already taken
(or HAProxy is missing), 130 when interrupted.

Standard library only (plus ``appscale_tq.haproxy``): it is a plain synchronous script.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appscale_tq.haproxy import HAProxyProcess, find_haproxy

HOST = "127.0.0.1"
API_PORT = 17446
LB_PORT = 8080
APP_PORTS = (8081, 8082)
APP = "default"
QUEUE = "default"
ARRIVAL_TIMEOUT = 30.0
HEALTH_TIMEOUT = 20.0
START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.1
LOG_TAIL = 30
PAYLOAD = "hello from the appscale-tq demo"


class DemoError(Exception):
    """A failure the demo explains in its message; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Stop(BaseException):
    """SIGTERM / SIGHUP: unwind like Ctrl-C so everything started gets stopped."""


# --- small helpers -----------------------------------------------------------------------------
def say(line: str = "") -> None:
    print(line, flush=True)


def port_busy(port: int, host: str = HOST) -> bool:
    """Whether something listens on ``host:port`` (or the port cannot be bound there)."""
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The servers we start set SO_REUSEADDR too, so TIME_WAIT leftovers do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    """The log's last lines, without the access-log lines of our own /healthz polls."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.rstrip("\n").splitlines() if '"GET /healthz ' not in line]
    return "\n".join(kept[-lines:]) or "(empty log)"


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One JSON request: ``(status, decoded body or None)``; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, (json.loads(raw) if raw else None)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def twistd_path() -> str:
    """``twistd`` of this interpreter's environment (next to ``sys.executable``)."""
    here = Path(sys.executable).parent / "twistd"
    if here.exists():
        return str(here)
    found = shutil.which("twistd")
    if found:
        return found
    raise DemoError(f"twistd not found next to {sys.executable}; is Twisted installed there?")


# --- the processes -----------------------------------------------------------------------------
class Child:
    """One child process with its output in a log file."""

    def __init__(self, label: str, argv: Sequence[str], log: Path, cwd: Path) -> None:
        self.label = label
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                # own session: Ctrl-C reaches only the demo, which stops them in order
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"demo: {self.label} (pid {self.pid}) did not stop in {timeout:g} s; "
                    "killing it")
                self.process.kill()
                self.process.wait()


class Cluster:
    """The sample apps, HAProxy and the node; ``stop()`` stops whatever was started."""

    def __init__(self, workdir: Path, api_port: int, lb_port: int,
                 app_ports: Sequence[int], namespace: str | None) -> None:
        self.workdir = workdir
        self.api_port = api_port
        self.lb_port = lb_port
        self.app_ports = tuple(app_ports)
        self.namespace = namespace  # only for --ports (a config file); None: no config
        self.apps: list[Child] = []
        self.lb = HAProxyProcess()
        self.node: Child | None = None

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def app_url(self, index: int) -> str:
        return f"http://{HOST}:{self.app_ports[index]}"

    def start(self) -> None:
        for index, port in enumerate(self.app_ports):
            name = f"app{index + 1}"
            child = Child(
                f"sample app {name}",
                [sys.executable, "-m", "appscale_tq.sampleapp", "--port", str(port),
                 "--name", name, "--interface", HOST, "--quiet"],
                self.workdir / f"{name}.log",
                self.workdir,
            )
            self.apps.append(child)
            self._wait_listening(child, port)
            say(f"demo: sample app {name} on http://{HOST}:{port}/ (pid {child.pid})")
        try:
            self.lb.start(self.lb_port, [(HOST, p) for p in self.app_ports],
                          self.workdir / "haproxy", timeout=START_TIMEOUT)
        except RuntimeError as e:
            raise DemoError(f"HAProxy did not start: {e}") from None
        assert self.lb.process is not None
        say(f"demo: HAProxy on {self.lb.url}/ -> ports "
            f"{', '.join(map(str, self.app_ports))} (pid {self.lb.process.pid})")
        argv = self._node_argv()
        self.node = Child("the node", argv, self.workdir / "node.log", self.workdir)
        say(f"demo: node `{' '.join(['twistd', *argv[1:]])}` (pid {self.node.pid}), "
            f"log {self.node.log}")
        self._wait_healthy()
        say(f"demo: node healthy at {self.api}/healthz")

    def _node_argv(self) -> list[str]:
        argv = [twistd_path(), "-n", "--pidfile=", "appscale-tq"]
        if self.namespace is None:
            return argv  # the point of the demo: the embedded defaults just work
        config = self.workdir / "node.yaml"
        config.write_text(
            f"listen: 'tcp:{self.api_port}:interface={HOST}'\n"
            f"namespace: {self.namespace}\n"
            f"apps:\n  {APP}:\n    lb_url: 'http://{HOST}:{self.lb_port}'\n",
            encoding="utf-8",
        )
        return [*argv, "--config", str(config)]

    def _wait_listening(self, child: Child, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            if not child.alive():
                raise DemoError(f"{child.label} exited with status {child.process.returncode}:\n"
                                f"{tail(child.log)}")
            if time.monotonic() > deadline:
                raise DemoError(f"{child.label} did not listen on port {port} within "
                                f"{START_TIMEOUT:g} s:\n{tail(child.log)}")
            time.sleep(0.05)

    def _wait_healthy(self) -> None:
        assert self.node is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT
        last = "no answer yet (the API is not listening)"
        while True:
            if not self.node.alive():
                raise DemoError(
                    f"the node exited with status {self.node.process.returncode} before it "
                    f"became healthy. Last lines of its log ({self.node.log}):\n"
                    f"{tail(self.node.log)}"
                )
            checks: Any = None
            try:
                status, checks = http("GET", f"{self.api}/healthz", timeout=2.0)
                if status == 200:
                    return
                last = f"{status} {json.dumps(checks)}"
            except OSError as e:
                last = f"no answer ({getattr(e, 'reason', e)})"
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the node was not healthy within {HEALTH_TIMEOUT:g} s; last "
                    f"GET /healthz: {last}.\n{_diagnosis(checks)}\nLast lines of its log "
                    f"({self.node.log}):\n{tail(self.node.log)}"
                )
            time.sleep(0.5)

    def check_alive(self) -> None:
        for child in [*self.apps, *([self.node] if self.node else [])]:
            if not child.alive():
                raise DemoError(f"{child.label} exited with status {child.process.returncode}:"
                                f"\n{tail(child.log)}")
        if self.lb.process is not None and not self.lb.running:
            raise DemoError(f"HAProxy exited:\n{self.lb.read_log()[-3000:]}")

    def stop(self) -> None:
        # The node first (it drains what it is dispatching), then the load balancer, the apps.
        if self.node is not None:
            self.node.stop()
        self.lb.stop()
        for child in self.apps:
            child.stop()


_NEEDS = {
    "rabbitmq": "RabbitMQ on 127.0.0.1:5672 (user guest/guest; try: rabbitmqctl status)",
    "redis": "Redis on 127.0.0.1:6379 (try: redis-cli ping)",
}


def _diagnosis(checks: Any) -> str:
    """Which of RabbitMQ / Redis the node could not reach, from its /healthz answer."""
    failing = []
    if isinstance(checks, dict):
        failing = [name for name, state in checks.items() if state != "ok" and name in _NEEDS]
    if failing:
        return "The node cannot reach " + " nor ".join(
            f"{_NEEDS[name]} ({checks[name]})" for name in failing
        ) + ". Is it running?"
    return f"The node needs {_NEEDS['rabbitmq']} and {_NEEDS['redis']}. Are both running?"


# --- the tour ----------------------------------------------------------------------------------
class Tour:
    """Enqueues the demo tasks and follows them to the app servers."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tasks_url = f"{cluster.api}/v1/apps/{APP}/queues/{QUEUE}/tasks"
        self.enqueued: dict[str, float] = {}  # task name -> time of its enqueue request
        self.expected: dict[str, int] = {}  # task name -> deliveries it takes (2: fails once)
        self.kind: dict[str, str] = {}
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self.cursor = [0] * len(cluster.app_ports)
        self.foreign = 0  # deliveries of tasks this run did not enqueue
        self.named = ""

    def queue_note(self) -> str:
        """How fast the queue dispatches, if the node says (App Engine's default: 5/s)."""
        try:
            status, info = http("GET", f"{self.cluster.api}/v1/apps/{APP}/queues/{QUEUE}")
        except OSError:
            return ""
        if status != 200 or not isinstance(info, dict) or not info.get("rate"):
            return ""
        defaults = " (App Engine's defaults)" if (info["rate"], info.get("bucket_size")) == (
            "5/s", 5) else ""
        note = (f"\ndemo: queue {QUEUE!r} dispatches at rate {info['rate']}, bucket_size "
                f"{info.get('bucket_size')}{defaults}: a batch trickles out")
        waiting = info.get("tasks")
        if isinstance(waiting, int) and waiting > 0:
            note += (f"\ndemo: note: {waiting} task(s) from earlier runs still wait in this "
                     "queue; they may go first")
        return note

    def enqueue(self) -> None:
        say()
        say(f"demo: enqueueing through {self.tasks_url}{self.queue_note()}")
        self._add("plain", {"url": "/demo/plain", "payload": PAYLOAD})
        self.named = f"demo-hello-{secrets.token_hex(3)}"
        self._add("named", {"name": self.named, "url": "/demo/hello", "payload": PAYLOAD})
        batch = [{"url": f"/demo/batch?i={i}", "payload": f"batch task {i}"} for i in range(10)]
        started = time.time()
        status, body = http("POST", self.tasks_url + ":batch", {"tasks": batch})
        if status != 200 or not isinstance(body, dict):
            raise DemoError(f"batch enqueue answered {status}: {body}")
        for i, result in enumerate(body["results"]):
            if "error" in result:
                raise DemoError(f"batch task {i} was refused: {result['error']}")
            self._record(f"batch[{i}]", result["name"], started, 1)
            kind = f"batch[{i}]"
            say(f"  enqueue  {kind:<10} {result['name']:<37} -> {status} (batch)")
        self._add("countdown", {"url": "/demo/later", "payload": "3 s later", "countdown": 3},
                  note="(due in 3 s)")
        self._add("flaky", {"url": "/demo/flaky?fail=1", "payload": "fails once"}, expected=2,
                  note="(its app answers 500 once)")

    def _add(self, kind: str, task: dict[str, Any], expected: int = 1, note: str = "") -> None:
        started = time.time()
        status, body = http("POST", self.tasks_url, task)
        if status != 201 or not isinstance(body, dict):
            raise DemoError(f"enqueueing the {kind} task answered {status}: {body}")
        self._record(kind, body["name"], started, expected)
        say(f"  enqueue  {kind:<10} {body['name']:<37} -> {status} {note}".rstrip())

    def _record(self, kind: str, name: str, started: float, expected: int) -> None:
        self.enqueued[name] = started
        self.expected[name] = expected
        self.kind[name] = kind
        self.seen[name] = []

    def missing(self) -> list[str]:
        return [n for n, want in self.expected.items() if len(self.seen[n]) < want]

    def follow(self, timeout: float = ARRIVAL_TIMEOUT) -> None:
        say()
        say("demo: deliveries as they reach the app servers (through HAProxy):")
        deadline = time.monotonic() + timeout
        while self.missing():
            self.cluster.check_alive()
            fresh = [r for index in range(len(self.cluster.app_ports)) for r in self._poll(index)]
            for record in sorted(fresh, key=lambda r: r["time"]):
                self._show(record)
            if not self.missing():
                break
            if time.monotonic() > deadline:
                lines = [f"  {n} ({self.kind[n]}): {len(self.seen[n])} of "
                         f"{self.expected[n]} deliveries" for n in self.missing()]
                log = self.cluster.node.log if self.cluster.node else None
                raise DemoError(
                    f"not every task arrived within {timeout:g} s:\n" + "\n".join(lines)
                    + (f"\nLast lines of the node's log ({log}):\n{tail(log)}" if log else "")
                )
            time.sleep(POLL_INTERVAL)

    def _poll(self, index: int) -> list[dict[str, Any]]:
        """The records app server ``index`` got since the last poll."""
        url = f"{self.cluster.app_url(index)}/_sample/received?since={self.cursor[index]}"
        status, records = http("GET", url)
        if status != 200 or not isinstance(records, list):
            raise DemoError(f"GET {url} answered {status}")
        self.cursor[index] += len(records)
        return records

    def _show(self, record: dict[str, Any]) -> None:
        headers = record.get("headers", {})
        name = headers.get("x-appengine-taskname")
        if name not in self.seen:
            self.foreign += 1
            return
        self.seen[name].append(record)
        retry = int(headers.get("x-appengine-taskretrycount", "0") or 0)
        after = record["time"] - self.enqueued[name]
        outcome = ""
        if "fail=" in record.get("query", "") and retry < 1:
            outcome = "  -> 500, the node retries it"
        say(f"  arrive   {record['instance']:<5} {record['method']:<4} "
            f"{record['uri']:<18} task={name:<37} retry={retry}  +{after:.2f} s{outcome}")

    def final_state(self) -> dict[str, Any]:
        """The named task's state once the node recorded its outcome (waits up to 5 s)."""
        url = f"{self.tasks_url}/{self.named}"
        deadline = time.monotonic() + 5.0
        while True:
            status, body = http("GET", url)
            if status != 200 or not isinstance(body, dict):
                raise DemoError(f"GET {url} answered {status}: {body}")
            if body.get("state") not in ("queued", "running") or time.monotonic() > deadline:
                return body
            time.sleep(0.1)

    def report(self) -> str:
        say()
        body = self.final_state()
        say(f"demo: GET .../tasks/{self.named} -> {json.dumps(body)}")
        if body.get("state") != "completed":
            raise DemoError(f"the named task is {body.get('state')!r}, not 'completed'")
        if self.foreign:
            say(f"demo: (ignored {self.foreign} deliveries of tasks enqueued before this run)")
        deliveries = sum(len(r) for r in self.seen.values())
        retries = sum(
            1 for records in self.seen.values() for r in records
            if int(r["headers"].get("x-appengine-taskretrycount", "0") or 0) > 0
        )
        return (f"demo: {len(self.enqueued)} tasks enqueued, {deliveries} deliveries "
                f"({retries} {'retry' if retries == 1 else 'retries'}), all arrived")


def _keep_running(cluster: Cluster) -> None:
    say()
    say("demo: everything keeps running; Ctrl-C stops it. Try:")
    say(f"  curl -s -X POST {cluster.api}/v1/apps/{APP}/queues/{QUEUE}/tasks "
        "-d '{\"url\": \"/hi\", \"payload\": \"hi\"}'")
    say(f"  curl -s {cluster.app_url(0)}/_sample/by_task {cluster.app_url(1)}/_sample/by_task")
    say(f"  logs: {cluster.workdir}")
    while True:
        cluster.check_alive()
        time.sleep(1.0)


def _parse_ports(text: str) -> tuple[int, int, tuple[int, int]]:
    try:
        api, lb, a1, a2 = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("want API,LB,APP1,APP2 port numbers") from None
    return api, lb, (a1, a2)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m appscale_tq.demo",
        description="Start two sample apps, HAProxy and a node on its defaults, send a few "
        "tasks through the JSON API and watch them arrive.",
    )
    parser.add_argument("--keep-running", action="store_true",
                        help="leave everything running until Ctrl-C")
    # For developers next to a node already on the default ports: other ports, a config file
    # with its own namespace (so another node on the default queue cannot take the tasks).
    parser.add_argument("--ports", type=_parse_ports, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(list(argv))


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.ports is None:
        api_port, lb_port, app_ports, namespace = API_PORT, LB_PORT, APP_PORTS, None
    else:
        (api_port, lb_port, app_ports), namespace = args.ports, "demo-dev"
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    # Ctrl-C stops everything, even when a shell started us with SIGINT ignored (``cmd &``).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    busy = [p for p in (lb_port, *app_ports, api_port) if port_busy(p)]
    if busy:
        roles = {lb_port: "HAProxy", api_port: "the node's API"}
        roles.update({p: f"sample app {i + 1}" for i, p in enumerate(app_ports)})
        listing = ", ".join(f"{p} ({roles[p]})" for p in busy)
        say(f"demo: port{'s' if len(busy) > 1 else ''} {listing} on {HOST} "
            f"{'are' if len(busy) > 1 else 'is'} already in use. The demo needs "
            f"{', '.join(str(p) for p in (lb_port, *app_ports, api_port))} free: stop whatever "
            f"listens there (ss -ltnp shows it; an earlier demo with --keep-running?) "
            f"and run it again.")
        return 2
    try:
        find_haproxy()
    except FileNotFoundError:
        say("demo: HAProxy is not installed (apt-get install haproxy); the demo uses it as "
            "the app's load balancer.")
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="appscale-tq-demo-"))
    cluster = Cluster(workdir, api_port, lb_port, app_ports, namespace)
    code = 1
    toured = False
    try:
        say(f"demo: working directory {workdir}")
        cluster.start()
        tour = Tour(cluster)
        tour.enqueue()
        tour.follow()
        say(tour.report())
        toured = True
        if args.keep_running:
            _keep_running(cluster)
        code = 0
    except DemoError as e:
        say(f"demo: FAILED: {e}")
        code = e.code
    except (KeyboardInterrupt, _Stop):
        say("\ndemo: interrupted; stopping everything")
        code = 0 if toured else 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan a child
        try:
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if code == 0:
            shutil.rmtree(workdir, ignore_errors=True)
            say("demo: stopped everything")
        else:
            say(f"demo: stopped everything; logs kept in {workdir}")
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
