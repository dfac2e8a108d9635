#!/bin/bash
# Device run 2: 4 workers, all bodies, new gateway; A/B against the previous binary; 1 worker.
D=$(cd "$(dirname "$0")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
chmod +x $D/bin/*
{ nproc; uname -r; lscpu | grep -E 'Model name'; } 2>&1 | tee $OUT/machine.txt
run() { tag=$1; gw=$2; shift 2; timeout 280 $D/bin/loadtest compare --gateway $D/bin/$gw --out /tmp/lt/$tag "$@" 2>&1 | tee $OUT/$tag.log; cp /tmp/lt/$tag/compare.csv $OUT/$tag.csv; }
run w4 gateway --workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200
run w4old gateway-old --workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200 --bodies 13b --proxies gateway
run w1 gateway --workers 1 --proxy-cpus 0 --origin-cpus 4 --wrk-cpus 8-11 --connections 200 --bodies 13b
