"""Integration tests: real sample app processes behind a real HAProxy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appscale_tq.haproxy import (
    HAProxyProcess,
    find_haproxy,
    free_port,
    haproxy_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SampleAppProcess:
    name: str
    port: int
    process: subprocess.Popen[str]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def _wait_for_port(
    port: int, process: subprocess.Popen[Any], log: Path
) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode}:\n{log.read_text()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}:\n{log.read_text()}")


def start_sample_app(name: str, workdir: Path) -> SampleAppProcess:
    port = free_port()
    log_path = workdir / f"{name}.log"
    env = dict(os.environ)
    paths = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appscale_tq.sampleapp",
                "--port",
                str(port),
                "--name",
                name,
                "--quiet",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    app = SampleAppProcess(name, port, process, log_path)
    try:
        _wait_for_port(port, process, log_path)
    except BaseException:
        app.stop()
        raise
    return app


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def sample_apps(tmp_path: Path) -> Iterator[list[SampleAppProcess]]:
    apps: list[SampleAppProcess] = []
    try:
        for name in ("app1", "app2"):
            apps.append(start_sample_app(name, tmp_path))
        yield apps
    finally:
        for app in apps:
            app.stop()


def test_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    config = tmp_path / "check.cfg"
    config.write_text(
        haproxy_config(free_port(), [("127.0.0.1", 8081), ("127.0.0.1", 8082)])
    )
    result = subprocess.run(
        [find_haproxy(), "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = config.read_text()
    assert "balance roundrobin" in text
    assert "server s0 127.0.0.1:8081 check inter 1s" in text
    assert "server s1 127.0.0.1:8082 check inter 1s" in text


def test_requests_are_balanced(
    sample_apps: list[SampleAppProcess], tmp_path: Path
) -> None:
    app1, app2 = sample_apps
    # Each app prints one line once it listens.
    for app in sample_apps:
        assert app.process.stdout is not None
        line = app.process.stdout.readline()
        assert f"listening on http://127.0.0.1:{app.port}/" in line

    listen_port = free_port()
    with HAProxyProcess() as lb:
        lb.start(
            listen_port,
            [("127.0.0.1", app1.port), ("127.0.0.1", app2.port)],
            tmp_path / "haproxy",
        )
        assert lb.running
        for index in range(10):
            request = urllib.request.Request(
                f"http://127.0.0.1:{listen_port}/task?i={index}",
                data=b"payload-%d" % (index,),
                headers={"X-AppEngine-TaskName": f"task-{index}"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                assert response.read() == b"ok"

        received = {
            app.name: get_json(app.url + "/_sample/received")
            for app in sample_apps
        }
        process = lb.process
    assert not lb.running
    assert process is not None and process.returncode is not None

    assert received["app1"], "app1 received no request"
    assert received["app2"], "app2 received no request"
    records = received["app1"] + received["app2"]
    assert len(records) == 10
    assert sorted(r["query"] for r in records) == sorted(
        f"i={index}" for index in range(10)
    )
    assert {r["instance"] for r in received["app1"]} == {"app1"}
    assert {r["instance"] for r in received["app2"]} == {"app2"}
    assert all(r["path"] == "/task" for r in records)

    for app in sample_apps:
        assert get_json(app.url + "/_sample/count") == {
            "count": len(received[app.name])
        }
        # SIGTERM stops the app cleanly.
        assert app.stop() == 0
        assert "Traceback" not in app.log_path.read_text()


def test_start_fails_when_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        lb = HAProxyProcess()
        with pytest.raises(RuntimeError, match="already in use"):
            lb.start(port, [("127.0.0.1", free_port())], tmp_path)
        assert not lb.running


def test_start_reports_haproxy_errors(tmp_path: Path) -> None:
    lb = HAProxyProcess()
    with pytest.raises(RuntimeError, match="haproxy exited"):
        # A host that cannot be resolved makes HAProxy refuse the config.
        lb.start(free_port(), [("no-such-host.invalid", 80)], tmp_path)
    assert not lb.running
    assert (tmp_path / "haproxy.log").read_text()
