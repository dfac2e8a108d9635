//! Upgrades (WebSocket): after the upstream's `101 Switching Protocols`, the gateway relays
//! the head and then bytes both ways until both sides are done or the tunnel has been silent
//! for `upstream_body_ms`.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::task::{Poll, Waker};
use std::time::Instant;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use super::context::RequestCtx;
use super::downstream::Downstream;
use super::relay::replace_request_id;
use super::stream::ClientStream;
use crate::codec::response::ResponseHead;
use crate::codec::Span;
use crate::error::ErrorKind;
use crate::forward::response_pieces;
use crate::gather::write_gathered;
use crate::io::write_range;
use crate::upstream::UpstreamConn;
use crate::worker_ctx::WorkerCtx;

/// Relays the 101 head, then tunnels until both directions are closed.
pub(crate) async fn tunnel<S: ClientStream>(
    ctx: &WorkerCtx,
    mut down: Downstream<S>,
    req: &mut RequestCtx,
    mut conn: UpstreamConn,
    resp: ResponseHead,
) {
    // Bytes the client sent after the upgrade request belong to the new protocol.
    if down.pos < down.buf.len() {
        let range = down.pos..down.buf.len();
        let n = range.len() as u64;
        if write_range(&mut conn.stream, &mut down.buf, range)
            .await
            .is_err()
        {
            // The upstream went away after its 101, before the client had any of it: the
            // client gets the 502 (before, a close without an answer, logged as a 101).
            req.status = 0;
            let _ = down.fail(req, ErrorKind::UpstreamClosed).await;
            down.stream.close_whole().await;
            return;
        }
        req.bytes_in += n;
        down.pos = down.buf.len();
    }
    down.scratch.clear();
    // The policies' fields (a rate limit's `headers_on_success`, CORS), as on any answer.
    down.scratch.extend_from_slice(&req.policy.response_extra);
    if req.policy.cors_ran {
        crate::policy::drop_cors_fields(
            &conn.buf,
            resp.fields_start,
            resp.fields_end,
            &mut down.resp_plan.drop,
        );
    }
    replace_request_id(
        &mut down.scratch,
        &mut down.resp_plan.drop,
        &conn.buf,
        &resp,
        req,
    );
    // The upstream's `Connection` is not passed on: the sender of `Upgrade` names the
    // `upgrade` option itself (RFC 9110 7.8), as nginx does.
    down.scratch
        .extend_from_slice(b"Connection: upgrade\r\n\r\n");
    let tail = Span {
        start: 0,
        end: down.scratch.len(),
    };
    let rest = conn.buf.len() - resp.head_end;
    let pieces = response_pieces(&resp, &down.resp_plan, tail, rest);
    match write_gathered(
        &mut down.stream,
        &mut conn.buf,
        &mut down.scratch,
        &mut down.iov,
        pieces,
        S::COALESCE,
    )
    .await
    {
        Ok(n) => req.bytes_out += n as u64,
        Err(_) => {
            // The client went away before it had the 101 (before, logged as a 101).
            req.status = 0;
            req.fail(ErrorKind::ClientClosed);
            return;
        }
    }

    let idle = down.timeouts.upstream_body;
    let cut_off = &ctx.cut_off;
    let client_fd = down.stream.as_raw_fd();
    let upstream_fd = conn.stream.as_raw_fd();
    // An end without close_notify (a TLS upstream's or client's), which anyone on the path
    // can forge, is not passed on as a clean end (RFC 8446 6.1): both sides are aborted.
    let upstream_truncated = conn.stream.truncation();
    let client_truncated = down.stream.truncation();
    let (cr, cw) = down.stream.into_halves();
    let (ur, uw) = conn.stream.into_halves();
    let activity = Cell::new(Instant::now());
    let open = Cell::new(2u8);
    let cut_by_drain = Cell::new(false);
    // The first failure, which reset both sides.
    let failed = Cell::new(None::<ErrorKind>);
    // The gateway ended the tunnel itself (gone quiet, or the drain's end): what the sides
    // see of it (a TLS one an end without close_notify) is no failure of theirs.
    let closing = Cell::new(false);
    // The watchdog's, woken when the last direction ends.
    let ended = Cell::new(None::<Waker>);
    // Shuts both sockets' reading (`SHUT_RD`) or the whole of them (`SHUT_RDWR`).
    let shut = |how: libc::c_int| {
        // SAFETY: each copy future owns a half of each stream until it ends; this is called
        // from a copy future, or from the watchdog while one still runs (`open` > 0), so
        // neither fd can have been closed and reused.
        unsafe {
            libc::shutdown(client_fd, how);
            libc::shutdown(upstream_fd, how);
        }
    };
    // Ends both directions at once. For a tunnel gone quiet, or cut by a drain's end, as an
    // end each way: both pending reads wake with EOF (their sockets' reading shut down; no
    // read is cancelled mid-flight), and each direction ends its other side as a clean end
    // does, a TLS side with close_notify (RFC 8446 6.1; before, the sockets were shut whole,
    // a FIN without close_notify: a truncation to a TLS peer). For a read or write that
    // fails (a reset, a bad TLS record, an end over TLS without close_notify), with a reset
    // each way (TCP RST, and no close_notify), so that neither side takes the failure for an
    // end, as a cut answer's client cannot: `connect(AF_UNSPEC)` aborts a connection (RFC
    // 9293 3.10.5, ABORT) whose fd stays open, and wakes its pending reads and writes with
    // the error. (Closing with SO_LINGER 0 would come too late: a stream's write half sends
    // a FIN as it drops.)
    let abort = |failure: Option<ErrorKind>| {
        if let Some(kind) = failure {
            failed.set(failed.get().or(Some(kind)));
            for fd in [client_fd, upstream_fd] {
                crate::io::abort_connection(fd);
            }
            return;
        }
        closing.set(true);
        shut(libc::SHUT_RD);
    };
    let tunnel = Tunnel {
        activity: &activity,
        open: &open,
        watchdog: &ended,
        abort: &abort,
        reset: &failed,
        closing: &closing,
    };
    let (client, upstream) = (ErrorKind::ClientClosed, ErrorKind::UpstreamClosed);
    let up = copy_half(
        cr,
        uw,
        down.buf,
        &tunnel,
        client_truncated,
        (client, upstream),
    );
    let down_half = copy_half(
        ur,
        cw,
        conn.buf,
        &tunnel,
        upstream_truncated,
        (upstream, client),
    );
    // Waits until `at`, or less, until both directions are done.
    let ended_or = async |at: Instant| {
        let mut timer = std::pin::pin!(monoio::time::sleep_until(at.into()));
        std::future::poll_fn(|cx| {
            if open.get() == 0 {
                return Poll::Ready(());
            }
            ended.set(Some(cx.waker().clone()));
            timer.as_mut().poll(cx)
        })
        .await;
    };
    let watchdog = async {
        loop {
            if open.get() == 0 {
                return;
            }
            if failed.get().is_some() {
                // A direction still runs a tick after the reset (its wake-up missed, which
                // should not be): its sockets are shut whole.
                closing.set(true);
                shut(libc::SHUT_RDWR);
                return;
            }
            let quiet_until = activity.get() + idle;
            if Instant::now() >= quiet_until || cut_off.get() {
                // The drain's end cut it (logged as such), or it went quiet.
                cut_by_drain.set(cut_off.get());
                abort(None);
                // A write waiting on a peer that reads nothing does not end with the reads
                // (nor a close_notify that cannot go out): a moment later, the sockets are
                // shut whole, which ends it.
                ended_or(Instant::now() + CLOSING_GRACE).await;
                if open.get() > 0 {
                    shut(libc::SHUT_RDWR);
                }
                return;
            }
            // Until the tick, or at once when both directions are done: the request's end
            // (its log entry, `duration_ms`, what it holds on the upstream) does not wait.
            ended_or(quiet_until.min(Instant::now() + super::TUNNEL_TICK)).await;
        }
    };
    let (sent_up, sent_down, ()) = monoio::join!(up, down_half, watchdog);
    req.bytes_in += sent_up;
    req.bytes_out += sent_down;
    if cut_by_drain.get() {
        req.fail(ErrorKind::DrainTimeout);
    }
    if let Some(kind) = failed.get() {
        req.fail(kind);
    }
}

