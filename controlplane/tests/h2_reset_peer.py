#!/usr/bin/env python3
"""An HTTP/2 (h2c) upstream that resets every stream it is sent, for the gateway's tests.

Usage: h2_reset_peer.py CODE [partial|silent|goaway|no-content|html|html-503|no-status|two|
                              failed-length|html-reset|
                              torn|trailers|headers|zero|goaway-once|malformed|answers|
                              bad-stream|head-silent|answer-close|msg-silent|interim-503|
                              empty-ok|caps|slow-reader|close-once]
Listens on 127.0.0.1 (a free port), prints "port N", then for each request prints "request
PATH" and answers it with RST_STREAM CODE (2 INTERNAL_ERROR: it had the request; 7
REFUSED_STREAM: it did not act on it). With `partial`, a gRPC answer's head and the first
bytes of a message come before the reset; with `silent`, nothing is ever answered; with
`goaway`, the connection ends with GOAWAY CODE whose last stream id is below the request's
(it was not acted on) and a close; with `no-content`, the answer is a 204 that carries
`content-length: 0` (which RFC 9110 8.6 forbids); with `html`, a 200 `text/html` page (not
gRPC), with `html-503` the same page as a 503 with `content-encoding: gzip` and an `etag`;
with `no-status`, a gRPC answer of one message that ends without trailers (no
`grpc-status`); with `two`, a gRPC answer of two (empty) messages and `grpc-status: 0`; with
`failed-length`, a gRPC answer of one (empty) message with its `content-length`, then
`grpc-status: 9` and `grpc-message: nope`; with `html-reset`, a 503 `text/html` head and
"hello", then RST_STREAM INTERNAL_ERROR; with
`torn`, one message and the start of another, then `grpc-status: 0`; with `trailers`, once
the request has ended, a line "trailers NAME=VALUE ..." (sorted; "trailers -" without any)
and a 204; with `headers`, a line "headers NAME=VALUE ..." of the request's fields (sorted,
pseudo-fields included), and a 200 `text/plain` answer "ok" that carries `cache-control:
private` and `server: peer`; with `zero`, SETTINGS that allow no stream
(MAX_CONCURRENT_STREAMS 0), and a 204 to a stream that comes anyway; with `goaway-once`, the
first connection ends with GOAWAY NO_ERROR, last stream 0, at its first request, and later
ones answer 204; with `malformed`, a 200 whose head carries `connection: close` (a field
HTTP/2 forbids, RFC 9113 8.2.2); with `answers`, by path: `/hints` a 103 with a `link` field
before a 200 "ok", `/len` a 200 "ok" with its `content-length`, `/hints-slow` the same as
`/hints` with the 200 a second after the 103, `/s101` a 101 then a 200 "ok", `/hints-cl` a
103 with `content-length: 0` then a 204, `/hints-big` a 103 with 300 fields then a 204, `/hints-huge` a 103 with one field of 66,000
bytes then a 204,
`/slow` a 200 "slow" after 1.3 s, `/trailers` a 200 "hello" with trailers `content-length`,
`host` and `x-ok`, `/big/N` a 200 "ok" with one field of N bytes, `/N` a 200 "ok" with N
fields; with `bad-stream`, a gRPC answer of one
message and one marked compressed, its stream left open; with `head-silent`, a gRPC answer's
head and nothing more; with `answer-close`, a 204, then GOAWAY NO_ERROR and the connection
closed; with `msg-silent`, a gRPC answer's head and one (empty) message, then nothing; with
`interim-503`, a 103 then a 503; with `empty-ok`, a gRPC answer of no message and
`grpc-status: 0`; with `caps`, a gRPC answer of one (empty) message whose content type is
written `Application/GRPC+proto` (media types compare without case), and `grpc-status: 0`;
with `slow-reader`, a request body taken at about 200 KB/s (each DATA frame's window given
back after its time), then a 200 whose body is the number of body bytes received; with
`close-once`, a 200 "ok" to every request but the first for `/close`, at which the
connection is closed without a GOAWAY (an idle close that met a request). A stream the gateway resets prints "reset CODE". Each request's line also
gives its content type. Each connection accepted prints a line "connection". Runs until
killed.
Loopback only.
"""
import socket
import sys
import threading
import time

