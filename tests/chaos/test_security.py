"""redis_auth gates every command, and the password shows up nowhere."""

from __future__ import annotations

import os
import socket
import sys

from tests.integration.test_redis_proxy import raw_to
from tests.servers import LOOPBACK, Process, port_of

PASSWORD = "Sup3r-s3cret-pw"


def test_nothing_before_auth_and_password_never_logged(redis_servers, tmp_path) -> None:
    backends = redis_servers(2, password=PASSWORD)
    config = tmp_path / "pools.yml"
    config.write_text(f"alpha:\n  listen: {LOOPBACK}:0\n  redis: true\n  redis_auth: {PASSWORD}\n"
                      "  timeout: 2000\n  servers:\n" + "".join(f"   - {b.address}:1\n" for b in backends))
    log = tmp_path / "proxy.log"
    twinproxy = os.path.join(os.path.dirname(sys.executable), "twinproxy")
    process = Process([twinproxy, "-c", str(config), "-s", "0", "-a", LOOPBACK, "--http-port", "0",
                       "-o", str(log), "-v", "11", "--bound-addresses", str(tmp_path / "bound.json")],
                      tmp_path / "proxy.out")
    process.bound_path = tmp_path / "bound.json"
    process.spawn()
    try:
        bound = process.bound()
        port, stats_port, http_port = port_of(bound["pools"]["alpha"]), port_of(bound["stats"]), port_of(bound["http"])

        def talk(data: bytes, lines: int) -> bytes:
            return raw_to(LOOPBACK, port, data, lines)

        commands = [b"GET k", b"SET k v", b"MGET a b", b"DEL a b", b"EVAL x 1 k", b"CLIENT ID", b"SELECT 0",
                    b"ECHO hi", b"HELLO 3", b"KEYS *"]
        replies = talk(b"".join(c + b"\r\n" for c in commands), len(commands)).split(b"\r\n")[:-1]
        assert len(replies) == len(commands)
        assert all(r.startswith(b"-NOAUTH") for r in replies), replies
        assert talk(b"AUTH wrong\r\nGET k\r\n", 2) == \
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n-NOAUTH Authentication required.\r\n"
        assert talk(b"AUTH " + PASSWORD.encode() + b"\r\nSET k v\r\nGET k\r\n", 4) == b"+OK\r\n+OK\r\n$1\r\nv\r\n"
        # A failing backend handshake is logged without the password.
        backends[0].kill()
        talk(b"AUTH " + PASSWORD.encode() + b"\r\nMGET a b c d e f g\r\n", 2)
        import urllib.request

        texts = [log.read_text(), process.output()]
        for path in ("/stats", "/metrics", "/health"):
            with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}{path}", timeout=5) as response:
                texts.append(response.read().decode())
        with socket.create_connection((LOOPBACK, stats_port), timeout=5) as sock:
            texts.append(sock.recv(1 << 20).decode())
        for text in texts:
            assert PASSWORD not in text
    finally:
        process.stop()
