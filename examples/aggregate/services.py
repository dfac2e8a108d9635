#!/usr/bin/env python3
"""Three small JSON services for the README's aggregation example: catalog on 127.0.0.1:9101,
reviews on :9102 (slow: 50 ms), inventory on :9103. Stop with Ctrl-C."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def catalog(path, query):
    item = path.rsplit("/", 1)[-1]
    if item == "0":
        return 404, {"message": "no such item"}
    return 200, {"id": item, "name": "Desk lamp", "price": 39.5, "sku": f"LMP-{item}",
                 "cost": 11.2, "supplier": {"name": "Acme", "contact": "ops@acme.test"}}


def reviews(path, query):
    time.sleep(0.05)
    product = query.get("product", ["?"])[0]
    return 200, [{"product": product, "stars": 5, "text": "Bright."},
                 {"product": product, "stars": 4, "text": "Good value."}]


def inventory(path, query):
    sku = path.rsplit("/", 1)[-1]
    return 200, {"data": {"sku": sku, "qty": 12, "warehouse": "north"}}


def server(port, answer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The head and the body go out as two writes: with Nagle's algorithm on, the body
        # of an answer on a kept-alive connection waits for the gateway's delayed ACK
        # (about 40 ms on Linux).
        disable_nagle_algorithm = True

        def do_GET(self):
            parts = urlsplit(self.path)
            status, body = answer(parts.path, parse_qs(parts.query))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


for port, answer in [(9101, catalog), (9102, reviews), (9103, inventory)]:
    threading.Thread(target=server, args=(port, answer), daemon=True).start()
print("catalog :9101, reviews :9102, inventory :9103", flush=True)
threading.Event().wait()
