"""Writing to a connection at once, in the turn that produced the bytes; what the kernel knows of one.

Owns :func:`direct_socket` and :func:`write_now`, shared by the client and
the server side, and :func:`receive_idle_ms` (CLIENT LIST's ``idle``).
Twisted's ``transport.write`` queues every write, asks epoll for
writability, sends on the next loop turn and then stops asking: two
``epoll_ctl`` calls and a loop turn per write.  When nothing is queued
on the transport, the bytes can go out at once; whatever the socket does
not take goes through Twisted as usual, so ordering, backpressure and error
handling stay Twisted's.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Optional

# Linux's struct tcp_info: tcpi_last_data_recv (ms since data last arrived) is
# the u32 at byte 52, after 8 one-byte fields and 11 u32s.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = 52


def direct_socket(transport: Any) -> Any:
    """The socket under a plain TCP or unix transport, which ``write_now`` may send on; else None."""
    sock = getattr(transport, "socket", None)
    if sock is None or getattr(transport, "TLS", False):
        return None
    if not hasattr(transport, "_tempDataBuffer") or not hasattr(transport, "dataBuffer"):
        return None
    return sock


def write_now(sock: Any, transport: Any, data: bytes) -> None:
    """Send ``data`` now when nothing is queued before it; queue what is left with Twisted."""
    if sock is not None and not transport.dataBuffer and not transport._tempDataBuffer \
            and not transport.disconnecting:
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write meets the error and closes properly
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def receive_idle_ms(sock: Any) -> Optional[int]:
    """Milliseconds since ``sock`` last received data, from the kernel (Linux TCP); None where unknown."""
    if sock is None or _TCP_INFO is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _LAST_DATA_RECV + 4:
        return None
    return struct.unpack_from("I", info, _LAST_DATA_RECV)[0]
