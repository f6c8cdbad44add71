"""A migrating slot on in-memory transports: the ensure-moved script (MIGRATE unless a key is claimed) for the
keys a request touches on the source, then serve it from the target; keys known moved go straight to the target;
a failed move is an error."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twinproxy.cluster.movescripts import BIG_KEY_BYTES, CLAIMS, ENSURE_MOVED, claim_of
from twinproxy.cluster.pools import cluster_pool, not_ready
from twinproxy.cluster.slots import slot_of
from twinproxy.config import load_text
from twinproxy.protocols.resp import encode_command
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pool

POOL = """\
shop:
  listen: 127.0.0.1:19000
  redis: true
  timeout: 400
  cluster: shop
  coordinator: file:///tmp/nowhere
"""
SOURCE, TARGET = "10.0.0.1:6379", "10.0.0.2:6379"


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


def migrate(*keys: bytes) -> bytes:
    """The ensure-moved script the source is sent for ``keys``."""
    return cmd(b"EVAL", ENSURE_MOVED, b"%d" % (2 * len(keys) + 1), *keys, *[claim_of(key) for key in keys], CLAIMS,
               b"%d" % BIG_KEY_BYTES, b"10.0.0.2", b"6379", b"0", b"5000")


def topology(generation: int, moving=frozenset(), fenced_state: str = "migrating"):
    """Slots 0-511 on group 1, 512-1023 on group 2; the slots in ``moving`` migrate from 1 to 2."""
    groups = [SimpleNamespace(id=1, servers=(SOURCE,)), SimpleNamespace(id=2, servers=(TARGET,))]
    slots = tuple((2, "migrating") if slot in moving else (1 if slot < 512 else 2, "stable") for slot in range(1024))
    return SimpleNamespace(cluster="shop", protocol="redis", generation=generation, groups=groups, slots=slots,
                           sentinels=(), migrating_from=lambda slot: 1 if slot in moving else None)


def key_in(slot: int, start: int = 0) -> bytes:
    return next(b"k%d" % i for i in range(start, 100000) if slot_of(b"k%d" % i) == slot)


class Wire:
    def __init__(self) -> None:
        (self.base,) = load_text(POOL)
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(not_ready(self.base), self.reactor, outbox=None)
        self.backends = {}

    def serve(self, topo, session: str = "connected") -> None:
        self.runtime.apply(diff_pool(self.runtime.config, cluster_pool(self.base, topo, session)))

    def client(self):
        protocol = self.runtime.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def backend(self, address: str):
        self.reactor.advance(0)   # the moves' scripts gathered this turn leave (movebatch)
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.setdefault(f"{host}:{port}", []).append((protocol, transport))
        return self.backends[address][0]


class MigratingSlotTests(SynchronousTestCase):
    def test_keys_are_moved_then_the_request_is_served_by_the_target(self) -> None:
        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        key = key_in(7)
        client.dataReceived(cmd(b"SET", key, b"v"))
        source, source_wire = w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(key))
        self.assertNotIn(TARGET, w.backends)
        source.dataReceived(b"+OK\r\n")
        target, target_wire = w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"SET", key, b"v"))
        target.dataReceived(b"+OK\r\n")
        self.assertEqual(out.value(), b"+OK\r\n")
        # Known moved: straight to the target now.
        client.dataReceived(cmd(b"GET", key))
        self.assertEqual(source_wire.value(), migrate(key))
        self.assertEqual(target_wire.value(), cmd(b"SET", key, b"v") + cmd(b"GET", key))

    def test_nokey_means_nothing_to_move(self) -> None:
        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(7)))
        source, _ = w.backend(SOURCE)
        source.dataReceived(b"+NOKEY\r\n")
        target, target_wire = w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"GET", key_in(7)))

    def test_every_key_of_a_one_slot_command_is_moved_together(self) -> None:
        tag = next(b"t%d" % i for i in range(1000) if slot_of(b"t%d" % i) < 512)
        a, b = b"{" + tag + b"}a", b"{" + tag + b"}b"
        w = Wire()
        w.serve(topology(1, moving={slot_of(a)}))
        client, out = w.client()
        client.dataReceived(cmd(b"RENAME", a, b))
        _, source_wire = w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(a, b))

    def test_a_split_command_moves_each_fragment_s_keys(self) -> None:
        w = Wire()
        k1, k2 = key_in(7), key_in(8)
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        client.dataReceived(cmd(b"MGET", k1, k2))
        source, source_wire = w.backend(SOURCE)
        # Slot 8 is stable on the source: its fragment goes there; slot 7's keys are moved first.
        self.assertIn(migrate(k1), source_wire.value())
        self.assertIn(cmd(b"MGET", k2), source_wire.value())

    def test_a_failed_move_is_an_error_and_nothing_is_served(self) -> None:
        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        client.dataReceived(cmd(b"SET", key_in(7), b"v"))
        source, _ = w.backend(SOURCE)
        source.dataReceived(b"-IOERR error or timeout reading to target instance\r\n")
        self.assertTrue(out.value().startswith(b"-TRYAGAIN slot 7 is migrating"), out.value())
        self.assertNotIn(TARGET, w.backends)

    def test_a_lost_session_fences_migrating_slots(self) -> None:
        w = Wire()
        w.serve(topology(1, moving={7}), session="suspended")
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(7)))
        self.assertIn(b"lost its coordinator session", out.value())

    def test_the_moved_memory_survives_a_new_generation(self) -> None:
        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        key = key_in(7)
        client.dataReceived(cmd(b"GET", key))
        source, source_wire = w.backend(SOURCE)
        source.dataReceived(b"+OK\r\n")
        w.serve(topology(2, moving={7, 9}))
        client.dataReceived(cmd(b"GET", key))
        self.assertEqual(source_wire.value(), migrate(key))   # no second MIGRATE


class AfterTheMoveTests(SynchronousTestCase):
    def test_a_move_answered_after_a_new_hold_waits_in_it(self) -> None:
        """A cancel's hold arrives while a MIGRATE is in flight: the request must wait, not go to the target."""
        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        key = key_in(7)
        client.dataReceived(cmd(b"SET", key, b"v"))
        source, source_wire = w.backend(SOURCE)
        held = topology(2)
        held.slots = tuple((2, "held") if slot == 7 else entry for slot, entry in enumerate(held.slots))
        w.serve(held)
        settled = w.runtime.settled()
        self.assertFalse(settled.called)            # the MIGRATE on the source is still in flight
        source.dataReceived(b"+OK\r\n")
        self.assertTrue(settled.called)
        self.assertNotIn(TARGET, w.backends)        # held: nothing sent to the target yet
        w.serve(topology(3))                        # cancelled: slot 7 is group 1's again
        w.backend(SOURCE)                           # (the hold settled the old connection: a new one)
        _, new_wire = w.backends[SOURCE][-1]
        self.assertEqual(new_wire.value(), cmd(b"SET", key, b"v"))
        self.assertNotIn(TARGET, w.backends)

    def test_a_destination_in_another_slot_is_refused(self) -> None:
        w = Wire()
        w.serve(topology(1))
        client, out = w.client()
        client.dataReceived(cmd(b"ZUNIONSTORE", key_in(1), b"1", key_in(2)))
        self.assertIn(b"CROSSSLOT", out.value())

    def test_a_store_option_names_a_key_checked_for_its_slot(self) -> None:
        w = Wire()
        w.serve(topology(1))
        client, out = w.client()
        client.dataReceived(cmd(b"SORT", key_in(1), b"LIMIT", b"0", b"5", b"STORE", key_in(2)))
        client.dataReceived(cmd(b"GEORADIUS", key_in(1), b"15", b"37", b"200", b"km", b"COUNT", b"5",
                                b"STOREDIST", key_in(3)))
        self.assertEqual(out.value().count(b"-CROSSSLOT"), 2)
        client.dataReceived(cmd(b"SORT", key_in(1), b"GET", b"store", b"ALPHA"))   # a pattern, not the option
        self.assertEqual(out.value().count(b"-CROSSSLOT"), 2)

    def test_a_store_destination_is_moved_with_the_source(self) -> None:
        tag = next(b"t%d" % i for i in range(1000) if slot_of(b"t%d" % i) < 512)
        dst, src = b"{" + tag + b"}d", b"{" + tag + b"}s"
        w = Wire()
        w.serve(topology(1, moving={slot_of(dst)}))
        client, out = w.client()
        client.dataReceived(cmd(b"GEORADIUSBYMEMBER", src, b"m", b"10", b"km", b"store", dst))
        _, source_wire = w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(src, dst))

    def test_a_destination_is_moved_with_the_sources(self) -> None:
        tag = next(b"t%d" % i for i in range(1000) if slot_of(b"t%d" % i) < 512)
        dst, src = b"{" + tag + b"}d", b"{" + tag + b"}s"
        w = Wire()
        w.serve(topology(1, moving={slot_of(dst)}))
        client, out = w.client()
        client.dataReceived(cmd(b"ZUNIONSTORE", dst, b"1", src))
        _, source_wire = w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(dst, src))


