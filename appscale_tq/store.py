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
from appscale_tq.interfaces import GO, STALE, Gate, IStore
from appscale_tq.tasks import Task

log = Logger()

# A reservation that the broker never confirmed frees itself after this long.
PENDING_TTL = 300

# begin()'s answer for a task that a purge made moot.
PURGED = "purged"

# Keys (the second part tells the kind; queue and task names hold no ':'):
#   <ns>:t:<app>:<queue>:<name>  hash   a task's record
#   <ns>:m:<app>:<queue>         hash   queue state: gen (purges), paused, tokens, ts, f0, t0
#   <ns>:z:<app>:<queue>         zset   tasks not yet ended, scored by ETA (statistics)
#   <ns>:l:<app>:<queue>         zset   dispatch leases, scored by expiry (concurrency)
#   <ns>:x:<app>:<queue>:<sec>   int    attempts finished in that second (statistics)
#   <ns>:c:<app>                 hash   the app's deployed queue.yaml and its version
#   <ns>:p:<app>                 set    the app's paused queues

_RESERVE = """
local s = redis.call('HGET', KEYS[1], 'state')
if s then return s end
redis.call('HSET', KEYS[1], 'state', 'queued', 'tid', ARGV[1], 'eta', ARGV[2],
           'created', ARGV[3], 'retry', 0, 'exec', 0)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
return 'ok:' .. (redis.call('HGET', KEYS[2], 'gen') or '0')
"""

# One call for a whole batch: KEYS are (task, queue state, queue zset) per task, ARGV are
# (tid, eta, created, pending ttl, name) per task; one answer per task, as _RESERVE's.
_RESERVE_MANY = """
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local k, a = i * 3, i * 5
  local s = redis.call('HGET', KEYS[k + 1], 'state')
  if s then
    out[i + 1] = s
  else
    redis.call('HSET', KEYS[k + 1], 'state', 'queued', 'tid', ARGV[a + 1], 'eta', ARGV[a + 2],
               'created', ARGV[a + 3], 'retry', 0, 'exec', 0)
    redis.call('EXPIRE', KEYS[k + 1], ARGV[a + 4])
    redis.call('ZADD', KEYS[k + 3], ARGV[a + 2], ARGV[a + 5])
    out[i + 1] = 'ok:' .. (redis.call('HGET', KEYS[k + 2], 'gen') or '0')
  end
end
return out
"""

_CONFIRM_MANY = """
for i = 1, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 'state', 'tid')
  if r[2] == ARGV[i] and (r[1] == 'queued' or r[1] == 'running') then
    redis.call('PERSIST', KEYS[i])
  end
end
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
if r[2] == ARGV[1] and r[1] == 'queued' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 'ok'
"""

# KEYS: task, queue state, queue zset. ARGV: tid, retry, exec, eta, created, gen, name, ttl
# KEYS: task, queue state, queue zset[, leases]. ARGV: tid, retry, exec, eta, created, gen,
# name, tombstone ttl[, rate, bucket size, max concurrent (0 = none), lease, lease seconds].
# With the gate arguments it also takes the queue's token and concurrency slot, in the same
# atomic step (one round trip per dispatch): 'paused', or 'wait:<seconds>' when none is free.
_BEGIN = """
local gen = tonumber(redis.call('HGET', KEYS[2], 'gen') or '0')
local r = redis.call('HMGET', KEYS[1], 'state', 'tid', 'retry')
if r[2] and r[2] ~= ARGV[1] then return 'stale' end
if r[1] == 'completed' or r[1] == 'error' or r[1] == 'deleted' then return r[1] end
if tonumber(ARGV[6]) < gen then
  redis.call('HSET', KEYS[1], 'state', 'deleted', 'tid', ARGV[1], 'reason', 'purged')
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('ZREM', KEYS[3], ARGV[7])
  return 'purged'
end
if r[1] and tonumber(ARGV[2]) < tonumber(r[3]) then return 'stale' end
if ARGV[9] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local m = redis.call('HMGET', KEYS[2], 'paused', 'tokens', 'ts', 'f0', 't0')
  local rate = tonumber(ARGV[9])
  if m[1] == '1' or rate <= 0 then return 'paused' end
  local bucket = tonumber(ARGV[10])
  local maxc = tonumber(ARGV[11])
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
    if redis.call('ZCARD', KEYS[4]) >= maxc then return 'wait:0.05' end
  end
  local f = 1
  if m[4] then f = math.min(1, tonumber(m[4]) + (now - tonumber(m[5])) / 60) end
  local erate = rate * f
  local tokens = bucket
  local ts = now
  if m[2] then tokens = tonumber(m[2]); ts = tonumber(m[3]) end
  tokens = math.min(bucket, tokens + math.max(0, now - ts) * erate)
  if tokens < 1 then
    redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
    return 'wait:' .. tostring((1 - tokens) / erate)
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[13]), ARGV[12])
end
if not r[1] then
  redis.call('HSET', KEYS[1], 'state', 'running', 'tid', ARGV[1], 'retry', ARGV[2],
             'exec', ARGV[3], 'eta', ARGV[4], 'created', ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[7])
  return 'go'
end
redis.call('HSET', KEYS[1], 'state', 'running', 'retry', ARGV[2], 'exec', ARGV[3])
redis.call('PERSIST', KEYS[1])
return 'go'
"""

