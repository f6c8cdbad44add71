"""``twistd -n twinproxy`` as a real subprocess, loading the plugin from the install."""

from __future__ import annotations

import signal

import redis

from tests.servers import LOOPBACK, port_of


def test_twistd_serves_redis_py_and_pymemcache_and_stops_cleanly(redis_servers, memcached_servers, twistd,
                                                                 tmp_path) -> None:
    backends = redis_servers(2)
    caches = memcached_servers(2)
    config = tmp_path / "pools.yml"
    config.write_text(
        "alpha:\n"
        f"  listen: {LOOPBACK}:0\n"
        "  redis: true\n"
        "  timeout: 1000\n"
        "  preconnect: true\n"
        "  servers:\n" + "".join(f"   - {b.address}:1\n" for b in backends) +
        "beta:\n"
        f"  listen: {LOOPBACK}:0\n"
        "  timeout: 1000\n"
        "  servers:\n" + "".join(f"   - {c.address}:1\n" for c in caches))
    process = twistd(config)
    bound = process.bound()  # written once every pool listens
    port, cache_port = port_of(bound["pools"]["alpha"]), port_of(bound["pools"]["beta"])
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=5, socket_connect_timeout=1)
    assert client.ping()
    assert client.set("from-twistd", "yes")
    assert client.get("from-twistd") == b"yes"
    assert sum(b.client().exists("from-twistd") for b in backends) == 1
    from pymemcache import Client

    cache = Client((LOOPBACK, cache_port), timeout=5, default_noreply=False)
    assert cache.set("from-twistd", b"yes") is True
    assert cache.get("from-twistd") == b"yes"
    cache.close()
    process.proc.send_signal(signal.SIGTERM)
    # twistd re-raises the stop signal on itself once shut down cleanly.
    assert process.proc.wait(10) in (0, -signal.SIGTERM)
    assert "Server Shut Down" in process.output()
    assert "Traceback" not in process.output()


def test_twistd_refuses_a_bad_config_without_traceback(twistd, tmp_path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text("alpha:\n  listen: 127.0.0.1:1\n  distribution: nope\n  servers:\n   - 127.0.0.1:1:1\n")
    process = twistd(config)
    process.proc.wait(20)
    assert process.proc.returncode != 0
    output = process.output()
    assert "key 'distribution': value 'nope'" in output
    assert "Traceback" not in output
