"""End-to-end benchmark of one appscale-tq node: enqueue through the API, time the deliveries.

    python bench/e2e.py [-n 10000] [--clients 32] [--batch 1] [--fail-first P] [--rate R]
                        [--prefetch N] [--queues N] [--queue-rate R] [--timeout S] [--py-spy FILE]
                        [--json FILE] [--csv FILE] [--keep]

A benchmark, not a test: it starts everything it measures and stops it again (also on Ctrl-C):

- two sample app servers (``python -m appscale_tq.sampleapp --quiet``) on free ports,
- HAProxy on a free port in front of them,
- a node, ``twistd -n --pidfile= appscale-tq --config <generated>``: API on a free port, its own
  namespace ``bench-<random>`` (own AMQP queues, own Redis keys) and its own app id mapped to
  that HAProxy. RabbitMQ and Redis are the local ones of the default config. Its queue.yaml
  (deployed through the API) gives the queue a rate of ``--queue-rate`` (default 100000/s, i.e.
  no throttling: the bench measures the node, not App Engine's 5/s default bucket).

At the end the run's AMQP queues and exchanges and its Redis keys are deleted (``--keep`` keeps
them and the logs).

``--clients`` concurrent clients (Twisted + treq, one request in flight each) enqueue N tasks
through ``POST /v1/apps/<app>/queues/default/tasks`` (or ``tasks:batch`` with ``--batch``). Each
task's URL carries its enqueue time and index (``/bench?t=<time.time()>&i=<i>``), so the sample
apps' records give each task's latency; ``--fail-first P`` makes P % of the tasks fail once
(``&fail=1``, with a 0.1-0.5 s backoff) and ``--rate R`` paces the enqueue at R tasks/s.

Figures: enqueue rate (accepted tasks / enqueue phase), end-to-end rate (first enqueue to the
last first delivery), latency p50/p99 (enqueue to first delivery), duplicates (deliveries beyond
1, or 2 for a fail-first task), lost (tasks short of their deliveries at the timeout), retries
seen, and the node's peak RSS (VmHWM) and CPU time. The exit status is 1 if a task was lost or
refused, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from appscale_tq.config import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from appscale_tq.haproxy import HAProxyProcess, free_port

HOST = "127.0.0.1"
QUEUE = "default"


def queue_names(count: int) -> list[str]:
    """The bench's queues: ``default`` and, with --queues N, q1 .. q(N-1)."""
    return [QUEUE] + [f"q{k}" for k in range(1, count)]
START_TIMEOUT = 15.0
STOP_TIMEOUT = 20.0
POLL_INTERVAL = 0.5
FAIL_RETRY_OPTIONS = {"min_backoff_seconds": 0.1, "max_backoff_seconds": 0.5}
TOMBSTONE_SECONDS = 600  # the run's Redis records expire by themselves soon after


def say(line: str = "") -> None:
    print(line, flush=True)


# --- processes (synchronous; before and after the reactor runs) ------------------------------
class Child:
    def __init__(self, label: str, argv: Sequence[str], log: Path) -> None:
        self.label = label
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=log.parent,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops them in order
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"bench: {self.label} (pid {self.pid}) did not stop; killing it")
                self.process.kill()
                self.process.wait()

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _wait_port(child: Child, port: int) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.3):
                return
        except OSError:
            pass
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{child.label} did not listen on {port}:\n{child.tail()}")
        time.sleep(0.05)


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


