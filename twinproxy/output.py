"""Replies on their way to one client: sent at once, else queued here, uncopied.

Owns :class:`ClientOutput`: the bytes of replies a client has not taken
yet, counted exactly, and the estimate of how big its next replies will be
(for the requests it still has in flight).  The frontend decides what the
counts mean (read less, close the client); this module only writes.

Twisted's ``transport.write`` queues in ``_tempDataBuffer`` and, each time
what it is sending runs low, joins *everything* queued into one new string:
a client that reads slowly has its whole backlog copied, so the peak is
twice the backlog.  On a plain TCP or unix transport this class sends on
the socket itself and keeps the backlog as the reply objects that arrived
(big replies as they are, small ones joined per burst), advancing with
memoryviews: no copy of a big reply, ever.  The transport is registered as
a *pull* producer's consumer, so it calls ``resumeProducing`` whenever the
socket is writable after ``startWriting`` (its own buffer stays empty).
Other transports (TLS, test doubles) get ``transport.write`` as before.
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Any, List

# A burst of replies up to this size is joined and sent in one call; in
# bigger bursts, replies from BIG_REPLY bytes are queued as they are and
# the small ones between them joined up to JOIN_LIMIT.
JOIN_LIMIT = 64 * 1024
BIG_REPLY = 16 * 1024
# What a reply is assumed to weigh before any was seen (the first burst of a client).
INITIAL_ESTIMATE = 1024


class ClientOutput:
    """The reply bytes of one client not yet taken by its socket.

    ``queued`` is exact: bytes handed to :meth:`write` minus bytes the
    socket took (on the fallback path, Twisted's own buffer as far as the
    transport shows it).  ``estimate`` follows the size of replies: it
    jumps up to a bigger average burst at once and decays slowly, so a
    client's in-flight requests are not underestimated for long.
    """

    __slots__ = ("_transport", "_socket", "_chunks", "queued", "waiting", "estimate", "_learned", "_budget",
                 "charged")

    def __init__(self, transport: Any, sock: Any, budget: Any = None) -> None:
        self._transport = transport
        self._socket = sock
        self._budget = budget      # the process's ReplyBudget, or None
        self.charged = 0           # what this client counts for in it
        self._chunks: deque = deque()
        self.queued = 0
        self.waiting = False   # startWriting called; the transport will call resumeProducing
        self.estimate = INITIAL_ESTIMATE
        self._learned = False

    @property
    def direct(self) -> bool:
        """Whether this writes the socket itself (and wants pull-producer registration)."""
        return self._socket is not None

    def write(self, replies: List[bytes]) -> None:
        """Send one burst of replies, in order, as far as the socket takes it; queue the rest."""
        count = len(replies)
        data = replies[0] if count == 1 else None
        total = len(data) if data is not None else sum(map(len, replies))
        average = total // count
        estimate = self.estimate
        if average > estimate or not self._learned:
            self.estimate = average or 1
            self._learned = True
        elif average < estimate:
            self.estimate = estimate - ((estimate - average) >> 4) or 1
        if self._socket is None:
            self._write_through(data if data is not None else b"".join(replies))
            return
        chunks = self._chunks
        if data is None and total <= JOIN_LIMIT:
            data = b"".join(replies)
        if data is None:
            chunks.extend(_group(replies))
            self.queued += total
            if not self.waiting:
                self.pump()
        elif chunks or self.waiting:
            chunks.append(data)   # behind what the socket has not taken yet
            self.queued += total
        else:
            try:
                sent = self._socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                sent = 0 if err.errno == errno.ENOBUFS else -1
            if sent == total:
                return
            if sent < 0:
                self._broken()
                return
            chunks.append(memoryview(data)[sent:] if sent else data)
            self.queued += total - sent
            self._wait_writable()

    def pump(self) -> None:
        """The socket is writable: send what is queued until the socket is full or nothing is left."""
        self.waiting = False
        chunks = self._chunks
        while chunks:
            chunk = chunks[0]
            size = len(chunk)
            sent = self._send(chunk)
            if sent < 0:
                self._broken()
                return
            self.queued -= sent
            if sent == size:
                chunks.popleft()
                continue
            if sent:
                chunks[0] = memoryview(chunk)[sent:]
            self._wait_writable()
            return

    def pinned(self, in_flight: int) -> int:
        """Reply bytes the client holds in the proxy, or will: queued, plus ``in_flight`` at the estimate."""
        return self.queued + in_flight * self.estimate

    def account(self, in_flight: int) -> int:
        """Bring the client's share of the process budget up to date; return what it pins."""
        pinned = self.queued + in_flight * self.estimate
        budget = self._budget
        if budget is not None:
            delta = pinned - self.charged
            if delta:
                self.charged = pinned
                used = budget.used + delta   # ReplyBudget.charge, inlined: this runs per read and per write
                budget.used = used
                if used >= budget.limit or budget.over:
                    budget.charge(0)
        return pinned

    def room(self, in_flight: int, limit: int) -> int:
        """How many more requests fit under ``limit`` and the process budget, at the estimate (0: none)."""
        estimate = self.estimate
        spare = limit - self.queued - in_flight * estimate
        budget = self._budget
        if budget is not None and budget.limit - budget.used < spare:
            spare = budget.limit - budget.used
        return spare // estimate + 1 if spare > 0 else 0

    def discard(self) -> None:
        """Forget what is queued and give the client's share of the budget back (closed or gone)."""
        self._chunks.clear()
        self.queued = 0
        charged, self.charged = self.charged, 0
        if charged and self._budget is not None:
            self._budget.charge(-charged)

    def transport_drained(self) -> None:
        """Fallback path: Twisted says its buffer is empty (it resumed us)."""
        if self._socket is None:
            self.queued = 0

    # -- internals ------------------------------------------------------------

    def _send(self, data: Any) -> int:
        """Bytes the socket took (0 when full); -1 when the connection is broken."""
        try:
            return self._socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                return 0
            return -1

    def _wait_writable(self) -> None:
        self.waiting = True
        self._transport.startWriting()

    def _broken(self) -> None:
        # Nothing more can be delivered.  Twisted's next write attempt on the
        # socket meets the error too and closes the connection its usual way.
        self._chunks.clear()
        self.queued = 0
        self._wait_writable()

    def _write_through(self, data: bytes) -> None:
        transport = self._transport
        transport.write(data)
        buffered = getattr(transport, "_tempDataLen", None)
        if buffered is not None:
            self.queued = buffered + len(transport.dataBuffer) - transport.offset


def _group(replies: List[bytes]) -> List[bytes]:
    """Big replies as they are, the small ones between them joined (up to JOIN_LIMIT each)."""
    grouped: List[bytes] = []
    run: List[bytes] = []
    run_size = 0
    for reply in replies:
        size = len(reply)
        if size >= BIG_REPLY:
            if run:
                grouped.append(run[0] if len(run) == 1 else b"".join(run))
                run = []
                run_size = 0
            grouped.append(reply)
            continue
        run.append(reply)
        run_size += size
        if run_size >= JOIN_LIMIT:
            grouped.append(b"".join(run))
            run = []
            run_size = 0
    if run:
        grouped.append(run[0] if len(run) == 1 else b"".join(run))
    return grouped


def peer_text(transport: Any) -> str:
    """The client's address for a log line: ``host:port``, a socket path, or ``unix socket``."""
    try:
        peer = transport.getPeer()
    except Exception:  # noqa: BLE001 - a log line must not fail
        return "unknown"
    host = getattr(peer, "host", None)
    if host is not None:
        return f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"
    name = getattr(peer, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name or "unix socket"
