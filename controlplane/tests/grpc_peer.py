#!/usr/bin/env python3
"""A gRPC service and client (PyPI grpcio) for the gateway's gRPC tests, on loopback only.

  grpc_peer.py serve [unavailable]   starts the service on 127.0.0.1:0, prints "port N", runs
                                     until stdin closes (the test holds it open); with
                                     `unavailable` every call fails with UNAVAILABLE
  grpc_peer.py call TARGET [--tls CA NAME] CHECK...
                                     runs each CHECK through TARGET (the gateway) and prints one
                                     JSON line per check

Service `test.Echo`, messages are raw bytes (no protobuf code generation needed):
  Unary(m)            -> b"echo:" + m; metadata "x-echo-meta" comes back as trailing metadata
  ServerStream(n)     -> n messages b"item-0", b"item-1", ... (n as decimal text)
  ClientStream(m...)  -> b"|".join(m...)
  Bidi(m...)          -> b"bidi:" + m for each m, as each arrives (ping-pong)
  Sleep(ms)           -> waits ms milliseconds (or until the call is cancelled), then b"woke"
  Fail(code)          -> aborts with that status code and message "asked to fail"
  Remaining()         -> the call's time remaining in milliseconds, as text ("none" without)
and the standard health service `grpc.health.v1.Health/Check` (empty request: SERVING).
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc

IDENT = dict(request_deserializer=None, response_serializer=None)


def unary(request, context):
    meta = dict(context.invocation_metadata())
    if "x-echo-meta" in meta:
        context.set_trailing_metadata((("x-echo-meta", meta["x-echo-meta"]),))
    return b"echo:" + request


def server_stream(request, context):
    for i in range(int(request.decode() or "0")):
        yield b"item-%d" % i


def client_stream(request_iterator, context):
    return b"|".join(list(request_iterator))


def bidi(request_iterator, context):
    for m in request_iterator:
        yield b"bidi:" + m


def sleep(request, context):
    end = time.monotonic() + int(request.decode()) / 1000
    while time.monotonic() < end and context.is_active():
        time.sleep(0.01)
    return b"woke"


def fail(request, context):
    context.abort(grpc.StatusCode(_code(int(request.decode()))), "asked to fail")


def remaining(request, context):
    left = context.time_remaining()
    return b"none" if left is None else b"%d" % int(left * 1000)


def unavailable(request, context):
    context.abort(grpc.StatusCode.UNAVAILABLE, "this instance is unavailable")


def _code(n):
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c.value
    raise ValueError(n)


def health(request, context):
    # HealthCheckResponse { status: SERVING (1) } in protobuf: field 1, varint 1.
    return b"\x08\x01"


def serve(mode):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unavailable if mode == "unavailable" else unary, **IDENT
        ),
        "Remaining": grpc.unary_unary_rpc_method_handler(remaining, **IDENT),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **IDENT),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **IDENT),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **IDENT),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep, **IDENT),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, **IDENT),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("test.Echo", handlers),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": grpc.unary_unary_rpc_method_handler(health, **IDENT)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("port %d" % port, flush=True)
    # Ends when the test closes stdin (or exits).
    sys.stdin.read()
    server.stop(0)


def channel(target, tls):
    if tls is None:
        return grpc.insecure_channel(target)
    ca, name = tls
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(
        target, creds, options=(("grpc.ssl_target_name_override", name),)
    )


def method(ch, name, kind):
    path = "/test.Echo/" + name
    make = {
        "uu": ch.unary_unary,
        "us": ch.unary_stream,
        "su": ch.stream_unary,
        "ss": ch.stream_stream,
    }[kind]
    return make(path, request_serializer=None, response_deserializer=None)


def status_of(e):
    return {"code": e.code().name, "details": e.details()}


def check(ch, name):
    """One named check; returns what it saw."""
    try:
        if name == "unary":
            resp, call = method(ch, "Unary", "uu").with_call(
                b"hello", metadata=(("x-echo-meta", "m1"),), timeout=10
            )
            return {
                "reply": resp.decode(),
                "trailer": dict(call.trailing_metadata()).get("x-echo-meta"),
            }
        if name == "server_stream":
            got = [m.decode() for m in method(ch, "ServerStream", "us")(b"5", timeout=10)]
            return {"reply": got}
        if name == "client_stream":
            reqs = iter([b"a", b"b", b"c"])
            return {"reply": method(ch, "ClientStream", "su")(reqs, timeout=10).decode()}
        if name == "bidi":
            # Ping-pong: each message is sent only after the answer to the previous one
            # came back, which needs both directions to flow at once through the gateway.
            out = []
            sent = threading.Semaphore(1)
            words = [b"one", b"two", b"three"]

            def requests():
                for w in words:
                    sent.acquire()
                    yield w

            for m in method(ch, "Bidi", "ss")(requests(), timeout=10):
                out.append(m.decode())
                sent.release()
            return {"reply": out}
        if name == "big":
            payload = b"x" * (3 * 1024 * 1024)
            resp = method(ch, "Unary", "uu")(payload, timeout=20)
            return {"reply_len": len(resp)}
        if name == "remaining":
            return {"reply": method(ch, "Remaining", "uu")(b"", timeout=30).decode()}
        if name == "sleep_long":
            start = time.monotonic()
            try:
                method(ch, "Sleep", "uu")(b"5000", timeout=20)
                return {"reply": "woke"}
            except grpc.RpcError as e:
                r = status_of(e)
                r["elapsed_ms"] = int((time.monotonic() - start) * 1000)
                return r
        if name == "deadline":
            start = time.monotonic()
            try:
                method(ch, "Sleep", "uu")(b"5000", timeout=0.3)
                return {"reply": "no deadline"}
            except grpc.RpcError as e:
                r = status_of(e)
                r["elapsed_ms"] = int((time.monotonic() - start) * 1000)
                return r
        if name.startswith("fail:"):
            method(ch, "Fail", "uu")(name[5:].encode(), timeout=10)
            return {"reply": "no failure"}
        if name == "many":
            f = method(ch, "Unary", "uu")
            calls = [f.future(b"%d" % i, timeout=20) for i in range(200)]
            ok = sum(1 for i, c in enumerate(calls) if c.result() == b"echo:%d" % i)
            return {"ok": ok}
        raise ValueError("unknown check " + name)
    except grpc.RpcError as e:
        return status_of(e)


def call(argv):
    target = argv[0]
    rest = argv[1:]
    tls = None
    if rest and rest[0] == "--tls":
        tls = (rest[1], rest[2])
        rest = rest[3:]
    with channel(target, tls) as ch:
        for name in rest:
            print(json.dumps({"check": name, **check(ch, name)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2] if len(sys.argv) > 2 else "")
    elif sys.argv[1] == "call":
        call(sys.argv[2:])
    else:
        sys.exit("usage: grpc_peer.py serve | call TARGET [--tls CA NAME] CHECK...")
