"""Sends request heads a few bytes per write, pausing between writes so that the gateway
reads them piece by piece; prints the gateway's CPU seconds (user + system) spent.

    dribble.py PORT GATEWAY_PID HEAD_BYTES PIECE_BYTES CONNECTIONS [PAUSE_S]
"""
import os
import socket
import sys
import time

port, pid, size, piece, conns = (int(a) for a in sys.argv[1:6])
pause = float(sys.argv[6]) if len(sys.argv) > 6 else 0.00002


def cpu():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


line = b"GET / HTTP/1.1\r\nHost: a\r\n"
head = line + b"X-Fill: " + b"a" * (size - len(line) - 12) + b"\r\n\r\n"
before, started = cpu(), time.time()
statuses = set()
for _ in range(conns):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(head), piece):
        s.send(head[i:i + piece])
        time.sleep(pause)
    s.settimeout(30)
    statuses.add(s.recv(100)[9:12].decode())
    s.close()
print(f"{len(head)},{piece},{conns},{'/'.join(sorted(statuses))},{cpu() - before:.2f},"
      f"{time.time() - started:.2f}")
