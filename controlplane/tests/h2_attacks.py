#!/usr/bin/env python3
"""Negative HTTP/2 tests against the gateway's h2c listener (loopback only).

Usage: h2_attacks.py HOST:PORT [SLOW_PATH [SLOWER_PATH]]
       h2_attacks.py --drain HOST:PORT SLOW_PATH
       h2_attacks.py --held HOST:PORT BIG_PATH

--held (against a gateway with short client_send_ms and client_idle_ms, about a second):
a client that keeps its stream window shut after asking for BIG_PATH gets RST_STREAM, as does
one that opens it a byte at a time, and an idle connection whose client never answers the
GOAWAY's PING is closed, each within seconds.

SLOW_PATH: a path the gateway answers only after a while (a slow origin); streams reset while
it is being answered count toward the connection's reset limit. SLOWER_PATH (answered after
ten seconds or more): streams reset while waiting for it must count at once, not when the
answers come back (the exchanges are given up, so a client cannot keep them running). --drain: sends one request
to SLOW_PATH, prints READY, and expects a GOAWAY (NO_ERROR) and then the complete answer
(the caller sends the gateway SIGTERM after READY).

Each attack runs on its own connection, built frame by frame with the PyPI `h2` package's
hyperframe and hpack, and checks the gateway's answer (the GOAWAY or RST_STREAM and its error
code). After each one a well-behaved client on a fresh connection must still get a 200, and a
second well-behaved connection is kept busy during the floods. Prints one line per check and
exits 1 on any failure.
"""
import socket
import sys
import threading
import time

try:
    import h2.connection
    import h2.config
    import h2.events
    import hpack
    from hyperframe.frame import (
        ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
        RstStreamFrame, SettingsFrame, WindowUpdateFrame,
    )
except ImportError:
    sys.exit("h2_attacks.py needs the PyPI package h2 (pip install h2)")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0, 1, 6, 9, 11

ARGS = [a for a in sys.argv[1:] if a not in ("--drain", "--held")]
DRAIN = "--drain" in sys.argv
HELD = "--held" in sys.argv
HOST, PORT = ARGS[0].rsplit(":", 1)
PORT = int(PORT)
SLOW = ARGS[1] if len(ARGS) > 1 else None
SLOWER = ARGS[2] if len(ARGS) > 2 else None
assert HOST.startswith("127.") or HOST == "::1", "loopback targets only"
failures = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def request_headers(path="/", extra=()):
    return [(":method", "GET"), (":scheme", "http"), (":authority", "localhost"),
            (":path", path)] + list(extra)


class Raw:
    """A connection that speaks frames by hand."""

    def __init__(self, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in HOST else socket.AF_INET)
        if rcvbuf:
            # Before connecting: the window the kernel offers is set then.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((HOST, PORT))
        self.enc = hpack.Encoder()
        self.buf = b""
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def send(self, *frames):
        self.sock.sendall(b"".join(f.serialize() for f in frames))

    def headers(self, sid, path="/", end_stream=True, extra=()):
        f = HeadersFrame(sid, self.enc.encode(request_headers(path, extra)))
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    def frames(self, until, timeout=10):
        """Reads frames until `until(frame)` is true (returns it), the connection closes
        (returns None) or `timeout` passes (returns "timeout")."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            while len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + length:
                    break
                frame, _ = Frame.parse_frame_header(memoryview(self.buf[:9]))
                frame.parse_body(memoryview(self.buf[9:9 + length]))
                self.buf = self.buf[9 + length:]
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    ack = SettingsFrame(0)
                    ack.flags.add("ACK")
                    try:
                        self.send(ack)
                    except OSError:
                        pass
                if until(frame):
                    return frame
            try:
                self.sock.settimeout(max(0.05, deadline - time.time()))
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not data:
                return None
            self.buf += data
        return "timeout"

    def close(self):
        self.sock.close()


def good_request(path="/ok"):
    """One GET on a fresh connection with the h2 state machine; returns the status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = socket.create_connection((HOST, PORT), timeout=5)
    try:
        conn.initiate_connection()
        conn.send_headers(1, request_headers(path), end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.time() + 10
        status = None
        while time.time() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers).get(b":status")
                if isinstance(ev, h2.events.StreamEnded):
                    return int(status)
            s.sendall(conn.data_to_send())
        return None
    finally:
        s.close()


