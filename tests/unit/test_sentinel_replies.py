"""Parsing sentinel and data-node replies, from the literal formats measured
on Redis/Sentinel 7.0.15 (shared reference on Sentinel, §3), raw RESP built by hand."""

from __future__ import annotations

import pytest

from twinproxy.sentinel.replies import (
    Event,
    IncompleteReplyError,
    ReplicaLink,
    ReplyError,
    decode,
    decode_prefix,
    parse_event,
    parse_master_fields,
    parse_masters,
    parse_replicas,
    parse_replication,
    parse_role,
    replica_lag_ms,
)


def bulk(value) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def fields(*words) -> bytes:
    """A flat field/value list as sentinel sends it: every word a bulk string."""
    return array(*(bulk(word) for word in words))


# SENTINEL MASTER s1 as captured from a live 7.0.15 sentinel (ports from the reference).
MASTER_S1 = (
    "name", "s1", "ip", "127.0.0.1", "port", "7710", "runid", "3c50aa", "flags", "master",
    "link-pending-commands", "0", "link-refcount", "1", "last-ping-sent", "0", "last-ok-ping-reply", "174",
    "last-ping-reply", "174", "down-after-milliseconds", "1000", "info-refresh", "2367", "role-reported", "master",
    "role-reported-time", "2372", "config-epoch", "0", "num-slaves", "1", "num-other-sentinels", "2", "quorum", "2",
    "failover-timeout", "3000", "parallel-syncs", "1",
)
REPLICA_7711 = (
    "name", "127.0.0.1:7711", "ip", "127.0.0.1", "port", "7711", "runid", "5e8e28", "flags", "slave",
    "link-pending-commands", "0", "link-refcount", "1", "last-ping-sent", "0", "info-refresh", "2349",
    "role-reported", "slave", "role-reported-time", "2681", "master-link-down-time", "0",
    "master-link-status", "ok", "master-host", "127.0.0.1", "master-port", "7710", "slave-priority", "100",
    "slave-repl-offset", "401", "replica-announced", "1",
)


def with_fields(base, **changes):
    values = dict(zip(base[::2], base[1::2]))
    values.update({key.replace("_", "-"): value for key, value in changes.items()})
    return tuple(word for pair in values.items() for word in pair)


# --- decode: RESP2 -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, value", [
    (b"+OK\r\n", "OK"),
    (b"+\r\n", ""),
    (b":0\r\n", 0),
    (b":-12\r\n", -12),
    (b":401\r\n", 401),
    (b"$4\r\n7710\r\n", b"7710"),
    (b"$0\r\n\r\n", b""),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n7710\r\n", [b"127.0.0.1", b"7710"]),
    (b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n", [b"master", 0, []]),
    (b"*2\r\n$8\r\nsentinel\r\n*2\r\n$2\r\ns2\r\n$2\r\ns1\r\n", [b"sentinel", [b"s2", b"s1"]]),
])
def test_decode_resp2(raw: bytes, value) -> None:
    assert decode(raw) == value


def test_error_reply_is_returned_with_its_text() -> None:
    error = decode(b"-NOQUORUM 1 usable Sentinels. Not enough available Sentinels\r\n")
    assert isinstance(error, ReplyError)
    assert error.message == "NOQUORUM 1 usable Sentinels. Not enough available Sentinels"
    assert error.code == "NOQUORUM"
    assert str(error) == error.message


def test_errors_inside_an_array_stay_values() -> None:
    value = decode(b"*3\r\n+OK\r\n-READONLY You can't write against a read only replica.\r\n$-1\r\n")
    assert value == ["OK", ReplyError("READONLY You can't write against a read only replica."), None]
    assert value[1].code == "READONLY"


