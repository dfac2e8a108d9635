# usage: [CONNECTIONS=C] client.py N [PATH...]: N keep-alive GETs to 127.0.0.1:7310, cycling
# through the paths (default /13b), each answer read whole and checked to be a 200. With C
# connections (default 1) the requests go in rounds: one on every connection, then every
# answer read, so the gateway's connections take turns as under a load generator.
import os, socket, sys
n = int(sys.argv[1])
paths = sys.argv[2:] or ["/13b"]
conns = [socket.create_connection(("127.0.0.1", 7310))
         for _ in range(int(os.environ.get("CONNECTIONS", "1")))]
reqs = [b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:7310\r\n\r\n" % p.encode() for p in paths]
bufs = [b""] * len(conns)


def read_answer(i):
    s, buf = conns[i], bufs[i]
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode()
            cl = int([l.split(":")[1] for l in head.split("\r\n") if l.lower().startswith("content-length")][0])
            if len(buf) >= end + 4 + cl:
                assert head.startswith("HTTP/1.1 200"), head
                bufs[i] = buf[end + 4 + cl:]
                return
        buf += s.recv(65536)


sent = 0
while sent < n:
    batch = min(len(conns), n - sent)
    for i in range(batch):
        conns[i].sendall(reqs[(sent + i) % len(reqs)])
    for i in range(batch):
        read_answer(i)
    sent += batch
for s in conns:
    s.close()
