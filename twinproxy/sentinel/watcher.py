"""Where each shard's master is, as a majority of sentinels says: one watcher per pool.

Owns: :class:`SentinelWatcher` — a query connection and an event
subscription per configured sentinel, and discovery: ``SENTINEL MASTERS``
to every sentinel at once, :func:`~twinproxy.sentinel.decide.choose_master`
per shard (a majority agreeing on the highest epoch *with* its address,
decided as soon as the answers in allow it: a frozen sentinel costs no
wait — except while a shard is fenced, whose fence only every sentinel's
answer lifts), then ``ROLE`` on the chosen node before the shard routes there.
Events (``+switch-master`` and the others) only trigger a discovery; so
do a shard's own signs (``-READONLY``, a lost or refused master
connection), an event link coming back (what it missed is lost), and a
timer: every 5 s, and every 0.2 s while some shard has no confirmed master.
With fewer than a majority answering the watcher keeps what it has and says
so once.  ``+sdown``/``+odown`` never move anything: sentinels briefly flag
even a fresh master after a switch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.config import PoolConfig
from twinproxy.credentials import pool_credentials, sentinel_credentials
from twinproxy.sentinel.client import CommandClient, EventSubscriber
from twinproxy.sentinel.decide import Choice, choose_master, majority
from twinproxy.sentinel.replies import ReplyError, parse_event, parse_masters, parse_replicas, parse_role, show_address

EVENTS = (b"+switch-master", b"+odown", b"-odown", b"+sdown", b"-sdown", b"+convert-to-slave", b"+slave",
          b"+failover-end", b"-failover-abort-no-good-slave")
RECONCILE_EVERY = 5.0
RETRY_UNCONFIRMED = 0.2
# Between two discoveries at least: a burst of triggers is one look.
MIN_GAP = 0.05
QUERY_TIMEOUT = 0.5


class SentinelWatcher:
    """Discovery for the shards of one pool."""

    _log = Logger()

    def __init__(self, config: PoolConfig, reactor: Any, shards: Dict[str, Any]) -> None:
        self._reactor = reactor
        self.shards = shards
        self.config = config
        self._queries: List[CommandClient] = []
        self._events: List[EventSubscriber] = []
        self._nodes: Dict[Tuple[str, int], CommandClient] = {}
        self._running = False
        self._busy = False
        self._again = False
        self._call: Any = None
        self._last_run = -1.0
        self._problem: Optional[str] = None
        self._notes: Dict[str, str] = {}
        self._last_events: Dict[str, Any] = {}
        # Moves on when the sentinel connections are replaced: answers from before are dropped.
        self._link_generation = 0

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._connect()
        self.trigger("start")

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._disconnect()

    def reconfigure(self, config: PoolConfig) -> None:
        """New keys; new sentinels or credentials mean new connections (and a look at once)."""
        old = self.config
        self.config = config
        if old.sentinels != config.sentinels:
            # Another sentinel set counts its epochs from its own start.
            for shard in self.shards.values():
                shard.epoch = -1
        if (old.sentinels, old.sentinel_auth, pool_credentials(old)) != (config.sentinels, config.sentinel_auth,
                                                                         pool_credentials(config)):
            self._disconnect()
            if self._running:
                self._connect()
        self.trigger("configuration changed")

    def _connect(self) -> None:
        auth = sentinel_credentials(self.config.sentinel_auth)
        for address in self.config.sentinels:
            self._queries.append(CommandClient(self._reactor, address, auth, timeout=QUERY_TIMEOUT))
            subscriber = EventSubscriber(self._reactor, address, EVENTS, self._event,
                                         lambda: self.trigger("event link (re)subscribed"), auth=auth,
                                         label=f" (pool {self.config.name})")
            self._events.append(subscriber)
            subscriber.start()

    def _disconnect(self) -> None:
        self._link_generation += 1
        queries, nodes, events = self._queries, self._nodes, self._events
        self._queries, self._events, self._nodes = [], [], {}
        for client in (*queries, *nodes.values()):
            client.close()
        for subscriber in events:
            subscriber.stop()

    # -- triggers -------------------------------------------------------------

    def trigger(self, reason: str) -> None:
        """Look again soon (at most one discovery runs at a time; triggers meanwhile fold into one more)."""
        if not self._running:
            return
        if self._busy:
            self._again = True
            return
        delay = max(0.0, self._last_run + MIN_GAP - self._reactor.seconds())
        self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self._reactor.seconds() + delay:
                return
            self._call.cancel()
        self._call = self._reactor.callLater(delay, self._discover)

    def _event(self, channel: bytes, payload: bytes) -> None:
        event = parse_event(channel, payload)
        if event is None:
            return
        shard = self.shards.get(event.name)
        if shard is None:
            return
        kind = event.kind
        if kind in ("+sdown", "+odown", "-sdown", "-odown"):
            seen = (kind, event.role, event.host, event.port)
            if event.role == "master" and seen != self._last_events.get(event.name):   # every sentinel sends it
                self._last_events[event.name] = seen
                self._log.info("pool {pool}: sentinel event {event} for {shard} (noted; it moves nothing)",
                               pool=self.config.name, event=kind, shard=event.name)
            elif kind == "+sdown" and event.role == "slave":
                shard.replicas.take_out((event.host, event.port), "sentinel flags it down")
            elif kind == "-sdown" and event.role == "slave":
                self.trigger(f"sentinel event -sdown for a replica of {event.name}")   # back: list it again
            return
        if kind == "+convert-to-slave":
            shard.replicas.take_out((event.host, event.port), "sentinel is reconfiguring it")
        elif kind == "+switch-master":
            shard.replicas.take_out((event.new_host, event.new_port), "promoted to master")
        self.trigger(f"sentinel event {kind} for {event.name}")

    # -- discovery ------------------------------------------------------------

    def _discover(self) -> None:
        self._call = None
        if not self._running or self._busy:
            return
        self._busy = True
        self._again = False
        self._last_run = self._reactor.seconds()
        done = self._ask_masters()
        done.addCallback(self._answered, self._link_generation)
        done.addErrback(self._crashed)
        done.addBoth(self._finished)

    def _ask_masters(self) -> defer.Deferred:
        """Fires with one answer per sentinel (a parsed SENTINEL MASTERS, or None), as soon as
        every shard has a majority behind one choice or every sentinel has answered."""
        queries = list(self._queries)
        answers: List[Optional[Dict[str, Any]]] = [None] * len(queries)
        waiting = [len(queries)]
        result: defer.Deferred = defer.Deferred()
        need = majority(len(queries))

        def settled() -> bool:
            if any(shard.fencing for shard in self.shards.values()):
                return False   # lifting a fence needs every sentinel's answer (SentinelShard.may_confirm)
            for name in self.shards:
                choice, _ = choose_master(name, answers, len(queries))
                if choice is None or choice.agreeing < need:
                    return False
            return True

        def one(value: Any, index: int) -> None:
            waiting[0] -= 1
            if isinstance(value, list):
                try:
                    answers[index] = parse_masters(value)
                except (ValueError, TypeError, KeyError):
                    pass
            if not result.called and (waiting[0] == 0 or settled()):
                result.callback(list(answers))

        for index, client in enumerate(queries):
            asked = client.command(b"SENTINEL", b"MASTERS")
            asked.addErrback(lambda failure: None)   # no answer: counted as None
            asked.addCallback(one, index)
        if not queries:
            result.callback([])
        return result

    def _answered(self, answers: List[Any], link_generation: int) -> Any:
        if not self._running or link_generation != self._link_generation:
            return None   # stopped, or other sentinels now: these answers say nothing
        count = len(answers)
        steps = []
        problems = []
        for name, shard in list(self.shards.items()):
            choice, reason = choose_master(name, answers, count, floor_epoch=max(shard.epoch, -1))
            if choice is None:
                problems.append(f"{name}: {reason}")
                continue
            running = any(answer is not None and name in answer and answer[name].failover_in_progress
                          for answer in answers)
            steps.append(self._follow(shard, choice, answers, running))
        self._report(problems)
        self._prune_nodes()
        return defer.DeferredList(steps, consumeErrors=True)

    def _follow(self, shard: Any, choice: Choice, answers: List[Any], failover_running: bool) -> defer.Deferred:
        address = choice.address
        if shard.confirmed and address != shard.address and choice.run_id and choice.run_id == shard.run_id:
            return defer.succeed(None)   # the same node under another address: not a switch
        if shard.confirmed and address == shard.address:
            shard.epoch = max(shard.epoch, choice.epoch)
            if choice.run_id:
                shard.run_id = choice.run_id
            return self._refresh_replicas(shard, choice, answers)
        if address != shard.address:
            shard.moving(address, choice.epoch, choice.run_id)
        generation = shard.generation
        asked = self._node(address).command(b"ROLE")
        asked.addCallbacks(self._role_answered, self._role_failed,
                           callbackArgs=(shard, choice, answers, generation, failover_running),
                           errbackArgs=(shard, choice))
        asked.addErrback(self._crashed)
        return asked

    def _current(self, shard: Any, choice: Choice, generation: int) -> bool:
        """Is the shard still the one asked about, at the address asked about, with nothing new since?"""
        return (self.shards.get(shard.name) is shard and not shard.removed and shard.address == choice.address
                and shard.generation == generation)

    def _role_answered(self, value: Any, shard: Any, choice: Choice, answers: List[Any], generation: int,
                       failover_running: bool) -> Any:
        if not self._current(shard, choice, generation):
            self.trigger(f"shard {shard.name} changed while its ROLE was asked")
            return None
        where = f"{shard.name}: {show_address(choice.address)} (epoch {choice.epoch})"
        if isinstance(value, ReplyError):
            self._note(shard.name, f"{where} refuses ROLE: {value.message}")
            return None
        role = None
        if isinstance(value, list):
            try:
                role = parse_role(value)
            except (ValueError, TypeError, IndexError):
                role = None
        if role is None or role.kind != "master":
            shown = "something unreadable" if role is None else role.kind
            self._note(shard.name, f"{where} answers ROLE with {shown}, not master: a failover is under way")
            return None
        unanimous = choice.agreeing == len(answers)
        if not shard.may_confirm(choice.address, failover_running, unanimous):
            self._note(shard.name, f"{where} is still master, but a replica of it was promoted: waiting for "
                       "the sentinels to announce the switch (or all of them to name it, none failing over)")
            return None
        self._notes.pop(shard.name, None)
        shard.confirm(choice.address, choice.epoch, choice.run_id)
        return self._refresh_replicas(shard, choice, answers)

    def _role_failed(self, failure: Any, shard: Any, choice: Choice) -> None:
        self._note(shard.name, f"{shard.name}: cannot ask {show_address(choice.address)} its role: "
                   f"{failure.getErrorMessage()}")

    def _refresh_replicas(self, shard: Any, choice: Choice, answers: List[Any]) -> Any:
        # Ask a sentinel that agreed with the choice.
        for client, answer in zip(self._queries, answers):
            view = answer.get(shard.name) if answer is not None else None
            if view is not None and view.address == choice.address and view.epoch == choice.epoch:
                asked = client.command(b"SENTINEL", b"REPLICAS", shard.name.encode())
                asked.addCallback(self._replicas_answered, shard, choice)
                asked.addErrback(lambda failure: None)   # the next discovery asks again
                return asked
        return None

    def _replicas_answered(self, value: Any, shard: Any, choice: Choice) -> None:
        if not isinstance(value, list) or shard.address != choice.address or self.shards.get(shard.name) is not shard:
            return
        try:
            replicas = parse_replicas(value)
        except (ValueError, TypeError, KeyError):
            return
        shard.replicas.set_candidates([replica.address for replica in replicas if replica.usable
                                       and (replica.master_host, replica.master_port) == choice.address])

    def _crashed(self, failure: Any) -> None:
        self._log.failure("pool {pool}: Sentinel discovery failed", failure, pool=self.config.name)

    def _finished(self, result: Any) -> None:
        self._busy = False
        if not self._running:
            return
        if self._again:
            self.trigger("triggered meanwhile")
        elif any(not shard.confirmed for shard in self.shards.values()):
            self._schedule(RETRY_UNCONFIRMED)
        else:
            self._schedule(RECONCILE_EVERY)

    def _node(self, address: Tuple[str, int]) -> CommandClient:
        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = CommandClient(self._reactor, address, pool_credentials(self.config),
                                                          timeout=QUERY_TIMEOUT)
        return client

    def _prune_nodes(self) -> None:
        """Close the ROLE clients of nodes no shard routes to (each holds a connection to that node)."""
        wanted = {shard.address for shard in self.shards.values()}
        for address in [address for address in self._nodes if address not in wanted]:
            self._nodes.pop(address).close()

    # -- telling --------------------------------------------------------------

    def _report(self, problems: List[str]) -> None:
        text = "; ".join(problems) if problems else None
        if text != self._problem:
            if text is not None:
                self._log.warn("pool {pool}: Sentinel: {problems} (keeping the current masters)",
                               pool=self.config.name, problems=text)
            elif self._problem is not None:
                self._log.info("pool {pool}: Sentinel: a majority agrees again", pool=self.config.name)
        self._problem = text

    def _note(self, shard: str, text: str) -> None:
        # Said once per shard: while a failover runs this is true at every retry.
        if self._notes.get(shard) != text:
            self._notes[shard] = text
            self._log.info("pool {pool}: Sentinel: {text}", pool=self.config.name, text=text)

    @property
    def problem(self) -> Optional[str]:
        return self._problem
