"""Choosing a master from several sentinels' answers and judging replicas,
including the traps measured on 7.0.15 (shared reference on Sentinel, §3, §6.1
and the Addendum).  Answers are built as raw SENTINEL MASTERS replies."""

from __future__ import annotations

from typing import Dict, Optional

import pytest

from twinproxy.sentinel.decide import Choice, choose_master, known_names, majority, replica_problem
from twinproxy.sentinel.replies import MasterView, decode, parse_masters, parse_replication

OLD = ("127.0.0.1", 7710)
NEW = ("127.0.0.1", 7711)


def bulk(value) -> bytes:
    data = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def entry(name: str = "s1", address=OLD, epoch: int = 0, flags: str = "master", others: int = 2,
          run_id: Optional[str] = None) -> bytes:
    """One SENTINEL MASTERS entry, trimmed to the fields the decision reads plus a few it must skip."""
    if run_id is None:
        run_id = f"run{address[1]}"
    words = ["name", name, "ip", address[0], "port", address[1], "runid", run_id, "flags", flags,
             "link-pending-commands", 0, "down-after-milliseconds", 1000, "role-reported", "master",
             "config-epoch", epoch, "num-slaves", 1, "num-other-sentinels", others, "quorum", 2,
             "failover-timeout", 3000, "parallel-syncs", 1]
    return b"*%d\r\n" % len(words) + b"".join(bulk(word) for word in words)


def answer(*entries: bytes) -> Dict[str, MasterView]:
    return parse_masters(decode(b"*%d\r\n" % len(entries) + b"".join(entries)))


