"""SentinelShard: read policies, replica failures, and the fence a promoted replica puts on its old master."""

from __future__ import annotations

import pytest

from tests.unit.sentinel_harness import R2, A, B, R, Wire, bulk, cmd, master_info, replica_info

# -- read policies --------------------------------------------------------------


def test_prefer_replica_sends_reads_to_a_healthy_replica_and_writes_to_the_master() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))       # no replica known yet: the master serves it
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    w.link(A).reply(b"$1\r\na\r\n")
    w.healthy_replicas(R)
    client.dataReceived(cmd(b"GET", b"k") + cmd(b"SET", b"k", b"2") + cmd(b"HGETALL", b"h"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k") + cmd(b"HGETALL", b"h")
    assert w.link(A).written() == cmd(b"GET", b"k") + cmd(b"SET", b"k", b"2")
    w.link(A).reply(b"+OK\r\n")
    w.link(R).reply(b"$1\r\nr\r\n*0\r\n")
    assert out.value() == b"$1\r\na\r\n$1\r\nr\r\n+OK\r\n*0\r\n"
    assert w.shard.stats()["replica_reads"] == 2


def test_read_policy_master_never_reads_from_a_replica() -> None:
    w = Wire(policy="master")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, _ = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    assert R not in w.data


def test_reads_round_robin_over_healthy_replicas() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R, R2)
    client, _ = w.client()
    client.dataReceived(cmd(b"GET", b"k") * 4)
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k") * 2
    assert w.link(R2).written() == cmd(b"GET", b"k") * 2
    assert A not in w.data


def test_a_refused_replica_connection_retries_the_read_on_the_master() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.refuse(R)
    assert w.shard.replicas.healthy_count == 0
    assert w.shard.replicas.describe()[f"{R[0]}:{R[1]}"] != "healthy"
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    w.link(A).reply(b"$1\r\nm\r\n")
    assert out.value() == b"$1\r\nm\r\n"
    client.dataReceived(cmd(b"GET", b"k"))       # taken out: the next read goes to the master too
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k") * 2
    assert w.runtime.pool.counters.forward_error == 0


def test_a_replica_lost_with_a_read_in_flight_retries_it_on_the_master() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k1"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k1")
    w.link(R).lose()                             # promotion kills every client of the replica
    assert out.value() == b""
    assert w.shard.replicas.healthy_count == 0
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k1")
    w.link(A).reply(b"$1\r\n1\r\n")
    assert out.value() == b"$1\r\n1\r\n"


def test_reads_retried_on_the_master_are_answered_by_the_master_not_by_the_lost_connections_error() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k1") + cmd(b"GET", b"k2"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k1") + cmd(b"GET", b"k2")
    w.link(R).lose()
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k1") + cmd(b"GET", b"k2")   # both retried
    w.link(A).reply(b"$1\r\n1\r\n")
    assert out.value() == b"$1\r\n1\r\n"                                  # actual: + "-ERR Connection reset..."
    w.link(A).reply(b"$1\r\n2\r\n")
    assert out.value() == b"$1\r\n1\r\n$1\r\n2\r\n"


def test_a_write_retried_after_readonly_is_not_answered_readonly_while_the_retry_runs() -> None:
    # The client is told -READONLY (not executed) and the retry then executes the write on the new master.
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k") + cmd(b"INCR", b"n"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k")
    assert w.link(A).written() == cmd(b"INCR", b"n")
    w.link(A).reply(b"-READONLY You can't write against a read only replica.\r\n")
    assert w.shard.held_count == 1
    w.link(R).reply(b"$1\r\nv\r\n")
    assert out.value() == b"$1\r\nv\r\n"                                  # actual: + "-READONLY ..."
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert w.link(B).written() == cmd(b"INCR", b"n")
    w.link(B).reply(b":1\r\n")
    assert out.value() == b"$1\r\nv\r\n:1\r\n"


@pytest.mark.parametrize("error", [b"-LOADING Redis is loading the dataset in memory\r\n",
                                   b"-MASTERDOWN Link with MASTER is down\r\n"])
def test_a_replica_answering_loading_or_masterdown_is_taken_out_and_the_read_retried(error: bytes) -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    w.link(R).reply(error)
    assert w.shard.replicas.healthy_count == 0
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    w.link(A).reply(b"$1\r\nm\r\n")
    assert out.value() == b"$1\r\nm\r\n"


def test_read_policy_replica_without_a_healthy_replica_answers_an_error() -> None:
    w = Wire(policy="replica")
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    assert out.value().startswith(b"-ERR no healthy replica for shard 's1'")
    assert w.reactor.tcpClients == []
    client.dataReceived(cmd(b"SET", b"k", b"1"))   # writes still go to the master
    w.accept()
    assert w.link(A).written() == cmd(b"SET", b"k", b"1")


def test_read_policy_replica_reads_a_healthy_replica() -> None:
    w = Wire(policy="replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k")
    assert A not in w.data


def test_a_replica_not_linked_to_the_master_is_not_read_from() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.shard.replicas.set_candidates([R])
    w.reactor.advance(0)
    w.serve_checks(A, replicas={R: replica_info(A, link="down")})
    assert w.shard.replicas.healthy_count == 0
    assert w.shard.replicas.describe() == {"10.1.0.3:6379": "master link down"}


# -- fence ----------------------------------------------------------------------


def test_fence_keeps_the_fenced_master_while_a_sentinel_reports_the_failover() -> None:
    w = Wire(hold=2000)
    w.shard.confirm(A, 0, "runA")
    w.shard.fence("replica 10.1.0.3:6379 says it is a master now (promoted)")
    assert not w.shard.confirmed
    assert w.triggers == ["shard s1: replica 10.1.0.3:6379 says it is a master now (promoted)"]
    assert not w.shard.may_confirm(A, failover_running=False)   # the grace: the flag may not show yet
    assert w.shard.may_confirm(B, failover_running=True)
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    assert w.shard.held_count == 1               # writes wait while fenced
    w.reactor.advance(0.6)
    assert not w.shard.may_confirm(A, failover_running=True)
    w.reactor.advance(9.4)
    assert w.shard.may_confirm(A, failover_running=True)        # not for ever


def test_a_promotion_that_is_no_failover_costs_only_the_grace() -> None:
    w = Wire(hold=2000)
    w.shard.confirm(A, 0, "runA")
    w.shard.fence("replica 10.1.0.3:6379 says it is a master now (promoted)")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.reactor.advance(0.5)
    assert not w.shard.may_confirm(A, failover_running=False, unanimous=False)   # a sentinel not heard
    assert w.shard.may_confirm(A, failover_running=False, unanimous=True)
    w.shard.confirm(A, 0, "runA")                # an operator's REPLICAOF NO ONE: the old master serves
    assert w.shard.held_count == 0


def test_a_replica_promoted_under_the_master_fences_it() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    w.reactor.advance(1.0)                       # the next check: R now says it is a master
    w.accept()
    for peer in w.checks[R]:
        for args in peer.new_commands():
            peer.reply(b"+PONG\r\n" if args[0] == b"PING" else bulk("role:master\r\nmaster_repl_offset:100\r\n"))
    for peer in w.checks[A]:
        for _ in peer.new_commands():
            peer.reply(master_info([]))
    assert not w.shard.confirmed
    assert not w.shard.may_confirm(A, failover_running=False)
    assert w.shard.replicas.healthy_count == 0
    assert any("promoted" in reason for reason in w.triggers)
