"""Integration fixtures: the real RabbitMQ, Redis and HAProxy on 127.0.0.1.

Each test run gets its own RabbitMQ vhost and Redis database; each test its own app id (so its
queues, names and keys are its own) and its own node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from appscale_tq.config import AppConfig, NodeConfig
from appscale_tq.haproxy import HAProxyProcess, free_port
from appscale_tq.sampleapp import SampleApp

RUN = uuid.uuid4().hex[:8]
RABBITMQCTL = os.environ.get("RABBITMQCTL", "rabbitmqctl")


def _ctl(*args: str) -> None:
    subprocess.run([RABBITMQCTL, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_url() -> Any:
    vhost = f"tq-test-{RUN}"
    _ctl("add_vhost", vhost)
    _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"
    _ctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def redis_url() -> Any:
    """Claims a free Redis database (1..15) for this run and empties it afterwards."""
    import redis_claim

    db = redis_claim.claim(RUN)
    yield f"redis://127.0.0.1:6379/{db}"
    redis_claim.release(db)


@pytest.fixture(scope="session")
def apps() -> Any:
    """Two sample app servers in this process, behind a real HAProxy."""
    servers, ports = [], []
    for name in ("app1", "app2"):
        resource = SampleApp(name, reactor)
        site = Site(resource)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        servers.append((resource, port))
        ports.append(port.getHost().port)
    lb = HAProxyProcess()
    workdir = tempfile.mkdtemp(prefix="tq-haproxy-")
    lb_port = free_port()
    lb.start(lb_port, [("127.0.0.1", p) for p in ports], workdir)
    yield AppServers([s[0] for s in servers], f"http://127.0.0.1:{lb_port}", lb)
    lb.stop()
    for _, port in servers:
        port.stopListening()


@attrs.define
class AppServers:
    instances: list[SampleApp]
    lb_url: str
    lb: HAProxyProcess

    def received(self, task_name: str | None = None) -> list[dict[str, Any]]:
        records = [r for app in self.instances for r in app.received]
        if task_name is not None:
            records = [r for r in records if r["headers"].get("x-appengine-taskname") == task_name]
        return sorted(records, key=lambda r: r["time"])

    def for_app(self, app: str) -> list[dict[str, Any]]:
        return [r for r in self.received() if r["path"].startswith(f"/{app}/")]


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.05)


@attrs.define
class Client:
    """The node's HTTP API, for one app."""

    base: str
    app: str
    app_servers: AppServers

    def url(self, path: str) -> str:
        return self.base + path

    def tasks_url(self, queue: str = "default") -> str:
        return self.url(f"/v1/apps/{self.app}/queues/{queue}/tasks")

    async def request(self, method: str, path: str, body: Any = None,
                      raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await treq.request(method, self.url(path), data=data, timeout=30)
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    async def enqueue(self, queue: str = "default", **task: Any) -> tuple[int, Any]:
        return await self.request("POST", f"/v1/apps/{self.app}/queues/{queue}/tasks", task)

    async def state(self, name: str, queue: str = "default") -> tuple[int, Any]:
        return await self.request("GET", f"/v1/apps/{self.app}/queues/{queue}/tasks/{name}")

    async def wait_state(self, name: str, state: str, timeout: float = 15,
                         queue: str = "default") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            code, body = await self.state(name, queue)
            if code == 200 and body["state"] == state:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"task {name} is {body}, not {state}, after {timeout} s")
            await sleep(0.1)

    def task_url(self, path: str) -> str:
        """A task URL of this test's own, so records of other tests never mix in."""
        return f"/{self.app}{path}"

    def received(self, task_name: str | None = None) -> list[dict[str, Any]]:
        mine = self.app_servers.for_app(self.app)
        if task_name is not None:
            mine = [r for r in mine if r["headers"].get("x-appengine-taskname") == task_name]
        return mine


def node_config(amqp_url: str, redis_url: str, lb_url: str, app: str, **overrides: Any
                ) -> NodeConfig:
    values: dict[str, Any] = dict(
        listen=f"tcp:{free_port()}:interface=127.0.0.1",
        amqp_url=amqp_url,
        redis_url=redis_url,
        apps={app: AppConfig(lb_url=lb_url)},
        namespace=f"tq-{RUN}",
    )
    values.update(overrides)
    return NodeConfig(**values)


def listen_port(config: NodeConfig) -> int:
    return int(config.listen.split(":")[1])


# App Engine's default queue dispatches 5/s; most tests want tasks to flow at once.
FAST_QUEUES = "queue:\n- name: default\n  rate: 500/s\n  bucket_size: 500\n"


