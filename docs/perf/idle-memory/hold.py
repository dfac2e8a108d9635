"""Opens N client connections to the gateway and holds them idle for SECONDS.

    hold.py MODE PORT N SECONDS

MODE: h1 (cleartext HTTP/1.1, one request each), h2c-pre (HTTP/2 with prior knowledge,
preface and SETTINGS only), h2c (one request each), tls-h1, tls-h2 (over TLS, one request
each). Prints "held N answered M" once every connection is open, then sleeps."""
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

mode, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


def h2_request(sock, ask, scheme):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    if ask:
        c.send_headers(1, [(":method", "GET"), (":path", "/resp"), (":scheme", scheme),
                           (":authority", "localhost")], end_stream=True)
    sock.sendall(c.data_to_send())
    deadline = time.time() + 3
    while time.time() < deadline:
        data = sock.recv(65536)
        if not data:
            return False
        for e in c.receive_data(data):
            if isinstance(e, h2.events.StreamEnded if ask else h2.events.RemoteSettingsChanged):
                sock.sendall(c.data_to_send())
                return True
        sock.sendall(c.data_to_send())
    return False


ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
held, answered = [], 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if mode.startswith("tls"):
        ctx.set_alpn_protocols(["h2"] if mode == "tls-h2" else ["http/1.1"])
        s = ctx.wrap_socket(s, server_hostname="localhost")
    if mode in ("h1", "tls-h1"):
        s.sendall(b"GET /resp HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answered += b" 200 " in s.recv(4096)
    else:
        answered += h2_request(s, mode != "h2c-pre", "https" if mode == "tls-h2" else "http")
    held.append(s)
print("held", len(held), "answered", answered, flush=True)
time.sleep(hold)
