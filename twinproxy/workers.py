"""``--workers N``: N processes serving the same pools, one master that speaks for them.

Owns: forking the workers before any reactor exists (a reactor's epoll
descriptor must never be shared), the listening sockets they share (TCP
with ``SO_REUSEPORT``, where ``host:0`` is resolved once by the master so
every worker binds the same port; unix sockets made before the fork and
inherited), and :class:`Master`: it supervises the workers, serves the
stats port with their counters summed (a worker that does not answer is
logged, and its last counters kept, so sums never go backwards), and
applies a reload to every worker through the control channel
(``workerctl``) — reported applied only when every worker applied it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy import stats
from twinproxy.config import ListenSpec, PoolConfig
from twinproxy.listeners import reserve_port, unix_socket
from twinproxy.reload import ApplyError, shared

# How long the master waits for every worker to listen, and how often it asks.
READY_SECONDS = 60.0
READY_POLL = 0.05


class WorkerSetup:
    """What makes one process a worker: its control socket and the listeners it inherited."""

    def __init__(self, control_path: str, inherited: Dict[str, socket.socket]) -> None:
        self.control_path = control_path
        self.inherited = inherited

    def take_inherited(self, config: PoolConfig) -> Optional[socket.socket]:
        """The socket made for ``config``'s unix listen, once: the pool that takes it closes it."""
        sock = self.inherited.get(config.name)
        if sock is None or not config.listen.is_unix or sock.fileno() < 0:
            return None
        if sock.getsockname() != config.listen.path:
            return None
        del self.inherited[config.name]
        return sock

    def serve(self, top: Any, proxy: Any, pools: Callable[[], Sequence[Any]], started: float, reactor: Any,
              log_control: Any) -> None:
        """Add the control socket to the worker's service tree."""
        from twinproxy.workerctl import WorkerControlService

        WorkerControlService(self.control_path, proxy, pools, started, reactor, log_control).setServiceParent(top)


class PortReservations:
    """The master's hold on every ``host:0`` TCP listen, so all workers bind one port.

    Keyed by pool name and the listen as written: a reload that keeps a
    pool's ``127.0.0.1:0`` keeps its port.
    """

    def __init__(self) -> None:
        self._held: Dict[tuple, socket.socket] = {}

    def resolve(self, pools: Sequence[PoolConfig]) -> List[PoolConfig]:
        resolved = []
        for config in pools:
            listen = config.listen
            if listen.is_unix or listen.port != 0:
                resolved.append(config)
                continue
            key = (config.name, listen)
            sock = self._held.get(key)
            if sock is None:
                sock = self._held[key] = reserve_port(listen)
            port = sock.getsockname()[1]
            resolved.append(replace(config, listen=ListenSpec(host=listen.host, port=port)))
        return resolved

    def keep_only(self, pools: Sequence[PoolConfig]) -> None:
        """Release the ports of pools no longer in the file (after a reload)."""
        wanted = {(config.name, config.listen) for config in pools}
        for key in [key for key in self._held if key not in wanted]:
            self._held.pop(key).close()

    def close(self) -> None:
        for sock in self._held.values():
            sock.close()
        self._held.clear()


