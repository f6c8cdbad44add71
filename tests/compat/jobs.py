"""What the compat group's workers run: rq's job functions and Celery's tasks, each recording its run.

Every run appends one line to the file named by ``TWINPROXY_COMPAT_RUN_LOG`` (one ``O_APPEND`` write of a
few bytes, whole even from several processes), so a test counts runs without asking the system under
test. The worker processes themselves: ``python -m tests.compat.jobs rq URL QUEUE`` is an rq worker in
burst mode; Celery's is ``celery -A tests.compat.jobs worker`` with ``TWINPROXY_COMPAT_CELERY_URL`` set.
"""

from __future__ import annotations

import os
import sys

RUN_LOG = "TWINPROXY_COMPAT_RUN_LOG"
CELERY_URL = "TWINPROXY_COMPAT_CELERY_URL"


def record(entry: str) -> None:
    with open(os.environ[RUN_LOG], "a", encoding="ascii") as log:
        log.write(entry + "\n")


def square(number: int) -> int:
    """rq's job."""
    record(f"square:{number}")
    return number * number


def make_celery(url: str):
    """A Celery app with the Redis broker and result backend at ``url``, and the ``compat.multiply`` task.

    Both sides build theirs with this: the worker from its environment, the test from its pool.
    """
    from celery import Celery

    app = Celery("compat", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        worker_prefetch_multiplier=1, result_expires=600,
        broker_connection_retry_on_startup=False, worker_hijack_root_logger=False,
    )

    @app.task(name="compat.multiply")
    def multiply(left: int, right: int) -> int:
        record(f"multiply:{left}")
        return left * right

    return app


# ``celery -A tests.compat.jobs worker`` finds this.
app = make_celery(os.environ[CELERY_URL]) if os.environ.get(CELERY_URL) else None


def run_rq_worker(url: str, queue_name: str) -> int:
    import redis
    from rq import Queue, Worker

    connection = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    worker = Worker([Queue(queue_name, connection=connection)], connection=connection)
    worker.work(burst=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["rq"] and len(sys.argv) == 4:
        sys.exit(run_rq_worker(sys.argv[2], sys.argv[3]))
    sys.exit(f"usage: {sys.argv[0]} rq URL QUEUE")
