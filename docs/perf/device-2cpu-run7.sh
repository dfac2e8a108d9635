#!/bin/bash
# Device run 7 (assembled by scripts/device-bundle; carried as .bench): the 2-CPU layouts of
# the harness on two physical cores of the 16-CPU device (CPU 0 and the first CPU that is not
# its SMT sibling; the other CPUs idle), for an Intel figure beside the shared VM's:
#   1. shared, 13 B and 4 KiB: the current build, gateway-baseline (73b50c3, the build before
#      issue 10), gateway+log, nginx, HAProxy (issue 10's A/B and log cost, issue 16's ratios);
#   2. shared, 64 KiB: the current build (splicing), gateway+copy (`[relay] splice = false`),
#      73b50c3, nginx and HAProxy with 64 KiB buffers (the splice default, issue 16's row);
#   3. split, 13 B: the current build, nginx, the L4 relay.
# Ran 2026-12-04 with the harness of commit 09062ca, when `gateway` spliced by default and
# `gateway+copy` set `[relay] splice = false`; splicing is off by default since, and the row
# that flips it is `gateway+splice` (use it in place of gateway+copy to rerun this).
# 3 interleaved repetitions of 4 s each (REPS, DUR: fewer and shorter, for a local check).
# $OUT gets all.log and the three CSVs. Loopback only, every step bounded by timeout.
# shellcheck source=device-lib.sh
. "$(dirname "$0")/device-lib.sh"
lt() { # NAME TIMEOUT ARGS...
    local name=$1 t=$2
    shift 2
    timeout "$t" "$D/bin/loadtest" compare --gateway "$D/bin/gateway" \
        --reps ${REPS:-3} --duration ${DUR:-4} --warmup 1 --out "/tmp/lt/$name" "$@"
    cp "/tmp/lt/$name/compare.csv" "$OUT/$name.csv"
}
base=(--baseline "$D/bin/gateway-baseline")
lt shared-13b-4k 240 "${base[@]}" --wrk-cpus $a --proxy-cpus $b --origin-cpus $b --bodies 13b,4k \
    --proxies gateway,gateway-baseline,gateway+log,nginx,haproxy
lt shared-64k 140 "${base[@]}" --wrk-cpus $a --proxy-cpus $b --origin-cpus $b --bodies 64k \
    --proxies gateway,gateway+copy,gateway-baseline,nginx+buf64k,haproxy+buf64k
lt split-13b 100 --wrk-cpus $a --proxy-cpus $b --origin-cpus $a --bodies 13b \
    --proxies gateway,nginx,l4-relay