def test_majority() -> None:
    assert [majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    assert majority(0) == 1


def test_all_agree() -> None:
    answers = [answer(entry()), answer(entry()), answer(entry())]
    choice, reason = choose_master("s1", answers, 3)
    assert choice == Choice("s1", "127.0.0.1", 7710, 0, "run7710", 3, 3)
    assert choice.address == OLD
    assert "3 of 3" in reason


def test_other_names_in_the_answers_do_not_matter() -> None:
    both = answer(entry("s1"), entry("s2", ("127.0.0.1", 7712), epoch=4))
    choice, _ = choose_master("s2", [both, both, both], 3)
    assert (choice.name, choice.address, choice.epoch) == ("s2", ("127.0.0.1", 7712), 4)


def test_too_few_answers() -> None:
    choice, reason = choose_master("s1", [answer(entry()), None, None], 3)
    assert choice is None
    assert "only 1 of 3 sentinels answered" in reason
    choice, reason = choose_master("s1", [None, None, None], 3)
    assert choice is None and "only 0 of 3 sentinels answered" in reason


def test_a_bare_majority_is_enough() -> None:
    choice, _ = choose_master("s1", [None, answer(entry()), answer(entry())], 3)
    assert (choice.address, choice.agreeing, choice.answered) == (OLD, 2, 2)


def test_name_no_sentinel_monitors() -> None:
    answers = [answer(entry("s2")), answer(entry("s2")), answer()]
    choice, reason = choose_master("ghost", answers, 3)
    assert choice is None
    assert reason == "no sentinel monitors 'ghost'"


def test_unknown_name_judged_only_with_a_majority() -> None:
    choice, reason = choose_master("ghost", [answer(entry()), None, None], 3)
    assert choice is None and "only 1 of 3" in reason and "monitors" not in reason


def test_a_sentinel_not_knowing_the_name_is_ignored() -> None:
    answers = [answer(entry()), answer(entry()), answer(entry("other"))]
    choice, _ = choose_master("s1", answers, 3)
    assert (choice.address, choice.agreeing, choice.answered) == (OLD, 2, 3)
    # ...but it does not count towards the majority either.
    choice, reason = choose_master("s1", [answer(entry()), answer(entry("other")), answer(entry("other"))], 3)
    assert choice is None and "sentinels disagree" in reason


def test_after_a_switch_the_new_epoch_wins() -> None:
    answers = [answer(entry(address=NEW, epoch=1)) for _ in range(3)]
    choice, _ = choose_master("s1", answers, 3)
    assert (choice.address, choice.epoch, choice.run_id) == (NEW, 1, "run7711")


def test_leader_window_new_epoch_with_old_address_alone_is_not_taken() -> None:
    # Addendum: between +promoted-slave and +switch-master the leader shows epoch 1 with the
    # OLD address.  Epoch 1 must never be stored for 7710.
    leader = answer(entry(address=OLD, epoch=1))
    followers = [answer(entry(address=OLD, epoch=0)), answer(entry(address=OLD, epoch=0))]
    choice, _ = choose_master("s1", [leader, *followers], 3)
    assert (choice.address, choice.epoch, choice.agreeing) == (OLD, 0, 2)
    # Mid-switch: one follower has already moved on, the other has not: nobody has a majority.
    choice, reason = choose_master("s1", [leader, answer(entry(address=NEW, epoch=1)), followers[0]], 3)
    assert choice is None
    assert reason.startswith("sentinels disagree: ")
    for group in ("epoch 1@127.0.0.1:7710 x1", "epoch 1@127.0.0.1:7711 x1", "epoch 0@127.0.0.1:7710 x1"):
        assert group in reason


def test_epoch_and_address_count_only_together() -> None:
    # Two say epoch 1 but with different addresses: epoch 1 has no majority as a pair.
    answers = [answer(entry(address=OLD, epoch=1)), answer(entry(address=NEW, epoch=1)),
               answer(entry(address=OLD, epoch=0))]
    choice, _ = choose_master("s1", answers, 3)
    assert choice is None


def test_highest_epoch_among_majority_groups() -> None:
    answers = [answer(entry(address=NEW, epoch=2))] * 3 + [answer(entry(address=OLD, epoch=1))] * 2
    choice, _ = choose_master("s1", answers, 5)
    assert (choice.address, choice.epoch, choice.agreeing, choice.answered) == (NEW, 2, 3, 5)
    # More answers than sentinels (a caller's slip) still gives one deterministic answer.
    doubled = [answer(entry(address=OLD, epoch=1))] * 2 + [answer(entry(address=NEW, epoch=2))] * 2
    choice, _ = choose_master("s1", doubled, 3)
    assert (choice.address, choice.epoch) == (NEW, 2)


def test_stale_fourth_sentinel_with_epoch_zero() -> None:
    # §3 "A stale sentinel": started from the original config after the failover, it reports
    # 7710 epoch 0 (s_down, or plain master for a moment) with NOQUORUM and no peers.
    stale_down = answer(entry(address=OLD, epoch=0, flags="s_down,master,disconnected", others=0))
    stale_up = answer(entry(address=OLD, epoch=0, flags="master", others=0))
    current = [answer(entry(address=NEW, epoch=1, others=3)) for _ in range(3)]
    for stale in (stale_down, stale_up):
        for order in ([stale, *current], [*current, stale]):
            choice, _ = choose_master("s1", order, 4)
            assert (choice.address, choice.epoch, choice.agreeing, choice.answered) == (NEW, 1, 3, 4)


def test_isolated_sentinel_is_ignored() -> None:
    # Two of three answer: one isolated (num-other-sentinels 0) with the old view, one current.
    answers = [answer(entry(address=OLD, others=0)), answer(entry(address=NEW, epoch=1)), None]
    choice, reason = choose_master("s1", answers, 3)
    assert choice is None
    assert "1 isolated" in reason
    # Even unanimous isolated answers do not count...
    choice, reason = choose_master("s1", [answer(entry(others=0))] * 3, 3)
    assert choice is None and "3 isolated" in reason
    # ...but a lone configured sentinel has no peers to see.
    choice, _ = choose_master("s1", [answer(entry(others=0))], 1)
    assert choice.address == OLD


def test_floor_epoch() -> None:
    answers = [answer(entry(address=NEW, epoch=1))] * 3
    choice, reason = choose_master("s1", answers, 3, floor_epoch=2)
    assert choice is None
    assert reason == "majority reports epoch 1 below the one in use 2"
    assert choose_master("s1", answers, 3, floor_epoch=1)[0].epoch == 1
    assert choose_master("s1", answers, 3, floor_epoch=0)[0].epoch == 1


def test_restarted_stale_sentinels_cannot_drag_the_epoch_back() -> None:
    # Addendum: a restarted sentinel briefly reports the dead old master as master,disconnected.
    # With the floor a majority of those is still refused.
    answers = [answer(entry(address=OLD, epoch=0, flags="master,disconnected"))] * 2 + [
        answer(entry(address=NEW, epoch=1))]
    choice, reason = choose_master("s1", answers, 3, floor_epoch=1)
    assert choice is None and "below the one in use 1" in reason


def test_down_flags_do_not_disqualify() -> None:
    # Before the failover the dead master is still the master; the caller's ROLE decides.
    answers = [answer(entry(flags="s_down,o_down,master,disconnected,failover_in_progress"))] * 3
    choice, _ = choose_master("s1", answers, 3)
    assert choice.address == OLD


def test_run_id_is_the_most_common_non_empty_one() -> None:
    answers = [answer(entry(run_id="")), answer(entry(run_id="b")), answer(entry(run_id="a")),
               answer(entry(run_id="a"))]
    assert choose_master("s1", answers, 4)[0].run_id == "a"
    assert choose_master("s1", [answer(entry(run_id=""))] * 3, 3)[0].run_id == ""


def test_known_names() -> None:
    answers = [answer(entry("s1")), None, answer(entry("s2"), entry("s3")), answer()]
    assert known_names(answers) == {"s1", "s2", "s3"}
    assert known_names([None, None]) == set()


# --- replica_problem -----------------------------------------------------------------------------

MASTER = ("127.0.0.1", 7710)


def replica_info(**changes) -> bytes:
    values = {"role": "slave", "master_host": "127.0.0.1", "master_port": "7710", "master_link_status": "up",
              "master_sync_in_progress": "0", "slave_repl_offset": "401"}
    values.update(changes)
    return b"# Replication\r\n" + b"".join(b"%s:%s\r\n" % (k.encode(), v.encode()) for k, v in values.items())


def test_healthy_replica() -> None:
    assert replica_problem(parse_replication(replica_info()), MASTER, 0, 1000) is None
    assert replica_problem(parse_replication(replica_info()), MASTER, 1000, 1000) is None


@pytest.mark.parametrize("info, lag, reason", [
    (None, 0, "no answer"),
    (replica_info(role="master"), 0, "role is master"),
    (replica_info(master_port="7799"), 0, "not the master 127.0.0.1:7710"),
    (replica_info(master_host="127.0.0.2"), 0, "replicates 127.0.0.2:7710"),
    (replica_info(master_link_status="down"), 0, "master link down"),
    (replica_info(master_sync_in_progress="1"), 0, "sync in progress"),
    (replica_info(), None, "not listed online by the master"),
    (replica_info(), 2000, "lag 2000 ms over 1000 ms"),
])
def test_replica_problems(info, lag, reason: str) -> None:
    parsed = parse_replication(info) if info is not None else None
    problem = replica_problem(parsed, MASTER, lag, 1000)
    assert problem is not None and reason in problem


def test_returning_old_master_is_caught_by_role_first() -> None:
    # A restarted old master: role master, no master link, listed nowhere.
    info = parse_replication(b"# Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_repl_offset:0\r\n")
    assert replica_problem(info, MASTER, None, 1000) == "role is master"
