"""The Redis command table's facts: what twinproxy does with each command, and Redis's own arities.

Owns :class:`CommandSpec` (what twinproxy does with a command: its layout
-- forwarded by one key, checked to be on one server, split and merged,
answered here, refused -- with the key rules of Redis's generated table,
:mod:`~twinproxy.protocols.redis_keys`, bound to it, and what twinproxy
adds beside them: STORE options, merges, the handler or refusal reason),
the lists of command names per layout and why some are refused, the
arities of the AUTH gate, and :func:`stored_keys` (the key a
STORE/STOREDIST option names).  Pure data and pure functions: the codec
(:mod:`twinproxy.protocols.redis`) builds its table from them.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from twinproxy.protocols.redis_commands import READ_ONLY
from twinproxy.protocols.redis_keys import TABLE, CommandKeys, fixed_keys

# Key layouts.
SINGLE = "single"          # one key at ``first``
SAME_SERVER = "same"       # keys where Redis's key specs say; all on one server
NUMKEYS = "numkeys"        # a key count, the keys right after it (SAME_SERVER's rules, by Redis's specs)
SPLIT = "split"            # keys at first..end by step, split per server and merged
SUBCOMMAND = "subcommand"  # a container (OBJECT, XINFO, ...): its subcommand says where its key is
KEYLESS = "keyless"        # no key, and every server answers alike (OBJECT HELP): the first live server
LOCAL_COMMAND = "local"
TRANSACTION = "transaction"  # an EXEC carrying the queued commands: all on one server
WATCHING = "watching"        # WATCH / UNWATCH: the client's connection pinned to one server
BLOCKING_COMMAND = "blocking"  # keys as SAME_SERVER; run alone on a leased connection (or, if ``blocks``
                               # says these arguments do not block, routed as SAME_SERVER)
REJECTED = "rejected"
# Sent to every server, or to one chosen server, and merged (redis_fanout): INFO, SCAN, SCRIPT LOAD, ...
FANOUT = "fanout"


class CommandSpec:
    """What twinproxy does with one command, and where its keys are (``keys``: Redis's generated rules).

    ``first``, ``last`` and ``step`` come from Redis's key specs where they
    are a plain range (GET's 1..1, MSET's 1..-1 by 2); the hand-written
    values count only for a command the generated table lacks (newer than
    its Redis).
    """

    __slots__ = ("name", "label", "layout", "first", "last", "step", "merge", "handler", "reason",
                 "arity", "subcommands", "readonly", "options", "keys", "children", "blocks")

    def __init__(self, name: bytes, layout: str, first: int = 1, last: int = 1, step: int = 1,
                 merge: Optional[str] = None, handler: Optional[Callable] = None,
                 reason: Optional[str] = None,
                 options: Optional[Tuple[int, Dict[bytes, int]]] = None,
                 blocks: Optional[Callable[[List[bytes]], bool]] = None,
                 keys: Optional[CommandKeys] = None) -> None:
        self.name = name
        # Options from this argument on, with how many values each takes; a
        # STORE/STOREDIST option's value is a key (SORT ... STORE d).
        self.options = options
        # For a BLOCKING_COMMAND that blocks only with an option (XREAD ... BLOCK):
        # whether these arguments ask for it (routed as SAME_SERVER when not).
        self.blocks = blocks
        self.label = name.decode("ascii")
        self.layout = layout
        self.merge = merge
        # LOCAL_COMMAND: answers it.  FANOUT: plans it (redis_fanout: the routes, or an answer).
        # EVAL/EVALSHA (NUMKEYS): told the route once it is known (redis_scripts remembers and heals).
        self.handler = handler
        self.reason = reason
        if keys is None:
            keys = TABLE.get(name)
        if keys is None:
            keys = fixed_keys(self.label, _HAND_ARITY.get(name, -1), first, last, step)
        self.keys = keys
        span = keys.range
        if span is not None:
            first, last, step = span
        elif keys.single is not None:
            first = last = keys.single
        self.first = first
        self.last = last
        self.step = step
        if layout is SINGLE and keys.single is None:
            raise ValueError(f"{self.label}: Redis's key specs name more than one fixed key; not a SINGLE command")
        if layout is SPLIT and span is None:
            raise ValueError(f"{self.label}: Redis's key specs are not one plain range; it cannot be SPLIT")
        # A container's subcommands, each with its own layout (SUBCOMMAND).
        self.children: Optional[Dict[bytes, CommandSpec]] = None
        if layout is SUBCOMMAND:
            self.children = {sub: _subcommand_spec(name, sub, sub_keys)
                             for sub, sub_keys in (keys.subcommands or {}).items()}
        # Redis's own argument count (COMMAND INFO's arity) and, for a container
        # such as CLIENT, its subcommands' arities; only the AUTH gate reads them.
        self.arity = -1
        self.subcommands: Optional[Dict[bytes, int]] = None
        # May go to a replica: Redis flags it read-only, it names its keys,
        # and it is not kept for the master.  A container (OBJECT, XINFO, ...)
        # and its subcommands stay on the master.
        self.readonly = (layout in (SINGLE, SAME_SERVER, NUMKEYS, SPLIT, BLOCKING_COMMAND)
                         and self.label in READ_ONLY and self.label not in MASTER_ONLY and "|" not in self.label)


def _subcommand_spec(container: bytes, sub: bytes, keys: CommandKeys) -> CommandSpec:
    """A container's subcommand: by its key, to the first live server, or refused when it is about one server."""
    name = container + b"|" + sub
    if keys.single is not None:
        return CommandSpec(name, SINGLE, keys=keys)
    if keys.has_keys:
        return CommandSpec(name, SAME_SERVER, keys=keys)
    if sub in KEYLESS_SUBCOMMANDS:
        return CommandSpec(name, KEYLESS, keys=keys)
    return CommandSpec(name, REJECTED, keys=keys, reason=ONE_SERVER_REASON)


SINGLE_KEY = """
append bitcount bitfield bitfield_ro bitpos decr decrby dump expire expireat expiretime
get getbit getdel getex getrange getset hdel hexists hexpire hexpireat hexpiretime hget
hgetall hgetdel hgetex hincrby hincrbyfloat hkeys hlen hmget hmset hpersist hpexpire
hpexpireat hpexpiretime hpttl hrandfield hscan hset hsetex hsetnx hstrlen httl hvals incr
incrby incrbyfloat lindex linsert llen lpop lpos lpush lpushx lrange lrem lset ltrim
persist pexpire pexpireat pexpiretime pfadd psetex pttl restore rpop rpush rpushx sadd
scard set setbit setex setnx setrange sismember smembers smismember sort_ro spop
srandmember srem sscan strlen substr ttl type xack xadd xautoclaim xclaim xdel xlen
xpending xrange xrevrange xsetid xtrim zadd zcard zcount zincrby zlexcount zmscore zpopmax
zpopmin zrandmember zrange zrangebylex zrangebyscore zrank zrem zremrangebylex
zremrangebyrank zremrangebyscore zrevrange zrevrangebylex zrevrangebyscore zrevrank zscan
zscore geoadd geodist geohash geopos georadius_ro georadiusbymember_ro geosearch
"""
# A key, then options of which STORE (and STOREDIST) name a key to write:
# (the first option's argument index, {option: the values it takes}).
STORE_OPTIONS = {
    "sort": (2, {b"by": 1, b"limit": 2, b"get": 1, b"store": 1}),
    "georadius": (6, {b"count": 1, b"store": 1, b"storedist": 1}),
    "georadiusbymember": (5, {b"count": 1, b"store": 1, b"storedist": 1}),
}
# Subcommand first, key second: OBJECT ENCODING k, MEMORY USAGE k, XINFO STREAM k, ...
KEY_SECOND = "object memory xinfo xgroup"
# Their keyless subcommands that every server answers alike; the others (MEMORY STATS,
# DOCTOR, ...) are about the one server that answers, which a pool is not.
KEYLESS_SUBCOMMANDS = frozenset((b"help",))
ONE_SERVER_REASON = "it reports on (or acts on) one server; ask the backends directly"
# Two keys, both on one server.
TWO_KEYS = "rename renamenx rpoplpush smove lmove copy lcs zrangestore geosearchstore"
# Every argument a key, all on one server.
ALL_KEYS = "sdiff sdiffstore sinter sinterstore sunion sunionstore pfcount pfmerge"
# A key count, then the keys.
NUMKEYS_AT_1 = "zunion zinter zdiff zintercard sintercard lmpop zmpop"
NUMKEYS_AT_2 = "eval evalsha eval_ro evalsha_ro fcall fcall_ro"
# The same after a destination key: it must be with the others, and is moved with them.
NUMKEYS_AFTER_DESTINATION = "zunionstore zinterstore zdiffstore"

# Read-only to Redis, yet for the master: scripts (their keys and effects are
# their own), and TOUCH (its point is the master's access times).
MASTER_ONLY = frozenset(("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "touch"))
# Run on a connection leased for the command alone (redis_blocking says for how long).
BLOCKING = "blpop brpop brpoplpush blmove blmpop bzpopmin bzpopmax bzmpop"
# Blocking only with BLOCK: routed by their streams' keys without it.
STREAM_READS = "xread xreadgroup"
# They wait for replicas to acknowledge "this client's writes": a proxy's client writes over
# connections it shares with other clients, so no server connection's offset is the client's.
WAITS = "wait waitaof"
WAITS_REASON = ("it waits for replicas to acknowledge the client's writes, and a proxy's client writes over "
                "server connections shared with other clients")
PUBSUB = "subscribe psubscribe ssubscribe unsubscribe punsubscribe sunsubscribe publish spublish pubsub"
# KEYS, SCAN, RANDOMKEY, DBSIZE, FLUSHDB and FLUSHALL fan out (redis_keyspace); MOVE is
# routed by its key and SWAPDB refused (redis_connection and the codec's table).
WHOLE_KEYSPACE = "migrate"
# INFO, CONFIG, LASTSAVE, TIME, SCRIPT and FUNCTION fan out (redis_fanout_commands, redis_scripts);
# ROLE, READONLY, READWRITE and RESET are answered per client (redis_connection).
SERVER_ADMIN = """
save bgsave bgrewriteaof shutdown slaveof replicaof sync psync
debug monitor cluster asking failover acl latency slowlog
lolwut module
"""
# Redis's replication, cluster and debugging internals.
INTERNAL = "pfdebug pfselftest replconf restore-asking"

# Redis's arity of every command in the table, as COMMAND INFO gives it: n is
# exactly n arguments counting the name, -n at least n.  Redis checks it (and
# a container's subcommand) before its AUTH gate, so an unauthenticated client
# is told about a wrong argument count rather than NOAUTH; the gate here does
# the same.  Redis 7.0's numbers, but ZRANK/ZREVRANK as 7.2 made them
# (WITHSCORE) and the commands 7.0 lacks as the Redis that added them.
ARITY = """
acl:-2 append:3 asking:1 auth:-2 bgrewriteaof:1 bgsave:-1 bitcount:-2 bitfield:-2 bitfield_ro:-2 bitop:-4
bitpos:-3 blmove:6 blmpop:-5 blpop:-3 brpop:-3 brpoplpush:4 bzmpop:-5 bzpopmax:-3 bzpopmin:-3 client:-2
cluster:-2 command:-1 config:-2 copy:-3 dbsize:1 debug:-2 decr:2 decrby:3 del:-2 discard:1 dump:2 echo:2
eval:-3 eval_ro:-3 evalsha:-3 evalsha_ro:-3 exec:1 exists:-2 expire:-3 expireat:-3 expiretime:2 failover:-1
fcall:-3 fcall_ro:-3 flushall:-1 flushdb:-1 function:-2 geoadd:-5 geodist:-4 geohash:-2 geopos:-2 georadius:-6
georadius_ro:-6 georadiusbymember:-5 georadiusbymember_ro:-5 geosearch:-7 geosearchstore:-8 get:2 getbit:3
getdel:2 getex:-2 getrange:4 getset:3 hdel:-3 hello:-1 hexists:3 hexpire:-6 hexpireat:-6 hexpiretime:-5 hget:3
hgetall:2 hgetdel:-5 hgetex:-5 hincrby:4 hincrbyfloat:4 hkeys:2 hlen:2 hmget:-3 hmset:-4 hpersist:-5
hpexpire:-6 hpexpireat:-6 hpexpiretime:-5 hpttl:-5 hrandfield:-2 hscan:-3 hset:-4 hsetex:-6 hsetnx:4 hstrlen:3
httl:-5 hvals:2 incr:2 incrby:3 incrbyfloat:3 info:-1 keys:2 lastsave:1 latency:-2 lcs:-3 lindex:3 linsert:5
llen:2 lmove:5 lmpop:-4 lolwut:-1 lpop:-2 lpos:-3 lpush:-3 lpushx:-3 lrange:4 lrem:4 lset:4 ltrim:4 memory:-2
mget:-2 migrate:-6 module:-2 monitor:1 move:3 mset:-3 msetnx:-3 multi:1 object:-2 persist:2 pexpire:-3
pexpireat:-3 pexpiretime:2 pfadd:-2 pfcount:-2 pfdebug:3 pfmerge:-2 pfselftest:1 ping:-1
psetex:4 psubscribe:-2 psync:-3 pttl:2
publish:3 pubsub:-2 punsubscribe:-1 quit:-1 randomkey:1 readonly:1 readwrite:1 rename:3 renamenx:3 replconf:-1
replicaof:3 reset:1 restore:-4 restore-asking:-4 role:1 rpop:-2 rpoplpush:3 rpush:-3
rpushx:-3 sadd:-3 save:1 scan:-2 scard:2 script:-2
sdiff:-2 sdiffstore:-3 select:2 set:-3 setbit:4 setex:4 setnx:3 setrange:4 shutdown:-1 sinter:-2 sintercard:-3
sinterstore:-3 sismember:3 slaveof:3 slowlog:-2 smembers:2 smismember:-3 smove:4 sort:-2 sort_ro:-2 spop:-2
spublish:3 srandmember:-2 srem:-3 sscan:-3 ssubscribe:-2 strlen:2 subscribe:-2 substr:4 sunion:-2
sunionstore:-3 sunsubscribe:-1 swapdb:3 sync:1 time:1 touch:-2 ttl:2 type:2 unlink:-2 unsubscribe:-1 unwatch:1
wait:3 waitaof:4 watch:-2 xack:-4 xadd:-5 xautoclaim:-6 xclaim:-6 xdel:-3 xgroup:-2 xinfo:-2 xlen:2
xpending:-3 xrange:-4 xread:-4 xreadgroup:-7 xrevrange:-4 xsetid:-3 xtrim:-4 zadd:-4 zcard:2 zcount:4 zdiff:-3
zdiffstore:-4 zincrby:4 zinter:-3 zintercard:-3 zinterstore:-4 zlexcount:4 zmpop:-4 zmscore:-3 zpopmax:-2
zpopmin:-2 zrandmember:-2 zrange:-4 zrangebylex:-4 zrangebyscore:-4 zrangestore:-5 zrank:-3 zrem:-3
zremrangebylex:4 zremrangebyrank:4 zremrangebyscore:4 zrevrange:-4 zrevrangebylex:-4 zrevrangebyscore:-4
zrevrank:-3 zscan:-3 zscore:3 zunion:-3 zunionstore:-4
"""
# The subcommands of the containers twinproxy routes, fans out or answers
# (CLIENT SETINFO and NO-TOUCH are 7.2's).  The containers it refuses (ACL,
# MODULE, ...) have no list: before AUTH their subcommands all get NOAUTH.
SUBCOMMAND_ARITY = {
    "client": "caching:3 getname:2 getredir:2 help:2 id:2 info:2 kill:-3 list:-2 no-evict:3 no-touch:3 pause:-3 "
              "reply:3 setinfo:4 setname:3 tracking:-3 trackinginfo:2 unblock:-3 unpause:2",
    "pubsub": "channels:-2 help:2 numpat:2 numsub:-2 shardchannels:-2 shardnumsub:-2",
    "command": "count:2 docs:-2 getkeys:-4 getkeysandflags:-4 help:2 info:-2 list:-2",
    "config": "get:-3 help:2 resetstat:2 rewrite:2 set:-4",
    "function": "delete:3 dump:2 flush:-2 help:2 kill:2 list:-2 load:-3 restore:-3 stats:2",
    "script": "debug:3 exists:-3 flush:-2 help:2 kill:2 load:3",
    "object": "encoding:3 freq:3 help:2 idletime:3 refcount:3",
    "memory": "doctor:2 help:2 malloc-stats:2 purge:2 stats:2 usage:-3",
    "xinfo": "consumers:4 groups:3 help:2 stream:-3",
    "xgroup": "create:-5 createconsumer:5 delconsumer:5 destroy:4 help:2 setid:-5",
}


def fits(count: int, arity: int) -> bool:
    """Whether ``count`` arguments (the name included) fit Redis's ``arity`` (n: exactly n; -n: at least n)."""
    return count == arity if arity > 0 else count >= -arity


def arities(text: str) -> Dict[bytes, int]:
    pairs = (word.split(":") for word in text.split())
    return {name.encode(): int(arity) for name, arity in pairs}


# For the key rules of the commands the generated table lacks.
_HAND_ARITY = arities(ARITY)


def words(text: str) -> List[bytes]:
    return [word.encode() for word in text.split()]


def stored_keys(args: List[bytes], start: int, takes: Dict[bytes, int]) -> List[int]:
    """The position of the key a STORE/STOREDIST option names (the last one: Redis writes that one)."""
    found: List[int] = []
    index = start
    while index < len(args):
        option = args[index].lower()
        if option in (b"store", b"storedist") and index + 1 < len(args):
            found = [index + 1]
        index += 1 + takes.get(option, 0)
    return found
