"""The package as an operator gets it: the wheel, the twistd plugin, the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300, cwd=build,
        env={**os.environ, "TMPDIR": str(build)},
    )
    [path] = out.glob("appscale_tq-*.whl")
    return path


def test_wheel_carries_the_plugin_without_a_twisted_plugins_init(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/appscale_tq_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert "appscale_tq/tap.py" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_installed_wheel_runs_twistd_appscale_tq_help(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "import appscale_tq.tap; print(appscale_tq.tap.__file__)"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert probe.stdout.startswith(str(target))
    result = subprocess.run(
        [TWISTD, "appscale-tq", "--help"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "appscale-tq" in result.stdout


def test_importing_the_plugin_imports_no_reactor_and_no_clients() -> None:
    code = (
        "import sys\n"
        "import twisted.plugins.appscale_tq_plugin as p\n"
        "opts = p.serviceMaker.options()\n"
        "import appscale_tq.tap\n"
        "bad = [m for m in ('twisted.internet.reactor', 'txredisapi', 'pika', 'treq')"
        " if m in sys.modules]\n"
        "print(','.join(bad) or 'clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "clean", result.stdout


def test_a_bad_config_stops_twistd_at_once_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("apps:\n  guestbook:\n    lb_url: ftp://nowhere\n")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "appscale-tq", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "apps.guestbook.lb_url" in result.stdout + result.stderr


def test_an_unknown_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("listen: tcp:0\nredis_ulr: redis://127.0.0.1/0\n")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "appscale-tq", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "redis_ulr" in result.stdout + result.stderr
