"""Deleting what a memcached server still holds of slots it is about to get back.

Owns :func:`purge`: before a memcache cluster's slots warm up on a group,
the dashboard deletes every item of those slots its servers still hold —
left there by an earlier migration away from the group (its read-only
items stay behind and go stale once another group serves them), a
cancelled one, or a forced assign — since a warming slot serves the target
first and would return such an item as current.  It lists the server's
items with ``lru_crawler metadump all`` (memcached's LRU crawler, on by
default: the server keeps serving meanwhile), computes each key's slot and
sends ``md <key> b q`` for those in the range, then ``mn`` to know they are
done.  Runs while the range is pending or prepared, when no proxy sends
those slots to the group.  Runs in the reactor and never blocks it.

Keys written through the proxy with meta's base64 flag (``b``) are routed
by their base64 text but stored (and listed) as raw bytes: their slot is
not recomputed here, so such items are deleted only when the raw key falls
in the range too.

An adoption's entry runs none (each server holds only the keys the pool
placed on it), except after an earlier entry of the same server was
cancelled: what was written or warmed up at the slots' owners meanwhile is
stale once the server served its keys again, so those keys (the pool
placed them on that server) are deleted from the other servers first
(:func:`twinproxy.dashboard.adoption.leftovers_of`).
"""

from __future__ import annotations

import base64
from typing import Any, Callable, List, Optional
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from twinproxy.cluster.slots import slot_of
from twinproxy.dashboard.servers import ServerError, split_address, with_deadline

DELETES_PER_WRITE = 512


class _Purge(Protocol):
    def __init__(self, address: str, first: int, last: int, result: defer.Deferred,
                 belongs: Optional[Callable[[bytes], bool]] = None) -> None:
        self.address = address
        self.first = first
        self.last = last
        self.result = result
        self.belongs = belongs
        self.buffer = bytearray()
        self.keys: List[bytes] = []
        self.deleting = False

    def connectionMade(self) -> None:
        self.transport.write(b"lru_crawler metadump all\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.deleting:
            if self.buffer.endswith(b"MN\r\n"):
                self._done(len(self.keys))
            return
        buffer = self.buffer
        pos = 0
        try:
            while True:
                end = buffer.find(b"\n", pos)
                if end < 0:
                    return
                line = bytes(buffer[pos:end]).rstrip(b"\r")
                pos = end + 1
                if line == b"END":
                    self._delete()
                    return
                if not line.startswith(b"key="):
                    self._fail(f"{self.address} did not list its items (lru_crawler metadump all: "
                               f"{line.decode('utf-8', 'replace')[:200]}); memcached needs its LRU crawler "
                               "(on by default) so that leftover items of the slots can be deleted first")
                    return
                key = unquote_to_bytes(line[4:].split(b" ", 1)[0])
                if self.first <= slot_of(key) <= self.last and (self.belongs is None or self.belongs(key)):
                    self.keys.append(key)
        finally:
            if not self.deleting:
                del buffer[:pos]      # once per read, not per line

    def _delete(self) -> None:
        self.deleting = True
        keys = self.keys
        for start in range(0, len(keys), DELETES_PER_WRITE):
            self.transport.write(b"".join(b"md %s b q\r\n" % base64.b64encode(key)
                                          for key in keys[start:start + DELETES_PER_WRITE]))
        self.transport.write(b"mn\r\n")
        self.buffer = bytearray()

    def _done(self, value: Any) -> None:
        if not self.result.called:
            self.result.callback(value)
        self.transport.loseConnection()

    def _fail(self, text: str) -> None:
        if not self.result.called:
            self.result.errback(ServerError(text))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.result.called:
            self.result.errback(ServerError(f"{self.address} closed the connection while its leftover items "
                                            "were being deleted"))


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, address: str, first: int, last: int, result: defer.Deferred,
                 belongs: Optional[Callable[[bytes], bool]] = None) -> None:
        self.args = (address, first, last, result, belongs)

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Purge(*self.args)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        result = self.args[3]
        if not result.called:
            result.errback(ServerError(f"{self.args[0]}: {reason.getErrorMessage()}"))


def purge(reactor: Any, address: str, first: int, last: int, timeout: float,
          belongs: Optional[Callable[[bytes], bool]] = None) -> defer.Deferred:
    """Delete the items of slots ``first..last`` memcached ``address`` holds; fires with how many were listed.

    ``belongs(key)``: only the keys it is true of (an adoption's: those the
    adopted pool placed on another server; None: every key of the slots).

    Fails with :class:`ServerError` (naming the server) when it cannot list
    them, or does not finish within ``timeout`` seconds.
    """
    result: defer.Deferred = defer.Deferred()
    factory = _Factory(address, first, last, result, belongs)
    if address.startswith("/"):
        connector = reactor.connectUNIX(address, factory, timeout=timeout)
    else:
        host, port = split_address(address)
        connector = reactor.connectTCP(host, port, factory, timeout=timeout)

    return with_deadline(reactor, result, connector, timeout,
                         f"{address}: deleting its leftover items took longer than {timeout:g}s")


__all__ = ["purge"]