/// How long the directions of a tunnel the gateway ends have to end in order (a close_notify
/// out, a FIN) before their sockets are shut whole: a write under way to a side that reads,
/// slowly, finishes within it (200 ms was not always enough on a loaded machine).
const CLOSING_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What the two directions of a tunnel share.
struct Tunnel<'a, A> {
    /// When bytes last moved either way.
    activity: &'a Cell<Instant>,
    /// Directions not yet ended.
    open: &'a Cell<u8>,
    /// Woken when the last direction ends.
    watchdog: &'a Cell<Option<Waker>>,
    /// Ends both directions at once; with the failure, with a reset each way.
    abort: &'a A,
    /// Set once a failure reset both sides: an end after it is not passed on.
    reset: &'a Cell<Option<ErrorKind>>,
    /// Set once the gateway ended the tunnel itself: what follows is no side's failure.
    closing: &'a Cell<bool>,
}

/// Copies one direction of a tunnel until EOF, then half-closes the other side; on an error,
/// or an EOF `truncated` says is no clean end, calls `abort` instead with the failure
/// (`kinds`: a failure reading `from`, writing `to`). Returns the bytes copied.
async fn copy_half<R: AsyncReadRent, W: AsyncWriteRent, A: Fn(Option<ErrorKind>)>(
    mut from: R,
    mut to: W,
    mut buf: Vec<u8>,
    t: &Tunnel<'_, A>,
    truncated: impl Fn() -> bool,
    (from_failed, to_failed): (ErrorKind, ErrorKind),
) -> u64 {
    let Tunnel {
        activity,
        open,
        watchdog,
        abort,
        reset,
        closing,
    } = *t;
    if buf.capacity() < 16 * 1024 {
        buf.reserve(16 * 1024);
    }
    let mut copied = 0u64;
    let failure = loop {
        buf.clear();
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) if truncated() => break Some(from_failed),
            Ok(0) => break None,
            Err(_) => break Some(from_failed),
            // Ended by the gateway: a socket whose reading is shut still returns what was
            // queued or comes after (Linux), so a busy direction stops here and ends its
            // other side in order (the first version relayed on until the sockets were shut, and
            // the close_notify never went).
            Ok(_) if closing.get() => break None,
            Ok(n) => copied += n as u64,
        }
        activity.set(Instant::now());
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            break Some(to_failed);
        }
    };
    match failure {
        // The other side's reset woke this read: nothing to pass on or log.
        _ if reset.get().is_some() => {}
        // An end, or the gateway's own end of the tunnel (the read then sees an end without
        // close_notify from a TLS side, which is no failure of its): the other side is ended
        // in order.
        None => {
            let _ = to.shutdown().await;
        }
        _ if closing.get() => {
            let _ = to.shutdown().await;
        }
        Some(kind) => abort(Some(kind)),
    }
    open.set(open.get() - 1);
    if open.get() == 0 {
        if let Some(w) = watchdog.take() {
            w.wake();
        }
    }
    copied
}
