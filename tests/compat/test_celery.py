"""Celery with the Redis broker and result backend through the 1-server pool.

Why the 1-server pool: kombu's worker BRPOPs, in one command, its queue's four priority lists (``q``,
``q\\x06\\x163``, ...) and its own remote-control queue ``<worker>.celery.pidbox``, and acknowledges
through one MULTI over its fixed ``unacked`` hash and ``unacked_index`` sorted set: names a hash tag on the
queue cannot put on one server. The result backend is SET + PUBLISH of ``celery-task-meta-<id>`` in one
MULTI, and ``AsyncResult.get`` SUBSCRIBEs to that channel.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from tests.compat import jobs
from tests.compat.conftest import CompatPool, python_env, read_runs
from tests.servers import Process

TASKS = 20
RESULT_TIMEOUT = 30  # seconds for the whole batch, worker start-up included


@pytest.mark.timeout(120)
def test_celery_worker_runs_every_task_exactly_once_and_results_come_back(pool1: CompatPool, run_log: Path,
                                                                         tmp_path: Path) -> None:
    app = jobs.make_celery(pool1.url())
    worker = Process([sys.executable, "-m", "celery", "-A", "tests.compat.jobs", "worker", "--pool=solo",
                      "--concurrency=1", "--queues=compat", "--hostname=compat@localhost", "--loglevel=INFO",
                      "--without-gossip", "--without-mingle", "--without-heartbeat"],
                     tmp_path / "celery-worker.log",
                     env=python_env(**{jobs.RUN_LOG: str(run_log), jobs.CELERY_URL: pool1.url()}))
    worker.spawn()
    results = []
    try:
        results += [app.send_task("compat.multiply", args=(number, 7), queue="compat") for number in range(TASKS)]
        values = []
        for result in results:
            try:
                values.append(result.get(timeout=RESULT_TIMEOUT, propagate=True))
            except Exception as err:
                raise AssertionError(f"task {result.id}: {err!r}\nworker log:\n{worker.output()}") from err
        assert values == [number * 7 for number in range(TASKS)]
        assert all(result.state == "SUCCESS" for result in results)
        assert worker.alive, worker.output()
    finally:
        # An AsyncResult unsubscribes when it is collected: now, while the servers are up (on PyPy,
        # collection comes whenever, and would find them gone).
        del results[:]
        result = None
        gc.collect()
        worker.stop()  # SIGTERM: a warm shutdown of the solo pool, SIGKILL after 5 s
        app.close()
    assert sorted(read_runs(run_log)) == sorted(f"multiply:{number}" for number in range(TASKS))
