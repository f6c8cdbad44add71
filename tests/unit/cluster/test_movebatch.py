"""The ensure-moved scripts of one move, gathered per reactor turn (twinproxy.cluster.movebatch), on in-memory
transports and a fake clock: one script for a turn's keys, a claim making only its own requests wait, an
error reaching only the request it is about, the batch bounded, and a new table sending what was gathered."""

from __future__ import annotations

import pytest

from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, cmd, key_in, migrate, topology
from tests.unit.cluster.test_migrating_waits import WAITING
from twinproxy.cluster import movebatch

pytestmark = pytest.mark.timeout(10)


def wire(moving=frozenset({7, 8})) -> Wire:
    w = Wire()
    w.serve(topology(1, moving=moving))
    return w


def test_a_turn_s_keys_of_every_client_and_slot_go_in_one_script() -> None:
    w = wire()
    (a, a_out), (b, b_out) = w.client(), w.client()
    ka, kb = key_in(7), key_in(8)
    a.dataReceived(cmd(b"SET", ka, b"1"))
    b.dataReceived(cmd(b"GET", kb))
    assert SOURCE not in w.backends and not w.reactor.tcpClients   # nothing leaves before the turn ends
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(ka, kb)
    source.dataReceived(b"+OK\r\n")
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"SET", ka, b"1") + cmd(b"GET", kb)
    target.dataReceived(b"+OK\r\n$-1\r\n")
    assert a_out.value() == b"+OK\r\n" and b_out.value() == b"$-1\r\n"
    # Both known moved now: straight to the target, no script.
    a.dataReceived(cmd(b"GET", ka) + cmd(b"GET", kb))
    assert source_wire.value() == migrate(ka, kb)


def test_a_claimed_key_makes_only_its_own_requests_wait() -> None:
    w = wire()
    (a, a_out), (b, b_out) = w.client(), w.client()
    big, small = key_in(7), key_in(8)
    a.dataReceived(cmd(b"HGETALL", big))
    b.dataReceived(cmd(b"GET", small))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(big, small)
    source_wire.clear()
    source.dataReceived(WAITING)                  # the first key is claimed: nothing moved
    w.reactor.advance(0)
    assert source_wire.value() == migrate(big) + migrate(small)       # the waiting one alone, the other again
    source.dataReceived(WAITING + b"+OK\r\n")
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"GET", small)
    target.dataReceived(b"$1\r\nv\r\n")
    assert b_out.value() == b"$1\r\nv\r\n" and a_out.value() == b""


def test_a_failed_script_asks_again_per_request_so_its_error_reaches_only_its_own() -> None:
    w = wire()
    (a, a_out), (b, b_out) = w.client(), w.client()
    ka, kb = key_in(7), key_in(8)
    a.dataReceived(cmd(b"GET", ka))
    b.dataReceived(cmd(b"GET", kb))
    source, source_wire = w.backend(SOURCE)
    source_wire.clear()
    source.dataReceived(b"-IOERR error or timeout reading to target instance\r\n")
    assert source_wire.value() == migrate(ka) + migrate(kb)            # at once, each alone
    source.dataReceived(b"-IOERR error or timeout reading to target instance\r\n+OK\r\n")
    assert a_out.value().startswith(b"-TRYAGAIN slot ") and b"IOERR" in a_out.value()
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"GET", kb) and b_out.value() == b""


def test_a_batch_holds_at_most_max_keys(monkeypatch) -> None:
    monkeypatch.setattr(movebatch, "MAX_KEYS", 3)
    w = wire()
    clients = [w.client() for _ in range(4)]
    keys = [key_in(7, start) for start in (0, 5000, 10000, 15000)]
    assert len(set(keys)) == 4
    for (client, _), key in zip(clients, keys):
        client.dataReceived(cmd(b"GET", key))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(*keys[:3]) + migrate(keys[3])


def test_a_new_table_sends_what_was_gathered_before_it_is_installed() -> None:
    # The barrier's settle counts the requests sent for a slot: a script still gathered would be missed.
    w = wire()
    a, _ = w.client()
    a.dataReceived(cmd(b"GET", key_in(7)))
    assert not w.reactor.tcpClients                                    # gathered, not sent
    w.serve(topology(2, moving={7, 8}))                                # a new generation, same moves
    assert w.reactor.tcpClients                                        # sent by the install itself
    assert [call for call in w.reactor.getDelayedCalls() if call.active()
            and getattr(call.func, "__name__", "") == "_turn"] == []
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(key_in(7))


def test_a_request_naming_a_key_twice_is_told_which_key_it_waited_for() -> None:
    w = wire()
    client, out = w.client()
    first, second = key_in(7), key_in(7, start=int(key_in(7)[1:]) + 1)
    client.dataReceived(cmd(b"MSET", first, b"1", first, b"2", second, b"3"))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(first, second)          # each key once in the script
    claimed_second = b"*2\r\n$4\r\nWAIT\r\n:2\r\n"
    source.dataReceived(claimed_second)
    asked = 1
    while not out.value():
        w.reactor.advance(0.02)
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)       # the proxy keeps running
        if source.pending:
            source.dataReceived(claimed_second)
            asked += 1
        assert asked < 1000
    assert out.value().startswith(b"-TRYAGAIN key '" + second + b"' of slot 7 is being moved"), out.value()
