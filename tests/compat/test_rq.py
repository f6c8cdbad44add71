"""rq through the 1-server pool: its enqueue and worker bookkeeping are MULTI/EXEC pipelines over fixed,
unrelated keys (``rq:queues``, ``rq:queue:<name>``, ``rq:job:<id>``, the registries), WATCH on a job's
dependencies, and a worker subscribes to ``rq:pubsub:<worker>`` for its commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.compat import jobs
from tests.compat.conftest import CLIENT_TIMEOUT, CompatPool, python_env, read_runs
from tests.servers import Process

JOBS = 20


@pytest.mark.timeout(120)
def test_rq_burst_worker_runs_every_job_exactly_once(pool1: CompatPool, run_log: Path, tmp_path: Path) -> None:
    from rq import Queue
    from rq.job import JobStatus

    connection = redis.Redis.from_url(pool1.url(), socket_timeout=CLIENT_TIMEOUT,
                                      socket_connect_timeout=CLIENT_TIMEOUT)
    queue = Queue("compat", connection=connection)
    enqueued = [queue.enqueue(jobs.square, number, result_ttl=600) for number in range(JOBS)]
    # Runs only once all the others have: rq WATCHes their keys when it enqueues it.
    last = queue.enqueue(jobs.square, 1000, depends_on=enqueued, result_ttl=600)
    assert last.get_status() == JobStatus.DEFERRED
    assert len(queue) == JOBS

    worker = Process([sys.executable, "-m", "tests.compat.jobs", "rq", pool1.url(), "compat"],
                     tmp_path / "rq-worker.log", env=python_env(**{jobs.RUN_LOG: str(run_log)}))
    worker.spawn()
    try:
        code = worker.proc.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        worker.stop()
    assert code == 0, f"the rq worker {'did not finish in 60 s' if code is None else f'exited {code}'}:\n" \
                      f"{worker.output()}"

    for number, job in enumerate(enqueued):
        job.refresh()
        assert job.get_status() == JobStatus.FINISHED, (number, job.get_status(), worker.output())
        assert job.return_value() == number * number
    last.refresh()
    assert last.get_status() == JobStatus.FINISHED
    assert last.return_value() == 1000 * 1000
    assert sorted(read_runs(run_log)) == sorted([f"square:{number}" for number in range(JOBS)] + ["square:1000"])
    assert len(queue) == 0
    assert queue.finished_job_registry.count == JOBS + 1
    assert queue.failed_job_registry.count == 0
