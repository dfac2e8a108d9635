#!/usr/bin/env python3
"""A DNS server on loopback for the discovery tests (PyPI `dnslib`).

Usage: dns_server.py ZONE_JSON QUERY_LOG

Binds UDP 127.0.0.1 on a free port and prints the port on stdout. Every query re-reads
ZONE_JSON, so a test changes answers by rewriting it:

    {"ttl": 2,
     "a":    {"svc.test": ["127.0.0.1"]},
     "aaaa": {"svc.test": ["::1"]},
     "srv":  {"_http._tcp.svc.test": [[priority, weight, port, "a.svc.test"], ...]},
     "servfail": {"svc.test": ["A"]},
     "foreign": {"svc.test": [["other.test", "127.0.0.9"]]},
     "drop": ["slow.test"]}

("servfail": the query types of a name answered with SERVFAIL; "foreign": A records of
other names put in the answer to a name's A query, as a broken or hostile server might;
"drop": names whose queries get no answer at all. An SRV target "." is RFC 2782's "not
available here".)

Each query is appended to QUERY_LOG as "<monotonic seconds> <name> <type>". Names not in the
zone get NXDOMAIN; a known name without records of the asked type gets an empty answer. The
server exits when its stdin closes (the test that started it ended) or after 10 minutes.
"""

import json
import socket
import sys
import threading
import time

try:
    from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
except ImportError:
    sys.stderr.write("dns_server.py needs the PyPI package dnslib (pip install dnslib)\n")
    sys.exit(3)


def answer(zone, request):
    reply = request.reply()
    qname = str(request.q.qname).rstrip(".").lower()
    qtype = QTYPE[request.q.qtype]
    ttl = int(zone.get("ttl", 60))
    if qtype in zone.get("servfail", {}).get(qname, []):
        reply.header.rcode = RCODE.SERVFAIL
        return reply
    known = any(qname in zone.get(k, {}) for k in ("a", "aaaa", "srv"))
    if not known:
        reply.header.rcode = RCODE.NXDOMAIN
        return reply
    if qtype == "A":
        for ip in zone.get("a", {}).get(qname, []):
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(ip), ttl=ttl))
        for owner, ip in zone.get("foreign", {}).get(qname, []):
            reply.add_answer(RR(owner, QTYPE.A, rdata=A(ip), ttl=ttl))
    elif qtype == "AAAA":
        for ip in zone.get("aaaa", {}).get(qname, []):
            reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(ip), ttl=ttl))
    elif qtype == "SRV":
        for prio, weight, port, target in zone.get("srv", {}).get(qname, []):
            reply.add_answer(
                RR(qname, QTYPE.SRV, rdata=SRV(prio, weight, port, target), ttl=ttl)
            )
    return reply


def main():
    zone_path, log_path = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    print(sock.getsockname()[1], flush=True)

    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            data, peer = sock.recvfrom(4096)
        except socket.timeout:
            continue
        try:
            request = DNSRecord.parse(data)
        except Exception:  # not DNS: ignore
            continue
        with open(zone_path) as f:
            zone = json.load(f)
        name = str(request.q.qname).rstrip(".").lower()
        with open(log_path, "a") as log:
            log.write(f"{time.monotonic():.3f} {name} {QTYPE[request.q.qtype]}\n")
        if name in zone.get("drop", []):
            continue
        sock.sendto(answer(zone, request).pack(), peer)


if __name__ == "__main__":
    main()