def run_master(options: Any, count: int, serve_worker: Callable[[Any, WorkerSetup], int],
               start_master: Callable[[], tuple]) -> int:
    """Fork ``count`` workers that each run ``serve_worker``; then be their master until stopped.

    ``start_master`` is called once the workers are forked: it begins the
    master's logging and gives (reactor, log control).
    """
    rundir = tempfile.mkdtemp(prefix="twinproxy-workers-")
    reservations = PortReservations()
    file_pools = list(options.pools)
    options.pools = reservations.resolve(file_pools)
    inherited: Dict[str, socket.socket] = {}
    for config in options.pools:
        if config.listen.is_unix:
            inherited[config.name] = unix_socket(config.listen, config.backlog)
    children: List[int] = []
    paths: List[str] = []
    for index in range(count):
        path = os.path.join(rundir, f"worker-{index}.ctl")
        paths.append(path)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reservations.close()  # the master's; the worker binds its own
                code = serve_worker(options, WorkerSetup(path, inherited))
            finally:
                os._exit(code)
        children.append(pid)
    unix_paths = {(config.name, config.listen.path) for config in options.pools if config.listen.is_unix}
    for sock in inherited.values():
        sock.close()
    reactor, log_control = start_master()  # after the forks: the reactor is the master's alone
    master = Master(options, file_pools, children, paths, reservations, set(unix_paths), reactor, log_control)
    try:
        return master.run()
    finally:
        reservations.close()
        for _, path in unix_paths:
            try:
                os.unlink(path)   # the workers leave the shared sockets' paths to the master
            except OSError:
                pass
        for name in os.listdir(rundir):
            os.unlink(os.path.join(rundir, name))
        os.rmdir(rundir)


