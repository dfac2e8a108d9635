#!/bin/bash
# Device run 3 (assembled by scripts/device-bundle; carried as .bench): 4 workers each,
# proxies on CPUs 0-3, origin on 4-7, wrk on 8-11. First the current gateway against the
# build before COOP_TASKRUN (gateway-baseline) with nginx and HAProxy at 13 B in one
# interleaved run, then 4 KiB and 64 KiB, then 1 worker at 13 B. Loopback only; every run is
# bounded by the harness and by timeout.
D=$(cd "$(dirname "$0")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
{ nproc; uname -r; lscpu | grep -E 'Model name'; } 2>&1 | tee $OUT/machine.txt
ulimit -n 200000 2>/dev/null || ulimit -n 65536
run() {
    tag=$1; shift
    timeout 200 $D/bin/loadtest compare --gateway $D/bin/gateway --out /tmp/lt/$tag "$@" 2>&1 | tee $OUT/$tag.log
    cp /tmp/lt/$tag/compare.csv $OUT/$tag.csv
}
L4="--workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200"
run w4-13b $L4 --bodies 13b --proxies gateway,nginx,haproxy --baseline $D/bin/gateway-baseline
run w4-big $L4 --bodies 4k,64k --proxies gateway,nginx,haproxy
run w1-13b --workers 1 --proxy-cpus 0 --origin-cpus 4 --wrk-cpus 8-11 --connections 200 --bodies 13b --proxies gateway,nginx --baseline $D/bin/gateway-baseline
