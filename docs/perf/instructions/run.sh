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
# ICACHE=1: simulate 32 KiB 8-way L1 instruction and data caches (the AMD EPYC and most Intel
# cores) and print instruction-cache misses per request beside the instructions;
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
sim=
[ -n "${ICACHE:-}" ] && sim="--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=2097152,16,64"
count() { # BIN N -> instructions [I1 misses]
    rm -rf "$work/data"
    # shellcheck disable=SC2086
    GATEWAY_IO_DRIVER=epoll valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" $sim ${VG_EXTRA:-} \
        "$1" --config "${GW_TOML:-$here/gw.toml}" --data-dir "$work/data" > "$work/gw.log" 2>&1 &
    local vpid=$!
    for _ in $(seq 1 300); do (echo > /dev/tcp/127.0.0.1/7310) 2>/dev/null && break; sleep 0.1; done
    python3 "$here/client.py" "$2"
    kill -TERM $vpid; wait $vpid || true
    # Events: Ir, or with the cache simulation Ir Dr Dw I1mr ...
    grep -E "Collected" "$work/gw.log" | awk '{print $4, ($7 == "" ? 0 : $7)}'
}
for bin in "$@"; do
    read -r a am <<< "$(count "$bin" 500)"
    read -r b bm <<< "$(count "$bin" 3000)"
    line="$bin: $(( (b - a) / 2500 )) instructions per request ($a after 500, $b after 3000)"
    [ -n "$sim" ] && line="$line, $(( (bm - am) / 2500 )) L1 instruction-cache misses per request"
    echo "$line"
done
