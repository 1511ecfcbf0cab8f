"""TaskQueue: how an enqueue composes the store and the broker, and the fakes themselves."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from appscale_tq.api import TaskQueue
from appscale_tq.config import AppConfig, NodeConfig
from appscale_tq.errors import TaskQueueError, Unavailable
from appscale_tq.interfaces import GO, STALE, IBroker, IStore
from appscale_tq.store import PENDING_TTL
from appscale_tq.tasks import Task
from appscale_tq.testing import FakeBroker, FakeDelivery, MemoryStore

T0 = 1_700_000_000.0
APP, QUEUE = "myapp", "default"
TOMBSTONE = 1000.0


class LoggingStore(MemoryStore):
    """A memory store that logs its calls (into a log shared with the broker), and can fail
    chosen calls."""

    def __init__(self, clock: Clock, log: list[str]) -> None:
        super().__init__(clock, tombstone_seconds=TOMBSTONE)
        self.log = log
        self.failing: set[str] = set()

    def _enter(self, what: str) -> None:
        self.log.append(what)
        if what in self.failing:
            raise Unavailable("redis", f"{what} fails in this test")

    async def reserve(self, task: Task) -> int:
        self._enter("reserve")
        return await super().reserve(task)

    async def confirm(self, task: Task) -> None:
        self._enter("confirm")
        await super().confirm(task)

    async def release(self, task: Task) -> None:
        self._enter("release")
        await super().release(task)


class LoggingBroker(FakeBroker):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.refuse: set[str] = set()  # task names whose publish fails

    async def publish(self, task: Task, delay: float = 0.0) -> None:
        self.log.append("publish")
        if task.name in self.refuse:
            raise Unavailable("rabbitmq", "nack")
        await super().publish(task, delay)


class APITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.log: list[str] = []
        self.store = LoggingStore(self.clock, self.log)
        self.broker = LoggingBroker(self.log)
        tokens = itertools.count()
        self.tq = TaskQueue(
            self.clock,
            NodeConfig(apps={APP: AppConfig()}),
            self.store,
            self.broker,
            token=lambda: f"tok{next(tokens)}",
        )

    def task(self, **body: Any) -> Task:
        return self.tq.parse(APP, QUEUE, body)

    def add(self, task: Task) -> Any:
        return ensureDeferred(self.tq.add(task))


class AddTests(APITestCase):
    def test_reserve_publish_confirm(self) -> None:
        task = self.task(name="t", countdown=42)
        self.assertEqual(self.successResultOf(self.add(task)), task)
        self.assertEqual(self.log, ["reserve", "publish", "confirm"])
        self.assertEqual(self.broker.published, [(task, 42.0)])
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["state"], "queued")
        self.assertIsNone(self.store.expires(APP, QUEUE, "t"))

    def test_answer_waits_for_the_broker_confirm(self) -> None:
        self.broker.hold = True
        d = self.add(self.task(name="t"))
        self.assertEqual(self.log, ["reserve", "publish"])
        self.assertNoResult(d)
        # reserved but not confirmed: the record would free itself
        self.assertEqual(self.store.expires(APP, QUEUE, "t"), T0 + PENDING_TTL)
        self.broker.held[0].callback(None)
        self.successResultOf(d)
        self.assertEqual(self.log, ["reserve", "publish", "confirm"])

    def test_publish_failure_releases_the_name(self) -> None:
        task = self.task(name="t")
        self.broker.refuse.add("t")
        self.failureResultOf(self.add(task), Unavailable)
        self.assertEqual(self.log, ["reserve", "publish", "release"])
        self.assertIsNone(self.store.fields(APP, QUEUE, "t"))
        self.broker.refuse.clear()
        self.successResultOf(self.add(self.task(name="t")))

    def test_publish_failure_when_release_fails_too(self) -> None:
        self.broker.refuse.add("t")
        self.store.failing.add("release")
        failure = self.failureResultOf(self.add(self.task(name="t")), Unavailable)
        self.assertEqual(failure.value.service, "rabbitmq")  # the cause, not the cleanup's
        self.assertEqual(self.log, ["reserve", "publish", "release"])
        # the reservation frees itself after PENDING_TTL
        self.clock.advance(PENDING_TTL - 1)
        self.failureResultOf(self.add(self.task(name="t")), TaskQueueError)
        self.clock.advance(1)
        self.broker.refuse.clear()
        self.store.failing.clear()
        self.successResultOf(self.add(self.task(name="t")))

    def test_confirm_failure_still_returns_the_task(self) -> None:
        task = self.task(name="t")
        self.store.failing.add("confirm")
        self.assertEqual(self.successResultOf(self.add(task)), task)
        self.assertEqual(self.log, ["reserve", "publish", "confirm"])
        self.assertEqual(self.broker.published, [(task, 0.0)])

    def test_reserve_failure_publishes_nothing(self) -> None:
        self.store.failing.add("reserve")
        self.failureResultOf(self.add(self.task(name="t")), Unavailable)
        self.assertEqual(self.log, ["reserve"])
        self.assertEqual(self.broker.published, [])

    def test_taken_name_publishes_nothing(self) -> None:
        self.successResultOf(self.add(self.task(name="t")))
        del self.log[:]
        failure = self.failureResultOf(self.add(self.task(name="t")), TaskQueueError)
        self.assertEqual(failure.value.code, "TASK_ALREADY_EXISTS")
        self.assertEqual(self.log, ["reserve"])
        self.assertEqual(len(self.broker.published), 1)

    def test_batch_failures_are_per_task(self) -> None:
        self.broker.refuse.add("b")
        results = self.successResultOf(
            ensureDeferred(
                self.tq.add_batch_json(APP, QUEUE, [{"name": "a"}, {"name": "b"}, {"name": "c"}])
            )
        )
        self.assertEqual(results[0]["name"], "a")
        self.assertEqual(results[1]["error"]["code"], "TRANSIENT_ERROR")
        self.assertEqual(results[2]["name"], "c")
        self.assertIsNone(self.store.fields(APP, QUEUE, "b"))

    def test_check_queue(self) -> None:
        for app, queue, code in (
            ("nobody", "default", "UNKNOWN_QUEUE"),
            (APP, "other", "UNKNOWN_QUEUE"),
            (APP, "bad_name", "INVALID_QUEUE_NAME"),
        ):
            with self.subTest(app=app, queue=queue):
                with self.assertRaises(TaskQueueError) as caught:
                    self.tq.check_queue(app, queue)
                self.assertEqual(caught.exception.code, code)

    def test_get_and_delete_check_names(self) -> None:
        for call in (self.tq.get, self.tq.delete):
            for name in ("a:b", "", "a/b", "x" * 501):
                with self.subTest(call=call.__name__, name=name):
                    failure = self.failureResultOf(
                        ensureDeferred(call(APP, QUEUE, name)), TaskQueueError
                    )
                    self.assertEqual(failure.value.code, "INVALID_TASK_NAME")


class FakesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock, tombstone_seconds=TOMBSTONE)
        self.task = Task(app=APP, queue=QUEUE, name="t", url="/", tid="one", eta=T0, created=T0)

    def call(self, coro: Any) -> Any:
        return self.successResultOf(ensureDeferred(coro))

    def error(self, coro: Any) -> str:
        return self.failureResultOf(ensureDeferred(coro), TaskQueueError).value.code

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertTrue(verifyObject(IBroker, FakeBroker()))

    def test_down(self) -> None:
        self.store.down = True
        for coro in (
            self.store.reserve(self.task),
            self.store.confirm(self.task),
            self.store.release(self.task),
            self.store.begin(self.task),
            self.store.record_success(self.task, 200),
            self.store.record_retry(self.task, 500, "x"),
            self.store.record_failure(self.task, 500, "x"),
            self.store.delete(APP, QUEUE, "t"),
            self.store.get(APP, QUEUE, "t"),
            self.store.ping(),
        ):
            failure = self.failureResultOf(ensureDeferred(coro), Unavailable)
            self.assertEqual(failure.value.service, "redis")
        broker = FakeBroker()
        broker.down = True
        self.assertFalse(broker.connected)
        self.failureResultOf(ensureDeferred(broker.publish(self.task, 0)), Unavailable)
        self.assertEqual(broker.published, [])

    def test_pending_reservation_expires(self) -> None:
        self.call(self.store.reserve(self.task))
        self.assertEqual(self.store.expires(APP, QUEUE, "t"), T0 + PENDING_TTL)
        self.clock.advance(PENDING_TTL)
        self.assertIsNone(self.call(self.store.get(APP, QUEUE, "t")))
        self.call(self.store.reserve(attrs.evolve(self.task, tid="two")))

    def test_confirm_and_release_need_the_same_tid(self) -> None:
        self.call(self.store.reserve(self.task))
        other = attrs.evolve(self.task, tid="two")
        self.call(self.store.confirm(other))
        self.assertIsNotNone(self.store.expires(APP, QUEUE, "t"))
        self.call(self.store.release(other))
        self.assertIsNotNone(self.store.fields(APP, QUEUE, "t"))
        self.call(self.store.confirm(self.task))
        self.assertIsNone(self.store.expires(APP, QUEUE, "t"))
        self.call(self.store.release(self.task))
        self.assertIsNone(self.store.fields(APP, QUEUE, "t"))

    def test_release_keeps_a_running_task(self) -> None:
        self.call(self.store.reserve(self.task))
        self.assertEqual(self.call(self.store.begin(self.task)), GO)
        self.call(self.store.release(self.task))
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["state"], "running")

    def test_begin(self) -> None:
        # no record at all (e.g. its reservation expired): the copy still runs
        self.assertEqual(self.call(self.store.begin(self.task)), GO)
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["state"], "running")
        self.assertEqual(self.call(self.store.begin(attrs.evolve(self.task, tid="x"))), STALE)
        later = attrs.evolve(self.task, retry_count=2, execution_count=1)
        self.assertEqual(self.call(self.store.begin(later)), GO)
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["retry"], "2")
        self.assertEqual(self.call(self.store.begin(self.task)), STALE)
        self.call(self.store.record_success(later, 200))
        self.assertEqual(self.call(self.store.begin(later)), "completed")

    def test_begin_makes_a_pending_record_persistent(self) -> None:
        self.call(self.store.reserve(self.task))
        self.call(self.store.begin(self.task))
        self.assertIsNone(self.store.expires(APP, QUEUE, "t"))

    def test_records(self) -> None:
        self.call(self.store.reserve(self.task))
        self.call(self.store.confirm(self.task))
        retry = attrs.evolve(self.task, retry_count=1, execution_count=1, eta=T0 + 5)
        self.call(self.store.record_retry(retry, None, "refused"))
        view = self.call(self.store.get(APP, QUEUE, "t"))
        self.assertEqual(
            view,
            {
                "state": "queued",
                "retry_count": 1,
                "execution_count": 1,
                "eta": T0 + 5,
                "last_response": None,
                "last_error": "refused",
            },
        )
        self.assertIsNone(self.store.expires(APP, QUEUE, "t"))
        # another enqueue's copy changes nothing
        self.call(self.store.record_failure(attrs.evolve(retry, tid="x"), 500, "HTTP 500"))
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["state"], "queued")
        self.call(self.store.record_failure(retry, 500, "HTTP 500"))
        self.assertEqual(self.call(self.store.get(APP, QUEUE, "t"))["last_response"], 500)
        self.assertEqual(self.store.expires(APP, QUEUE, "t"), T0 + TOMBSTONE)
        # terminal states stay
        self.call(self.store.record_success(retry, 200))
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["state"], "error")
        self.assertEqual(self.error(self.store.reserve(self.task)), "TOMBSTONED_TASK")
        self.assertEqual(self.error(self.store.delete(APP, QUEUE, "t")), "TOMBSTONED_TASK")
        self.clock.advance(TOMBSTONE)
        self.assertIsNone(self.call(self.store.get(APP, QUEUE, "t")))
        self.call(self.store.reserve(self.task))

    def test_delete(self) -> None:
        self.assertEqual(self.error(self.store.delete(APP, QUEUE, "t")), "UNKNOWN_TASK")
        self.call(self.store.reserve(self.task))
        self.assertEqual(self.error(self.store.reserve(self.task)), "TASK_ALREADY_EXISTS")
        self.call(self.store.delete(APP, QUEUE, "t"))
        self.assertEqual(self.store.expires(APP, QUEUE, "t"), T0 + TOMBSTONE)
        self.assertEqual(self.call(self.store.begin(self.task)), "deleted")
        self.call(self.store.record_retry(self.task, 500, "x"))
        self.assertEqual(self.store.fields(APP, QUEUE, "t")["state"], "deleted")
        self.assertEqual(self.error(self.store.reserve(self.task)), "TOMBSTONED_TASK")

    def test_fake_broker_delivers(self) -> None:
        broker = FakeBroker()
        seen: list[FakeDelivery] = []

        def handler(delivery: FakeDelivery) -> None:
            seen.append(delivery)
            delivery.ack()

        broker.consume(APP, QUEUE, handler)
        task = attrs.evolve(self.task, payload=b"\x00\xff", headers=(("A", "b"),))
        delivery = broker.deliver(task)
        self.assertEqual(seen, [delivery])
        self.assertEqual(delivery.body, b"\x00\xff")
        self.assertEqual(delivery.headers["tq-name"], "t")
        self.assertTrue(delivery.acked)
        self.assertFalse(delivery.requeued)
        with self.assertRaises(AssertionError):
            delivery.requeue()