class Busy(threading.Thread):
    """A well-behaved client making requests while an attack runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = False
        self.ok = 0
        self.bad = []

    def run(self):
        while not self.stop:
            try:
                st = good_request("/busy")
            except OSError as e:
                st = repr(e)
            if st == 200:
                self.ok += 1
            else:
                self.bad.append(st)


def is_goaway(f):
    return isinstance(f, GoAwayFrame)


def attack(name, body):
    busy = Busy()
    busy.start()
    try:
        body()
    except Exception as e:  # noqa: BLE001 - any exception is a failed check
        check(name, False, f"raised {e!r}")
    busy.stop = True
    busy.join(15)
    check(f"{name}: others served meanwhile", busy.ok > 0 and not busy.bad,
          f"ok={busy.ok} bad={busy.bad[:3]}")
    st = good_request("/after")
    check(f"{name}: a new client is served after it", st == 200, f"status={st}")


def rapid_reset():
    # CVE-2023-44487: open and cancel streams as fast as possible.
    r = Raw()
    frames = []
    for i in range(2000):
        sid = 1 + 2 * i
        frames += [r.headers(sid, "/reset"), RstStreamFrame(sid, error_code=8)]
    try:
        for i in range(0, len(frames), 200):
            r.send(*frames[i:i + 200])
    except OSError:
        pass  # the gateway may close before all are sent
    g = r.frames(is_goaway)
    check("rapid reset: GOAWAY ENHANCE_YOUR_CALM", g not in (None, "timeout")
          and g.error_code == ENHANCE_YOUR_CALM,
          f"got {getattr(g, 'error_code', g)}")
    r.close()


def malformed_flood():
    # Streams the gateway itself resets as malformed (a host naming another authority),
    # by the thousand: counted as resets are, so the connection ends (before: 2000 resets,
    # each logged, the connection kept).
    # In batches of 50, each batch's resets read before the next is sent: never many
    # streams open at once, which h2's own limits would end.
    r = Raw()
    g = None
    try:
        for batch in range(40):
            r.send(*[r.headers(1 + 2 * (50 * batch + i), "/bad", extra=[("host", "elsewhere")])
                     for i in range(50)])
            resets = [0]

            def reset_or_goaway(f):
                resets[0] += isinstance(f, RstStreamFrame)
                return is_goaway(f) or resets[0] == 50
            got = r.frames(reset_or_goaway)
            if got is None or got == "timeout" or is_goaway(got):
                g = got
                break
    except OSError:
        pass  # the gateway may close before all are sent
    if g is None:
        g = r.frames(is_goaway)
    check("malformed flood: GOAWAY ENHANCE_YOUR_CALM", g not in (None, "timeout")
          and g.error_code == ENHANCE_YOUR_CALM,
          f"got {getattr(g, 'error_code', g)}")
    r.close()


def continuation_flood():
    # HEADERS without END_HEADERS, then CONTINUATION frames that never end.
    r = Raw()
    block = r.enc.encode(request_headers("/flood"))
    first = HeadersFrame(1, block)
    r.send(first)
    junk = ContinuationFrame(1, hpack.Encoder().encode([("x-flood", "a" * 8000)]))
    try:
        for _ in range(2000):
            r.send(junk)
    except OSError:
        pass
    g = r.frames(is_goaway)
    check("CONTINUATION flood: GOAWAY, connection ended", g is None or is_goaway(g),
          f"got {getattr(g, 'error_code', g)}")
    if is_goaway(g):
        check("CONTINUATION flood: error code", g.error_code in
              (ENHANCE_YOUR_CALM, COMPRESSION_ERROR, PROTOCOL_ERROR), f"code={g.error_code}")
    r.close()


def oversized_headers():
    # One header field larger than SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB by default).
    r = Raw()
    big = [("x-big", "b" * 100_000)]
    block = r.enc.encode(request_headers("/big", big))
    first = HeadersFrame(1, block[:16000])
    r.send(first)
    rest = block[16000:]
    chunks = [rest[i:i + 16000] for i in range(0, len(rest), 16000)]
    for i, c in enumerate(chunks):
        f = ContinuationFrame(1, c)
        if i == len(chunks) - 1:
            f.flags.add("END_HEADERS")
        r.send(f)
    ok, detail = refused_as_too_large(r.frames(answer_to(1)))
    check("oversized header list: refused (431, RST_STREAM or GOAWAY)", ok, detail)
    r.close()


def answer_to(sid):
    """A `frames` condition: stream `sid`'s answer (HEADERS or RST_STREAM), or a GOAWAY."""
    return lambda f: (isinstance(f, (HeadersFrame, RstStreamFrame)) and f.stream_id == sid) \
        or is_goaway(f)


