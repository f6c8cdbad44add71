"""The ``twinproxy-dashboard`` command: options, logging, the reactor, the exit status.

Owns :func:`main` and the option parser (:func:`parse`), shared in spirit
with ``twistd twinproxy-dashboard`` (``tap.py``), which takes the same
options and checks them with the same ``service`` helpers.  Exit status: 0
after a clean stop (SIGTERM, SIGINT: the lock is released first), 1 when
the dashboard cannot start (one line on stderr saying why), 2 for a usage
error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from twinproxy import __version__
from twinproxy.dashboard.service import (
    DEFAULT_LISTEN,
    PROTOCOLS,
    Settings,
    SettingsError,
    check_ack_timeout,
    check_cluster,
    check_protocol,
    parse_listen,
    parse_size,
    read_token,
    redis_credentials,
)

PROG = "twinproxy-dashboard"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The dashboard of a twinproxy cluster: the single writer of its topology in the "
        "coordinator, with an HTTP JSON API (reads open, writes need the token) that twinproxy-admin drives.")
    parser.add_argument("--coordinator", required=True, metavar="URL",
                        help="zookeeper://h1:2181,h2:2181/chroot, etcd://h1:2379/prefix or file:///abs/dir "
                        "(?session_timeout=S: the lock expires that long after this dashboard dies)")
    parser.add_argument("--cluster", required=True, metavar="NAME", help="the cluster's name (letters, digits, "
                        "'_', '.', '-')")
    parser.add_argument("--protocol", default="redis", choices=PROTOCOLS,
                        help="the cluster's protocol, used when the cluster is new (default: redis)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"where the HTTP API listens (default: {DEFAULT_LISTEN}; port 0: one the system picks)")
    parser.add_argument("--token-file", metavar="FILE", help="the write token is this file's content (stripped); "
                        "without it every write is refused")
    parser.add_argument("--redis-auth-file", metavar="FILE",
                        help="the data servers' password: the file's one line, whole (as a pool's redis_auth); "
                        "every connection to a Redis server authenticates with it, and the sweep's MIGRATE passes "
                        "it to the target")
    parser.add_argument("--redis-auth-user", metavar="NAME",
                        help="the Redis 6+ ACL user whose password --redis-auth-file holds (as a pool's "
                        "redis_auth_user): AUTH NAME PASSWORD, and MIGRATE's AUTH2 (default: the default user)")
    parser.add_argument("--ack-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long a write waits for every proxy to acknowledge it (default: 10)")
    parser.add_argument("--wait", action="store_true", help="if another dashboard holds the cluster's lock, wait "
                        "for it to be free instead of refusing to start")
    parser.add_argument("--big-key-bytes", default="4MiB", metavar="SIZE",
                        help="a key of a migrating slot over this size (MEMORY USAGE) is copied in chunks under a "
                        "claim instead of MIGRATEd whole, which blocks both servers (default: 4MiB; 0: never)")
    parser.add_argument("--log", metavar="FILE", help="log to FILE (default: stderr)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def parse(argv: List[str]) -> Any:
    """(settings, log path) from ``argv``; SystemExit(2) for a usage error, SettingsError for a bad value."""
    options = _parser().parse_args(argv)
    token = read_token(options.token_file) if options.token_file is not None else None
    settings = Settings(coordinator=options.coordinator, cluster=check_cluster(options.cluster),
                        protocol=check_protocol(options.protocol), listen=parse_listen(options.listen), token=token,
                        ack_timeout=check_ack_timeout(options.ack_timeout), wait=options.wait,
                        big_key_bytes=parse_size(options.big_key_bytes),
                        redis_auth=redis_credentials(options.redis_auth_file, options.redis_auth_user))
    return settings, options.log


def main(argv: Optional[List[str]] = None) -> int:
    try:
        settings, log_path = parse(sys.argv[1:] if argv is None else argv)
    except SettingsError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    from twinproxy.coordinator import parse_url

    try:
        parse_url(settings.coordinator)
    except ValueError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    return run(settings, log_path)


def run(settings: Settings, log_path: Optional[str]) -> int:
    """Run the dashboard in this process until stopped; the exit status."""
    from twisted.logger import Logger, globalLogBeginner

    from twinproxy.logs import LogControl

    try:
        control = LogControl(log_path)
    except OSError as err:
        print(f"{PROG}: cannot open the log file {log_path}: {err.strerror or err}", file=sys.stderr)
        return 1
    globalLogBeginner.beginLoggingTo([control.observer], redirectStandardIO=False)

    from twisted.internet import reactor

    from twinproxy.dashboard.service import DashboardService

    status = {"code": 0}

    def failed(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        if log_path is not None:   # the log file says why the dashboard stopped, too
            Logger().error("{prog}: {message}", prog=PROG, message=message)
        status["code"] = 1
        if reactor.running:
            reactor.stop()

    service = DashboardService(settings, reactor, failed)
    # Stopping (SIGTERM, SIGINT, a failed start) releases the lock before the reactor ends.
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(service.startService)
    reactor.run()
    control.close()
    return status["code"]
