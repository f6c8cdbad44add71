"""Pub/sub in the Redis protocol: routing channels, the proxy's own acks, reading subscriber streams.

Owns the pure half of pub/sub (the Twisted half, subscriber connections
and each client's subscriptions, is :mod:`twinproxy.subscriber`):

- where a channel lives: :func:`channel_key` (a channel routes like a key;
  a keyspace notification channel ``__keyspace@N__:<key>`` by the key it
  names; a keyevent channel on every server);
- how the codec classifies the pub/sub commands (:func:`classify`):
  SUBSCRIBE and its kin go to the client's session (``SESSION``), PUBLISH
  and SPUBLISH are forwarded by channel, PUBSUB's questions fan out
  (:func:`fanout_routes`, merged by :func:`merge_fanout`);
- what the proxy writes itself: the acks (:func:`ack`), PING in a RESP2
  subscribed session (:func:`subscribed_pong`), the subscribed-mode refusal;
- what a subscriber connection reads: :func:`push_parts` (an ack or a
  message, as values), :func:`in_dialect` (a frame in the client's RESP).

Never imports Twisted, the pool or a socket.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twinproxy.protocols import ProtocolError, Router, group_by_server, resp
from twinproxy.protocols.redis_commands import FLAGS
from twinproxy.protocols.redis_specs import CommandSpec
from twinproxy.request import FORWARD, FRAGMENT, SESSION, Request

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

# PUBSUB's questions, answered by asking servers and merging what they say.
FANOUT = "fanout"
UNION = "union"     # CHANNELS, SHARDCHANNELS: every server's list, each name once
MOST = "max"        # NUMPAT: every server holds every pattern the proxy's clients subscribed
PAIRS = "pairs"     # NUMSUB, SHARDNUMSUB: each channel asked of its own server
_FANOUT_SPECS = {merge: CommandSpec(b"pubsub", FANOUT, merge=merge) for merge in (UNION, MOST, PAIRS)}
_PUBSUB_MERGES = {b"channels": UNION, b"shardchannels": UNION, b"numpat": MOST, b"numsub": PAIRS,
                  b"shardnumsub": PAIRS}


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
    """The codec's handler for the pub/sub commands, once their argument count is checked.

    Sets ``request.kind`` (and ``key`` or ``command``) and returns None, or
    returns the reply when the proxy answers at once.
    """
    args = request.args
    if name in SUBSCRIPTION_COMMANDS:
        request.kind = SESSION
        return None
    if name != b"pubsub":   # PUBLISH, SPUBLISH
        request.key = publish_key(args[1])
        request.kind = FORWARD
        return None
    sub = args[1].lower()
    merge = _PUBSUB_MERGES.get(sub)
    if merge is None:   # HELP: any server says it
        request.key = b""
        request.kind = FORWARD
        return None
    if merge == UNION and len(args) > 3:
        return b"-ERR unknown subcommand or wrong number of arguments for '%s'. Try PUBSUB HELP.\r\n" % args[1]
    if merge == PAIRS and len(args) == 2:
        return b"*0\r\n"
    request.command = _FANOUT_SPECS[merge]
    request.kind = FRAGMENT
    return None


def fanout_routes(request: Request, router: Router) -> List[Tuple[Any, Request]]:
    """A PUBSUB question's parts: to every live server, or each channel to its own (NUMSUB).

    The codec's ``fragment`` for the FANOUT layout: ``[(server, request)]``
    when one server answers it all.  NUMSUB's parts keep no key positions (a
    migrating slot would move keys named like the channels first): the
    parent's ``positions`` say, per channel, which part asked for it.
    """
    merge = request.command.merge
    args = request.args
    if merge == PAIRS:
        servers = router.servers_for_keys([publish_key(channel) for channel in args[2:]])
        first = servers[0]
        if servers.count(first) == len(servers):
            return [(first, request)]
        part_of: Dict[int, int] = {}
        parts = []
        for index, (server, positions) in enumerate(group_by_server(range(2, len(args)), servers).items()):
            part_args = [args[0], args[1], *(args[position] for position in positions)]
            part = Request(resp.encode_command(part_args), part_args)
            part.command = request.command
            parts.append((server, part))
            for position in positions:
                part_of[position] = index
        request.positions = [part_of[position] for position in range(2, len(args))]
        return parts
    servers = list(router.live_servers)
    if len(servers) <= 1:
        # None live: the pool's own stand-in answers (no live server, or a cluster not loaded yet).
        return [(servers[0] if servers else router.server_for_key(b""), request)]
    parts = []
    for server in servers:
        part = Request(request.raw, args)
        part.command = request.command
        parts.append((server, part))
    return parts


def merge_fanout(request: Request) -> bytes:
    """One reply from a PUBSUB question's parts, as one Redis holding every channel would give."""
    merge = request.command.merge
    replies = [part.reply for part in request.fragments]
    try:
        if merge == MOST:
            counts = [_integer(reply) for reply in replies]
            return resp.integer(max(counts))
        lists = [_elements(reply) for reply in replies]
    except (ProtocolError, ValueError) as err:
        return resp.error(f"ERR unexpected reply from server: {err}")
    if merge == UNION:
        names: Dict[bytes, None] = {}
        for elements in lists:
            names.update(dict.fromkeys(elements))
        return resp.array(list(names))
    cursors = [0] * len(lists)
    merged = []
    for index in request.positions:
        at = cursors[index]
        pair = lists[index][at:at + 2]
        if len(pair) != 2:
            return resp.error("ERR unexpected reply from server: fewer channels than asked")
        merged += pair
        cursors[index] = at + 2
    return resp.array(merged)


def _integer(reply: bytes) -> int:
    if reply[:1] != b":":
        raise ValueError(reply[:60].decode("latin-1"))
    return int(reply[1:-2])


def _elements(reply: bytes) -> List[bytes]:
    if reply[:1] not in (b"*", b"~"):
        raise ValueError(reply[:60].decode("latin-1"))
    return resp.split_aggregate(reply)[1]


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