try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
except ImportError:
    sys.exit("h2_reset_peer.py needs the PyPI package h2 (pip install h2)")

CODE = int(sys.argv[1])
PARTIAL = sys.argv[2:] == ["partial"]
SILENT = sys.argv[2:] == ["silent"]
GOAWAY = sys.argv[2:] == ["goaway"]
NO_CONTENT = sys.argv[2:] == ["no-content"]
HTML = sys.argv[2:] == ["html"]
HTML_503 = sys.argv[2:] == ["html-503"]
NO_STATUS = sys.argv[2:] == ["no-status"]
TWO = sys.argv[2:] == ["two"]
FAILED_LENGTH = sys.argv[2:] == ["failed-length"]
HTML_RESET = sys.argv[2:] == ["html-reset"]
TORN = sys.argv[2:] == ["torn"]
TRAILERS = sys.argv[2:] == ["trailers"]
HEADERS = sys.argv[2:] == ["headers"]
ZERO = sys.argv[2:] == ["zero"]
GOAWAY_ONCE = sys.argv[2:] == ["goaway-once"]
MALFORMED = sys.argv[2:] == ["malformed"]
ANSWERS = sys.argv[2:] == ["answers"]
BAD_STREAM = sys.argv[2:] == ["bad-stream"]
HEAD_SILENT = sys.argv[2:] == ["head-silent"]
ANSWER_CLOSE = sys.argv[2:] == ["answer-close"]
MSG_SILENT = sys.argv[2:] == ["msg-silent"]
INTERIM_503 = sys.argv[2:] == ["interim-503"]
EMPTY_OK = sys.argv[2:] == ["empty-ok"]
CAPS = sys.argv[2:] == ["caps"]
SLOW_READER = sys.argv[2:] == ["slow-reader"]
CLOSE_ONCE = sys.argv[2:] == ["close-once"]
closed_once = [False]
connections = [0]
lock = threading.Lock()


