"""Where a Redis command's keys are: Redis 7's key specs, applied as ``COMMAND GETKEYS`` applies them.

Owns :class:`CommandKeys` (one command's or subcommand's arity, flags and
key specs, from the generated :mod:`~twinproxy.protocols.redis_commands`
table), the procedures Redis falls back on where a spec cannot say (SORT's
STORE, MIGRATE's KEYS, XREAD's STREAMS, GEORADIUS's STORE),
:func:`key_positions`, and Redis's own errors for what stops it finding
keys: an unknown command or subcommand, a wrong argument count, a numkeys
the command refuses.  Pure data and pure functions.

The semantics are Redis 7.0's ``getKeysFromCommandWithSpecs``: the specs
unless one of them is ``incomplete``, ``unknown`` or out of range, then the
command's own key procedure.  Where twinproxy differs from ``COMMAND
GETKEYS`` it does so on purpose, and the corpus test
(``tests/integration/test_redis_keys.py``) lists each case:

- a numkeys the command itself refuses ("1x", 0, too many) raises
  :class:`BadInvocation` with that command's own error, where GETKEYS may
  still name keys (it reads numkeys with ``atoi``);
- an open-ended range that starts just past the last argument finds no
  key instead of failing the whole search (``PFMERGE dest`` is a valid
  command that GETKEYS refuses).
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from twinproxy.protocols.redis_commands import COMMANDS

# begin_search and find_keys types, as COMMAND INFO names them.
INDEX = "index"
KEYWORD = "keyword"
RANGE = "range"
KEYNUM = "keynum"


class BadInvocation(Exception):
    """Redis refuses this invocation before touching a key; ``message`` is its error, without '-' and CRLF."""

    def __init__(self, message: bytes) -> None:
        super().__init__(message.decode("latin-1"))
        self.message = message


def long_long(text: bytes) -> Optional[int]:
    """``text`` as Redis's string2ll reads it: no sign but '-', no leading zero, 64-bit; else None."""
    digits = text[1:] if text[:1] == b"-" else text
    if text == b"0":
        return 0
    if not digits.isdigit() or digits[:1] == b"0":
        return None
    value = int(text)
    if not -(1 << 63) <= value < (1 << 63):
        return None
    return value


def _c_div(numerator: int, denominator: int) -> int:
    """C's integer division (truncates toward zero)."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator < 0) == (denominator < 0) else -quotient


# -- Redis's error texts ---------------------------------------------------


def _shown(arg: bytes, limit: int) -> bytes:
    # Redis formats with %s (a NUL ends the text), cut to ``limit`` bytes, and
    # blanks CR and LF in the whole error.
    return arg.split(b"\0", 1)[0][:limit].replace(b"\r", b" ").replace(b"\n", b" ")


def unknown_command(args: Sequence[bytes]) -> bytes:
    """Redis 7.0's ``unknown command`` error for ``args``: the name and the first 128 bytes of its arguments."""
    shown = b""
    for arg in args[1:]:
        if len(shown) >= 128:
            break
        shown += b"'" + _shown(arg, 128 - len(shown)) + b"' "
    return b"ERR unknown command '%s', with args beginning with: %s" % (_shown(args[0], 128), shown)


def unknown_subcommand(args: Sequence[bytes]) -> bytes:
    return b"ERR unknown subcommand '%s'. Try %s HELP." % (_shown(args[1], 128), _shown(args[0], 128).upper())


def wrong_arity(name: str) -> bytes:
    """The argument-count error; ``name`` as Redis spells the command (``object|encoding``)."""
    return b"ERR wrong number of arguments for '%s' command" % name.encode()


# -- what a numkeys command says of a count it cannot use ------------------

_NOT_AN_INTEGER = b"ERR value is not an integer or out of range"
_SYNTAX = b"ERR syntax error"
_TOO_MANY = b"ERR Number of keys can't be greater than number of args"


