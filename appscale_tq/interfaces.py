"""The seams between the core and the edges: zope interfaces; pure."""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import Attribute, Interface

# Verdicts of IStore.begin
GO = "go"
STALE = "stale"  # an older copy of a task that has moved on (retried or re-enqueued)


@attrs.frozen
class Gate:
    """A queue's limits and the lease a dispatch takes under them (see IStore.begin)."""

    rate: float
    bucket_size: int
    max_concurrent: int | None
    lease: str
    lease_seconds: float


class IStore(Interface):
    """Task names and states, cluster-wide (Redis in production)."""

    async def reserve(task: Any) -> None:
        """Record a new task as queued; TASK_ALREADY_EXISTS / TOMBSTONED_TASK if the name is
        taken. The record expires by itself unless confirm() follows."""

    async def confirm(task: Any) -> None:
        """The broker confirmed the task: keep its record until it ends."""

    async def release(task: Any) -> None:
        """The publish failed: free the name again."""

    async def begin(task: Any, gate: Any = None) -> str:
        """Before dispatch: GO, STALE, or the terminal state that makes the copy moot; with a
        Gate, also takes the queue's token and slot: 'paused' or 'wait:<seconds>' if none."""

    async def record_success(task: Any, status: int) -> None:
        """Completed: the name is tombstoned."""

    async def record_retry(task: Any, status: int | None, reason: str) -> None:
        """A failed attempt whose retry copy (``task``) the broker confirmed."""

    async def record_failure(task: Any, status: int | None, reason: str) -> None:
        """Out of retries: state error, name tombstoned, last response kept."""

    async def delete(app: str, queue: str, name: str) -> None:
        """The task never runs; UNKNOWN_TASK or TOMBSTONED_TASK when it cannot be deleted."""

    async def get(app: str, queue: str, name: str) -> dict[str, Any] | None:
        """The task's record, or None."""

    async def ping() -> None:
        """Raise Unavailable unless the store answers."""


class IBroker(Interface):
    """Durable task messages (RabbitMQ in production)."""

    connected = Attribute("True while a prepared connection is up")

    async def publish(task: Any, delay: float) -> None:
        """Store ``task`` durably, to be delivered after ``delay`` seconds; returns once the
        broker confirmed it; raises Unavailable otherwise."""

    def consume(app: str, queue: str, handler: Any) -> None:
        """Deliver the queue's tasks to ``handler(delivery)``, across reconnects."""


class IHTTPClient(Interface):
    """The part of treq's HTTPClient the dispatcher uses."""

    def request(method: str, url: str, **kwargs: Any) -> Any:
        """Send a request; a Deferred firing with a response."""