class Rig:
    """The sample apps, HAProxy and the node of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="tq-bench-"))
        suffix = secrets.token_hex(4)
        self.namespace = f"bench-{suffix}"
        self.app = f"bench-{suffix}"
        self.apps: list[Child] = []
        self.app_ports: list[int] = []
        self.lb = HAProxyProcess()
        self.node: Child | None = None
        self.api_port = 0
        self.spy: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def start(self) -> None:
        for k in (1, 2):
            port = free_port()
            child = Child(f"sample app {k}", [
                sys.executable, "-m", "appscale_tq.sampleapp", "--port", str(port),
                "--name", f"app{k}", "--interface", HOST, "--quiet",
            ], self.workdir / f"app{k}.log")
            self.apps.append(child)
            self.app_ports.append(port)
            _wait_port(child, port)
        lb_port = free_port()
        self.lb.start(lb_port, [(HOST, p) for p in self.app_ports], self.workdir / "haproxy")
        self.api_port = free_port()
        config = self.workdir / "node.yaml"
        lines = [
            f"listen: 'tcp:{self.api_port}:interface={HOST}'",
            f"amqp_url: '{self.args.amqp_url}'",
            f"redis_url: '{self.args.redis_url}'",
            f"namespace: '{self.namespace}'",
            f"tombstone_seconds: {TOMBSTONE_SECONDS}",
            "apps:",
            f"  '{self.app}':",
            f"    lb_url: 'http://{HOST}:{lb_port}'",
        ]
        if self.args.prefetch is not None:
            lines.append(f"prefetch: {self.args.prefetch}")
        if self.args.queue_rate > 500:  # App Engine's cap, the node's default max_queue_rate
            lines.append(f"max_queue_rate: {self.args.queue_rate:g}")
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        twistd = str(Path(sys.executable).parent / "twistd")
        self.node = Child("the node", [twistd, "-n", "--pidfile=", "appscale-tq",
                                       "--config", str(config)], self.workdir / "node.log")
        deadline = time.monotonic() + START_TIMEOUT
        last: Any = "no answer"
        while True:
            try:
                status, body = _get_json(f"{self.api}/healthz")
                if status == 200:
                    break
                last = (status, body)
            except OSError as e:
                last = e
            if not self.node.alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the node did not become healthy (last /healthz: {last}); RabbitMQ and "
                    f"Redis running?\n{self.node.tail()}"
                )
            time.sleep(0.2)
        self.deploy_queue_yaml()
        say(f"bench: node pid {self.node.pid}, API {self.api}, app {self.app!r}, "
            f"namespace {self.namespace!r}, LB :{lb_port} -> {self.app_ports}, "
            f"workdir {self.workdir}")

    def deploy_queue_yaml(self) -> None:
        """The bench queue's rate: high by default, so the benchmark measures the node, not
        the queue's token bucket (App Engine's default queue is 5/s)."""
        text = "queue:\n" + "".join(
            f"- name: {name}\n"
            f"  rate: {self.args.queue_rate:g}/s\n"
            f"  bucket_size: {self.args.bucket_size}\n"
            for name in queue_names(self.args.queues)
        )
        request = urllib.request.Request(
            f"{self.api}/v1/apps/{self.app}/queue.yaml", data=text.encode(), method="PUT",
            headers={"Content-Type": "application/yaml"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"deploying queue.yaml answered {e.code}: {e.read()[:500]!r}")
        self.queue_yaml = text

    def start_spy(self, output: str) -> None:
        assert self.node is not None
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(output).suffix, "raw")
        spy = Path(sys.executable).parent / "py-spy"
        self.spy = subprocess.Popen(
            [str(spy), "record", "--nonblocking", "-o", output, "-f", fmt,
             "--pid", str(self.node.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "py-spy.log", "wb"), start_new_session=True,
        )

    def stop_spy(self) -> None:
        if self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
        self.spy = None

    def node_stats(self) -> dict[str, float]:
        """The node's peak RSS (VmHWM, bytes) and CPU seconds so far."""
        stats: dict[str, float] = {}
        if self.node is None or not self.node.alive():
            return stats
        pid = self.node.pid
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    stats[key] = float(value.split()[0]) * 1024
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            stats["cpu"] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
        return stats

    def stop(self) -> None:
        self.stop_spy()
        if self.node is not None:
            self.node.stop()
        self.lb.stop()
        for child in self.apps:
            child.stop()

    def delete_redis_keys(self) -> None:
        """Remove the run's Redis keys (task records expire anyway; queue metadata would not)."""
        try:
            delete_redis_keys(self.args.redis_url, f"{self.namespace}:*")
        except (OSError, RuntimeError, ValueError) as e:
            say(f"bench: could not clean up Redis keys {self.namespace}:*: {e}")

    def delete_broker_objects(self) -> None:
        """Remove the run's queues and exchanges."""
        import pika

        levels = 22
        queues = [f"{self.namespace}.q.{self.app}.{q}" for q in queue_names(self.args.queues)]
        queues += [f"{self.namespace}.delay.{k}" for k in range(levels)]
        exchanges = [f"{self.namespace}.delay.{k}" for k in range(levels)]
        exchanges.append(f"{self.namespace}.arrive")
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.args.amqp_url))
        except Exception as e:
            say(f"bench: could not clean up RabbitMQ objects {self.namespace}.*: {e!r}")
            return
        try:
            for name in queues:
                channel = connection.channel()
                try:
                    channel.queue_delete(queue=name)
                    channel.close()
                except Exception:
                    pass
            for name in exchanges:
                channel = connection.channel()
                try:
                    channel.exchange_delete(exchange=name)
                    channel.close()
                except Exception:
                    pass
        finally:
            connection.close()


