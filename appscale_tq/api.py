"""The task queue's operations, shared by the JSON API and the App Engine protocol.

Composes the store and the broker through their interfaces: a task is acknowledged only once
its name is reserved and the broker confirmed the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import yaml
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from appscale_tq.config import NodeConfig
from appscale_tq.errors import TaskQueueError, Unavailable
from appscale_tq.names import check_queue_name, check_task_name, new_token
from appscale_tq.tasks import Limits, Task, rfc3339, task_from_request

log = Logger()

MAX_BATCH = 100


class TaskQueue:
    def __init__(
        self,
        clock: IReactorTime,
        config: NodeConfig,
        store: Any,
        broker: Any,
        token: Callable[[], str] = new_token,
        registry: Any = None,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._config = config
        self._store = store
        self._broker = broker
        self._token = token
        self._limits = Limits(max_task_bytes=config.max_task_bytes)
        self._declared: set[tuple[str, str]] = set()  # work queues this node declared

    # --- names ---------------------------------------------------------------------------------
    def check_queue(self, app: str, queue: str) -> None:
        if app not in self._config.apps:
            raise TaskQueueError("UNKNOWN_QUEUE", f"app: {app!r} is not served by this node")
        check_queue_name(queue)
        if queue not in self.queues(app):
            raise TaskQueueError("UNKNOWN_QUEUE", f"queue: {queue!r} is not defined for {app!r}")

    def queues(self, app: str) -> Sequence[str]:
        if self._registry is None:
            return ("default",)
        return self._registry.queue_names(app)

    def check_push_queue(self, app: str, queue: str) -> None:
        self.check_queue(app, queue)
        if self._registry is not None:
            q = self._registry.queue(app, queue)
            if q is not None and q.mode != "push":
                raise TaskQueueError(
                    "INVALID_QUEUE_MODE", f"queue: {queue!r} is a pull queue; push tasks only"
                )

    # --- enqueue -------------------------------------------------------------------------------
    def parse(self, app: str, queue: str, body: object) -> Task:
        task, _ = task_from_request(
            app, queue, body, self._clock.seconds(), self._limits, self._token
        )
        return task

    async def _ensure_work_queue(self, app: str, queue: str) -> None:
        """Declare a push queue's work queue on this node before its first enqueue or purge.

        A node that learned a queue from a queue.yaml file or from another node and does not
        consume it (rate 0/s, paused) never declared it: the broker would return every message
        unroutable (503 forever), and purging a missing queue closes the AMQP channel.
        """
        if self._registry is None or (app, queue) in self._declared:
            return
        if (app, queue) in self._broker.consuming():
            self._declared.add((app, queue))  # consuming declared it (durable from then on)
            return
        await self._declare_work_queue(app, queue)

    async def _declare_work_queue(self, app: str, queue: str) -> None:
        """Declare now, bounded by the AMQP timeout; Unavailable if the broker does not answer."""
        declared = Deferred.fromCoroutine(self._broker.ensure_queue(app, queue))
        declared.addTimeout(self._config.amqp_timeout, self._clock)
        try:
            await declared
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable("rabbitmq", f"could not declare queue {queue!r}: {e!r}") from None
        self._declared.add((app, queue))

    async def add(self, task: Task) -> Task:
        """Reserve the name, publish (confirmed by the broker), keep the record; or raise."""
        [result] = await self.add_many([task])
        if isinstance(result, (TaskQueueError, Unavailable)):
            raise result
        return result

    async def add_many(self, tasks: list[Task]) -> list[Task | TaskQueueError | Unavailable]:
        """add() for each task, in order, with two store round trips for the whole batch (one
        to reserve every name, one to keep the records of those the broker confirmed)."""
        if not tasks:
            return []
        for app, queue in {(t.app, t.queue) for t in tasks}:
            await self._ensure_work_queue(app, queue)
        try:
            reserved = await self._store.reserve_many(tasks)
        except Unavailable as e:
            return [e] * len(tasks)
        results: list[Task | TaskQueueError | Unavailable] = list(reserved)  # type: ignore
        now = self._clock.seconds()

        async def publish(i: int, task: Task) -> None:
            try:
                await self._broker.publish(task, task.eta - now)
                results[i] = task
            except Unavailable as e:
                results[i] = e

        todo = [(i, attrs.evolve(t, gen=r)) for i, (t, r) in enumerate(zip(tasks, reserved))
                if not isinstance(r, TaskQueueError)]
        await gatherResults([Deferred.fromCoroutine(publish(i, t)) for i, t in todo])
        kept = [t for i, t in todo if isinstance(results[i], Task)]
        for i, task in todo:
            if isinstance(results[i], Unavailable):
                try:
                    await self._store.release(task)
                except Unavailable:
                    pass  # the reservation expires by itself
        if kept:
            try:
                await self._store.confirm_many(kept)
            except Unavailable as e:
                log.warn("enqueued {n} tasks but could not keep their records: {error}",
                         n=len(kept), error=str(e))
        return results

    async def add_json(self, app: str, queue: str, body: object) -> Task:
        self.check_push_queue(app, queue)
        return await self.add(self.parse(app, queue, body))

    async def add_batch_json(self, app: str, queue: str, items: object) -> list[dict[str, Any]]:
        """Independent per-task results, in order: ``{"name", "eta"}`` or ``{"error"}``."""
        self.check_push_queue(app, queue)
        if not isinstance(items, list):
            raise TaskQueueError("INVALID_REQUEST", "tasks: must be a list")
        if len(items) > MAX_BATCH:
            raise TaskQueueError("TOO_MANY_TASKS", f"tasks: at most {MAX_BATCH} in one batch")
        results: list[dict[str, Any]] = [{} for _ in items]
        seen: set[str] = set()
        pending: list[tuple[int, Task]] = []
        for i, item in enumerate(items):
            try:
                task = self.parse(app, queue, item)
            except TaskQueueError as e:
                results[i] = e.as_json()
                continue
            if task.name in seen:
                results[i] = TaskQueueError(
                    "DUPLICATE_TASK_NAME", f"tasks[{i}].name: {task.name!r} appears twice"
                ).as_json()
                continue
            seen.add(task.name)
            pending.append((i, task))

        added = await self.add_many([t for _, t in pending])
        for (i, task), result in zip(pending, added):
            if isinstance(result, Task):
                results[i] = task_summary(task)
            elif isinstance(result, Unavailable):
                results[i] = result.as_task_queue_error().as_json()
            else:
                results[i] = result.as_json()
        return results

    # --- state ---------------------------------------------------------------------------------
    async def get(self, app: str, queue: str, name: str) -> dict[str, Any]:
        self.check_queue(app, queue)
        check_task_name(name)  # the store's keys rely on names holding no ':'
        record = await self._store.get(app, queue, name)
        if record is None:
            raise TaskQueueError("UNKNOWN_TASK", f"name: no task {name!r} in queue {queue!r}")
        return task_view(name, queue, record)

    async def delete(self, app: str, queue: str, name: str) -> None:
        self.check_queue(app, queue)
        check_task_name(name)
        await self._store.delete(app, queue, name)


    # --- queues --------------------------------------------------------------------------------
    def _require_registry(self) -> Any:
        if self._registry is None:
            raise TaskQueueError("INVALID_REQUEST", "queue operations need a queue registry")
        return self._registry

    def check_app(self, app: str) -> None:
        if app not in self._config.apps:
            raise TaskQueueError("UNKNOWN_QUEUE", f"app: {app!r} is not served by this node")

    async def deploy(self, app: str, text: str) -> dict[str, Any]:
        self.check_app(app)
        config = await self._require_registry().deploy(app, text)
        body = config.as_dict()
        if self._broker is not None:
            # The deployment is stored and in force; a work queue the broker could not declare
            # now is declared by its consumer or its first enqueue instead.
            for name, q in config.queues.items():
                if q.mode != "push":
                    continue
                try:
                    await self._declare_work_queue(app, name)
                except Unavailable as e:
                    log.warn("deployed {app}'s queue.yaml; queue {queue} is declared later: {e}",
                             app=app, queue=name, e=str(e))
                    break  # the broker is away: the other queues would wait as long
        return body

    async def queue_info(self, app: str, queue: str) -> dict[str, Any]:
        self.check_queue(app, queue)
        q = self._require_registry().queue(app, queue)
        stats = await self._store.queue_stats(app, queue)
        rate = q.rate or 0.0
        if stats["paused"]:
            state = "paused"
        elif q.mode == "pull":
            state = "pull"
        elif rate <= 0:
            state = "disabled"
        else:
            state = "running"
        return {
            "name": queue,
            "mode": q.mode,
            "state": state,
            "rate": q.rate_text,
            "rate_per_second": rate,
            "enforced_rate_per_second": rate * stats["rate_factor"],
            "bucket_size": q.bucket_size,
            "max_concurrent_requests": q.max_concurrent_requests,
            "target": q.target,
            "retry_parameters": q.retry.as_dict(),
            "tasks": stats["tasks"],
            "oldest_eta": rfc3339(stats["oldest_eta"]) if stats["oldest_eta"] else None,
            "oldest_eta_seconds": stats["oldest_eta"],
            "in_flight": stats["in_flight"],
            "executed_last_minute": stats["executed_last_minute"],
        }

    async def update_queue(self, app: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Create or replace one queue of the app's deployed queue.yaml (the SDK's UpdateQueue)."""
        self.check_app(app)
        _, text = await self._store.queue_yaml(app)
        try:
            document = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            document = None
        if not isinstance(document, dict):
            document = {}
        queues = [q for q in document.get("queue") or []
                  if not (isinstance(q, dict) and q.get("name") == definition["name"])]
        document["queue"] = queues + [definition]
        return await self.deploy(app, yaml.safe_dump(document, sort_keys=False))

    async def list_queues(self, app: str) -> list[dict[str, Any]]:
        self.check_app(app)
        return [await self.queue_info(app, name) for name in self.queues(app)]

    async def set_paused(self, app: str, queue: str, paused: bool) -> dict[str, Any]:
        self.check_queue(app, queue)
        await self._store.set_paused(app, queue, paused)
        await self._require_registry().refresh()
        return await self.queue_info(app, queue)

    async def purge(self, app: str, queue: str) -> dict[str, Any]:
        """Tasks enqueued before now never run, wherever they wait.

        The broker's ready messages are dropped first, then the store's purge generation moves
        on (and ends the queued records): a task enqueued meanwhile either got the old
        generation (its record ends purged, any copy is skipped) or the new one, whose message
        the broker purge can no longer reach. The other order lost such tasks, queued forever.
        """
        self.check_queue(app, queue)
        q = self._registry.queue(app, queue) if self._registry is not None else None
        try:
            if q is None or q.mode == "push":  # a pull queue has no work queue in the broker
                await self._ensure_work_queue(app, queue)
                dropped = Deferred.fromCoroutine(self._broker.purge(app, queue))
                dropped.addTimeout(self._config.amqp_timeout, self._clock)
                await dropped
        except Exception as e:  # best effort: the purge generation stops every copy anyway
            log.warn("could not drop {queue}'s messages in the broker; the purge generation "
                     "skips them: {e}", queue=queue, e=str(e))
        await self._store.purge(app, queue)
        return await self.queue_info(app, queue)


def task_summary(task: Task) -> dict[str, Any]:
    return {"name": task.name, "queue": task.queue, "eta": rfc3339(task.eta)}


def task_view(name: str, queue: str, record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "queue": queue,
        "state": record["state"],
        "retry_count": record["retry_count"],
        "execution_count": record["execution_count"],
        "eta": rfc3339(record["eta"]),
        "last_response": record["last_response"],
        "last_error": record.get("last_error"),
    }
