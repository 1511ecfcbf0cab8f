"""The worker's policy under task.Clock, with the memory store, the fake broker and a fake
dispatcher answering scripted outcomes."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from appscale_tq.api import TaskQueue
from appscale_tq.config import AppConfig, NodeConfig
from appscale_tq.dispatch import Dispatcher, Outcome
from appscale_tq.interfaces import IBroker, IStore
from appscale_tq.tasks import Task
from appscale_tq.testing import FakeBroker, FakeDelivery, MemoryStore
from appscale_tq.worker import STORE_RETRY_MAX, Worker

T0 = 1_700_000_000.0
APP, QUEUE = "myapp", "default"
TOMBSTONE = 86400.0
SHORT_WAIT = 2.0

OK = Outcome(200, "", None, True)
FAIL = Outcome(500, "HTTP 500", None, True)
REFUSED = Outcome(None, "no answer from the load balancer: ConnectionRefusedError")


class FakeDispatcher:
    """Answers each dispatch with the next scripted outcome; ``before`` runs first if set."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.calls: list[Task] = []
        self.before: Any = None

    async def dispatch(self, task: Task) -> Outcome:
        self.calls.append(task)
        if self.before is not None:
            self.before(task)
        return self.outcomes.pop(0)


class WorkerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock, tombstone_seconds=TOMBSTONE)
        self.broker = FakeBroker()
        self.dispatcher = FakeDispatcher()
        self.worker = Worker(
            self.clock,
            self.broker,
            self.store,
            self.dispatcher,
            short_wait=SHORT_WAIT,
            random=lambda: 0.5,
        )
        self.broker.consume(APP, QUEUE, self.worker.handler)
        tokens = itertools.count()
        config = NodeConfig(apps={APP: AppConfig()})
        self.tq = TaskQueue(
            self.clock, config, self.store, self.broker, token=lambda: f"tok{next(tokens)}"
        )

    # --- helpers -------------------------------------------------------------------------------
    def enqueue(self, **body: Any) -> Task:
        """Enqueue through the API (reserve, publish, confirm); returns the published task."""
        task = self.successResultOf(ensureDeferred(self.tq.add_json(APP, QUEUE, body)))
        self.assertEqual(self.broker.published[-1][0], task)
        self.broker.published.clear()
        return task

    def deliver(self, task: Task, *outcomes: Outcome) -> FakeDelivery:
        self.dispatcher.outcomes.extend(outcomes)
        return self.broker.deliver(task)

    def fields(self, name: str) -> dict[str, str]:
        fields = self.store.fields(APP, QUEUE, name)
        assert fields is not None, f"no record for {name}"
        return fields

    def finished(self, delivery: FakeDelivery) -> None:
        assert delivery.done is not None
        self.successResultOf(delivery.done)


