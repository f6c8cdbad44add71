"""What the sentinels publish, as the Sentinel integration tests see it.

- :class:`SwitchWatcher`: ``PSUBSCRIBE +switch-master`` on every sentinel, the
  monotonic time and payload of each message: "the switch time", precisely.
- :class:`SentinelRelay`: a TCP forwarder in front of one sentinel that can
  silently stop delivering to event (subscribed) connections only.

Both are made by :class:`tests.sentinel_servers.Topology` (``watcher``,
``relay()``); this module does not import it.
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

from tests.resp_client import NOTHING, Resp
from tests.servers import LOOPBACK

if TYPE_CHECKING:
    from tests.sentinel_servers import SentinelServer

# -- +switch-master, as it happens ----------------------------------------------------


@dataclass(frozen=True)
class SwitchEvent:
    at: float  # time.monotonic() when the watcher read it
    sentinel: int  # the port of the sentinel that published it
    payload: str  # "<name> <old-ip> <old-port> <new-ip> <new-port>"

    @property
    def name(self) -> str:
        return self.payload.split()[0]

    @property
    def old_address(self) -> str:
        parts = self.payload.split()
        return f"{parts[1]}:{parts[2]}"

    @property
    def new_address(self) -> str:
        parts = self.payload.split()
        return f"{parts[3]}:{parts[4]}"


class SwitchWatcher(threading.Thread):
    """``PSUBSCRIBE +switch-master`` on every sentinel; records every message with its time.

    ``start()`` returns once every subscription is confirmed, so a fault
    injected afterwards is seen.  A sentinel that dies just drops out.
    """

    def __init__(self, sentinels: Sequence[SentinelServer]) -> None:
        super().__init__(name="switch-watcher", daemon=True)
        self._sentinels = list(sentinels)
        self._connections: List[Resp] = []
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = False
        self._changed = threading.Condition()
        self.events: List[SwitchEvent] = []

    def start(self) -> None:
        for sentinel in self._sentinels:
            connection = Resp(sentinel.port, sentinel.password, timeout=5)
            reply = connection.call("PSUBSCRIBE", "+switch-master")
            if not (isinstance(reply, list) and reply[0] == "psubscribe"):
                raise AssertionError(f"PSUBSCRIBE on {sentinel}: {reply!r}")
            connection.sock.setblocking(False)
            self._connections.append(connection)
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        super().start()

    def run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
                connection = key.data
                if connection is None:
                    continue
                try:
                    data = connection.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(connection.sock)
                    connection.close()
                    continue
                now = time.monotonic()
                connection.feed(data)
                while True:
                    message = connection.read_buffered()
                    if message is NOTHING:
                        break
                    if isinstance(message, list) and len(message) == 4 and message[0] == "pmessage":
                        with self._changed:
                            self.events.append(SwitchEvent(now, connection.port, message[3]))
                            self._changed.notify_all()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass
        if self.is_alive():
            self.join(5)
        for connection in self._connections:
            connection.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def first(self, name: str, after: float = 0.0) -> Optional[SwitchEvent]:
        """The first ``+switch-master`` for ``name`` read at or after ``after`` (monotonic), if any."""
        with self._changed:
            return next((event for event in self.events if event.name == name and event.at >= after), None)

    def wait(self, name: str, timeout: float = 15.0, after: float = 0.0) -> SwitchEvent:
        """``first(name, after)``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                event = next((event for event in self.events if event.name == name and event.at >= after), None)
                if event is not None:
                    return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no +switch-master for {name} within {timeout}s; saw {self.events}")
                self._changed.wait(remaining)

    def count(self, name: str) -> int:
        """How many sentinels have published a +switch-master for ``name`` so far."""
        with self._changed:
            return len({event.sentinel for event in self.events if event.name == name})


# -- a relay that can silence event connections ------------------------------------------

_SUBSCRIBE = re.compile(rb"subscribe", re.IGNORECASE)


class _Link:
    """One client connection through the relay and its upstream twin."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        self.tail = b""  # the last client bytes, so a SUBSCRIBE split over two reads is still seen
        self.events = False  # the client sent a (P|S)SUBSCRIBE
        self.closed = False


class SentinelRelay:
    """A TCP forwarder on 127.0.0.1 in front of one sentinel (one thread, selectors).

    ``cut_events(True)``: from then on, whatever the sentinel sends on a
    connection whose client sent a (P)SUBSCRIBE is read and dropped (no
    messages, no pongs); nothing is closed, and the client's bytes still
    reach the sentinel.  Query connections keep working.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._links: List[_Link] = []
        self._lock = threading.Lock()
        self._cut = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        # What went through, for the tests to check that the cut had something to cut.
        self.connections = 0
        self.event_connections = 0
        self.dropped_bytes = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> "SentinelRelay":
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def cut_events(self, cut: bool = True) -> None:
        with self._lock:
            self._cut = cut

    @property
    def open_event_connections(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if link.events and not link.closed)

    def stop(self) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        for link in list(self._links):
            self._close(link)
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()
        self._selector.close()

    # -- the loop (relay thread only)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    continue
                else:
                    link, side = key.data
                    if not link.closed and mask & selectors.EVENT_READ:
                        self._read(link, side)
                    if not link.closed and mask & selectors.EVENT_WRITE:
                        self._flush(link, side)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2)
        except OSError:  # the sentinel is down: as it would be without a relay
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            self._links.append(link)
            self.connections += 1
        self._selector.register(client, selectors.EVENT_READ, (link, "client"))
        self._selector.register(upstream, selectors.EVENT_READ, (link, "upstream"))

    def _read(self, link: _Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(link)
            return
        if side == "client":
            if not link.events:
                seen = link.tail + data
                if _SUBSCRIBE.search(seen):
                    with self._lock:
                        link.events = True
                        self.event_connections += 1
                link.tail = seen[-16:]
            link.to_upstream += data
            self._flush(link, "upstream")
        else:
            with self._lock:
                if link.events and self._cut:
                    self.dropped_bytes += len(data)
                    return
            link.to_client += data
            self._flush(link, "client")

    def _flush(self, link: _Link, side: str) -> None:
        """Write what is pending towards ``side``; watch for writability while some is left."""
        sock, pending, other = ((link.client, link.to_client, "client") if side == "client"
                                else (link.upstream, link.to_upstream, "upstream"))
        if pending:
            try:
                sent = sock.send(pending)
                del pending[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close(link)
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
        self._selector.modify(sock, events, (link, other))

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.client, link.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        with self._lock:
            self._links.remove(link)


__all__ = ["SentinelRelay", "SwitchEvent", "SwitchWatcher"]
