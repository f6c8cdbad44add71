"""A migrating slot's requests that run on the source while their key is there (twinproxy.cluster.onsource), on
in-memory transports: which requests qualify, the script a qualifying request is sent as, its reply being the
client's, the move path when the key is gone, and a client's order kept with the requests behind it."""

from __future__ import annotations

import pytest

from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, cmd, key_in, migrate, topology
from twinproxy.cluster.movescripts import BIG_KEY_BYTES, CLAIMS, RUN_OR_MOVE, claim_of
from twinproxy.cluster.onsource import MAX_ARGUMENTS, may_run_on_source
from twinproxy.request import LEASED, Request, profile_of

pytestmark = pytest.mark.timeout(10)

SERVED = b"*2\r\n$6\r\nSERVED\r\n"


def run_or_move(key: bytes, *args: bytes) -> bytes:
    """The run-or-move script the source is sent for a request ``args`` on ``key``."""
    return cmd(b"EVAL", RUN_OR_MOVE, b"3", key, claim_of(key), CLAIMS, b"%d" % len(args), *args,
               b"%d" % BIG_KEY_BYTES, b"10.0.0.2", b"6379", b"0", b"5000")


def wire(moving=frozenset({7, 8})) -> Wire:
    w = Wire(run_on_source=True)
    w.serve(topology(1, moving=moving))
    return w


def request(*args: bytes, dialect: int = 2) -> Request:
    r = Request(cmd(*args), list(args))
    r.key = args[1] if len(args) > 1 else None
    r.name = args[0].decode().lower()
    r.profile = profile_of(dialect)
    return r


def asked(*command: bytes):
    """A wire, a client that sent ``command`` (on a key of slot 7: ``{k}`` in it is that key), and the source."""
    w = wire()
    client, out = w.client()
    k = key_in(7)
    client.dataReceived(cmd(*[k if part == b"{k}" else part for part in command]))
    source, source_wire = w.backend(SOURCE)
    return w, client, out, k, source, source_wire


def test_which_requests_may_run_on_the_source() -> None:
    assert may_run_on_source(request(b"GET", b"k")) and may_run_on_source(request(b"HGETALL", b"h"))
    assert may_run_on_source(request(b"DEL", b"k")) and not may_run_on_source(request(b"DEL", b"k", b"l"))
    assert not may_run_on_source(request(b"INCR", b"k"))             # a 64-bit counter would come back rounded
    assert not may_run_on_source(request(b"GET", b"k", dialect=3))   # Lua's RESP3 replies differ
    leased = request(b"LPOP", b"k")
    leased.profile |= LEASED
    assert not may_run_on_source(leased)
    fragment = request(b"GET", b"k")
    fragment.parent = request(b"MGET", b"k", b"l")
    assert not may_run_on_source(fragment)
    assert not may_run_on_source(request(b"HSET", b"h", *[b"f"] * MAX_ARGUMENTS))
    several = request(b"MGET", b"k", b"l")
    several.positions = [1, 2]
    assert not may_run_on_source(several)


def test_a_request_whose_key_is_on_the_source_is_answered_from_there() -> None:
    w, client, out, k, source, source_wire = asked(b"GET", b"{k}")
    assert source_wire.value() == run_or_move(k, b"GET", k)          # its own script, at once
    source.dataReceived(SERVED + b"$1\r\nv\r\n")
    assert out.value() == b"$1\r\nv\r\n" and TARGET not in w.backends
    # Still on the source, so not known moved: the next request runs there again.
    source_wire.clear()
    client.dataReceived(cmd(b"SET", k, b"2"))
    assert source_wire.value() == run_or_move(k, b"SET", k, b"2")
    source.dataReceived(SERVED + b"+OK\r\n")
    assert out.value() == b"$1\r\nv\r\n+OK\r\n"


def test_a_key_that_is_not_on_the_source_is_served_by_the_target_and_known_moved() -> None:
    w, client, out, k, source, source_wire = asked(b"GET", b"{k}")
    source.dataReceived(b"+NOKEY\r\n")
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"GET", k)
    target.dataReceived(b"$1\r\nt\r\n")
    assert out.value() == b"$1\r\nt\r\n"
    source_wire.clear()
    client.dataReceived(cmd(b"GET", k))
    assert source_wire.value() == b"" and target_wire.value() == cmd(b"GET", k) * 2


def test_an_error_of_the_command_itself_is_the_client_s_reply() -> None:
    w, client, out, k, source, _ = asked(b"HGET", b"{k}", b"f")
    source.dataReceived(SERVED + b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert out.value() == b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"


def test_requests_behind_one_on_its_way_move_their_keys_and_keep_the_client_s_order() -> None:
    """Only a request that starts its client's line may run on the source; the ones behind it take the move
    path, and reach the target only after it was answered."""
    w = wire()
    client, out = w.client()
    first, second = key_in(7), key_in(7, start=int(key_in(7)[1:]) + 1)
    client.dataReceived(cmd(b"GET", first) + cmd(b"SET", second, b"x"))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == run_or_move(first, b"GET", first) + migrate(second)
    source.dataReceived(b"+NOKEY\r\n")            # the first key is not there: it goes to the target
    source.dataReceived(b"+OK\r\n")               # the second moved
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"GET", first) + cmd(b"SET", second, b"x")
    target.dataReceived(b"$-1\r\n+OK\r\n")
    assert out.value() == b"$-1\r\n+OK\r\n"


