"""What a node does with each delivered task: wait out its ETA, check its state, dispatch it,
and make the outcome durable before the delivery is acked.

Works through the IBroker / IStore / dispatcher seams and an injected clock, so the whole
policy runs under ``task.Clock`` with memory fakes as well as against the real servers.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from appscale_tq.backoff import RetryOptions, may_retry, retry_delay
from appscale_tq.errors import Unavailable
from appscale_tq.interfaces import GO, Gate
from appscale_tq.tasks import MessageError, Task, task_from_headers

log = Logger()
T = TypeVar("T")

STORE_RETRY_MIN = 0.5
STORE_RETRY_MAX = 5.0
# A dispatch holds a concurrency lease this long, renewed while the request runs, so a node
# that dies mid-dispatch frees its slot within a minute.
LEASE_SECONDS = 60.0
PAUSED_RECHECK = 1.0
GATE_POLL = 0.25
# A delivery waits this long at most, unacked, for its queue's token or concurrency slot (a
# slot can stay taken for a whole dispatch deadline); then it waits in the broker instead, far
# from RabbitMQ's consumer_timeout (DESIGN invariant 5).
MAX_GATE_HOLD = 60.0


def _no_queue_options(app: str, queue: str) -> RetryOptions:
    return RetryOptions()


class Worker:
    def __init__(
        self,
        clock: IReactorTime,
        broker: Any,
        store: Any,
        dispatcher: Any,
        *,
        short_wait: float = 2.0,
        random: Callable[[], float] = random.random,
        queue_options: Callable[[str, str], RetryOptions] = _no_queue_options,
        registry: Any = None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self._clock = clock
        self._broker = broker
        self._store = store
        self._dispatcher = dispatcher
        self._short_wait = short_wait
        self._random = random
        self._queue_options = queue_options
        self._registry = registry
        self._lease_seconds = lease_seconds
        self._gate_locks: dict[tuple[str, str], DeferredLock] = {}
        self._in_flight: set[Deferred[None]] = set()
        self.stats = WorkerStats()

    def handler(self, delivery: Any) -> Deferred[None]:
        """The broker's per-delivery callback; tracks the work so stop() can drain it."""
        d = Deferred.fromCoroutine(self.handle(delivery))
        self._in_flight.add(d)
        d.addBoth(self._done, d)
        return d

    def _done(self, result: Any, d: Deferred[None]) -> Any:
        self._in_flight.discard(d)
        return result

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the deliveries in hand to finish."""
        if not self._in_flight:
            return
        # A Deferred of our own: the timeout cancels it, never the work itself. Cancelling a
        # handler mid-dispatch would turn the cancelled request into a failed attempt (and,
        # out of retries, a task recorded as error) although the app never answered.
        waiting: Deferred[None] = Deferred()
        DeferredList(list(self._in_flight), consumeErrors=True).addBoth(
            lambda _: None if waiting.called else waiting.callback(None)
        )
        waiting.addTimeout(timeout, self._clock)
        try:
            await waiting
        except Exception:
            log.warn("stopping with {n} task(s) in flight; the broker redelivers them",
                     n=len(self._in_flight))

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self._clock, max(0.0, seconds), lambda: None)

    async def _durably(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run a store call until it succeeds: an outcome is never dropped, only delayed."""
        pause = STORE_RETRY_MIN
        while True:
            try:
                return await call()
            except Unavailable as e:
                log.warn("{what} waits for the store: {error}", what=what, error=str(e))
                await self._sleep(pause)
                pause = min(pause * 2, STORE_RETRY_MAX)

    async def handle(self, delivery: Any) -> None:
        try:
            await self._handle(delivery)
        except Exception:
            # a bug or an unexpected reply: give the message back rather than hold it until
            # the broker's consumer timeout closes the channel
            log.failure("handling a delivery failed; requeueing it")
            await self._sleep(1.0)
            delivery.requeue()

    async def _handle(self, delivery: Any) -> None:
        try:
            task = task_from_headers(delivery.headers, delivery.body)
        except MessageError as e:
            log.error("dropping a message that is not a task: {error}", error=str(e))
            delivery.ack()
            return
        wait = task.eta - self._clock.seconds()
        if wait > self._short_wait:
            # early (a long delay path hop, or a clock skew): back to the broker to wait there
            if await self._publish(task, wait, delivery):
                delivery.ack()
            return
        if wait > 0:
            await self._sleep(wait)
        lease = ""
        if self._registry is not None:
            # the state check and the queue's token and slot, in one step
            gate = await self._gate(task)
            if gate is None:  # paused, rate 0 or queue gone: back to the broker's queue
                await self._sleep(PAUSED_RECHECK)
                delivery.requeue()
                return
            if isinstance(gate, float):  # no token for a while: wait in the broker
                if await self._publish(task, gate, delivery):
                    delivery.ack()
                return
            if isinstance(gate, _Skip):
                self._skip(task, gate.verdict, delivery)
                return
            lease = gate
        else:
            verdict = await self._durably("begin", lambda: self._store.begin(task))
            if verdict != GO:
                self._skip(task, verdict, delivery)
                return
        started = self._clock.seconds()
        first = task.first_attempt if task.first_attempt is not None else started
        outcome = await self._dispatch(task, lease)
        self.stats.dispatched += 1
        if outcome.ok:
            done = attrs.evolve(task, execution_count=task.execution_count + 1, first_attempt=first)
            await self._durably(
                "success", lambda: self._store.record_success(done, outcome.status, lease=lease)
            )
            self.stats.succeeded += 1
            delivery.ack()
            return
        self.stats.failed += 1
        if lease:
            await self._release(task, lease)
        if outcome.status in (429, 503) and self._registry is not None:
            try:
                await self._store.slow_down(task.app, task.queue)
            except Unavailable:
                pass
        failures = task.retry_count + 1
        tried = attrs.evolve(
            task,
            execution_count=task.execution_count + (1 if outcome.reached_app else 0),
            first_attempt=first,
        )
        options = task.retry.over(self._queue_options(task.app, task.queue))
        now = self._clock.seconds()
        if not may_retry(failures, now - first, options):
            log.info("task {name} failed for good after {n} attempt(s): {reason}",
                     name=task.name, n=failures, reason=outcome.reason)
            await self._durably(
                "failure", lambda: self._store.record_failure(tried, outcome.status, outcome.reason)
            )
            delivery.ack()
            return
        delay = retry_delay(failures, options, self._random)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        copy = attrs.evolve(
            tried,
            retry_count=failures,
            eta=now + delay,
            previous_response=outcome.status,
            retry_reason=outcome.reason,
        )
        if delay <= self._short_wait:
            await self._sleep(delay)
            delay = 0.0
        if not await self._publish(copy, delay, delivery):
            return
        await self._durably(
            "retry", lambda: self._store.record_retry(copy, outcome.status, outcome.reason)
        )
        self.stats.retried += 1
        delivery.ack()

    def _skip(self, task: Task, verdict: str, delivery: Any) -> None:
        log.debug("skipping {name}: {verdict}", name=task.name, verdict=verdict)
        self.stats.skipped += 1
        delivery.ack()

    async def _gate(self, task: Task) -> str | float | _Skip | None:
        """Begin the task under the queue's token and concurrency slot (cluster-wide, one
        atomic store call that also checks the task's state).

        Returns the lease id to dispatch under (the task is begun); a float, the seconds to
        wait in the broker when a token is further off than a short wait or the delivery was
        held MAX_GATE_HOLD seconds already (lock included); a _Skip when the task is moot
        (stale, purged, ended); or None when the queue does not dispatch now. One waiter per
        queue per node asks the store at a time, so waiting deliveries cost little traffic.
        """
        lease = f"{task.tid}:{task.retry_count}:{task.gen}"
        started = self._clock.seconds()
        # First ask at once: while the bucket has tokens every delivery takes one without
        # waiting for the others. Only deliveries told to wait queue up behind the lock.
        outcome = await self._ask_gate(task, lease)
        if not isinstance(outcome, _Wait):
            return outcome
        key = (task.app, task.queue)
        lock = self._gate_locks.get(key)
        if lock is None:
            lock = self._gate_locks[key] = DeferredLock()
        await lock.acquire()
        try:
            while True:
                if outcome.seconds > self._short_wait:
                    return outcome.seconds
                if self._clock.seconds() - started + outcome.seconds > MAX_GATE_HOLD:
                    # held long enough: wait in the broker
                    return float(max(outcome.seconds, self._short_wait))
                # short naps, so a purge, pause or redeploy reaches a waiting delivery quickly
                await self._sleep(min(outcome.seconds, GATE_POLL))
                outcome = await self._ask_gate(task, lease)
                if not isinstance(outcome, _Wait):
                    return outcome
        finally:
            lock.release()

    async def _ask_gate(self, task: Task, lease: str) -> str | _Wait | _Skip | None:
        q = self._registry.queue(task.app, task.queue)
        if q is None or q.mode != "push" or not q.rate:
            return None
        gate = Gate(q.rate, q.bucket_size, q.max_concurrent_requests, lease,
                    self._lease_seconds)
        verdict = await self._durably("begin", lambda: self._store.begin(task, gate))
        if verdict == GO:
            return lease
        if verdict == "paused":
            return None
        if verdict.startswith("wait:"):
            return _Wait(float(verdict[5:]))
        return _Skip(verdict)

    async def _dispatch(self, task: Task, lease: str) -> Any:
        if not lease:
            return await self._dispatcher.dispatch(task)
        renewal = LoopingCall(self._renew, task, lease)
        renewal.clock = self._clock
        renewal.start(self._lease_seconds / 3, now=False)
        try:
            return await self._dispatcher.dispatch(task)
        finally:
            renewal.stop()

    def _renew(self, task: Task, lease: str) -> Deferred[None]:
        d = Deferred.fromCoroutine(
            self._store.renew(task.app, task.queue, lease, self._lease_seconds)
        )
        return d.addErrback(lambda f: log.warn("lease renewal failed: {e}", e=f.getErrorMessage()))

    async def _release(self, task: Task, lease: str) -> None:
        try:
            await self._store.release_lease(task.app, task.queue, lease)
        except Unavailable:
            pass  # the lease expires by itself

    async def _publish(self, task: Task, delay: float, delivery: Any) -> bool:
        try:
            await self._broker.publish(task, delay)
            return True
        except Unavailable as e:
            # the original stays unacked: it comes back when its channel closes, or now
            log.warn("could not re-publish {name}: {error}", name=task.name, error=str(e))
            await self._sleep(1.0)
            delivery.requeue()
            return False


@attrs.frozen
class _Wait:
    seconds: float


@attrs.frozen
class _Skip:
    verdict: str  # why begin() said no: stale, purged, completed, error, deleted


@attrs.define
class WorkerStats:
    dispatched: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    skipped: int = 0
