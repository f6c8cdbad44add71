"""The dashboard's status document (``GET /api/status``, contract §5), built from the controller's state.

Contract fields: cluster, protocol, generation, groups (id, servers with
addr / role / up), slots (runs), offline_slots, slots_per_group, proxies
(id, addr, admin, generation, last_seen, pid, host), sentinels, dashboard,
change.  Extra fields: per server ``actual_role`` / ``replicates`` /
``link_up`` / ``error`` / ``checked`` (what the last poll found: ``role`` is
the topology's), per group ``slots``; ``lagging`` (proxies behind the
generation), ``sentinel_status``, ``writable``, ``problem``, ``busy``.
A memcache group has no master: each of its servers is listed as
``"master"`` (each serves its share).  ``last_seen`` is the proxy's own
``updated`` time (unix seconds) from its registration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from twinproxy.cluster.model import Topology

if TYPE_CHECKING:
    from twinproxy.dashboard.controller import Controller


def _server(controller: "Controller", address: str, role: str) -> Dict[str, Any]:
    health = controller.health.health.get(address)
    replicates: Optional[str] = None
    if health is not None and health.master is not None:
        host, port = health.master
        replicates = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"addr": address, "role": role, "up": bool(health and health.up),
            "actual_role": health.role if health else None, "replicates": replicates,
            "link_up": health.link_up if health and health.role == "replica" else None,
            "error": health.error if health else None, "checked": health.checked if health else None}


def status_document(controller: "Controller") -> Dict[str, Any]:
    """The /api/status object for ``controller`` (before the topology is loaded: an empty cluster)."""
    topology: Topology = controller.topology or Topology.empty(controller.cluster, controller.protocol)
    counts = topology.slot_counts()
    groups: List[Dict[str, Any]] = []
    for group in topology.groups:
        servers = [_server(controller, address,
                           "master" if index == 0 or topology.protocol == "memcache" else "replica")
                   for index, address in enumerate(group.servers)]
        groups.append({"id": group.id, "servers": servers, "slots": counts.get(group.id, 0)})
    sentinel_status = []
    for address in topology.sentinels:
        health = controller.health.health.get(address)
        sentinel_status.append({"addr": address, "up": bool(health and health.up),
                                "error": health.error if health else None})
    return {
        "cluster": topology.cluster, "protocol": topology.protocol, "generation": topology.generation,
        "groups": groups, "slots": topology.runs(), "offline_slots": topology.offline_slots,
        "slots_per_group": {str(gid): count for gid, count in sorted(counts.items())},
        "proxies": controller.proxies(), "lagging": controller.acks.lagging(topology.generation),
        "sentinels": list(topology.sentinels), "sentinel_status": sentinel_status,
        "dashboard": dict(controller.dashboard), "change": topology.change,
        "writable": controller.writable, "problem": controller.problem, "busy": controller.busy,
    }