# --- decode: RESP3 -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, value", [
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    (b",1.5\r\n", 1.5),
    (b",-2\r\n", -2.0),
    (b",inf\r\n", float("inf")),
    (b"(3492890328409238509324850943850943825024385\r\n", 3492890328409238509324850943850943825024385),
    (b"=15\r\ntxt:Some string\r\n", b"Some string"),
    (b"=4\r\ntxt:\r\n", b""),
    (b"~2\r\n$2\r\ns1\r\n$2\r\ns2\r\n", [b"s1", b"s2"]),
    (b">3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$4\r\ndata\r\n", [b"message", b"+switch-master", b"data"]),
    (b"%2\r\n$4\r\nname\r\n$2\r\ns1\r\n$4\r\nport\r\n:7710\r\n", {b"name": b"s1", b"port": 7710}),
    (b"%0\r\n", {}),
    # An attribute annotates the reply after it and is dropped.
    (b"|1\r\n+ttl\r\n:3600\r\n:7\r\n", 7),
])
def test_decode_resp3(raw: bytes, value) -> None:
    assert decode(raw) == value


def test_decode_resp3_blob_error() -> None:
    assert decode(b"!21\r\nSYNTAX invalid syntax\r\n") == ReplyError("SYNTAX invalid syntax")


def test_nan_double() -> None:
    value = decode(b",nan\r\n")
    assert value != value


def test_resp3_masters_reply_is_a_list_of_maps() -> None:
    # HELLO 3 then SENTINEL MASTERS gives "*1 %20 ..." (measured): the parsers take maps too.
    entry = b"%%%d\r\n" % (len(MASTER_S1) // 2) + b"".join(bulk(word) for word in MASTER_S1)
    masters = parse_masters(decode(b"*1\r\n" + entry))
    assert masters["s1"].address == ("127.0.0.1", 7710)
    assert masters["s1"].num_other_sentinels == 2


# --- decode: malformed and incomplete ------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"",
    b"x\r\n",
    b"OK\r\n",
    b":12a\r\n",
    b": 12\r\n",
    b":\r\n",
    b"$abc\r\n",
    b"$-2\r\n",
    b"$+3\r\nabc\r\n",
    b"$3\r\nabcd\r\n",
    b"$3\r\nabc\n\n",
    b"*x\r\n",
    b"*-2\r\n",
    b"%-1\r\n",
    b"~-1\r\n",
    b"=-1\r\n",
    b"=3\r\nabc\r\n",
    b"#x\r\n",
    b"_x\r\n",
    b",one\r\n",
    b"+OK\r\n+OK\r\n",
    b":1\r\nextra",
    b"%1\r\n%0\r\n:1\r\n",
    b"*1\r\n" * 100 + b":1\r\n",
])
def test_malformed_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode(raw)


COMPLETE = [
    b"+OK 3 usable Sentinels. Quorum and failover authorization can be reached\r\n",
    b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n7710\r\n",
    b"*3\r\n$6\r\nmaster\r\n:401\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n7711\r\n$1\r\n0\r\n",
    b"%1\r\n$4\r\nname\r\n$2\r\ns1\r\n",
    b"=8\r\ntxt:role\r\n",
]


@pytest.mark.parametrize("raw", COMPLETE)
def test_every_cut_of_a_reply_is_incomplete(raw: bytes) -> None:
    for cut in range(len(raw)):
        with pytest.raises(IncompleteReplyError):
            decode_prefix(raw[:cut])
        with pytest.raises(ValueError):
            decode(raw[:cut])
    value, end = decode_prefix(raw)
    assert end == len(raw)


def test_garbage_is_refused_at_once_not_waited_for() -> None:
    # A reader that buffers until a reply decodes must not wait for a CRLF after junk.
    with pytest.raises(ValueError) as caught:
        decode_prefix(b"HTTP/1.1 400")
    assert not isinstance(caught.value, IncompleteReplyError)


def test_decode_prefix_walks_pipelined_replies() -> None:
    data = b"+OK\r\n:5\r\n$-1\r\n"
    first, end = decode_prefix(data)
    second, end = decode_prefix(data, end)
    third, end = decode_prefix(data, end)
    assert (first, second, third, end) == ("OK", 5, None, len(data))


# --- SENTINEL MASTERS / MASTER -------------------------------------------------------------------

def test_parse_master_fields_from_the_literal_reply() -> None:
    view = parse_master_fields(decode(fields(*MASTER_S1)))
    assert view.name == "s1"
    assert view.address == ("127.0.0.1", 7710)
    assert (view.host, view.port, view.run_id) == ("127.0.0.1", 7710, "3c50aa")
    assert view.epoch == 0
    assert view.flags == frozenset({"master"})
    assert (view.num_other_sentinels, view.quorum, view.num_replicas) == (2, 2, 1)
    assert not view.down and not view.failover_in_progress


