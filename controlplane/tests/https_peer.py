#!/usr/bin/env python3
"""An HTTPS origin (Python's ssl) for the gateway's upstream TLS tests, on loopback only.

  https_peer.py CERT KEY [--client-ca CA]
      listens on 127.0.0.1:0 with CERT and KEY (ALPN http/1.1), prints "port N", and runs
      until stdin closes (the test holds it open). With --client-ca, a client certificate
      signed by CA is required.

Each request is answered 200 with a JSON object: the SNI name the connection sent ("sni",
null without one), the common name of the client's certificate ("client", null without
one), the connection's number ("conn", from 1) and the request's number on it ("req"), the
method, path and the length of the request body ("len"). A path ending in `/big` is answered
with 1 MiB of "x" instead; one ending in `/extra` with `{}`, then at once (in the same TCP
segment) with a second answer nobody asked for; one ending in `/until-close` with `the-body` ended by the connection's close (close_notify,
then FIN), `/until-cut` the same ended by a FIN alone; one ending in `/early` with a 413 at once,
its body left unread, the connection held open. A request with `Upgrade: websocket` is answered 101, and every
byte the client sends after it is sent back until it closes; to a path ending in `/ws-cut`
or `/ws-close`, "bye" follows the 101, then the end (a FIN alone, or close_notify first); to
one ending in `/ws-report`, nothing: the peer reads to the tunnel's end and prints a line
"ws-report clean" (close_notify), "ws-report ragged" (a FIN alone, a reset) or
"ws-report timeout" (no end within 5 s).
"""

import json
import socket
import ssl
import sys
import threading


def read_head(f):
    line = f.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    fields = {}
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        name, value = h.decode("latin-1").split(":", 1)
        fields[name.strip().lower()] = value.strip()
    return method, path, fields


def read_body(f, fields):
    if "content-length" in fields:
        return f.read(int(fields["content-length"]))
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                return body
            body += f.read(size)
            f.readline()
    return b""


def end(s, cut):
    """Ends the connection: with a FIN alone when `cut` (the socket is then gone: True), else
    with close_notify first (the caller closes it)."""
    if cut:
        socket.socket(fileno=s.detach()).close()
        return True
    s.settimeout(2)
    try:
        s.unwrap()
    except (OSError, ssl.SSLError):
        pass
    return False


def serve(ctx, raw, conn_no):
    raw.settimeout(30)
    # As servers set it: without, the session tickets' small writes hold the answer back
    # until the gateway's delayed ACK (Nagle).
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError):
        raw.close()
        return
    f = s.makefile("rb")
    peer = s.getpeercert()
    client = None
    if peer:
        client = dict(x[0] for x in peer["subject"]).get("commonName")
    req = 0
    try:
        while True:
            head = read_head(f)
            if head is None:
                break
            method, path, fields = head
            if path.endswith("/early"):
                # Refuses the upload after its head, reads none of its body, and keeps the
                # connection open for longer than a test waits.
                s.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n"
                          b"Connection: close\r\n\r\ntoo big!")
                threading.Event().wait(15)
                break
            if path.endswith("/early-json") or path.endswith("/early-json-close"):
                # The same with a 200 whose JSON a route's filter is to take a member from;
                # or that, then a close at once (a reset, with the body unread).
                out = b'{"secret":"leaked","a":1}'
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(out), out))
                if path.endswith("/early-json"):
                    threading.Event().wait(15)
                break
            body = read_body(f, fields)
            req += 1
            if fields.get("upgrade", "").lower() == "websocket":
                s.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n"
                )
                if path.endswith("/ws-report"):
                    # Reads to the tunnel's end, then prints how it came: "clean" after
                    # close_notify, "ragged" after a FIN alone or a reset, "timeout" if none
                    # came within 5 s.
                    s.settimeout(5)
                    s.suppress_ragged_eofs = False
                    try:
                        while s.recv(65536):
                            pass
                        how = "clean"
                    except socket.timeout:
                        how = "timeout"
                    except (OSError, ssl.SSLError):
                        how = "ragged"
                    print("ws-report " + how, flush=True)
                    break
                if path.endswith("/ws-cut") or path.endswith("/ws-close"):
                    # "bye", then the tunnel's end: a FIN alone, or close_notify first.
                    s.sendall(b"bye")
                    if end(s, path.endswith("/ws-cut")):
                        return
                    break
                while True:
                    data = f.read1(65536)
                    if not data:
                        break
                    s.sendall(data)
                break
            if path.endswith("/until-close") or path.endswith("/until-cut"):
                # An answer that ends where the connection does: with close_notify, then
                # FIN; or (`/until-cut`) with a FIN alone, as an attacker's cut looks.
                s.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthe-body")
                if end(s, path.endswith("/until-cut")):
                    return
                break
            if path.endswith("/extra"):
                # The answer, then another nobody asked for, in records of their own but
                # one TCP segment: a client must not take the second for its next answer.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                stale = b"x" * 12000
                s.sendall(b"HTTP/1.1 200 OK\r\nX-Stale: yes\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(stale), stale))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                continue
            if path.endswith("/big"):
                out, kind = b"x" * (1 << 20), b"text/plain"
            else:
                out = json.dumps(
                    {
                        "sni": getattr(s, "sni_name", None),
                        "client": client,
                        "conn": conn_no,
                        "req": req,
                        "method": method,
                        "path": path,
                        "len": len(body),
                    }
                ).encode()
                kind = b"application/json"
            s.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (kind, len(out), out)
            )
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        s.close()


def main():
    cert, key = sys.argv[1], sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    if "--client-ca" in sys.argv:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(sys.argv[sys.argv.index("--client-ca") + 1])

    def on_sni(sock, name, _ctx):
        sock.sni_name = name

    ctx.sni_callback = on_sni
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def accept():
        n = 0
        while True:
            raw, _ = listener.accept()
            n += 1
            threading.Thread(target=serve, args=(ctx, raw, n), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("port %d" % listener.getsockname()[1], flush=True)
    # Ends when the test closes stdin (or exits).
    sys.stdin.read()


if __name__ == "__main__":
    main()
