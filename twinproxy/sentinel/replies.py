"""Pure parsing of what Sentinel and the data nodes say: one RESP reply, the
``SENTINEL MASTERS``/``REPLICAS`` field lists, ``ROLE``, ``INFO replication``
and the pub/sub event texts.  No I/O here: callers hand in bytes or decoded
values and get frozen views back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

Text = Union[bytes, str]


class ReplyError(Exception):
    """An error reply (``-ERR ...``, RESP3 ``!``), returned as a value by ``decode``, not raised."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The first word (``ERR``, ``NOQUORUM``, ``READONLY``...)."""
        return self.message.split(" ", 1)[0]

    # Value semantics so that decoded replies holding errors compare in tests and callers.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)


class IncompleteReplyError(ValueError):
    """The bytes end before the reply does: read more and try again."""


_CRLF = b"\r\n"
_AGGREGATES = {b"*": 1, b"~": 1, b">": 1, b"%": 2, b"|": 2}  # items per counted element
_BLOBS = (b"$", b"=", b"!")
_KINDS = frozenset(_AGGREGATES) | frozenset(_BLOBS) | {b"+", b"-", b":", b"(", b"_", b"#", b","}
# Deeper nesting than this is hostile, not a sentinel reply; refuse it before Python's recursion limit.
_MAX_DEPTH = 32


def _line(data: bytes, start: int) -> Tuple[bytes, int]:
    end = data.find(_CRLF, start)
    if end < 0:
        raise IncompleteReplyError("reply line not terminated")
    return data[start:end], end + 2


def _number(text: bytes, length: bool = False) -> int:
    # int() would accept " 5", "+5" and "5_0"; a length is plain digits or exactly -1.
    if (length and text == b"-1") or (text[1:] if text[:1] == b"-" and not length else text).isdigit():
        return int(text)
    raise ValueError(f"bad {'length' if length else 'integer'} {text!r}")


def decode_prefix(data: bytes, start: int = 0, depth: int = 0) -> Tuple[Any, int]:
    """Decode the reply that begins at ``start``; return it and the offset just past it.

    Raises IncompleteReplyError (a ValueError) when more bytes are needed and
    ValueError when the bytes cannot be a reply.
    """
    if start >= len(data):
        raise IncompleteReplyError("no reply yet")
    kind = data[start:start + 1]
    if kind not in _KINDS:  # checked first, so garbage fails now instead of waiting for a CRLF
        raise ValueError(f"unknown reply type {kind!r}")
    if depth > _MAX_DEPTH:
        raise ValueError("reply nested too deeply")
    line, pos = _line(data, start + 1)
    if kind in (b"+", b"-"):
        text = line.decode("utf-8", "replace")
        return (ReplyError(text) if kind == b"-" else text), pos
    if kind in (b":", b"("):
        return _number(line), pos
    if kind in _BLOBS or kind in _AGGREGATES:
        size = _number(line, length=True)
        if size < 0:
            if kind != b"$" and kind != b"*":
                raise ValueError(f"null length for {kind!r}")
            return None, pos
    if kind in _BLOBS:
        end = pos + size
        if len(data) < end + 2:
            raise IncompleteReplyError("bulk string cut short")
        if data[end:end + 2] != _CRLF:
            raise ValueError("bulk string not followed by CRLF")
        body, pos = data[pos:end], end + 2
        if kind == b"!":
            return ReplyError(body.decode("utf-8", "replace")), pos
        if kind == b"=":
            # A verbatim string starts with a 3-letter format and ':' ("txt:", "mkd:").
            if body[3:4] != b":":
                raise ValueError("verbatim string without a format prefix")
            body = body[4:]
        return body, pos
    if kind in _AGGREGATES:
        items = []
        for _ in range(size * _AGGREGATES[kind]):
            item, pos = decode_prefix(data, pos, depth + 1)
            items.append(item)
        if kind == b"|":
            # Attributes annotate the reply that follows; nothing here needs them.
            return decode_prefix(data, pos, depth)
        if kind == b"%":
            try:
                return {_key(items[i]): items[i + 1] for i in range(0, len(items), 2)}, pos
            except TypeError:
                raise ValueError("map key cannot be a map")
        return items, pos
    if kind == b"_" and not line:
        return None, pos
    if kind == b"#" and line in (b"t", b"f"):
        return line == b"t", pos
    if kind == b",":
        try:
            return float(line), pos
        except ValueError:
            pass
    raise ValueError(f"bad {kind!r} reply {line!r}")


def _key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _cursor_and_keys(reply: bytes) -> Optional[List[Any]]:
    """``[cursor, [key, ...]]`` of a SCAN reply by one split, or None when ``reply`` is not exactly that.

    The migration sweep decodes a thousand keys per SCAN; the general decoder
    spends 60 % of the dashboard's CPU there (bench/migration.py).  Exact:
    a CRLF inside any string adds a piece, so the count check fails and the
    general decoder decides.
    """
    pieces = reply.split(b"\r\n")
    if len(pieces) < 5 or pieces[1][:1] != b"$" or pieces[3][:1] != b"*" or not pieces[3][1:].isdigit():
        return None
    count = int(pieces[3][1:])
    if len(pieces) != 5 + 2 * count or pieces[-1] != b"":
        return None
    if len(pieces[2]) != _length(pieces[1]):
        return None
    # With the count right there is no CRLF inside a string, so each key is whole.
    return [pieces[2], pieces[5:-1:2]]