class FakesTests(WorkerTestCase):
    def test_fakes_provide_the_interfaces(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertTrue(verifyObject(IBroker, self.broker))


class SuccessTests(WorkerTestCase):
    def test_success_is_recorded_then_acked(self) -> None:
        task = self.enqueue(name="t", payload="p")
        delivery = self.deliver(task, OK)
        self.finished(delivery)
        self.assertEqual(self.dispatcher.calls, [task])
        self.assertTrue(delivery.acked)
        self.assertFalse(delivery.requeued)
        self.assertEqual(self.broker.published, [])
        fields = self.fields("t")
        self.assertEqual((fields["state"], fields["last"]), ("completed", "200"))
        self.assertEqual(fields["exec"], "1")
        self.assertEqual(self.store.expires(APP, QUEUE, "t"), T0 + TOMBSTONE)
        self.assertEqual((self.worker.stats.dispatched, self.worker.stats.succeeded), (1, 1))
        self.assertEqual(self.worker.in_flight, 0)

    def test_redelivered_completed_task_is_skipped(self) -> None:
        task = self.enqueue(name="t")
        self.finished(self.deliver(task, OK))
        again = self.broker.deliver(task, redelivered=True)
        self.finished(again)
        self.assertTrue(again.acked)
        self.assertEqual(len(self.dispatcher.calls), 1)
        self.assertEqual(self.worker.stats.skipped, 1)

    def test_store_down_after_success_keeps_trying(self) -> None:
        task = self.enqueue(name="t")

        def outage(_: Task) -> None:
            self.store.down = True

        self.dispatcher.before = outage
        delivery = self.deliver(task, OK)
        assert delivery.done is not None
        for _ in range(10):
            self.clock.advance(STORE_RETRY_MAX)
            self.assertNoResult(delivery.done)
            self.assertFalse(delivery.settled)
        self.assertEqual(self.worker.in_flight, 1)
        self.store.down = False
        self.clock.advance(STORE_RETRY_MAX)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        self.assertEqual(self.fields("t")["state"], "completed")
        self.assertEqual(len(self.dispatcher.calls), 1)  # the outcome was kept, not re-run


class BeginTests(WorkerTestCase):
    def test_store_down_during_begin(self) -> None:
        task = self.enqueue(name="t")
        self.store.down = True
        delivery = self.deliver(task, OK)
        assert delivery.done is not None
        for _ in range(10):
            self.clock.advance(STORE_RETRY_MAX)
            self.assertNoResult(delivery.done)
        self.assertEqual(self.dispatcher.calls, [])
        self.assertFalse(delivery.settled)
        self.store.down = False
        self.clock.advance(STORE_RETRY_MAX)
        self.finished(delivery)
        self.assertEqual(self.dispatcher.calls, [task])
        self.assertTrue(delivery.acked)
        self.assertEqual(self.fields("t")["state"], "completed")

    def test_store_retry_backs_off(self) -> None:
        task = self.enqueue(name="t")
        self.store.down = True
        self.deliver(task, OK)
        # 0.5, 1, 2, 4, 5, 5 ... seconds between attempts
        pauses = []
        for _ in range(6):
            [call] = self.clock.getDelayedCalls()
            pauses.append(call.getTime() - self.clock.seconds())
            self.clock.advance(pauses[-1])
        self.assertEqual(pauses, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0])

    def test_deleted_task_is_skipped(self) -> None:
        task = self.enqueue(name="t")
        self.successResultOf(ensureDeferred(self.tq.delete(APP, QUEUE, "t")))
        delivery = self.deliver(task)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        self.assertEqual(self.dispatcher.calls, [])
        self.assertEqual(self.fields("t")["state"], "deleted")

    def test_stale_copy_is_skipped(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.finished(self.deliver(task, FAIL))
        [(copy, _)] = self.broker.published
        self.clock.advance(10)
        self.finished(self.deliver(copy, FAIL))
        self.assertEqual(self.fields("t")["retry"], "2")
        # the original (retry_count 0) and the first copy (1) come back: both are stale
        for old in (task, copy):
            delivery = self.broker.deliver(old, redelivered=True)
            self.finished(delivery)
            self.assertTrue(delivery.acked)
        self.assertEqual(len(self.dispatcher.calls), 2)
        self.assertEqual(self.worker.stats.skipped, 2)

    def test_copy_of_an_earlier_enqueue_is_skipped(self) -> None:
        old = self.enqueue(name="t")
        self.finished(self.deliver(old, OK))
        self.clock.advance(TOMBSTONE)  # the tombstone expires; the name is enqueued again
        new = self.enqueue(name="t")
        self.assertNotEqual(old.tid, new.tid)
        delivery = self.broker.deliver(old, redelivered=True)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        self.assertEqual(len(self.dispatcher.calls), 1)
        self.assertEqual(self.fields("t")["state"], "queued")

    def test_malformed_messages_are_dropped(self) -> None:
        for headers in (None, {}, {"tq-app": APP}, {"tq-app": APP, "tq-retry-count": "x"}):
            with self.subTest(headers=headers):
                delivery = self.broker.deliver_raw(APP, QUEUE, FakeDelivery(headers, b"x"))
                self.finished(delivery)
                self.assertTrue(delivery.acked)
        self.assertEqual(self.dispatcher.calls, [])
        self.assertEqual(self.broker.published, [])


class RetryTests(WorkerTestCase):
    def test_failure_publishes_a_retry_copy_then_acks(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.clock.advance(0.25)  # the dispatch starts a little after the enqueue
        delivery = self.deliver(task, FAIL)
        self.finished(delivery)
        [(copy, delay)] = self.broker.published
        self.assertEqual(delay, 10.0)
        self.assertEqual(
            copy,
            attrs.evolve(
                task,
                retry_count=1,
                execution_count=1,
                first_attempt=T0 + 0.25,
                eta=T0 + 0.25 + 10,
                previous_response=500,
                retry_reason="HTTP 500",
            ),
        )
        self.assertTrue(delivery.acked)
        fields = self.fields("t")
        self.assertEqual(
            (fields["state"], fields["retry"], fields["exec"], fields["last"], fields["reason"]),
            ("queued", "1", "1", "500", "HTTP 500"),
        )
        self.assertEqual(float(fields["eta"]), T0 + 10.25)
        self.assertIsNone(self.store.expires(APP, QUEUE, "t"))
        self.assertEqual((self.worker.stats.failed, self.worker.stats.retried), (1, 1))

    def test_seed_backoff_uses_the_random_callable(self) -> None:
        # no schedule parameters: uniform in [0, 2^n]; random() = 0.5 -> 2^(n-1) seconds
        current = self.enqueue(name="t")
        backoffs, delays = [], []
        for n in range(1, 6):
            self.broker.published.clear()
            failed_at = self.clock.seconds()
            self.finished_after_wait(self.deliver(current, FAIL))
            [(current, delay)] = self.broker.published
            self.assertEqual(current.retry_count, n)
            backoffs.append(current.eta - failed_at)
            delays.append(delay)
            self.clock.advance(max(0.0, current.eta - self.clock.seconds()))
        self.assertEqual(backoffs, [1.0, 2.0, 4.0, 8.0, 16.0])
        # 1 s and 2 s wait in memory (then published with delay 0); longer ones in the broker
        self.assertEqual(delays, [0.0, 0.0, 4.0, 8.0, 16.0])

    def finished_after_wait(self, delivery: FakeDelivery) -> None:
        assert delivery.done is not None
        if not delivery.done.called:
            [call] = self.clock.getDelayedCalls()
            self.clock.advance(call.getTime() - self.clock.seconds())
        self.finished(delivery)

    def test_short_backoff_waits_in_memory(self) -> None:
        task = self.enqueue(name="t")
        delivery = self.deliver(task, FAIL)  # random 0.5 * 2^1 = 1 s, under short_wait
        self.assertFalse(delivery.settled)
        self.assertEqual(self.broker.published, [])
        self.clock.advance(0.999)
        self.assertEqual(self.broker.published, [])
        self.clock.advance(0.001)
        self.finished(delivery)
        [(copy, delay)] = self.broker.published
        self.assertEqual((delay, copy.eta, copy.retry_count), (0.0, T0 + 1.0, 1))
        self.assertTrue(delivery.acked)

    def test_ack_only_after_the_retry_copy_is_confirmed(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.broker.hold = True
        delivery = self.deliver(task, FAIL)
        assert delivery.done is not None
        [confirm] = self.broker.held
        self.assertNoResult(delivery.done)
        self.assertFalse(delivery.settled)
        self.assertEqual(self.fields("t")["state"], "running")  # nothing recorded yet
        confirm.callback(None)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        self.assertEqual(self.fields("t")["state"], "queued")

    def test_broker_down_requeues_and_never_acks(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.broker.down = True
        delivery = self.deliver(task, FAIL)
        assert delivery.done is not None
        self.assertNoResult(delivery.done)
        self.assertFalse(delivery.settled)
        self.clock.advance(1.0)
        self.finished(delivery)
        self.assertTrue(delivery.requeued)
        self.assertFalse(delivery.acked)
        self.assertEqual(self.broker.published, [])
        # nothing recorded: the redelivered original is not stale and runs again
        self.assertEqual(self.fields("t")["retry"], "0")
        self.broker.down = False
        self.dispatcher.outcomes.append(OK)
        again = self.broker.deliver(task, redelivered=True)
        self.finished(again)
        self.assertTrue(again.acked)
        self.assertEqual(self.fields("t")["state"], "completed")

    def test_broker_fails_the_confirm(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.broker.hold = True
        delivery = self.deliver(task, FAIL)
        self.broker.down = True
        self.broker.held[0].callback(None)  # the broker went away before confirming
        self.clock.advance(1.0)
        self.finished(delivery)
        self.assertEqual((delivery.acked, delivery.requeued), (False, True))

    def test_retry_after_is_a_minimum(self) -> None:
        task = self.enqueue(name="t")
        delivery = self.deliver(task, Outcome(503, "HTTP 503", 120.0, True))
        self.finished(delivery)
        [(copy, delay)] = self.broker.published
        self.assertEqual((delay, copy.eta, copy.previous_response), (120.0, T0 + 120, 503))
        self.assertTrue(delivery.acked)

    def test_retry_after_shorter_than_backoff_changes_nothing(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 30})
        self.finished(self.deliver(task, Outcome(429, "HTTP 429", 5.0, True)))
        [(copy, delay)] = self.broker.published
        self.assertEqual(delay, 30.0)

    def test_connection_error_does_not_count_as_an_execution(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.finished(self.deliver(task, REFUSED))
        [(copy, _)] = self.broker.published
        self.assertEqual((copy.retry_count, copy.execution_count), (1, 0))
        self.assertIsNone(copy.previous_response)
        self.assertEqual(copy.retry_reason, REFUSED.reason)
        self.assertEqual(self.fields("t")["last"], "")

    def test_store_down_while_recording_the_retry(self) -> None:
        task = self.enqueue(name="t", retry_options={"min_backoff_seconds": 10})
        self.broker.hold = True
        delivery = self.deliver(task, FAIL)
        self.store.down = True
        self.broker.held[0].callback(None)
        assert delivery.done is not None
        self.clock.advance(STORE_RETRY_MAX)
        self.assertNoResult(delivery.done)
        self.assertFalse(delivery.settled)
        self.store.down = False
        self.clock.advance(STORE_RETRY_MAX)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        self.assertEqual(len(self.broker.published), 1)  # published once, not again
        self.assertEqual(self.fields("t")["retry"], "1")


class LimitTests(WorkerTestCase):
    def run_copy(self, task: Task, outcome: Outcome) -> Task | None:
        """Deliver ``task`` at its ETA; return the retry copy, or None if it was not retried."""
        self.clock.advance(max(0.0, task.eta - self.clock.seconds()))
        self.broker.published.clear()
        delivery = self.deliver(task, outcome)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        if not self.broker.published:
            return None
        [(copy, _)] = self.broker.published
        return copy

    def test_retry_limit_zero_means_one_attempt(self) -> None:
        task = self.enqueue(name="t", retry_options={"task_retry_limit": 0})
        self.assertIsNone(self.run_copy(task, FAIL))
        fields = self.fields("t")
        self.assertEqual(
            (fields["state"], fields["exec"], fields["last"], fields["reason"]),
            ("error", "1", "500", "HTTP 500"),
        )
        self.assertEqual(self.store.expires(APP, QUEUE, "t"), T0 + TOMBSTONE)
        view = self.successResultOf(ensureDeferred(self.tq.get(APP, QUEUE, "t")))
        self.assertEqual((view["state"], view["last_response"]), ("error", 500))
        # out of retries: the name stays tombstoned
        self.failureResultOf(ensureDeferred(self.tq.add_json(APP, QUEUE, {"name": "t"})))

    def test_retry_limit_counts_retries(self) -> None:
        task = self.enqueue(name="t", retry_options={"task_retry_limit": 2,
                                                      "min_backoff_seconds": 10})
        first = self.run_copy(task, FAIL)
        assert first is not None
        second = self.run_copy(first, FAIL)
        assert second is not None
        self.assertIsNone(self.run_copy(second, FAIL))
        self.assertEqual(len(self.dispatcher.calls), 3)
        self.assertEqual(self.fields("t")["state"], "error")

    def test_age_limit_alone(self) -> None:
        task = self.enqueue(name="t", retry_options={"task_age_limit": 100,
                                                      "min_backoff_seconds": 60})
        first = self.run_copy(task, FAIL)
        assert first is not None
        second = self.run_copy(first, FAIL)  # 60 s old
        assert second is not None
        self.assertIsNone(self.run_copy(second, FAIL))  # 180 s old
        self.assertEqual(self.fields("t")["state"], "error")

    def test_both_limits_retry_until_both_are_exceeded(self) -> None:
        task = self.enqueue(name="t", retry_options={"task_retry_limit": 1, "task_age_limit": 100,
                                                      "min_backoff_seconds": 10})
        first = self.run_copy(task, FAIL)  # 1 failure: count not exceeded
        assert first is not None
        second = self.run_copy(first, FAIL)  # 2 failures > 1, but only 10 s old
        assert second is not None
        self.clock.advance(200)
        self.assertIsNone(self.run_copy(second, FAIL))  # count and age both exceeded
        self.assertEqual(self.fields("t")["state"], "error")
        self.assertEqual(self.fields("t")["exec"], "3")

    def test_both_limits_age_first(self) -> None:
        task = self.enqueue(name="t", retry_options={"task_retry_limit": 3, "task_age_limit": 10,
                                                      "min_backoff_seconds": 20})
        copy = task
        for _ in range(3):  # age is exceeded from the second failure, count not until the 4th
            next_copy = self.run_copy(copy, FAIL)
            assert next_copy is not None
            copy = next_copy
        self.assertIsNone(self.run_copy(copy, FAIL))

    def test_store_down_while_recording_the_failure(self) -> None:
        task = self.enqueue(name="t", retry_options={"task_retry_limit": 0})

        def outage(_: Task) -> None:
            self.store.down = True

        self.dispatcher.before = outage
        delivery = self.deliver(task, FAIL)
        assert delivery.done is not None
        self.clock.advance(STORE_RETRY_MAX)
        self.assertNoResult(delivery.done)
        self.store.down = False
        self.clock.advance(STORE_RETRY_MAX)
        self.finished(delivery)
        self.assertTrue(delivery.acked)
        self.assertEqual(self.fields("t")["state"], "error")


class EtaTests(WorkerTestCase):
    def test_far_eta_goes_back_to_the_broker(self) -> None:
        task = self.enqueue(name="t", countdown=3600)
        delivery = self.deliver(task)
        self.finished(delivery)
        self.assertEqual(self.broker.published, [(task, 3600.0)])
        self.assertTrue(delivery.acked)
        self.assertEqual(self.dispatcher.calls, [])
        self.assertEqual(self.fields("t")["state"], "queued")

    def test_far_eta_broker_down(self) -> None:
        task = self.enqueue(name="t", countdown=3600)
        self.broker.down = True
        delivery = self.deliver(task)
        self.clock.advance(1.0)
        self.finished(delivery)
        self.assertEqual((delivery.acked, delivery.requeued), (False, True))

    def test_near_eta_waits_on_the_clock(self) -> None:
        task = self.enqueue(name="t", countdown=1.5)
        delivery = self.deliver(task, OK)
        self.assertEqual(self.dispatcher.calls, [])
        self.clock.advance(1.4)
        self.assertEqual(self.dispatcher.calls, [])
        self.assertFalse(delivery.settled)
        self.clock.advance(0.1)
        self.finished(delivery)
        self.assertEqual(self.dispatcher.calls, [task])
        self.assertTrue(delivery.acked)
        self.assertEqual(self.broker.published, [])

    def test_eta_exactly_short_wait_waits_in_memory(self) -> None:
        task = self.enqueue(name="t", countdown=SHORT_WAIT)
        delivery = self.deliver(task, OK)
        self.clock.advance(SHORT_WAIT)
        self.finished(delivery)
        self.assertEqual(self.broker.published, [])
        self.assertTrue(delivery.acked)


class DrainTests(WorkerTestCase):
    def test_drain_waits_for_work_in_hand(self) -> None:
        task = self.enqueue(name="t", countdown=1)
        delivery = self.deliver(task, OK)
        self.assertEqual(self.worker.in_flight, 1)
        drained = Deferred.fromCoroutine(self.worker.drain(10))
        self.assertNoResult(drained)
        self.clock.advance(1)
        self.successResultOf(drained)
        self.assertTrue(delivery.acked)

    def test_drain_gives_up_after_its_timeout(self) -> None:
        task = self.enqueue(name="t")
        self.store.down = True
        self.deliver(task, OK)
        drained = Deferred.fromCoroutine(self.worker.drain(3))
        self.clock.advance(3)
        self.successResultOf(drained)
        self.assertEqual(self.worker.in_flight, 1)

    def test_drain_timeout_leaves_a_dispatch_alone(self) -> None:
        """Stopping must not turn an unanswered dispatch into a failed (here: final) attempt."""

        class SilentClient:
            def __init__(self) -> None:
                self.requests: list[Deferred[Any]] = []

            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                self.requests.append(Deferred())
                return self.requests[-1]

        client = SilentClient()
        worker = Worker(
            self.clock,
            self.broker,
            self.store,
            Dispatcher(client, self.clock, {APP: "http://lb"}),
            short_wait=SHORT_WAIT,
        )
        self.broker.consume(APP, QUEUE, worker.handler)
        task = self.enqueue(name="t", retry_options={"task_retry_limit": 0})
        delivery = self.broker.deliver(task)
        self.assertEqual(len(client.requests), 1)
        drained = Deferred.fromCoroutine(worker.drain(3))
        self.clock.advance(3)
        self.successResultOf(drained)
        self.assertFalse(client.requests[0].called)  # the request was not cancelled
        self.assertFalse(delivery.settled)  # left for the broker to redeliver
        self.assertEqual(self.fields("t")["state"], "running")
        self.assertEqual(worker.in_flight, 1)
