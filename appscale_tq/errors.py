"""Task-queue errors carrying App Engine's error code names; pure."""

from __future__ import annotations

# App Engine TaskQueueServiceError code name -> HTTP status of the JSON API.
HTTP_STATUS: dict[str, int] = {
    "UNKNOWN_QUEUE": 404,
    "TRANSIENT_ERROR": 503,
    "INTERNAL_ERROR": 500,
    "TASK_TOO_LARGE": 413,
    "INVALID_TASK_NAME": 400,
    "INVALID_QUEUE_NAME": 400,
    "INVALID_URL": 400,
    "INVALID_QUEUE_RATE": 400,
    "PERMISSION_DENIED": 403,
    "TASK_ALREADY_EXISTS": 409,
    "TOMBSTONED_TASK": 409,
    "INVALID_ETA": 400,
    "INVALID_REQUEST": 400,
    "UNKNOWN_TASK": 404,
    "TOMBSTONED_QUEUE": 409,
    "DUPLICATE_TASK_NAME": 400,
    "SKIPPED": 400,
    "TOO_MANY_TASKS": 400,
    "INVALID_PAYLOAD": 400,
    "INVALID_RETRY_PARAMETERS": 400,
    "INVALID_QUEUE_MODE": 400,
    "QUEUE_PAUSED": 400,
    "INVALID_DISPATCH_DEADLINE": 400,
}


class TaskQueueError(Exception):
    """A refusal the caller can act on: an App Engine code and a message naming the field."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown task queue error code {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def as_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def invalid(field: str, why: str) -> TaskQueueError:
    return TaskQueueError("INVALID_REQUEST", f"{field}: {why}")


class Unavailable(Exception):
    """A backing service (broker or store) did not answer in time; maps to TRANSIENT_ERROR."""

    def __init__(self, service: str, why: str) -> None:
        super().__init__(service, why)
        self.service = service
        self.why = why

    def __str__(self) -> str:
        return f"{self.service} unavailable: {self.why}"

    def as_task_queue_error(self) -> TaskQueueError:
        return TaskQueueError("TRANSIENT_ERROR", str(self))
