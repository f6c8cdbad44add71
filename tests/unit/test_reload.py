"""ProxyService.prepare/commit and the Reloader on a MemoryReactor: what applies, what is refused, nothing half-done."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from twinproxy.admin import _Reload
from twinproxy.config import ConfigError, load_text
from twinproxy.control import ProxyService
from twinproxy.listeners import ListenError
from twinproxy.reload import HangupService, Reloader, apply_in_process
from twinproxy.service import PoolService

ALPHA = "alpha:\n  listen: 127.0.0.1:7001\n  redis: true\n  servers:\n   - 10.0.0.1:6379:1 a\n"
BETA = "beta:\n  listen: 127.0.0.1:7002\n  servers:\n   - 10.0.0.2:11211:1 m\n"


class PickyReactor(MemoryReactorClock):
    """A MemoryReactor on which some ports are taken."""

    def __init__(self, taken=()) -> None:
        super().__init__()
        self.taken = set(taken)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.taken:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def build(text: str, reactor=None):
    reactor = reactor or PickyReactor()
    proxy = ProxyService(load_text(text), lambda config: PoolService(config, reactor), reactor)
    proxy.startService()
    return proxy, reactor


class ReconfigureTests(SynchronousTestCase):
    def test_added_pool_listens_and_removed_pool_stops(self) -> None:
        proxy, reactor = build(ALPHA)
        changes = proxy.reconfigure(load_text(BETA))
        self.assertEqual(changes, ["pool beta added (listen 127.0.0.1:7002, 1 servers)", "pool alpha removed"])
        self.assertEqual([s.name for s in proxy.pools], ["beta"])
        self.assertEqual(proxy.counters.generation, 2)
        self.assertEqual(proxy.counters.reloads, 1)

    def test_a_listener_that_cannot_open_changes_nothing(self) -> None:
        proxy, reactor = build(ALPHA)
        reactor.taken.add(7002)
        before = list(reactor.tcpServers)
        alpha = proxy.pool("alpha")
        moved = ALPHA.replace("a\n", "a\n   - 10.0.0.3:6379:1 c\n")
        with self.assertRaises(ListenError) as caught:
            proxy.reconfigure(load_text(moved + BETA))
        self.assertEqual(str(caught.exception), "pool beta: cannot listen on 127.0.0.1:7002: Address already in use")
        self.assertEqual([s.name for s in proxy.pools], ["alpha"])
        self.assertEqual([s.name for s in alpha.pool.servers], ["a"])   # the change to alpha waits too
        self.assertEqual(proxy.counters.generation, 1)
        self.assertEqual(len(reactor.tcpServers), len(before))

    def test_moved_listen_opens_the_new_listener_first(self) -> None:
        proxy, reactor = build(ALPHA)
        alpha = proxy.pool("alpha")
        old_port = alpha.port
        stopped = []
        old_port.stopListening = lambda: stopped.append(alpha.port.getHost().port)
        proxy.reconfigure(load_text(ALPHA.replace("7001", "7003")))
        self.assertEqual(alpha.port.getHost().port, 7003)
        self.assertIs(proxy.pool("alpha"), alpha)
        self.assertEqual(stopped, [7003])   # the old one closed once the new one listened

    def test_protocol_change_replaces_the_pool(self) -> None:
        proxy, reactor = build(ALPHA)
        old = proxy.pool("alpha")
        proxy.reconfigure(load_text(ALPHA.replace("redis: true", "redis: false")))
        new = proxy.pool("alpha")
        self.assertIsNot(new, old)
        self.assertEqual(new.config.protocol, "memcache")


    def test_a_pool_renamed_on_the_same_address_takes_it_once_the_old_one_let_go(self) -> None:
        proxy, reactor = build(ALPHA)
        old = proxy.pool("alpha")
        release = defer.Deferred()
        old.stop_listening = lambda: release   # the old listener closes when we say
        proxy.reconfigure(load_text(ALPHA.replace("alpha:", "gamma:")))
        self.assertEqual([s.name for s in proxy.pools], [])
        with self.assertRaises(Exception) as caught:
            proxy.prepare(load_text(ALPHA))
        self.assertIn("pool gamma is still starting", str(caught.exception))
        started = []
        proxy.on_late_start.append(lambda: started.append(1))
        release.callback(None)
        self.assertEqual([s.name for s in proxy.pools], ["gamma"])
        self.assertEqual(proxy.pool("gamma").port.getHost().port, 7001)
        self.assertEqual(started, [1])


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)

    def test_bad_file_counts_logs_and_keeps_the_topology(self) -> None:
        proxy, reactor = build(ALPHA)
        error = ConfigError("pools.yml", "is not a valid distribution", "alpha", "distribution", "nope")
        reloader = Reloader("pools.yml", apply_in_process(proxy), proxy.counters, reactor,
                            load=lambda path: defer.fail(error))
        result = self.successResultOf(reloader.reload())
        self.assertEqual((result.ok, result.status), (False, 400))
        self.assertEqual(proxy.counters.reload_failures, 1)
        self.assertEqual(proxy.counters.generation, 1)
        self.assertIn("reload of pools.yml failed, keeping the running topology: pools.yml: pool 'alpha': "
                      "key 'distribution': value 'nope'", self.logged())
        self.assertEqual([s.name for s in proxy.pools], ["alpha"])

    def test_signals_during_a_reload_fold_into_one_more(self) -> None:
        proxy, reactor = build(ALPHA)
        loads = []

        def load(path):
            loads.append(defer.Deferred())
            return loads[-1]

        reloader = Reloader("pools.yml", apply_in_process(proxy), proxy.counters, reactor, load=load)
        first = reloader.reload()
        later = [reloader.reload() for _ in range(5)]
        self.assertEqual(len(loads), 1)
        loads[0].callback(load_text(ALPHA))
        self.assertEqual(len(loads), 2)   # one more read, for all five that came meanwhile
        loads[1].callback(load_text(ALPHA + BETA))
        self.assertEqual(self.successResultOf(first).generation, 2)
        results = [self.successResultOf(d) for d in later]
        self.assertEqual({r.generation for r in results}, {3})
        self.assertEqual(results[0].changes, ["pool beta added (listen 127.0.0.1:7002, 1 servers)"])

    def test_post_reload_answers_what_changed(self) -> None:
        proxy, reactor = build(ALPHA)
        reloader = Reloader("pools.yml", apply_in_process(proxy), proxy.counters, reactor,
                            load=lambda path: defer.succeed(load_text(ALPHA + BETA)))
        request = DummyRequest([b""])
        request.method = b"POST"
        _Reload(reloader.reload).render(request)
        self.assertEqual(request.responseCode, 200)
        body = json.loads(b"".join(request.written))
        self.assertEqual(body, {"ok": True, "generation": 2,
                                "changes": ["pool beta added (listen 127.0.0.1:7002, 1 servers)"]})

    def test_post_reload_of_a_taken_address_is_a_500_and_counted(self) -> None:
        proxy, reactor = build(ALPHA)
        reactor.taken.add(7002)
        reloader = Reloader("pools.yml", apply_in_process(proxy), proxy.counters, reactor,
                            load=lambda path: defer.succeed(load_text(ALPHA + BETA)))
        request = DummyRequest([b""])
        request.method = b"POST"
        _Reload(reloader.reload).render(request)
        self.assertEqual(request.responseCode, 500)
        self.assertIn("Address already in use", json.loads(b"".join(request.written))["error"])
        self.assertEqual(proxy.counters.reload_failures, 1)

    def test_hangup_runs_every_action_even_after_one_fails(self) -> None:
        done = []

        def broken():
            raise RuntimeError("reopen failed")

        HangupService(MemoryReactorClock(), [broken, lambda: done.append(1)]).hangup()
        self.assertEqual(done, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
