#!/bin/bash
# How long a batch of N consumer puts takes through the admin API (a dry run: validated and
# diffed, nothing stored), with the store lock held meanwhile.
# usage: docs/perf/admin-batch.sh GATEWAY_BINARY N
# Loopback only (ports 23401 and 23402); the gateway started here is stopped here.
set -euo pipefail
BIN=$1; N=$2
D=$(mktemp -d /tmp/admin-batch.XXXXXX)
cat > "$D/gw.toml" <<T
workers = 1
[[listeners]]
address = "127.0.0.1:23401"
[admin]
listen = "127.0.0.1:23402"
[[upstreams]]
id = "u"
targets = [{ address = "127.0.0.1:9" }]
[[routes]]
id = "r"
path_prefix = "/"
upstream = "u"
T
"$BIN" --config "$D/gw.toml" --data-dir "$D/data" > "$D/gw.log" 2>&1 &
P=$!
trap 'kill $P 2>/dev/null; wait $P 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do
    [ -s "$D/data/admin-token" ] && curl -s -o /dev/null http://127.0.0.1:23402/ && break
    sleep 0.05
done
python3 -c "
import json, sys
n = int(sys.argv[1])
ops = [{'op': 'put', 'kind': 'consumers', 'id': 'c%d' % i, 'value': {}} for i in range(n)]
print(json.dumps({'operations': ops}))" "$N" > "$D/batch.json"
T=$(cat "$D/data/admin-token")
s=$(date +%s.%N)
code=$(curl -s -o "$D/out.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $T" \
    -H 'Content-Type: application/json' --data-binary @"$D/batch.json" \
    'http://127.0.0.1:23402/v1/config:batch?dry_run=true')
e=$(date +%s.%N)
echo "$(basename "$BIN") N=$N status=$code seconds=$(echo "$e - $s" | bc)"
