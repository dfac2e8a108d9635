# usage: client_multi.py N C: N keep-alive GETs of /13b over C connections to 127.0.0.1:7310,
# sent in rounds (one request on every connection, then every answer read), each a 200.
import socket, sys
n, c = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", 7310)) for _ in range(c)]
req = b"GET /13b HTTP/1.1\r\nHost: 127.0.0.1:7310\r\n\r\n"
bufs = [b""] * c
done = 0
while done < n:
    k = min(c, n - done)
    for s in socks[:k]:
        s.sendall(req)
    for i in range(k):
        s = socks[i]; buf = bufs[i]
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
        bufs[i] = buf
    done += k
for s in socks: s.close()