class Master:
    """The parent of the workers: stats port, SIGHUP and reloads, stop signals, reaping."""

    _log = Logger()

    def __init__(self, options: Any, file_pools: List[PoolConfig], children: List[int], paths: List[str],
                 reservations: PortReservations, unix_paths: Set[tuple], reactor: Any,
                 log_control: Any = None) -> None:
        from twinproxy.control import ReloadCounters

        self._options = options
        self._file_pools = file_pools
        self._children = children
        self._alive = set(children)
        self._paths = paths
        self._reservations = reservations
        self._unix_paths = unix_paths
        self._reactor = reactor
        self.counters = ReloadCounters()
        self._last: Dict[str, Dict[str, Any]] = {}
        self._silent: Set[str] = set()
        self._renewing: Set[str] = set()     # workers with a slot lease renewal in flight
        self._unrenewed: Set[str] = set()    # workers whose last renewal failed (logged once)
        self.workers_answered = 0
        self._log_control = log_control
        self._resolved: List[PoolConfig] = list(options.pools)   # the pools as the workers serve them
        self._stopping = False
        self.ready: defer.Deferred = self._wait_for_workers()

    # -- stats ----------------------------------------------------------------

    @defer.inlineCallbacks
    def document(self) -> Any:
        """Every worker's counters summed; a worker that does not answer counts with its last ones."""
        from twinproxy.workerctl import ask

        results = yield defer.DeferredList([ask(self._reactor, path, {"op": "stats"}) for path in self._paths],
                                           consumeErrors=True)
        answered = 0
        for path, (ok, reply) in zip(self._paths, results):
            if ok and reply.get("ok"):
                answered += 1
                self._last[path] = reply["document"]
                if path in self._silent:
                    self._silent.discard(path)
                    self._log.info("worker at {path} answers again", path=path)
                continue
            why = reply.getErrorMessage() if not ok else reply.get("error")
            if path not in self._silent:
                self._silent.add(path)
                self._log.warn("worker at {path} did not answer for stats ({why}); its last counters stand",
                               path=path, why=why)
        self.workers_answered = answered
        merged = stats.merge_documents([self._last[p] for p in self._paths if p in self._last])
        counters = self.counters
        merged["config_generation"] = counters.generation
        merged["reloads"] = counters.reloads
        merged["reload_failures"] = counters.reload_failures
        merged["workers"] = len(self._paths)
        merged["workers_answered"] = answered
        return json.dumps(merged).encode() + b"\n"

    # -- readiness ------------------------------------------------------------

    @defer.inlineCallbacks
    def _wait_for_workers(self) -> Any:
        """Fires once every worker answers on its control socket, which it opens after its pools listen."""
        from twinproxy.workerctl import ask

        deadline = self._reactor.seconds() + READY_SECONDS
        waiting = list(self._paths)
        while waiting and self._reactor.seconds() < deadline:
            results = yield defer.DeferredList([ask(self._reactor, path, {"op": "stats"}) for path in waiting],
                                               consumeErrors=True)
            alive = set(self._serving_paths())
            waiting = [path for path, (ok, reply) in zip(waiting, results)
                       if path in alive and not (ok and reply.get("ok"))]
            if waiting:
                yield task.deferLater(self._reactor, READY_POLL, lambda: None)
        if waiting:
            self._log.error("{count} workers did not start listening within {seconds}s: {paths}",
                            count=len(waiting), seconds=READY_SECONDS, paths=", ".join(waiting))

    # -- reload ---------------------------------------------------------------

    def _apply_everywhere(self, pools: List[PoolConfig]) -> Any:
        """``apply`` for cluster mode: a commit some worker did not confirm is a failure (tried again)."""
        return self.apply(pools, partial_is_failure=True)

    @defer.inlineCallbacks
    def apply(self, pools: List[PoolConfig], partial_is_failure: bool = False) -> Any:
        """The Reloader's apply: every worker prepares, then every worker commits."""
        from twinproxy.workerctl import PartialCommitError, apply_everywhere

        yield shared(self.ready)   # a SIGHUP during start-up waits for the workers
        running = {config.name: config for config in self._file_pools}
        for config in pools:
            before = running.get(config.name)
            if config.listen.is_unix and before is not None and before.redis != config.redis:
                raise ApplyError(f"pool {config.name}: with --workers the protocol of a pool on a unix socket "
                                 "can only change at a restart")
            if config.listen.is_unix and (config.name, config.listen.path) not in self._unix_paths:
                raise ApplyError(f"pool {config.name}: with --workers a unix socket listen ({config.listen}) can "
                                 "only be added at start-up (the workers share sockets made before they were "
                                 "forked); restart to use it")
        try:
            resolved = self._reservations.resolve(pools)
        except OSError as err:
            self._reservations.keep_only(self._file_pools)
            raise ApplyError(f"cannot reserve a port: {err}") from None
        failed_partially: Optional[str] = None
        try:
            changes = yield apply_everywhere(self._reactor, self._serving_paths(), resolved)
        except PartialCommitError as partial:
            self._log.error("reload applied, but not confirmed by every worker: {why}", why=str(partial))
            changes = partial.changes
            failed_partially = str(partial)
        except RuntimeError as err:
            self._reservations.keep_only(self._file_pools)
            raise ApplyError(str(err)) from None
        self._file_pools = list(pools)
        self._reservations.keep_only(pools)
        # A unix socket given up (pool removed or moved) is closed in every worker: gone for good.
        self._unix_paths &= {(c.name, c.listen.path) for c in pools if c.listen.is_unix}
        self._resolved = resolved
        counters = self.counters
        counters.generation += 1
        counters.reloads += 1
        counters.last_reload_at = self._reactor.seconds()
        if failed_partially is not None and partial_is_failure:
            raise ApplyError(f"applied, but not confirmed by every worker: {failed_partially}")
        return changes

    def _settle(self) -> Any:
        from twinproxy.workerctl import settle_everywhere

        return settle_everywhere(self._reactor, self._serving_paths())

    def _renew(self, until: float) -> None:
        """Every worker's slot lease; at most one renewal in flight per worker (a hung one is skipped)."""
        from twinproxy.workerctl import ask

        for path in self._serving_paths():
            if path in self._renewing:
                continue
            self._renewing.add(path)

            def answered(result: Any, path: str = path) -> None:
                self._renewing.discard(path)
                late = isinstance(result, Failure) or not result.get("ok")
                if late and path not in self._unrenewed:
                    self._unrenewed.add(path)
                    why = result.getErrorMessage() if isinstance(result, Failure) else result.get("error")
                    self._log.warn("worker at {path}: its slot lease was not renewed: {why}", path=path, why=why)
                elif not late and path in self._unrenewed:
                    self._unrenewed.discard(path)
                    self._log.info("worker at {path}: its slot lease is renewed again", path=path)

            ask(self._reactor, path, {"op": "lease", "until": until}).addBoth(answered)

    def _pool_address(self, config: PoolConfig) -> str:
        for resolved in self._resolved:
            if resolved.name == config.name:
                return str(resolved.listen)
        return str(config.listen)

    def _serving_paths(self) -> List[str]:
        """The control sockets of the workers still alive: a dead one must not block every reload."""
        return [path for pid, path in zip(self._children, self._paths) if pid in self._alive]

    def reopen_workers_logs(self) -> None:
        from twinproxy.workerctl import ask

        for path in self._paths:
            ask(self._reactor, path, {"op": "reopen"}).addErrback(
                lambda failure, p=path: self._log.warn("worker at {path}: log reopen failed: {why}", path=p,
                                                       why=failure.getErrorMessage()))

    def bound_document(self, stats_service: Any) -> Dict[str, Any]:
        pools = self._resolved
        return {"pid": os.getpid(), "generation": self.counters.generation,
                "pools": {config.name: str(config.listen) for config in pools},
                "stats": stats_service.bound, "http": None}

    # -- run ------------------------------------------------------------------

    def run(self) -> int:
        from twisted.internet.task import LoopingCall

        from twinproxy.admin import StatsPortService
        from twinproxy.bound import BoundAddressesService
        from twinproxy.cluster.sources import Applier, ClusterSources
        from twinproxy.reload import HangupService, Reloader

        reactor = self._reactor
        options = self._options
        stats_service = StatsPortService(lambda: [], reactor.seconds(), reactor, options["stats-addr"],
                                         options["stats-port"], document=self.document)
        services: List[Any] = [stats_service]
        # Cluster pools follow their coordinator here, once for every worker: a
        # generation is acknowledged after every worker has applied it.
        sources = ClusterSources(self._file_pools, Applier(self._apply_everywhere, self._settle,
                                                           workers=len(self._paths), renew=self._renew),
                                 reactor, address_of=self._pool_address, admin_address=lambda: stats_service.bound)
        self.sources = sources
        reloader = Reloader(options["conf-file"], sources.apply_file, self.counters, reactor)
        hangup = HangupService(reactor, [self._log_control_reopen, self.reopen_workers_logs,
                                         lambda: reloader.reload().addErrback(
                                             lambda failure: self._log.failure("reload", failure=failure))])
        services.append(hangup)
        self.reloader = reloader
        services.append(sources)
        for service in services:
            service.startService()
        if options["bound-addresses"]:
            bound = BoundAddressesService(options["bound-addresses"], lambda: self.bound_document(stats_service))
            reloader.on_applied(bound.write)

            def listening(_: Any) -> None:
                # Only now does every pool accept connections in every worker.
                services.insert(1, bound)
                bound.startService()

            self.ready.addCallback(listening)

        def reap() -> None:
            for pid in list(self._alive):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self._alive.discard(pid)
                    if reactor.running and not self._stopping:
                        self._log.error("worker {pid} exited; {left} of {count} still serve", pid=pid,
                                        left=len(self._alive), count=len(self._children))
            if not self._alive and reactor.running:
                reactor.stop()

        def stop_workers() -> None:
            self._stopping = True
            for service in reversed(services):
                service.stopService()
            for pid in list(self._alive):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    self._alive.discard(pid)

        # Twisted owns SIGCHLD once running; a slow poll is enough to notice a worker gone.
        LoopingCall(reap).start(0.5, now=False)
        reactor.addSystemEventTrigger("before", "shutdown", stop_workers)
        reactor.run()
        # Wait for the workers' own graceful stop.
        for pid in list(self._alive):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        return 0

    def _log_control_reopen(self) -> None:
        if self._log_control is not None:
            self._log_control.reopen()


def check_supported(count: int) -> None:
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        print("twinproxy: --workers needs SO_REUSEPORT, which this system lacks", file=sys.stderr)
        raise SystemExit(1)
