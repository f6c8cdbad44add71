#!/usr/bin/env bash
# Run twinproxy in the foreground on conf/sentinel.yml with a local Sentinel
# set-up: shards s1 (master 127.0.0.1:6390, replica :6391) and s2 (:6392,
# :6393), and three sentinels (:26390-:26392), all stopped again when the
# proxy exits (Ctrl-C).  Then fail a shard over and watch the proxy follow.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
rundir="$PWD/run/sentinel"
rm -rf "$rundir"
mkdir -p "$rundir"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Sentinel rewrites the config files of the nodes it reconfigures: one file each.
start_redis() {   # port [master-port]
    local dir="$rundir/redis-$1"
    mkdir -p "$dir"
    {
        echo "port $1"; echo "bind 127.0.0.1"; echo "daemonize no"; echo "dir $dir"
        echo "logfile $dir/redis.log"; echo 'save ""'; echo "appendonly no"; echo "protected-mode no"
        echo "repl-diskless-sync yes"; echo "repl-diskless-sync-delay 0"
        [ -n "${2:-}" ] && echo "replicaof 127.0.0.1 $2"
    } >"$dir/redis.conf"
    redis-server "$dir/redis.conf" &
    pids+=($!)
}
start_redis 6390; start_redis 6391 6390; start_redis 6392; start_redis 6393 6392

linked() { redis-cli -p "$1" info replication 2>/dev/null | grep -q 'master_link_status:up'; }
for _ in $(seq 100); do linked 6391 && linked 6393 && break; sleep 0.1; done
if ! linked 6391 || ! linked 6393; then
    echo "twinproxy sentinel demo: the replicas did not link (is a port of 6390-6393 taken?); logs in $rundir" >&2
    exit 1
fi

# Each sentinel needs a writable file of its own, without a myid (it writes one).
for port in 26390 26391 26392; do
    dir="$rundir/sentinel-$port"
    mkdir -p "$dir"
    {
        echo "port $port"; echo "bind 127.0.0.1"; echo "daemonize no"; echo "dir $dir"
        echo "logfile $dir/sentinel.log"; echo "protected-mode no"
        for shard in "s1 6390" "s2 6392"; do
            set -- $shard
            echo "sentinel monitor $1 127.0.0.1 $2 2"
            echo "sentinel down-after-milliseconds $1 1000"
            echo "sentinel failover-timeout $1 3000"
            echo "sentinel parallel-syncs $1 1"
        done
    } >"$dir/sentinel.conf"
    redis-sentinel "$dir/sentinel.conf" &
    pids+=($!)
done
quorum() { redis-cli -p "$1" sentinel ckquorum "$2" 2>/dev/null | grep -q '^OK 3'; }
for _ in $(seq 150); do quorum 26390 s1 && quorum 26390 s2 && break; sleep 0.1; done
if ! quorum 26390 s1 || ! quorum 26390 s2; then
    echo "twinproxy sentinel demo: the sentinels did not reach quorum (is a port of 26390-26392 taken?);" \
         "logs in $rundir" >&2
    exit 1
fi

cat <<'MSG'
twinproxy sentinel demo: shards s1 (127.0.0.1:6390 + replica :6391) and s2 (:6392 + :6393), sentinels :26390-:26392
  through the proxy:   redis-cli -p 22123 set a b
  fail s1 over:        redis-cli -p 26390 sentinel failover s1      (or kill its master: the proxy follows)
  where the masters are now, per the proxy:   redis-cli -p 22222 | python3 -m json.tool | grep -A3 '"s1"'
  ask the sentinels:   .venv/bin/twinproxy --check-sentinels -c conf/sentinel.yml
Ctrl-C stops the proxy, the sentinels and the servers.
MSG
"$VENV/bin/twistd" --nodaemon --pidfile= twinproxy --config conf/sentinel.yml --stats-addr 127.0.0.1