# KEYS: task, queue zset, leases, attempts-per-second prefix (ARGV[12] ':' second appended)
# ARGV: tid, new state, retry, exec, last response, reason, eta, ttl (0 = keep), name,
#       lease, counts as an attempt (1/0), (unused)
_RECORD = """
if ARGV[10] ~= '' then redis.call('ZREM', KEYS[3], ARGV[10]) end
if ARGV[11] == '1' then
  local t = redis.call('TIME')
  local k = KEYS[4] .. ':' .. t[1]
  redis.call('INCR', k)
  redis.call('EXPIRE', k, 120)
end
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
if ARGV[2] == 'queued' then
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[9])
else
  redis.call('ZREM', KEYS[2], ARGV[9])
end
return 'ok'
"""

_DELETE = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'missing' end
if s == 'completed' or s == 'error' or s == 'deleted' then return 'tombstoned' end
redis.call('HSET', KEYS[1], 'state', 'deleted')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 'ok'
"""

_RENEW = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) + tonumber(ARGV[2]), ARGV[1])
return 'ok'
"""

# A 503 or 429 halves the queue's effective rate; it recovers linearly within a minute.
_SLOW_DOWN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local m = redis.call('HMGET', KEYS[1], 'f0', 't0')
local f = 1
if m[1] then f = math.min(1, tonumber(m[1]) + (now - tonumber(m[2])) / 60) end
redis.call('HSET', KEYS[1], 'f0', tostring(math.max(f / 2, 1 / 64)), 't0', tostring(now))
return 'ok'
"""

# KEYS: queue state, queue zset. ARGV: the queue's task key prefix, tombstone seconds.
# Tasks still queued end as deleted (reason purged): their messages are dropped from the
# broker or skipped by begin() (older generation), so nothing else would ever end them.
# Running ones are left to record their outcome. O(tasks in the queue).
_PURGE = """
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
for _, name in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local k = ARGV[1] .. name
  if redis.call('HGET', k, 'state') == 'queued' then
    redis.call('HSET', k, 'state', 'deleted', 'reason', 'purged')
    redis.call('EXPIRE', k, ARGV[2])
  end
end
redis.call('DEL', KEYS[2])
return tostring(gen)
"""

_PAUSE = """
if ARGV[1] == '1' then
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[1], 'paused', '1')
else
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[1], 'paused')
end
return 'ok'
"""

# KEYS: queue zset, leases, queue state. ARGV: attempts-per-second prefix.
_STATS = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local tasks = redis.call('ZCARD', KEYS[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local running = redis.call('ZCOUNT', KEYS[2], now, '+inf')
local executed = 0
for i = 0, 59 do
  executed = executed + tonumber(redis.call('GET', ARGV[1] .. ':' .. (now - i)) or '0')
end
local m = redis.call('HMGET', KEYS[3], 'paused', 'f0', 't0', 'gen')
local f = 1
if m[2] then f = math.min(1, tonumber(m[2]) + (now - tonumber(m[3])) / 60) end
return {tostring(tasks), oldest[2] or '', tostring(running), tostring(executed),
        m[1] or '0', tostring(f), m[4] or '0'}
"""