class NumkeysRules:
    """How one command checks its numkeys (Redis 7.0, checked in the corpus test), in the command's order.

    ``at_least`` is the smallest count it takes; ``reserved`` how many
    arguments must stay after the keys (LMPOP's LEFT|RIGHT).  Each message is
    None where that check does not apply.
    """

    __slots__ = ("not_integer", "at_least", "below", "negative", "reserved", "too_many")

    def __init__(self, not_integer: bytes, at_least: int, below: Optional[bytes], negative: Optional[bytes],
                 too_many: bytes, reserved: int = 0) -> None:
        self.not_integer = not_integer
        self.at_least = at_least
        self.below = below
        self.negative = negative
        self.reserved = reserved
        self.too_many = too_many

    def count(self, name: str, text: bytes, available: int) -> int:
        """The number of keys ``text`` asks for, of ``available`` arguments; BadInvocation as the command says."""
        count = long_long(text)
        if count is None:
            raise BadInvocation(self.not_integer)
        if count < self.at_least and self.below is not None:
            raise BadInvocation(self.below.replace(b"%s", name.encode()))
        if count > available - self.reserved:
            raise BadInvocation(self.too_many)
        if count < 0 and self.negative is not None:
            raise BadInvocation(self.negative)
        return count


_ZSET_SETS = NumkeysRules(_NOT_AN_INTEGER, 1, b"ERR at least 1 input key is needed for '%s' command", None, _SYNTAX)
_POSITIVE = b"ERR numkeys should be greater than 0"
_MPOP = NumkeysRules(_POSITIVE, 1, _POSITIVE, None, _SYNTAX, reserved=1)
_SCRIPT_NEGATIVE = b"ERR Number of keys can't be negative"
_EVAL = NumkeysRules(_NOT_AN_INTEGER, 0, None, _SCRIPT_NEGATIVE, _TOO_MANY)
# EVALSHA and FCALL look the script or function up first (NOSCRIPT, "Function not found");
# a proxy cannot, and answers the numkeys error a server that has it gives.
_FCALL = NumkeysRules(b"ERR Bad number of keys provided", 0, None, _SCRIPT_NEGATIVE, _TOO_MANY)
NUMKEYS_RULES: Dict[str, NumkeysRules] = {
    **dict.fromkeys(("zunion", "zinter", "zdiff", "zunionstore", "zinterstore", "zdiffstore", "zintercard"),
                    _ZSET_SETS),
    # BLMPOP and BZMPOP read their timeout first; their count is checked as LMPOP's.
    **dict.fromkeys(("lmpop", "zmpop", "blmpop", "bzmpop"), _MPOP),
    "sintercard": NumkeysRules(_POSITIVE, 1, _POSITIVE, None, _TOO_MANY),
    **dict.fromkeys(("eval", "evalsha", "eval_ro", "evalsha_ro"), _EVAL),
    **dict.fromkeys(("fcall", "fcall_ro"), _FCALL),
}


# -- key specs ---------------------------------------------------------------


class KeySpec:
    """One of a command's key specs: where its search begins, and how it finds the keys from there."""

    __slots__ = ("flags", "begin", "index", "keyword", "startfrom", "find", "lastkey", "keystep", "limit",
                 "keynumidx", "firstkey", "not_key", "incomplete")

    def __init__(self, flags: Tuple[str, ...], begin_search: Tuple, find_keys: Tuple) -> None:
        self.flags = flags
        self.not_key = "not_key" in flags           # a channel (SPUBLISH), not a key
        self.incomplete = "incomplete" in flags     # may miss keys: the command's own procedure decides
        self.begin = begin_search[0]
        self.index = begin_search[1] if self.begin == INDEX else 0
        self.keyword = begin_search[1].lower().encode() if self.begin == KEYWORD else b""
        self.startfrom = begin_search[2] if self.begin == KEYWORD else 0
        self.find = find_keys[0]
        self.lastkey, self.keystep, self.limit = find_keys[1:4] if self.find == RANGE else (0, 1, 0)
        self.keynumidx, self.firstkey = find_keys[1:3] if self.find == KEYNUM else (0, 0)
        if self.find == KEYNUM:
            self.keystep = find_keys[3]

    def begin_at(self, args: Sequence[bytes]) -> int:
        """The argument the search begins at; 0 if its keyword is not there, -1 for a spec that cannot say."""
        if self.begin == INDEX:
            return self.index
        if self.begin != KEYWORD:
            return -1
        argc = len(args)
        startfrom = self.startfrom
        # Redis's loop: forward from startfrom to argc-2, or back from argc+startfrom to 1.
        start = startfrom if startfrom > 0 else argc + startfrom
        end = argc - 1 if startfrom > 0 else 0
        i = start
        while i != end:
            if i >= argc or i < 1:
                break
            if args[i].lower() == self.keyword:
                return i + 1
            i = i + 1 if start <= end else i - 1
        return 0


