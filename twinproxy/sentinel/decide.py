"""Pure decisions on parsed sentinel and replica answers: which address is a
pool server's master (majority of sentinels, highest config-epoch, epoch and
address from the same reply, never below the epoch in use), and whether a
replica may be read from.  No I/O and no clocks: the callers bring answers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from twinproxy.sentinel.replies import MasterView, Replication

__all__ = ["Choice", "choose_master", "known_names", "majority", "replica_problem"]

Answers = Sequence[Optional[Mapping[str, MasterView]]]


def majority(count: int) -> int:
    """The smallest number of sentinels that is more than half of ``count``."""
    return count // 2 + 1


@dataclass(frozen=True)
class Choice:
    """The master a majority of sentinels agree on, and how many did."""

    name: str
    host: str
    port: int
    epoch: int
    run_id: str
    agreeing: int
    answered: int

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def choose_master(name: str, answers: Answers, sentinel_count: int,
                  floor_epoch: int = -1) -> Tuple[Optional[Choice], str]:
    """Choose ``name``'s master from one ``SENTINEL MASTERS`` answer per configured sentinel.

    ``answers`` holds None for a sentinel that did not answer.  Returns the
    choice (or None) and a one-line reason.  Down flags do not disqualify:
    before a failover the dead master is still the master, and the caller's
    ROLE check decides whether to serve it.
    """
    need = majority(sentinel_count)
    replied = [answer for answer in answers if answer is not None]
    if len(replied) < need:
        return None, f"only {len(replied)} of {sentinel_count} sentinels answered (need {need})"
    views = [answer[name] for answer in replied if name in answer]
    if not views:
        return None, f"no sentinel monitors '{name}'"
    # A sentinel that sees no peers is cut off or was started from a stale file: its
    # epoch-0 view of the old master must not count (reference §3, "a stale sentinel").
    isolated = 0
    if sentinel_count > 1:
        counted = [view for view in views if view.num_other_sentinels > 0]
        isolated = len(views) - len(counted)
        views = counted
    # Epoch and address count only together: the leader shows the new epoch with the
    # old address for a moment before its switch (reference, Addendum).
    groups: Dict[Tuple[int, str, int], List[MasterView]] = {}
    for view in views:
        groups.setdefault((view.epoch, view.host, view.port), []).append(view)
    agreed = [key for key, members in groups.items() if len(members) >= need]
    if not agreed:
        return None, _disagreement(groups, isolated, need, sentinel_count)
    # Two disjoint groups cannot both reach a majority; the order only makes the result
    # deterministic should a caller pass more answers than sentinels.
    best = max(agreed, key=lambda key: (key[0], len(groups[key]), key[1], key[2]))
    epoch, host, port = best
    if epoch < floor_epoch:
        return None, f"majority reports epoch {epoch} below the one in use {floor_epoch}"
    members = groups[best]
    run_ids = Counter(view.run_id for view in members if view.run_id)
    run_id = run_ids.most_common(1)[0][0] if run_ids else ""
    choice = Choice(name, host, port, epoch, run_id, len(members), len(replied))
    return choice, f"{len(members)} of {len(replied)} answering sentinels agree: epoch {epoch} at {_where(host, port)}"


def _disagreement(groups: Mapping[Tuple[int, str, int], List[MasterView]], isolated: int, need: int,
                  sentinel_count: int) -> str:
    ranked = sorted(groups.items(), key=lambda item: (-item[0][0], -len(item[1]), item[0][1], item[0][2]))
    parts = [f"epoch {epoch}@{_where(host, port)} x{len(members)}" for (epoch, host, port), members in ranked]
    if isolated:
        parts.append(f"{isolated} isolated (no other sentinels) ignored")
    listed = ", ".join(parts) if parts else "no usable answer"
    return f"sentinels disagree: {listed} (need {need} of {sentinel_count})"


def known_names(answers: Answers) -> Set[str]:
    """Every master name at least one answering sentinel monitors."""
    names: Set[str] = set()
    for answer in answers:
        if answer is not None:
            names.update(answer)
    return names


def replica_problem(info: Optional[Replication], master: Tuple[str, int], lag_ms: Optional[int],
                    max_lag_ms: int) -> Optional[str]:
    """Why this replica must not be read from, or None when it may be.

    ``info`` is the replica's own ``INFO replication`` (None: no answer),
    ``master`` the current master's address and ``lag_ms`` what
    ``replica_lag_ms`` found for it in the master's INFO.
    """
    if info is None:
        return "no answer"
    if info.role != "slave":
        # A returning old master says master for ~10 s before sentinel converts it.
        return f"role is {info.role or 'unknown'}"
    if info.master is None or tuple(info.master) != tuple(master):
        following = _where(*info.master) if info.master else "nothing"
        return f"replicates {following}, not the master {_where(*master)}"
    if not info.link_up:
        return "master link down"
    if info.sync_in_progress:
        # A syncing replica serves its old (or empty) data before it answers LOADING.
        return "sync in progress"
    if lag_ms is None:
        return "not listed online by the master"
    if lag_ms > max_lag_ms:
        return f"lag {lag_ms} ms over {max_lag_ms} ms"
    return None
