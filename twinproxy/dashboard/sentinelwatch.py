"""Sentinel's view of each group's master, for the web dashboard (docs/web-dashboard.md ``groups[].sentinel``).

Owns :class:`SentinelWatch`: every :data:`PERIOD` seconds, for each
sentinel of the topology (one command in flight per sentinel, each bounded
by the command timeout), ``SENTINEL MASTER <cluster>-<gid>`` for every
group (the name :class:`~twinproxy.dashboard.sentinels.SentinelAdmin`
monitors it under).  :func:`parse_answer` reduces one reply to the master's
``ip:port``, its config epoch and flags; :func:`merge` combines the
sentinels' answers about one group into the contract's ``sentinel`` object
(the master named with the highest epoch, and whether every sentinel that
answered names the topology's master) and the ``sentinel`` alerts (they
name another master than the topology's, or they disagree among
themselves).  When the master Sentinel names for a group changes between
two polls the watch adds a ``switch-master`` event to the log; a merge
whose epoch is lower than the highest one seen for the group (its sentinel
stopped answering) adds none.  A sentinel
that does not answer says nothing about the groups (the health poll's
"sentinel down" alert covers it).  Runs on the reactor, never blocking it.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer

from twinproxy.dashboard.servers import Poller, ServerAdmin, ServerError, split_address
from twinproxy.sentinel.replies import parse_master_fields

PERIOD = 2.0

Answer = Dict[str, Any]      # {"master": "ip:port"|None, "epoch": int|None, "flags": [..], "error": str|None}


def parse_answer(reply: Any) -> Answer:
    """One ``SENTINEL MASTER <name>`` reply (a flat field/value list or a map); ValueError when it is not one."""
    view = parse_master_fields(reply)
    if not view.host or view.port <= 0:
        raise ValueError("the SENTINEL MASTER reply has no ip/port")
    host = f"[{view.host}]" if ":" in view.host else view.host
    return {"master": f"{host}:{view.port}", "epoch": view.epoch, "flags": sorted(view.flags), "error": None}


def not_monitored(name: str) -> Answer:
    """A sentinel that answered it monitors no master of that name."""
    return {"master": None, "epoch": None, "flags": [], "error": f"does not monitor {name}"}


def same_address(one: Optional[str], other: Optional[str]) -> bool:
    """``host:port`` equality with IP addresses compared as addresses (``::1`` and ``[::1]``)."""
    if one is None or other is None:
        return False
    try:
        (h1, p1), (h2, p2) = split_address(one), split_address(other)
    except ValueError:
        return one == other
    if p1 != p2:
        return False
    try:
        return ipaddress.ip_address(h1) == ipaddress.ip_address(h2)
    except ValueError:
        return h1 == h2


def merge(gid: int, name: str, expected: Optional[str], answers: Dict[str, Answer]
          ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(the contract's ``sentinel`` object, the ``sentinel`` alerts) of one group.

    ``expected``: the topology's master as an ``ip:port`` (resolved by the
    caller) or None; ``answers``: sentinel address -> what it answered about
    ``name`` (sentinels that did not answer left out).
    """
    if not answers:
        return {"master": None, "epoch": None, "agrees": False}, []
    order = sorted(answers)
    # The most recent configuration wins: the highest epoch (ties: the first sentinel in address order).
    best = max(order, key=lambda s: (answers[s]["epoch"] if answers[s]["epoch"] is not None else -1,
                                     -order.index(s)))
    document = {"master": answers[best]["master"], "epoch": answers[best]["epoch"],
                "agrees": expected is not None and all(same_address(answers[s]["master"], expected)
                                                       for s in order)}
    found: List[Dict[str, Any]] = []
    subject = f"group {gid}"
    shown_expected = expected or "none"
    distinct: List[Optional[str]] = []
    for s in order:
        master = answers[s]["master"]
        if not any(master == seen or same_address(master, seen) for seen in distinct):
            distinct.append(master)
    if len(distinct) > 1:
        said = ", ".join(f"{s} names {answers[s]['master'] or 'no master'}"
                         + (f" (epoch {answers[s]['epoch']})" if answers[s]["epoch"] is not None else "")
                         for s in order)
        found.append({"kind": "sentinel", "subject": subject,
                      "text": f"sentinels disagree on the master of group {gid} ({name}): {said}; "
                              f"the topology's master is {shown_expected}"})
    elif not document["agrees"]:
        found.append({"kind": "sentinel", "subject": subject,
                      "text": f"sentinels name {distinct[0] or 'no master'} for group {gid} ({name}), "
                              f"the topology's master is {shown_expected}"})
    down = sorted(s for s in order if {"s_down", "o_down"} & set(answers[s]["flags"]))
    if down:
        found.append({"kind": "sentinel", "subject": subject,
                      "text": f"the master of group {gid} ({name}) is down for sentinel {', '.join(down)}"})
    return document, found


