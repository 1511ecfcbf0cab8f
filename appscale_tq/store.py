"""Task names and states in Redis: the only module that imports txredisapi."""

from __future__ import annotations

import hashlib
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from appscale_tq.errors import TaskQueueError, Unavailable
from appscale_tq.interfaces import GO, STALE, IStore
from appscale_tq.tasks import Task

log = Logger()

# A reservation that the broker never confirmed frees itself after this long.
PENDING_TTL = 300

_RESERVE = """
local s = redis.call('HGET', KEYS[1], 'state')
if s then return s end
redis.call('HSET', KEYS[1], 'state', 'queued', 'tid', ARGV[1], 'eta', ARGV[2],
           'created', ARGV[3], 'retry', 0, 'exec', 0)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 'ok'
"""

_CONFIRM = """
local r = redis.call('HMGET', KEYS[1], 'state', 'tid')
if r[2] == ARGV[1] and (r[1] == 'queued' or r[1] == 'running') then
  redis.call('PERSIST', KEYS[1])
end
return 'ok'
"""

_RELEASE = """
local r = redis.call('HMGET', KEYS[1], 'state', 'tid')
if r[2] == ARGV[1] and r[1] == 'queued' then redis.call('DEL', KEYS[1]) end
return 'ok'
"""

_BEGIN = """
local r = redis.call('HMGET', KEYS[1], 'state', 'tid', 'retry')
if not r[1] then
  redis.call('HSET', KEYS[1], 'state', 'running', 'tid', ARGV[1], 'retry', ARGV[2],
             'exec', ARGV[3], 'eta', ARGV[4], 'created', ARGV[5])
  return 'go'
end
if r[2] ~= ARGV[1] then return 'stale' end
if r[1] == 'completed' or r[1] == 'error' or r[1] == 'deleted' then return r[1] end
if tonumber(ARGV[2]) < tonumber(r[3]) then return 'stale' end
redis.call('HSET', KEYS[1], 'state', 'running', 'retry', ARGV[2], 'exec', ARGV[3])
redis.call('PERSIST', KEYS[1])
return 'go'
"""

# ARGV: tid, new state, retry, exec, last response, reason, eta, ttl (0 = keep)
_RECORD = """
local r = redis.call('HMGET', KEYS[1], 'state', 'tid', 'retry')
if r[2] and r[2] ~= ARGV[1] then return 'stale' end
if r[1] == 'deleted' or r[1] == 'completed' or r[1] == 'error' then return r[1] end
local recorded = tonumber(r[3] or '0') or 0
if recorded > tonumber(ARGV[3]) then return 'stale' end
if ARGV[2] == 'queued' and r[1] == 'running' and recorded == tonumber(ARGV[3]) then
  return 'moved'
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'tid', ARGV[1], 'retry', ARGV[3],
           'exec', ARGV[4], 'last', ARGV[5], 'reason', ARGV[6], 'eta', ARGV[7])
if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[8]) end
return 'ok'
"""

