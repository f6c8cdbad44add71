"""The file store's on-disk layout and its blocking reads and writes (no Twisted).

Owns the directory format, shared by the Twisted backend (``file.py``, which
runs the writes in a thread) and ``BlockingDirectory``::

    <root>/data.lck            writers' lock (flock LOCK_EX around every write); holds the revision counter
    <root>/nodes/<name>        one file per node; <name> is the path without its leading / and
                               percent-encoded ('/' is %2F): clusters%2Fshop%2Ftopology
    <root>/sessions/<id>.lck   one per live session, flock'd LOCK_EX by the owning process for its life
    <root>/tmp/                files being written, renamed into nodes/ (or sessions/) when complete

A node file is one JSON header line, ``{"version": N, "session": "<id>" or null}``,
then the value's bytes.  Writes go to tmp/, are fsync'd and renamed over the
node file (a rename is atomic: readers never see half a file), all under the
writers' lock, so a compare-and-set compares what is really there.  The
version is a revision counter kept in data.lck (and never below the node's
previous version + 1), so a path deleted and made again never reuses a version.

An ephemeral's header names its session.  The kernel drops the session's
flock when the owner process dies, however it dies; everyone then treats the
node as absent (a reader that can take LOCK_SH on the session file knows it
is dead), and the next writer or ``reap`` deletes it.  A session file is
locked before it is renamed into sessions/, so nobody can see it unlocked
while it lives.  One host only: flocks do not fence across machines.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import select
import socket
import time
import uuid
from typing import Dict, Optional, Set
from urllib.parse import quote, unquote

from twinproxy.coordinator import Conflict, NotFound, Unavailable, check_path

_SAFE = "-_.~:@+=,!*()'$&;"
LOCK_RETRY = 0.002


@dataclasses.dataclass(frozen=True)
class Record:
    value: bytes
    version: int
    session: Optional[str]


def node_name(path: str) -> str:
    """The file name of node ``path`` in nodes/."""
    return quote(path[1:], safe=_SAFE)


def node_path(name: str) -> Optional[str]:
    """The node path a nodes/ file name stands for (None for a stray file)."""
    path = "/" + unquote(name)
    try:
        return check_path(path)
    except ValueError:
        return None


class FileStore:
    """The store in ``root``; ``url`` is only for messages."""

    def __init__(self, root: str, url: str) -> None:
        self.root = root
        self.url = url
        self.nodes = os.path.join(root, "nodes")
        self.sessions = os.path.join(root, "sessions")
        self.tmp = os.path.join(root, "tmp")
        self.lock_path = os.path.join(root, "data.lck")
        self._own: Dict[str, int] = {}  # session id -> the fd holding its flock

    def ensure(self) -> None:
        for directory in (self.nodes, self.sessions, self.tmp):
            os.makedirs(directory, exist_ok=True)

    # -- reading (never takes the writers' lock) --------------------------------

    def read(self, path: str, dead: Optional[Set[str]] = None) -> Optional[Record]:
        """The live record at ``path``; a dead owner's ephemeral is None (and its path added to ``dead``)."""
        record = self._read_file(os.path.join(self.nodes, node_name(path)))
        if record is not None and record.session is not None and not self.alive(record.session):
            if dead is not None:
                dead.add(path)
            return None
        return record

    def under(self, parent: str, dead: Optional[Set[str]] = None) -> Dict[str, Record]:
        """Every live record below ``parent`` (any depth), by path."""
        prefix = "/" if parent == "/" else parent + "/"
        found: Dict[str, Record] = {}
        liveness: Dict[str, bool] = {}
        try:
            names = os.listdir(self.nodes)
        except FileNotFoundError:
            return found
        for name in names:
            path = node_path(name)
            if path is None or not path.startswith(prefix):
                continue
            record = self._read_file(os.path.join(self.nodes, name))
            if record is None:
                continue
            if record.session is not None:
                if record.session not in liveness:
                    liveness[record.session] = self.alive(record.session)
                if not liveness[record.session]:
                    if dead is not None:
                        dead.add(path)
                    continue
            found[path] = record
        return found

    def owner(self, path: str) -> Optional[str]:
        """The session an ephemeral at ``path`` belongs to, dead or alive (None: persistent or absent)."""
        record = self._read_file(os.path.join(self.nodes, node_name(path)))
        return None if record is None else record.session

    def alive(self, session: str) -> bool:
        """Whether the session's owner still holds its flock."""
        if session in self._own:
            return True
        try:
            fd = os.open(os.path.join(self.sessions, f"{session}.lck"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and with it the shared lock just taken, if it was
        return False

    def _read_file(self, file_path: str) -> Optional[Record]:
        try:
            with open(file_path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        header, newline, value = data.partition(b"\n")
        try:
            meta = json.loads(header)
            return Record(value, int(meta["version"]), meta.get("session"))
        except (ValueError, KeyError, TypeError):
            # Only a hand-edited or foreign file can look like this: written ones are whole.
            return None

    # -- sessions ----------------------------------------------------------------

    def open_session(self) -> str:
        """A new session id, its lock held by this process until ``close_session`` (or death)."""
        session = uuid.uuid4().hex
        staging = os.path.join(self.tmp, f"{session}.lck")
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "start": time.time()}).encode() + b"\n")
            os.rename(staging, os.path.join(self.sessions, f"{session}.lck"))
        except BaseException:
            os.close(fd)
            raise
        self._own[session] = fd
        return session

    def close_session(self, session: str, deadline: float) -> None:
        """Delete the session's ephemerals, then let its lock go."""
        try:
            with self._locked("stop", "/", deadline):
                for path, record in self.under("/").items():
                    if record.session == session:
                        _unlink(os.path.join(self.nodes, node_name(path)))
        finally:
            fd = self._own.pop(session, None)
            _unlink(os.path.join(self.sessions, f"{session}.lck"))
            if fd is not None:
                os.close(fd)

    # -- writing (under the writers' lock) ---------------------------------------

    def create(self, path: str, value: bytes, session: Optional[str], deadline: float,
               operation: str = "create") -> int:
        with self._locked(operation, path, deadline) as lock:
            current = self.read(path)
            if current is not None:
                owner = "another live session holds it" if current.session else "it exists"
                raise Conflict(self.url, operation, path, owner)
            return self._write(lock, path, value, session, self._previous_version(path))

    def set(self, path: str, value: bytes, version: Optional[int], deadline: float,
            operation: str = "set") -> int:
        with self._locked(operation, path, deadline) as lock:
            current = self.read(path)
            if current is None:
                raise NotFound(self.url, operation, path, "no such node")
            if version is not None and current.version != version:
                raise Conflict(self.url, operation, path, f"version is {current.version}, not {version}")
            # An ephemeral stays one, bound to its session.
            return self._write(lock, path, value, current.session, current.version)

    def delete(self, path: str, version: Optional[int], deadline: float) -> None:
        with self._locked("delete", path, deadline):
            current = self.read(path)
            if current is None:
                raise NotFound(self.url, "delete", path, "no such node")
            if version is not None and current.version != version:
                raise Conflict(self.url, "delete", path, f"version is {current.version}, not {version}")
            _unlink(os.path.join(self.nodes, node_name(path)))
            self._sync_directory(self.nodes)

    def reap(self, deadline: float) -> int:
        """Delete dead owners' ephemerals and session files; how many nodes went."""
        with self._locked("reap", "/", deadline):
            dead: Set[str] = set()
            self.under("/", dead)
            for path in dead:
                _unlink(os.path.join(self.nodes, node_name(path)))
            for name in os.listdir(self.sessions):
                session = name[:-4] if name.endswith(".lck") else None
                if session and not self.alive(session):
                    _unlink(os.path.join(self.sessions, name))
            return len(dead)

    def _previous_version(self, path: str) -> int:
        record = self._read_file(os.path.join(self.nodes, node_name(path)))  # a dead ephemeral counts here
        return record.version if record is not None else 0

    def _write(self, lock: int, path: str, value: bytes, session: Optional[str], previous: int) -> int:
        counter = os.pread(lock, 32, 0).strip()
        version = max(int(counter) if counter.isdigit() else 0, previous) + 1
        header = json.dumps({"version": version, "session": session}).encode()
        staging = os.path.join(self.tmp, uuid.uuid4().hex)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, header + b"\n" + value)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(staging, os.path.join(self.nodes, node_name(path)))
        self._sync_directory(self.nodes)
        os.ftruncate(lock, 0)
        os.pwrite(lock, str(version).encode(), 0)
        return version

    @staticmethod
    def _sync_directory(directory: str) -> None:
        """The rename (or unlink) itself is durable only once its directory is synced."""
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    class _Lock:
        def __init__(self, store: "FileStore", operation: str, path: str, deadline: float) -> None:
            self.store, self.operation, self.path, self.deadline = store, operation, path, deadline
            self.fd = -1

        def __enter__(self) -> int:
            self.fd = os.open(self.store.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return self.fd
                except BlockingIOError:
                    if time.monotonic() >= self.deadline:
                        os.close(self.fd)
                        raise Unavailable(self.store.url, self.operation, self.path,
                                          f"{self.store.lock_path} stayed locked by another writer")
                    # A writer holds it for one fsync'd write: poll briefly (flock has no timeout).
                    select.select([], [], [], LOCK_RETRY)

        def __exit__(self, *exc_info: object) -> None:
            os.close(self.fd)

    def _locked(self, operation: str, path: str, deadline: float) -> "FileStore._Lock":
        return FileStore._Lock(self, operation, path, deadline)


def _unlink(file_path: str) -> None:
    try:
        os.unlink(file_path)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise


__all__ = ["FileStore", "Record", "node_name", "node_path"]
