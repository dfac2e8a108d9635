#!/bin/bash
# User-space instructions per aggregate of three steps against per three proxied requests,
# the CPU target of issue 11 counted instead of timed: the loadtest harness's `aggregate`
# setup (three origins answering 1 KiB of dense JSON, an array of small objects; request ids
# and traceparent off; no shapes), the origins here being nginx. Counted by valgrind's
# callgrind on the epoll driver like run.sh: whole-process instructions after N1 and after N2
# requests, the difference divided by N2 - N1; "3 proxied" is three requests, one to each
# step's route, one after another on one connection.
#
# usage: docs/perf/instructions/run-aggregate.sh GATEWAY_BIN [GATEWAY_BIN...]
# needs: valgrind, nginx, python3. Uses 127.0.0.1 ports 7310, 7311, 7319 and /tmp/vg-agg.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=/tmp/vg-agg
rm -rf "$work" && mkdir -p "$work"
# The harness's dense body (loadtest/src/aggregate.rs, json_body) for steps 0, 1 and 2.
body() {
    python3 - "$1" <<'PY'
import sys
k = int(sys.argv[1])
s = '{"s%d_id":%d,"s%d_items":[' % (k, k, k)
i = 0
while len(s) < 1000:
    if i > 0:
        s += ","
    s += '{"n":%d,"v":"value-%04d"}' % (i, i)
    i += 1
print(s + "]}", end="")
PY
}
{
    echo "worker_processes 1; daemon off; error_log $work/ng.err warn; pid $work/ng.pid;"
    echo "events { worker_connections 1024; }"
    echo "http { access_log off; keepalive_requests 10000000; client_body_temp_path $work;"
    echo "  server { listen 127.0.0.1:7311; default_type application/json;"
    for k in 0 1 2; do echo "    location = /s$k { return 200 '$(body $k)'; }"; done
    echo "  }"
    echo "}"
} > "$work/nginx.conf"
{
    printf 'workers = 1\n[[listeners]]\naddress = "127.0.0.1:7310"\n'
    printf '[upstream_pool]\nmax_idle_per_target = 4096\n'
    printf '[tracing]\nrequest_id = false\ntraceparent = false\n'
    printf '[admin]\nlisten = "127.0.0.1:7319"\ntoken = "vg-admin-token-0123456789"\n'
    printf '[[aggregates]]\nid = "agg"\ndeadline_ms = 5000\n'
    for k in 0 1 2; do printf '[[aggregates.steps]]\nid = "s%d"\nupstream = "o%d"\npath = "/s%d"\n' $k $k $k; done
    for k in 0 1 2; do
        printf '[[upstreams]]\nid = "o%d"\ntargets = [{ address = "127.0.0.1:7311" }]\n' $k
        printf '[[routes]]\nid = "s%d"\npath = "/s%d"\nupstream = "o%d"\n' $k $k $k
    done
    printf '[[routes]]\nid = "agg"\npath = "/agg"\naggregate = "agg"\n'
} > "$work/gw.toml"
nginx -p "$work" -c "$work/nginx.conf" &
ngpid=$!
trap 'kill $ngpid 2>/dev/null || true' EXIT
sleep 0.5
count() { # BIN N PATH... -> instructions
    local bin=$1 n=$2
    shift 2
    rm -rf "$work/data"
    GATEWAY_IO_DRIVER=epoll valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
        "$bin" --config "$work/gw.toml" --data-dir "$work/data" > "$work/gw.log" 2>&1 &
    local vpid=$!
    for _ in $(seq 1 300); do (echo > /dev/tcp/127.0.0.1/7310) 2>/dev/null && break; sleep 0.1; done
    python3 "$here/client.py" "$n" "$@"
    kill -TERM $vpid; wait $vpid || true
    grep -E "Collected" "$work/gw.log" | awk '{print $NF}'
}
for bin in "$@"; do
    a=$(count "$bin" 200 /agg); b=$(count "$bin" 1200 /agg)
    agg=$(( (b - a) / 1000 ))
    cp "$work/cg.out" "$work/cg-agg.out"
    a=$(count "$bin" 600 /s0 /s1 /s2); b=$(count "$bin" 3600 /s0 /s1 /s2)
    three=$(( (b - a) / 1000 ))
    echo "$bin: $agg instructions per aggregate, $three per 3 proxied requests (ratio $(python3 -c "print(round($agg / $three, 3))"))"
done
