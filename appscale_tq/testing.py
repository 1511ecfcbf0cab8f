"""Public fakes for fast unit tests: a memory store and a fake broker.

``MemoryStore`` keeps exactly the semantics of the Lua scripts in ``appscale_tq.store`` (fields
stored as text, as Redis does; expiry driven by an injected clock). ``FakeBroker`` records what
is published and lets a test deliver tasks to the registered handlers. Both have a ``down``
switch that makes every call raise ``Unavailable``, to simulate an outage.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from appscale_tq.errors import TaskQueueError, Unavailable
from appscale_tq.interfaces import GO, STALE, Gate, IBroker, IStore
from appscale_tq.store import PENDING_TTL, record_view
from appscale_tq.tasks import Task, task_to_headers

NINE_DAYS = 9 * 86400
_TERMINAL = ("completed", "error", "deleted")

Key = tuple[str, str, str]


class _Record:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.expires: float | None = None  # clock time; None = persistent


@implementer(IStore)
class MemoryStore:
    """``IStore`` in memory, mirroring ``RedisStore`` (and its Lua scripts) call for call."""

    def __init__(self, clock: IReactorTime, *, tombstone_seconds: float = NINE_DAYS) -> None:
        self._clock = clock
        self._tombstone = int(tombstone_seconds)
        self._records: dict[Key, _Record] = {}
        self.down = False
        self.gens: dict[tuple[str, str], int] = {}
        self.paused: dict[str, set[str]] = {}
        self.slowed: list[tuple[str, str]] = []
        self.leases: dict[tuple[str, str], set[str]] = {}
        self.yamls: dict[str, tuple[int, str]] = {}

    # --- helpers -------------------------------------------------------------------------------
    def _check(self, what: str) -> None:
        if self.down:
            raise Unavailable("redis", f"{what}: the memory store is down")

    def _live(self, key: Key) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires is not None:
            if record.expires <= self._clock.seconds():
                del self._records[key]
                return None
        return record

    def _hset(self, key: Key, **fields: Any) -> _Record:
        record = self._live(key)
        if record is None:
            record = self._records[key] = _Record()
        record.fields.update({k: str(v) for k, v in fields.items()})
        return record

    def _expire(self, record: _Record, seconds: int) -> None:
        record.expires = self._clock.seconds() + seconds

    @staticmethod
    def _key(task: Task) -> Key:
        return (task.app, task.queue, task.name)

    # --- for tests -----------------------------------------------------------------------------
    def fields(self, app: str, queue: str, name: str) -> dict[str, str] | None:
        """The raw stored fields of a live record (a copy), or None."""
        record = self._live((app, queue, name))
        return None if record is None else dict(record.fields)

    def expires(self, app: str, queue: str, name: str) -> float | None:
        """When the live record expires (clock time), None if it is persistent."""
        record = self._live((app, queue, name))
        return None if record is None else record.expires

    # --- IStore --------------------------------------------------------------------------------
    async def reserve(self, task: Task) -> int:
        self._check("reserve")
        key = self._key(task)
        record = self._live(key)
        state = record.fields.get("state") if record is not None else None
        if state is None:
            record = self._hset(
                key,
                state="queued",
                tid=task.tid,
                eta=repr(task.eta),
                created=repr(task.created),
                retry=0,
                exec=0,
            )
            self._expire(record, PENDING_TTL)
            return self.gens.get((task.app, task.queue), 0)
        if state in ("queued", "running"):
            raise TaskQueueError(
                "TASK_ALREADY_EXISTS", f"name: task {task.name!r} is already {state}"
            )
        raise TaskQueueError(
            "TOMBSTONED_TASK", f"name: task {task.name!r} was {state} and its name is tombstoned"
        )

    async def reserve_many(self, tasks: list[Task]) -> list[int | TaskQueueError]:
        self._check("reserve_many")
        out: list[int | TaskQueueError] = []
        for task in tasks:
            try:
                out.append(await self.reserve(task))
            except TaskQueueError as e:
                out.append(e)
        return out

    async def confirm_many(self, tasks: list[Task]) -> None:
        self._check("confirm_many")
        for task in tasks:
            await self.confirm(task)

    async def confirm(self, task: Task) -> None:
        self._check("confirm")
        record = self._live(self._key(task))
        if record is None:
            return
        f = record.fields
        if f.get("tid") == task.tid and f.get("state") in ("queued", "running"):
            record.expires = None

    async def release(self, task: Task) -> None:
        self._check("release")
        key = self._key(task)
        record = self._live(key)
        if record is None:
            return
        if record.fields.get("tid") == task.tid and record.fields.get("state") == "queued":
            del self._records[key]

    async def begin(self, task: Task, gate: Gate | None = None) -> str:
        self._check("begin")
        key = self._key(task)
        record = self._live(key)
        state = record.fields.get("state") if record is not None else None
        if record is not None and record.fields.get("tid") not in (None, task.tid):
            return STALE
        if state in _TERMINAL:
            return state
        if task.gen < self.gens.get((task.app, task.queue), 0):
            record = self._hset(key, state="deleted", tid=task.tid, reason="purged")
            self._expire(record, self._tombstone)
            return "purged"
        if record is not None and state is not None and task.retry_count < int(
                record.fields.get("retry", "0")):
            return STALE
        if gate is not None:
            wait = await self._acquire(task.app, task.queue, gate.rate, gate.bucket_size,
                                      gate.max_concurrent, gate.lease, gate.lease_seconds)
            if wait is None:
                return "paused"
            if wait > 0:
                return f"wait:{wait}"
        if record is None or state is None:
            self._hset(
                key,
                state="running",
                tid=task.tid,
                retry=task.retry_count,
                exec=task.execution_count,
                eta=repr(task.eta),
                created=repr(task.created),
            )
            return GO
        f = record.fields
        if f.get("tid") != task.tid:
            return STALE
        if state in _TERMINAL:
            return state
        if task.retry_count < int(f.get("retry", "0")):
            return STALE
        self._hset(key, state="running", retry=task.retry_count, exec=task.execution_count)
        record.expires = None
        return GO

    def _record(self, task: Task, state: str, status: int | None, reason: str, ttl: int) -> str:
        key = self._key(task)
        record = self._live(key)
        if record is not None:
            f = record.fields
            if f.get("tid") is not None and f.get("tid") != task.tid:
                return "stale"
            if f.get("state") in _TERMINAL:
                return f["state"]
            recorded = int(f.get("retry", "0") or 0)
            if recorded > task.retry_count:
                return "stale"
            if state == "queued" and f.get("state") == "running" and recorded == task.retry_count:
                return "moved"  # the retry copy already started somewhere
        record = self._hset(
            key,
            state=state,
            tid=task.tid,
            retry=task.retry_count,
            exec=task.execution_count,
            last="" if status is None else status,
            reason=reason,
            eta=repr(task.eta),
        )
        if ttl > 0:
            self._expire(record, ttl)
        return "ok"

    def _drop_lease(self, task: Task, lease: str) -> None:
        self.leases.get((task.app, task.queue), set()).discard(lease)

    async def record_success(self, task: Task, status: int, lease: str = "") -> None:
        self._check("record_success")
        self._drop_lease(task, lease)
        self._record(task, "completed", status, "", self._tombstone)

    async def record_retry(
        self, task: Task, status: int | None, reason: str, lease: str = ""
    ) -> None:
        self._check("record_retry")
        self._drop_lease(task, lease)
        self._record(task, "queued", status, reason, 0)

    async def record_failure(
        self, task: Task, status: int | None, reason: str, lease: str = ""
    ) -> None:
        self._check("record_failure")
        self._drop_lease(task, lease)
        self._record(task, "error", status, reason, self._tombstone)

    async def delete(self, app: str, queue: str, name: str) -> None:
        self._check("delete")
        record = self._live((app, queue, name))
        state = record.fields.get("state") if record is not None else None
        if record is None or state is None:
            raise TaskQueueError("UNKNOWN_TASK", f"name: no task {name!r} in queue {queue!r}")
        if state in _TERMINAL:
            raise TaskQueueError("TOMBSTONED_TASK", f"name: task {name!r} has already ended")
        record.fields["state"] = "deleted"
        self._expire(record, self._tombstone)

    async def get(self, app: str, queue: str, name: str) -> dict[str, Any] | None:
        self._check("get")
        record = self._live((app, queue, name))
        if record is None or not record.fields:
            return None
        return record_view(dict(record.fields))

    async def ping(self) -> None:
        self._check("ping")

    # --- queues (no token arithmetic: a paused or rate-0 queue waits, any other goes) ----------
    async def _acquire(
        self, app: str, queue: str, rate: float, bucket: int, max_concurrent: int | None,
        lease: str, lease_seconds: float,
    ) -> float | None:
        self._check("begin")
        if queue in self.paused.get(app, set()) or rate <= 0:
            return None
        held = self.leases.setdefault((app, queue), set())
        if max_concurrent and len(held) >= max_concurrent:
            return 0.05
        held.add(lease)
        return 0.0

    async def renew(self, app: str, queue: str, lease: str, lease_seconds: float) -> None:
        self._check("renew")

    async def release_lease(self, app: str, queue: str, lease: str) -> None:
        self._check("release_lease")
        self.leases.get((app, queue), set()).discard(lease)

    async def slow_down(self, app: str, queue: str) -> None:
        self._check("slow_down")
        self.slowed.append((app, queue))

    async def purge(self, app: str, queue: str) -> int:
        self._check("purge")
        self.gens[(app, queue)] = self.gens.get((app, queue), 0) + 1
        return self.gens[(app, queue)]

    async def set_paused(self, app: str, queue: str, paused: bool) -> None:
        self._check("set_paused")
        names = self.paused.setdefault(app, set())
        (names.add if paused else names.discard)(queue)

    async def paused_queues(self, app: str) -> set[str]:
        self._check("paused_queues")
        return set(self.paused.get(app, set()))

    async def queue_stats(self, app: str, queue: str) -> dict[str, Any]:
        self._check("queue_stats")
        live = [
            r for (a, q, _), r in list(self._records.items())
            if a == app and q == queue and self._live((a, q, _)) is not None
            and r.fields.get("state") in ("queued", "running")
        ]
        etas = [float(r.fields.get("eta", "0")) for r in live]
        return {
            "tasks": len(live),
            "oldest_eta": min(etas) if etas else None,
            "in_flight": len(self.leases.get((app, queue), set())),
            "executed_last_minute": 0,
            "paused": queue in self.paused.get(app, set()),
            "rate_factor": 1.0,
            "purge_generation": self.gens.get((app, queue), 0),
        }

    async def deploy_queue_yaml(self, app: str, text: str) -> int:
        self._check("deploy_queue_yaml")
        version = self.yamls.get(app, (0, ""))[0] + 1
        self.yamls[app] = (version, text)
        return version

    async def queue_yaml(self, app: str) -> tuple[int, str | None]:
        self._check("queue_yaml")
        version, text = self.yamls.get(app, (0, None))
        return version, text

    async def queue_yaml_versions(self, apps: list[str]) -> dict[str, int]:
        self._check("queue_yaml_versions")
        return {app: self.yamls.get(app, (0, ""))[0] for app in apps}


class FakeDelivery:
    """A delivered message; records whether it was acked or requeued."""

    def __init__(
        self, headers: dict[str, Any] | None, body: bytes, redelivered: bool = False
    ) -> None:
        self.headers = headers
        self.body = body
        self.redelivered = redelivered
        self.acked = False
        self.requeued = False
        # what the handler returned, as a Deferred (set by FakeBroker.deliver)
        self.done: Deferred[Any] | None = None

    def ack(self) -> bool:
        if self.acked or self.requeued:
            raise AssertionError("a delivery is settled (acked or requeued) only once")
        self.acked = True
        return True

    def requeue(self) -> bool:
        if self.acked or self.requeued:
            raise AssertionError("a delivery is settled (acked or requeued) only once")
        self.requeued = True
        return True

    @property
    def settled(self) -> bool:
        return self.acked or self.requeued


@implementer(IBroker)
class FakeBroker:
    """``IBroker`` in memory.

    ``published`` holds ``(task, delay)`` for every confirmed publish. With ``hold`` set, a
    publish waits for the test: each waiting publish appends a Deferred to ``held``; firing it
    with None confirms (and records) the publish, errbacking it fails the publish.
    """

    def __init__(self) -> None:
        self.published: list[tuple[Task, float]] = []
        self.handlers: dict[tuple[str, str], Any] = {}
        self.down = False
        self.hold = False
        self.held: list[Deferred[None]] = []
        self.purged: list[tuple[str, str]] = []
        self.ensured: list[tuple[str, str]] = []

    @property
    def connected(self) -> bool:
        return not self.down

    def consuming(self) -> set[tuple[str, str]]:
        return set(self.handlers)

    def stop(self, app: str, queue: str) -> None:
        self.handlers.pop((app, queue), None)

    async def ensure_queue(self, app: str, queue: str) -> None:
        if self.down:
            raise Unavailable("rabbitmq", "the fake broker is down")
        self.ensured.append((app, queue))

    async def purge(self, app: str, queue: str) -> None:
        if self.down:
            raise Unavailable("rabbitmq", "the fake broker is down")
        self.purged.append((app, queue))

    async def publish(self, task: Task, delay: float = 0.0) -> None:
        if self.down:
            raise Unavailable("rabbitmq", "the fake broker is down")
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            await d
            if self.down:
                raise Unavailable("rabbitmq", "the fake broker went down before confirming")
        self.published.append((task, delay))

    def consume(self, app: str, queue: str, handler: Any) -> None:
        self.handlers[(app, queue)] = handler

    def deliver(self, task: Task, redelivered: bool = False) -> FakeDelivery:
        """Build ``task``'s message as the broker would and hand it to its queue's handler."""
        delivery = FakeDelivery(dict(task_to_headers(task)), task.payload, redelivered)
        self.deliver_raw(task.app, task.queue, delivery)
        return delivery

    def deliver_raw(self, app: str, queue: str, delivery: FakeDelivery) -> FakeDelivery:
        """Hand any delivery (a malformed one, say) to the handler of ``app``/``queue``."""
        handler = self.handlers[(app, queue)]
        result = handler(delivery)
        delivery.done = ensureDeferred(result) if result is not None else succeed(None)
        return delivery


__all__ = ["MemoryStore", "FakeBroker", "FakeDelivery"]