class CommandKeys:
    """The key rules of one command or container subcommand, as Redis's command table holds them."""

    __slots__ = ("name", "arity", "flags", "specs", "has_keys", "no_mandatory_keys", "procedure", "numkeys",
                 "subcommands", "single", "range", "fixed")

    def __init__(self, name: str, arity: int, flags: Tuple[str, ...], specs: Sequence[KeySpec]) -> None:
        self.name = name
        self.arity = arity
        self.flags = flags
        self.specs = tuple(specs)
        self.procedure: Optional[Callable[[Sequence[bytes]], List[int]]] = PROCEDURES.get(name)
        key_specs = [spec for spec in self.specs if not spec.not_key]
        # Redis's doesCommandHaveKeys: a key spec that is a key, or a key procedure.
        self.has_keys = bool(key_specs) or self.procedure is not None
        self.no_mandatory_keys = "no_mandatory_keys" in flags
        self.numkeys = NUMKEYS_RULES.get(name)
        self.subcommands: Optional[Dict[bytes, "CommandKeys"]] = None
        # A fixed single key (GET's argv[1]), and a plain range (MGET's 1..-1), for the codec's fast paths.
        self.single: Optional[int] = None
        self.range: Optional[Tuple[int, int, int]] = None
        # Keys at fixed places (RENAME's 1 and 2): once the argument count is right, nothing to search.
        self.fixed: Optional[Tuple[int, ...]] = None
        if self.procedure is None and all(spec.begin == INDEX and spec.find == RANGE and spec.lastkey >= 0
                                          and spec.keystep == 1 and not spec.incomplete and not spec.not_key
                                          for spec in self.specs):
            fixed = tuple(position for spec in self.specs
                          for position in range(spec.index, spec.index + spec.lastkey + 1))
            if not fixed or max(fixed) < abs(arity):   # the argument count guarantees they are there
                self.fixed = fixed
        if self.procedure is first_key_only:
            self.single = 1
        elif len(key_specs) == 1 and self.procedure is None and len(self.specs) == 1:
            spec = key_specs[0]
            if spec.begin == INDEX and spec.find == RANGE and not spec.limit and not spec.incomplete:
                self.range = (spec.index, spec.lastkey if spec.lastkey < 0 else spec.index + spec.lastkey,
                              spec.keystep)
                if spec.lastkey == 0:
                    self.single = spec.index

    def __repr__(self) -> str:
        return f"<CommandKeys {self.name}>"

    def check_arity(self, args: Sequence[bytes]) -> None:
        arity = self.arity
        if (len(args) != arity) if arity > 0 else (len(args) < -arity):
            raise BadInvocation(wrong_arity(self.name))

    def positions(self, args: Sequence[bytes], include_not_keys: bool = False) -> List[int]:
        """The indexes of ``args`` that are keys; [] for a command without keys (or EVAL with numkeys 0).

        ``include_not_keys`` counts the specs that name channels (SPUBLISH's).
        Raises :class:`BadInvocation` with Redis's error where Redis refuses
        the invocation before looking at a key.
        """
        self.check_arity(args)
        if self.fixed is not None:
            return list(self.fixed)
        found = self._by_specs(args, include_not_keys)
        if found is None:
            if self.procedure is None:
                raise BadInvocation(_SYNTAX)
            found = self.procedure(args)
        if not found and self.has_keys and not self.no_mandatory_keys:
            raise BadInvocation(refusal_without_keys(self.name, args))
        return found

    def _by_specs(self, args: Sequence[bytes], include_not_keys: bool) -> Optional[List[int]]:
        """Redis's getKeysUsingKeySpecs: the keys, or None where a spec cannot tell (the procedure decides).

        A numkeys the command refuses raises its error here (the spec before
        it, ZUNIONSTORE's destination, cannot fail).
        """
        argc = len(args)
        found: List[int] = []
        for spec in self.specs:
            if spec.not_key and not include_not_keys:
                continue
            first = spec.index if spec.begin == INDEX else spec.begin_at(args)
            if first < 0:
                return None
            if first == 0:
                continue   # its keyword is absent: no keys from this spec
            if spec.find == RANGE:
                if spec.lastkey >= 0:
                    last = first + spec.lastkey
                elif not spec.limit:
                    last = argc + spec.lastkey
                    if first == argc:
                        continue   # an open-ended range with nothing left: no keys (PFMERGE dest)
                else:
                    last = first + (_c_div(argc - first, spec.limit) + spec.lastkey)
            elif spec.find == KEYNUM:
                at = first + spec.keynumidx
                if at >= argc:
                    return None
                first += spec.firstkey
                if self.numkeys is not None:
                    count = self.numkeys.count(self.name, args[at], argc - first)
                else:
                    count = long_long(args[at])
                    if count is None or count < 0:
                        return None
                if count == 0:
                    continue   # EVAL's numkeys 0 (the commands that refuse 0 raised above)
                last = first + count - 1
            else:
                return None
            if last >= argc or last < first or first >= argc:
                return None
            found.extend(range(first, last + 1, spec.keystep))
            if spec.incomplete:
                return None
        return found


