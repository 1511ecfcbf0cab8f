"""The wiring: build_service(config, reactor) assembles a node from its edges."""

from __future__ import annotations

from typing import Any

from twisted.application import service, strports
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from appscale_tq.amqp import AMQPBroker
from appscale_tq.api import TaskQueue
from appscale_tq.config import NodeConfig
from appscale_tq.dispatch import Dispatcher
from appscale_tq.errors import Unavailable
from appscale_tq.store import RedisStore
from appscale_tq.web import build_root
from appscale_tq.worker import Worker

log = Logger()

DRAIN_SECONDS = 10.0


class WorkerService(service.Service):
    """Consumes every queue of every app this node serves; drains in-flight work on stop."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def startService(self) -> None:  # noqa: N802
        super().startService()
        for app in self.node.config.apps:
            for queue in self.node.tq.queues(app):
                self.node.broker.consume(app, queue, self.node.worker.handler)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
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
        from treq.client import HTTPClient

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
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.pool = pool
        self.dispatcher = Dispatcher(
            self.http, reactor, {app: a.lb_url for app, a in config.apps.items()}
        )
        self.worker = Worker(
            reactor,
            self.broker,
            self.store,
            self.dispatcher,
            short_wait=config.short_wait_seconds,
        )
        self.tq = TaskQueue(reactor, config, self.store, self.broker)
        self.root = build_root(self.tq, self.health, config.secret)

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
    site.noisy = False
    web = strports.service(config.listen, site)
    web.setServiceParent(top)
    log.info("appscale-tq node: API on {listen}, apps {apps}", listen=config.listen,
             apps=", ".join(sorted(config.apps)))
    return top
