"""Generate a HAProxy configuration and run HAProxy as a child process.

Used by integration tests, the demo and the benchmark to put a round-robin
load balancer in front of several sample application servers::

    with HAProxyProcess() as lb:
        lb.start(free_port(), [("127.0.0.1", 8081), ("127.0.0.1", 8082)],
                 workdir)
        ...

Starting is synchronous (blocking), so it can be used from plain scripts as
well as from tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from twisted.logger import Logger

__all__ = ["HAProxyProcess", "find_haproxy", "free_port", "haproxy_config"]

log = Logger()

DEFAULT_HAPROXY = "/usr/sbin/haproxy"
CONFIG_NAME = "haproxy.cfg"
LOG_NAME = "haproxy.log"


def free_port() -> int:
    """Return a TCP port number that is currently free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_haproxy() -> str:
    """Return the path of the haproxy executable.

    :raises FileNotFoundError: if HAProxy is not installed.
    """
    found = shutil.which("haproxy")
    if found:
        return found
    if os.access(DEFAULT_HAPROXY, os.X_OK):
        return DEFAULT_HAPROXY
    raise FileNotFoundError("haproxy executable not found")


def _address(host: str, port: int) -> str:
    # HAProxy takes the last colon as the port separator, so IPv6 literals
    # are written without brackets.
    return f"{host.strip('[]')}:{port}"


def haproxy_config(
    listen_port: int,
    backends: Sequence[tuple[str, int]],
    *,
    bind: str = "127.0.0.1",
) -> str:
    """Return a HAProxy (2.6) configuration balancing over ``backends``.

    The frontend listens on ``bind:listen_port`` and dispatches requests
    round-robin to one server per ``(host, port)`` backend, each health
    checked every second.
    """
    if not backends:
        raise ValueError("at least one backend is required")
    if not 0 < listen_port < 65536:
        raise ValueError(f"invalid listen port: {listen_port}")
    lines = [
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 25h",
        "    timeout server 25h",
        "    option http-keep-alive",
        "    retries 2",
        "    option redispatch",
        "",
        "frontend tq_frontend",
        f"    bind {_address(bind, listen_port)}",
        "    default_backend tq_backend",
        "",
        "backend tq_backend",
        "    balance roundrobin",
    ]
    for index, (host, port) in enumerate(backends):
        if not 0 < int(port) < 65536:
            raise ValueError(f"invalid backend port: {port}")
        lines.append(
            f"    server s{index} {_address(host, int(port))} check inter 1s"
        )
    return "\n".join(lines) + "\n"


def _connect_host(bind: str) -> str:
    if bind in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "::1"
    return bind.strip("[]")


def _accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class HAProxyProcess:
    """A HAProxy child process in front of some backends."""

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable
        self.process: subprocess.Popen[bytes] | None = None
        self.listen_port: int | None = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None
        self.host = "127.0.0.1"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        """Base URL of the frontend (only valid once started)."""
        if self.listen_port is None:
            raise RuntimeError("HAProxy is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.listen_port}"

    def read_log(self) -> str:
        """Return what HAProxy wrote to its stdout/stderr so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def start(
        self,
        listen_port: int,
        backends: Sequence[tuple[str, int]],
        workdir: str | os.PathLike[str],
        *,
        bind: str = "127.0.0.1",
        timeout: float = 10.0,
    ) -> None:
        """Write the configuration into ``workdir`` and start HAProxy.

        Blocks until the frontend port accepts connections.

        :raises RuntimeError: if HAProxy exits or does not listen within
            ``timeout`` seconds (the message includes its output).
        """
        if self.running:
            raise RuntimeError("HAProxy is already running")
        connect_host = _connect_host(bind)
        if _accepts(connect_host, listen_port, timeout=0.2):
            raise RuntimeError(
                f"port {listen_port} on {connect_host} is already in use"
            )
        executable = self.executable or find_haproxy()
        directory = Path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / CONFIG_NAME
        self.log_path = directory / LOG_NAME
        self.config_path.write_text(
            haproxy_config(listen_port, backends, bind=bind), encoding="utf-8"
        )
        self.listen_port = listen_port
        self.host = connect_host
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [executable, "-f", str(self.config_path), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=directory,
            )
        log.info(
            "started haproxy (pid {pid}) on port {port} for {count} backends",
            pid=self.process.pid,
            port=listen_port,
            count=len(backends),
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                output = self.read_log()
                self.process = None
                raise RuntimeError(
                    f"haproxy exited with status {code}:\n{output}"
                )
            if _accepts(connect_host, listen_port):
                return
            if time.monotonic() >= deadline:
                output = self.read_log()
                self.stop()
                raise RuntimeError(
                    f"haproxy did not listen on port {listen_port} within "
                    f"{timeout} s:\n{output}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate HAProxy and wait for it (kill it if it lingers)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warn("haproxy (pid {pid}) did not stop, killing it",
                         pid=process.pid)
                process.kill()
                process.wait()
        log.info("stopped haproxy (pid {pid}, status {code})",
                 pid=process.pid, code=process.returncode)

    def __enter__(self) -> HAProxyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
