#!/usr/bin/env bash
# Memory per idle client connection, by protocol: the gateway's resident memory (VmRSS)
# before and after N connections open, answer once (or, h2c-pre, only exchange SETTINGS)
# and sit idle, read WAIT seconds after the last opened (past mimalloc's 10 s purge delay,
# so memory given back is not counted); then the same for a second N beside them, which
# reuse what the first gave back. One worker; loopback ports 31080-31099.
#
#   docs/perf/idle-memory/run.sh target/release/gateway [N] [WAIT]
#
# Needs python3 with the PyPI package h2, curl and openssl.
set -euo pipefail
bin=$(realpath "$1"); n=${2:-1000}; wait_s=${3:-13}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem \
  -out cert.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>/dev/null
config() {
  cat <<TOML
workers = 1
[[listeners]]
address = "127.0.0.1:31080"
h2c = true
[[listeners]]
address = "127.0.0.1:31443"
tls = { certificates = ["c"], alpn = ["h2", "http/1.1"] }
[[certificates]]
id = "c"
cert_file = "$dir/cert.pem"
key_file = "$dir/key.pem"
[admin]
listen = "127.0.0.1:31090"
token = "idle-memory-token-0123456789"
[[routes]]
id = "resp"
path = "/resp"
respond = { body = "ok\n" }
$1
TOML
}
printf '| connection | bytes per idle connection | the next %d |\n| --- | ---: | ---: |\n' "$n"
for row in "h1 31080 parked" "h1 31080 park-off" "h2c-pre 31080 -" "h2c 31080 -" \
           "tls-h1 31443 -" "tls-h2 31443 -"; do
  set -- $row
  extra=""
  [ "$3" = park-off ] && extra=$'[timeouts]\nclient_park_ms = 0'
  config "$extra" > gw.toml
  rm -rf data
  "$bin" --config gw.toml --data-dir data > gw.log 2>&1 & gw=$!
  for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:31090/v1/health && break; sleep 0.1; done
  curl -s -o /dev/null http://127.0.0.1:31080/resp
  sleep 0.5
  before=$(awk '/VmRSS/{print $2}' /proc/$gw/status)
  python3 "$here/hold.py" "$1" "$2" "$n" $((wait_s + 10)) > hold.log 2>&1 & holder=$!
  for _ in $(seq 600); do grep -q held hold.log && break; sleep 0.1; done
  sleep "$wait_s"
  after=$(awk '/VmRSS/{print $2}' /proc/$gw/status)
  python3 "$here/hold.py" "$1" "$2" "$n" $((wait_s + 10)) > hold2.log 2>&1 & second=$!
  for _ in $(seq 600); do grep -q held hold2.log && break; sleep 0.1; done
  sleep 2
  then=$(awk '/VmRSS/{print $2}' /proc/$gw/status)
  label=$1; [ "$3" != - ] && label="$1 ($3)"
  printf '| %s (%s) | %d | %d |\n' "$label" "$(cat hold.log)" \
    $(( (after - before) * 1024 / n )) $(( (then - after) * 1024 / n ))
  kill "$holder" "$second" "$gw" 2>/dev/null || true
  wait "$holder" "$second" "$gw" 2>/dev/null || true
done
