"""Names of apps, queues and tasks: the rules and generation; pure."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable

from appscale_tq.errors import TaskQueueError

TASK_NAME = re.compile(r"[a-zA-Z0-9_-]{1,500}", re.ASCII)
QUEUE_NAME = re.compile(r"[a-zA-Z0-9-]{1,100}", re.ASCII)
# App Engine app ids: letters, digits, hyphens, an optional "domain:" prefix and "s~"-style
# partition prefix.
APP_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9.:~_-]{0,99}", re.ASCII)
MAX_TASK_NAME = 500


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise TaskQueueError(
            "INVALID_TASK_NAME",
            f"name: {shown} must match ^[a-zA-Z0-9_-]{{1,{MAX_TASK_NAME}}}$",
        )
    return name


def check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise TaskQueueError(
            "INVALID_QUEUE_NAME", f"queue: {repr(name)[:80]} must match ^[a-zA-Z0-9-]{{1,100}}$"
        )
    return name


def is_app_id(app: str) -> bool:
    return APP_ID.fullmatch(app) is not None


# 64 random bits per process, then a counter: unique cluster-wide (a clash needs two processes
# drawing the same prefix), and without a getrandom call per task.
_PREFIX = uuid.uuid4().hex[:16]
_COUNTER = itertools.count(1)


def new_token() -> str:
    return f"{_PREFIX}{next(_COUNTER):016x}"


def generate_task_name(token: Callable[[], str] = new_token) -> str:
    """A unique name for a task enqueued without one (App Engine names these itself)."""
    return "task-" + token()
