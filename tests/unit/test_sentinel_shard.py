"""SentinelShard: holding while no master is confirmed, the switch, and the one retry of what was not executed."""

from __future__ import annotations

import pytest

from tests.unit.sentinel_harness import GUESS, A, B, Wire, cmd

# -- holding while no master is confirmed ------------------------------------


def test_requests_wait_while_unconfirmed_and_go_out_in_order_on_confirm() -> None:
    w = Wire()
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k1", b"1") + cmd(b"GET", b"k2") + cmd(b"INCR", b"k3"))
    assert w.shard.held_count == 3
    assert w.reactor.tcpClients == []           # nowhere to go yet: the guess is never used
    w.shard.moving(A, 0, "runA")                # chosen, not yet ROLE-checked: still held
    assert w.shard.held_count == 3
    assert w.reactor.tcpClients == []
    w.shard.confirm(A, 0, "runA")
    assert w.shard.held_count == 0
    w.accept()
    assert list(w.data) == [A]
    a = w.link(A)
    assert a.written() == cmd(b"SET", b"k1", b"1") + cmd(b"GET", b"k2") + cmd(b"INCR", b"k3")
    a.reply(b"+OK\r\n$1\r\nv\r\n:1\r\n")
    assert out.value() == b"+OK\r\n$1\r\nv\r\n:1\r\n"
    assert GUESS not in w.attempts


def test_held_requests_get_tryagain_after_failover_hold() -> None:
    w = Wire(hold=2000)
    first, first_out = w.client()
    second, second_out = w.client()
    first.dataReceived(cmd(b"SET", b"k", b"1"))
    w.reactor.advance(1.0)
    second.dataReceived(cmd(b"GET", b"k"))
    w.reactor.advance(0.999)
    assert (first_out.value(), second_out.value()) == (b"", b"")
    w.reactor.advance(0.002)
    assert first_out.value().startswith(b"-TRYAGAIN ")
    assert b"s1" in first_out.value()
    assert second_out.value() == b""             # its own 2 s run from when it arrived
    assert w.shard.held_count == 1
    w.reactor.advance(0.997)                     # t = 2.998
    assert second_out.value() == b""
    w.reactor.advance(0.003)                     # t = 3.001
    assert second_out.value().startswith(b"-TRYAGAIN ")
    assert w.shard.held_count == 0
    assert w.runtime.pool.counters.forward_error == 2
    assert w.reactor.tcpClients == []
    # A later confirm has nothing left to release.
    w.shard.confirm(A, 0, "runA")
    assert w.reactor.tcpClients == []


def test_confirm_before_the_hold_passes_cancels_the_tryagain() -> None:
    w = Wire(hold=500)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.reactor.advance(0.3)
    w.shard.confirm(A, 0, "runA")
    w.accept()
    w.reactor.advance(0.3)                       # past the hold deadline (0.5 s), within the timeout (0.4 s)
    assert out.value() == b""
    w.link(A).reply(b"$1\r\nv\r\n")
    assert out.value() == b"$1\r\nv\r\n"


# -- the switch ---------------------------------------------------------------


def _confirmed_with_a_write_in_flight(w: Wire):
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.accept()
    a = w.link(A)
    assert a.written() == cmd(b"SET", b"k", b"1")
    return client, out, a


def test_moving_fails_in_flight_requests_as_unknown_and_never_writes_to_the_old_master_again() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    w.shard.moving(B, 1, "runB")
    reply = out.value()
    assert reply.startswith(b"-ERR failover: ")
    assert b"outcome" in reply and b"unknown" in reply
    assert b"10.1.0.1:6379" in reply and b"10.1.0.2:6379" in reply
    assert a.transport.disconnected              # dropped at once, not drained
    assert not w.shard.confirmed
    before = a.written()
    # New requests wait for the new master, then go there.
    client.dataReceived(cmd(b"SET", b"k", b"2"))
    assert w.shard.held_count == 1
    assert w.reactor.tcpClients == []
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert w.link(B).written() == cmd(b"SET", b"k", b"2")
    # The frozen old master wakes and answers what it held: nobody is told +OK.
    a.reply(b"+OK\r\n")
    a.lose()
    w.link(B).reply(b"+OK\r\n")
    assert out.value() == reply + b"+OK\r\n"
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    assert a.written() == before
    assert w.attempts.count(A) == 1
    assert w.link(B).written() == cmd(b"SET", b"k", b"2") + cmd(b"GET", b"k")
    assert w.shard.switches == 1
    assert w.triggers == []                      # a cut the proxy made itself is no news


