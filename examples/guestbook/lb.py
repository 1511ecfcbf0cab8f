"""HAProxy in front of the guestbook, as App Engine's front end would be.

Two frontends balance to the same app servers:

- **public** (what users reach): drops every inbound ``X-AppEngine-*`` header, so nobody can
  pose as the task queue (the SDK's deferred handler trusts ``X-AppEngine-TaskName`` and the
  ``X-AppEngine-User-IP`` of ``0.1.0.2``), sets ``X-AppEngine-User-IP`` to the client's address,
  and injects ``X-AppEngine-Api-Ticket``: the app's ticket, which the SDK sends back to the node
  with each call and by which the node knows the app.
- **internal** (the node's ``lb_url`` for the app; bound to 127.0.0.1 only): keeps the
  dispatcher's ``X-AppEngine-*`` task headers and injects the ticket too, so task handlers can
  enqueue in their turn.

Both route a request whose ``Host`` starts with ``<service>.`` to that service's servers (App
Engine's ``target=``: the SDK sets ``Host: <target>.<default hostname>``); everything else goes
to the default service.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from appscale_tq.haproxy import find_haproxy

Backend = tuple[str, int]
_SAFE_TICKET = re.compile(r"[A-Za-z0-9.:~_-]{1,400}", re.ASCII)
_SERVICE = re.compile(r"[a-z0-9-]{1,63}", re.ASCII)


def _address(host: str, port: int) -> str:
    return f"{host.strip('[]')}:{int(port)}"


def guestbook_haproxy_config(
    *,
    public_port: int,
    internal_port: int,
    ticket: str,
    backends: Sequence[Backend],
    services: Mapping[str, Sequence[Backend]] | None = None,
    public_bind: str = "127.0.0.1",
    internal_bind: str = "127.0.0.1",
) -> str:
    """The HAProxy (2.x) configuration of the guestbook's load balancer."""
    if not backends:
        raise ValueError("at least one app server is required")
    if not _SAFE_TICKET.fullmatch(ticket):
        raise ValueError("the ticket must be printable ASCII without quotes or spaces")
    services = dict(services or {})
    for name, servers in services.items():
        if not _SERVICE.fullmatch(name) or name == "default" or not servers:
            raise ValueError(f"bad service {name!r}")

    def routing() -> list[str]:
        lines = []
        for name in sorted(services):
            lines += [f"    acl to_{name} hdr_beg(host) -i {name}.",
                      f"    use_backend svc_{name} if to_{name}"]
        return lines + ["    default_backend svc_default"]

    lines = [
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 25h",  # a task may run up to its dispatch deadline (24 h at most)
        "    timeout server 25h",
        "    timeout http-request 30s",
        "    option http-keep-alive",
        "    retries 2",
        "    option redispatch",
        "",
        "frontend public",
        f"    bind {_address(public_bind, public_port)}",
        "    http-request del-header x-appengine- -m beg",
        "    http-request set-header X-AppEngine-User-IP %[src]",
        f"    http-request set-header X-AppEngine-Api-Ticket {ticket}",
        *routing(),
        "",
        "frontend internal",
        f"    bind {_address(internal_bind, internal_port)}",
        f"    http-request set-header X-AppEngine-Api-Ticket {ticket}",
        *routing(),
        "",
    ]
    for name, servers in [("default", backends), *sorted(services.items())]:
        lines += [f"backend svc_{name}", "    balance roundrobin"]
        lines += [f"    server {name}{i} {_address(h, p)} check inter 1s"
                  for i, (h, p) in enumerate(servers)]
        lines.append("")
    return "\n".join(lines)


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class GuestbookLB:
    """The HAProxy process of the guestbook (``start`` blocks until both frontends listen)."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.process: subprocess.Popen[bytes] | None = None
        self.public_port = 0
        self.internal_port = 0

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    def log(self) -> str:
        path = self.workdir / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, *, public_port: int, internal_port: int, ticket: str,
              backends: Sequence[Backend], services: Mapping[str, Sequence[Backend]] | None = None,
              timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "haproxy.cfg"
        # the file holds the app's ticket: readable by its owner only
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(guestbook_haproxy_config(
                public_port=public_port, internal_port=internal_port, ticket=ticket,
                backends=backends, services=services))
        self.public_port, self.internal_port = public_port, internal_port
        with open(self.workdir / "haproxy.log", "wb") as log:
            self.process = subprocess.Popen(
                [find_haproxy(), "-f", str(config), "-db"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not (_accepts(public_port) and _accepts(internal_port)):
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not listen within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
