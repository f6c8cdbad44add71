"""The migration benchmark's client load: a fixed number of pipelined connections doing GET/SET on random keys.

    python bench/migration_load.py --port P --keys N --out PATH [--clients C] [--pipeline D]
                                   [--get-ratio R] [--seconds S] [--max-ops N]

A closed loop, bounded in time and in count: ``clients`` connections to
the proxy, each with one batch of ``pipeline`` requests in flight at a
time (a GET or a SET of a 100-byte value on ``key:<random below N>``, the
benchmark's key space, so every GET names a key that exists), the next
batch sent as soon as the last reply of the previous one is in.  One
process, one selector, no threads: its own CPU is what the benchmark
reports as the load's share.

It stops at ``--seconds``, after ``--max-ops`` requests, or on SIGTERM
or SIGINT (the benchmark's "stop": the batches in flight are answered
first), then writes
``PATH.json`` (counts: requests, error replies and their first texts,
GETs that found nothing — a loaded key missing: lost data) and ``PATH.bin``
(per batch: the monotonic time its last reply came, as doubles, then its
latency in seconds, as floats).  ``time.monotonic`` is the system's
CLOCK_MONOTONIC, so the benchmark cuts these into its phases with its own
clock.
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import signal
import socket
import time
from array import array
from typing import Any, List, Optional
from zlib import crc32

VALUE = b"w" * 100


class Connection:
    """One client connection: its batch in flight, and the replies still to come for it."""

    __slots__ = ("sock", "buffer", "waiting", "sent_at", "gets")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.waiting = 0
        self.sent_at = 0.0
        self.gets: List[bool] = []


def parse(connection: Connection, counts: dict) -> None:
    """Consume the complete replies in ``connection.buffer`` (RESP2: status, error, integer, bulk)."""
    buffer = connection.buffer
    position = 0
    size = len(buffer)
    gets = connection.gets
    while connection.waiting and position < size:
        eol = buffer.find(b"\r\n", position)
        if eol < 0:
            break
        kind = buffer[position]
        if kind == 36:    # b"$": a bulk string, or nil
            length = int(buffer[position + 1:eol])
            end = eol + 2 + (length + 2 if length >= 0 else 0)
            if end > size:
                break
            if length < 0 and gets[len(gets) - connection.waiting]:
                counts["nil_gets"] += 1
        else:
            end = eol + 2
            if kind == 45:  # b"-": an error reply
                counts["errors"] += 1
                if len(counts["error_samples"]) < 5:
                    counts["error_samples"].append(buffer[position:eol].decode("utf-8", "replace"))
        position = end
        connection.waiting -= 1
    connection.buffer = buffer[position:]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=int, required=True, help="the key space: key:0 .. key:N-1")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pipeline", type=int, default=4)
    parser.add_argument("--get-ratio", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop after this long at the latest")
    parser.add_argument("--max-ops", type=int, default=20_000_000, help="stop after this many requests")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--avoid", default="", metavar="FIRST-LAST,...",
                        help="draw no key of these slots (Codis's crc32 %% 1024 of the key: no tags here)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    randrange, rand = rng.randrange, rng.random
    avoided = bytearray(1024)
    for text in filter(None, args.avoid.split(",")):
        first, _, last = text.partition("-")
        avoided[int(first):int(last or first) + 1] = b"\x01" * (int(last or first) + 1 - int(first))

    def pick() -> bytes:
        while True:
            key = b"key:%d" % randrange(args.keys)
            if not avoided[crc32(key) & 1023]:
                return key
    selector = selectors.DefaultSelector()
    connections = []
    for _ in range(args.clients):
        sock = socket.create_connection((args.host, args.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        connection = Connection(sock)
        connections.append(connection)
        selector.register(sock, selectors.EVENT_READ, connection)
    counts = {"requests": 0, "errors": 0, "nil_gets": 0, "error_samples": []}
    ends, latencies = array("d"), array("f")
    set_head = b"$100\r\n" + VALUE + b"\r\n"

    def send(connection: Connection) -> None:
        parts = []
        gets = []
        for _ in range(args.pipeline):
            key = pick()
            if rand() < args.get_ratio:
                parts.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
                gets.append(True)
            else:
                parts.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n%s" % (len(key), key, set_head))
                gets.append(False)
        connection.gets = gets
        connection.waiting = args.pipeline
        connection.sent_at = time.monotonic()
        connection.sock.sendall(b"".join(parts))
        counts["requests"] += args.pipeline

    stopping = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    deadline = started + args.seconds
    for connection in connections:
        send(connection)
    in_flight = len(connections)
    while in_flight:
        for key, _ in selector.select(timeout=1.0):
            connection = key.data
            data = connection.sock.recv(1 << 18)
            if not data:
                raise SystemExit(f"migration_load: the proxy closed a connection after {counts['requests']} "
                                 "requests")
            connection.buffer += data
            parse(connection, counts)
            if connection.waiting == 0:
                now = time.monotonic()
                ends.append(now)
                latencies.append(now - connection.sent_at)
                if stopping or now >= deadline or counts["requests"] >= args.max_ops:
                    in_flight -= 1
                else:
                    send(connection)
        if time.monotonic() >= deadline + 30:
            raise SystemExit("migration_load: replies stopped coming (30 s past the deadline)")
    for connection in connections:
        connection.sock.close()
    with open(args.out + ".bin", "wb") as out:
        ends.tofile(out)
        latencies.tofile(out)
    counts.update(batches=len(ends), pipeline=args.pipeline, clients=args.clients, started=started,
                  ended=time.monotonic())
    with open(args.out + ".json", "w") as out:
        json.dump(counts, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