class ReservedKeyTests(SynchronousTestCase):
    def test_the_migrations_own_keys_are_refused_in_a_migrating_slot(self) -> None:
        key = next(b"__twinproxy:mig:x%d" % i for i in range(10000) if slot_of(b"__twinproxy:mig:x%d" % i) == 7)
        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key))
        self.assertIn(b"reserved for twinproxy's slot migration", out.value())


class HoldOrderTests(SynchronousTestCase):
    def test_a_script_answered_after_a_hold_began_keeps_its_place_ahead_of_newer_requests(self) -> None:
        def held(generation: int):
            t = topology(generation)
            t.slots = tuple((2, "held") if slot == 7 else entry for slot, entry in enumerate(t.slots))
            return t

        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        key = key_in(7)
        client.dataReceived(cmd(b"SET", key, b"1"))     # its MIGRATE script is on the way
        source, _ = w.backend(SOURCE)
        w.serve(held(2))                                 # a cancel's hold
        client.dataReceived(cmd(b"SET", key, b"2"))     # waits on the hold
        source.dataReceived(b"+OK\r\n")                  # the first one's script answers: ahead of the second
        w.serve(topology(3))                             # back to group 1
        w.backend(SOURCE)
        _, wire = w.backends[SOURCE][-1]
        self.assertEqual(wire.value(), cmd(b"SET", key, b"1") + cmd(b"SET", key, b"2"))


class SlotObjectReuseTests(SynchronousTestCase):
    """A migrating slot's object (its moved-keys memory and its lines) is kept across tables of the same
    move, and made anew when what its script was made for changes (``slot_hold``, the handshake)."""

    def test_a_new_slot_hold_or_auth_makes_a_new_slot_object(self) -> None:
        wire = Wire()
        moving = topology(1, moving={7})
        wire.serve(moving)
        first = wire.runtime.pool.slots.migrating[7]
        wire.serve(topology(2, moving={7}))
        self.assertIs(wire.runtime.pool.slots.migrating[7], first)
        wire.base = dataclasses.replace(wire.base, slot_hold=900)
        wire.serve(topology(3, moving={7}))
        second = wire.runtime.pool.slots.migrating[7]
        self.assertIsNot(second, first)
        wire.base = dataclasses.replace(wire.base, redis_auth="secret")
        wire.serve(topology(4, moving={7}))
        self.assertIsNot(wire.runtime.pool.slots.migrating[7], second)