class InProcessNode:
    """One node built by build_service, running on this test's reactor."""

    def __init__(self, config: NodeConfig) -> None:
        from appscale_tq.service import build_service

        self.config = config
        self.service = build_service(config, reactor)
        self.node = self.service.node
        self.running = False

    async def start(self, queue_yaml: str | None = FAST_QUEUES) -> None:
        self.service.startService()
        self.running = True
        await self.node.broker.service.whenConnected()
        await wait_for(lambda: self.node.broker.connected, 10, "the broker connection")
        if queue_yaml is not None:
            for app in self.config.apps:
                await self.node.tq.deploy(app, queue_yaml)
            await wait_for(lambda: all(
                self.node.broker.work_queue(app, q) in self.node.broker._consumer_tags
                for app in self.config.apps for q in self.node.registry.consumed_queues(app)
            ), 10, "consumers")

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.service.stopService()


@pytest.fixture
def app_id(request: Any) -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest_twisted.async_yield_fixture
async def node(amqp_url: str, redis_url: str, apps: AppServers, app_id: str) -> Any:
    config = node_config(amqp_url, redis_url, apps.lb_url, app_id)
    running = InProcessNode(config)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def client(node: InProcessNode, apps: AppServers, app_id: str) -> Client:
    return Client(f"http://127.0.0.1:{listen_port(node.config)}", app_id, apps)


@attrs.define
class NodeProcess:
    """A node run as its own process (``twistd -n appscale-tq --config``), to kill -9."""

    config_path: str
    port: int
    log_path: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "appscale-tq",
             "--config", self.config_path],
            stdout=log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@pytest.fixture
def node_process(amqp_url: str, redis_url: str, apps: AppServers, app_id: str) -> Any:
    """Factory of node processes sharing one config file (same app, same queues)."""
    import yaml

    made: list[NodeProcess] = []
    workdir = tempfile.mkdtemp(prefix="tq-node-")
    queue_yaml = os.path.join(workdir, "queue.yaml")
    with open(queue_yaml, "w") as f:
        f.write(FAST_QUEUES)

    def make() -> NodeProcess:
        port = free_port()
        path = os.path.join(workdir, f"node-{port}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "amqp_url": amqp_url,
                "redis_url": redis_url,
                "namespace": f"tq-{RUN}",
                "apps": {app_id: {"lb_url": apps.lb_url, "queue_yaml": queue_yaml}},
            }, f)
        proc = NodeProcess(path, port, os.path.join(workdir, f"node-{port}.log"))
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


async def wait_healthy(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            await response.content()
            if response.code == 200:
                return
        except Exception:
            pass
        await sleep(0.2)
    raise AssertionError(f"node on port {port} not healthy within {timeout} s")


# --- queue.yaml helpers (several nodes, deployments) ------------------------------------------


async def deploy_yaml(client: Client, text: str | bytes) -> tuple[int, Any]:
    """PUT an app's queue.yaml (the raw YAML body) through a node's API."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return await client.request("PUT", f"/v1/apps/{client.app}/queue.yaml", raw=raw)


def client_for(node: InProcessNode, app: str, app_servers: AppServers) -> Client:
    return Client(f"http://127.0.0.1:{listen_port(node.config)}", app, app_servers)


def consuming_now(node: InProcessNode, app: str, queue: str) -> bool:
    """The node consumes the queue: wanted, and the broker answered basic.consume."""
    broker = node.node.broker
    return (app, queue) in broker.consuming() and bool(
        broker._consumer_tags.get(broker.work_queue(app, queue)))


def in_sync(node: InProcessNode, leader: InProcessNode) -> bool:
    """The node saw the leader's deployments and consumes every queue that dispatches."""
    registry = node.node.registry
    return all(
        registry.versions.get(app, 0) >= leader.node.registry.versions.get(app, 0)
        and all(consuming_now(node, app, q) for q in registry.consumed_queues(app))
        for app in node.config.apps
    )


@pytest_twisted.async_yield_fixture
async def cluster(amqp_url: str, redis_url: str, apps: AppServers, app_id: str) -> Any:
    """Factory of in-process nodes sharing this test's app: ``await cluster(yaml, count=3)``.

    The first node deploys ``queue_yaml`` (to every app of its config); the others only see it
    through the store, as in production. ``app_configs`` replaces the config's ``apps``.
    """
    made: list[InProcessNode] = []

    async def start(queue_yaml: str | None = FAST_QUEUES, count: int = 1,
                    app_configs: dict[str, AppConfig] | None = None,
                    **overrides: Any) -> list[InProcessNode]:
        nodes: list[InProcessNode] = []
        for i in range(count):
            kw = dict(overrides)
            if app_configs is not None:
                kw["apps"] = app_configs
            running = InProcessNode(node_config(amqp_url, redis_url, apps.lb_url, app_id, **kw))
            made.append(running)
            await running.start(queue_yaml=queue_yaml if i == 0 else None)
            nodes.append(running)
        for running in nodes[1:]:
            await wait_for(lambda r=running: in_sync(r, nodes[0]), 10, "a node to see the queues")
        return nodes

    yield start
    for running in reversed(made):
        await running.stop()