def test_master_flags_during_a_failover() -> None:
    sdown = parse_master_fields(decode(fields(*with_fields(MASTER_S1, flags="s_down,master,disconnected"))))
    assert sdown.down and not sdown.failover_in_progress
    odown = parse_master_fields(decode(fields(*with_fields(
        MASTER_S1, flags="s_down,o_down,master,disconnected,failover_in_progress", failover_state="wait_start"))))
    assert odown.down and odown.failover_in_progress
    assert odown.flags == {"s_down", "o_down", "master", "disconnected", "failover_in_progress"}
    after = parse_master_fields(decode(fields(*with_fields(MASTER_S1, port="7711", config_epoch="1"))))
    assert (after.address, after.epoch, after.down) == (("127.0.0.1", 7711), 1, False)


def test_missing_or_unknown_numbers_are_zero() -> None:
    view = parse_master_fields(decode(fields("name", "s9", "ip", "10.0.0.1", "port", "?")))
    assert (view.port, view.epoch, view.num_other_sentinels, view.quorum, view.num_replicas) == (0, 0, 0, 0, 0)
    assert view.run_id == "" and view.flags == frozenset()


def test_parse_masters_by_name() -> None:
    s2 = with_fields(MASTER_S1, name="s2", port="7712", config_epoch="3")
    masters = parse_masters(decode(array(fields(*MASTER_S1), fields(*s2))))
    assert sorted(masters) == ["s1", "s2"]
    assert masters["s2"].port == 7712 and masters["s2"].epoch == 3
    assert parse_masters(decode(b"*0\r\n")) == {}


@pytest.mark.parametrize("value", [
    ReplyError("ERR unknown command"),
    b"not a list",
    [[b"name", b"s1", b"ip"]],  # odd field list
    [b"name"],
])
def test_parse_masters_refuses_what_is_not_a_masters_reply(value) -> None:
    with pytest.raises(ValueError):
        parse_masters(value)


# --- SENTINEL REPLICAS ---------------------------------------------------------------------------

def test_healthy_replica_is_usable() -> None:
    (replica,) = parse_replicas(decode(array(fields(*REPLICA_7711))))
    assert replica.address == ("127.0.0.1", 7711)
    assert (replica.run_id, replica.master_host, replica.master_port) == ("5e8e28", "127.0.0.1", 7710)
    assert replica.link_ok and replica.offset == 401
    assert replica.usable


def test_dead_replica_with_a_stale_link_ok_is_not_usable() -> None:
    dead = with_fields(REPLICA_7711, flags="s_down,slave,disconnected")
    (replica,) = parse_replicas(decode(array(fields(*dead))))
    assert replica.link_ok  # stale, from the last 10 s INFO: the trap
    assert not replica.usable


def test_demoted_master_not_yet_seen() -> None:
    demoted = with_fields(REPLICA_7711, port="7710", flags="slave,disconnected", master_link_status="err",
                          master_host="?", master_port="0")
    (replica,) = parse_replicas(decode(array(fields(*demoted))))
    assert (replica.master_host, replica.master_port, replica.link_ok, replica.usable) == ("?", 0, False, False)


@pytest.mark.parametrize("flags", ["slave,promoted", "o_down,slave", "slave,disconnected", ""])
def test_only_exactly_slave_is_usable(flags: str) -> None:
    (replica,) = parse_replicas(decode(array(fields(*with_fields(REPLICA_7711, flags=flags)))))
    assert not replica.usable


def test_parse_replicas_empty_and_error() -> None:
    assert parse_replicas(decode(b"*0\r\n")) == []
    with pytest.raises(ValueError):
        parse_replicas(decode(b"-ERR No such master with that name\r\n"))


# --- ROLE ----------------------------------------------------------------------------------------

def test_role_master() -> None:
    # Measured: each replica's port and acked offset come as bulk strings.
    raw = b"*3\r\n$6\r\nmaster\r\n:401\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n7711\r\n$3\r\n401\r\n"
    role = parse_role(decode(raw))
    assert (role.kind, role.offset, role.master, role.link_state) == ("master", 401, None, "")
    assert role.replicas == (("127.0.0.1", 7711, 401),)


