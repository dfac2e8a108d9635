#!/bin/bash
# Device run 4 (assembled by scripts/device-bundle; carried as .bench): run 3's measurements in
# one device call that must end inside 9 minutes. Proxies on CPUs 0-3 with 4 workers, the
# origin on 4-7, wrk (200 connections) on 8-11, 3 interleaved repetitions of 5 s.
#   1. 13 B: gateway (the build with IORING_SETUP_DEFER_TASKRUN) against gateway-baseline (the
#      build before it, COOP_TASKRUN only), nginx, HAProxy and the L4 relay.
#   2. A CPU profile of CPUs 0-3 (the proxy's) while the gateway, then nginx, serve 13 B, with
#      the interrupt and softirq counts over the same seconds.
#   3. 64 KiB with 4 workers, the two builds against nginx with 64 KiB buffers.
#   4. 1 worker (CPU 0) at 13 B: what is lost per CPU going from 1 to 4 workers.
#   5. 4 KiB with 4 workers, if time is left.
# Everything lands in $OUT as all.log, lt.tgz (every harness output, refreshed after each step),
# perf-gateway.txt, perf-nginx.txt and sys-*.txt. Loopback only; every step is bounded by
# timeout.
D=$(cd "$(dirname "$0")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
chmod +x "$D"/bin/*
exec > >(tee -a "$OUT/all.log") 2>&1
{ date -u; nproc; uname -r; lscpu | grep -E 'Model name|MHz|Thread|NUMA node0'; \
  cat /proc/sys/net/ipv4/tcp_congestion_control; } 2>&1
ulimit -n 200000 2>/dev/null || ulimit -n 65536
T0=$SECONDS
pack() { tar czf "$OUT/lt.tgz" -C /tmp lt 2>/dev/null; echo "== $1 done at $((SECONDS - T0)) s"; }
run() {
    tag=$1 limit=$2; shift 2
    timeout "$limit" "$D/bin/loadtest" compare --gateway "$D/bin/gateway" --out "/tmp/lt/$tag" "$@"
    pack "$tag"
}
W4="--workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200"

run w4-13b 170 $W4 --bodies 13b --proxies gateway,gateway-baseline,nginx,haproxy,l4-relay \
    --baseline "$D/bin/gateway-baseline"

# Profiles: one proxy per harness run (the origin-direct run leaves CPUs 0-3 idle first).
prof() {
    name=$1
    cat /proc/interrupts > /tmp/irq0; cat /proc/softirqs > /tmp/sirq0
    timeout 40 perf record -q -F 999 -g -C 0-3 -o "/tmp/perf-$name.data" -- sleep 17 &
    recorder=$!
    timeout 30 "$D/bin/loadtest" compare --gateway "$D/bin/gateway" --out "/tmp/lt/prof-$name" \
        $W4 --bodies 13b --proxies "$name" --reps 1 --warmup 2 --duration 5
    wait "$recorder"
    { echo "== $name: /proc/interrupts before and after"; cat /tmp/irq0; cat /proc/interrupts;
      echo "== /proc/softirqs before and after"; cat /tmp/sirq0; cat /proc/softirqs; } \
        > "$OUT/sys-$name.txt"
    timeout 60 perf report -i "/tmp/perf-$name.data" --stdio --no-children --sort dso,sym \
        --percent-limit 0.3 -g none 2>/dev/null | head -150 > "$OUT/perf-$name.txt"
    timeout 40 perf report -i "/tmp/perf-$name.data" --stdio --no-children --sort sym \
        --percent-limit 2 -g caller,0.5,callee,function,percent 2>/dev/null | head -400 \
        >> "$OUT/perf-$name.txt"
    rm -f "/tmp/perf-$name.data"
    pack "prof-$name"
}
if perf record -q -o /tmp/perf-probe.data -- true 2>/dev/null; then
    prof gateway
    prof nginx
else
    echo "perf record does not work here; no profiles"
fi

run w4-64k 110 $W4 --bodies 64k --proxies gateway,gateway-baseline,nginx+buf64k \
    --baseline "$D/bin/gateway-baseline"
run w1-13b 110 --workers 1 --proxy-cpus 0 --origin-cpus 4 --wrk-cpus 8-11 --connections 200 \
    --bodies 13b --proxies gateway,gateway-baseline,nginx --baseline "$D/bin/gateway-baseline"
left=$((520 - (SECONDS - T0)))
if [ "$left" -gt 60 ]; then
    run w4-4k "$left" $W4 --bodies 4k --proxies gateway,gateway-baseline,nginx,haproxy \
        --baseline "$D/bin/gateway-baseline"
fi
echo "== all done at $((SECONDS - T0)) s"
