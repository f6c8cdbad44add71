"""One client's order when a migrating slot's table changes under a request whose script is on its way: the
slot finished (stable at the target) or its session lost a moment: the client's later requests for the slot
wait behind it (a read never overtakes its own write); other clients' go straight on."""

from __future__ import annotations

import pytest

from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, cmd, key_in, migrate, topology
from twinproxy.cluster.migrating import Draining

pytestmark = pytest.mark.timeout(10)


def finished(generation: int):
    """Slot 7 stable at group 2 (its migration finished)."""
    topo = topology(generation)
    slots = list(topo.slots)
    slots[7] = (2, "stable")
    topo.slots = tuple(slots)
    return topo


def write_in_flight():
    """Slot 7 migrating, and a client's SET of a key of it whose ensure-moved script is on its way to the source:
    (wire, client, its transport, the key, the source's protocol and transport)."""
    w = Wire()
    w.serve(topology(1, moving={7}))
    client, out = w.client()
    key = key_in(7)
    client.dataReceived(cmd(b"SET", key, b"1"))
    source, source_wire = w.backend(SOURCE)
    return w, client, out, key, source, source_wire


def test_a_read_after_a_write_waits_for_it_when_the_slot_finishes_meanwhile() -> None:
    w = Wire()
    w.serve(topology(1, moving={7}))
    writer, writer_out = w.client()
    other, other_out = w.client()
    key = key_in(7)
    writer.dataReceived(cmd(b"SET", key, b"1"))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(key)
    w.serve(finished(2))                                   # finished while the script is on its way
    assert isinstance(w.runtime.pool.route(key), Draining)
    writer.dataReceived(cmd(b"GET", key))                  # must not overtake the SET
    other.dataReceived(cmd(b"GET", key))                   # another client: straight to the owner
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"GET", key)
    source.dataReceived(b"+OK\r\n")
    assert target_wire.value() == cmd(b"GET", key) + cmd(b"SET", key, b"1") + cmd(b"GET", key)
    target.dataReceived(b"$-1\r\n+OK\r\n$1\r\n1\r\n")
    assert other_out.value() == b"$-1\r\n" and writer_out.value() == b"+OK\r\n$1\r\n1\r\n"
    # The line is empty: the next table routes the slot to its owner directly.
    w.serve(finished(3))
    assert w.runtime.pool.route(key).name == "shop-2"


def test_a_read_after_a_write_keeps_its_order_across_a_brief_session_loss() -> None:
    w, client, out, key, source, source_wire = write_in_flight()
    w.serve(topology(1, moving={7}), session="suspended")
    w.serve(topology(1, moving={7}))                       # trusted again: the same move, its lines kept
    client.dataReceived(cmd(b"GET", key))                  # joins the same line, its own script asked
    w.backend(SOURCE)
    assert source_wire.value() == migrate(key) * 2
    source.dataReceived(b"+NOKEY\r\n+NOKEY\r\n")
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"SET", key, b"1") + cmd(b"GET", key)
