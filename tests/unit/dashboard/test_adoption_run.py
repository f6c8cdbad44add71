"""adoption: the version check asks the adopted groups' masters only; an entry's sweeps end together."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer

from tests.unit.cluster.test_adopt_routing import ADOPTED
from twinproxy.dashboard.adoption import SweepGroup, check_versions
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.runner import _version


class Admin:
    def __init__(self, versions) -> None:
        self.versions = versions
        self.asked = []

    def command(self, address, *args):
        self.asked.append(address)
        version = self.versions.get(address)
        if version is None:
            return defer.fail(OperationError(502, "refused"))
        return defer.succeed(b"# Server\r\nredis_version:" + version + b"\r\n")


def checked(topology, versions):
    admin = Admin(versions)
    results = []
    check_versions(SimpleNamespace(admin=admin), topology, topology.adoption, _version).addBoth(results.append)
    return results[0], admin.asked


A, B, C = "10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"


def test_only_the_adopted_groups_masters_are_asked_and_an_empty_group_is_skipped() -> None:
    topology = ADOPTED.add_group(9).add_group(10).add_server(10, "10.0.0.9:6379")
    result, asked = checked(topology, {A: b"7.0.15", B: b"7.0.15", C: b"7.0.15"})
    assert result is None and sorted(asked) == [A, B, C]


def test_different_versions_are_refused_naming_each_group() -> None:
    result, _ = checked(ADOPTED, {A: b"7.0.15", B: b"7.2.4", C: b"7.0.15"})
    assert result.startswith("the groups run different Redis versions (group 1 7.0.15, group 2 7.2.4, "
                             "group 3 7.0.15)")


class FakeSweep:
    def __init__(self) -> None:
        self.done = defer.Deferred()
        self.stopped = False

    def run(self):
        return self.done

    def stop(self) -> None:
        self.stopped = True

    def pause(self) -> None:
        pass


def test_a_failed_sweep_stops_the_others_and_its_error_comes_once_they_have_ended() -> None:

    first, second, third = FakeSweep(), FakeSweep(), FakeSweep()
    results = []
    SweepGroup([first, second, third]).run().addBoth(results.append)
    second.done.errback(RuntimeError("the target does not answer"))
    assert first.stopped and third.stopped and results == []     # the others are still ending
    first.done.callback(False)
    third.done.callback(False)
    (failure,) = results
    assert failure.check(RuntimeError) and str(failure.value) == "the target does not answer"


def test_a_sweep_group_is_true_once_every_sweep_found_its_keys_gone() -> None:

    sweeps = [FakeSweep(), FakeSweep()]
    results = []
    SweepGroup(sweeps).run().addBoth(results.append)
    for sweep in sweeps:
        sweep.done.callback(True)
    assert results == [True] and not any(sweep.stopped for sweep in sweeps)
