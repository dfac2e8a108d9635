#!/usr/bin/env bash
# Proxying to an HTTPS upstream: the gateway (`tls` on its upstream) against nginx
# (`proxy_pass https://`, sessions reused, keep-alive) and HAProxy (`server ... ssl`,
# `http-reuse always`), each verifying the origin's certificate against a test authority
# and sending SNI. The origin is nginx serving a 13-byte and a 4 KiB file over TLS.
# Layout as the loadtest harness's shared one: wrk on CPU 0 (64 connections, 1 thread), the
# proxy under test and the origin on CPU 1, one worker each; rounds interleaved.
#
# usage: docs/perf/upstream-tls.sh GATEWAY_BINARY [REPS] [SECONDS]
# prints one line per round and proxy: requests/s, the proxy's CPU-seconds, requests per
# proxy CPU-second and wrk's p99; loopback only, every process started here is stopped here.
set -euo pipefail
GW=${1:?usage: upstream-tls.sh GATEWAY_BINARY [REPS] [SECONDS]}
REPS=${2:-5}
SECS=${3:-5}
D=$(mktemp -d /tmp/upstream-tls.XXXXXX)
# nginx's workers run as nobody when started by root: they read the files served.
chmod 755 "$D"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Five free ports outside the ephemeral range: origin, gateway, its admin API, nginx, HAProxy.
read -r O G A N H < <(python3 -c 'import socket
held = []
for p in range(20000, 32000):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        held.append(s)
    except OSError:
        pass
    if len(held) == 5:
        break
print(*[s.getsockname()[1] for s in held])')

# A test authority and the origin's certificate for up.test, signed by it.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -keyout "$D/ca.key" -out "$D/ca.pem" -subj "/CN=Test CA" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$D/up.key" -out "$D/up.csr" -subj "/CN=up.test" 2>/dev/null
echo "subjectAltName=DNS:up.test" > "$D/ext"
openssl x509 -req -in "$D/up.csr" -CA "$D/ca.pem" -CAkey "$D/ca.key" -CAcreateserial \
    -days 30 -extfile "$D/ext" -out "$D/up.pem" 2>/dev/null

mkdir -p "$D/www" "$D/tmp"
printf 'hello, world\n' > "$D/www/13b"
head -c 4096 /dev/zero | tr '\0' 'x' > "$D/www/4k"

cat > "$D/origin.conf" <<EOF
worker_processes 1;
daemon off;
error_log $D/origin.err warn;
pid $D/origin.pid;
events { worker_connections 10000; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path $D/tmp;
  proxy_temp_path $D/tmp;
  server {
    listen 127.0.0.1:$O ssl;
    ssl_certificate $D/up.pem;
    ssl_certificate_key $D/up.key;
    root $D/www;
  }
}
EOF
taskset -c 1 nginx -p "$D" -c "$D/origin.conf" &
PIDS+=($!)

cat > "$D/gateway.toml" <<EOF
workers = 1
[[listeners]]
address = "127.0.0.1:$G"
[admin]
listen = "127.0.0.1:$A"
[upstream_pool]
max_idle_per_target = 1024
[[upstreams]]
id = "origin"
targets = [{ address = "127.0.0.1:$O" }]
tls = { server_name = "up.test", ca_file = "$D/ca.pem" }
[[routes]]
id = "all"
path_prefix = "/"
upstream = "origin"
EOF
taskset -c 1 "$GW" --config "$D/gateway.toml" --data-dir "$D/gw-data" > "$D/gateway.log" 2>&1 &
GPID=$!
PIDS+=($GPID)

cat > "$D/nginx.conf" <<EOF
worker_processes 1;
daemon off;
error_log $D/nginx.err warn;
pid $D/nginx.pid;
events { worker_connections 10000; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path $D/tmp;
  proxy_temp_path $D/tmp;
  upstream origin {
    server 127.0.0.1:$O;
    keepalive 1024;
    keepalive_requests 10000000;
  }
  server {
    listen 127.0.0.1:$N;
    location / {
      proxy_pass https://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $D/ca.pem;
      proxy_ssl_name up.test;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }
  }
}
EOF
taskset -c 1 nginx -p "$D" -c "$D/nginx.conf" &
NPID=$!
PIDS+=($NPID)

cat > "$D/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend f
  bind 127.0.0.1:$H
  default_backend b
backend b
  server o 127.0.0.1:$O ssl verify required ca-file $D/ca.pem sni str(up.test) verifyhost up.test
EOF
taskset -c 1 haproxy -db -f "$D/haproxy.cfg" > "$D/haproxy.log" 2>&1 &
HPID=$!
PIDS+=($HPID)

for p in $O $G $N $H; do
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break
        sleep 0.05
    done
done

# CPU ticks of a process and its children (nginx's master and worker).
ticks() {
    local sum=0
    for p in $1 $(pgrep -P "$1" || true); do
        sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo $sum
}

for body in 13b 4k; do
    for name in gateway nginx haproxy; do
        case $name in gateway) url=$G; pid=$GPID;; nginx) url=$N; pid=$NPID;; haproxy) url=$H; pid=$HPID;; esac
        got=$(curl -s "http://127.0.0.1:$url/$body" | wc -c)
        want=$(wc -c < "$D/www/$body")
        [ "$got" = "$want" ] || { echo "$name answered $got bytes for $body, not $want" >&2; exit 1; }
    done
done
hz=$(getconf CLK_TCK)
echo "body proxy round req_per_s proxy_cpu_s req_per_proxy_cpu_s p99"
for body in 13b 4k; do
    for round in $(seq "$REPS"); do
        for name in $(printf 'gateway\nnginx\nhaproxy\n' | shuf); do
            case $name in gateway) url=$G; pid=$GPID;; nginx) url=$N; pid=$NPID;; haproxy) url=$H; pid=$HPID;; esac
            taskset -c 0 wrk -t1 -c64 -d1s "http://127.0.0.1:$url/$body" > /dev/null
            t0=$(ticks $pid)
            out=$(taskset -c 0 wrk -t1 -c64 -d"${SECS}s" --latency "http://127.0.0.1:$url/$body")
            t1=$(ticks $pid)
            req=$(echo "$out" | awk '/requests in/ {print $1}')
            bad=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}')
            p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
            cpu=$(echo "scale=2; ($t1 - $t0) / $hz" | bc)
            echo "$body $name $round $((req / SECS)) $cpu $(echo "$req * $hz / ($t1 - $t0)" | bc) $p99 $bad"
        done
    done
done
