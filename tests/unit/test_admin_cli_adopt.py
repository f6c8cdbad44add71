"""``twinproxy-admin adopt``: the pool file's pool checked and sent as ``POST /api/adopt``, the pool file
rewritten for the cluster, the refusals (exit 2) for pools that cannot be adopted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.unit.test_admin_cli import StandIn, run
from twinproxy.config import load_file

POOLS = """\
# the shop's cache
shop:
  listen: 127.0.0.1:22121
  redis: true
  hash: fnv1a_64
  hash_tag: "{}"
  distribution: ketama
  timeout: 400
  server_retry_timeout: 2000
  servers:
    - 127.0.0.1:7001:2 alpha
    - 127.0.0.1:7002:1
other:
  listen: 127.0.0.1:22122
  redis: true
  distribution: modula
  servers:
    - 127.0.0.1:7003:1
"""
ANSWER = {"ok": True, "generation": 1, "migrations": [{"id": 1, "from_group": 1, "adopt": True},
                                                    {"id": 2, "from_group": 2, "adopt": True}]}


@pytest.fixture
def dashboard():
    stand_in = StandIn()
    yield stand_in
    stand_in.close()


def pool_file(tmp_path: Path, text: str = POOLS) -> Path:
    path = tmp_path / "pools.yml"
    path.write_text(text)
    return path


def adopt(dashboard, path: Path, *more: str):
    return run(dashboard, "--token-file", str(token(path.parent)), "adopt", "--pool-file", str(path), "--pool",
               "shop", "--coordinator", "zookeeper://127.0.0.1:2181/tp", *more)


def token(directory: Path) -> Path:
    path = directory / "token"
    path.write_text("sesame\n")
    return path


def test_the_request_names_the_pool_s_ring_and_the_file_follows_the_cluster(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, ANSWER)
    path = pool_file(tmp_path)
    code, out, err = adopt(dashboard, path, "--output", str(path), "--cluster", "shop7")
    assert code == 0, err
    (seen,) = dashboard.seen
    assert seen["auth"] == "Bearer sesame"
    assert seen["body"] == {"pool": "shop", "hash": "fnv1a_64", "distribution": "ketama", "hash_tag": "{}",
                            "servers": [{"address": "127.0.0.1:7001", "name": "alpha", "weight": 2},
                                        {"address": "127.0.0.1:7002", "name": "127.0.0.1:7002", "weight": 1}]}
    assert "adoptions 1, 2 queued, paused" in out and "migration resume" in out and "comments" in out
    document = yaml.safe_load(path.read_text())
    assert document["shop"] == {"listen": "127.0.0.1:22121", "redis": True, "timeout": 400,
                                "server_retry_timeout": 2000, "cluster": "shop7",
                                "coordinator": "zookeeper://127.0.0.1:2181/tp"}
    assert document["other"] == yaml.safe_load(POOLS)["other"]
    shop, other = load_file(str(path))        # the proxy accepts it
    assert shop.cluster == "shop7" and other.servers


def test_without_output_the_file_is_printed_and_left_alone(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, ANSWER)
    path = pool_file(tmp_path)
    code, out, _ = adopt(dashboard, path)
    assert code == 0 and "cluster: shop" in out and path.read_text() == POOLS


def test_a_refusal_of_the_dashboard_writes_no_file(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (409, {"error": "cluster 'shop' is not empty"})
    path = pool_file(tmp_path)
    code, _, err = adopt(dashboard, path, "--output", str(path))
    assert code == 1 and "not empty" in err and path.read_text() == POOLS


@pytest.mark.parametrize("change, words", [
    (("distribution: ketama", "distribution: random"), "random"),
    (("timeout: 400", "timeout: 400\n  auto_eject_hosts: true"), "auto_eject_hosts"),
    (("timeout: 400", "timeout: 400\n  redis_db: 2"), "database 0"),
    (("redis: true\n  hash: fnv1a_64", "redis: false\n  hash: fnv1a_64"), "memcached"),
    (("    - 127.0.0.1:7002:1\n", "    - /tmp/redis.sock:1\n"), "unix socket"),
    (("shop:\n", "shoppe:\n"), "has no pool 'shop'"),
    (("listen: 127.0.0.1:22121", "listen: [nonsense"), "YAML"),
])
def test_pools_that_cannot_be_adopted_are_refused_before_asking(dashboard, tmp_path, change, words) -> None:
    path = pool_file(tmp_path, POOLS.replace(*change, 1))
    code, _, err = adopt(dashboard, path, "--output", str(path))
    assert code == 2 and words in err and dashboard.seen == []
