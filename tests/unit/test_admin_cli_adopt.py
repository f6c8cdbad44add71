"""``twinproxy-admin adopt``: the pool file's pool checked and sent as ``POST /api/adopt``, the pool file
rewritten for the cluster, the refusals (exit 2) for pools that cannot be adopted; a resume (``--resume``, or
the rewritten pool file given again) after an adoption entry was cancelled or failed."""

from __future__ import annotations

import json
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
                                        {"address": "127.0.0.1:7002", "name": "127.0.0.1:7002", "weight": 1}],
                            "protocol": "redis", "cluster": "shop7"}
    assert "adoptions 1, 2 queued, paused" in out and "migration resume" in out and "comments" in out
    document = yaml.safe_load(path.read_text())
    assert document["shop"] == {"listen": "127.0.0.1:22121", "redis": True, "timeout": 400,
                                "server_retry_timeout": 2000, "cluster": "shop7",
                                "coordinator": "zookeeper://127.0.0.1:2181/tp"}
    assert document["other"] == yaml.safe_load(POOLS)["other"]
    shop, other = load_file(str(path))        # the proxy accepts it
    assert shop.cluster == "shop7" and other.servers


def test_the_next_steps_name_this_dashboard_token_file_file_and_adoptions(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, {**ANSWER, "generation": 7})
    path = pool_file(tmp_path)
    code, out, err = adopt(dashboard, path, "--output", str(path))
    assert code == 0 and err == "", err           # hash_tag "{}": no warning
    steps = out[out.index("next:"):].splitlines()
    admin = f"twinproxy-admin --dashboard {dashboard.address}"
    assert steps == [
        "next:",
        f"  1. every proxy serving pool 'shop': reload {path} (kill -HUP, or POST /reload)",
        f"  2. {admin} proxy list   (each of them registered, at generation 7 or later)",
        f"  3. {admin} --token-file {tmp_path / 'token'} migration resume   (resumes adoptions 1, 2: one at a time; "
        "no key moves before this)",
        f"  4. {admin} migration wait"]
    assert "--token-file F " not in out                     # the placeholder is gone


def test_without_a_token_file_none_is_shown_and_one_adoption_is_named(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, {"ok": True, "generation": 3, "migrations": [
        {"id": 12, "from_group": 1, "adopt": True}]})
    path = pool_file(tmp_path, POOLS.replace("    - 127.0.0.1:7002:1\n", "", 1))
    spaced = tmp_path / "new pools.yml"
    code, out, _ = run(dashboard, "adopt", "--pool-file", str(path), "--pool", "shop", "--coordinator",
                       "file:///tmp/c", "--output", str(spaced))
    assert code == 0
    assert f"reload '{spaced}' (kill -HUP" in out                   # quoted for the shell
    assert f"  3. twinproxy-admin --dashboard {dashboard.address} migration resume   (resumes adoption 12; no" in out
    assert "--token-file" not in out


@pytest.mark.parametrize("tag, shown", [(None, "has no hash_tag"), ("ab", 'has hash_tag "ab"'),
                                        ("::", 'has hash_tag "::"')])
def test_a_pool_whose_hash_tag_is_not_braces_is_adopted_with_a_warning(dashboard, tmp_path, tag, shown) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, ANSWER)
    path = pool_file(tmp_path, POOLS.replace('  hash_tag: "{}"\n', f'  hash_tag: "{tag}"\n' if tag else "", 1))
    code, out, err = adopt(dashboard, path, "--output", str(path))
    assert code == 0 and "adoptions 1, 2 queued" in out
    assert dashboard.seen[0]["body"]["hash_tag"] == tag
    (line,) = err.splitlines()
    assert line.startswith(f"twinproxy-admin: warning: pool 'shop' {shown}, but a cluster groups keys by {{...}} "
                           "only"), line
    assert "CROSSSLOT" in line and "MGET, MSET, DEL" in line
    # --json: the same warning on stderr, and in the document; stdout stays one JSON object.
    path = pool_file(tmp_path, POOLS.replace('  hash_tag: "{}"\n', f'  hash_tag: "{tag}"\n' if tag else "", 1))
    code, out, err = adopt(dashboard, path, "--json")
    assert code == 0 and err.splitlines() == [line]
    assert json.loads(out)["warnings"] == [line.partition("twinproxy-admin: ")[2]]


