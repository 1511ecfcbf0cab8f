"""A TCP forwarder between a node and RabbitMQ or Redis that a test can break on purpose.

``cut()`` closes every connection and stops listening, so new ones are refused (a server that
went away);
``stall()`` keeps accepting but forwards nothing (a server that hangs); ``heal()`` restores.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol


class _Upstream(protocol.Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:  # noqa: N802
        self.downstream.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self.downstream.proxy.stalled:
            self.downstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.downstream.transport.loseConnection()


class _Downstream(protocol.Protocol):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:  # noqa: N802
        if self.proxy.refusing:
            self.transport.abortConnection()
            return
        self.proxy.connections.add(self)
        factory = protocol.ClientFactory()
        factory.protocol = lambda: _Upstream(self)  # type: ignore[assignment]
        factory.clientConnectionFailed = lambda c, r: self.transport.loseConnection()
        self.proxy.reactor.connectTCP(self.proxy.host, self.proxy.port, factory)

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        for chunk in self.pending:
            upstream.transport.write(chunk)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.proxy.stalled:
            return
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.proxy.connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()


class FaultProxy(protocol.Factory):
    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.refusing = False
        self.stalled = False
        self.connections: set[_Downstream] = set()
        self.listening: Any = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.listen_port = self.listening.getHost().port

    def buildProtocol(self, addr: Any) -> _Downstream:  # noqa: N802
        return _Downstream(self)

    def cut(self) -> None:
        self.refusing = True
        if self.listening is not None:
            self.listening.stopListening()
            self.listening = None
        for conn in list(self.connections):
            conn.abort()

    def stall(self) -> None:
        self.stalled = True

    def heal(self) -> None:
        self.refusing = False
        self.stalled = False
        if self.listening is None:
            self.listening = self.reactor.listenTCP(self.listen_port, self, interface="127.0.0.1")

    def close(self) -> None:
        self.cut()
