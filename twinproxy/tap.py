"""Options (nutcracker's, for ``twinproxy`` and ``twistd twinproxy`` alike) and the service they make.

Owns the command-line options and ``build``/``makeService``, which only
wire: the config is loaded and checked in ``postOptions`` so a bad file
fails before anything starts, and the reactor is imported in
``makeService`` and nowhere else in the package.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Optional

from twisted.application.service import IService, MultiService, Service
from twisted.python import usage

from twinproxy import __version__, stats
from twinproxy.config import ConfigError, load_file
from twinproxy.listeners import ListenError
from twinproxy.logs import DEFAULT_VERBOSITY, MAX_VERBOSITY, LogControl, LogService
from twinproxy.replybudget import DEFAULT_MAX_REPLY_BUFFER, ReplyBudget
from twinproxy.sentinel.check import format_report, load_checked, probe_pool

DEFAULT_CONFIG = "conf/pools.yml"
DEFAULT_STATS_PORT = 22222
DEFAULT_STATS_ADDR = "0.0.0.0"
DEFAULT_STATS_INTERVAL = 30000


def _verbosity(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_VERBOSITY:
        raise ValueError(f"verbosity must be 0 to {MAX_VERBOSITY}")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("port must be 0 to 65535")
    return value


class Options(usage.Options):
    synopsis = "[options] [pool-file]"
    longdesc = ("A memcached and Redis sharding proxy that reads nutcracker (twemproxy) pool files unchanged. "
                "Starts one service per pool in the file. The options are nutcracker's.")

    optFlags = [
        ["test-conf", "t", "test the configuration file for syntax errors and exit"],
        ["check-sentinels", None, "ask the sentinels of every Sentinel pool where each master is; print it "
         "and exit (non-zero when something is wrong)"],
        ["daemonize", "d", "run as a daemon (the twinproxy command; twistd daemonizes unless -n)"],
    ]
    optParameters = [
        ["conf-file", "c", DEFAULT_CONFIG, "nutcracker-style YAML pool file"],
        ["verbose", "v", DEFAULT_VERBOSITY, f"log level, 0 (emergencies only) to {MAX_VERBOSITY} (everything)",
         _verbosity],
        ["output", "o", None, "log file (default: stderr; under twistd: only twistd's log)"],
        ["stats-port", "s", DEFAULT_STATS_PORT, "stats port (0: one the system picks)", _port],
        ["stats-addr", "a", DEFAULT_STATS_ADDR, "stats address"],
        ["stats-interval", "i", DEFAULT_STATS_INTERVAL, "stats aggregation interval in msec (accepted for "
         "nutcracker compatibility: twinproxy's stats are always current)", int],
        ["pid-file", "p", None, "pid file"],
        ["mbuf-size", "m", 16384, "mbuf size (accepted for nutcracker compatibility; unused)", int],
        ["http-port", None, None, "serve /metrics, /stats and /health over HTTP on this port (default: off)",
         _port],
        ["http-addr", None, "127.0.0.1", "address of the HTTP endpoint"],
        ["workers", None, 1, "processes sharing every listener (the twinproxy command only); the stats port "
         "shows their sum", int],
        ["bound-addresses", None, None, "write where every pool, the stats port and the HTTP endpoint listen "
         "(JSON) to this file, after start-up and after every reload"],
        ["max-reply-buffer", None, DEFAULT_MAX_REPLY_BUFFER, "bytes of replies the process holds for all its "
         "clients before it stops reading any (0: no limit)", _nonnegative],
    ]

    def opt_config(self, path: str) -> None:
        """Same as --conf-file."""
        self["conf-file"] = path

    def parseArgs(self, conf_file: Optional[str] = None) -> None:
        """A pool file may also come alone, as in ``twinproxy -t FILE``; it wins over ``-c``."""
        if conf_file is not None:
            self["conf-file"] = conf_file

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"This is twinproxy-{__version__}")
        raise SystemExit(0)

    opt_V = opt_version

    def opt_describe_stats(self) -> None:
        """Print the description of every stats field and exit."""
        sys.stdout.write(stats.describe())
        raise SystemExit(0)

    opt_D = opt_describe_stats

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        path = self["conf-file"]
        if self["test-conf"]:
            raise SystemExit(check_config(path))
        if self["check-sentinels"]:
            raise SystemExit(check_sentinels(path))
        try:
            # Sentinel pools: a master name no sentinel monitors is refused now (sentinels asked, blocking:
            # the reactor is not running yet).
            self.pools = load_checked(path)
        except ConfigError as err:
            # Exit here rather than raise UsageError: some twistd versions
            # (26.4, the last for PyPy 3.9) print a UsageError and exit 0.
            print(f"twinproxy: {err}", file=sys.stderr)
            raise SystemExit(1) from None


def check_sentinels(path: str, out: Any = None, err: Any = None) -> int:
    """``--check-sentinels``: each Sentinel pool's masters, epochs, replicas and quorum; the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        pools = load_file(path)
    except ConfigError as error:
        print(f"twinproxy: {error}", file=err)
        return 1
    sentinel_pools = [pool for pool in pools if pool.sentinel_mode]
    if not sentinel_pools:
        print(f"twinproxy: '{path}' has no Sentinel pool (no pool has 'sentinels')", file=err)
        return 1
    status = 0
    for pool in sentinel_pools:
        report = probe_pool(pool)
        print(format_report(report), file=out)
        if report.problems:
            status = 1
    return status


