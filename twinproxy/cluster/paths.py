"""Where a cluster lives in its coordinator: one place for the layout every component reads or writes.

``/clusters/<cluster>/topology`` (the document, written by the dashboard),
``.../dashboard`` (its lock), ``.../proxies/<id>`` (each proxy's
registration and acknowledgement) and ``.../migration-progress`` (the
sweep's counters, no generation).  Pure: no Twisted.
"""

from __future__ import annotations


def cluster_path(cluster: str) -> str:
    return f"/clusters/{cluster}"


def topology_path(cluster: str) -> str:
    return f"{cluster_path(cluster)}/topology"


def proxies_path(cluster: str) -> str:
    return f"{cluster_path(cluster)}/proxies"


def dashboard_path(cluster: str) -> str:
    return f"{cluster_path(cluster)}/dashboard"


def progress_path(cluster: str) -> str:
    return f"{cluster_path(cluster)}/migration-progress"
