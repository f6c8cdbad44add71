"""A stand-in for the frontend's session, for codec tests: the Session protocol, in memory."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

from twinproxy.protocols import REPLY_ON
from twinproxy.request import Request, profile_of


class FakeSession:
    """What a codec may read and change of a client, recording what the codec asked of it."""

    subscriptions = 0
    pattern_subscriptions = 0
    shard_subscriptions = 0

    def __init__(self, authenticated: bool = True, client_id: int = 7, requires_auth: bool = False,
                 address: Tuple[str, str, bool] = ("127.0.0.1:50000", "127.0.0.1:6379", False),
                 facts: Tuple[int, int, int, int] = (9, 12, 3, 0), in_cluster: bool = False) -> None:
        self.client_id = client_id
        self.in_cluster = in_cluster
        self.authenticated = authenticated
        self.requires_auth = requires_auth
        self.dialect = 2
        self.db = 0
        self.profile = profile_of(2)
        self.client_name: Optional[bytes] = None
        self.last_command = "NULL"
        self.reply_modes: List[Tuple[Request, int]] = []
        self.killed = False
        self.resets = 0
        self.others: List["FakeSession"] = []
        self.prepare = None
        self.transaction = None
        self.watch_pin = None
        self.mode = None
        self.watches_ended = 0
        self._address = address
        self._facts = facts

    def end_watch(self) -> None:
        self.watches_ended += 1

    def drop_watch(self) -> None:
        self.watch_pin = None
        self.watches_ended += 1

    def use(self, dialect: int, db: int) -> None:
        self.dialect = dialect
        self.db = db
        self.profile = profile_of(dialect, db)

    def reset(self, request: Request) -> None:
        self.use(2, 0)
        self.client_name = None
        self.authenticated = not self.requires_auth
        self.set_reply_mode(request, REPLY_ON)
        self.resets += 1

    def set_reply_mode(self, request: Request, mode: int) -> None:
        self.reply_modes.append((request, mode))

    def peers(self) -> Iterable["FakeSession"]:
        return [self, *self.others]

    def kill(self) -> None:
        self.killed = True

    def addresses(self) -> Tuple[str, str, bool]:
        return self._address

    def facts(self) -> Tuple[int, int, int, int]:
        return self._facts