def delete_redis_keys(url: str, pattern: str) -> int:
    """SCAN + DEL every key matching ``pattern``: a few lines of RESP over a plain socket."""
    import socket

    from appscale_tq.config import parse_redis_url

    address = parse_redis_url(url)
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def command(*parts: str | bytes) -> Any:
            out = [b"*%d\r\n" % len(parts)]
            for part in parts:
                data = part.encode() if isinstance(part, str) else part
                out.append(b"$%d\r\n%s\r\n" % (len(data), data))
            sock.sendall(b"".join(out))
            return reply()

        def reply() -> Any:
            line = reader.readline().rstrip(b"\r\n")
            kind, rest = line[:1], line[1:]
            if kind in (b"+", b":"):
                return int(rest) if kind == b":" else rest
            if kind == b"-":
                raise RuntimeError(rest.decode("utf-8", "replace"))
            if kind == b"$":
                size = int(rest)
                return None if size < 0 else reader.read(size + 2)[:-2]
            if kind == b"*":
                return [reply() for _ in range(int(rest))]
            raise RuntimeError(f"unexpected Redis reply {line[:40]!r}")

        if address.password:
            command("AUTH", address.password)
        command("SELECT", str(address.db))
        cursor, deleted = b"0", 0
        while True:
            cursor, keys = command("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            if keys:
                deleted += command("DEL", *keys)
            if cursor == b"0":
                return deleted


# --- the load (inside the reactor) -------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace, rig: Rig) -> None:
        self.args = args
        self.rig = rig
        n = args.n
        n_fail = round(n * args.fail_first / 100.0)
        self.failing = set(random.Random(n).sample(range(n), n_fail))
        self.next = 0
        self.accepted: set[int] = set()
        self.refused: dict[str, int] = {}
        self.t_start = 0.0
        self.t_enqueued = 0.0
        self.first: dict[int, float] = {}  # index -> time of first delivery
        self.success: dict[int, float] = {}  # fail-first index -> time of its 2nd delivery
        self.sent: dict[int, float] = {}  # index -> enqueue time (from the URL)
        self.count: dict[int, int] = {}
        self.retries = 0
        self.deliveries = 0
        self.foreign = 0
        self.cursors = [0, 0]

    def task(self, i: int, now: float) -> dict[str, Any]:
        url = f"/bench?t={now:.6f}&i={i}"
        if i in self.failing:
            return {"url": url + "&fail=1", "retry_options": FAIL_RETRY_OPTIONS}
        return {"url": url}

    def expected(self, i: int) -> int:
        return 2 if i in self.failing else 1

    def refuse(self, why: str, k: int = 1) -> None:
        self.refused[why] = self.refused.get(why, 0) + k

    async def client(self, http: Any, tasks_url: str) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        args = self.args
        while self.next < args.n:
            start = self.next
            count = min(args.batch, args.n - start)
            self.next += count
            if args.rate:
                due = self.t_start + start / args.rate
                wait = due - time.time()
                if wait > 0:
                    await deferLater(reactor, wait, lambda: None)
            now = time.time()
            single = args.batch == 1
            if single:
                body = self.task(start, now)
                url = tasks_url
            else:
                body = {"tasks": [self.task(i, now) for i in range(start, start + count)]}
                url = tasks_url + ":batch"
            try:
                response = await http.post(
                    url, data=json.dumps(body).encode(),
                    headers={b"Content-Type": [b"application/json"]},
                )
                content = await response.content()
            except Exception as e:
                self.refuse(f"connection: {e.__class__.__name__}", count)
                continue
            if single:
                if response.code == 201:
                    self.accepted.add(start)
                else:
                    self.refuse(f"HTTP {response.code}: {content[:120]!r}")
                continue
            if response.code != 200:
                self.refuse(f"batch HTTP {response.code}: {content[:120]!r}", count)
                continue
            for offset, result in enumerate(json.loads(content)["results"]):
                if "error" in result:
                    self.refuse(result["error"].get("code", "?"))
                else:
                    self.accepted.add(start + offset)

    async def enqueue(self) -> None:
        from treq.client import HTTPClient
        from twisted.internet import reactor
        from twisted.internet.defer import DeferredList, ensureDeferred
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = self.args.clients
        http = HTTPClient(Agent(reactor, pool=pool))
        names = queue_names(self.args.queues)
        self.t_start = time.time()
        # client k enqueues into queue k mod --queues
        clients = [
            ensureDeferred(self.client(
                http, f"{self.rig.api}/v1/apps/{self.rig.app}/queues/{names[k % len(names)]}/tasks"))
            for k in range(self.args.clients)
        ]
        results = await DeferredList(clients, consumeErrors=True)
        self.t_enqueued = time.time()
        await pool.closeCachedConnections()
        for ok, failure in results:
            if not ok:
                raise RuntimeError(f"a client crashed: {failure.getTraceback()}")

    def missing(self) -> int:
        return sum(1 for i in self.accepted if self.count.get(i, 0) < self.expected(i))

    async def poll(self, http: Any) -> None:
        for k, port in enumerate(self.rig.app_ports):
            url = f"http://{HOST}:{port}/_sample/received?since={self.cursors[k]}"
            response = await http.get(url)
            records = json.loads(await response.content())
            self.cursors[k] += len(records)
            for record in records:
                self.take(record)

    def take(self, record: dict[str, Any]) -> None:
        query = dict(parse_qsl(record.get("query", "")))
        if urlsplit(record.get("uri", "")).path != "/bench" or "i" not in query:
            self.foreign += 1
            return
        i = int(query["i"])
        self.deliveries += 1
        retry = int(record["headers"].get("x-appengine-taskretrycount", "0") or 0)
        if retry:
            self.retries += 1
        n = self.count.get(i, 0) + 1
        self.count[i] = n
        when = float(record["time"])
        if i not in self.first or when < self.first[i]:
            self.first[i] = when
            self.sent[i] = float(query["t"])
        if i in self.failing and retry >= 1:
            self.success[i] = min(self.success.get(i, math.inf), when)

    async def wait_deliveries(self) -> bool:
        from treq.client import HTTPClient
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)
        http = HTTPClient(Agent(reactor, pool=pool))
        deadline = time.monotonic() + self.args.timeout
        try:
            while True:
                await self.poll(http)
                if not self.missing():
                    # a moment more, to see late duplicates (redeliveries)
                    await deferLater(reactor, self.args.settle, lambda: None)
                    await self.poll(http)
                    return True
                if time.monotonic() > deadline:
                    return False
                if self.rig.node is not None and not self.rig.node.alive():
                    raise RuntimeError(f"the node died:\n{self.rig.node.tail()}")
                await deferLater(reactor, POLL_INTERVAL, lambda: None)
        finally:
            await pool.closeCachedConnections()

    async def run(self) -> dict[str, Any]:
        say(f"bench: enqueueing {self.args.n} tasks with {self.args.clients} clients"
            f" (batch {self.args.batch}, rate {self.args.rate or 'unpaced'}"
            f", fail-first {self.args.fail_first:g} %)")
        cpu0 = self.rig.node_stats().get("cpu", 0.0)
        wall0 = time.time()
        if self.args.py_spy:
            self.rig.start_spy(self.args.py_spy)
        await self.enqueue()
        say(f"bench: enqueue phase done in {self.t_enqueued - self.t_start:.2f} s; "
            "waiting for the deliveries")
        complete = await self.wait_deliveries()
        self.rig.stop_spy()
        stats = self.rig.node_stats()
        stats["cpu_run"] = stats.get("cpu", 0.0) - cpu0
        stats["wall_run"] = time.time() - wall0
        return self.figures(complete, stats)

    def write_csv(self, path: str) -> None:
        """One row per accepted task: index, enqueue time, first delivery, deliveries."""
        with open(path, "w", encoding="utf-8") as out:
            out.write("i,fail_first,enqueued,first_delivery,success,deliveries\n")
            for i in sorted(self.accepted):
                first = self.first.get(i)
                out.write(f"{i},{int(i in self.failing)},{self.sent.get(i, '')},"
                          f"{'' if first is None else first},{self.success.get(i, '')},"
                          f"{self.count.get(i, 0)}\n")

    def figures(self, complete: bool, node: dict[str, float]) -> dict[str, Any]:
        accepted = len(self.accepted)
        lat = sorted((self.first[i] - self.sent[i]) * 1000 for i in self.accepted
                     if i in self.first)
        ok_lat = sorted((self.success[i] - self.sent[i]) * 1000 for i in self.accepted
                        if i in self.success)
        last_first = max((self.first[i] for i in self.accepted if i in self.first), default=0.0)
        duplicates = sum(1 for i in self.accepted if self.count.get(i, 0) > self.expected(i))
        extra = sum(max(0, self.count.get(i, 0) - self.expected(i)) for i in self.accepted)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        enqueue_s = self.t_enqueued - self.t_start
        e2e_s = last_first - self.t_start if last_first else math.nan
        return {
            "tasks": self.args.n,
            "accepted": accepted,
            "refused": dict(self.refused),
            "clients": self.args.clients,
            "batch": self.args.batch,
            "rate": self.args.rate,
            "prefetch": self.args.prefetch,
            "queue_rate": self.args.queue_rate,
            "queues": self.args.queues,
            "bucket_size": self.args.bucket_size,
            "fail_first_tasks": len(self.failing & self.accepted),
            "enqueue_seconds": enqueue_s,
            "enqueue_rate": accepted / enqueue_s if enqueue_s > 0 else math.nan,
            "e2e_seconds": e2e_s,
            "e2e_rate": len(lat) / e2e_s if e2e_s and e2e_s > 0 else math.nan,
            "latency_ms": _percentiles(lat),
            "fail_first_success_latency_ms": _percentiles(ok_lat) if ok_lat else None,
            "deliveries": self.deliveries,
            "duplicates": duplicates,
            "extra_deliveries": extra,
            "lost": self.missing(),
            "never_delivered": sum(1 for i in self.accepted if i not in self.first),
            "complete": complete,
            "retries_seen": self.retries,
            "foreign_deliveries": self.foreign,
            "node_peak_rss_bytes": node.get("VmHWM"),
            "node_cpu_seconds": node.get("cpu_run"),
            "node_cpu_share": node.get("cpu_run", 0) / node["wall_run"] if node.get(
                "wall_run") else None,
            "bench_cpu_seconds": usage.ru_utime + usage.ru_stime,
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan}

    def at(q: float) -> float:
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    return {"p50": at(0.50), "p99": at(0.99), "max": values[-1]}


