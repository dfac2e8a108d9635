#!/bin/bash
# Device run 5 (assembled by scripts/device-bundle; carried as .bench): where the proxy's CPU
# goes with 4 workers on CPUs 0-3 (origin on 4-7, wrk with 200 connections on 8-11) at 13 B,
# for the gateway (the current build), nginx and the L4 relay: one harness run each (1 rep,
# 6 s), with a profile of CPUs 0-3 split by command and object (user code, kernel, idle) and
# per-second counts on those CPUs of system calls, io_uring submissions and task-work
# additions, wake-ups and the two IPI kinds. Loopback only; every step is bounded by timeout.
# Then the four at 13 B again, 5 repetitions.
# $OUT gets all.log (everything printed), lt.tgz (the harness outputs) and prof.txt.
D=$(cd "$(dirname "$0")" && pwd)
export PATH=$D/bin:$PATH LD_LIBRARY_PATH=$D/lib
mkdir -p /var/lib/nginx /var/log/nginx /tmp/lt
chmod +x "$D"/bin/*
exec > >(tee -a "$OUT/all.log") 2>&1
T0=$SECONDS
W4="--workers 4 --proxy-cpus 0-3 --origin-cpus 4-7 --wrk-cpus 8-11 --connections 200"
EV=raw_syscalls:sys_enter,io_uring:io_uring_submit_req,io_uring:io_uring_task_add
EV=$EV,sched:sched_wakeup,irq_vectors:call_function_single_entry,irq_vectors:reschedule_entry
for name in gateway nginx l4-relay; do
    timeout 40 perf record -q -F 999 -C 0-3 -o "/tmp/perf-$name.data" -- sleep 19 &
    recorder=$!
    timeout 40 perf stat -I 1000 -C 0-3 -e "$EV" -o "/tmp/stat-$name.txt" -- sleep 19 &
    counter=$!
    timeout 35 "$D/bin/loadtest" compare --gateway "$D/bin/gateway" --out "/tmp/lt/prof-$name" \
        $W4 --bodies 13b --proxies "$name" --reps 1 --warmup 2 --duration 6
    wait "$recorder" "$counter"
    {
        echo "== $name: CPUs 0-3 by command and object"
        timeout 30 perf report -i "/tmp/perf-$name.data" --stdio --sort comm,dso \
            --percent-limit 0.2 2>/dev/null | grep -v '^#' | grep -v '^$'
        echo "== $name: per-second counts on CPUs 0-3"
        cat "/tmp/stat-$name.txt"
    } >> "$OUT/prof.txt"
    rm -f "/tmp/perf-$name.data"
    tar czf "$OUT/lt.tgz" -C /tmp lt 2>/dev/null
    echo "== $name done at $((SECONDS - T0)) s"
done
# Then the four at 13 B again in one interleaved run of 5 repetitions.
timeout 170 "$D/bin/loadtest" compare --gateway "$D/bin/gateway" --out /tmp/lt/w4-13b-5reps \
    $W4 --bodies 13b --proxies gateway,nginx,haproxy,l4-relay --reps 5
tar czf "$OUT/lt.tgz" -C /tmp lt 2>/dev/null
echo "== all done at $((SECONDS - T0)) s"
