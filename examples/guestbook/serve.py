"""Serve the guestbook with a real WSGI server: Twisted's ``WSGIResource``.

    python -m examples.guestbook.serve --port 8081   (from the repository root)

The SDK reads ``API_HOST``/``API_PORT`` (the node's SDK endpoint) and ``GAE_APPLICATION``
from the environment; ``lb.py`` puts HAProxy in front to inject the API ticket.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--threads", type=int, default=30, help="WSGI worker threads")
    args = parser.parse_args(argv)
    if not os.environ.get("GAE_APPLICATION") and not os.environ.get("APPLICATION_ID"):
        os.environ["GAE_APPLICATION"] = os.environ.get("GOOGLE_CLOUD_PROJECT", "guestbook")

    # the app first: wrap_wsgi_app patches os.environ and thread start-up for the SDK
    from examples.guestbook.app import application
    from twisted.internet import reactor
    from twisted.web.server import Site
    from twisted.web.wsgi import WSGIResource

    pool = reactor.getThreadPool()
    pool.adjustPoolsize(maxthreads=args.threads)
    site = Site(WSGIResource(reactor, pool, application))
    site.noisy = False
    port = reactor.listenTCP(args.port, site, interface=args.interface)
    print(f"guestbook ({os.environ.get('GAE_SERVICE', 'default')}) on "
          f"http://{args.interface}:{port.getHost().port}, SDK calls to "
          f"{os.environ.get('API_HOST')}:{os.environ.get('API_PORT')}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
