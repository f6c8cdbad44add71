#!/usr/bin/env bash
# A small local cluster in the foreground (Ctrl-C stops everything): the file
# coordinator in run/cluster/coordinator, a dashboard on 127.0.0.1:18080 (its
# write token in run/cluster/token), two groups of a master and a replica
# (127.0.0.1:6400+:6401, :6402+:6403), slots 0-511 on group 1 and 512-1023 on
# group 2, and one proxy on 127.0.0.1:19000 following the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
rundir="$PWD/run/cluster"
rm -rf "$rundir"
mkdir -p "$rundir/coordinator"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for port in 6400 6401 6402 6403; do
    mkdir -p "$rundir/redis-$port"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$rundir/redis-$port" --save "" --appendonly no \
        --logfile "$rundir/redis-$port/redis.log" --protected-mode no &
    pids+=($!)
done
for port in 6400 6401 6402 6403; do
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    redis-cli -p "$port" ping >/dev/null 2>&1 || {
        echo "twinproxy cluster demo: redis-server on 127.0.0.1:$port did not start (port taken?)" >&2; exit 1; }
done

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$rundir/token"
coordinator="file://$rundir/coordinator"
"$VENV/bin/twinproxy-dashboard" --coordinator "$coordinator" --cluster demo --listen 127.0.0.1:18080 \
    --token-file "$rundir/token" >"$rundir/dashboard.log" 2>&1 &
pids+=($!)
admin() { "$VENV/bin/twinproxy-admin" --dashboard 127.0.0.1:18080 --token-file "$rundir/token" "$@"; }
for _ in $(seq 100); do admin status >/dev/null 2>&1 && break; sleep 0.1; done
admin status >/dev/null || { echo "twinproxy cluster demo: the dashboard did not start:" >&2;
                             cat "$rundir/dashboard.log" >&2; exit 1; }
admin group add 1 >/dev/null
admin server add 1 127.0.0.1:6400 >/dev/null
admin server add 1 127.0.0.1:6401 >/dev/null
admin group add 2 >/dev/null
admin server add 2 127.0.0.1:6402 >/dev/null
admin server add 2 127.0.0.1:6403 >/dev/null
admin slots assign 0-511 1 >/dev/null
admin slots assign 512-1023 2 >/dev/null

sed "s|file://./run/cluster/coordinator|$coordinator|" conf/cluster.yml >"$rundir/pools.yml"
cat <<MSG
twinproxy cluster demo: dashboard 127.0.0.1:18080, groups 1 (127.0.0.1:6400 + replica :6401) and 2 (:6402 + :6403)
  through the proxy:   redis-cli -p 19000 set a b          (a is in slot 579: group 2)
  the web dashboard:   http://127.0.0.1:18080/   (actions ask for the token in run/cluster/token)
  the cluster:         .venv/bin/twinproxy-admin --dashboard 127.0.0.1:18080 status
  a manual failover:   .venv/bin/twinproxy-admin --dashboard 127.0.0.1:18080 --token-file run/cluster/token \\
                           server promote 1 127.0.0.1:6401
Ctrl-C stops the proxy, the dashboard and the servers.
MSG
"$VENV/bin/twinproxy" -c "$rundir/pools.yml" -s 22223 -a 127.0.0.1