def ended_request(r, sid, fields):
    """A whole request of these header fields (pseudo-headers included), as one frame."""
    f = HeadersFrame(sid, r.enc.encode(fields))
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    return f


def check_malformed(name, got):
    check(f"{name}: RST_STREAM PROTOCOL_ERROR",
          isinstance(got, RstStreamFrame) and got.error_code == PROTOCOL_ERROR,
          f"got {type(got).__name__} {getattr(got, 'error_code', '')}")


def status_of(got):
    return dict(hpack.Decoder().decode(got.data)).get(":status") \
        if isinstance(got, HeadersFrame) else None


def refused_as_too_large(got):
    """Whether `got` refuses a header list too large (431, RST_STREAM or GOAWAY), and what
    it was."""
    if isinstance(got, HeadersFrame):
        return status_of(got) == "431", f"status {status_of(got)}"
    return isinstance(got, (RstStreamFrame, GoAwayFrame)), \
        f"{type(got).__name__} {getattr(got, 'error_code', '')}"


def missing_path():
    # A GET with neither :path nor :authority (a host field instead): malformed (RFC 9113
    # 8.3.1), so RST_STREAM PROTOCOL_ERROR, not an answer for "/"; the connection goes on.
    r = Raw()
    r.send(ended_request(r, 1, [(":method", "GET"), (":scheme", "http"), ("host", "localhost")]))
    check_malformed("missing :path", r.frames(answer_to(1)))
    r.send(r.headers(3, "/ok"))
    status = status_of(r.frames(answer_to(3)))
    check("missing :path: the next stream is answered", status == "200", f"status={status}")
    r.close()


def padded_value():
    # A field value with leading or trailing whitespace is malformed (RFC 9113 8.2.1):
    # RST_STREAM PROTOCOL_ERROR, not forwarded; the connection goes on.
    r = Raw()
    sid = 1
    for value in (" v", "v ", "\tv"):
        r.send(r.headers(sid, "/ok", extra=[("x-padded", value)]))
        check_malformed(f"value {value!r}", r.frames(answer_to(sid)))
        sid += 2
    # userinfo in :authority is malformed too (RFC 9113 8.3.1).
    r.send(ended_request(r, sid, [(":method", "GET"), (":scheme", "http"),
                                  (":authority", "user:pw@localhost"), (":path", "/ok")]))
    check_malformed(":authority with userinfo", r.frames(answer_to(sid)))
    sid += 2
    r.send(r.headers(sid, "/ok", extra=[("x-inner", "a  b")]))
    status = status_of(r.frames(answer_to(sid)))
    check("inner whitespace is fine: answered", status == "200", f"status={status}")
    r.close()


def raw_frame(ftype, flags, sid, payload):
    """Frame bytes by hand, for frames hyperframe refuses to build."""
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def hpack_bomb():
    # A small block that decodes to a huge header list: one 4 KB field put in the dynamic
    # table, then referenced by its index (one byte each) 40 times: 160 KB decoded.
    r = Raw()
    enc = hpack.Encoder()
    block = enc.encode(request_headers("/bomb", [("x-bomb", "b" * 4000)] * 40))
    f = HeadersFrame(1, block)
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    r.send(f)
    ok, detail = refused_as_too_large(r.frames(answer_to(1)))
    check(f"HPACK bomb ({len(block)} bytes encoded): refused", ok, detail)
    r.close()


def invalid_frames():
    cases = [
        ("DATA on stream 0", raw_frame(0, 0, 0, b"x"), PROTOCOL_ERROR),
        ("WINDOW_UPDATE of 0 on the connection", raw_frame(8, 0, 0, b"\0\0\0\0"),
         PROTOCOL_ERROR),
        ("SETTINGS ENABLE_PUSH=2", raw_frame(4, 0, 0, b"\0\x02\0\0\0\x02"), PROTOCOL_ERROR),
        ("HEADERS on an even stream id", None, PROTOCOL_ERROR),
    ]
    for name, frame, code in cases:
        r = Raw()
        if frame is None:
            r.send(r.headers(2, "/even"))
        else:
            r.sock.sendall(frame)
        g = r.frames(is_goaway)
        check(f"invalid frame ({name}): GOAWAY {code}",
              is_goaway(g) and g.error_code == code,
              f"got {getattr(g, 'error_code', g)}")
        r.close()
    # A frame longer than SETTINGS_MAX_FRAME_SIZE (16384): FRAME_SIZE_ERROR.
    r = Raw()
    r.send(r.headers(1, "/x", end_stream=False))
    r.sock.sendall((20000).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") +
                   b"\x00" * 20000)
    g = r.frames(is_goaway)
    check("oversized frame: GOAWAY FRAME_SIZE_ERROR",
          is_goaway(g) and g.error_code == FRAME_SIZE_ERROR,
          f"got {getattr(g, 'error_code', g)}")
    r.close()