def test_the_warning_is_given_even_when_the_dashboard_refuses(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (409, {"error": "cluster 'shop' is not empty"})
    path = pool_file(tmp_path, POOLS.replace('  hash_tag: "{}"\n', "", 1))
    code, _, err = adopt(dashboard, path, "--output", str(path))
    assert code == 1 and "warning: pool 'shop' has no hash_tag" in err and "not empty" in err


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
    (("    - 127.0.0.1:7002:1\n", "    - /tmp/redis.sock:1\n"), "unix socket"),
    (("shop:\n", "shoppe:\n"), "has no pool 'shop'"),
    (("listen: 127.0.0.1:22121", "listen: [nonsense"), "YAML"),
])
def test_pools_that_cannot_be_adopted_are_refused_before_asking(dashboard, tmp_path, change, words) -> None:
    path = pool_file(tmp_path, POOLS.replace(*change, 1))
    code, _, err = adopt(dashboard, path, "--output", str(path))
    assert code == 2 and words in err and dashboard.seen == []


RESUMED = {"ok": True, "generation": 12, "resumed": True, "pool": "shop", "done": [2],
           "migrations": [{"id": 4, "from_group": 1, "adopt": True, "state": "pending", "paused": True,
                           "keys_per_second": 1500}],
           "migration": {"id": 4, "from_group": 1}}


def resume(dashboard, directory: Path, *more: str):
    return run(dashboard, "--token-file", str(token(directory)), "adopt", "--resume", *more)


def test_resume_asks_the_cluster_to_queue_the_servers_left_and_says_what_it_queued(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, RESUMED)
    code, out, err = resume(dashboard, tmp_path, "--cluster", "shop", "--coordinator", "zookeeper://z:2181/tp")
    assert code == 0, err
    (seen,) = dashboard.seen
    assert seen["body"] == {"resume": True, "cluster": "shop"} and seen["auth"] == "Bearer sesame"
    assert ("the adoption of pool 'shop' by cluster 'shop' resumed (generation 12): adoptions 4 (group 1) queued, "
            "paused, at most 1500 keys/s each; the keys of group 2 have moved already") in out
    admin = f"twinproxy-admin --dashboard {dashboard.address}"
    assert out[out.index("next:"):].splitlines() == [        # the proxies follow the cluster already
        "next:",
        f"  1. {admin} proxy list   (every proxy serving the pool registered: they follow the cluster)",
        f"  2. {admin} --token-file {tmp_path / 'token'} migration resume   (resumes adoption 4; no key moves "
        "before this)",
        f"  3. {admin} migration wait"]
    code, out, err = resume(dashboard, tmp_path, "--cluster", "shop", "--pool", "shop", "--keys-per-second", "50",
                            "--json")
    assert code == 0, err
    assert dashboard.seen[-1]["body"] == {"resume": True, "cluster": "shop", "pool": "shop", "keys_per_second": 50}
    document = json.loads(out)
    assert document["resumed"] is True and document["migration"]["id"] == 4 and document["pool_file"] is None


def test_the_rewritten_pool_file_given_again_means_resume(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, ANSWER)
    path = pool_file(tmp_path)
    assert adopt(dashboard, path, "--output", str(path), "--cluster", "shop7")[0] == 0
    rewritten = path.read_text()
    dashboard.answers[("POST", "/api/adopt")] = (200, RESUMED)
    # The very same command line, after a cancel: the pool follows the cluster now, so it is a resume.
    code, out, err = adopt(dashboard, path, "--output", str(path), "--cluster", "shop7")
    assert code == 0, err
    assert dashboard.seen[-1]["body"] == {"resume": True, "cluster": "shop7", "pool": "shop"}
    assert "resumed" in out and path.read_text() == rewritten
    code, _, _ = run(dashboard, "--token-file", str(token(tmp_path)), "adopt", "--pool-file", str(path), "--pool",
                     "shop")
    assert code == 0 and dashboard.seen[-1]["body"] == {"resume": True, "cluster": "shop7", "pool": "shop"}
    asked = len(dashboard.seen)
    for more, words in ((("--cluster", "shop"), "follows cluster 'shop7' at zookeeper://127.0.0.1:2181/tp already, "
                                                "not --cluster shop"),
                        (("--coordinator", "etcd://127.0.0.1:2379/tp"), "not --coordinator etcd://")):
        code, _, err = run(dashboard, "--token-file", str(token(tmp_path)), "adopt", "--pool-file", str(path),
                           "--pool", "shop", *more)
        assert code == 2 and words in err, err
    assert len(dashboard.seen) == asked