def test_role_restarted_old_master() -> None:
    role = parse_role(decode(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"))
    assert (role.kind, role.offset, role.replicas) == ("master", 0, ())


def test_role_replica() -> None:
    role = parse_role(decode(b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:7710\r\n$9\r\nconnected\r\n:401\r\n"))
    assert (role.kind, role.master, role.link_state, role.offset) == ("slave", ("127.0.0.1", 7710), "connected", 401)
    assert role.replicas == ()
    syncing = parse_role(decode(b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:7710\r\n$4\r\nsync\r\n:-1\r\n"))
    assert (syncing.link_state, syncing.offset) == ("sync", -1)


def test_role_sentinel() -> None:
    role = parse_role(decode(b"*2\r\n$8\r\nsentinel\r\n*2\r\n$2\r\ns2\r\n$2\r\ns1\r\n"))
    assert (role.kind, role.offset, role.master, role.names) == ("sentinel", 0, None, ("s2", "s1"))


@pytest.mark.parametrize("value", [
    None, [], ReplyError("NOAUTH Authentication required."), [b"master"], [b"master", 1, [[b"h", b"x", b"0"]]],
    [b"slave", b"127.0.0.1", b"port", b"connected", 1], [b"slave", b"127.0.0.1", 7710], [b"sentinel", b"s1"],
    [b"monkey", 1, []],
])
def test_role_malformed(value) -> None:
    with pytest.raises(ValueError):
        parse_role(value)


# --- INFO replication ----------------------------------------------------------------------------

MASTER_INFO = (
    b"# Replication\r\nrole:master\r\nconnected_slaves:2\r\n"
    b"slave0:ip=127.0.0.1,port=7711,state=online,offset=390,lag=1\r\n"
    b"slave1:ip=127.0.0.1,port=7712,state=wait_bgsave,offset=0,lag=0\r\n"
    b"master_failover_state:no-failover\r\nmaster_replid:91004e71e49e36487227a96df40394ae7dd5f04f\r\n"
    b"master_repl_offset:401\r\nsecond_repl_offset:-1\r\nrepl_backlog_active:1\r\n\r\n"
)
REPLICA_INFO = (
    b"# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\nmaster_port:7710\r\nmaster_link_status:up\r\n"
    b"master_last_io_seconds_ago:2\r\nmaster_sync_in_progress:0\r\nslave_read_repl_offset:401\r\n"
    b"slave_repl_offset:401\r\nslave_priority:100\r\nslave_read_only:1\r\nreplica_announced:1\r\n"
    b"connected_slaves:0\r\nmaster_repl_offset:401\r\n"
)


def test_replication_on_a_master() -> None:
    info = parse_replication(MASTER_INFO)
    assert (info.role, info.master, info.link_up, info.sync_in_progress, info.offset) == ("master", None, False,
                                                                                            False, 401)
    assert info.replicas == (ReplicaLink("127.0.0.1", 7711, "online", 390, 1),
                             ReplicaLink("127.0.0.1", 7712, "wait_bgsave", 0, 0))


def test_replication_on_a_replica() -> None:
    info = parse_replication(REPLICA_INFO)
    assert (info.role, info.master, info.link_up, info.sync_in_progress) == ("slave", ("127.0.0.1", 7710), True,
                                                                             False)
    assert info.offset == 401  # slave_repl_offset; slave_priority etc. are not replica lines
    assert info.replicas == ()


def test_replication_link_down_and_syncing_with_lf_only_in_any_order() -> None:
    text = (b"master_sync_in_progress:1\nsome_future_field:x\n# Replication\nmaster_link_status:down\n"
            b"master_link_down_since_seconds:3\nmaster_port:7710\nmaster_host:127.0.0.1\nrole:slave\n"
            b"slave_repl_offset:17\ngarbage line without colon\n")
    info = parse_replication(text)
    assert (info.role, info.master, info.link_up, info.sync_in_progress, info.offset) == (
        "slave", ("127.0.0.1", 7710), False, True, 17)
    assert parse_replication(text.decode()) == info


def test_replication_of_nothing() -> None:
    info = parse_replication(b"")
    assert (info.role, info.master, info.link_up, info.offset, info.replicas) == ("", None, False, 0, ())


def test_replica_lag() -> None:
    master = parse_replication(MASTER_INFO)
    assert replica_lag_ms(master, "127.0.0.1", 7711) == 1000  # behind: lag in whole seconds
    assert replica_lag_ms(master, "127.0.0.1", 7712) is None  # listed but not online
    assert replica_lag_ms(master, "127.0.0.1", 7799) is None  # not listed
    assert replica_lag_ms(master, "127.0.0.2", 7711) is None
    caught_up = parse_replication(MASTER_INFO.replace(b"offset=390,lag=1", b"offset=401,lag=1"))
    assert replica_lag_ms(caught_up, "127.0.0.1", 7711) == 0
    ahead = parse_replication(MASTER_INFO.replace(b"offset=390,lag=1", b"offset=402,lag=3"))
    assert replica_lag_ms(ahead, "127.0.0.1", 7711) == 0


# --- events --------------------------------------------------------------------------------------

def test_switch_master() -> None:
    event = parse_event(b"+switch-master", b"s1 127.0.0.1 7710 127.0.0.1 7711")
    assert event == Event("+switch-master", "master", "s1", "127.0.0.1", 7710, "127.0.0.1", 7711,
                          "127.0.0.1", 7710)
    assert (event.new_host, event.new_port) == ("127.0.0.1", 7711)


def test_switch_master_with_hostnames() -> None:
    event = parse_event("+switch-master", "h localhost 7745 localhost 7746")
    assert (event.name, event.host, event.port, event.new_host, event.new_port) == ("h", "localhost", 7745,
                                                                                    "localhost", 7746)


@pytest.mark.parametrize("channel, payload, expected", [
    (b"+sdown", b"master s1 127.0.0.1 7710", ("master", "s1", "127.0.0.1", 7710, "")),
    (b"-sdown", b"master s1 127.0.0.1 7710", ("master", "s1", "127.0.0.1", 7710, "")),
    (b"+odown", b"master s1 127.0.0.1 7710 #quorum 2/2", ("master", "s1", "127.0.0.1", 7710, "#quorum 2/2")),
    (b"-odown", b"master s1 127.0.0.1 7710", ("master", "s1", "127.0.0.1", 7710, "")),
    (b"+failover-end", b"master s1 127.0.0.1 7710", ("master", "s1", "127.0.0.1", 7710, "")),
    (b"-failover-abort-no-good-slave", b"master s1 127.0.0.1 7710", ("master", "s1", "127.0.0.1", 7710, "")),
    (b"+elected-leader", b"master s1 127.0.0.1 7710", ("master", "s1", "127.0.0.1", 7710, "")),
])
def test_master_form(channel: bytes, payload: bytes, expected) -> None:
    event = parse_event(channel, payload)
    assert event.kind == channel.decode()
    assert (event.role, event.name, event.host, event.port, event.extra) == expected
    assert (event.master_host, event.master_port) == (event.host, event.port)
    assert (event.new_host, event.new_port) == ("", 0)


@pytest.mark.parametrize("channel, payload, expected", [
    (b"+slave", b"slave 127.0.0.1:7710 127.0.0.1 7710 @ s1 127.0.0.1 7711",
     ("slave", "s1", "127.0.0.1", 7710, "127.0.0.1", 7711, "")),
    (b"+sdown", b"slave 127.0.0.1:7710 127.0.0.1 7710 @ s1 127.0.0.1 7711",
     ("slave", "s1", "127.0.0.1", 7710, "127.0.0.1", 7711, "")),
    (b"+convert-to-slave", b"slave 127.0.0.1:7710 127.0.0.1 7710 @ s1 127.0.0.1 7711",
     ("slave", "s1", "127.0.0.1", 7710, "127.0.0.1", 7711, "")),
    (b"+selected-slave", b"slave 127.0.0.1:7711 127.0.0.1 7711 @ s1 127.0.0.1 7710",
     ("slave", "s1", "127.0.0.1", 7711, "127.0.0.1", 7710, "")),
    (b"-role-change", b"slave 127.0.0.1:7711 127.0.0.1 7711 @ s1 127.0.0.1 7710 new reported role is master",
     ("slave", "s1", "127.0.0.1", 7711, "127.0.0.1", 7710, "new reported role is master")),
    (b"+sentinel", b"sentinel 3c50aa9f 127.0.0.1 7732 @ s1 127.0.0.1 7710",
     ("sentinel", "s1", "127.0.0.1", 7732, "127.0.0.1", 7710, "")),
    (b"+config-update-from", b"sentinel 3c50aa9f 127.0.0.1 7730 @ s1 127.0.0.1 7710",
     ("sentinel", "s1", "127.0.0.1", 7730, "127.0.0.1", 7710, "")),
    (b"+slave", b"replica [::1]:7711 ::1 7711 @ s1 ::1 7710",
     ("slave", "s1", "::1", 7711, "::1", 7710, "")),
])
def test_instance_form(channel: bytes, payload: bytes, expected) -> None:
    event = parse_event(channel, payload)
    assert (event.role, event.name, event.host, event.port, event.master_host, event.master_port,
            event.extra) == expected


@pytest.mark.parametrize("channel, payload", [
    (b"+new-epoch", b"1"),
    (b"+vote-for-leader", b"3c50aa9f 1"),
    (b"+tilt", b"#tilt mode entered"),
    (b"+switch-master", b""),
    (b"+switch-master", b"s1 127.0.0.1 7710 127.0.0.1"),
    (b"+switch-master", b"s1 127.0.0.1 7710 127.0.0.1 7711 extra"),
    (b"+switch-master", b"s1 127.0.0.1 x 127.0.0.1 7711"),
    (b"+switch-master", b"s1 127.0.0.1 7710 127.0.0.1 99999"),
    (b"+sdown", b""),
    (b"+sdown", b"master s1 127.0.0.1"),
    (b"+sdown", b"master s1 127.0.0.1 -1"),
    (b"+sdown", b"monkey s1 127.0.0.1 7710"),
    (b"+sdown", b"slave 127.0.0.1:7711 127.0.0.1 7711"),  # an instance without its master
    (b"+sdown", b"slave 127.0.0.1:7711 127.0.0.1 7711 @ s1 127.0.0.1"),
    (b"+sdown", b"slave 127.0.0.1:7711 127.0.0.1 7711 @ s1 127.0.0.1 port"),
    (b"+sdown", b"master s1 127.0.0.1 7710 @ s2"),
    (b"+sdown", b"\xff\xfe\x00 s1 127.0.0.1 7710"),
])
def test_unparseable_events_are_none(channel: bytes, payload: bytes) -> None:
    assert parse_event(channel, payload) is None


@pytest.mark.parametrize("channel, payload", [(None, None), (b"+sdown", None), (123, b"master s1 h 1"),
                                              (b"+sdown", ["master"])])
def test_parse_event_never_raises(channel, payload) -> None:
    result = parse_event(channel, payload)
    assert result is None or isinstance(result, Event)


def _scan_reply(cursor: bytes, keys: list) -> bytes:
    return b"*2\r\n$%d\r\n%s\r\n*%d\r\n" % (len(cursor), cursor, len(keys)) + b"".join(
        b"$%d\r\n%s\r\n" % (len(key), key) for key in keys)


def test_scan_shaped_replies_decode_like_the_general_decoder_even_with_crlf_in_keys() -> None:
    import random

    from twinproxy.sentinel.replies import decode_prefix

    rng = random.Random(7)
    cases = [(b"0", []), (b"17", [b"a", b"bb"]), (b"5", [b"x\r\ny"]), (b"7", [b"", b"\r\n"]), (b"9", [b"$3\r\nabc"])]
    cases += [(bytes(rng.choice(b"01\r\n") for _ in range(rng.randint(1, 3))),
               [bytes(rng.choice(b"ab\r\n$*:") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(0, 6))])
              for _ in range(2000)]
    for cursor, keys in cases:
        reply = _scan_reply(cursor, keys)
        assert decode(reply) == [cursor, keys] == decode_prefix(reply)[0]
    assert decode(b"*2\r\n$1\r\na\r\n:5\r\n") == [b"a", 5]