def close_gracefully(sock):
    """Closes after a GOAWAY: no more writes, then what the gateway still sends is read (for
    up to 2 s) before the close. Closing with bytes unread sends a TCP reset, which may reach
    the gateway before it has read the GOAWAY (a connection cut, not a refusal)."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def serve(sock):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, validate_outbound_headers=not (MALFORMED or ANSWERS),
        normalize_outbound_headers=not (MALFORMED or ANSWERS)))
    conn.initiate_connection()
    if ZERO:
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    with lock:
        connections[0] += 1
        first = connections[0] == 1
    sock.sendall(conn.data_to_send())
    got_trailers = set()
    received = {}
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.StreamReset):
                with lock:
                    print(f"reset {event.error_code}", flush=True)
            if TRAILERS and isinstance(event, (h2.events.TrailersReceived,
                                               h2.events.StreamEnded)):
                if isinstance(event, h2.events.TrailersReceived):
                    fields = sorted(f"{k.decode()}={v.decode()}" for k, v in event.headers)
                    with lock:
                        print("trailers " + " ".join(fields), flush=True)
                elif event.stream_id not in got_trailers:
                    with lock:
                        print("trailers -", flush=True)
                if isinstance(event, h2.events.TrailersReceived):
                    got_trailers.add(event.stream_id)
                else:
                    conn.send_headers(event.stream_id, [(":status", "204")], end_stream=True)
                continue
            if TRAILERS and isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if SLOW_READER and isinstance(event, h2.events.DataReceived):
                sid = event.stream_id
                received[sid] = received.get(sid, 0) + len(event.data)
                time.sleep(event.flow_controlled_length / 200_000)
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
                sock.sendall(conn.data_to_send())
            if SLOW_READER and isinstance(event, h2.events.StreamEnded):
                conn.send_headers(event.stream_id, [(":status", "200"),
                                                    ("content-type", "text/plain")])
                conn.send_data(event.stream_id, str(received.get(event.stream_id, 0)).encode(),
                               end_stream=True)
            if isinstance(event, h2.events.RequestReceived):
                fields = dict(event.headers)
                path = fields.get(b":path", b"").decode()
                ctype = fields.get(b"content-type", b"-").decode()
                with lock:
                    print(f"request {path} {ctype}", flush=True)
                if SILENT or TRAILERS or SLOW_READER:
                    continue
                if CLOSE_ONCE:
                    with lock:
                        close = path == "/close" and not closed_once[0]
                        closed_once[0] = closed_once[0] or close
                    if close:
                        sock.close()
                        return
                    conn.send_headers(event.stream_id, [(":status", "200")])
                    conn.send_data(event.stream_id, b"ok", end_stream=True)
                    continue
                if GOAWAY_ONCE and first:
                    # None of this connection's streams was acted on.
                    conn.close_connection(error_code=0, last_stream_id=0)
                    sock.sendall(conn.data_to_send())
                    close_gracefully(sock)
                    return
                if HEADERS:
                    pairs = sorted(f"{k.decode()}={v.decode()}" for k, v in event.headers)
                    with lock:
                        print("headers " + " ".join(pairs), flush=True)
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "text/plain"),
                                                        ("cache-control", "private"),
                                                        ("server", "peer"),
                                                        ("x_powered_by", "peer")])
                    conn.send_data(event.stream_id, b"ok", end_stream=True)
                    continue
                if HTML_RESET:
                    conn.send_headers(event.stream_id, [(":status", "503"),
                                                        ("content-type", "text/html")])
                    conn.send_data(event.stream_id, b"hello")
                    conn.reset_stream(event.stream_id, error_code=2)
                    continue
                if FAILED_LENGTH:
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc"),
                                                        ("content-length", "5")])
                    conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x00")
                    conn.send_headers(event.stream_id, [("grpc-status", "9"),
                                                        ("grpc-message", "nope")],
                                      end_stream=True)
                    continue
                if TWO or TORN:
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc")])
                    second = b"\x00\x00\x00\x00\x00" if TWO else b"\x00\x00\x00\x00\x09ab"
                    conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x00" + second)
                    conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                    continue
                if HTML or HTML_503 or NO_STATUS:
                    ctype = "application/grpc" if NO_STATUS else "text/html"
                    status = "503" if HTML_503 else "200"
                    # A 503 page as a proxy in front of the service sends it: compressed.
                    about = [("content-encoding", "gzip"), ("etag", '"p1"')] if HTML_503 else []
                    conn.send_headers(event.stream_id, [(":status", status),
                                                        ("content-type", ctype)] + about)
                    body = b"\x00\x00\x00\x00\x02hi" if NO_STATUS else b"<html>hi</html>"
                    conn.send_data(event.stream_id, body, end_stream=True)
                    continue
                if MSG_SILENT:
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc")])
                    conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x00")
                    continue
                if EMPTY_OK or CAPS:
                    ctype = "Application/GRPC+proto" if CAPS else "application/grpc"
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", ctype)])
                    if CAPS:
                        conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x00")
                    conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                    continue
                if INTERIM_503:
                    conn.send_headers(event.stream_id, [(":status", "103"), ("link", "</a>")])
                    conn.send_headers(event.stream_id, [(":status", "503")], end_stream=True)
                    continue
                if ANSWER_CLOSE:
                    conn.send_headers(event.stream_id, [(":status", "204")], end_stream=True)
                    conn.close_connection(error_code=0, last_stream_id=event.stream_id)
                    sock.sendall(conn.data_to_send())
                    close_gracefully(sock)
                    return
                if HEAD_SILENT:
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc")])
                    continue
                if BAD_STREAM:
                    # A message, then one marked compressed, and the stream left open.
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc")])
                    conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x00"
                                   + b"\x01\x00\x00\x00\x00")
                    continue
                if ANSWERS:
                    sid = event.stream_id
                    if path.endswith("/hints"):
                        conn.send_headers(sid, [(":status", "103"),
                                                ("link", "</style.css>; rel=preload")])
                        conn.send_headers(sid, [(":status", "200")])
                        conn.send_data(sid, b"ok", end_stream=True)
                    elif path.endswith("/len"):
                        conn.send_headers(sid, [(":status", "200"), ("content-length", "2")])
                        conn.send_data(sid, b"ok", end_stream=True)
                    elif path.endswith("/hints-slow"):
                        conn.send_headers(sid, [(":status", "103"), ("link", "</a.css>")])
                        sock.sendall(conn.data_to_send())
                        time.sleep(1)
                        conn.send_headers(sid, [(":status", "200")])
                        conn.send_data(sid, b"ok", end_stream=True)
                    elif path.endswith("/s101"):
                        conn.send_headers(sid, [(":status", "101")])
                        conn.send_headers(sid, [(":status", "200")])
                        conn.send_data(sid, b"ok", end_stream=True)
                    elif path.endswith("/hints-cl"):
                        conn.send_headers(sid, [(":status", "103"), ("link", "</a.css>"),
                                                ("content-length", "0")])
                        conn.send_headers(sid, [(":status", "204")], end_stream=True)
                    elif path.endswith("/hints-huge"):
                        # One field of 66,000 bytes: past 64 KiB as HTTP/1.1 counts it.
                        conn.send_headers(sid, [(":status", "103"), ("x-big", "b" * 66000)])
                        conn.send_headers(sid, [(":status", "204")], end_stream=True)
                    elif path.endswith("/hints-big"):
                        fields = [(f"x-h{i}", "v") for i in range(300)]
                        conn.send_headers(sid, [(":status", "103")] + fields)
                        conn.send_headers(sid, [(":status", "204")], end_stream=True)
                    elif path.endswith("/slow"):
                        # Past the gateway's first look at its client (1 s).
                        time.sleep(1.3)
                        conn.send_headers(sid, [(":status", "200")])
                        conn.send_data(sid, b"slow", end_stream=True)
                    elif "/big/" in path:
                        # One field of N bytes.
                        size = int(path.rsplit("/", 1)[1])
                        conn.send_headers(sid, [(":status", "200"), ("x-big", "b" * size)])
                        conn.send_data(sid, b"ok", end_stream=True)
                    elif path.endswith("/trailers"):
                        conn.send_headers(sid, [(":status", "200")])
                        conn.send_data(sid, b"hello")
                        conn.send_headers(sid, [("content-length", "999"),
                                                ("host", "evil.example"), ("x-ok", "1")],
                                          end_stream=True)
                    else:
                        count = int(path.rsplit("/", 1)[1])
                        fields = [(f"x-h{i}", "v") for i in range(count)]
                        conn.send_headers(sid, [(":status", "200")] + fields)
                        conn.send_data(sid, b"ok", end_stream=True)
                    continue
                if MALFORMED:
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("connection", "close")],
                                      end_stream=True)
                    continue
                if NO_CONTENT or ZERO or GOAWAY_ONCE:
                    conn.send_headers(event.stream_id, [(":status", "204"),
                                                        ("content-length", "0")],
                                      end_stream=True)
                    continue
                if GOAWAY:
                    conn.close_connection(error_code=CODE, last_stream_id=max(0, event.stream_id - 2))
                    sock.sendall(conn.data_to_send())
                    close_gracefully(sock)
                    return
                if PARTIAL:
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc")])
                    # A message of 10 bytes, 3 of them sent.
                    conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x0aabc")
                    sock.sendall(conn.data_to_send())
                conn.reset_stream(event.stream_id, error_code=CODE)
        sock.sendall(conn.data_to_send())


listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(f"port {listener.getsockname()[1]}", flush=True)
while True:
    client, _ = listener.accept()
    with lock:
        print("connection", flush=True)
    threading.Thread(target=serve, args=(client,), daemon=True).start()