def test_moving_error_text_says_outcome_unknown() -> None:
    w = Wire()
    _, out, _ = _confirmed_with_a_write_in_flight(w)
    w.shard.moving(B, 1, "runB")
    assert b"outcome unknown" in out.value()


def test_moving_to_the_same_address_cuts_nothing() -> None:
    w = Wire()
    _, out, a = _confirmed_with_a_write_in_flight(w)
    w.shard.moving(A, 1, "runA")
    assert out.value() == b""
    assert not a.transport.disconnecting
    a.reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


# -- replies that mean "not executed": one retry ------------------------------


@pytest.mark.parametrize("error", [b"-READONLY You can't write against a read only replica.\r\n",
                                   b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set "
                                   b"to 'no'.\r\n",
                                   b"-LOADING Redis is loading the dataset in memory\r\n"])
def test_not_executed_reply_is_retried_once_on_the_next_confirmed_master(error: bytes) -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(error)
    assert out.value() == b""                    # not answered: it waits for the next master
    assert not w.shard.confirmed
    assert w.shard.held_count == 1
    word = error[1:error.index(b" ")].decode()
    assert w.triggers == [f"shard s1: answered {word}"]
    w.shard.moving(B, 1, "runB")
    w.shard.confirm(B, 1, "runB")
    w.accept()
    b = w.link(B)
    assert b.written() == cmd(b"SET", b"k", b"1")
    b.reply(error)                               # again: now the client is told
    assert out.value() == error
    assert w.shard.held_count == 0
    w.shard.confirm(B, 1, "runB")
    assert b.written() == cmd(b"SET", b"k", b"1")
    assert a.written() == cmd(b"SET", b"k", b"1")


def test_readonly_retry_on_the_same_master_reconfirmed() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(b"-READONLY You can't write against a read only replica.\r\n")
    w.shard.confirm(A, 0, "runA")                # ROLE said master again (e.g. it was demoted and back)
    assert a.written() == cmd(b"SET", b"k", b"1") * 2
    a.reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


def test_readonly_retry_still_held_at_failover_hold_gets_tryagain() -> None:
    w = Wire(hold=2000)
    _, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(b"-READONLY You can't write against a read only replica.\r\n")
    w.reactor.advance(2.0)
    assert out.value().startswith(b"-TRYAGAIN ")


def test_other_error_replies_are_passed_through() -> None:
    w = Wire()
    _, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert out.value() == b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    assert w.shard.confirmed
    assert w.triggers == []


def test_a_timeout_on_the_master_is_not_retried() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    w.reactor.advance(0.4)
    assert out.value() == b"-ERR Connection timed out\r\n"
    assert a.transport.disconnected
    assert w.shard.held_count == 0
    a.lose()
    w.shard.moving(B, 1, "runB")
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert B not in w.data                       # nothing was sent again anywhere
    assert a.written() == cmd(b"SET", b"k", b"1")


def test_a_lost_master_connection_fails_in_flight_without_retry_and_triggers_a_look() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    a.lose()                                     # sentinel's CLIENT KILL on demotion, or a crash
    assert out.value() == b"-ERR Connection reset by peer\r\n"
    assert w.shard.held_count == 0
    assert w.triggers == ["shard s1: connection to master 10.1.0.1:6379 lost"]
    w.shard.moving(B, 1, "runB")
    w.shard.confirm(B, 1, "runB")
    assert w.reactor.tcpClients == []
    assert a.written() == cmd(b"SET", b"k", b"1")


def test_a_refused_master_connection_holds_the_request_and_sends_it_once_to_the_next_master() -> None:
    # Refused: the request was never written, so it is safe to send again.
    w = Wire()
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.refuse(A)
    assert out.value() == b""
    assert w.shard.held_count == 1
    assert not w.shard.confirmed
    assert w.triggers[0] == "shard s1: unreachable (ERR Connection refused)"
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert w.link(B).written() == cmd(b"SET", b"k", b"1")
    w.link(B).reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


def test_a_request_refused_twice_gets_the_error() -> None:
    w = Wire()
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.refuse(A)
    w.shard.confirm(A, 0, "runA")    # the same master is back (no failover)
    w.refuse(A)
    assert out.value() == b"-ERR Connection refused\r\n"
    assert w.shard.held_count == 0
