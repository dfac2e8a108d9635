//! The upstream connector seam: every upstream session is checked out here (a pooled
//! connection or a new one), checked back in with its outcome, and retried here.
//!
//! Hot path. [`Connector::run`] owns the one retry the gateway makes today: a request that
//! failed on a *reused* connection in a way that proves the upstream never acted on it (the
//! error says `retryable`) goes once more on a fresh connection. Where sessions come from is a
//! [`SessionSource`]: the worker's pool and `connect` in production, a fake in the tests.
//! Balancing (the target) is chosen before, by the worker's round robin; health, ejection and
//! circuit limits plug in at [`Connector::checkin`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::error::{ErrorKind, ProxyError};
use crate::upstream::{connect, ConnectError, UpstreamConn};
use crate::worker_ctx::WorkerCtx;

/// An upstream session: an HTTP/1.1 connection to one target.
#[derive(Debug)]
pub(crate) struct Session {
    pub conn: UpstreamConn,
    pub target: SocketAddr,
    /// Taken from the pool (it may have been closed by the upstream while idle).
    pub reused: bool,
}

/// What the connector records about the sessions of one exchange (a request's, or an
/// aggregate step's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempts {
    /// The target address used.
    pub target: Option<SocketAddr>,
    /// How long the upstream connection took to open; `None` for a pooled one.
    pub connect: Option<Duration>,
    /// Attempts made after the first.
    pub retries: u8,
}

impl AsMut<Attempts> for Attempts {
    fn as_mut(&mut self) -> &mut Attempts {
        self
    }
}

/// How a session's exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The response was read to its end and the connection can carry another request.
    Reusable,
    /// The exchange finished or failed in a way that leaves the connection unusable.
    Done,
}

/// Where sessions come from.
pub(crate) trait SessionSource {
    /// An idle connection to `target`, if one is pooled.
    fn take_idle(&self, target: SocketAddr, now: Instant) -> Option<UpstreamConn>;
    /// Keeps a connection for reuse.
    fn put_idle(&self, target: SocketAddr, conn: UpstreamConn, now: Instant);
    /// Opens a new connection.
    async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
        send_timeout: Duration,
    ) -> Result<UpstreamConn, ConnectError>;
}

impl SessionSource for WorkerCtx {
    fn take_idle(&self, target: SocketAddr, now: Instant) -> Option<UpstreamConn> {
        self.pool.borrow_mut().take(target, now)
    }

    fn put_idle(&self, target: SocketAddr, conn: UpstreamConn, now: Instant) {
        self.pool.borrow_mut().put(target, conn, now);
    }

    async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
        send_timeout: Duration,
    ) -> Result<UpstreamConn, ConnectError> {
        connect(target, timeout, send_timeout).await
    }
}

/// Sessions to one target for one request.
#[derive(Debug)]
pub(crate) struct Connector<'a, P> {
    source: &'a P,
    target: SocketAddr,
    connect_timeout: Duration,
    send_timeout: Duration,
}

impl<'a, P: SessionSource> Connector<'a, P> {
    pub fn new(
        source: &'a P,
        target: SocketAddr,
        connect_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        Connector {
            source,
            target,
            connect_timeout,
            send_timeout,
        }
    }

    /// A pooled session, or a new connection (`fresh`: never a pooled one). Records the target
    /// and the connect time in the request context.
    pub async fn checkout(
        &self,
        rec: &mut impl AsMut<Attempts>,
        fresh: bool,
    ) -> Result<Session, ProxyError> {
        let rec = rec.as_mut();
        rec.target = Some(self.target);
        rec.connect = None;
        if !fresh {
            if let Some(conn) = self.source.take_idle(self.target, Instant::now()) {
                return Ok(Session {
                    conn,
                    target: self.target,
                    reused: true,
                });
            }
        }
        let started = Instant::now();
        let conn = self
            .source
            .connect(self.target, self.connect_timeout, self.send_timeout)
            .await
            .map_err(|e| match e {
                ConnectError::Timeout => ProxyError::new(ErrorKind::ConnectTimeout),
                ConnectError::Io(_) => ProxyError::new(ErrorKind::ConnectFailed),
            })?;
        rec.connect = Some(started.elapsed());
        Ok(Session {
            conn,
            target: self.target,
            reused: false,
        })
    }

    /// Returns a session after its exchange; a reusable one goes back to the pool.
    pub fn checkin(&self, session: Session, outcome: Outcome) {
        if outcome == Outcome::Reusable {
            let mut conn = session.conn;
            conn.buf.clear();
            self.source.put_idle(session.target, conn, Instant::now());
        }
    }