def check_config(path: str, out: Any = None, err: Any = None) -> int:
    """Validate ``path``; print nutcracker's verdict; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        pools = load_file(path)
    except ConfigError as error:
        print(f"twinproxy: configuration file '{path}' syntax is invalid", file=err)
        print(f"twinproxy: {error}", file=err)
        return 1
    print(f"twinproxy: configuration file '{path}' syntax is ok ({len(pools)} pools)", file=out)
    return 0


class PidFileService(Service):
    """Writes the process id while running; removes the file if it is still ours."""

    def __init__(self, path: str) -> None:
        self.setName("pidfile")
        self.path = path

    def privilegedStartService(self) -> None:
        with open(self.path, "w", encoding="ascii") as out:
            out.write(f"{os.getpid()}\n")
        super().privilegedStartService()

    def stopService(self) -> None:
        super().stopService()
        try:
            with open(self.path, encoding="ascii") as inp:
                mine = inp.read().strip() == str(os.getpid())
            if mine:
                os.unlink(self.path)
        except OSError:
            pass


class ProxyTop(MultiService):
    """The root of the service tree: a listener that cannot open stops the start in one line.

    Whatever already listens is closed again, so a failed start leaves no
    port half-open (a pool listening while the stats port failed).
    """

    def privilegedStartService(self) -> None:
        self._or_exit(super().privilegedStartService)

    def startService(self) -> None:
        self._or_exit(super().startService)

    def _or_exit(self, start: Any) -> None:
        try:
            start()
        except ListenError as err:
            close_listeners(self)
            print(f"twinproxy: cannot start: {err}", file=sys.stderr)
            raise SystemExit(1) from None


def close_listeners(service: Any) -> None:
    """Stop listening everywhere below ``service`` (a failed start)."""
    port = getattr(service, "port", None)
    if port is not None and hasattr(port, "stopListening"):
        port.stopListening()
        service.port = None
    for child in getattr(service, "services", ()):
        close_listeners(child)


def build(options: Options, reactor: Any, log_control: Optional[LogControl] = None,
          observe_log: bool = True, worker: Any = None) -> MultiService:
    """Every service the options ask for: the pools, stats port, HTTP, log file, pid file, SIGHUP.

    ``worker`` (a :class:`~twinproxy.workers.WorkerSetup`) makes this one
    process of ``--workers``: its listeners are shared with the others, its
    stats and reloads come over its control socket from the master, and
    SIGHUP only reopens its log.
    """
    from twinproxy.admin import HttpService, StatsPortService
    from twinproxy.bound import BoundAddressesService
    from twinproxy.cluster.sources import Applier, ClusterSources
    from twinproxy.control import ProxyService
    from twinproxy.reload import HangupService, Reloader, apply_in_process
    from twinproxy.service import PoolService

    started = reactor.seconds() if hasattr(reactor, "seconds") else time.time()
    top = ProxyTop()
    # Log and pid file first, so they see every pool start and every pool stop.
    if log_control is None and options["output"]:
        log_control = LogControl(options["output"], options["verbose"])
    if log_control is not None:
        LogService(log_control, reactor, observe=observe_log).setServiceParent(top)
    if options["pid-file"] and worker is None:
        PidFileService(options["pid-file"]).setServiceParent(top)

    budget = ReplyBudget(options["max-reply-buffer"], reactor)  # one per process, shared by every pool

    def make_pool(config: Any) -> PoolService:
        if worker is None:
            return PoolService(config, reactor, reply_budget=budget)
        return PoolService(config, reactor, worker.take_inherited(config), reuse_port=True, reply_budget=budget)

    proxy = ProxyService(options.pools, make_pool, reactor)
    proxy.setServiceParent(top)

    def current_pools() -> list:
        return proxy.pools

    hangup = [log_control.reopen] if log_control is not None else []
    if worker is not None:
        # A worker's topology (cluster pools included) comes from its master.
        reloader = Reloader(options["conf-file"], apply_in_process(proxy), proxy.counters, reactor)
        worker.serve(top, proxy, current_pools, started, reactor, log_control)
    else:
        stats = StatsPortService(current_pools, started, reactor, options["stats-addr"], options["stats-port"],
                                 counters=proxy.counters)
        stats.setServiceParent(top)
        # Cluster pools: their servers and slots follow the coordinator, applied
        # the way a reload is; the reloader goes through them too.
        sources = ClusterSources(options.pools, Applier(apply_in_process(proxy), proxy.settled,
                                                        renew=proxy.renew_leases), reactor,
                                 address_of=lambda config: _pool_address(proxy, config),
                                 admin_address=lambda: stats.bound)
        sources.setServiceParent(top)
        top.sources = sources
        reloader = Reloader(options["conf-file"], sources.apply_file, proxy.counters, reactor)
        http = None
        if options["http-port"] is not None:
            http = HttpService(current_pools, started, reactor, options["http-addr"], options["http-port"],
                               counters=proxy.counters, reload=reloader.reload)
            http.setServiceParent(top)
            reloader.on_outcome(http.web.reload_done)   # SIGHUP's reloads too, in the dashboard's events
        hangup.append(lambda: reloader.reload().addErrback(_log_reload_error))
        if options["bound-addresses"]:
            bound = BoundAddressesService(options["bound-addresses"],
                                          lambda: bound_document(proxy, stats, http))
            bound.setServiceParent(top)
            reloader.on_applied(bound.write)
            proxy.on_late_start.append(bound.write)
    HangupService(reactor, hangup).setServiceParent(top)
    top.reloader = reloader
    top.proxy = proxy
    return top


def _pool_address(proxy: Any, config: Any) -> str:
    """Where clients reach pool ``config`` (its bound address once listening)."""
    service = proxy.pool(config.name)
    bound = service.bound if service is not None else None
    return bound or str(config.listen)


def bound_document(proxy: Any, stats: Any, http: Any) -> dict:
    """The ``--bound-addresses`` document of one process."""
    return {
        "pid": os.getpid(),
        "generation": proxy.counters.generation,
        "pools": {service.name: service.bound for service in proxy.pools},
        "stats": stats.bound,
        "http": http.bound if http is not None else None,
    }


def _log_reload_error(failure: Any) -> None:
    from twisted.logger import Logger

    Logger().failure("reload failed", failure=failure)


def makeService(options: Options) -> IService:
    if options["workers"] != 1:
        print("twinproxy: --workers needs the twinproxy command; twistd runs one process", file=sys.stderr)
        raise SystemExit(1)
    if platform.python_implementation() == "PyPy" and "PYPY_GC_NURSERY" not in os.environ:
        # The twinproxy command sets it itself (cli.pypy_restart_argv); twistd cannot.
        print("twinproxy: on PyPy, start twistd with PYPY_GC_NURSERY=32M PYPY_GC_MIN=64M in the "
              "environment: the default young generation costs a third of the throughput", file=sys.stderr)
    from twisted.internet import reactor

    return build(options, reactor)