_DEPLOY = """
redis.call('HSET', KEYS[1], 'yaml', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
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


def _reserved(task: Task, state: str) -> int | TaskQueueError:
    """A reservation script's answer: the queue's purge generation, or why the name is taken."""
    if state.startswith("ok:"):
        return int(state[3:])
    if state in ("queued", "running"):
        return TaskQueueError("TASK_ALREADY_EXISTS", f"name: task {task.name!r} is already {state}")
    return TaskQueueError(
        "TOMBSTONED_TASK", f"name: task {task.name!r} was {state} and its name is tombstoned"
    )


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

    def _qkey(self, kind: str, app: str, queue: str) -> str:
        return f"{self._ns}:{kind}:{app}:{queue}"

    async def _call(self, what: str, d: Deferred[Any]) -> Any:
        d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except TimeoutError:
            raise Unavailable("redis", f"{what} got no answer in {self._timeout:g} s") from None
        except (txredisapi.ConnectionError, ConnectionError) as e:
            raise Unavailable("redis", f"{what}: {e}") from None

    async def _eval(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._call("script", self._redis.evalsha(script.sha, keys, args))
        except txredisapi.ScriptDoesNotExist:
            return await self._call("script", self._redis.eval(script.source, keys, args))

    async def _script(self, script: _Script, keys: list[str], args: list[Any]) -> str:
        return _text(await self._eval(script, keys, args))

    async def reserve_many(self, tasks: list[Task]) -> list[int | TaskQueueError]:
        """reserve() for each task in one round trip: a generation or the refusal, in order."""
        keys: list[str] = []
        args: list[Any] = []
        for task in tasks:
            keys += [self._key(task.app, task.queue, task.name),
                     self._qkey("m", task.app, task.queue), self._qkey("z", task.app, task.queue)]
            args += [task.tid, repr(task.eta), repr(task.created), PENDING_TTL, task.name]
        answers = await self._eval(RESERVE_MANY, keys, args)
        return [_reserved(task, _text(answer)) for task, answer in zip(tasks, answers)]

    async def confirm_many(self, tasks: list[Task]) -> None:
        keys = [self._key(t.app, t.queue, t.name) for t in tasks]
        await self._script(CONFIRM_MANY, keys, [t.tid for t in tasks])

    async def reserve(self, task: Task) -> int:
        key = self._key(task.app, task.queue, task.name)
        keys = [key, self._qkey("m", task.app, task.queue), self._qkey("z", task.app, task.queue)]
        args = [task.tid, repr(task.eta), repr(task.created), PENDING_TTL, task.name]
        answer = _reserved(task, await self._script(RESERVE, keys, args))
        if isinstance(answer, TaskQueueError):
            raise answer
        return answer

    async def confirm(self, task: Task) -> None:
        await self._script(CONFIRM, [self._key(task.app, task.queue, task.name)], [task.tid])

    async def release(self, task: Task) -> None:
        keys = [self._key(task.app, task.queue, task.name), self._qkey("z", task.app, task.queue)]
        await self._script(RELEASE, keys, [task.tid, task.name])

    async def begin(self, task: Task, gate: Gate | None = None) -> str:
        """GO, or why not: STALE, 'purged', a terminal state; with ``gate`` (the queue's rate
        limits and this dispatch's lease) also 'paused' or 'wait:<seconds>'."""
        keys = [
            self._key(task.app, task.queue, task.name),
            self._qkey("m", task.app, task.queue),
            self._qkey("z", task.app, task.queue),
        ]
        args: list[Any] = [task.tid, task.retry_count, task.execution_count, repr(task.eta),
                           repr(task.created), task.gen, task.name, self._tombstone]
        if gate is not None:
            keys.append(self._qkey("l", task.app, task.queue))
            args += [repr(float(gate.rate)), gate.bucket_size, gate.max_concurrent or 0,
                     gate.lease, repr(float(gate.lease_seconds))]
        return await self._script(BEGIN, keys, args)

    async def _record(
        self, task: Task, state: str, status: int | None, reason: str, ttl: int,
        lease: str = "", attempt: bool = True,
    ) -> str:
        app, queue = task.app, task.queue
        keys = [self._key(app, queue, task.name), self._qkey("z", app, queue),
                self._qkey("l", app, queue), self._qkey("x", app, queue)]
        args = [
            task.tid,
            state,
            task.retry_count,
            task.execution_count,
            "" if status is None else status,
            reason,
            repr(task.eta),
            ttl,
            task.name,
            lease,
            "1" if attempt else "0",
        ]
        return await self._script(RECORD, keys, args)

    async def record_success(self, task: Task, status: int, lease: str = "") -> None:
        await self._record(task, "completed", status, "", self._tombstone, lease)

    async def record_retry(
        self, task: Task, status: int | None, reason: str, lease: str = ""
    ) -> None:
        await self._record(task, "queued", status, reason, 0, lease)

    async def record_failure(
        self, task: Task, status: int | None, reason: str, lease: str = ""
    ) -> None:
        await self._record(task, "error", status, reason, self._tombstone, lease)

    async def delete(self, app: str, queue: str, name: str) -> None:
        keys = [self._key(app, queue, name), self._qkey("z", app, queue)]
        result = await self._script(DELETE, keys, [self._tombstone, name])
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

    # --- queues --------------------------------------------------------------------------------
    async def renew(self, app: str, queue: str, lease: str, lease_seconds: float) -> None:
        await self._script(RENEW, [self._qkey("l", app, queue)], [lease, repr(lease_seconds)])

    async def release_lease(self, app: str, queue: str, lease: str) -> None:
        await self._call("zrem", self._redis.zrem(self._qkey("l", app, queue), lease))

    async def slow_down(self, app: str, queue: str) -> None:
        await self._script(SLOW_DOWN, [self._qkey("m", app, queue)], [])

    async def purge(self, app: str, queue: str) -> int:
        keys = [self._qkey("m", app, queue), self._qkey("z", app, queue)]
        prefix = task_key(self._ns, app, queue, "")
        return int(await self._script(PURGE, keys, [prefix, self._tombstone]))

    async def set_paused(self, app: str, queue: str, paused: bool) -> None:
        keys = [self._qkey("m", app, queue), f"{self._ns}:p:{app}"]
        await self._script(PAUSE, keys, ["1" if paused else "0", queue])

    async def paused_queues(self, app: str) -> set[str]:
        members = await self._call("smembers", self._redis.smembers(f"{self._ns}:p:{app}"))
        return {_text(m) for m in members}

    async def queue_stats(self, app: str, queue: str) -> dict[str, Any]:
        keys = [self._qkey("z", app, queue), self._qkey("l", app, queue),
                self._qkey("m", app, queue)]
        raw = [_text(v) for v in await self._eval(STATS, keys, [self._qkey("x", app, queue)])]
        return {
            "tasks": int(raw[0]),
            "oldest_eta": float(raw[1]) if raw[1] else None,
            "in_flight": int(raw[2]),
            "executed_last_minute": int(raw[3]),
            "paused": raw[4] == "1",
            "rate_factor": float(raw[5]),
            "purge_generation": int(raw[6]),
        }

    async def deploy_queue_yaml(self, app: str, text: str) -> int:
        return int(await self._script(DEPLOY, [f"{self._ns}:c:{app}"], [text]))

    async def queue_yaml(self, app: str) -> tuple[int, str | None]:
        raw = await self._call(
            "hmget", self._redis.hmget(f"{self._ns}:c:{app}", ["version", "yaml"])
        )
        version, text = raw
        return (int(_text(version)) if version else 0), (_text(text) if text else None)

    async def queue_yaml_versions(self, apps: list[str]) -> dict[str, int]:
        out = {}
        for app in apps:
            raw = await self._call("hget", self._redis.hget(f"{self._ns}:c:{app}", "version"))
            out[app] = int(_text(raw)) if raw else 0
        return out


RENEW = _Script(_RENEW)
SLOW_DOWN = _Script(_SLOW_DOWN)
PURGE = _Script(_PURGE)
PAUSE = _Script(_PAUSE)
STATS = _Script(_STATS)
DEPLOY = _Script(_DEPLOY)
RESERVE = _Script(_RESERVE)
RESERVE_MANY = _Script(_RESERVE_MANY)
CONFIRM_MANY = _Script(_CONFIRM_MANY)
CONFIRM = _Script(_CONFIRM)
RELEASE = _Script(_RELEASE)
BEGIN = _Script(_BEGIN)
RECORD = _Script(_RECORD)
DELETE = _Script(_DELETE)
__all__ = ["RedisStore", "GO", "PURGED", "STALE", "record_view", "task_key"]
