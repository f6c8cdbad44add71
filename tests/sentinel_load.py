"""Client load through a Sentinel-mode proxy, and what the Sentinel tests read off it.

Used by tests/integration/test_sentinel_failover.py and test_sentinel_replicas.py.

- :class:`Load`: one redis-py client per thread, SETs of unique keys or GETs, every
  call recorded as a :class:`Call` (sent, done, outcome) on the monotonic clock;
  :func:`start_loads`, :func:`wait_reached`, :func:`stop_all` and the readers of
  the records (:func:`all_calls`, :func:`first_ack`, :func:`wait_for_ack`,
  :func:`summary`).
- :func:`holding`: which keys a server holds, read on it directly.
- :func:`stats_of` and :func:`shard_stats`: the proxy's stats port.
- :func:`writers`, :func:`populate` and :func:`wait_reads_reach`: loads and data
  on one shard of a pool file.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Set

import redis

from tests.proxy_clients import read_stats
from tests.sentinel_servers import ShardServer, keys_on
from tests.servers import wait_until

# The pool's defaults in these tests (pool_text): timeout 1000 ms, failover_hold 2000 ms.
TIMEOUT = 1.0
HOLD = 2.0
NO_HANG = TIMEOUT + HOLD + 1.0  # no client call may take longer (seconds)


# -- load: one client per thread, every call recorded ---------------------------------------


@dataclass(frozen=True)
class Call:
    key: str
    sent: float  # time.monotonic() just before the call
    done: float  # just after its reply (or error)
    outcome: str  # "ok", "error" (an exception) or "wrong" (a read with another value)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def seconds(self) -> float:
        return self.done - self.sent


_LOADS: List["Load"] = []  # every Load of the running test, stopped at its teardown


def stop_leftover_loads() -> None:
    """Stop every Load still running: a test that fails half-way must not leave its load threads
    running into the next one (the autouse ``_stop_loads`` of tests/integration/conftest.py calls
    this at every teardown)."""
    while _LOADS:
        load = _LOADS.pop()
        if load.is_alive():
            load.stop()


class Load(threading.Thread):
    """SETs of unique keys (value = key) or GETs of keys whose value is the key itself, one at a
    time through one client, paced by ``interval``; bounded by the number of keys (writes),
    ``max_seconds`` and ``stop()``."""

    def __init__(self, make_client: Callable, keys: Sequence[str], read: bool = False, interval: float = 0.005,
                 max_seconds: float = 60.0, name: str = "load") -> None:
        super().__init__(name=name, daemon=True)
        self._client = make_client()
        self._keys = list(keys)
        self._read = read
        self._interval = interval
        self._max_seconds = max_seconds
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._calls: List[Call] = []
        _LOADS.append(self)

    def run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        number = 0
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                if not self._read and number >= len(self._keys):
                    break
                key = self._keys[number % len(self._keys)]
                number += 1
                sent = time.monotonic()
                try:
                    if self._read:
                        value = self._client.get(key)
                        outcome, detail = ("ok", "") if value == key.encode() else ("wrong", repr(value))
                    else:
                        reply = self._client.set(key, key)
                        outcome, detail = ("ok", "") if reply is True else ("wrong", repr(reply))
                except redis.RedisError as err:
                    outcome, detail = "error", f"{type(err).__name__}: {err}"
                call = Call(key, sent, time.monotonic(), outcome, detail)
                with self._lock:
                    self._calls.append(call)
                self._stopping.wait(self._interval)
        finally:
            self._client.close()

    def stop(self) -> List[Call]:
        self._stopping.set()
        self.join(30)
        assert not self.is_alive(), f"{self.name} did not stop"
        return self.calls

    @property
    def calls(self) -> List[Call]:
        with self._lock:
            return list(self._calls)

    def acked(self) -> int:
        return sum(call.ok for call in self.calls)

    def reached(self, moment: float) -> bool:
        """Whether a call sent at or after ``moment`` has completed."""
        with self._lock:
            return bool(self._calls) and self._calls[-1].sent >= moment


def start_loads(loads: Iterable[Load], at_least: int = 20, timeout: float = 30.0) -> List[Load]:
    """Start the loads and wait until each has ``at_least`` acknowledged calls."""
    loads = list(loads)
    for load in loads:
        load.start()
    try:
        wait_until(lambda: all(load.acked() >= at_least for load in loads), timeout=timeout,
                   what=f"{at_least} acknowledged calls per load")
    except AssertionError as err:
        raise AssertionError(f"{err}; the last calls: {[summary(load.calls[-2:]) for load in loads]}") from None
    return loads


def wait_reached(loads: Sequence[Load], moment: float, timeout: float, what: str) -> None:
    wait_until(lambda: all(load.reached(moment) or not load.is_alive() for load in loads), timeout=timeout,
               interval=0.02, what=what)


def all_calls(loads: Iterable[Load]) -> List[Call]:
    return sorted((call for load in loads for call in load.calls), key=lambda call: call.sent)


def stop_all(loads: Sequence[Load]) -> List[Call]:
    for load in loads:
        load.stop()
    return all_calls(loads)


def first_ack(calls: Iterable[Call], sent_after: float) -> Optional[Call]:
    """The acknowledged call sent at or after ``sent_after`` that completed first."""
    return min((call for call in calls if call.ok and call.sent >= sent_after), key=lambda call: call.done,
               default=None)


def wait_for_ack(loads: Sequence[Load], after: float, timeout: float, process) -> float:
    """When the first write sent at or after ``after`` was acknowledged (waiting up to ``timeout``)."""
    try:
        call = wait_until(lambda: first_ack(all_calls(loads), after), timeout=timeout, interval=0.02,
                          what="a write to be acknowledged")
    except AssertionError as err:
        raise AssertionError(f"{err}; the last calls: {summary(all_calls(loads)[-3:])}\n"
                             f"proxy log:\n{process.output()}") from None
    return call.done


def holding(server: ShardServer, keys: Iterable[str]) -> Set[str]:
    """Which of ``keys`` ``server`` holds with their own name as value (MGET, read directly)."""
    keys = sorted(set(keys))
    found: Set[str] = set()
    client = server.client()
    try:
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            found.update(key for key, value in zip(chunk, client.mget(chunk)) if value == key.encode())
    finally:
        client.close()
    return found


def summary(calls: Sequence[Call], limit: int = 5) -> str:
    return "; ".join(f"{call.key} +{call.seconds:.2f}s {call.outcome} {call.detail}" for call in calls[:limit])


# -- the proxy's reports -------------------------------------------------------------------------


def stats_of(process) -> dict:
    return read_stats(process.bound_doc["stats"])


def shard_stats(process, name: str) -> dict:
    return stats_of(process)["alpha"][name]


def writers(client: Callable, text: str, count: int, prefix: str, per_writer: int = 8000,
            max_seconds: float = 60.0) -> List[Load]:
    """``count`` write loads over unique keys that the pool of ``text`` places on s1."""
    keys = keys_on(text, "s1", per_writer * count, prefix)
    return [Load(client, keys[number::count], max_seconds=max_seconds, name=f"{prefix}{number}")
            for number in range(count)]


def populate(client: Callable, text: str, name: str, count: int, prefix: str) -> List[str]:
    """``count`` keys of shard ``name`` written through the proxy (value = key)."""
    keys = keys_on(text, name, count, prefix)
    connection = client()
    try:
        for key in keys:
            assert connection.set(key, key) is True
    finally:
        connection.close()
    return keys


def wait_reads_reach(server: ShardServer, client: Callable, key: str, timeout: float = 10.0) -> None:
    """GET ``key`` through the proxy until ``server`` counts a GET (the proxy's replica checks may
    take a moment after start-up)."""
    connection = client()
    base = server.calls("get")
    try:
        wait_until(lambda: connection.get(key) == key.encode() and server.calls("get") > base, timeout=timeout,
                   interval=0.05, what=f"a GET through the proxy to reach {server}")
    finally:
        connection.close()


__all__ = ["HOLD", "NO_HANG", "TIMEOUT", "Call", "Load", "all_calls", "first_ack", "holding", "populate",
           "shard_stats", "start_loads", "stats_of", "stop_all", "stop_leftover_loads", "summary",
           "wait_for_ack", "wait_reached", "wait_reads_reach", "writers"]
