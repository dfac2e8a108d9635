#!/usr/bin/env bash
# CPU a worker spends on request heads that arrive a few bytes per packet, for each binary
# given: the gateway's user + system seconds while a client sends heads of 16 KiB, 256 KiB
# and 1 MiB in small writes (max_header_bytes = 1 MiB, one worker, loopback ports
# 31080-31081). A head parsed again from its start after every read costs its length
# squared; parsed only where the answer can change (codec::Reparse), a few times its length.
#
#   docs/perf/dribbled-head/run.sh BINARY [BINARY...]
#
# Prints CSV: binary,head_bytes,piece_bytes,connections,status,gateway_cpu_s,wall_s
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
cat > "$dir/gw.toml" <<TOML
workers = 1
[[listeners]]
address = "127.0.0.1:31080"
[admin]
listen = "127.0.0.1:31081"
[limits]
max_header_bytes = 1048576
[[routes]]
id = "ok"
path = "/"
respond = { body = "ok\n" }
TOML
echo "binary,head_bytes,piece_bytes,connections,status,gateway_cpu_s,wall_s"
for bin in "$@"; do
  "$bin" --config "$dir/gw.toml" --data-dir "$dir/data" > "$dir/gw.log" 2>&1 &
  pid=$!
  for _ in $(seq 50); do curl -sf -o /dev/null 127.0.0.1:31080/ && break; sleep 0.1; done
  kill -0 "$pid" || { cat "$dir/gw.log" >&2; exit 1; }
  for run in "16384 8 20" "262144 64 2" "1048576 256 1"; do
    # shellcheck disable=SC2086
    echo "$(basename "$bin"),$(timeout 300 python3 "$here/dribble.py" 31080 "$pid" $run)"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  rm -rf "$dir/data"
done
