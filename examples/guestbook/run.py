"""Run the guestbook: its app server processes and its HAProxy, pointed at an appscale-tq node.

    python -m examples.guestbook.run --app guestbook --secret "$SECRET" --api-port 17446 \\
        --public-port 8080 --internal-port 8090

(from the repository root). The node must serve the app with ``lb_url`` = the internal
frontend (``http://127.0.0.1:8090`` here) and have the same ``secret``; see README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from appscale_tq.haproxy import free_port
from appscale_tq.sdk import mint_ticket
from examples.guestbook.lb import GuestbookLB

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AppServer:
    service: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def app_environment(*, app_id: str, service: str, api_host: str, api_port: int,
                    records: Path) -> dict[str, str]:
    """What App Engine's runtime would set, plus the node's SDK endpoint."""
    env = dict(os.environ)
    env.update({
        "API_HOST": api_host,  # the SDK posts to http://API_HOST:API_PORT/rpc_http
        "API_PORT": str(api_port),
        "GAE_APPLICATION": app_id,
        "GOOGLE_CLOUD_PROJECT": app_id,
        "GAE_SERVICE": service,
        "GAE_VERSION": "v1",
        "GAE_RUNTIME": "python311",
        "GAE_ENV": "standard",
        # target="worker" becomes "Host: worker.<this>", which the load balancer routes on
        "DEFAULT_VERSION_HOSTNAME": f"{app_id}.localhost",
        "GUESTBOOK_RECORDS": str(records),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
    })
    return env


def start_app_server(*, app_id: str, service: str, api_host: str, api_port: int,
                     records: Path, log_path: Path, port: int | None = None) -> AppServer:
    """One ``python -m examples.guestbook.serve`` process (not waited for: wait_listening)."""
    port = port or free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.guestbook.serve", "--port", str(port)],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=app_environment(app_id=app_id, service=service, api_host=api_host,
                                api_port=api_port, records=records))
    return AppServer(service, port, process, log_path)


def wait_listening(servers: list[AppServer], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for server in servers:
        while not _listening(server.port):
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"app server {server.service} did not start:\n{server.log()}")
            time.sleep(0.05)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Guestbook:
    """App servers (``default`` and ``worker`` services) behind the guestbook's HAProxy."""

    app_id: str
    secret: str
    api_port: int
    api_host: str = "127.0.0.1"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="guestbook-")))
    servers: list[AppServer] = field(default_factory=list)
    lb: GuestbookLB | None = None
    given_ticket: str | None = None  # instead of minting one from the secret

    @property
    def records(self) -> Path:
        return self.workdir / "records.jsonl"

    @property
    def ticket(self) -> str:
        return self.given_ticket or mint_ticket(self.secret, self.app_id)

    def start(self, *, instances: int = 2, workers: int = 1, public_port: int | None = None,
              internal_port: int | None = None, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for service, count in (("default", instances), ("worker", workers)):
            for i in range(count):
                self.servers.append(start_app_server(
                    app_id=self.app_id, service=service, api_host=self.api_host,
                    api_port=self.api_port, records=self.records,
                    log_path=self.workdir / f"{service}-{i}.log"))
        try:
            wait_listening(self.servers, timeout)
        except RuntimeError:
            self.stop()
            raise
        self.lb = GuestbookLB(self.workdir / "lb")
        self.lb.start(
            public_port=public_port or free_port(), internal_port=internal_port or free_port(),
            ticket=self.ticket,
            backends=[("127.0.0.1", s.port) for s in self.servers if s.service == "default"],
            services={"worker": [("127.0.0.1", s.port) for s in self.servers
                                 if s.service == "worker"]} if workers else None)

    def logs(self) -> str:
        parts = [f"--- {s.service}:{s.port}\n{s.log()}" for s in self.servers]
        if self.lb is not None:
            parts.append(f"--- haproxy\n{self.lb.log()}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.lb is not None:
            self.lb.stop()
        for server in self.servers:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the guestbook against an appscale-tq node")
    parser.add_argument("--app", default="guestbook", help="the app id (as in the node config)")
    parser.add_argument("--secret", default=os.environ.get("TQ_SECRET"),
                        help="the node's secret (or $TQ_SECRET): signs the app's API ticket")
    parser.add_argument("--ticket", default=os.environ.get("TQ_TICKET"),
                        help="the app's ticket (`appscale-tq ticket APP`), instead of --secret")
    parser.add_argument("--api-host", default="127.0.0.1", help="the node's host (API_HOST)")
    parser.add_argument("--api-port", type=int, default=17446, help="the node's port (API_PORT)")
    parser.add_argument("--public-port", type=int, default=8080)
    parser.add_argument("--internal-port", type=int, default=8090,
                        help="the app's lb_url in the node config")
    parser.add_argument("--instances", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.secret or args.ticket):
        parser.error("give --secret (the node's) or --ticket (`appscale-tq ticket APP`)")
    book = Guestbook(args.app, args.secret or "", args.api_port, args.api_host,
                     given_ticket=args.ticket)
    book.start(instances=args.instances, public_port=args.public_port,
               internal_port=args.internal_port)
    assert book.lb is not None
    print(f"guestbook: {book.lb.public_url}/ (public); node's lb_url for {args.app}: "
          f"{book.lb.internal_url}; task records in {book.records}", flush=True)
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        book.stop()


if __name__ == "__main__":
    main()