def test_a_moved_request_waits_for_the_one_before_it_that_runs_on_the_source() -> None:
    """Another client's batch (on its connection) may carry this client's second key and be answered first: the
    second request still reaches the target only after the first was answered."""
    w = wire()
    (a, a_out), (b, _) = w.client(), w.client()
    first, second, other = key_in(7), key_in(7, start=int(key_in(7)[1:]) + 1), key_in(8)
    b.dataReceived(cmd(b"INCR", other))                               # b's batch, gathered first
    a.dataReceived(cmd(b"GET", first) + cmd(b"SET", second, b"x"))    # a's GET runs; its SET joins b's batch
    w.backend(SOURCE)
    wires = {transport.value(): protocol for protocol, transport in w.backends[SOURCE]}
    batch, run = migrate(other, second), run_or_move(first, b"GET", first)
    if len(wires) == 1:       # one connection carries both: answered in the order sent
        assert list(wires) == [run + batch]
        (connection,) = wires.values()
        connection.dataReceived(SERVED + b"$1\r\nv\r\n" + b"+OK\r\n")
    else:
        assert set(wires) == {run, batch}
        wires[batch].dataReceived(b"+OK\r\n")                        # the batch first
        target, target_wire = w.backend(TARGET)
        assert target_wire.value() == cmd(b"INCR", other)              # a's SET is held behind a's GET
        wires[run].dataReceived(SERVED + b"$1\r\nv\r\n")
    target, target_wire = w.backend(TARGET)
    assert target_wire.value().endswith(cmd(b"SET", second, b"x"))
    assert a_out.value() == b"$1\r\nv\r\n"


def test_a_claimed_key_waits_and_asks_again_the_same_way() -> None:
    w, client, out, k, source, source_wire = asked(b"GET", b"{k}")
    source_wire.clear()
    source.dataReceived(b"*2\r\n$4\r\nWAIT\r\n:1\r\n")
    w.reactor.advance(0)
    assert source_wire.value() == run_or_move(k, b"GET", k)
    source.dataReceived(SERVED + b"$1\r\nv\r\n")
    assert out.value() == b"$1\r\nv\r\n"


def test_a_counter_takes_the_move_path() -> None:
    w, client, _, k, source, source_wire = asked(b"INCR", b"{k}")
    assert source_wire.value() == migrate(k)


def test_a_request_behind_one_sent_to_the_target_and_unanswered_does_not_run_on_the_source() -> None:
    """The client's earlier request of the slot went to the target (its key known moved) and is not answered yet:
    a later request on another key of the slot must not run on the source, where it could take effect before the
    earlier one does on the target (an observer would see the client's writes out of order)."""
    w = wire()
    client, out = w.client()
    first, second = key_in(7), key_in(7, start=int(key_in(7)[1:]) + 1)
    client.dataReceived(cmd(b"GET", first))
    source, source_wire = w.backend(SOURCE)
    source.dataReceived(b"+NOKEY\r\n")                  # the first key is known moved now
    target, target_wire = w.backend(TARGET)
    target.dataReceived(b"$-1\r\n")
    source_wire.clear()
    target_wire.clear()
    client.dataReceived(cmd(b"SET", first, b"1") + cmd(b"SET", second, b"2"))
    w.backend(SOURCE)
    assert target_wire.value() == cmd(b"SET", first, b"1")           # straight to the target, unanswered
    assert source_wire.value() == migrate(second)                    # the move path, not run on the source
    source.dataReceived(b"+OK\r\n")
    assert target_wire.value() == cmd(b"SET", first, b"1") + cmd(b"SET", second, b"2")
    target.dataReceived(b"+OK\r\n+OK\r\n")
    # Once nothing of the client's is on its way to the target, it may run there again.
    source_wire.clear()
    third = key_in(7, start=int(second[1:]) + 1)
    client.dataReceived(cmd(b"GET", third))
    assert source_wire.value() == run_or_move(third, b"GET", third)
    source.dataReceived(SERVED + b"$1\r\nv\r\n")
    assert out.value() == b"$-1\r\n+OK\r\n+OK\r\n$1\r\nv\r\n"


def test_the_scripts_name_the_unsure_set() -> None:
    from twinproxy.cluster.movescripts import ENSURE_MOVED, UNSURE
    assert ENSURE_MOVED.count(b"'%s'" % UNSURE) == 3 and RUN_OR_MOVE.count(b"'%s'" % UNSURE) == 4
