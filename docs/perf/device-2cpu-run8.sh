#!/bin/bash
# Device run 8 (assembled by scripts/device-bundle with the build before issue 10, 73b50c3, as
# the baseline; carried as .bench): issue 10's A/B on two physical cores of the 16-CPU device
# (CPU 0 and the first CPU that is not its SMT sibling): the current build (bodies copied by
# default) against gateway-baseline and with the access log on (gateway+log), shared layout
# (wrk on the first CPU, proxy and origin on the second), 13 B, 4 KiB and 64 KiB, 5
# interleaved repetitions of 4 s (REPS, DUR: fewer and shorter, for a local check). $OUT gets
# all.log and ab.csv. Loopback only, bounded by timeout.
# shellcheck source=device-lib.sh
. "$(dirname "$0")/device-lib.sh"
timeout 420 "$D/bin/loadtest" compare --gateway "$D/bin/gateway" --baseline "$D/bin/gateway-baseline" \
    --proxies gateway,gateway-baseline,gateway+log --bodies 13b,4k,64k \
    --wrk-cpus $a --proxy-cpus $b --origin-cpus $b \
    --reps "${REPS:-5}" --duration "${DUR:-4}" --warmup 1 --out /tmp/lt/ab
cp /tmp/lt/ab/compare.csv "$OUT/ab.csv"
