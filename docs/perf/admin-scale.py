"""Times admin writes on a config of N routes: the whole config PUT, one route PUT, a batch
of K route puts. Usage: admin-scale.py GATEWAY_BINARY N K"""
import json, os, socket, subprocess, sys, tempfile, time, urllib.request

gw, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = tempfile.mkdtemp()
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
admin, data = free(), free()
cfg = f'[[listeners]]\naddress = "127.0.0.1:{data}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
open(f"{d}/g.toml", "w").write(cfg)
env = dict(os.environ, GATEWAY_ADMIN_TOKEN="t" * 32)
p = subprocess.Popen([gw, "--config", f"{d}/g.toml", "--data-dir", f"{d}/data", "--workers", "1"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
base = f"http://127.0.0.1:{admin}"
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + "t" * 32})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read(); st = r.status
    except urllib.error.HTTPError as e:
        st = e.code; print(e.read()[:300])
    return st, time.monotonic() - t
try:
    for _ in range(100):
        try:
            call("GET", "/v1/config"); break
        except Exception:
            time.sleep(0.1)
    st, c = call("GET", "/v1/config")
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/config", headers={"Authorization": "Bearer " + "t" * 32})) as r:
        conf = json.load(r)
    conf["upstreams"] = [{"id": "u", "targets": [{"address": "127.0.0.1:9"}]}]
    routes = []
    for i in range(n):
        if i % 2 == 0:
            routes.append({"id": f"r{i}", "path": f"/svc{i}/items/{{id}}", "methods": ["GET"], "upstream": "u"})
        else:
            routes.append({"id": f"r{i}", "path_prefix": "/", "hosts": [f"*.t{i}.example.com"], "upstream": "u"})
    conf["routes"] = routes
    conf.pop("revision", None)
    print("PUT /v1/config with", n, "routes:", call("PUT", "/v1/config", conf))
    print("PUT /v1/routes/new (one route):", call("PUT", "/v1/routes/new", {"path": "/new/{x}", "upstream": "u"}))
    ops = [{"op": "put", "kind": "routes", "id": f"b{i}", "value": {"path": f"/b{i}/{{x}}", "upstream": "u"}} for i in range(k)]
    print(f"POST /v1/config:batch ({k} route puts):", call("POST", "/v1/config:batch", {"operations": ops}))
finally:
    p.terminate(); p.wait()
