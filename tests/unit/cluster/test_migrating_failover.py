"""A migrating slot in a cluster with sentinels: the ensure-moved MIGRATE goes to the target shard's confirmed
master (not the topology's first guess), waits while the target has none (a failover, a fence), and waits too
when the target refuses the keys as no writable master, which makes the shard look for its master again."""

from __future__ import annotations

import dataclasses

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, cmd, key_in, topology
from twinproxy.backend import ConnectorFactory
from twinproxy.cluster.migrating import retry_delay
from twinproxy.cluster.movescripts import BIG_KEY_BYTES, CLAIMS, ENSURE_MOVED, claim_of
from twinproxy.cluster.slots import slot_of

SENTINELS = ("10.9.0.1:26379", "10.9.0.2:26379", "10.9.0.3:26379")
NEW_TARGET = ("10.0.0.3", 6379)        # group 2's master after a failover


def migrate_to(host: bytes, port: bytes, *keys: bytes) -> bytes:
    return cmd(b"EVAL", ENSURE_MOVED, b"%d" % (2 * len(keys) + 1), *keys, *[claim_of(key) for key in keys], CLAIMS,
               b"%d" % BIG_KEY_BYTES, host, port, b"0", b"5000")


class SentinelWire(Wire):
    """The cluster pool with sentinels; the shards are confirmed by hand (the watcher is stopped)."""

    def serve(self, topo, session: str = "connected") -> None:
        super().serve(dataclasses.replace(topo, sentinels=SENTINELS) if dataclasses.is_dataclass(topo)
                      else _with_sentinels(topo), session)
        self.runtime.sentinel.watcher.stop()

    def shard(self, gid: int):
        return self.runtime.sentinel.shards[f"shop-{gid}"]

    def backend(self, address: str):
        """The first data connection to ``address`` (the control plane's connections are left alone)."""
        self.reactor.advance(0)   # the moves' scripts gathered this turn leave (movebatch)
        kept = []
        while self.reactor.tcpClients:
            entry = self.reactor.tcpClients.pop(0)
            host, port, factory, _, _ = entry
            if not isinstance(factory, ConnectorFactory):
                kept.append(entry)
                continue
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.setdefault(f"{host}:{port}", []).append((protocol, transport))
        self.reactor.tcpClients.extend(kept)
        return self.backends[address][0]

    def sent(self, address: str) -> bytes:
        """What the data connections to ``address`` were sent (nothing: no connection yet)."""
        try:
            self.backend(address)
        except KeyError:
            return b""
        return b"".join(transport.value() for _, transport in self.backends[address])


def _with_sentinels(topo):
    topo.sentinels = SENTINELS
    return topo


def confirmed(w: SentinelWire, target=("10.0.0.2", 6379)) -> None:
    w.shard(1).confirm(("10.0.0.1", 6379), 0, "run1")
    w.shard(2).confirm(target, 0, "run2")


