"""Helpers of the dashboard controller tests: controllers on a file coordinator, fake proxy registrations.

- :class:`Harness`: file-coordinator sessions and Controllers in the session
  reactor (``call`` runs in it and waits; ``launch`` starts something there
  and returns a :class:`Pending`); ``close`` stops all of them.
- :class:`Relay`: a TCP relay to a server that can hold what the server
  sends (a replica behind it falls behind while both still answer INFO).
- :class:`FakeProxy`: a proxy registration (an Ephemeral under
  ``/clusters/<c>/proxies``, in a session of its own, as a real proxy has)
  that the test acknowledges by hand (``ack``) or that acknowledges every
  generation it sees (``auto``), remembering what it saw.
- :class:`Faults`: the seam for injected faults: chosen calls of one method
  (a controller's ``coordinator.set`` / ``get``, its ``admin.command``) fail
  as a passed deadline would, before or after doing what they were asked;
  ``writing``, ``coordinator_timeout`` and ``server_timeout`` build the rules.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

from twisted.internet import defer

from tests.conftest import in_reactor
from tests.servers import LOOPBACK, wait_until
from twinproxy.cluster.model import Topology


class Pending:
    """Something started in the reactor; ``wait()`` returns its result or raises its error."""

    def __init__(self, reactor: Any, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None

        def run() -> None:
            defer.maybeDeferred(function, *args, **kwargs).addCallbacks(self._ok, self._failed)

        reactor.callFromThread(run)

    def _ok(self, value: Any) -> None:
        self.result = value
        self._done.set()

    def _failed(self, failure: Any) -> None:
        self.error = failure.value
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = 30.0) -> Any:
        if not self._done.wait(timeout):
            raise AssertionError(f"not done within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result

    def failure(self, timeout: float = 30.0) -> BaseException:
        """The error it ended with (AssertionError if it succeeded)."""
        try:
            value = self.wait(timeout)
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - that is what is asked for
            return err
        raise AssertionError(f"expected a failure, got {value!r}")


class Harness:
    """Coordinator sessions and controllers of one test, on one file coordinator directory."""

    def __init__(self, reactor: Any, root: Path, cluster: str = "shop") -> None:
        self.reactor = reactor
        self.url = f"file://{root}"
        self.cluster = cluster
        self.coordinators: List[Any] = []
        self.controllers: List[Any] = []
        self.proxies: List["FakeProxy"] = []

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return in_reactor(self.reactor, function, *args, **kwargs)

    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        return Pending(self.reactor, function, *args, **kwargs)

    def coordinator(self) -> Any:
        from twinproxy.coordinator import connect

        coordinator = self.call(connect, self.url, self.reactor)
        self.coordinators.append(coordinator)
        self.call(coordinator.start)
        return coordinator

    def controller(self, start: bool = True, protocol: str = "redis", **options: Any) -> Any:
        from twinproxy.dashboard.controller import Controller

        options.setdefault("ack_timeout", 5.0)
        options.setdefault("poll_period", 0.2)
        options.setdefault("addr", "127.0.0.1:18080")
        coordinator = self.coordinator()
        controller = self.call(Controller, coordinator, self.cluster, protocol, self.reactor, **options)
        self.controllers.append(controller)
        if start:
            self.call(controller.start)
        return controller

    def proxy(self, name: str, generation: int = 0, auto: bool = False, addr: Optional[str] = None,
              ) -> "FakeProxy":
        proxy = FakeProxy(self, name, generation, auto, addr)
        self.proxies.append(proxy)
        return proxy

    def fail(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The OperationError an operation ends with."""
        from twinproxy.dashboard.errors import OperationError

        error = self.launch(function, *args, **kwargs).failure()
        assert isinstance(error, OperationError), repr(error)
        return error

    def stored(self) -> Topology:
        """The topology as the coordinator holds it now."""
        coordinator = self.coordinators[0]
        node = self.call(coordinator.get, f"/clusters/{self.cluster}/topology")
        return Topology.from_json(node.value)

    def close(self) -> None:
        for controller in self.controllers:
            self.call(controller.stop)
        for coordinator in self.coordinators:
            self.call(coordinator.stop)


