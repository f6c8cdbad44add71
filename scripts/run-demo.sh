#!/usr/bin/env bash
# Run twinproxy in the foreground on conf/pools.yml with local demo backends:
# two redis-servers (127.0.0.1:6380, :6381) and two memcacheds (:11212,
# :11213), all stopped again when the proxy exits (Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
rundir="$PWD/run"
mkdir -p "$rundir"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for port in 6380 6381; do
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --dir "$rundir" --daemonize no --logfile "$rundir/redis-$port.log" &
    pids+=($!)
done
for port in 11212 11213; do
    memcached -u nobody -l "127.0.0.1:$port" -U 0 >"$rundir/memcached-$port.log" 2>&1 &
    pids+=($!)
done

# Every backend must be up before the proxy starts, or the demo says which is not.
for _ in $(seq 50); do
    up=0
    for port in 6380 6381 11212 11213; do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && up=$((up + 1))
    done
    [ "$up" = 4 ] && break
    sleep 0.1
done
if [ "$up" != 4 ]; then
    echo "twinproxy demo: a backend did not start (is a port of 6380, 6381, 11212, 11213 taken?); logs in $rundir" >&2
    exit 1
fi

cat <<'MSG'
twinproxy demo: backends started (redis 127.0.0.1:6380 and :6381, memcached :11212 and :11213)
  redis pool:     redis-cli -p 22121 set a b
  memcached pool: .venv/bin/python -c "from pymemcache import Client; c = Client(('127.0.0.1', 22122)); c.set('a', 'b'); print(c.get('a'))"
  web dashboard:  http://127.0.0.1:22220/   (read-only; also /metrics, /stats, /health)
Ctrl-C stops the proxy and the demo backends.
MSG
"$VENV/bin/twistd" --nodaemon --pidfile= twinproxy --config conf/pools.yml --stats-addr 127.0.0.1 \
    --http-port 22220 --http-addr 127.0.0.1
