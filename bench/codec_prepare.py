"""The Redis codec's own cost per request: ``prepare`` (and ``fragment`` where it routes by key specs).

    python bench/codec_prepare.py

No sockets: one RedisCodec, a fake two-server router, timeit's best of 7.
GET/SET/INCR are the hot path (``prepare`` only: one key at argv[1]);
MGET is split by ``fragment``; RENAME and ZUNIONSTORE read Redis's key specs.
"""

import timeit
from typing import List

from twinproxy.config import load_text
from twinproxy.protocols import resp
from twinproxy.protocols.redis import RedisCodec
from twinproxy.request import Request


class Session:
    client_id = 1
    authenticated = True
    dialect = 2
    client_name = None


class Router:
    live_servers = ("A", "B")

    def server_for_key(self, key: bytes) -> str:
        return "A" if key[-1] & 1 else "B"

    def servers_for_keys(self, keys: List[bytes]) -> List[str]:
        return ["A" if key[-1] & 1 else "B" for key in keys]


def main() -> None:
    (config,) = load_text("p:\n  listen: 127.0.0.1:1\n  redis: true\n  servers:\n   - 10.0.0.1:1:1\n")
    codec = RedisCodec(config)
    session = Session()
    for args in ([b"GET", b"key:000001"], [b"SET", b"key:000001", b"v" * 16], [b"INCR", b"counter"]):
        request = Request(resp.encode_command(args), args)
        best = min(timeit.repeat(lambda r=request: codec.prepare(r, session), number=200000, repeat=7)) / 200000
        print(f"prepare {args[0].decode():38s} {best * 1e9:7.1f} ns")
    router = Router()
    for args in ([b"MGET", b"k1", b"k2", b"k3", b"k4"], [b"MGET", b"k1", b"k3"], [b"RENAME", b"k1", b"k3"],
                 [b"ZUNIONSTORE", b"k1", b"2", b"k3", b"k5"]):
        raw = resp.encode_command(args)

        def run(args=args, raw=raw) -> None:
            request = Request(raw, args)
            codec.prepare(request, session)
            codec.fragment(request, router)

        best = min(timeit.repeat(run, number=50000, repeat=7)) / 50000
        print(f"prepare+fragment {b' '.join(args).decode():29s} {best * 1e9:7.1f} ns")


if __name__ == "__main__":
    main()
