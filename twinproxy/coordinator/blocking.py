"""A blocking, read-only view of a coordinator for applications (no Twisted, no reactor).

Owns: :class:`BlockingDirectory` — ``children(path)`` (the live children's
values) and ``get(path)``, each bounded by the URL's ``timeout``, failing with
CoordinatorError subclasses whose message names the URL, the operation and
the path.  ZooKeeper through kazoo's blocking API (one session, opened on
first use; kazoo reconnects by itself), etcd through urllib on the v3 JSON
gateway (each endpoint in turn), the file store by reading its directory
(a dead owner's ephemerals are left out).  Safe to share between threads.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

from twinproxy.coordinator import Node, NotFound, Unavailable, check_path, direct_children, parse_url
from twinproxy.coordinator.etcd_keys import b64, prefix_end, unb64


class BlockingDirectory:
    """Reads from the coordinator at ``url``; ``close()`` when done (or use it as a context manager)."""

    def __init__(self, url: str) -> None:
        self.parsed = parse_url(url)
        self.url = self.parsed.display
        self.timeout = self.parsed.timeout
        self._lock = threading.Lock()
        self._zk: Any = None
        self._token: Optional[str] = None
        self._endpoint = 0
        self._store: Any = None
        if self.parsed.scheme == "file":
            from twinproxy.coordinator.filestore import FileStore

            self._store = FileStore(self.parsed.root, self.url)

    def __enter__(self) -> "BlockingDirectory":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def children(self, path: str) -> Dict[str, bytes]:
        """The live direct children of ``path``: name -> value ({} when none)."""
        check_path(path, allow_root=True)
        if self._store is not None:
            records = self._store.under(path)
            nodes = {child: Node(record.value, 0) for child, record in records.items()}
            return {name: node.value for name, node in direct_children(path, nodes).items()}
        if self.parsed.scheme == "etcd":
            key = (self.parsed.root + ("" if path == "/" else path) + "/").encode()
            answer = self._etcd("children", path, "kv/range", {"key": b64(key), "range_end": b64(prefix_end(key))})
            nodes = {}
            for kv in answer.get("kvs", []):
                child = unb64(kv["key"])[len(self.parsed.root):].decode("utf-8", "replace")
                nodes[child] = Node(unb64(kv.get("value")), 0)
            return {name: node.value for name, node in direct_children(path, nodes).items()}
        return self._zk_children(path)

    def get(self, path: str) -> Optional[bytes]:
        """The value at ``path``, or None."""
        check_path(path)
        if self._store is not None:
            record = self._store.read(path)
            return None if record is None else record.value
        if self.parsed.scheme == "etcd":
            answer = self._etcd("get", path, "kv/range", {"key": b64((self.parsed.root + path).encode())})
            kvs = answer.get("kvs")
            return unb64(kvs[0].get("value")) if kvs else None
        client = self._zk_client("get", path)
        try:
            return self._zk_wait("get", path, client.get_async(self.parsed.root + path))[0] or b""
        except NotFound:
            return None

    def close(self) -> None:
        with self._lock:
            client, self._zk = self._zk, None
        if client is not None:
            client.stop()
            client.close()

    # -- etcd ----------------------------------------------------------------

    def _etcd(self, operation: str, path: str, api: str, body: Dict[str, Any]) -> Dict[str, Any]:
        hosts = self.parsed.hosts
        last = "no endpoint"
        for _ in range(len(hosts)):
            host, port = hosts[self._endpoint % len(hosts)]
            base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            try:
                if self.parsed.username and self._token is None:
                    self._token = self._post(base, "auth/authenticate", {
                        "name": self.parsed.username, "password": self.parsed.password}).get("token")
                return self._post(base, api, body)
            except urllib.error.HTTPError as err:
                detail = _http_error(err)
                if err.code == 401 and self._token is not None:
                    self._token = None  # expired: fetched again next time
                last = f"etcd at {base}: HTTP {err.code}: {detail}"
                if err.code < 500:
                    break
            except (OSError, ValueError) as err:
                last = f"etcd at {base}: {err}"
            self._endpoint += 1
        raise Unavailable(self.url, operation, path, last)

    def _post(self, base: str, api: str, body: Dict[str, Any]) -> Dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        request = urllib.request.Request(f"{base}/v3/{api}", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    # -- ZooKeeper -------------------------------------------------------------

    def _zk_client(self, operation: str, path: str) -> Any:
        with self._lock:
            if self._zk is not None:
                return self._zk
            from kazoo.client import KazooClient

            auth = [("digest", f"{self.parsed.username}:{self.parsed.password}")] if self.parsed.username else []
            client = KazooClient(hosts=self.parsed.host_list, timeout=self.parsed.session_timeout, auth_data=auth,
                                 connection_retry={"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0})
            try:
                client.start(timeout=self.timeout)
            except Exception as err:  # noqa: BLE001 - kazoo's timeout, or a refused connection
                client.stop()
                client.close()
                raise Unavailable(self.url, operation, path, f"no ZooKeeper session: {type(err).__name__} {err}")
            self._zk = client
            return client

    def _zk_wait(self, operation: str, path: str, async_result: Any) -> Any:
        try:
            return async_result.get(timeout=self.timeout)
        except Exception as err:  # noqa: BLE001 - kazoo's exceptions, translated
            name = type(err).__name__
            if name == "NoNodeError":
                raise NotFound(self.url, operation, path, "no such node")
            raise Unavailable(self.url, operation, path, f"{name} {err}".strip())

    def _zk_children(self, path: str) -> Dict[str, bytes]:
        client = self._zk_client("children", path)
        full = (self.parsed.root + ("" if path == "/" else path)) or "/"
        try:
            names = self._zk_wait("children", path, client.get_children_async(full))
        except NotFound:
            return {}
        pending = {name: client.get_async(full.rstrip("/") + "/" + name) for name in names}
        found: Dict[str, bytes] = {}
        for name, result in pending.items():
            try:
                found[name] = self._zk_wait("children", path, result)[0] or b""
            except NotFound:  # gone meanwhile
                continue
        return found


def _http_error(err: "urllib.error.HTTPError") -> str:
    try:
        answer = json.loads(err.read())
        return str(answer.get("message") or answer.get("error"))
    except (ValueError, OSError, AttributeError):
        return err.reason if isinstance(err.reason, str) else str(err)
