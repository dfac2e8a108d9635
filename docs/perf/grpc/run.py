#!/usr/bin/env python3
"""gRPC unary calls through the gateway, beside the same calls made directly to the upstream.

The upstream is the tests' grpcio service (controlplane/tests/grpc_peer.py, `test.Echo/Unary`,
a 13-byte message each way). h2load sends the calls (h2c, `-m` streams per connection) and
logs every request (`--log-file`), from which p50 and p99 are taken; the gateway's CPU time
comes from /proc/PID/stat before and after each run. Rounds alternate direct and through the
gateway. The gateway runs pinned to CPU 1 (`taskset`), h2load and the upstream on CPU 0.

With `--upstream fast` the upstream is a second gateway process instead (an h2c listener whose
route answers itself, 13 bytes, no trailers): not gRPC, but an HTTP/2 upstream fast enough that
the gateway in the middle, not the upstream, sets the pace.

usage: docs/perf/grpc/run.py GATEWAY_BIN [--calls N] [--rounds R] [--conns C] [--streams M]
                             [--upstream grpcio|fast]
needs: h2load (Debian nghttp2-client), python3 with grpcio. Loopback only; ports are chosen
by the kernel (the gateway's listener is read from its log).
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "../../../controlplane/tests/grpc_peer.py")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def h2load(url, calls, conns, streams, msg, log):
    # h2load appends to its log file: each run's percentiles must come from its own calls.
    if os.path.exists(log):
        os.remove(log)
    out = subprocess.run(
        ["taskset", "-c", "0", "h2load", "-n", str(calls), "-c", str(conns), "-m", str(streams),
         "-d", msg, "-H", "content-type: application/grpc", "-H", "te: trailers",
         "--log-file", log, url],
        capture_output=True, text=True, check=True).stdout
    if f"{calls} succeeded, 0 failed, 0 errored" not in out:
        sys.exit("h2load: not every call succeeded:\n" + out)
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    lat = sorted(int(line.split("\t")[2]) for line in open(log) if line.strip())
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000
    return rps, pick(0.50), pick(0.99)


def wait_listen(log):
    """The first listener address a gateway's log names."""
    for _ in range(100):
        log.seek(0)
        m = re.search(r"listening on http://([\d.:]+)", log.read())
        if m:
            return m.group(1)
        time.sleep(0.1)
    sys.exit("a gateway did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gateway")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--upstream", choices=["grpcio", "fast"], default="grpcio")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="gw-grpc-perf-")
    msg = os.path.join(work, "msg.bin")
    with open(msg, "wb") as f:
        f.write(b"\x00\x00\x00\x00\x0d" + b"hello, world!")
    if a.upstream == "grpcio":
        svc = subprocess.Popen(["taskset", "-c", "0", "python3", PEER, "serve"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = int(svc.stdout.readline().split()[1])
    else:
        up_conf = os.path.join(work, "upstream.toml")
        with open(up_conf, "w") as f:
            f.write("""workers = 1
[[listeners]]
address = "127.0.0.1:0"
h2c = true
[admin]
listen = "127.0.0.1:0"
[[routes]]
id = "answer"
path_prefix = "/"
respond = { body = "hello, world!", content_type = "application/grpc" }
[tracing]
request_id = false
traceparent = false
""")
        up_log = open(os.path.join(work, "upstream.log"), "w+")
        svc = subprocess.Popen(["taskset", "-c", "0", a.gateway, "--config", up_conf,
                                "--data-dir", os.path.join(work, "up-data")],
                               stdin=subprocess.PIPE, stdout=up_log, stderr=subprocess.STDOUT,
                               text=True)
        port = int(wait_listen(up_log).rsplit(":", 1)[1])
    conf = os.path.join(work, "gw.toml")
    with open(conf, "w") as f:
        f.write(f"""workers = 1
[[listeners]]
address = "127.0.0.1:0"
h2c = true
[admin]
listen = "127.0.0.1:0"
[[upstreams]]
id = "grpc"
protocol = "grpc"
targets = [{{ address = "127.0.0.1:{port}" }}]
[[routes]]
id = "echo"
path_prefix = "/test.Echo/"
upstream = "grpc"
""")
    gwlog = open(os.path.join(work, "gw.log"), "w+")
    gw = subprocess.Popen(["taskset", "-c", "1", a.gateway, "--config", conf, "--data-dir",
                           os.path.join(work, "data")], stdout=gwlog, stderr=subprocess.STDOUT)
    listen = wait_listen(gwlog)
    log = os.path.join(work, "h2load.log")
    rows = []
    try:
        # Warm-up: connections open, pools filled.
        h2load(f"http://{listen}/test.Echo/Unary", 2000, a.conns, a.streams, msg, log)
        for r in range(a.rounds):
            for name, url in (("direct", f"http://127.0.0.1:{port}/test.Echo/Unary"),
                              ("gateway", f"http://{listen}/test.Echo/Unary")):
                before = cpu_seconds(gw.pid)
                rps, p50, p99 = h2load(url, a.calls, a.conns, a.streams, msg, log)
                cpu = cpu_seconds(gw.pid) - before
                per_cpu = a.calls / cpu if name == "gateway" and cpu > 0 else None
                rows.append((r + 1, name, rps, p50, p99, cpu, per_cpu))
    finally:
        gw.terminate()
        gw.wait()
        svc.stdin.close()
        svc.terminate()
        svc.wait()
    print(f"{a.calls} unary calls per run, {a.conns} connections x {a.streams} streams, "
          f"13-byte messages; gateway on CPU 1, h2load and the {a.upstream} upstream on CPU 0")
    print("| round | path | calls/s | p50 ms | p99 ms | gateway CPU s | calls per gateway CPU-s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r, name, rps, p50, p99, cpu, per_cpu in rows:
        pc = f"{per_cpu:,.0f}" if per_cpu else "-"
        print(f"| {r} | {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {cpu:.2f} | {pc} |")


if __name__ == "__main__":
    main()
