"""Node clients through the 3-server pool: ioredis with its default INFO ready check, and BullMQ (a Queue,
a Worker, QueueEvents) with a ``{prefix}``, the hash tag BullMQ's documentation asks for on a cluster so
that each of its many-key scripts stays on one server. The scripts are in tests/compat/node/."""

from __future__ import annotations

import pytest

from tests.compat.conftest import CompatPool, run_node
from tests.servers import LOOPBACK

JOBS = 20


def backend_version(pool: CompatPool) -> str:
    with pool.backends[0].client() as backend:
        return backend.info("server")["redis_version"]


@pytest.mark.timeout(300)  # the first Node test may run `npm ci`
def test_ioredis_passes_its_ready_check_and_sets_and_gets(pool3: CompatPool, node: str) -> None:
    result = run_node(node, "ioredis_ready.js", LOOPBACK, str(pool3.port), timeout=30)
    assert result["exit"] == 0 and result["errors"] == [], result
    assert result["ready"] is True
    assert result["redisVersion"] == backend_version(pool3)
    assert result["get"] == "hello from ioredis"
    assert result["pipeline"] == [str(index) for index in range(50)]
    assert pool3.all_backend_keys() == sorted([b"ioredis:greeting"] + [f"ioredis:{i}".encode() for i in range(50)])
    placed = pool3.backend_keys()
    assert all(placed.values()), placed


@pytest.mark.timeout(300)
def test_bullmq_worker_processes_every_job_once_and_queue_events_see_them(pool3: CompatPool, node: str) -> None:
    result = run_node(node, "bullmq_jobs.js", LOOPBACK, str(pool3.port), "{bull}", str(JOBS), timeout=60)
    assert result["exit"] == 0 and result["errors"] == [], result
    assert sorted(result["processed"]) == list(range(JOBS))
    assert len(result["jobIds"]) == len(set(result["jobIds"])) == JOBS
    assert result["completed"] == {job_id: number * number for number, job_id in enumerate(result["jobIds"])}
    wanted = {"completed": JOBS, "failed": 0, "waiting": 0, "active": 0, "delayed": 0}
    assert {state: result["counts"].get(state) for state in wanted} == wanted, result["counts"]
    assert result["workers"] == 1  # Queue.getWorkers: CLIENT LIST, by the worker's connection name
    holders = [address for address, keys in pool3.backend_keys().items() if keys]
    assert len(holders) == 1, pool3.backend_keys()  # the {bull} tag: every BullMQ key on one server
