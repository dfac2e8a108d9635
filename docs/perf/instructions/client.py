import socket, sys
n = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", 7310))
req = b"GET /13b HTTP/1.1\r\nHost: 127.0.0.1:7310\r\n\r\n"
buf = b""
for i in range(n):
    s.sendall(req)
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
