"""The dashboard API's input: request bodies, path segments and query strings, each checked.

Owns :class:`ApiError` (a refusal the API makes itself), :func:`read_body`
(at most :data:`MAX_BODY` bytes of a JSON object), :func:`body_fields`
(exactly an operation's documented fields, each checked with the topology
model's own rules) and the path and query parsers.  No Twisted.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, Callable, Dict, Optional, Tuple

from twinproxy.cluster.migrations import check_parallel, check_rate, check_warmup
from twinproxy.cluster.model import TopologyError, check_address, check_group_id
from twinproxy.cluster.slots import SLOT_COUNT

MAX_BODY = 64 * 1024
_DIGITS = re.compile(r"^[0-9]{1,9}$")

class ApiError(Exception):
    """A refusal made by the API itself: HTTP ``status``, one-line ``message``, extra headers."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class BoundedBody(io.BytesIO):
    """A request body kept in memory up to ``limit`` bytes; past that only ``too_large`` is remembered."""

    def __init__(self, limit: int, declared: Optional[int]) -> None:
        super().__init__()
        self.limit = limit
        self.too_large = declared is not None and declared > limit

    def write(self, data: Any) -> int:
        if not self.too_large and self.tell() + len(data) > self.limit:
            self.too_large = True
        if self.too_large:
            return len(data)   # dropped: the answer is 413 whatever the rest says
        return super().write(data)


def read_body(request: Any) -> Dict[str, Any]:
    """The request's JSON object ({} for an empty body); ApiError 400/413 otherwise."""
    content = getattr(request, "content", None)
    if content is None:
        return {}
    if getattr(content, "too_large", False):
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    content.seek(0)
    data = content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    if not data.strip():
        return {}
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ApiError(400, f"the request body is not JSON: {err}")
    if not isinstance(document, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(document).__name__}")
    return document


def _check(check: Callable[[Any], Any], value: Any, what: str) -> Any:
    try:
        return check(value)
    except TopologyError as err:
        raise ApiError(400, f"{what}: {err.message}")


def _slot(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SLOT_COUNT:
        raise TopologyError(f"a slot is an integer from 0 to {SLOT_COUNT - 1}, not {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TopologyError(f"must be true or false, not {value!r}")
    return value


def _group_or_null(value: Any) -> Optional[int]:
    return None if value is None else check_group_id(value)


# field name -> (required, check)
_FIELDS: Dict[str, Dict[str, Tuple[bool, Callable[[Any], Any]]]] = {
    "add_group": {"id": (True, check_group_id)},
    "add_server": {"addr": (True, check_address)},
    "promote": {"addr": (True, check_address)},
    "assign_slots": {"first": (True, _slot), "last": (True, _slot), "group": (True, _group_or_null),
                     "force": (False, _flag)},
    "rebalance": {"dry_run": (False, _flag), "keys_per_second": (False, check_rate),
                  "parallel": (False, check_parallel)},
    "add_sentinel": {"addr": (True, check_address)},
    "migrate": {"first": (True, _slot), "last": (True, _slot), "group": (True, check_group_id),
                "keys_per_second": (False, check_rate), "parallel": (False, check_parallel),
                "warmup_seconds": (False, check_warmup)},
    "migration_action": {},
    "remove_proxy": {"force": (False, _flag)},
    "throttle": {"keys_per_second": (True, check_rate)},
}


def body_fields(request: Any, operation: str) -> Dict[str, Any]:
    """The body of ``operation``'s request, checked: exactly its fields, each valid; ApiError 400."""
    document = read_body(request)
    fields = _FIELDS[operation]
    unknown = sorted(set(document) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} in the request body (expected: {', '.join(fields)})")
    values: Dict[str, Any] = {}
    for name, (required, check) in fields.items():
        if name not in document:
            if required:
                raise ApiError(400, f"the request body needs the field {name!r} (fields: {', '.join(fields)})")
            continue
        values[name] = _check(check, document[name], f"field {name!r}")
    return values


def path_group(text: str) -> int:
    """A group id from the path; ApiError 400 unless it is one."""
    if not _DIGITS.match(text):
        raise ApiError(400, f"group id {text!r} in the path is not a number")
    return _check(check_group_id, int(text), "the path")


def path_migration(text: str) -> int:
    """A migration id from the path; ApiError 400 unless it is one."""
    if not _DIGITS.match(text) or int(text) < 1:
        raise ApiError(400, f"migration id {text!r} in the path is not a positive number")
    return int(text)


def path_address(text: str) -> str:
    return _check(check_address, text, "the path")


def query_args(request: Any, known: Tuple[str, ...]) -> Dict[str, str]:
    """The query parameters (the last value of each, decoded); ApiError 400 for one not in ``known``."""
    values: Dict[str, str] = {}
    for raw, items in (getattr(request, "args", None) or {}).items():
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if name not in known:
            raise ApiError(400, f"unknown query parameter {name!r}"
                           + (f" (known: {', '.join(known)})" if known else " (this request takes none)"))
        value = items[-1] if items else b""
        values[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return values


def query_int(values: Dict[str, str], name: str, default: int) -> int:
    text = values.get(name)
    if text is None:
        return default
    if not re.match(r"^-?[0-9]{1,9}$", text):
        raise ApiError(400, f"query parameter {name} must be an integer, not {text!r}")
    return int(text)


def query_flag(values: Dict[str, str], name: str) -> bool:
    text = values.get(name, "0").lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ApiError(400, f"query parameter {name} must be 1 or 0, not {text!r}")


# -- routes --------------------------------------------------------------------

# (path pattern, {method: handler name}); "{...}" matches one path segment.