class SentinelWatch(Poller):
    """``answers[sentinel][gid]``: what each sentinel of ``sentinels()`` last said about each group of ``groups()``.

    ``groups()`` gives (gid, topology master address or None) pairs; ``name(gid)`` the Sentinel name;
    ``event(kind, subject, text, **extra)`` records an event (EventLog.add).
    """

    _what = "sentinel watch poll"

    def __init__(self, reactor: Any, sentinels: Callable[[], Sequence[str]],
                 groups: Callable[[], Sequence[Tuple[int, Optional[str]]]], name: Callable[[int], str],
                 timeout: float, event: Optional[Callable[..., Any]] = None, period: float = PERIOD,
                 admin: Optional[ServerAdmin] = None) -> None:
        super().__init__(reactor, period, admin if admin is not None else ServerAdmin(reactor, timeout))
        self._stopped = True
        self._sentinels = sentinels
        self._groups = groups
        self._name = name
        self._event = event
        self._timeout = timeout
        self._busy: Dict[str, defer.Deferred] = {}
        self._ips: Dict[str, str] = {}          # host -> its IP, for comparing with what Sentinel names
        self._resolving: Dict[str, defer.Deferred] = {}
        self._masters: Dict[int, str] = {}      # gid -> the master Sentinel named at the last merge
        # gid -> the highest config epoch a merge gave: when the sentinel that named it stops answering,
        # a lower-epoch sentinel's older master is no switch.
        self._epochs: Dict[int, int] = {}
        self.answers: Dict[str, Dict[int, Answer]] = {}

    # -- life ---------------------------------------------------------------------

    # -- polling ------------------------------------------------------------------

    def poll(self) -> None:
        """Start a round on every sentinel not still answering the last one."""
        sentinels = set(self._sentinels())
        for gone in [s for s in self.answers if s not in sentinels]:
            del self.answers[gone]
        self._admin.forget(sentinels)
        groups = list(self._groups())
        gids = {gid for gid, _ in groups}
        for gone in [gid for gid in self._masters if gid not in gids]:
            del self._masters[gone]
        for gone in [gid for gid in self._epochs if gid not in gids]:
            del self._epochs[gone]
        for _, master in groups:
            if master is not None:
                self._resolve(split_address(master)[0])
        for sentinel in sorted(sentinels):
            if sentinel not in self._busy:
                pending = self._poll_one(sentinel, [gid for gid, _ in groups])
                if not pending.called:
                    self._busy[sentinel] = pending

    def _resolve(self, host: str) -> None:
        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            pass
        if host in self._resolving:
            return
        # Bounded: one try of at most the command timeout.
        pending = self._reactor.resolve(host, timeout=(max(1, int(self._timeout)),))
        self._resolving[host] = pending

        def done(ip: Any) -> None:
            self._ips[host] = ip

        def failed(_: Any) -> None:
            self._ips.pop(host, None)

        def ended(_: Any) -> None:
            self._resolving.pop(host, None)

        pending.addCallbacks(done, failed).addBoth(ended)

    @defer.inlineCallbacks
    def _poll_one(self, sentinel: str, gids: List[int]) -> Any:
        found: Dict[int, Answer] = {}
        try:
            for gid in gids:
                name = self._name(gid)
                try:
                    reply = yield self._admin.command(sentinel, b"SENTINEL", b"MASTER", name.encode())
                    found[gid] = parse_answer(reply)
                except ServerError as err:
                    if "no such master" not in str(err).lower():
                        raise
                    found[gid] = not_monitored(name)
        except (ServerError, ValueError) as err:
            self.answers.pop(sentinel, None)
            self._log.debug("sentinel {sentinel}: {error}", sentinel=sentinel, error=str(err))
            return
        finally:
            self._busy.pop(sentinel, None)
        if self._stopped or sentinel not in set(self._sentinels()):
            return
        self.answers[sentinel] = found
        self._follow()

    # -- what it says -------------------------------------------------------------

    def expected(self, master: Optional[str]) -> Optional[str]:
        """The topology's master as Sentinel would name it (its host resolved when it is known)."""
        if master is None:
            return None
        host, port = split_address(master)
        ip = self._ips.get(host)
        if ip is None:
            return master
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def group(self, gid: int, master: Optional[str]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """The ``sentinel`` object and alerts of group ``gid`` (whose topology master is ``master``)."""
        answers = {s: by_gid[gid] for s, by_gid in self.answers.items() if gid in by_gid}
        return merge(gid, self._name(gid), self.expected(master), answers)

    def _follow(self) -> None:
        """A ``switch-master`` event for every group whose Sentinel master changed since the last merge."""
        for gid, master in self._groups():
            document, _ = self.group(gid, master)
            new = document["master"]
            if new is None:
                continue
            epoch = document["epoch"]
            highest = self._epochs.get(gid)
            if highest is not None and (epoch is None or epoch < highest):
                continue   # an older configuration than one already seen: not a switch back
            if epoch is not None:
                self._epochs[gid] = epoch
            old = self._masters.get(gid)
            self._masters[gid] = new
            if old is not None and old != new and self._event is not None:
                self._event("switch-master", f"group {gid}",
                            f"group {gid}: Sentinel names {new} as master (epoch {document['epoch']}), "
                            f"was {old}", group=gid, old=old, new=new, epoch=document["epoch"], source="sentinel")
