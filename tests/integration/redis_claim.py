"""Claim one Redis database (1..15) for a test run, so concurrent runs never share keys."""

from __future__ import annotations

import socket

CLAIM_KEY = "appscale-tq:test-claim"


def _command(db: int, *args: str) -> bytes:
    """One Redis command over a plain socket (RESP), used before the reactor matters."""
    parts = [b"SELECT", str(db).encode()]
    payload = b"*2\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    encoded = [a.encode() for a in args]
    payload += b"*%d\r\n" % len(encoded) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a), a) for a in encoded
    )
    with socket.create_connection(("127.0.0.1", 6379), timeout=5) as s:
        s.sendall(payload)
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[1]


def claim(run: str) -> int:
    for db in range(15, 0, -1):
        reply = _command(db, "SET", CLAIM_KEY, run, "NX", "EX", "7200")
        if reply.startswith(b"+OK"):
            return db
    raise RuntimeError("no free Redis database among 1..15 for this test run")


def release(db: int) -> None:
    _command(db, "FLUSHDB")