    /// Runs `attempt` on a checked-out session. When it fails on a reused session with an
    /// error that says the request may go again, runs it once more on a fresh connection.
    /// On failure the last session (if one was checked out) comes back with the error, so the
    /// caller can still read an answer the upstream sent early.
    pub async fn run<C: AsMut<Attempts>, T>(
        &self,
        req: &mut C,
        mut attempt: impl AsyncFnMut(&mut Session, &mut C) -> Result<T, ProxyError>,
    ) -> Result<(Session, T), (Option<Session>, ProxyError)> {
        let mut fresh = false;
        loop {
            let mut session = match self.checkout(req, fresh).await {
                Ok(s) => s,
                Err(e) => return Err((None, e)),
            };
            match attempt(&mut session, req).await {
                Ok(v) => return Ok((session, v)),
                Err(e) if e.retryable && session.reused && !fresh => {
                    // A pooled connection the upstream had closed: nothing of the request
                    // was acted on, so it goes again on a new connection, once.
                    fresh = true;
                    req.as_mut().retries += 1;
                }
                Err(e) => return Err((Some(session), e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::io::{Read, Write};
    use std::net::TcpListener as StdListener;

    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

    use super::*;
    use crate::proxy::context::RequestCtx;

    /// A pool that hands out the connections it was given, and counts connects.
    struct FakePool {
        idle: RefCell<Vec<UpstreamConn>>,
        connects: Cell<u32>,
        put_back: Cell<u32>,
    }

    impl SessionSource for FakePool {
        fn take_idle(&self, _target: SocketAddr, _now: Instant) -> Option<UpstreamConn> {
            self.idle.borrow_mut().pop()
        }

        fn put_idle(&self, _target: SocketAddr, conn: UpstreamConn, _now: Instant) {
            self.put_back.set(self.put_back.get() + 1);
            self.idle.borrow_mut().push(conn);
        }

        async fn connect(
            &self,
            target: SocketAddr,
            timeout: Duration,
            send_timeout: Duration,
        ) -> Result<UpstreamConn, ConnectError> {
            self.connects.set(self.connects.get() + 1);
            connect(target, timeout, send_timeout).await
        }
    }

    fn fake_pool(idle: Vec<UpstreamConn>) -> FakePool {
        FakePool {
            idle: RefCell::new(idle),
            connects: Cell::new(0),
            put_back: Cell::new(0),
        }
    }

    /// An origin that answers `n` connections with one response each.
    fn origin(n: usize) -> SocketAddr {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut s, _)) = l.accept() else { return };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        addr
    }

    /// A connection whose far end is already closed, as a pooled one the upstream timed out.
    async fn dead_conn() -> UpstreamConn {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conn = connect(addr, Duration::from_secs(1), Duration::from_secs(1))
            .await
            .unwrap();
        let (s, _) = l.accept().unwrap();
        drop(s);
        drop(l);
        monoio::time::sleep(Duration::from_millis(20)).await;
        conn
    }

    /// One GET and its response head, as the exchange does it: a write failure or an empty
    /// answer is retryable (nothing reached the upstream's application).
    async fn get(session: &mut Session) -> Result<Vec<u8>, ProxyError> {
        let closed = ProxyError::new(ErrorKind::UpstreamClosed).retryable(true);
        let (res, _) = session
            .conn
            .stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec())
            .await;
        res.map_err(|_| closed)?;
        let (res, buf) = session.conn.stream.read(vec![0u8; 1024]).await;
        match res {
            Ok(n) if n > 0 => Ok(buf[..n].to_vec()),
            _ => Err(closed),
        }
    }

    fn connector(pool: &FakePool, target: SocketAddr) -> Connector<'_, FakePool> {
        Connector::new(pool, target, Duration::from_secs(1), Duration::from_secs(1))
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn a_dead_pooled_connection_is_retried_once_on_a_fresh_one() {
        let target = origin(1);
        runtime().block_on(async move {
            let pool = fake_pool(vec![dead_conn().await]);
            let connector = connector(&pool, target);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let (session, answer) = connector
                .run(&mut req, async |s, _req| get(s).await)
                .await
                .expect("the retry on a fresh connection succeeds");
            assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
            assert!(!session.reused);
            assert_eq!(pool.connects.get(), 1);
            assert_eq!(req.attempts.retries, 1);
            assert_eq!(req.attempts.target, Some(target));
            assert!(
                req.attempts.connect.is_some(),
                "the fresh connection's connect time"
            );
            connector.checkin(session, Outcome::Reusable);
            assert_eq!(pool.put_back.get(), 1);
        });
    }

    #[test]
    fn a_failure_on_a_fresh_connection_or_a_non_retryable_one_is_not_retried() {
        runtime().block_on(async move {
            // Fresh connection (nothing pooled) to an upstream that closes at once.
            let l = StdListener::bind("127.0.0.1:0").unwrap();
            let target = l.local_addr().unwrap();
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let Ok((s, _)) = l.accept() else { return };
                    drop(s);
                }
            });
            let pool = fake_pool(Vec::new());
            let connector = connector(&pool, target);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let (session, err) = connector
                .run(&mut req, async |s, _req| get(s).await)
                .await
                .expect_err("a fresh connection's failure is final");
            assert_eq!(err.kind, ErrorKind::UpstreamClosed);
            assert!(
                session.is_some(),
                "the session comes back for an early answer"
            );
            assert_eq!((pool.connects.get(), req.attempts.retries), (1, 0));

            // A pooled connection, but the error says the upstream may have acted on it.
            let dead = dead_conn().await;
            pool.idle.borrow_mut().push(dead);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let err = connector
                .run(&mut req, async |_s, _req| -> Result<(), ProxyError> {
                    Err(ProxyError::new(ErrorKind::ResponseTimeout))
                })
                .await
                .map(|_| ())
                .expect_err("not retryable");
            assert_eq!(err.1.kind, ErrorKind::ResponseTimeout);
            assert_eq!((pool.connects.get(), req.attempts.retries), (1, 0));
        });
    }

    #[test]
    fn a_refused_connect_is_connect_failed() {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        drop(l);
        runtime().block_on(async move {
            let pool = fake_pool(Vec::new());
            let connector = connector(&pool, target);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let err = connector
                .run(&mut req, async |_s, _req| -> Result<(), ProxyError> {
                    Ok(())
                })
                .await
                .map(|_| ())
                .expect_err("nothing listens");
            assert!(err.0.is_none());
            assert_eq!(err.1.kind, ErrorKind::ConnectFailed);
            assert_eq!(req.attempts.connect, None);
        });
    }
}
