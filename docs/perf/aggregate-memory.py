"""Peak RSS of a gateway answering one aggregate of 16 steps, each answer 1 MB of
`"a":0,` members. Usage: agg-mem.py GATEWAY"""
import http.server, os, socket, subprocess, sys, tempfile, threading, time, urllib.request
gw = sys.argv[1]
body = ("{" + ",".join(['"a":0'] * 174_000) + "}").encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
port = free(); d = tempfile.mkdtemp()
steps = "".join(f'[[aggregates.steps]]\nid = "s{i}"\nupstream = "o"\npath = "/x{i}"\ngroup = "g{i}"\n' for i in range(16))
cfg = f'''workers = 1
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:0"
token = "{'t'*32}"
[[upstreams]]
id = "o"
targets = [{{ address = "127.0.0.1:{srv.server_address[1]}" }}]
[[aggregates]]
id = "agg"
max_step_bytes = 2000000
deadline_ms = 20000
{steps}
[[routes]]
id = "agg"
path = "/agg"
aggregate = "agg"
'''
open(f"{d}/g.toml", "w").write(cfg)
p = subprocess.Popen([gw, "--config", f"{d}/g.toml", "--data-dir", f"{d}/data"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); break
        except OSError: time.sleep(0.1)
    hwm = lambda: int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM")][0].split()[1])
    before = hwm()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/agg", timeout=60) as r:
        out = r.read(); st = r.status
    print(f"status {st}, answer {len(out)} bytes, step answers {16 * len(body)} bytes, "
          f"peak RSS {before} KiB before, {hwm()} KiB after")
finally:
    p.terminate(); p.wait(); srv.shutdown()
