"""Each app's queue definitions, as deployed cluster-wide through the store.

Every node polls the store (once a second by default) for a new ``queue.yaml`` version and for
the set of paused queues, and tells its listeners when either changed, so a deployment or a
pause reaches every node within a couple of seconds without a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from appscale_tq.backoff import RetryOptions
from appscale_tq.config import AppConfig
from appscale_tq.errors import Unavailable
from appscale_tq.queues import DEFAULT_CONFIG, QueueConfig, QueueDef, parse_queue_yaml

log = Logger()


def target_url(app: AppConfig, target: str) -> str | None:
    """The load balancer of ``[version.]service``: the full name first, then the service."""
    if target in app.targets:
        return app.targets[target]
    service = target.rsplit(".", 1)[-1]
    return app.targets.get(service)


class QueueRegistry:
    def __init__(
        self,
        clock: IReactorTime,
        store: Any,
        apps: Mapping[str, AppConfig],
        *,
        poll_seconds: float = 1.0,
        max_rate: float = 500.0,
    ) -> None:
        self._clock = clock
        self._store = store
        self._apps = dict(apps)
        self._poll_seconds = poll_seconds
        self._max_rate = max_rate
        self.configs: dict[str, QueueConfig] = {app: DEFAULT_CONFIG for app in apps}
        self.versions: dict[str, int] = {app: 0 for app in apps}
        self.paused: dict[str, frozenset[str]] = {app: frozenset() for app in apps}
        self._listeners: list[Callable[[], None]] = []
        self._loop: LoopingCall | None = None
        self._polling: Deferred[None] | None = None

    # --- reading -------------------------------------------------------------------------------
    def queue(self, app: str, queue: str) -> QueueDef | None:
        config = self.configs.get(app)
        return None if config is None else config.queues.get(queue)

    def queue_names(self, app: str) -> list[str]:
        config = self.configs.get(app)
        return [] if config is None else list(config.queues)

    def consumed_queues(self, app: str) -> list[str]:
        """Push queues that dispatch now: not paused, rate above zero."""
        config = self.configs.get(app, DEFAULT_CONFIG)
        paused = self.paused.get(app, frozenset())
        return [
            name for name, q in config.queues.items()
            if q.mode == "push" and (q.rate or 0) > 0 and name not in paused
        ]

    def retry_options(self, app: str, queue: str) -> RetryOptions:
        q = self.queue(app, queue)
        return q.retry if q is not None else RetryOptions()

    def lb_url(self, app: str, queue: str) -> str:
        conf = self._apps[app]
        q = self.queue(app, queue)
        if q is not None and q.target:
            url = target_url(conf, q.target)
            if url is not None:
                return url
        return conf.lb_url

    def known_target(self, app: str) -> Callable[[str], bool]:
        conf = self._apps[app]
        return lambda target: target_url(conf, target) is not None

    def parse(self, app: str, text: str) -> QueueConfig:
        return parse_queue_yaml(text, max_rate=self._max_rate,
                                known_targets=self.known_target(app))

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.failure("a queue registry listener failed")

    # --- writing -------------------------------------------------------------------------------
    async def deploy(self, app: str, text: str) -> QueueConfig:
        """Validate and store an app's queue.yaml; every node picks it up."""
        config = self.parse(app, text)
        version = await self._store.deploy_queue_yaml(app, text)
        self._apply(app, version, config)
        return config

    def _apply(self, app: str, version: int, config: QueueConfig) -> None:
        if version <= self.versions.get(app, 0) and version != 0:
            return
        self.versions[app] = version
        self.configs[app] = config
        for warning in config.warnings:
            log.warn("app {app}: {warning}", app=app, warning=warning)
        log.info("app {app}: queue.yaml version {version}, queues {queues}", app=app,
                 version=version, queues=", ".join(config.queues))
        self._changed()

    async def refresh(self) -> None:
        changed = False
        versions = await self._store.queue_yaml_versions(list(self._apps))
        for app, version in versions.items():
            if version > self.versions.get(app, 0):
                stored_version, text = await self._store.queue_yaml(app)
                if text is None:
                    continue
                try:
                    config = self.parse(app, text)
                except Exception as e:
                    log.error("app {app}: stored queue.yaml version {v} is invalid here: {e}",
                              app=app, v=stored_version, e=str(e))
                    self.versions[app] = stored_version
                    continue
                self._apply(app, stored_version, config)
            paused = frozenset(await self._store.paused_queues(app))
            if paused != self.paused.get(app):
                self.paused[app] = paused
                changed = True
        if changed:
            self._changed()

    async def _poll(self) -> None:
        try:
            await self.refresh()
        except Unavailable as e:
            log.warn("queue registry could not poll the store: {e}", e=str(e))

    def _tick(self) -> Deferred[None] | None:
        if self._polling is not None:
            return None  # the previous poll is still waiting for the store
        self._polling = Deferred.fromCoroutine(self._poll())
        self._polling.addErrback(lambda f: log.failure("queue registry poll failed", f))
        self._polling.addBoth(self._polled)
        return None

    def _polled(self, _: Any) -> None:
        self._polling = None

    def start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._poll_seconds, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
