"""The ``twinproxy`` command: nutcracker's command line, on twinproxy.

``twinproxy`` takes nutcracker's options (``-c -t -d -p -s -a -i -v -o -V
-D -m``), so an init script written for nutcracker works by changing the
binary's name.  It owns the process concerns nutcracker owns: daemonizing,
the pid file, where the log goes and at what level.  The services are the
ones ``twistd twinproxy`` runs (``tap.build``).
"""

from __future__ import annotations

import os
import platform
import signal
import sys
from typing import Any, List, Mapping, Optional

from twisted.python import usage

from twinproxy import tap
from twinproxy.logs import LogControl

# Kept for callers of the old name.
check_config = tap.check_config

# PyPy sizes its young generation from the L2 cache (1 MB on a typical
# server core), and a proxy allocates a little per request: with 32 MB it
# collects ~30 times less often.  Measured on bench/: +40-60% pipelined
# requests/s, +10-30% unpipelined.  PyPy's default floor for a major
# collection is 8 nurseries (256 MB, which the heap then grows to); 64 MB
# keeps the peak where it is with the default nursery (~180 MB under the
# benchmark's load) at no measurable cost.
PYPY_GC_SETTINGS = {"PYPY_GC_NURSERY": "32M", "PYPY_GC_MIN": "64M"}


def pypy_restart_argv(implementation: str, environ: Mapping[str, str], argv: List[str],
                      executable: str) -> Optional[List[str]]:
    """The command to run the proxy again with a bigger PyPy nursery, or None.

    PyPy reads ``PYPY_GC_*`` only when it starts, so the ``twinproxy``
    command restarts itself once with :data:`PYPY_GC_SETTINGS` (same
    process, through exec), unless the operator set the nursery already.
    """
    if implementation != "PyPy" or "PYPY_GC_NURSERY" in environ:
        return None
    if argv and os.path.basename(argv[0]) == "__main__.py":
        return [executable, "-m", "twinproxy", *argv[1:]]
    return [executable, *argv]


def _daemonize() -> None:
    """Detach as a classic Unix daemon: two forks, a new session, stdio on /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        restart = pypy_restart_argv(platform.python_implementation(), os.environ, sys.argv, sys.executable)
        if restart is not None:
            for name, value in PYPY_GC_SETTINGS.items():
                os.environ.setdefault(name, value)
            os.execv(restart[0], restart)
    options = tap.Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as err:
        print(f"twinproxy: {err}", file=sys.stderr)
        print("try 'twinproxy --help'", file=sys.stderr)
        return 1
    except SystemExit as done:
        return int(done.code or 0)

    if options["daemonize"]:
        _daemonize()
    if options["workers"] > 1:
        from twinproxy import workers

        if options["http-port"] is not None:
            print("twinproxy: --http-port is not served with --workers yet; use the stats port (-s), which "
                  "sums every worker", file=sys.stderr)
            return 1
        workers.check_supported(options["workers"])

        def start_master() -> tuple:
            control = LogControl(options["output"], options["verbose"])
            from twisted.logger import globalLogBeginner

            globalLogBeginner.beginLoggingTo([control.observer], redirectStandardIO=False)
            from twisted.internet import reactor

            return reactor, control

        def serve_worker(worker_options: tap.Options, setup: "workers.WorkerSetup") -> int:
            return serve(worker_options, worker=setup)

        return _with_pid_file(options, lambda: workers.run_master(options, options["workers"], serve_worker,
                                                                 start_master))
    return serve(options)


def _with_pid_file(options: tap.Options, run) -> int:
    path = options["pid-file"]
    if path:
        with open(path, "w", encoding="ascii") as out:
            out.write(f"{os.getpid()}\n")
    try:
        return run()
    finally:
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass


def serve(options: tap.Options, worker: Any = None) -> int:
    """Run the proxy in this process until stopped; the exit status."""
    control = LogControl(options["output"], options["verbose"])
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([control.observer], redirectStandardIO=False)

    from twisted.internet import reactor

    top = tap.build(options, reactor, log_control=control, observe_log=False, worker=worker)
    try:
        top.privilegedStartService()
        top.startService()
    except SystemExit as stop:  # ProxyTop said why, in one line
        return int(stop.code or 1)
    except Exception as err:  # noqa: BLE001 - a bad address: say it and stop
        tap.close_listeners(top)
        print(f"twinproxy: cannot start: {err}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    # Once stopping, a second signal (say, from a --workers master as well as
    # from the shell) has nothing left to do.
    reactor.addSystemEventTrigger("before", "shutdown", _ignore_stop_signals)
    reactor.run()
    return 0


def _ignore_stop_signals() -> None:
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