def _length(header: bytes) -> int:
    return int(header[1:]) if header[:1] == b"$" and header[1:].isdigit() else -1


def decode(reply: bytes) -> Any:
    """Decode exactly one complete RESP2/RESP3 reply; ValueError if malformed, incomplete or followed by more."""
    if reply[:5] == b"*2\r\n$":
        fast = _cursor_and_keys(bytes(reply))
        if fast is not None:
            return fast
    value, end = decode_prefix(bytes(reply))
    if end != len(reply):
        raise ValueError(f"{len(reply) - end} bytes after the reply")
    return value


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def _int(value: Any, strict: bool = False) -> int:
    """An integer field; 0 when missing or not a number (sentinel writes '?' for unknowns), unless strict."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(_text(value))
    except ValueError:
        if strict:
            raise ValueError(f"not a number: {value!r}")
        return 0


def _fields(value: Any) -> Dict[str, str]:
    """A flat field/value list (RESP2) or a map (RESP3) as str -> str."""
    if isinstance(value, Mapping):
        return {_text(k): _text(v) for k, v in value.items()}
    if not isinstance(value, list) or len(value) % 2:
        raise ValueError("expected a flat field/value list")
    return {_text(value[i]): _text(value[i + 1]) for i in range(0, len(value), 2)}


def _entries(value: Any) -> List[Any]:
    if isinstance(value, ReplyError):
        raise ValueError(f"error reply: {value.message}")
    if not isinstance(value, list):
        raise ValueError("expected a list of entries")
    return value


def _flags(text: str) -> FrozenSet[str]:
    return frozenset(flag for flag in text.split(",") if flag)


@dataclass(frozen=True)
class MasterView:
    """One sentinel's view of one monitored master."""

    name: str
    host: str
    port: int
    run_id: str
    epoch: int
    flags: FrozenSet[str]
    num_other_sentinels: int
    quorum: int
    num_replicas: int

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def down(self) -> bool:
        return bool(self.flags & {"s_down", "o_down"})

    @property
    def failover_in_progress(self) -> bool:
        return "failover_in_progress" in self.flags


def parse_master_fields(value: Any) -> MasterView:
    """A ``SENTINEL MASTER name`` reply (one flat field/value list)."""
    fields = _fields(value)
    return MasterView(
        name=fields.get("name", ""), host=fields.get("ip", ""), port=_int(fields.get("port")),
        run_id=fields.get("runid", ""), epoch=_int(fields.get("config-epoch")), flags=_flags(fields.get("flags", "")),
        num_other_sentinels=_int(fields.get("num-other-sentinels")), quorum=_int(fields.get("quorum")),
        num_replicas=_int(fields.get("num-slaves")),
    )


def parse_masters(value: Any) -> Dict[str, MasterView]:
    """A ``SENTINEL MASTERS`` reply, by master name (entries without a name are skipped)."""
    views = (parse_master_fields(entry) for entry in _entries(value))
    return {view.name: view for view in views if view.name}


@dataclass(frozen=True)
class ReplicaView:
    """One sentinel's view of one replica of a master."""

    host: str
    port: int
    run_id: str
    flags: FrozenSet[str]
    master_host: str
    master_port: int
    link_ok: bool
    offset: int

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def usable(self) -> bool:
        # Exactly "slave": a dead replica keeps a stale "link ok" next to s_down/disconnected.
        return self.flags == frozenset({"slave"})


def parse_replicas(value: Any) -> List[ReplicaView]:
    """A ``SENTINEL REPLICAS name`` (or ``SLAVES``) reply."""
    replicas = []
    for entry in _entries(value):
        fields = _fields(entry)
        replicas.append(ReplicaView(
            host=fields.get("ip", ""), port=_int(fields.get("port")), run_id=fields.get("runid", ""),
            flags=_flags(fields.get("flags", "")), master_host=fields.get("master-host", ""),
            master_port=_int(fields.get("master-port")), link_ok=fields.get("master-link-status") == "ok",
            offset=_int(fields.get("slave-repl-offset")),
        ))
    return replicas


@dataclass(frozen=True)
class Role:
    """A ``ROLE`` reply.  ``names`` is the master names a sentinel monitors (empty otherwise)."""

    kind: str
    offset: int
    master: Optional[Tuple[str, int]]
    link_state: str
    replicas: Tuple[Tuple[str, int, int], ...]
    names: Tuple[str, ...] = ()


