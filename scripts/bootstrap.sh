#!/usr/bin/env bash
# Installs what is missing on a Debian machine (RabbitMQ, Redis, HAProxy, a Python venv with
# appscale-tq and its test tools), starts RabbitMQ and Redis if they are not running. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v rabbitmqctl >/dev/null 2>&1 || missing+=(rabbitmq-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! $SUDO rabbitmqctl -q status >/dev/null 2>&1; then
  echo "bootstrap: starting RabbitMQ"
  $SUDO rabbitmq-server -detached
  $SUDO rabbitmqctl -q await_startup --timeout 120 || { sleep 10; $SUDO rabbitmqctl -q await_startup; }
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "bootstrap: starting Redis"
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip setuptools wheel \
       && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
  cat "$log" >&2; echo "bootstrap: pip install failed" >&2; exit 1
fi
rm -f "$log"
# twistd finds plugins in the twisted/plugins folders on sys.path, which an editable install's
# import hook does not add: put the work tree itself on the venv's path.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD" > "$site/appscale_tq_worktree.pth"
.venv/bin/python -c "import appscale_tq, pika, treq, txredisapi, pytest_twisted" \
  || { echo "bootstrap: the venv is incomplete" >&2; exit 1; }
echo "bootstrap: ready (RabbitMQ, Redis and HAProxy present; venv in .venv)"
