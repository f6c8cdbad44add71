"""A migrating slot's requests for a claimed (big, being copied) key: the script answers WAIT, the request is
asked again on Codis's schedule and then served from the target; the client's later requests for the slot keep
their order behind it, other clients do not wait; past the wait limit it fails with TRYAGAIN naming the key.
Also the pure parts: the script's reply, the retry schedule, the claim names."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, cmd, key_in, migrate, topology
from twinproxy.cluster.migrating import WAIT_LIMIT, retry_delay
from twinproxy.cluster.movescripts import CLAIM_PREFIX, FAILED, MOVED, RESERVED_PREFIX, WAIT, claim_of, classify
from twinproxy.cluster.slots import slot_of

WAITING = b"*2\r\n$4\r\nWAIT\r\n:1\r\n"


def test_the_script_s_replies() -> None:
    """OK and NOKEY mean moved, [WAIT, i] names the claimed key, anything else is a failure."""
    assert classify(b"+OK\r\n") == (MOVED, 0)
    assert classify(b"+NOKEY\r\n") == (MOVED, 0)
    assert classify(b"*2\r\n$4\r\nWAIT\r\n:3\r\n") == (WAIT, 3)
    assert classify(b"*2\r\n$4\r\nWAIT\r\n:x\r\n") == (FAILED, 0)
    assert classify(b"-IOERR error or timeout reading to target instance\r\n") == (FAILED, 0)
    assert classify(b"-ERR unknown command 'EVAL'\r\n") == (FAILED, 0)
    assert classify(b"+OKAY\r\n") == (FAILED, 0)
    assert classify(b"") == (FAILED, 0)


def test_the_retry_schedule_is_codis_s() -> None:
    """0 ms for the first five looks, then loop ms up to 19, then 20 ms."""
    assert [retry_delay(loop) for loop in range(5)] == [0.0] * 5
    assert retry_delay(5) == 0.005 and retry_delay(19) == 0.019
    assert retry_delay(20) == retry_delay(1000) == 0.02


def test_claim_names_are_reserved_and_keep_a_tag() -> None:
    """claim(K) is the reserved prefix + K: an untagged key's claim is in another slot, a tagged one's in its own."""
    assert claim_of(b"user:1") == CLAIM_PREFIX + b"user:1" and claim_of(b"x").startswith(RESERVED_PREFIX)
    assert slot_of(claim_of(b"{t}a")) == slot_of(b"{t}a")
    assert any(slot_of(claim_of(b"k%d" % i)) != slot_of(b"k%d" % i) for i in range(10))


class WaitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = Wire()
        self.w.serve(topology(1, moving={7}))
        self.key = key_in(7)

    def test_a_claimed_key_waits_then_is_served_by_the_target(self) -> None:
        client, out = self.w.client()
        client.dataReceived(cmd(b"HGET", self.key, b"f"))
        source, source_wire = self.w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(self.key))
        source_wire.clear()
        source.dataReceived(WAITING)
        self.assertEqual(source_wire.value(), b"")              # asked again on the next turn, not at once
        self.w.reactor.advance(0)
        self.assertEqual(source_wire.value(), migrate(self.key))
        for loop in range(1, 8):
            source_wire.clear()
            source.dataReceived(WAITING)
            self.w.reactor.advance(retry_delay(loop))
            self.assertEqual(source_wire.value(), migrate(self.key), loop)
        self.assertNotIn(TARGET, self.w.backends)
        source.dataReceived(b"+NOKEY\r\n")                        # copied, claim released
        target, target_wire = self.w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"HGET", self.key, b"f"))
        target.dataReceived(b"$1\r\nv\r\n")
        self.assertEqual(out.value(), b"$1\r\nv\r\n")
        retries = [call for call in self.w.reactor.getDelayedCalls() if call.func.__name__ == "_retry"]
        self.assertEqual(retries, [])

    def test_the_same_client_s_later_requests_for_the_slot_stay_behind(self) -> None:
        client, out = self.w.client()
        other_key = key_in(7, start=int(self.key[1:]) + 1)
        client.dataReceived(cmd(b"HSET", self.key, b"f", b"v") + cmd(b"GET", other_key))
        source, source_wire = self.w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(self.key, other_key))     # one script for the turn
        source.dataReceived(WAITING)          # the first's key is claimed: nothing moved
        self.w.reactor.advance(0)
        # The waiting one asks again alone, the other in the next batch.
        self.assertEqual(source_wire.value(), migrate(self.key, other_key) + migrate(self.key) + migrate(other_key))
        source.dataReceived(WAITING)          # the first still waits for its claim ...
        source.dataReceived(b"+OK\r\n")       # ... the second's key moved, but it must not overtake it
        self.assertNotIn(TARGET, self.w.backends)
        # Even a request for a key known moved now waits behind the first.
        client.dataReceived(cmd(b"GET", other_key))
        self.assertNotIn(TARGET, self.w.backends)
        self.w.reactor.advance(0)
        source.dataReceived(b"+NOKEY\r\n")
        target, target_wire = self.w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"HSET", self.key, b"f", b"v") + cmd(b"GET", other_key)
                         + cmd(b"GET", other_key))

    def test_other_clients_do_not_wait(self) -> None:
        first, _ = self.w.client()
        second, second_out = self.w.client()
        other_key = key_in(7, start=int(self.key[1:]) + 1)
        first.dataReceived(cmd(b"GET", self.key))
        source, source_wire = self.w.backend(SOURCE)
        source.dataReceived(WAITING)
        second.dataReceived(cmd(b"GET", other_key))
        self.w.reactor.advance(0)
        self.assertEqual(len(self.w.backends[SOURCE]), 1)      # one connection to the source: both on it
        # The waiting request asks again alone: the other client's key goes in a script without the claim.
        self.assertEqual(source_wire.value(), migrate(self.key) * 2 + migrate(other_key))
        source.dataReceived(WAITING)
        source.dataReceived(b"+OK\r\n")
        target, target_wire = self.w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"GET", other_key))

    def test_past_the_wait_limit_it_fails_naming_the_key(self) -> None:
        client, out = self.w.client()
        client.dataReceived(cmd(b"GET", self.key))
        source, source_wire = self.w.backend(SOURCE)
        source.dataReceived(WAITING)
        asked = 1
        while not out.value():
            self.w.reactor.advance(0.02)
            self.w.runtime.pool.slots.renew(self.w.reactor.seconds() + 1.0)   # the proxy keeps running
            if source.pending:
                source.dataReceived(WAITING)
                asked += 1
            self.assertLess(asked, 1000)
        self.assertTrue(out.value().startswith(b"-TRYAGAIN key '" + self.key + b"' of slot 7 is being moved"),
                        out.value())
        self.assertIn(b"longer than %d ms" % (WAIT_LIMIT * 1000), out.value())
        self.assertGreaterEqual(self.w.reactor.seconds(), WAIT_LIMIT)
        self.assertNotIn(TARGET, self.w.backends)

    def test_a_slot_finished_while_waiting_sends_it_to_the_owner(self) -> None:
        client, out = self.w.client()
        client.dataReceived(cmd(b"GET", self.key))
        source, source_wire = self.w.backend(SOURCE)
        source.dataReceived(WAITING)
        finished = topology(2)
        finished.slots = tuple((2, "stable") if slot == 7 else entry for slot, entry in enumerate(finished.slots))
        self.w.serve(finished)
        source_wire.clear()
        self.w.reactor.advance(0)
        self.assertEqual(source_wire.value(), b"")
        _, target_wire = self.w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"GET", self.key))
