"""Smoke test of ``python -m appscale_tq.demo``: what a newcomer runs first must work.

It runs the real thing (two sample apps, HAProxy, a node on its built-in defaults, RabbitMQ and
Redis on 127.0.0.1), so it needs the demo's fixed ports free. A busy port fails the test, naming
the port: it is never skipped, because a skipped smoke test hides a broken first experience.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

PORTS = {8080: "HAProxy", 8081: "sample app 1", 8082: "sample app 2", 17446: "the node's API"}
SUMMARY = re.compile(r"^demo: 14 tasks enqueued, 15 deliveries \(1 retry\), all arrived$", re.M)
TIMEOUT = 60


def _busy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_demo_runs_and_every_task_arrives() -> None:
    busy = [f"{port} ({role})" for port, role in PORTS.items() if _busy(port)]
    if busy:
        pytest.fail(
            f"cannot run the demo: port(s) {', '.join(busy)} on 127.0.0.1 already in use; "
            "stop whatever listens there (ss -ltnp) and run this test again",
            pytrace=False,
        )
    demo = subprocess.Popen(
        [sys.executable, "-m", "appscale_tq.demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = demo.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the demo then stops the processes it started
        demo.terminate()
        try:
            stdout, stderr = demo.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            stdout, stderr = demo.communicate()
        pytest.fail(f"the demo did not finish within {TIMEOUT} s; its output:\n{stdout}\n{stderr}")
    output = f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    assert demo.returncode == 0, f"the demo exited with {demo.returncode}\n{output}"
    assert SUMMARY.search(stdout), f"no summary line in the demo's output\n{output}"
