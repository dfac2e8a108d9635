#!/bin/bash
# Device run: 16-core scaling of gateway vs nginx vs HAProxy (loopback only, bounded).
D=$(cd "$(dirname "$0")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
chmod +x $D/bin/*
{ nproc; uname -a; lscpu | grep -E 'Model name|Thread|Core|Socket|NUMA node'; for c in 0 1 4 8; do echo "cpu$c siblings $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list 2>/dev/null)"; done; } 2>&1 | tee $OUT/machine.txt
ulimit -n 200000 2>/dev/null || ulimit -n 65536
ulimit -l unlimited 2>/dev/null
run() { tag=$1; shift; timeout 300 $D/bin/loadtest compare --gateway $D/bin/gateway --out /tmp/lt/$tag "$@" 2>&1 | tee $OUT/$tag.log; cp /tmp/lt/$tag/compare.csv $OUT/$tag.csv; grep -h -i -E 'driver|error|warn' /tmp/lt/$tag/work-*/gateway.log | head -5; }
run w4 --workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200
run w1 --workers 1 --proxy-cpus 0 --origin-cpus 4 --wrk-cpus 8-11 --connections 200 --bodies 13b
run w2 --workers 2 --proxy-cpus 0-1 --origin-cpus 4-5 --wrk-cpus 8-11 --connections 200 --bodies 13b
ls -la $OUT