# -- the procedures Redis falls back on --------------------------------------


def first_key_only(args: Sequence[bytes]) -> List[int]:
    """SET, BITFIELD (specs whose flags vary) and SORT_RO (BY/GET patterns are not keys here): argv[1]."""
    return [1]


def sort_keys(args: Sequence[bytes]) -> List[int]:
    """Redis's sortGetKeys: the key, and the last STORE's destination (LIMIT, GET and BY values skipped)."""
    found = [1]
    store = 0
    skips = {b"limit": 2, b"get": 1, b"by": 1}
    i = 2
    while i < len(args):
        option = args[i].lower()
        if option in skips:
            i += skips[option]
        elif option == b"store" and i + 1 < len(args):
            store = i + 1   # not skipped: Redis's loop reads the destination as an option next
        i += 1
    if store:
        found.append(store)
    return found


def migrate_keys(args: Sequence[bytes]) -> List[int]:
    """Redis's migrateGetKeys: argv[3], or every argument after KEYS when argv[3] is empty."""
    first, count = 3, 1
    if len(args) > 6:
        skips = {b"copy": 0, b"replace": 0, b"auth": 1, b"auth2": 2}
        i = 6
        while i < len(args):
            option = args[i].lower()
            if option == b"keys":
                if args[3]:
                    return []
                first, count = i + 1, len(args) - i - 1
                break
            i += 1 + skips.get(option, 0)
    return list(range(first, first + count))


def georadius_keys(args: Sequence[bytes]) -> List[int]:
    """Redis's georadiusGetKeys: the key, and the last STORE/STOREDIST's destination."""
    store = 0
    i = 5
    while i < len(args):
        if args[i].lower() in (b"store", b"storedist") and i + 1 < len(args):
            store = i + 1
            i += 1
        i += 1
    return [1, store] if store else [1]


def _streams_at(args: Sequence[bytes]) -> int:
    """Redis's xreadGetKeys option walk: the index of the STREAMS option, or -1."""
    i = 1
    while i < len(args):
        option = args[i].lower()
        if option in (b"block", b"count"):
            i += 1
        elif option == b"group":
            i += 2
        elif option == b"streams":
            return i
        elif option != b"noack":
            return -1
        i += 1
    return -1


