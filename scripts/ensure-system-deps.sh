#!/usr/bin/env bash
# Make sure the system programs twinproxy's demo and tests need are present:
# a Python with venv, redis-server/redis-sentinel/redis-cli/redis-benchmark, memcached,
# ZooKeeper and etcd (cluster mode's coordinators), libmemcached's tools and
# chromium with its chromedriver (the web dashboard's browser tests), nodejs and npm (the compat
# group's Node clients).  Installs them with apt-get when running as root on
# Debian; otherwise says exactly what to install and fails.  A C compiler and
# the Python headers (for twinproxy's optional C scanners) are installed too
# when root; without them the install goes on in pure Python, with a warning.
set -euo pipefail

PYTHON=${PYTHON:-python3}
missing=()
# --bench: the benchmark also wants nutcracker and PyPy; --pypy: PyPy alone.
case "${1:-}" in
    --bench)
        command -v nutcracker >/dev/null 2>&1 || missing+=(nutcracker)
        command -v pypy3 >/dev/null 2>&1 || missing+=(pypy3 pypy3-venv) ;;
    --pypy)
        command -v pypy3 >/dev/null 2>&1 || missing+=(pypy3 pypy3-venv) ;;
esac
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# Sentinel mode's tests and demo run real sentinels (Debian ships them apart).
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
command -v memcached >/dev/null 2>&1 || missing+=(memcached)
command -v memccapable >/dev/null 2>&1 || missing+=(libmemcached-tools)
# Cluster mode's tests run real coordinators: ZooKeeper 3.8 (on a headless JRE) and etcd 3.4.
[ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
# The web dashboard's browser tests (tests/browser/) drive Debian's chromium through its chromedriver;
# fonts-liberation is only a Recommends of chromium, and without it the page's text renders as boxes.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ -d /usr/share/fonts/truetype/liberation ] || missing+=(fonts-liberation)
# The compat group's Node clients (tests/compat/node/: ioredis, BullMQ, installed from npm by the tests).
command -v node >/dev/null 2>&1 || command -v nodejs >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

# Wanted, not required: the install builds twinproxy/_speedups.c with them.
# Once they are there (or CI is set), the test session refuses to run
# without the built module (tests/conftest.py), so it cannot go missing silently.
wanted=()
if "$PYTHON" -c 'import platform, sys; sys.exit(platform.python_implementation() != "CPython")' 2>/dev/null; then
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || wanted+=(gcc)
    "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
        || wanted+=(python3-dev)
fi
if [ ${#wanted[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        missing+=("${wanted[@]}")
    else
        echo "twinproxy: no ${wanted[*]}: the C scanners will not be built (pure Python, slower);" \
             "sudo apt-get install ${wanted[*]} to have them" >&2
    fi
fi

[ ${#missing[@]} -eq 0 ] && exit 0
# Deduplicate while keeping order.
packages=$(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++' | tr '\n' ' ')

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "twinproxy: installing system packages: $packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $packages >/dev/null
    # Debian starts the packaged daemons; the demo and tests run their own.
    for unit in redis-server redis-sentinel memcached etcd zookeeper; do
        if command -v systemctl >/dev/null 2>&1; then systemctl stop "$unit" >/dev/null 2>&1 || true; fi
        service "$unit" stop >/dev/null 2>&1 || true
    done
    exit 0
fi

echo "twinproxy: missing system packages: $packages" >&2
echo "install them first, e.g.:  sudo apt-get install $packages" >&2
exit 1
