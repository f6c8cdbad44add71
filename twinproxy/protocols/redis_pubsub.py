"""Pub/sub in the Redis protocol: routing channels, the proxy's own acks, reading subscriber streams.

Owns the pure half of pub/sub (the Twisted half, subscriber connections
and each client's subscriptions, is :mod:`twinproxy.subscriber`):

- where a channel lives: :func:`channel_key` (a channel routes like a key;
  a keyspace notification channel ``__keyspace@N__:<key>`` by the key it
  names; a keyevent channel on every server);
- how the codec classifies the pub/sub commands (:func:`classify`):
  SUBSCRIBE and its kin go to the client's session (``SESSION``), PUBLISH
  and SPUBLISH are forwarded by channel; PUBSUB's questions are a FANOUT
  command of :mod:`~twinproxy.protocols.redis_fanout` (:func:`plan`, and
  its merges);
- what the proxy writes itself: the acks (:func:`ack`), PING in a RESP2
  subscribed session (:func:`subscribed_pong`), the subscribed-mode refusal;
- what a subscriber connection reads: :func:`push_parts` (an ack or a
  message, as values), :func:`in_dialect` (a frame in the client's RESP).

Never imports Twisted, the pool or a socket.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twinproxy.protocols import Router, group_by_server, resp
from twinproxy.protocols.redis_commands import FLAGS
from twinproxy.protocols.redis_fanout import (
    FanoutFragment,
    Routes,
    answer,
    first_error,
    first_live,
    live_servers,
    merge_one,
    send_to,
    unexpected,
)
from twinproxy.request import FORWARD, SESSION, Request

# A session's mode while it has a subscription (``session.mode``); the RESP2
# rules apply only while ``session.dialect`` is 2.
SUBSCRIBED = "subscribed"
# What a RESP2 client in subscribed mode may send (Redis's rule).
SUBSCRIBED_ALLOWED = frozenset((b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
                                b"sunsubscribe", b"ping", b"quit", b"reset"))

# What a subscription names, and so which of a session's sets it is in and how
# acks count it: channels and patterns count together, shard channels apart.
CHANNEL = 0
PATTERN = 1
SHARD = 2
# command -> (what it names, subscribes?): the commands a session answers.
SUBSCRIPTION_COMMANDS: Dict[bytes, Tuple[int, bool]] = {
    b"subscribe": (CHANNEL, True), b"unsubscribe": (CHANNEL, False),
    b"psubscribe": (PATTERN, True), b"punsubscribe": (PATTERN, False),
    b"ssubscribe": (SHARD, True), b"sunsubscribe": (SHARD, False),
}
# (what, subscribes?) -> the command word on the wire and in acks.
COMMAND_WORDS: Dict[Tuple[int, bool], bytes] = {value: name for name, value in SUBSCRIPTION_COMMANDS.items()}
# What a server pushes besides acks, with the set the push's second element is in.
MESSAGE_KINDS: Dict[bytes, int] = {b"message": CHANNEL, b"pmessage": PATTERN, b"smessage": SHARD}

_KEYSPACE = b"__keyspace@"
_KEYEVENT = b"__keyevent@"

# PUBSUB's special refusal for CHANNELS/SHARDCHANNELS with more than a pattern.
_ONE_PATTERN = frozenset((b"channels", b"shardchannels"))
_PER_CHANNEL = frozenset((b"numsub", b"shardnumsub"))


def channel_key(channel: bytes) -> Optional[bytes]:
    """The key whose server holds ``channel``'s subscribers; None: every server.

    A keyspace notification (``__keyspace@0__:user:1``) is published by the
    server holding the key it names; a keyevent one (``__keyevent@0__:expired``)
    by every server, so its subscribers listen on all of them.
    """
    if channel[:11] == _KEYSPACE:
        end = channel.find(b"__:", 11)
        if end > 11 and channel[11:end].isdigit():
            return channel[end + 3:]
    elif channel[:11] == _KEYEVENT:
        return None
    return channel


def publish_key(channel: bytes) -> bytes:
    """The key a PUBLISH (or a NUMSUB question) of ``channel`` routes by.

    A keyevent channel's subscribers listen on every server, so one server
    (by the channel's own name) delivers a message to each of them once.
    """
    key = channel_key(channel)
    return channel if key is None else key


def command_label(args: List[bytes]) -> str:
    """The name Redis gives a command in its errors: ``get``, or ``client|list`` for a subcommand."""
    name = args[0].lower().decode("latin-1")
    if len(args) > 1:
        full = name + "|" + args[1].lower().decode("latin-1")
        if full in FLAGS:
            return full
    return name


def subscribed_refusal(args: List[bytes]) -> bytes:
    """Redis's answer to a RESP2 client in subscribed mode sending anything but the allowed commands."""
    return resp.error(f"ERR Can't execute '{command_label(args)}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING "
                      "/ QUIT / RESET are allowed in this context")


def subscribed_pong(args: List[bytes]) -> bytes:
    """PING in RESP2 subscribed mode: ``pong`` and the argument (empty without one), as an array."""
    return b"*2\r\n$4\r\npong\r\n" + resp.bulk(args[1] if len(args) > 1 else b"")


def ack(word: bytes, name: Optional[bytes], count: int, dialect: int) -> bytes:
    """One acknowledgement: ``[word, name, count]``, a push in RESP3, an array in RESP2."""
    return (b">3\r\n" if dialect == 3 else b"*3\r\n") + resp.bulk(word) + resp.bulk(name, dialect) + resp.integer(count)


def classify(request: Request, name: bytes) -> Optional[bytes]:
    """The codec's handler for SUBSCRIBE and its kin, PUBLISH and SPUBLISH, their arguments checked.

    Sets ``request.kind`` (and ``key``) and returns None: the client's
    session answers a subscription, a publish goes where its channel lives.
    """
    if name in SUBSCRIPTION_COMMANDS:
        request.kind = SESSION
        return None
    request.key = publish_key(request.args[1])
    request.kind = FORWARD
    return None


def plan(request: Request, router: Router) -> Routes:
    """PUBSUB's planner (FANOUT layout), its arguments checked: every live server, or each channel's own.

    CHANNELS and SHARDCHANNELS: the union of every live server's list.
    NUMPAT: the largest count, since every pattern a proxy client holds is on
    every server (a sum would count it once per server).  NUMSUB and
    SHARDNUMSUB: each channel asked of the server its PUBLISH goes to.
    HELP: any server.
    """
    args = request.args
    sub = args[1].lower()
    if sub in _ONE_PATTERN:
        if len(args) > 3:
            return answer(request, b"-ERR unknown subcommand or wrong number of arguments for '%s'. Try PUBSUB "
                                   b"HELP.\r\n" % args[1])
        return send_to(request, router, live_servers(request, router), merge_union)
    if sub == b"numpat":
        return send_to(request, router, live_servers(request, router), merge_most)
    if sub not in _PER_CHANNEL:
        return send_to(request, router, first_live(request, router), merge_one)
    if len(args) == 2:
        return answer(request, b"*0\r\n")
    # Parts keep no key positions (a migrating slot would move a key named like each channel first), but
    # the key of their first channel: a stand-in that releases them later (a hold) routes them by it.
    keys = [publish_key(channel) for channel in args[2:]]
    servers = router.servers_for_keys(keys)
    routes: Routes = []
    for index, (server, positions) in enumerate(group_by_server(range(2, len(args)), servers).items()):
        part_args = [args[0], args[1], *(args[position] for position in positions)]
        part = FanoutFragment(resp.encode_command(part_args), part_args, merge_pairs, server, index, positions)
        part.command = request.command
        part.key = keys[positions[0] - 2]
        routes.append((server, part))
    router.counters.fanouts += 1
    return routes


def merge_union(request: Request) -> bytes:
    """Every name any server listed, once, in the order first seen."""
    error = first_error(request)
    if error is not None:
        return error
    names: Dict[bytes, None] = {}
    for part in request.fragments:
        if part.reply[:1] not in (b"*", b"~"):
            return unexpected(part.reply)
        names.update(dict.fromkeys(resp.split_aggregate(part.reply)[1]))
    return resp.array(list(names))


def merge_most(request: Request) -> bytes:
    """The largest of the servers' integer replies."""
    error = first_error(request)
    if error is not None:
        return error
    counts = []
    for part in request.fragments:
        if part.reply[:1] != b":":
            return unexpected(part.reply)
        counts.append(int(part.reply[1:-2]))
    return resp.integer(max(counts))


def merge_pairs(request: Request) -> bytes:
    """NUMSUB's (channel, count) pairs from each channel's server, in the order the client asked."""
    error = first_error(request)
    if error is not None:
        return error
    pairs: Dict[int, List[bytes]] = {}
    for part in request.fragments:
        elements = resp.split_aggregate(part.reply)[1] if part.reply[:1] in (b"*", b"%") else []
        positions = part.context
        if len(elements) != 2 * len(positions):
            return unexpected(part.reply)
        for at, position in enumerate(positions):
            pairs[position] = elements[2 * at:2 * at + 2]
    return resp.array([element for position in sorted(pairs) for element in pairs[position]])


def push_parts(frame: bytes) -> Optional[List[Any]]:
    """A subscriber connection's frame as values (bulk: bytes, integer: int, null: None); None if it is
    not an array or a push (a handshake's reply, an error)."""
    if frame[:1] not in (b">", b"*"):
        return None
    values: List[Any] = []
    for element in resp.split_aggregate(frame)[1]:
        kind = element[:1]
        if kind == b"$":
            start = element.index(b"\r\n") + 2
            values.append(element[start:-2] if element[1:3] != b"-1" else None)
        elif kind == b":":
            values.append(int(element[1:-2]))
        elif kind == b"_":
            values.append(None)
        else:
            values.append(element)
    return values


def in_dialect(frame: bytes, dialect: int) -> bytes:
    """A message frame as a client of ``dialect`` reads it: a push in RESP3, an array in RESP2.

    A connection keeps the RESP version it was opened with; a client that
    said HELLO since (RESP3 may, subscribed) reads messages in its new one.
    Messages hold bulk strings only, so the first byte is all that differs.
    """
    wanted = b">" if dialect == 3 else b"*"
    return frame if frame[:1] == wanted else wanted + frame[1:]
