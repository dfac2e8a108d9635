#!/bin/bash
# User-space instructions per plain proxied request (13-byte answer, keep-alive, default
# config: request ids and traceparent on), counted by valgrind's callgrind on the epoll driver
# (valgrind does not run io_uring): total instructions after N1 and after N2 requests, the
# difference divided by N2 - N1. Steady to about 1% on a quiet machine, unlike timings on a
# shared VM; on a busy one the whole-process count moves with the client's pace (see VG_EXTRA).
#
# usage: [GW_TOML=config.toml] docs/perf/instructions/run.sh GATEWAY_BIN [GATEWAY_BIN...]
# (VG_EXTRA: more callgrind options, e.g. VG_EXTRA='--toggle-collect=*serve_stream*' to count
# only the connection tasks' own work, without the runtime's timer ticks and idle wake-ups,
# which vary with the client's pace on a busy machine;
# GW_TOML: another gateway config on the same ports, default gw.toml next to this script;
# gw-log.toml logs every request to /tmp/vg-instr/access.log; gw-rr2, gw-least_request,
# gw-hash and gw-health.toml are the upstream-balancing variants with two targets, the
# origin on 127.0.0.1 and 127.0.0.2)
# needs: valgrind, nginx, python3. Uses 127.0.0.1 ports 7310, 7311, 7319 and /tmp/vg-instr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=/tmp/vg-instr
rm -rf "$work" && mkdir -p "$work"
sed "s|/tmp/vg|$work|g" "$here/nginx.conf" > "$work/nginx.conf"
nginx -p "$work" -c "$work/nginx.conf" &
ngpid=$!
trap 'kill $ngpid 2>/dev/null || true' EXIT
sleep 0.5
count() { # BIN N -> instructions
    rm -rf "$work/data"
    # shellcheck disable=SC2086
    GATEWAY_IO_DRIVER=epoll valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" ${VG_EXTRA:-} \
        "$1" --config "${GW_TOML:-$here/gw.toml}" --data-dir "$work/data" > "$work/gw.log" 2>&1 &
    local vpid=$!
    for _ in $(seq 1 300); do (echo > /dev/tcp/127.0.0.1/7310) 2>/dev/null && break; sleep 0.1; done
    python3 "$here/client.py" "$2"
    kill -TERM $vpid; wait $vpid || true
    grep -E "Collected" "$work/gw.log" | awk '{print $NF}'
}
for bin in "$@"; do
    a=$(count "$bin" 500); b=$(count "$bin" 3000)
    echo "$bin: $(( (b - a) / 2500 )) instructions per request ($a after 500, $b after 3000)"
done
