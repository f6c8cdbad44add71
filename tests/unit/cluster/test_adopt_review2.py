"""Review of 8078a83 (adoption routing): what a held slot, the finish, a brief session loss, PUBSUB NUMSUB
and the switch itself got wrong (each fixed since; each test states the behaviour wanted).

The harness is tests/unit/cluster/test_adopt_routing.py's: three servers, groups 1-3 (10.0.0.1-3:6379);
"done" is group 3, "moving" group 1, "legacy" group 2 unless a test says otherwise.
"""

from __future__ import annotations

from typing import Tuple

import pytest

from tests.unit.cluster.test_adopt_join import ADDRESS, Joined
from tests.unit.cluster.test_adopt_routing import (
    ADOPTED,
    MOVED_1,
    MOVING,
    OWNER,
    PLACE,
    PREPARED,
    A,
    B,
    key,
    sent,
    wire,
)
from tests.unit.cluster.test_slot_routing import cmd
from twinproxy.cluster.slots import slot_of

pytestmark = pytest.mark.timeout(5)


def same_slot(first: int, second: int, owner: int) -> Tuple[bytes, bytes]:
    """Two keys of one slot (one hash tag), owned by group ``owner``, that the pool (no hash tag) placed on
    groups ``first`` and ``second``."""
    for tag in range(5000):
        names = [b"{r%d}%d" % (tag, i) for i in range(60)]
        a = next((n for n in names if PLACE(n) == first), None)
        b = next((n for n in names if PLACE(n) == second), None)
        if a is not None and b is not None and OWNER[slot_of(a)] == owner:
            return a, b
    raise AssertionError("no pair")


# -- a held slot's keys that all go to one server are split apart (introduced by 8078a83) -----------------------


def test_a_one_slot_command_whose_keys_all_go_to_the_owner_waits_on_the_barrier_hold() -> None:
    # ``a`` was placed on group 3 (done: at its slot's owner, group 2), ``b`` on group 2 (legacy: where the pool
    # put it, group 2): outside a hold both go to shop-2 and the RENAME is served there.
    a, b = same_slot(3, 2, owner=2)
    unheld = wire(MOVING)
    client, out = unheld.client()
    client.dataReceived(cmd(b"RENAME", a, b))
    assert out.value() == b"" and sent(unheld, B) == cmd(b"RENAME", a, b)
    # Held (group 1's barrier): it must wait, then go there too.
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"RENAME", a, b))
    assert out.value() == b"", out.value()
    w.serve(MOVING)
    assert sent(w, B) == cmd(b"RENAME", a, b)


def test_a_one_slot_command_whose_keys_all_go_to_the_owner_waits_on_the_lease_stall() -> None:
    # ``a`` placed on group 1 (moving, and its slot's owner: stays there), ``b`` on group 3 (done: at the
    # slot's owner, group 1): both go to shop-1.
    a, b = same_slot(1, 3, owner=1)
    w = wire(MOVING)
    assert w.runtime.pool.route(a) is w.runtime.pool.route(b)
    slots = w.runtime.pool.slots
    slots.renew(w.reactor.seconds() + 1.0)
    w.reactor.advance(1.5)                          # stopped past the lease
    client, out = w.client()
    client.dataReceived(cmd(b"SMOVE", a, b, b"m"))
    assert out.value() == b"" and slots.waiting == 1, out.value()
    slots.renew(w.reactor.seconds() + 1.0)
    assert sent(w, A) == cmd(b"SMOVE", a, b, b"m")


def test_a_transaction_whose_keys_all_go_to_the_owner_waits_on_the_barrier_hold() -> None:
    a, b = same_slot(3, 2, owner=2)
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"MULTI") + cmd(b"SET", a, b"1") + cmd(b"SET", b, b"2") + cmd(b"EXEC"))
    assert out.value() == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n", out.value()
    w.serve(MOVING)
    assert sent(w, B) == cmd(b"MULTI") + cmd(b"SET", a, b"1") + cmd(b"SET", b, b"2") + cmd(b"EXEC")


# -- PUBSUB NUMSUB released from a hold (before 8078a83 too) ----------------------------------------------------


def test_pubsub_numsub_released_from_a_hold_asks_the_channel_s_server() -> None:
    channel = key(2, 1)                             # legacy: its publishes (and subscribers) are on shop-2
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"PUBSUB", b"NUMSUB", channel))
    assert out.value() == b""
    w.serve(MOVING)
    assert b"TRYAGAIN" not in out.value(), out.value()
    assert sent(w, B) == cmd(b"PUBSUB", b"NUMSUB", channel)


# -- one client's order: the finish and a brief session loss (before 8078a83 too) ------------------------------


def answer_scripts(source, source_wire, reactor=None) -> None:
    """Answer +OK to every ensure-moved script the source was sent, including those sent meanwhile (the
    scripts a turn gathered leave at the next: ``reactor`` is advanced to let them out)."""
    answered = 0
    while True:
        if reactor is not None:
            reactor.advance(0)
        if source_wire.value().count(b"$4\r\nEVAL\r\n") <= answered:
            return
        answered += 1
        source.dataReceived(b"+OK\r\n")


def test_a_read_after_a_write_does_not_overtake_it_when_the_server_is_done() -> None:
    k = key(1, 2)
    w = wire(MOVING)
    client, out = w.client()
    client.dataReceived(cmd(b"SET", k, b"1"))       # its ensure-moved script is on the way to shop-1
    source, source_wire = w.connect_pending()[A][0]
    w.serve(MOVED_1)                                # group 1 done: k's keys are at their owner, shop-2
    client.dataReceived(cmd(b"GET", k))
    answer_scripts(source, source_wire, w.reactor)
    assert sent(w, B) == cmd(b"SET", k, b"1") + cmd(b"GET", k)


def test_a_read_after_a_write_keeps_its_order_across_a_brief_session_loss() -> None:
    k = key(1, 2)
    w = wire(MOVING)
    client, out = w.client()
    client.dataReceived(cmd(b"SET", k, b"1"))
    source, source_wire = w.connect_pending()[A][0]
    w.serve(MOVING, session="suspended")            # the coordinator session is lost a moment...
    w.serve(MOVING)                                 # ...and confirmed again: same generation, same states
    client.dataReceived(cmd(b"GET", k))
    answer_scripts(source, source_wire, w.reactor)
    assert sent(w, B) == cmd(b"SET", k, b"1") + cmd(b"GET", k)


# -- the switch drops every subscription (before 8078a83 too) ---------------------------------------------------


def test_a_subscription_keeps_its_connection_across_the_switch() -> None:
    j = Joined()
    channel = next(b"c%d" % i for i in range(1000) if PLACE(b"c%d" % i) == 1)
    j.client.dataReceived(cmd(b"SUBSCRIBE", channel))
    (subscriber, subscriber_wire), = j.connections(ADDRESS[1])
    subscriber.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel))
    assert j.out.value().endswith(b":1\r\n")
    j.join(ADOPTED)                                 # pending: the channel's publishes still go to that server
    j.reactor.advance(0)                            # the subscriptions' recheck
    assert not subscriber_wire.disconnecting
    assert len(j.connections(ADDRESS[1])) == 1