class FollowTheConfirmedMaster(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = SentinelWire()
        self.w.serve(topology(1, moving={7}))
        self.key = key_in(7)

    def test_the_migrate_goes_to_the_target_shard_s_master_not_the_topology_s_guess(self) -> None:
        confirmed(self.w, NEW_TARGET)                   # Sentinel failed group 2 over; the topology lags
        client, out = self.w.client()
        client.dataReceived(cmd(b"SET", self.key, b"v"))
        source, source_wire = self.w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate_to(b"10.0.0.3", b"6379", self.key))
        source.dataReceived(b"+OK\r\n")
        target, target_wire = self.w.backend("10.0.0.3:6379")
        self.assertEqual(target_wire.value(), cmd(b"SET", self.key, b"v"))
        self.assertNotIn(TARGET, self.w.backends)

    def test_no_confirmed_target_master_waits_then_moves_to_the_new_one(self) -> None:
        confirmed(self.w)
        self.w.shard(2).moving(NEW_TARGET, 1, "run3")   # a majority names another master: not confirmed yet
        client, out = self.w.client()
        client.dataReceived(cmd(b"GET", self.key))
        self.assertEqual(self.w.sent(SOURCE), b"")      # nothing asked of the source meanwhile
        for loop in range(6):
            self.w.reactor.advance(retry_delay(loop))
        self.assertEqual(self.w.sent(SOURCE), b"")
        self.w.shard(2).confirm(NEW_TARGET, 1, "run3")
        self.w.reactor.advance(0.02)
        source, source_wire = self.w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate_to(b"10.0.0.3", b"6379", self.key))
        source.dataReceived(b"+NOKEY\r\n")
        _, target_wire = self.w.backend("10.0.0.3:6379")
        self.assertEqual(target_wire.value(), cmd(b"GET", self.key))
        self.assertEqual(out.value(), b"")

    def test_no_confirmed_target_master_within_the_limit_is_tryagain(self) -> None:
        confirmed(self.w)
        self.w.shard(2).suspect("test")
        client, out = self.w.client()
        client.dataReceived(cmd(b"SET", self.key, b"v"))
        while not out.value() and self.w.reactor.seconds() < 6:
            self.w.reactor.advance(0.02)
            self.w.runtime.pool.slots.renew(self.w.reactor.seconds() + 1.0)   # the proxy keeps running
        self.assertGreaterEqual(self.w.reactor.seconds(), 5.0)               # slot_hold
        self.assertTrue(out.value().startswith(b"-TRYAGAIN slot 7 is migrating and its target has no confirmed "
                                               b"master (shard 'shop-2'"), out.value())
        self.assertIn(b"nothing was done", out.value())
        self.assertEqual(self.w.sent(SOURCE), b"")

    def test_a_target_that_refuses_as_a_replica_is_suspected_and_the_request_waits_for_its_master(self) -> None:
        confirmed(self.w)
        client, out = self.w.client()
        client.dataReceived(cmd(b"SET", self.key, b"v"))
        source, source_wire = self.w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate_to(b"10.0.0.2", b"6379", self.key))
        source_wire.clear()
        source.dataReceived(b"-ERR Target instance replied with error: READONLY You can't write against a read "
                            b"only replica.\r\n")
        self.assertFalse(self.w.shard(2).confirmed)     # looked for again
        self.assertEqual(out.value(), b"")
        self.w.reactor.advance(0.05)
        self.assertEqual(source_wire.value(), b"")      # no master to move to: not asked again yet
        self.w.shard(2).confirm(NEW_TARGET, 1, "run3")
        self.w.reactor.advance(0.02)
        self.assertEqual(source_wire.value(), migrate_to(b"10.0.0.3", b"6379", self.key))
        source.dataReceived(b"+OK\r\n")
        _, target_wire = self.w.backend("10.0.0.3:6379")
        self.assertEqual(target_wire.value(), cmd(b"SET", self.key, b"v"))

    def test_noreplicas_from_the_target_is_asked_again_without_suspecting_it(self) -> None:
        # A demoted master that min-replicas-to-write makes refuse writes, or a lagging replica: retried.
        confirmed(self.w)
        client, out = self.w.client()
        client.dataReceived(cmd(b"SET", self.key, b"v"))
        source, source_wire = self.w.backend(SOURCE)
        source_wire.clear()
        source.dataReceived(b"-ERR Target instance replied with error: NOREPLICAS Not enough good replicas to "
                            b"write.\r\n")
        self.assertTrue(self.w.shard(2).confirmed)
        self.w.reactor.advance(0)
        self.assertEqual(source_wire.value(), migrate_to(b"10.0.0.2", b"6379", self.key))
        source.dataReceived(b"+OK\r\n")
        _, target_wire = self.w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"SET", self.key, b"v"))

    def test_other_errors_still_fail_at_once(self) -> None:
        confirmed(self.w)
        client, out = self.w.client()
        client.dataReceived(cmd(b"SET", self.key, b"v"))
        source, _ = self.w.backend(SOURCE)
        source.dataReceived(b"-IOERR error or timeout reading to target instance\r\n")
        self.assertTrue(out.value().startswith(b"-TRYAGAIN slot 7 is migrating and moving its keys"), out.value())


def test_the_key_used_is_in_the_slot() -> None:
    assert slot_of(key_in(7)) == 7
