#!/usr/bin/env python3
"""A gRPC service and client (PyPI grpcio) for the gateway's gRPC tests, on loopback only.

  grpc_peer.py serve [unavailable|bulky-health]
                                     starts the service on 127.0.0.1:0, prints "port N", runs
                                     until stdin closes (the test holds it open); with
                                     `unavailable` every call fails with UNAVAILABLE; with
                                     `bulky-health` the health check answers SERVING with
                                     128 MiB more in an unknown field
  grpc_peer.py serve-tls CERT KEY    the same over TLS with CERT and KEY
  grpc_peer.py serve-shop GENDIR     the same for the transcoding tests' `shop.v1.Orders`
                                     (GENDIR: protoc's --python_out for shop.proto)
  grpc_peer.py call TARGET [--tls CA NAME] [--authority NAME] CHECK...
                                     runs each CHECK through TARGET (the gateway) and prints one
                                     JSON line per check (cleartext calls with :authority NAME)
  grpc_peer.py stall TARGET N SIZE   over one h2c connection to TARGET, N Unary calls of SIZE
                                     bytes whose answers it never reads (PyPI h2); prints
                                     "stalled" once they are sent, holds until stdin closes

Service `test.Echo`, messages are raw bytes (no protobuf code generation needed):
  Unary(m)            -> b"echo:" + m; metadata "x-echo-meta" comes back as trailing metadata
  ServerStream(n)     -> n messages b"item-0", b"item-1", ... (n as decimal text)
  ClientStream(m...)  -> b"|".join(m...)
  Bidi(m...)          -> b"bidi:" + m for each m, as each arrives (ping-pong)
  Sleep(ms)           -> waits ms milliseconds (or until the call is cancelled), then b"woke"
  Fail(code)          -> aborts with that status code and message "asked to fail"
  Remaining()         -> the call's time remaining in milliseconds, as text ("none" without)
  LastCancel()        -> how long the last cancelled Sleep ran before it saw the cancel (ms)
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


LAST_CANCEL = {"ms": -1}


def sleep(request, context):
    start = time.monotonic()
    end = start + int(request.decode()) / 1000
    while time.monotonic() < end and context.is_active():
        time.sleep(0.01)
    if not context.is_active():
        LAST_CANCEL["ms"] = int((time.monotonic() - start) * 1000)
    return b"woke"


def last_cancel(request, context):
    return b"%d" % LAST_CANCEL["ms"]


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


def bulky_health(request, context):
    # SERVING, then field 15 (bytes, wire type 2: tag 0x7a) of 128 MiB.
    size = 128 << 20
    length = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return b"\x08\x01\x7a" + bytes(length) + bytes(128 << 20)


def serve(mode, tls=None):
    # `one-stream`: SETTINGS_MAX_CONCURRENT_STREAMS 1 (grpc-core resets the streams a
    # client opens past it).
    options = (("grpc.max_concurrent_streams", 1),) if mode == "one-stream" else ()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unavailable if mode == "unavailable" else unary, **IDENT
        ),
        "Remaining": grpc.unary_unary_rpc_method_handler(remaining, **IDENT),
        "LastCancel": grpc.unary_unary_rpc_method_handler(last_cancel, **IDENT),
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
                {
                    "Check": grpc.unary_unary_rpc_method_handler(
                        bulky_health if mode == "bulky-health" else health, **IDENT
                    )
                },
            ),
        )
    )
    if tls:
        with open(tls[0], "rb") as c, open(tls[1], "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("port %d" % port, flush=True)
    # Ends when the test closes stdin (or exits).
    sys.stdin.read()
    server.stop(0)


def serve_shop(gendir):
    """shop.v1.Orders (controlplane/tests/fixtures/proto/shop/v1/shop.proto):
    GetOrder: id "missing" -> NOT_FOUND (trailers-only, with x-order-note); "locked" ->
        FAILED_PRECONDITION with a google.rpc.Status in grpc-status-details-bin; otherwise an
        order with that id
    ListOrders: one order per tag, echoing customer, status and page_size (as the token)
    CreateOrder: the order with id "new-" + request_id
    UpdateOrder / Echo: the order as received
    DeleteOrder: empty; CancelOrder: CANCELLED with the reason as customer
    GetItems: GetOrder's order; WatchOrders: `count` events for the customer; count 99
        fails with UNAVAILABLE after two events; count 98 sends one, then nothing for 20 s
        unless cancelled
    """
    sys.path.insert(0, gendir)
    from shop.v1 import shop_pb2 as pb

    def order(oid):
        o = pb.Order(id=oid, customer="ann", status=pb.SHIPPED, discount=0.25, gift=True)
        o.items.add(sku="a-1", quantity=2, price_cents=1999)
        o.items.add(sku="b-2", quantity=1, price_cents=9007199254740993)
        o.created_at.FromJsonString("2026-01-02T03:04:05.500Z")
        o.ship_within.FromJsonString("3600s")
        o.labels["lane"] = "express"
        return o

    def get_order(req, ctx):
        if req.id == "missing":
            ctx.set_trailing_metadata((("x-order-note", "not-here"),))
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no order " + req.id)
        if req.id == "locked":
            # google.rpc.Status{code 9, message, details [Any{type_url, value}]}, by hand.
            any_ = _ld(1, b"type.googleapis.com/shop.v1.Lock") + _ld(2, b"\x08\x01")
            status = b"\x08\x09" + _ld(2, b"order is locked") + _ld(3, any_)
            ctx.set_trailing_metadata((("grpc-status-details-bin", status),))
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "order is locked")
        return order(req.id)

    def list_orders(req, ctx):
        out = pb.ListOrdersResponse(next_page_token=str(req.page_size))
        for t in req.tags:
            o = out.orders.add(id=t, customer=req.customer, status=req.status, gift=req.gift_only)
            if req.HasField("since"):
                o.created_at.CopyFrom(req.since)
        return out

    def create_order(req, ctx):
        o = pb.Order()
        o.CopyFrom(req.order)
        o.id = "new-" + req.request_id
        return o

    def same(req, ctx):
        o = pb.Order()
        o.CopyFrom(req.order if hasattr(req, "order") else req)
        return o

    def cancel(req, ctx):
        return pb.Order(id=req.id, customer=req.reason, status=pb.CANCELLED)

    def watch(req, ctx):
        for i in range(2 if req.count == 99 else 1 if req.count == 98 else req.count):
            yield pb.OrderEvent(order_id="%s-%d" % (req.customer, i), status=pb.PENDING, seq=i)
        if req.count == 99:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "stream broke")
        if req.count == 98:
            # A watch that goes on: one event, then nothing for 20 s unless cancelled.
            end = time.monotonic() + 20
            while ctx.is_active() and time.monotonic() < end:
                time.sleep(0.05)

    def h(kind, fn, req_type, resp_type):
        make = {"uu": grpc.unary_unary_rpc_method_handler, "us": grpc.unary_stream_rpc_method_handler}
        return make[kind](fn, request_deserializer=req_type.FromString,
                          response_serializer=resp_type.SerializeToString)

    handlers = {
        "GetOrder": h("uu", get_order, pb.GetOrderRequest, pb.Order),
        "ListOrders": h("uu", list_orders, pb.ListOrdersRequest, pb.ListOrdersResponse),
        "CreateOrder": h("uu", create_order, pb.CreateOrderRequest, pb.Order),
        "UpdateOrder": h("uu", same, pb.UpdateOrderRequest, pb.Order),
        "DeleteOrder": h("uu", lambda r, c: pb.DeleteOrderResponse(), pb.DeleteOrderRequest,
                         pb.DeleteOrderResponse),
        "CancelOrder": h("uu", cancel, pb.CancelOrderRequest, pb.Order),
        "GetItems": h("uu", get_order, pb.GetOrderRequest, pb.Order),
        "WatchOrders": h("us", watch, pb.WatchRequest, pb.OrderEvent),
        "Echo": h("uu", same, pb.Order, pb.Order),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("shop.v1.Orders", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("port %d" % port, flush=True)
    sys.stdin.read()
    server.stop(0)


def _ld(field, data):
    """A length-delimited protobuf field (lengths below 128)."""
    return bytes([field << 3 | 2, len(data)]) + data


def channel(target, tls, authority=None):
    if tls is None:
        options = (("grpc.default_authority", authority),) if authority else ()
        return grpc.insecure_channel(target, options=options)
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
        if name == "last_cancel":
            return {"reply": int(method(ch, "LastCancel", "uu")(b"", timeout=10))}
        if name == "remaining":
            return {"reply": method(ch, "Remaining", "uu")(b"", timeout=30).decode()}
        if name == "burst":
            # Four calls at once, each 200 ms long: their codes.
            pending = [method(ch, "Sleep", "uu").future(b"200", timeout=10) for _ in range(4)]
            codes = []
            for f in pending:
                try:
                    f.result()
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            return {"codes": codes}
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
    authority = None
    if rest and rest[0] == "--tls":
        tls = (rest[1], rest[2])
        rest = rest[3:]
    if rest and rest[0] == "--authority":
        authority = rest[1]
        rest = rest[2:]
    with channel(target, tls, authority) as ch:
        for name in rest:
            print(json.dumps({"check": name, **check(ch, name)}), flush=True)


def stall(argv):
    # A client that stops reading: its calls' answers fill the gateway's windows.
    import socket
    import h2.config
    import h2.connection
    host, port = argv[0].rsplit(":", 1)
    assert host.startswith("127."), "loopback only"
    n, size = int(argv[1]), int(argv[2])
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    bodies = {}
    for i in range(n):
        sid = 1 + 2 * i
        c.send_headers(sid, [(":method", "POST"), (":path", "/test.Echo/Unary"),
                             (":scheme", "http"), (":authority", "x"),
                             ("content-type", "application/grpc"), ("te", "trailers")])
        bodies[sid] = b"\x00" + size.to_bytes(4, "big") + b"z" * size
    s.sendall(c.data_to_send())
    s.settimeout(10)
    while bodies:
        sent = False
        for sid in list(bodies):
            w = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
            if w > 0:
                body = bodies[sid]
                k = min(w, len(body))
                c.send_data(sid, body[:k], end_stream=k == len(body))
                if k == len(body):
                    del bodies[sid]
                else:
                    bodies[sid] = body[k:]
                sent = True
        if not sent:
            # Only window updates are taken in; nothing read is acted on.
            c.receive_data(s.recv(65536))
        s.sendall(c.data_to_send())
    print("stalled", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2] if len(sys.argv) > 2 else "")
    elif sys.argv[1] == "serve-tls":
        serve("", (sys.argv[2], sys.argv[3]))
    elif sys.argv[1] == "serve-shop":
        serve_shop(sys.argv[2])
    elif sys.argv[1] == "call":
        call(sys.argv[2:])
    elif sys.argv[1] == "stall":
        stall(sys.argv[2:])
    else:
        sys.exit("usage: grpc_peer.py serve | call TARGET [--tls CA NAME] CHECK...")
