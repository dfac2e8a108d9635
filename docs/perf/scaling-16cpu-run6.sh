#!/bin/bash
# Device run 6 (assembled by scripts/device-bundle; carried as .bench), made to fit the last
# minutes of a session's device time: 64 KiB with 4 workers (proxies on CPUs 0-3, origin on
# 4-7, wrk with 200 connections on 8-11), the current build (splicing large bodies) against
# gateway-baseline (the same code built with splicing off: every body copied, what
# `[relay] splice = false` does) and nginx with 64 KiB buffers, 3 interleaved repetitions of
# 4 s. $OUT gets all.log and w4-64k.csv. Loopback only, bounded by timeout.
D=$(cd "$(dirname "$0")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
chmod +x "$D"/bin/*
timeout 100 "$D/bin/loadtest" compare --gateway "$D/bin/gateway" --out /tmp/lt/w4-64k \
    --workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200 \
    --bodies 64k --proxies gateway,gateway-baseline,nginx+buf64k \
    --baseline "$D/bin/gateway-baseline" --reps 3 --duration 4 --warmup 1 2>&1 | tee "$OUT/all.log"
cp /tmp/lt/w4-64k/compare.csv "$OUT/w4-64k.csv"
