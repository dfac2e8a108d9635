# usage: client.py N [PATH...]: N keep-alive GETs to 127.0.0.1:7310, cycling through the
# paths (default /13b), each answer read whole and checked to be a 200.
import socket, sys
n = int(sys.argv[1])
paths = sys.argv[2:] or ["/13b"]
s = socket.create_connection(("127.0.0.1", 7310))
reqs = [b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:7310\r\n\r\n" % p.encode() for p in paths]
buf = b""
for i in range(n):
    s.sendall(reqs[i % len(reqs)])
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode()
            cl = int([l.split(":")[1] for l in head.split("\r\n") if l.lower().startswith("content-length")][0])
            if len(buf) >= end + 4 + cl:
                assert head.startswith("HTTP/1.1 200"), head
                buf = buf[end + 4 + cl:]
                break
        buf += s.recv(65536)
s.close()
