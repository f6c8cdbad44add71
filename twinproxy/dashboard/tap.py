"""``twistd twinproxy-dashboard``: the dashboard's options under twistd, and the service they make.

Owns :class:`Options` (the same options as ``twinproxy-dashboard``, checked
in ``postOptions`` with the ``service`` helpers, so a bad value or an
unreadable token file stops twistd before anything starts) and
:func:`makeService`.  twistd owns logging and daemonizing (``--log`` is
twistd's ``--logfile``).  A start that fails after the reactor runs
prints its one line, stops the reactor, and ends the process with status 1
once the shutdown (lock released, session closed) is done: twistd itself
has no way to exit non-zero then.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from twinproxy.dashboard.service import (
    DEFAULT_LISTEN,
    DashboardService,
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


class Options(usage.Options):
    synopsis = "--coordinator URL --cluster NAME [options]"
    longdesc = ("The dashboard of a twinproxy cluster: the single writer of its topology in the coordinator, "
                "with an HTTP JSON API (reads open, writes need the token) that twinproxy-admin drives.")
    optFlags = [
        ["wait", None, "if another dashboard holds the cluster's lock, wait for it instead of refusing to start"],
    ]
    optParameters = [
        ["coordinator", None, None, "zookeeper://h:2181/chroot, etcd://h:2379/prefix or file:///abs/dir"],
        ["cluster", None, None, "the cluster's name (letters, digits, '_', '.', '-')"],
        ["protocol", None, "redis", "redis or memcache: the cluster's protocol, used when the cluster is new"],
        ["listen", None, DEFAULT_LISTEN, "HOST:PORT of the HTTP API"],
        ["token-file", None, None, "the write token is this file's content (stripped); without it writes are "
         "refused"],
        ["redis-auth-file", None, None, "the data servers' password: the file's one line, whole (as a pool's "
         "redis_auth)"],
        ["redis-auth-user", None, None, "the Redis 6+ ACL user whose password --redis-auth-file holds (as a "
         "pool's redis_auth_user)"],
        ["ack-timeout", None, 10.0, "seconds a write waits for every proxy to acknowledge it", float],
        ["big-key-bytes", None, "4MiB", "a migrating key over this size is copied in chunks, not MIGRATEd whole "
         "(0: never)"],
    ]

    def postOptions(self) -> None:
        # Printed and exited here rather than raised as UsageError: some twistd versions print one and exit 0.
        for required in ("coordinator", "cluster"):
            if not self[required]:
                print(f"{PROG}: --{required} is required (see twistd {PROG} --help)", file=sys.stderr)
                raise SystemExit(2)
        try:
            from twinproxy.coordinator import parse_url

            parse_url(self["coordinator"])
            token = read_token(self["token-file"]) if self["token-file"] is not None else None
            self.settings = Settings(coordinator=self["coordinator"], cluster=check_cluster(self["cluster"]),
                                     protocol=check_protocol(self["protocol"]), listen=parse_listen(self["listen"]),
                                     token=token, ack_timeout=check_ack_timeout(self["ack-timeout"]),
                                     wait=bool(self["wait"]), big_key_bytes=parse_size(self["big-key-bytes"]),
                                     redis_auth=redis_credentials(self["redis-auth-file"],
                                                                  self["redis-auth-user"]))
        except (SettingsError, ValueError) as err:
            print(f"{PROG}: {err}", file=sys.stderr)
            raise SystemExit(1) from None


def build(settings: Settings, reactor: Any) -> DashboardService:
    """The service, wired to stop the reactor and exit 1 if it cannot start."""
    def failed(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        if reactor.running:
            reactor.stop()

    return DashboardService(settings, reactor, failed)


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build(options.settings, reactor)
