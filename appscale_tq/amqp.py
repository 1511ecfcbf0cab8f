"""RabbitMQ through pika's Twisted adapter: the only module that imports pika.

Topology (names start with the namespace, ``tq`` by default):
- one durable work queue per (app, queue): ``tq.q.<app>.<queue>``;
- a ladder of delay levels k = 21..0: a topic exchange ``tq.delay.k`` and a durable queue of the
  same name whose queue-level TTL is 2^k seconds and whose dead-letter exchange is the next
  level down (after level 0: ``tq.arrive``). A delayed message's routing key is its delay in
  binary, one word per level, most significant first. Level k's exchange sends a message whose
  bit k is 1 into its queue (to wait 2^k s) and one whose bit is 0 straight on to the next
  level. Dead-lettering keeps the routing key, so no consumer takes part until the end;
- ``tq.arrive``, a headers exchange, routes on the ``tq-dest`` header to the work queue.
Every queue and message is durable/persistent; every publish waits for the broker's confirm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from appscale_tq.errors import Unavailable
from appscale_tq.interfaces import IBroker
from appscale_tq.tasks import Task, task_to_headers

log = Logger()

LEVELS = 22  # 2^22 s > 48 days: more than the 30-day ETA limit
MAX_DELAY = 2**LEVELS - 1


def delay_routing_key(seconds: int) -> str:
    seconds = max(0, min(int(seconds), MAX_DELAY))
    return ".".join("1" if seconds >> k & 1 else "0" for k in range(LEVELS - 1, -1, -1))


def level_pattern(k: int, bit: str) -> str:
    return ".".join(["*"] * (LEVELS - 1 - k) + [bit, "#"])


@attrs.frozen
class Delivery:
    """One delivered task message; ack goes only to the channel that delivered it."""

    headers: dict[str, Any]
    body: bytes
    redelivered: bool
    _channel: Any
    _tag: int

    def ack(self) -> bool:
        if self._channel.is_open:
            self._channel.basic_ack(self._tag)
            return True
        return False  # the channel is gone: the broker redelivers the message

    def requeue(self) -> bool:
        if self._channel.is_open:
            self._channel.basic_nack(self._tag, requeue=True)
            return True
        return False


Handler = Callable[[Delivery], Awaitable[None] | Deferred[None]]


class _ConnectionFactory(protocol.Factory):
    def __init__(self, parameters: pika.ConnectionParameters) -> None:
        self.parameters = parameters

    def buildProtocol(self, addr: Any) -> TwistedProtocolConnection:  # noqa: N802
        proto = TwistedProtocolConnection(self.parameters)
        proto.factory = self
        return proto


@implementer(IBroker)
class AMQPBroker:
    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        namespace: str = "tq",
        prefetch: int = 64,
        timeout: float = 4.0,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._ns = namespace
        self._prefetch = prefetch
        self._timeout = timeout
        params = pika.URLParameters(url)
        parts = urlsplit(url)
        endpoint = HostnameEndpoint(
            reactor, parts.hostname or "127.0.0.1", parts.port or 5672, timeout=timeout
        )
        self.service = ClientService(
            endpoint,
            _ConnectionFactory(params),
            retryPolicy=backoffPolicy(initialDelay=0.5, factor=1.5, maxDelay=5.0),
            clock=reactor,
            prepareConnection=self._prepare,
        )
        self._consumers: dict[str, tuple[Handler, str, str]] = {}
        self._pub: Any = None
        self._con: Any = None
        self._proto: Any = None
        self._consumer_tags: dict[str, str] = {}

    # --- names -------------------------------------------------------------------------------
    def work_queue(self, app: str, queue: str) -> str:
        return f"{self._ns}.q.{app}.{queue}"

    def _delay_name(self, k: int) -> str:
        return f"{self._ns}.delay.{k}"

    @property
    def _arrive(self) -> str:
        return f"{self._ns}.arrive"

    @property
    def connected(self) -> bool:
        return self._pub is not None and self._pub.is_open

    # --- connection --------------------------------------------------------------------------
    def _prepare(self, proto: TwistedProtocolConnection) -> Deferred[None]:
        return Deferred.fromCoroutine(self._prepare_async(proto))

    async def _prepare_async(self, proto: TwistedProtocolConnection) -> None:
        await proto.ready
        pub = await proto.channel()
        await pub.confirm_delivery()
        con = await proto.channel()
        await con.basic_qos(prefetch_count=self._prefetch)
        await self._declare_topology(pub)
        for wq in list(self._consumers):
            await self._declare_work_queue(pub, wq)
        self._proto, self._pub, self._con = proto, pub, con
        self._consumer_tags = {}
        for channel in (pub, con):
            channel.on_closed.addBoth(self._channel_closed, proto)
        for wq in list(self._consumers):
            await self._start_consumer(con, wq)
        log.info("connected to RabbitMQ; consuming {count} queue(s)", count=len(self._consumers))

    def _channel_closed(self, reason: Any, proto: TwistedProtocolConnection) -> None:
        if proto is self._proto:
            self._pub = self._con = self._proto = None
            log.warn("AMQP channel closed ({reason}); reconnecting", reason=reason)
            if proto.transport is not None:
                proto.transport.loseConnection()

    async def _declare_topology(self, ch: Any) -> None:
        await ch.exchange_declare(exchange=self._arrive, exchange_type="headers", durable=True)
        for k in range(LEVELS):
            name = self._delay_name(k)
            onward = self._delay_name(k - 1) if k else self._arrive
            await ch.exchange_declare(exchange=name, exchange_type="topic", durable=True)
            await ch.queue_declare(
                queue=name,
                durable=True,
                arguments={
                    "x-message-ttl": (2**k) * 1000,
                    "x-dead-letter-exchange": onward,
                    "x-queue-mode": "lazy",
                },
            )
            await ch.queue_bind(queue=name, exchange=name, routing_key=level_pattern(k, "1"))
        for k in range(LEVELS):
            onward = self._delay_name(k - 1) if k else self._arrive
            await ch.exchange_bind(
                destination=onward, source=self._delay_name(k), routing_key=level_pattern(k, "0")
            )

    async def _declare_work_queue(self, ch: Any, wq: str) -> None:
        await ch.queue_declare(queue=wq, durable=True)
        await ch.queue_bind(
            queue=wq, exchange=self._arrive, arguments={"x-match": "all", "tq-dest": wq}
        )

    async def _start_consumer(self, con: Any, wq: str) -> None:
        if wq not in self._consumers or wq in self._consumer_tags:
            return
        handler = self._consumers[wq][0]
        self._consumer_tags[wq] = ""  # being started
        try:
            queue_obj, tag = await con.basic_consume(queue=wq, auto_ack=False)
        except Exception:
            self._consumer_tags.pop(wq, None)
            raise
        if wq not in self._consumers:  # stopped while starting
            self._consumer_tags.pop(wq, None)
            await con.basic_cancel(tag)
            return
        self._consumer_tags[wq] = tag
        Deferred.fromCoroutine(self._consume_loop(queue_obj, handler)).addErrback(
            lambda f: log.failure("consumer loop of {wq} crashed", f, wq=wq)
        )

    async def _consume_loop(self, queue_obj: Any, handler: Handler) -> None:
        while True:
            try:
                channel, method, properties, body = await queue_obj.get()
            except Exception:
                return  # the channel closed; a new connection starts a new loop
            delivery = Delivery(
                headers=dict(properties.headers or {}),
                body=body,
                redelivered=bool(method.redelivered),
                channel=channel,
                tag=method.delivery_tag,
            )
            ensureDeferred(handler(delivery)).addErrback(
                lambda f: log.failure("task handler crashed", f)
            )

    # --- the broker interface ----------------------------------------------------------------
    def consume(self, app: str, queue: str, handler: Handler) -> None:
        wq = self.work_queue(app, queue)
        if wq in self._consumers:
            return
        self._consumers[wq] = (handler, app, queue)
        if self.connected:
            Deferred.fromCoroutine(self._add_consumer(wq)).addErrback(
                lambda f: log.failure("could not start consuming {wq}", f, wq=wq)
            )

    def stop(self, app: str, queue: str) -> None:
        """Stop consuming a queue (paused, rate 0 or removed); its messages stay in RabbitMQ."""
        wq = self.work_queue(app, queue)
        self._consumers.pop(wq, None)
        tag = self._consumer_tags.pop(wq, None)
        if tag is not None and self._con is not None and self._con.is_open:
            self._con.basic_cancel(tag).addErrback(
                lambda f: log.warn("could not cancel consumer of {wq}: {e}", wq=wq,
                                   e=f.getErrorMessage())
            )

    def consuming(self) -> set[tuple[str, str]]:
        return {(app, queue) for _, app, queue in self._consumers.values()}

    async def purge(self, app: str, queue: str) -> None:
        """Drop the ready messages of a queue (those waiting for an ETA are caught later)."""
        pub = await self._channel()
        await pub.queue_purge(self.work_queue(app, queue))

    async def _add_consumer(self, wq: str) -> None:
        await self._declare_work_queue(self._pub, wq)
        await self._start_consumer(self._con, wq)

    async def ensure_queue(self, app: str, queue: str) -> None:
        pub = await self._channel()
        await self._declare_work_queue(pub, self.work_queue(app, queue))

    async def stop_consuming(self) -> None:
        con, tags = self._con, self._consumer_tags
        self._consumer_tags = {}
        if con is None or not con.is_open:
            return
        for tag in tags.values():
            if not tag:
                continue
            try:
                await con.basic_cancel(tag)
            except Exception:
                pass

    async def _channel(self) -> Any:
        if not self.connected:
            await self.service.whenConnected(failAfterFailures=1)
        if not self.connected:
            raise Unavailable("rabbitmq", "not connected")
        return self._pub

    async def _publish(self, task: Task, delay: float) -> None:
        pub = await self._channel()
        wq = self.work_queue(task.app, task.queue)
        headers = task_to_headers(task)
        headers["tq-dest"] = wq
        props = pika.BasicProperties(delivery_mode=2, headers=headers)
        seconds = int(delay)
        if seconds >= 1:
            exchange, key = self._delay_name(LEVELS - 1), delay_routing_key(seconds)
        else:
            exchange, key = "", wq
        await pub.basic_publish(
            exchange=exchange, routing_key=key, body=task.payload, properties=props, mandatory=True
        )

    async def publish(self, task: Task, delay: float = 0.0) -> None:
        d = Deferred.fromCoroutine(self._publish(task, delay))
        d.addTimeout(self._timeout, self._clock)
        try:
            await d
        except Unavailable:
            raise
        except (TimeoutError, CancelledError):
            raise Unavailable("rabbitmq", f"no confirm within {self._timeout:g} s") from None
        except Exception as e:
            raise Unavailable("rabbitmq", f"publish failed: {e!r}") from None

    async def close(self) -> None:
        await self.stop_consuming()
        await self.service.stopService()
