"""``appscale-tq``: the operator's command line (the node itself runs under twistd)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from appscale_tq import __version__
from appscale_tq.config import ConfigError, load_config_file

DEFAULT_CONFIG = "/etc/appscale-tq/node.yaml"


def _twistd() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="appscale-tq",
        description="appscale-tq: a push task queue node (HTTP API, RabbitMQ, Redis).",
    )
    parser.add_argument("--version", action="version", version=f"appscale-tq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate a node config file and exit")
    check.add_argument("path", nargs="?", default=DEFAULT_CONFIG)
    run = commands.add_parser("run", help="run a node in the foreground (twistd --nodaemon)")
    run.add_argument("--config", default=None, help=f"node config (e.g. {DEFAULT_CONFIG})")
    ticket = commands.add_parser(
        "ticket", help="print the API ticket of an app, for its load balancer to inject")
    ticket.add_argument("app")
    ticket.add_argument("--config", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    if args.command == "check-config":
        try:
            config = load_config_file(args.path)
        except ConfigError as e:
            print(f"appscale-tq: {args.path}: {e}", file=sys.stderr)
            return 1
        print(f"{args.path}: ok (API on {config.listen}; apps: {', '.join(sorted(config.apps))})")
        return 0
    if args.command == "run":
        command = [_twistd(), "--nodaemon", "--pidfile=", "appscale-tq"]
        if args.config:
            command += ["--config", args.config]
        os.execv(command[0], command)
    if args.command == "ticket":
        try:
            config = load_config_file(args.config)
        except ConfigError as e:
            print(f"appscale-tq: {args.config}: {e}", file=sys.stderr)
            return 1
        if not config.secret:
            print("appscale-tq: the config sets no secret; tickets need one", file=sys.stderr)
            return 1
        from appscale_tq.sdk import mint_ticket

        print(mint_ticket(config.secret, args.app))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
