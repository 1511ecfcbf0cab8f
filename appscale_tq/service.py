"""The wiring: build_service(config, reactor) assembles a node from its edges."""

from __future__ import annotations

from typing import Any

from twisted.application import service, strports
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from appscale_tq.amqp import AMQPBroker
from appscale_tq.api import TaskQueue
from appscale_tq.config import NodeConfig
from appscale_tq.dispatch import AgentClient, Dispatcher
from appscale_tq.errors import Unavailable
from appscale_tq.registry import QueueRegistry
from appscale_tq.sdk import SDKService
from appscale_tq.sdkweb import Root, SDKResource
from appscale_tq.store import RedisStore
from appscale_tq.web import build_root
from appscale_tq.worker import Worker

log = Logger()

DRAIN_SECONDS = 10.0


class WorkerService(service.Service):
    """Consumes the dispatching queues of every app this node serves, following the queue
    registry (deployments, pauses); drains in-flight work on stop."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._deploying: Deferred[None] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.node.registry.on_change(self.sync)
        self.sync()
        self.node.registry.start()
        self._deploying = Deferred.fromCoroutine(self._deploy_files())
        self._deploying.addErrback(lambda f: log.failure("deploying queue.yaml files failed", f))

    def sync(self) -> None:
        """Consume exactly the queues that dispatch now."""
        if not self.running:
            return
        broker, registry = self.node.broker, self.node.registry
        wanted = {
            (app, queue)
            for app in self.node.config.apps
            for queue in registry.consumed_queues(app)
        }
        for app, queue in wanted:
            broker.consume(app, queue, self.node.worker.handler)
        for app, queue in broker.consuming() - wanted:
            broker.stop(app, queue)

    async def _deploy_files(self) -> None:
        """Deploy the queue.yaml files the node config names, retrying while Redis is away."""
        for app, conf in self.node.config.apps.items():
            if not conf.queue_yaml:
                continue
            with open(conf.queue_yaml, encoding="utf-8") as f:
                text = f.read()
            while self.running:
                try:
                    await self.node.tq.deploy(app, text)
                    break
                except Unavailable as e:
                    log.warn("waiting to deploy {path}: {e}", path=conf.queue_yaml, e=str(e))
                    await deferLater(self.node.reactor, 2.0, lambda: None)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        self.node.registry.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.node.broker.stop_consuming()
        await self.node.worker.drain(DRAIN_SECONDS)


class StoreService(service.Service):
    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return Deferred.fromCoroutine(self.store.disconnect())


class Node:
    """All parts of one node, reachable for tests and the operations endpoints."""

    def __init__(self, config: NodeConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        redis = config.redis
        self.store = RedisStore.connect(
            redis.host,
            redis.port,
            redis.db,
            redis.password,
            reactor,
            namespace=config.namespace,
            timeout=config.redis_timeout,
            tombstone_seconds=config.tombstone_seconds,
        )
        self.broker = AMQPBroker(
            reactor,
            config.amqp_url,
            namespace=config.namespace,
            prefetch=config.prefetch,
            timeout=config.amqp_timeout,
        )
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = config.prefetch
        self.http = AgentClient(Agent(reactor, pool=pool))
        self.pool = pool
        self.registry = QueueRegistry(
            reactor, self.store, config.apps, poll_seconds=config.queue_poll_seconds,
            max_rate=config.max_queue_rate,
        )
        self.dispatcher = Dispatcher(
            self.http, reactor, {app: a.lb_url for app, a in config.apps.items()},
            base_url=lambda task: self.registry.lb_url(task.app, task.queue),
        )
        self.worker = Worker(
            reactor,
            self.broker,
            self.store,
            self.dispatcher,
            short_wait=config.short_wait_seconds,
            queue_options=self.registry.retry_options,
            registry=self.registry,
        )
        self.tq = TaskQueue(reactor, config, self.store, self.broker, registry=self.registry)
        self.api = build_root(self.tq, self.health, config.secret)
        self.sdk = SDKService(self.tq, reactor)
        self.root = Root(self.api, SDKResource(
            self.sdk, config.apps, secret=config.secret, trust_appdata=config.trust_appdata))

    async def health(self) -> dict[str, str]:
        checks = {"rabbitmq": "ok" if self.broker.connected else "not connected"}
        try:
            await self.store.ping()
            checks["redis"] = "ok"
        except Unavailable as e:
            checks["redis"] = e.why
        return checks


class PoolService(service.Service):
    def __init__(self, pool: HTTPConnectionPool) -> None:
        self.pool = pool

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return self.pool.closeCachedConnections()


def build_service(config: NodeConfig, reactor: Any) -> service.MultiService:
    """A MultiService running one node; children stop in reverse order of adding."""
    node = Node(config, reactor)
    top = service.MultiService()
    top.node = node  # type: ignore[attr-defined]
    StoreService(node.store).setServiceParent(top)
    PoolService(node.pool).setServiceParent(top)
    node.broker.service.setServiceParent(top)
    WorkerService(node).setServiceParent(top)
    site = Site(node.root)
    if not config.access_log:
        site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    web = strports.service(config.listen, site)
    web.setServiceParent(top)
    for app, conf in config.apps.items():
        if conf.sdk_listen:
            sdk_site = Site(SDKResource(node.sdk, config.apps, app=app))
            sdk_site.noisy = False
            strports.service(conf.sdk_listen, sdk_site).setServiceParent(top)
    log.info("appscale-tq node: API on {listen}, apps {apps}", listen=config.listen,
             apps=", ".join(sorted(config.apps)))
    return top