_DELETE = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'missing' end
if s == 'completed' or s == 'error' or s == 'deleted' then return 'tombstoned' end
redis.call('HSET', KEYS[1], 'state', 'deleted')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'ok'
"""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def record_view(fields: dict[str, str]) -> dict[str, Any]:
    """A stored record as the API shows it."""
    last = fields.get("last", "")
    return {
        "state": fields.get("state", "queued"),
        "retry_count": int(fields.get("retry", "0") or 0),
        "execution_count": int(fields.get("exec", "0") or 0),
        "eta": float(fields.get("eta", "0") or 0),
        "last_response": int(last) if last.isdigit() else None,
        "last_error": fields.get("reason") or None,
    }


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def task_key(namespace: str, app: str, queue: str, name: str) -> str:
    # queue and task names hold no ':', so the key is unambiguous however the app id reads
    return f"{namespace}:t:{app}:{queue}:{name}"


@implementer(IStore)
class RedisStore:
    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        *,
        namespace: str = "tq",
        timeout: float = 3.0,
        tombstone_seconds: float = 9 * 86400,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._ns = namespace
        self._timeout = timeout
        self._tombstone = int(tombstone_seconds)

    @classmethod
    def connect(
        cls, host: str, port: int, db: int, password: str | None, clock: IReactorTime, **kw: Any
    ) -> RedisStore:
        redis = txredisapi.lazyConnectionPool(
            host,
            port,
            dbid=db,
            poolsize=4,
            reconnect=True,
            charset=None,
            password=password,
            convertNumbers=False,
            connectTimeout=kw.get("timeout", 3.0),
        )
        return cls(redis, clock, **kw)

    async def disconnect(self) -> None:
        await self._redis.disconnect()

    def _key(self, app: str, queue: str, name: str) -> str:
        return task_key(self._ns, app, queue, name)

    async def _call(self, what: str, d: Deferred[Any]) -> Any:
        d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except TimeoutError:
            raise Unavailable("redis", f"{what} got no answer in {self._timeout:g} s") from None
        except (txredisapi.ConnectionError, ConnectionError) as e:
            raise Unavailable("redis", f"{what}: {e}") from None

    async def _script(self, script: _Script, keys: list[str], args: list[Any]) -> str:
        try:
            result = await self._call("script", self._redis.evalsha(script.sha, keys, args))
        except txredisapi.ScriptDoesNotExist:
            result = await self._call("script", self._redis.eval(script.source, keys, args))
        return _text(result)

    async def reserve(self, task: Task) -> None:
        key = self._key(task.app, task.queue, task.name)
        args = [task.tid, repr(task.eta), repr(task.created), PENDING_TTL]
        state = await self._script(RESERVE, [key], args)
        if state == "ok":
            return
        if state in ("queued", "running"):
            raise TaskQueueError(
                "TASK_ALREADY_EXISTS", f"name: task {task.name!r} is already {state}"
            )
        raise TaskQueueError(
            "TOMBSTONED_TASK", f"name: task {task.name!r} was {state} and its name is tombstoned"
        )

    async def confirm(self, task: Task) -> None:
        await self._script(CONFIRM, [self._key(task.app, task.queue, task.name)], [task.tid])

    async def release(self, task: Task) -> None:
        await self._script(RELEASE, [self._key(task.app, task.queue, task.name)], [task.tid])

    async def begin(self, task: Task) -> str:
        key = self._key(task.app, task.queue, task.name)
        args = [task.tid, task.retry_count, task.execution_count, repr(task.eta), repr(task.created)]
        return await self._script(BEGIN, [key], args)

    async def _record(
        self, task: Task, state: str, status: int | None, reason: str, ttl: int
    ) -> str:
        key = self._key(task.app, task.queue, task.name)
        args = [
            task.tid,
            state,
            task.retry_count,
            task.execution_count,
            "" if status is None else status,
            reason,
            repr(task.eta),
            ttl,
        ]
        return await self._script(RECORD, [key], args)

    async def record_success(self, task: Task, status: int) -> None:
        await self._record(task, "completed", status, "", self._tombstone)

    async def record_retry(self, task: Task, status: int | None, reason: str) -> None:
        await self._record(task, "queued", status, reason, 0)

    async def record_failure(self, task: Task, status: int | None, reason: str) -> None:
        await self._record(task, "error", status, reason, self._tombstone)

    async def delete(self, app: str, queue: str, name: str) -> None:
        result = await self._script(DELETE, [self._key(app, queue, name)], [self._tombstone])
        if result == "missing":
            raise TaskQueueError("UNKNOWN_TASK", f"name: no task {name!r} in queue {queue!r}")
        if result == "tombstoned":
            raise TaskQueueError("TOMBSTONED_TASK", f"name: task {name!r} has already ended")

    async def get(self, app: str, queue: str, name: str) -> dict[str, Any] | None:
        raw = await self._call("get", self._redis.hgetall(self._key(app, queue, name)))
        if not raw:
            return None
        return record_view({_text(k): _text(v) for k, v in raw.items()})

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping())


RESERVE = _Script(_RESERVE)
CONFIRM = _Script(_CONFIRM)
RELEASE = _Script(_RELEASE)
BEGIN = _Script(_BEGIN)
RECORD = _Script(_RECORD)
DELETE = _Script(_DELETE)
__all__ = ["RedisStore", "GO", "STALE", "record_view", "task_key"]