def test_a_refused_resume_is_the_dashboard_s_reason(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (409, {"error": "the adoption of pool 'shop' is under way: "
                                                                "adoption 2 (group 1's keys) is migrating"})
    code, _, err = resume(dashboard, tmp_path, "--cluster", "shop")
    assert code == 1 and "adoption 2 (group 1's keys) is migrating" in err


@pytest.mark.parametrize("args, words", [
    (("--resume",), "--resume needs --cluster NAME"),
    (("--resume", "--cluster", "shop", "--pool-file", "pools.yml"), "--resume takes no --pool-file"),
    (("--resume", "--cluster", "shop", "--output", "pools.yml"), "--resume writes no pool file"),
    (("--coordinator", "zookeeper://z:2181/tp"), "adopt needs --pool-file FILE and --pool NAME (or, to resume"),
    (("--pool-file", "pools.yml"), "adopt needs --pool-file FILE and --pool NAME"),
])
def test_options_that_do_not_go_together_are_refused_before_asking(dashboard, tmp_path, args, words) -> None:
    code, _, err = run(dashboard, "--token-file", str(token(tmp_path)), "adopt", *args)
    assert code == 2 and words in err, err
    assert dashboard.seen == []


def test_a_first_adoption_needs_the_coordinator(dashboard, tmp_path) -> None:
    path = pool_file(tmp_path)
    code, _, err = run(dashboard, "--token-file", str(token(tmp_path)), "adopt", "--pool-file", str(path),
                       "--pool", "shop")
    assert code == 2 and "adopt needs --coordinator URL" in err and dashboard.seen == []


MEMCACHE_POOLS = POOLS.replace("redis: true\n  hash: fnv1a_64", "redis: false\n  hash: fnv1a_64", 1)


def test_a_memcached_pool_is_adopted_with_a_warm_up_and_no_tag_warning(dashboard, tmp_path) -> None:
    dashboard.answers[("POST", "/api/adopt")] = (200, ANSWER)
    path = pool_file(tmp_path, MEMCACHE_POOLS.replace('hash_tag: "{}"', 'hash_tag: "::"'))
    code, out, err = adopt(dashboard, path, "--output", str(path))
    assert code == 0 and "warning" not in err, err
    body = dashboard.seen[-1]["body"]
    assert (body["protocol"], body["warmup_seconds"], body["distribution"]) == ("memcache", 60, "ketama")
    assert "keys_per_second" not in body and "adoptions 1, 2 queued, paused" in out
    assert yaml.safe_load(path.read_text())["shop"]["cluster"] == "shop"
    path = pool_file(tmp_path, MEMCACHE_POOLS)
    code, _, err = adopt(dashboard, path, "--output", str(path), "--warmup-seconds", "5")
    assert code == 0 and dashboard.seen[-1]["body"]["warmup_seconds"] == 5, err


@pytest.mark.parametrize("text, more, words", [
    (POOLS, ("--warmup-seconds", "5"), "is a Redis pool: its keys are moved, not warmed up"),
    (MEMCACHE_POOLS, ("--keys-per-second", "5"), "is a memcached pool: its items are not moved"),
    (MEMCACHE_POOLS.replace("timeout: 400", "timeout: 400\n  auto_eject_hosts: true", 1), (), "auto_eject_hosts"),
    (MEMCACHE_POOLS.replace("distribution: ketama", "distribution: random", 1), (), "random"),
    (MEMCACHE_POOLS.replace("    - 127.0.0.1:7002:1\n", "    - /tmp/mc.sock:1\n", 1), (), "unix socket"),
])
def test_tuning_of_the_other_protocol_and_memcached_pools_that_cannot_be_adopted_are_refused(
        dashboard, tmp_path, text, more, words) -> None:
    path = pool_file(tmp_path, text)
    code, _, err = adopt(dashboard, path, "--output", str(path), *more)
    assert code == 2 and words in err and dashboard.seen == [], err
    assert path.read_text() == text


@pytest.mark.parametrize("password, user", [("0123", "on"), ("12:30", "yes"), ("true", "null"), ("~", "0x1f"),
                                            ("pass word", "alice")])
def test_the_rewritten_file_keeps_every_value_as_the_proxy_read_it(dashboard, tmp_path, password, user) -> None:
    # The proxy (and nutcracker) read every scalar as a string: the rewrite must not let YAML 1.1 turn
    # redis_auth 0123 into 83, 12:30 into 750, or yes into true, or the proxies would log in with another password.
    dashboard.answers[("POST", "/api/adopt")] = (200, ANSWER)
    text = POOLS.replace("  timeout: 400\n", f"  timeout: 400\n  redis_auth: {password}\n  redis_auth_user: {user}\n",
                         1)
    path = pool_file(tmp_path, text)
    (before, _) = load_file(str(path))
    code, _, err = adopt(dashboard, path, "--output", str(path))
    assert code == 0, err
    shop, other = load_file(str(path))
    assert (shop.redis_auth, shop.redis_auth_user, shop.timeout) == (password, user, 400)
    assert (before.redis_auth, before.redis_auth_user) == (password, user)
    assert other.servers