def ping_and_settings_flood():
    # Control frames the gateway must answer, sent without reading the answers.
    r = Raw()
    r.sock.settimeout(5)
    sent = 0
    try:
        for _ in range(50):
            r.send(*([PingFrame(0, opaque_data=b"12345678")] * 500 + [SettingsFrame(0)] * 500))
            sent += 1000
    except OSError:
        pass
    # The gateway either keeps up or closes this connection; it must not die or stall others.
    check("PING/SETTINGS flood: the gateway stays up", good_request("/flood-done") == 200,
          f"{sent} frames sent")
    r.close()


def stream_limit():
    # More concurrent streams than SETTINGS_MAX_CONCURRENT_STREAMS: the extra are refused.
    r = Raw()
    limit = None
    f = r.frames(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
    if isinstance(f, SettingsFrame):
        limit = f.settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS)
    check("SETTINGS_MAX_CONCURRENT_STREAMS announced", limit is not None, f"limit={limit}")
    if limit:
        # Streams left open (no END_STREAM) so they stay counted.
        frames = [r.headers(1 + 2 * i, "/held", end_stream=False) for i in range(limit + 5)]
        r.send(*frames)
        f = r.frames(lambda f: isinstance(f, RstStreamFrame) and f.stream_id > 2 * limit - 1
                     or is_goaway(f))
        check("streams past the limit refused", isinstance(f, (RstStreamFrame, GoAwayFrame)),
              f"got {type(f).__name__ if not isinstance(f, str) else f} "
              f"{getattr(f, 'error_code', '')}")
    r.close()


def slow_reset(path=None, within=20):
    # Streams accepted and being answered (a slow origin), then cancelled by the client: each
    # costs the gateway work, so past http2.max_pending_resets (100) the connection ends.
    # With `within` shorter than the origin's delay, the resets must count as they come.
    r = Raw()
    started = time.time()
    for i in range(150):
        sid = 1 + 2 * i
        try:
            r.send(r.headers(sid, path or SLOW))
            time.sleep(0.005)
            r.send(RstStreamFrame(sid, error_code=8))
        except OSError:
            break  # the gateway has had enough: its GOAWAY is in
    g = r.frames(is_goaway, timeout=within)
    check(f"reset while answering{' (slower origin)' if path else ''}: GOAWAY ENHANCE_YOUR_CALM",
          is_goaway(g) and g.error_code == ENHANCE_YOUR_CALM,
          f"got {getattr(g, 'error_code', g)} after {time.time() - started:.1f} s")
    r.close()


def slower_reset():
    slow_reset(SLOWER, within=5)


def mostly_answered_resets():
    # A long-lived connection that cancels some streams mid-answer, as a browser does when a
    # page changes, but completes most: past the reset limit (100) in number, never in share.
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = socket.create_connection((HOST, PORT), timeout=10)
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    state = {"answered": 0, "goaway": None}

    def pump(want, timeout=10):
        deadline = time.time() + timeout
        while want and time.time() < deadline and state["goaway"] is None:
            for ev in conn.receive_data(s.recv(65536)):
                if isinstance(ev, h2.events.StreamEnded) and ev.stream_id in want:
                    want.discard(ev.stream_id)
                    state["answered"] += 1
                if isinstance(ev, h2.events.ConnectionTerminated):
                    state["goaway"] = ev.error_code
            s.sendall(conn.data_to_send())

    sid = 1
    rounds = 120
    for _ in range(rounds):
        # Three quick requests answered, one slow one cancelled while it is being answered.
        for path in ("/ok", "/ok", "/ok", SLOW):
            conn.send_headers(sid, request_headers(path), end_stream=True)
            sid += 2
        s.sendall(conn.data_to_send())
        pump({sid - 8, sid - 6, sid - 4})
        conn.reset_stream(sid - 2, error_code=8)
        s.sendall(conn.data_to_send())
    # The cancelled streams are counted as their answers come back from the slow origin.
    time.sleep(2)
    conn.send_headers(sid, request_headers("/ok"), end_stream=True)
    s.sendall(conn.data_to_send())
    pump({sid})
    check("cancelling a quarter of the streams: the connection stays",
          state["goaway"] is None and state["answered"] == 3 * rounds + 1,
          f"answered={state['answered']} cancelled={rounds} goaway={state['goaway']}")
    s.close()


