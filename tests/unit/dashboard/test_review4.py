"""Review of the merges be87798..50a2ee8 (dashboard credentials x confirmed masters) (fixed since): the confirmed-master
checks' ROLE connections (masters.py) against the README's "Every connection the dashboard opens to a data server
then sends AUTH first, and nothing else until it is accepted".

MasterWatch runs over StringTransport connections taken from a MemoryReactorClock; the test plays the server."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from tests.unit.dashboard.test_masters import A, FakeController, cluster
from tests.unit.dashboard.test_server_auth import Far, cmd
from twinproxy.credentials import Credentials
from twinproxy.dashboard.masters import MasterWatch

pytestmark = pytest.mark.timeout(10)


class RoleOnlyWatch(MasterWatch):
    """The real ROLE connections; names resolved without DNS."""

    def _ip(self, address: str) -> defer.Deferred:
        host, _, port = address.rpartition(":")
        return defer.succeed((host, int(port)))


def one_server_watch(auth: Credentials) -> MemoryReactorClock:
    ctl = FakeController(cluster(sentinels=()))     # groups 1 (A, B) and 2 (C): ROLE on each server
    ctl.reactor = MemoryReactorClock()
    ctl.redis_auth = auth
    watch = RoleOnlyWatch(ctl)
    watch.start()
    ctl.reactor.advance(0)
    return ctl.reactor


def test_the_role_check_writes_nothing_behind_auth_until_it_is_accepted() -> None:
    reactor = one_server_watch(Credentials("s3cret"))
    assert [f"{host}:{port}" for host, port, *_ in reactor.tcpClients][0] == A
    far = Far(reactor, pending=len(reactor.tcpClients), address=A)
    assert far.written() == cmd(b"AUTH", b"s3cret")