class FakeProxy:
    """A proxy registration the test drives; ``seen`` lists the topologies an ``auto`` proxy applied."""

    def __init__(self, harness: Harness, name: str, generation: int, auto: bool, addr: Optional[str]) -> None:
        self.harness = harness
        self.name = name
        self.addr = addr or "127.0.0.1:1"
        self.generation = generation
        self.seen: List[Topology] = []
        self.coordinator = harness.coordinator()
        self.path = f"/clusters/{harness.cluster}/proxies/{name}"
        self.ephemeral = harness.call(self.coordinator.ephemeral, self.path, self._document())
        if auto:
            harness.call(self.coordinator.watch, f"/clusters/{harness.cluster}/topology", self._applied)

    def _document(self) -> bytes:
        return json.dumps({"id": self.name, "addr": self.addr, "admin": None, "pid": 1, "host": "test",
                           "start": 0.0, "version": "test", "protocol": "redis", "generation": self.generation,
                           "session": "s", "updated": time.time(), "workers": 1}).encode()

    def _applied(self, node: Any) -> None:
        if node is None:
            return
        topology = Topology.from_json(node.value)
        self.seen.append(topology)
        self.generation = topology.generation
        self.ephemeral.update(self._document()).addErrback(lambda failure: None)

    def ack(self, generation: int) -> None:
        self.generation = generation
        self.harness.call(self.ephemeral.update, self._document())

    def leave(self) -> None:
        self.harness.call(self.ephemeral.remove)


def replication(server: Any) -> dict:
    """``INFO replication`` of a RedisServer as a dict."""
    return server.client().info("replication")


def fast_sync(servers: List[Any]) -> List[Any]:
    """The servers, with no 5 s wait before a full sync (Redis 7's repl-diskless-sync-delay default)."""
    for server in servers:
        server.client().config_set("repl-diskless-sync-delay", 0)
    return servers


def wait_replicating(replica: Any, master: Any, timeout: float = 10.0) -> None:
    wait_until(lambda: (replication(replica).get("master_port") == master.port
                        and replication(replica).get("master_link_status") == "up"),
               timeout=timeout, what=f"{replica.address} to replicate {master.address}")


class Relay:
    """Forwards connections on ``port`` to ``target_port``; ``pause()`` holds the bytes coming back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._sockets: List[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="relay")]
        self._threads[0].start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._stopped.set()
        self._flowing.set()
        self._threads[0].join(5)       # no new connection after this
        for thread in self._threads[1:]:
            thread.join(5)
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            if not select.select([self._listener], [], [], 0.05)[0]:
                continue
            client, _ = self._listener.accept()
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            self._sockets += [client, upstream]
            for source, target, gated in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(source, target, gated), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, target: socket.socket, gated: bool) -> None:
        while not self._stopped.is_set():
            if gated and not self._flowing.wait(0.05):
                continue
            if not select.select([source], [], [], 0.05)[0]:
                continue
            if gated and not self._flowing.is_set():
                continue      # paused while waiting: leave the bytes in the socket
            try:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Faults:
    """Wraps ``target.name`` (a method returning a Deferred) so that chosen calls fail; records every call.

    ``fail(when, error, landed=False)``: the next call whose positional
    arguments satisfy ``when(*args)`` fails with ``error()`` — before doing
    anything, or (``landed``) after the real call succeeded, as when a
    reply is lost past its deadline.  ``calls`` lists every call's
    arguments, ``failed`` those that were made to fail.  Set the rules
    before starting what makes the calls (they are read in the reactor).
    """

    def __init__(self, target: Any, name: str) -> None:
        self._real = getattr(target, name)
        self._rules: List[Any] = []
        self.calls: List[tuple] = []
        self.failed: List[tuple] = []
        setattr(target, name, self._call)

    def fail(self, when: Callable[..., bool], error: Callable[[], Exception], landed: bool = False) -> None:
        self._rules.append((when, error, landed))

    def _call(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        self.calls.append(args)
        rule = next((rule for rule in self._rules if rule[0](*args)), None)
        if rule is None:
            return self._real(*args, **kwargs)
        self._rules.remove(rule)
        self.failed.append(args)
        _, error, landed = rule
        if not landed:
            return defer.fail(error())

        def lost(_: Any) -> None:
            raise error()

        return defer.maybeDeferred(self._real, *args, **kwargs).addCallback(lost)


def writing(predicate: Callable[[Topology], bool]) -> Callable[..., bool]:
    """A ``Faults`` rule for ``coordinator.set``: a topology write whose new document satisfies ``predicate``."""
    return lambda path, value=b"", *rest: path.endswith("/topology") and predicate(Topology.from_json(value))


def coordinator_timeout() -> Exception:
    from twinproxy.coordinator import Unavailable

    return Unavailable("file:///test", "set", "/clusters/shop/topology", "no answer within 5s (injected)")


def server_timeout(address: str) -> Callable[[], Exception]:
    def error() -> Exception:
        from twinproxy.dashboard.servers import ServerUnreachable

        return ServerUnreachable(f"{address} did not answer: no reply within 0.5s (injected)", "timeout")
    return error