def parse_role(value: Any) -> Role:
    """A ``ROLE`` reply from a master, a replica or a sentinel; ValueError otherwise."""
    if isinstance(value, ReplyError):
        raise ValueError(f"error reply: {value.message}")
    if not isinstance(value, list) or not value:
        raise ValueError("ROLE reply is not a non-empty list")
    kind = _text(value[0])
    kind = "slave" if kind == "replica" else kind  # not what 7.0 says, but the same thing
    if kind == "master" and len(value) >= 3 and isinstance(value[2], list):
        replicas = []
        for entry in value[2]:
            if not isinstance(entry, list) or len(entry) < 3:
                raise ValueError("bad replica entry in ROLE")
            replicas.append((_text(entry[0]), _int(entry[1], True), _int(entry[2], True)))
        return Role(kind, _int(value[1], True), None, "", tuple(replicas))
    if kind == "slave" and len(value) >= 5:
        master = (_text(value[1]), _int(value[2], True))
        return Role(kind, _int(value[4], True), master, _text(value[3]), ())
    if kind == "sentinel" and len(value) >= 2 and isinstance(value[1], list):
        return Role(kind, 0, None, "", (), tuple(_text(name) for name in value[1]))
    raise ValueError(f"unrecognised ROLE reply {value!r}")


@dataclass(frozen=True)
class ReplicaLink:
    """One ``slaveN:`` line of a master's ``INFO replication``."""

    host: str
    port: int
    state: str
    offset: int
    lag: int


@dataclass(frozen=True)
class Replication:
    """``INFO replication``; ``offset`` is the replica's own on a replica, the master's on a master."""

    role: str
    master: Optional[Tuple[str, int]]
    link_up: bool
    sync_in_progress: bool
    offset: int
    replicas: Tuple[ReplicaLink, ...]


def parse_replication(text: Text) -> Replication:
    """Parse ``INFO replication`` (or full ``INFO``) by key, whatever the line order or extra lines."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    fields: Dict[str, str] = {}
    links = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        if key.startswith("slave") and key[5:].isdigit():
            # ip=..,port=..,state=..,offset=..,lag=..; an IPv6 ip holds ':' but never ',' or '='.
            parts = dict(item.partition("=")[::2] for item in value.split(","))
            links.append(ReplicaLink(parts.get("ip", ""), _int(parts.get("port")), parts.get("state", ""),
                                     _int(parts.get("offset")), _int(parts.get("lag"))))
        else:
            fields[key] = value
    role = fields.get("role", "")
    master = None
    if role == "slave" and "master_host" in fields:
        master = (fields["master_host"], _int(fields.get("master_port")))
    offset_key = "slave_repl_offset" if role == "slave" else "master_repl_offset"
    return Replication(role=role, master=master, link_up=fields.get("master_link_status") == "up",
                       sync_in_progress=fields.get("master_sync_in_progress") == "1",
                       offset=_int(fields.get(offset_key)), replicas=tuple(links))


def replica_lag_ms(master: Replication, host: str, port: int) -> Optional[int]:
    """How far that replica trails, from the master's INFO; None if not listed online.

    Redis reports ``lag`` in whole seconds since the replica's last ACK, so a
    replica that has caught up (offset reached) counts as 0 whatever its lag.
    """
    for link in master.replicas:
        if link.host == host and link.port == port:
            if link.state != "online":
                return None
            return 0 if link.offset >= master.offset else link.lag * 1000
    return None


@dataclass(frozen=True)
class Event:
    """One sentinel pub/sub message about an instance of the master ``name``."""

    kind: str
    role: str
    name: str
    host: str
    port: int
    new_host: str = ""
    new_port: int = 0
    # The master's address for the '@' form (equal to host/port for a master event).
    master_host: str = ""
    master_port: int = 0
    # Trailing words: "#quorum 2/2", "new reported role is master".
    extra: str = ""


_TYPES = {"master": "master", "slave": "slave", "replica": "slave", "sentinel": "sentinel"}


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def parse_event(channel: Text, payload: Text) -> Optional[Event]:
    """The event on ``channel`` with ``payload``; None for anything not in a known form (never raises)."""
    try:
        return _parse_event(_text(channel), _text(payload))
    except (ValueError, IndexError, TypeError, AttributeError):
        return None


def _parse_event(kind: str, payload: str) -> Optional[Event]:
    words = payload.split()
    if kind == "+switch-master":
        if len(words) != 5:
            return None
        name, old_host, old_port, new_host, new_port = words
        return Event(kind, "master", name, old_host, _port(old_port), new_host, _port(new_port),
                     old_host, _port(old_port))
    if len(words) < 4 or words[0] not in _TYPES:
        return None
    role = _TYPES[words[0]]
    host, port = words[2], _port(words[3])
    if len(words) >= 8 and words[4] == "@":
        return Event(kind, role, words[5], host, port, master_host=words[6], master_port=_port(words[7]),
                     extra=" ".join(words[8:]))
    if role != "master" or (len(words) > 4 and words[4] == "@"):
        # Only a master may omit the '@ master' part; a cut '@' form is not an event we know.
        return None
    return Event(kind, role, words[1], host, port, master_host=host, master_port=port, extra=" ".join(words[4:]))


def show_address(address: Optional[Tuple[str, int]]) -> str:
    """``host:port`` (``[v6]:port``), as logs, errors and stats show a node; ``-`` for none."""
    if address is None:
        return "-"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

