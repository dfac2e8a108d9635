#!/bin/bash
# User-space instructions per proxied HTTP/2 request (h2c with prior knowledge, h2load with 10
# connections of 10 streams each, 13-byte answer, default config plus `h2c = true`), counted
# by valgrind's callgrind on the epoll driver like run.sh: whole-process instructions after N1
# and after N2 requests, the difference divided by N2 - N1.
#
# usage: docs/perf/instructions/run-h2.sh GATEWAY_BIN [GATEWAY_BIN...]
# needs: valgrind, nginx, h2load (nghttp2-client). Uses 127.0.0.1 ports 7310, 7311, 7319 and
# /tmp/vg-instr-h2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=/tmp/vg-instr-h2
rm -rf "$work" && mkdir -p "$work"
sed "s|/tmp/vg|$work|g" "$here/nginx.conf" > "$work/nginx.conf"
sed 's/^address = "127.0.0.1:7310"$/address = "127.0.0.1:7310"\nh2c = true/' "$here/gw.toml" > "$work/gw.toml"
nginx -p "$work" -c "$work/nginx.conf" &
ngpid=$!
trap 'kill $ngpid 2>/dev/null || true' EXIT
sleep 0.5
count() { # BIN N -> instructions
    rm -rf "$work/data"
    GATEWAY_IO_DRIVER=epoll valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
        "$1" --config "$work/gw.toml" --data-dir "$work/data" > "$work/gw.log" 2>&1 &
    local vpid=$!
    for _ in $(seq 1 300); do (echo > /dev/tcp/127.0.0.1/7310) 2>/dev/null && break; sleep 0.1; done
    h2load -n "$2" -c 10 -m 10 http://127.0.0.1:7310/ > "$work/h2load.log"
    grep -q "$2 succeeded, 0 failed" "$work/h2load.log" || { cat "$work/h2load.log" >&2; exit 1; }
    kill -TERM $vpid; wait $vpid || true
    grep -E "Collected" "$work/gw.log" | awk '{print $NF}'
}
for bin in "$@"; do
    a=$(count "$bin" 2000); b=$(count "$bin" 12000)
    echo "$bin: $(( (b - a) / 10000 )) instructions per HTTP/2 request ($a after 2000, $b after 12000)"
done
