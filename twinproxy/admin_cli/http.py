"""The admin CLI's HTTP side: one JSON request to the dashboard, blocking (urllib), with a deadline.

Owns :class:`DashboardClient` (``request(method, path, body) -> document``
for a 2xx answer), :class:`Refused` (the dashboard answered with an error:
its status, its ``{"error": ...}`` body) and :class:`Unreachable` (no
dashboard answered: refused, timed out, not HTTP, not JSON), which the CLI
turns into exit statuses 1 and 3.  Proxies from the environment are never
used: the dashboard is named by address.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any, Dict, Optional
from urllib.parse import quote, urlencode

MAX_ANSWER = 16 * 1024 * 1024


class Unreachable(Exception):
    """No dashboard answered at the address (the reason is one line)."""


class Refused(Exception):
    """The dashboard answered ``status`` with ``body`` (``body["error"]`` says why)."""

    def __init__(self, status: int, body: Dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(body.get("error") or f"HTTP {status}")

    @property
    def message(self) -> str:
        return str(self)


def base_url(dashboard: str) -> str:
    """``http://HOST:PORT`` from ``HOST:PORT`` or an ``http://`` URL; ValueError for anything else."""
    text = dashboard.strip().rstrip("/")
    if text.startswith("http://"):
        text = text[len("http://"):]
    elif "://" in text:
        raise ValueError(f"--dashboard {dashboard!r}: the dashboard speaks plain http:// (HOST:PORT)")
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--dashboard {dashboard!r} is not HOST:PORT (e.g. 127.0.0.1:18080)")
    return f"http://{text}"


def segment(value: Any) -> str:
    """One path segment, quoted (an address's ':' and '.' stay; '/', '[', ']' are escaped)."""
    return quote(str(value), safe=":@-._~")


class DashboardClient:
    """Requests to one dashboard; ``token`` is sent as ``Authorization: Bearer`` with every write."""

    def __init__(self, dashboard: str, token: Optional[str] = None, timeout: float = 60.0) -> None:
        self.base = base_url(dashboard)
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, query: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return self.request("GET", path, query=query)

    def request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
                query: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The answer's JSON object (2xx); Refused for an error answer, Unreachable for no answer."""
        url = self.base + path + (f"?{urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None and method != "GET":
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                return self._document(answer.status, answer.read(MAX_ANSWER + 1))
        except urllib.error.HTTPError as err:
            with err:
                document = self._document(err.code, err.read(MAX_ANSWER + 1))
            raise Refused(err.code, document)
        except urllib.error.URLError as err:
            raise Unreachable(f"cannot reach the dashboard at {self.base}: {_reason(err.reason)}")
        except (socket.timeout, TimeoutError):
            raise Unreachable(f"the dashboard at {self.base} did not answer within {self.timeout:g}s")
        except (HTTPException, OSError) as err:
            raise Unreachable(f"the dashboard at {self.base} broke off the answer: {_reason(err)}")

    def _document(self, status: int, data: bytes) -> Dict[str, Any]:
        if len(data) > MAX_ANSWER:
            raise Unreachable(f"the answer from {self.base} is larger than {MAX_ANSWER} bytes")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            shown = data[:80].decode("utf-8", "replace").strip()
            raise Unreachable(f"the answer from {self.base} (HTTP {status}) is not the dashboard's JSON: "
                              f"{shown!r}")
        if not isinstance(document, dict):
            raise Unreachable(f"the answer from {self.base} (HTTP {status}) is not a JSON object")
        return document


def _reason(reason: Any) -> str:
    if isinstance(reason, socket.timeout) or isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
