"""Writing to a connection at once, in the turn that produced the bytes.

Owns :func:`direct_socket` and :func:`write_now`, shared by the client and
the server side.  Twisted's ``transport.write`` queues every write, asks
epoll for writability, sends on the next loop turn and then stops asking:
two ``epoll_ctl`` calls and a loop turn per write.  When nothing is queued
on the transport, the bytes can go out at once; whatever the socket does
not take goes through Twisted as usual, so ordering, backpressure and error
handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any


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
