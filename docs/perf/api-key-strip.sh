#!/bin/bash
# The gateway's CPU time for requests whose query holds N copies of an api_key policy's
# parameter to strip (loopback only; a Python origin on a free port).
# Usage: docs/perf/api-key-strip.sh GATEWAY_BINARY N REQUESTS
set -e
bin=$1; n=$2; reqs=$3
dir=$(mktemp -d)
python3 - "$dir" <<'PY' &
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(64)
open(sys.argv[1] + "/port", "w").write(str(s.getsockname()[1]))
def serve(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(1 << 20)
        if not d: return
        buf += d
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"); c.close()
s.settimeout(600)  # gone by itself if the script is not there to stop it
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
origin=$!
for i in $(seq 100); do [ -s "$dir/port" ] && break; sleep 0.05; done
port=$(cat "$dir/port")
cat > "$dir/gw.toml" <<TOML
workers = 1
[admin]
listen = "127.0.0.1:0"
[[listeners]]
address = "127.0.0.1:0"
[limits]
max_header_bytes = 1048576
max_uri_bytes = 1048576
[[upstreams]]
id = "o"
targets = [{ address = "127.0.0.1:$port" }]
[[consumers]]
id = "c"
[[credentials]]
id = "k"
consumer = "c"
kind = "api_key"
key = "s3cr3t-key-1"
[[policies]]
id = "key"
kind = "api_key"
header = "X-Api-Key"
query = "apikey"
[[routes]]
id = "all"
path_prefix = "/"
upstream = "o"
policies = ["key"]
TOML
"$bin" --config "$dir/gw.toml" --data-dir "$dir/data" > "$dir/gw.log" 2>&1 &
gw=$!
for i in $(seq 100); do
  addr=$(grep -v admin "$dir/gw.log" | grep -o 'listening on http://[0-9.:]*' | head -1 | sed 's|.*http://||')
  [ -n "$addr" ] && break; sleep 0.1
done
python3 - "$addr" "$n" "$reqs" "$gw" <<'PY'
import socket, sys, time
addr, n, reqs, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host, port = addr.rsplit(":", 1)
q = "&".join(["apikey"] * n)
req = f"GET /x?{q}&keep=1 HTTP/1.1\r\nHost: t\r\nX-Api-Key: s3cr3t-key-1\r\nConnection: close\r\n\r\n".encode()
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100.0
c0 = cpu(); t0 = time.time(); statuses = []
for _ in range(reqs):
    s = socket.create_connection((host, int(port)))
    s.sendall(req)
    data = b""
    while True:
        d = s.recv(65536)
        if not d: break
        data += d
    statuses.append(data.split(b" ", 2)[1].decode())
    s.close()
print(f"pairs={n} uri_bytes={len(q)} requests={reqs} statuses={sorted(set(statuses))} "
      f"gateway_cpu_s={cpu() - c0:.2f} wall_s={time.time() - t0:.2f}")
PY
kill -INT $gw; kill $origin; wait 2>/dev/null || true
rm -rf "$dir"
