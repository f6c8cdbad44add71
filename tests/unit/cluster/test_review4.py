"""Review of the merges be87798..50a2ee8 (gathered ensure-moved scripts x Sentinel failover during a migration),
(each fixed since): where the batcher's re-asks and the target waits meet the target shard's confirmed master.

In-memory transports and a fake clock (the harness of test_migrating_failover.py)."""

from __future__ import annotations

import pytest

from tests.unit.cluster.test_migrating import SOURCE, cmd, key_in, topology
from tests.unit.cluster.test_migrating_failover import NEW_TARGET, SentinelWire, confirmed, migrate_to
from tests.unit.cluster.test_migrating_waits import WAITING

pytestmark = pytest.mark.timeout(10)

IOERR = b"-IOERR error or timeout reading to target instance\r\n"
NOREPLICAS = b"-ERR Target instance replied with error: NOREPLICAS Not enough good replicas to write.\r\n"


def two_clients_one_batch():
    """Two clients touch slots 7 and 8 (both moving 1 -> 2) in one turn: one script, to group 2's master."""
    w = SentinelWire()
    w.serve(topology(1, moving={7, 8}))
    confirmed(w)
    (a, _), (b, _) = w.client(), w.client()
    ka, kb = key_in(7), key_in(8)
    a.dataReceived(cmd(b"GET", ka))
    b.dataReceived(cmd(b"GET", kb))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate_to(b"10.0.0.2", b"6379", ka, kb)
    source_wire.clear()
    return w, source, source_wire, (ka, kb)


@pytest.mark.parametrize("reply", [IOERR, WAITING], ids=["error-then-alone", "wait-then-next-batch"])
def test_a_batch_s_steps_asked_again_follow_the_target_shard_s_master_now(reply: bytes) -> None:
    w, source, source_wire, (ka, kb) = two_clients_one_batch()
    # Sentinel fails group 2 over while the script is on its way (the old master died: IOERR; or a claim).
    w.shard(2).confirm(NEW_TARGET, 1, "run3")
    source.dataReceived(reply)
    w.reactor.advance(0)          # the next turn's batch leaves
    again = source_wire.value()
    assert migrate_to(b"10.0.0.3", b"6379", kb) in again, again
    assert b"10.0.0.2" not in again, again


def test_a_failed_batch_does_not_ask_again_while_the_target_shard_has_no_confirmed_master() -> None:
    w, source, source_wire, _ = two_clients_one_batch()
    w.shard(2).suspect("test: its master went away")        # the target's connection closed: looked for again
    source.dataReceived(IOERR)
    w.reactor.advance(0)
    assert source_wire.value() == b""


def test_requests_waiting_for_the_target_s_master_ask_again_in_one_script() -> None:
    w, source, source_wire, (ka, kb) = two_clients_one_batch()
    source.dataReceived(NOREPLICAS)     # the whole batch waits for a writable target (shard still confirmed)
    w.reactor.advance(0)                # both retries (0 ms) come due in the same turn
    w.reactor.advance(0)                # and what they gathered leaves
    assert source_wire.value() == migrate_to(b"10.0.0.2", b"6379", ka, kb)


def test_requests_that_waited_for_a_confirmed_target_master_ask_together_once_there_is_one() -> None:
    w = SentinelWire()
    w.serve(topology(1, moving={7, 8}))
    confirmed(w)
    w.shard(2).moving(NEW_TARGET, 1, "run3")      # a majority names another master: none confirmed
    (a, _), (b, _) = w.client(), w.client()
    ka, kb = key_in(7), key_in(8)
    a.dataReceived(cmd(b"GET", ka))
    b.dataReceived(cmd(b"GET", kb))
    w.reactor.advance(0)                          # they wait (0 ms retries: still no confirmed master)
    w.reactor.advance(0)
    w.shard(2).confirm(NEW_TARGET, 1, "run3")
    w.reactor.advance(0.02)                       # both waits' next retries, in the same turn
    assert w.sent(SOURCE) == migrate_to(b"10.0.0.3", b"6379", ka, kb)
