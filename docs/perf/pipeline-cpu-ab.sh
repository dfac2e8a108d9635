#!/bin/bash
# The CPU-time A/B of docs/perf/pipeline-access-log-ab.md, section 2. Configs in /tmp/exp:
#   org.toml   the origin: a gateway with one direct-response route (13-byte body), on
#              127.0.0.1:18096, started once beside it with `taskset -c 1`;
#   lg-off.toml / lg-notrace.toml / lg-on.toml: workers = 1, a listener on 127.0.0.1:18095,
#              one upstream (127.0.0.1:18096) and a catch-all route to it; lg-notrace.toml adds
#              [tracing] request_id = false, traceparent = false; lg-on.toml adds
#              [access_log] path = "/tmp/exp/access.log".
# Rounds: for i in 1..8: cpu.sh BASELINE lg-off.toml 3; cpu.sh NEW lg-off.toml 3;
#         cpu.sh NEW lg-notrace.toml 3; cpu.sh NEW lg-on.toml 3
# usage: cpu.sh BINARY CONFIG SECONDS [CONNECTIONS]: requests per CPU-second of the gateway
# process under wrk (50 connections unless given)
BIN=$1; CONF=$2
rm -rf /tmp/exp/d-cpu /tmp/exp/access.log
taskset -c 1 $BIN --config /tmp/exp/$CONF --data-dir /tmp/exp/d-cpu >/dev/null 2>&1 &
GP=$!
sleep 0.4
taskset -c 0 wrk -t1 -c${4:-50} -d1s http://127.0.0.1:18095/ >/dev/null
t0=$(awk '{print $14+$15}' /proc/$GP/stat)
out=$(taskset -c 0 wrk -t1 -c${4:-50} -d${3}s http://127.0.0.1:18095/)
t1=$(awk '{print $14+$15}' /proc/$GP/stat)
req=$(echo "$out" | awk '/requests in/ {print $1}')
echo "$(basename $BIN)/$CONF $(( req * 100 / (t1-t0) ))"
kill $GP; wait $GP 2>/dev/null
