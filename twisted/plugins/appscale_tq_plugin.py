"""twistd plugin: ``twistd appscale-tq``. Imports appscale_tq.tap only when used."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _ServiceMaker:
    tapname = "appscale-tq"
    description = "A push task queue node: HTTP API, RabbitMQ storage, Redis names."

    @property
    def options(self) -> Any:
        from appscale_tq.tap import Options

        return Options

    def makeService(self, options: Any) -> Any:  # noqa: N802
        from appscale_tq.tap import makeService

        return makeService(options)


serviceMaker = _ServiceMaker()