def xread_keys(args: Sequence[bytes]) -> List[int]:
    """Redis's xreadGetKeys: the first half of what follows STREAMS, when it is an even count."""
    at = _streams_at(args)
    count = len(args) - at - 1
    if at < 0 or count == 0 or count % 2:
        return []
    return list(range(at + 1, at + 1 + count // 2))


def xread_block_arguments(args: Sequence[bytes]) -> List[bytes]:
    """The values of XREAD/XREADGROUP's BLOCK options before STREAMS, as Redis's option walk reads them.

    The command blocks when there is one; the last one is its timeout
    (Redis reads every option before STREAMS, each BLOCK replacing the one
    before).  The walk stops at STREAMS or at an option Redis refuses (the
    server answers that syntax error itself).
    """
    group = args[0].lower() == b"xreadgroup"
    found: List[bytes] = []
    i = 1
    while i < len(args):
        option = args[i].lower()
        more = len(args) - i - 1
        if (option == b"block" or option == b"count") and more:
            if option == b"block":
                found.append(args[i + 1])
            i += 2
        elif option == b"group" and group and more >= 2:
            i += 3
        elif option == b"noack" and group:
            i += 1
        else:
            break   # STREAMS (the options end there), or a syntax error the server reports
    return found


def xread_blocks(args: Sequence[bytes]) -> bool:
    """Whether XREAD/XREADGROUP ``args`` ask to block: a BLOCK option before STREAMS, read as Redis reads them."""
    return bool(xread_block_arguments(args))


def refusal_without_keys(name: str, args: Sequence[bytes]) -> bytes:
    """What a keyed command whose keys cannot be found answers (XREAD's option errors; else a syntax error)."""
    if name == "migrate":
        return b"ERR When using MIGRATE KEYS option, the key argument must be set to the empty string"
    if name not in ("xread", "xreadgroup"):
        return _SYNTAX
    group = name == "xreadgroup"
    streams = has_group = False
    i = 1
    while i < len(args):
        option = args[i].lower()
        more = len(args) - i - 1
        if option == b"block" and more:
            timeout = long_long(args[i + 1])
            if timeout is None:
                return b"ERR timeout is not an integer or out of range"
            if timeout < 0:
                return b"ERR timeout is negative"
            i += 1
        elif option == b"count" and more:
            if long_long(args[i + 1]) is None:
                return _NOT_AN_INTEGER
            i += 1
        elif option == b"streams" and more:
            if (len(args) - i - 1) % 2:
                return b"ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' must be specified."
            streams = True
            break
        elif option == b"group" and more >= 2 and group:
            has_group = True
            i += 2
        elif option != b"noack" or not group:
            return _SYNTAX
        i += 1
    if streams and group and not has_group:
        return b"ERR Missing GROUP option for XREADGROUP"
    return _SYNTAX


PROCEDURES: Dict[str, Callable[[Sequence[bytes]], List[int]]] = {
    "set": first_key_only, "bitfield": first_key_only, "sort_ro": first_key_only, "sort": sort_keys,
    "migrate": migrate_keys, "georadius": georadius_keys, "georadiusbymember": georadius_keys,
    "xread": xread_keys, "xreadgroup": xread_keys,
}


# -- the table -----------------------------------------------------------------


def _build(table: Dict[str, Tuple]) -> Dict[bytes, CommandKeys]:
    commands: Dict[bytes, CommandKeys] = {}
    for name, (arity, flags, specs) in table.items():
        keys = CommandKeys(name, arity, flags, [KeySpec(*spec) for spec in specs])
        container, _, sub = name.partition("|")
        if sub:
            parent = commands[container.encode()]
            if parent.subcommands is None:
                parent.subcommands = {}
            parent.subcommands[sub.encode()] = keys
        else:
            commands[name.encode()] = keys
    return commands


# Every command Redis's generated table knows, by lower-case name; containers hold their subcommands.
TABLE: Dict[bytes, CommandKeys] = _build(COMMANDS)


def fixed_keys(name: str, arity: int, first: int, last: int, step: int) -> CommandKeys:
    """Key rules from hand-written (first, last, step) facts, for a command the generated table lacks."""
    spec = KeySpec(("RW",), (INDEX, first), (RANGE, last - first if last >= 0 else last, step, 0))
    return CommandKeys(name, arity, (), [spec])


def command_keys(args: Sequence[bytes], table: Optional[Dict[bytes, CommandKeys]] = None) -> CommandKeys:
    """The rules for ``args``'s command, or its subcommand's; BadInvocation for one Redis does not know."""
    keys = (TABLE if table is None else table).get(args[0].lower())
    if keys is None:
        raise BadInvocation(unknown_command(args))
    if keys.subcommands is not None and len(args) > 1:
        sub = keys.subcommands.get(args[1].lower())
        if sub is None:
            raise BadInvocation(unknown_subcommand(args))
        return sub
    return keys


def key_positions(args: Sequence[bytes], include_not_keys: bool = False) -> List[int]:
    """The indexes of the keys in ``args`` (a whole command, name first), as Redis 7's ``COMMAND GETKEYS``.

    [] for a command without keys.  Raises :class:`BadInvocation` with
    Redis's error where Redis refuses the invocation before it looks at a key.
    """
    return command_keys(args).positions(args, include_not_keys)