def drain():
    # Streams open as the drain begins: a slow answer, and large ones (more than the
    # gateway's socket takes at once) that this client reads slowly, through a small socket
    # buffer and with its HTTP/2 windows wide open, so they wait in the gateway's socket and
    # behind its GOAWAY. It answers the GOAWAY's PING, as clients do. All must arrive whole.
    r = Raw(rcvbuf=65536)
    big = 2**31 - 1
    r.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: big}),
           WindowUpdateFrame(0, window_increment=big - 65535))
    streams = [1] + [3 + 2 * i for i in range(6)]
    r.send(r.headers(1, SLOW), *[r.headers(sid, "/big") for sid in streams[1:]])
    print("READY", flush=True)
    goaway, ended, large = None, set(), 0
    deadline = time.time() + 20
    while len(ended) < len(streams) and time.time() < deadline:
        f = r.frames(lambda f: True, timeout=deadline - time.time())
        if f is None or isinstance(f, str):
            break
        if is_goaway(f) and goaway is None:
            goaway = f
        if isinstance(f, PingFrame) and "ACK" not in f.flags:
            pong = PingFrame(0, opaque_data=f.opaque_data)
            pong.flags.add("ACK")
            r.send(pong)
        if isinstance(f, DataFrame) and f.stream_id > 1:
            large += len(f.data)
            time.sleep(len(f.data) / 2_000_000)  # about 2 MB/s
        if isinstance(f, RstStreamFrame):
            break
        if f.stream_id in streams and "END_STREAM" in f.flags:
            ended.add(f.stream_id)
    check("drain: GOAWAY NO_ERROR", is_goaway(goaway) and goaway.error_code == NO_ERROR,
          f"got {getattr(goaway, 'error_code', goaway)}")
    check("drain: the open stream is answered to the end", 1 in ended, f"ended {ended}")
    check("drain: large answers read slowly arrive whole", len(ended) == len(streams),
          f"ended {sorted(ended)}, {large} bytes of them")
    r.close()


def held():
    # Asks for a large answer with its stream window at 0, and never opens it.
    r = Raw()
    shut = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    r.send(shut, r.headers(1, SLOW))
    started = time.time()
    f = r.frames(lambda f: isinstance(f, (RstStreamFrame, GoAwayFrame)), timeout=10)
    check("a shut window: RST_STREAM", isinstance(f, RstStreamFrame) and f.stream_id == 1,
          f"got {f if isinstance(f, str) or f is None else type(f).__name__} "
          f"after {time.time() - started:.1f} s")
    r.close()
    # The window opened a byte at a time, each opening well within client_send_ms: the stream
    # is still reset (the bound counts from the stall, until 16 KiB have gone out).
    r = Raw()
    r.send(shut, r.headers(1, SLOW))
    started = time.time()
    got = "timeout"
    while time.time() - started < 8 and got == "timeout":
        r.send(WindowUpdateFrame(1, window_increment=1))
        got = r.frames(lambda f: isinstance(f, (RstStreamFrame, GoAwayFrame)), timeout=0.3)
    check("a window opened a byte at a time: RST_STREAM",
          isinstance(got, RstStreamFrame) and got.stream_id == 1,
          f"got {got if isinstance(got, str) or got is None else type(got).__name__} "
          f"after {time.time() - started:.1f} s")
    r.close()
    # Idle, and never answers a PING (Raw only acknowledges SETTINGS).
    r = Raw()
    started = time.time()
    g = r.frames(is_goaway, timeout=10)
    check("idle: GOAWAY", is_goaway(g), f"got {g}")
    end = r.frames(lambda f: False, timeout=10)
    check("idle, the PING unanswered: closed", end is None,
          f"got {end} after {time.time() - started:.1f} s")
    r.close()


if HELD:
    held()
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)

if DRAIN:
    drain()
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)

attack("rapid reset", rapid_reset)
attack("malformed stream flood", malformed_flood)
if SLOW:
    attack("reset while answering", slow_reset)
if SLOWER:
    attack("reset while waiting for a slower origin", slower_reset)
    attack("resets among answered streams", mostly_answered_resets)
attack("CONTINUATION flood", continuation_flood)
attack("oversized header list", oversized_headers)
attack("HPACK bomb", hpack_bomb)
attack("invalid frames", invalid_frames)
attack("missing :path", missing_path)
attack("padded field value", padded_value)
attack("PING/SETTINGS flood", ping_and_settings_flood)
attack("concurrent stream limit", stream_limit)
print(f"{len(failures)} failed")
sys.exit(1 if failures else 0)