def table(f: dict[str, Any]) -> str:
    lat = f["latency_ms"]
    refused = sum(f["refused"].values())
    rows = [
        ("tasks", f"{f['tasks']} (accepted {f['accepted']}, refused {refused})"),
        ("clients / batch / rate", f"{f['clients']} / {f['batch']} / "
         f"{f['rate'] or 'unpaced'}" + (f" tasks/s" if f["rate"] else "")),
        ("node prefetch", "config default" if f["prefetch"] is None else str(f["prefetch"])),
        ("queues x rate / bucket",
         f"{f['queues']} x {f['queue_rate']:g}/s / {f['bucket_size']}"),
        ("fail-first tasks", f"{f['fail_first_tasks']}"),
        ("enqueue rate", f"{f['enqueue_rate']:.0f} tasks/s ({f['enqueue_seconds']:.2f} s)"),
        ("end-to-end", f"{f['e2e_rate']:.0f} tasks/s (first enqueue -> last first delivery, "
         f"{f['e2e_seconds']:.2f} s)"),
        ("latency p50 / p99 / max", f"{lat['p50']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f} ms"
         " (enqueue -> first delivery)"),
    ]
    if f["fail_first_success_latency_ms"]:
        ok = f["fail_first_success_latency_ms"]
        rows.append(("fail-first to success", f"{ok['p50']:.0f} / {ok['p99']:.0f} / "
                     f"{ok['max']:.0f} ms (p50 / p99 / max, enqueue -> 2nd delivery)"))
    rows += [
        ("deliveries", str(f["deliveries"])),
        ("duplicates", f"{f['duplicates']} tasks ({f['extra_deliveries']} extra deliveries)"),
        ("lost", f"{f['lost']}" + (f" ({f['never_delivered']} never delivered)"
                                   if f["lost"] else "")),
        ("retries seen", str(f["retries_seen"])),
    ]
    rss = f["node_peak_rss_bytes"]
    rows.append(("node peak RSS (VmHWM)", "?" if rss is None else f"{rss / 2**20:.1f} MiB"))
    if f["node_cpu_seconds"] is not None:
        rows.append(("node CPU", f"{f['node_cpu_seconds']:.1f} s "
                     f"({100 * (f['node_cpu_share'] or 0):.0f} % of one core over the run)"))
    rows.append(("bench client CPU", f"{f['bench_cpu_seconds']:.1f} s"))
    if refused:
        rows.append(("refused by", ", ".join(f"{k}: {v}" for k, v in f["refused"].items())))
    if f["foreign_deliveries"]:
        rows.append(("foreign deliveries", str(f["foreign_deliveries"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/e2e.py", description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=10_000, help="tasks to enqueue (default 10000)")
    p.add_argument("--clients", type=int, default=32, help="concurrent API clients (32)")
    p.add_argument("--batch", type=int, default=1,
                   help="tasks per request; >1 uses tasks:batch (max 100; default 1)")
    p.add_argument("--fail-first", type=float, default=0.0, metavar="P",
                   help="percent of tasks whose first attempt fails (default 0)")
    p.add_argument("--rate", type=float, default=None, metavar="R",
                   help="pace the enqueue at R tasks/s (default: as fast as possible)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="the node's prefetch (default: the config default)")
    p.add_argument("--queue-rate", type=float, default=100_000.0, metavar="R",
                   help="the bench queue's rate in queue.yaml, tasks/s (default 100000: no "
                   "throttling; App Engine's maximum is 500)")
    p.add_argument("--queues", type=int, default=1,
                   help="spread the tasks over this many queues, each with --queue-rate (1)")
    p.add_argument("--bucket-size", type=int, default=500,
                   help="the bench queue's bucket_size in queue.yaml (default 500, the maximum)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds after the enqueue phase before missing tasks count as lost")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to keep watching for duplicates once all arrived (1)")
    p.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--py-spy", metavar="FILE", default=None,
                   help="profile the node with py-spy during the run (.svg flamegraph, "
                   ".json speedscope, anything else raw collapsed stacks)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures here")
    p.add_argument("--csv", metavar="FILE", default=None,
                   help="also write one row per task (enqueue and delivery times) here")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (logs), the run's RabbitMQ queues and its "
                   "Redis keys")
    args = p.parse_args(list(argv))
    if args.n < 1 or args.clients < 1 or not 1 <= args.batch <= 100:
        p.error("-n and --clients must be >= 1, --batch in 1..100")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    if args.queue_rate <= 0 or not 1 <= args.bucket_size <= 500:
        p.error("--queue-rate must be > 0, --bucket-size in 1..500")
    if not 0 <= args.fail_first <= 100:
        p.error("--fail-first must be a percentage")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    # Ctrl-C must work even when a shell started us with SIGINT ignored (``cmd &``); the
    # reactor then turns SIGINT/SIGTERM into a clean stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rig = Rig(args)
    outcome: dict[str, Any] = {}
    try:
        rig.start()
        from twisted.internet import reactor
        from twisted.internet.defer import ensureDeferred

        def finished(result: Any) -> None:
            outcome["result"] = result
            reactor.stop()

        run = Run(args, rig)
        reactor.callWhenRunning(lambda: ensureDeferred(run.run()).addBoth(finished))
        reactor.run()
        result = outcome.get("result")
        if result is None:
            say("bench: interrupted")
            return 130
        if not isinstance(result, dict):
            result.printTraceback()
            return 1
        say()
        say("appscale-tq end-to-end benchmark")
        say(table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.csv:
            run.write_csv(args.csv)
        if args.py_spy:
            say(f"bench: py-spy profile of the node in {args.py_spy}")
        return 0 if result["lost"] == 0 and not result["refused"] else 1
    except KeyboardInterrupt:
        say("bench: interrupted")
        return 130
    except RuntimeError as e:
        say(f"bench: FAILED: {e}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan a child
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rig.stop()
        if args.keep:
            say(f"bench: kept {rig.workdir}, RabbitMQ objects {rig.namespace}.* and Redis keys "
                f"{rig.namespace}:*")
        else:
            rig.delete_broker_objects()
            rig.delete_redis_keys()
            import shutil

            shutil.rmtree(rig.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
