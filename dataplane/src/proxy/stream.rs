//! The client-stream seam: what a client connection's I/O is written against. Plain TCP
//! and TLS ([`crate::tls::TlsStream`]) implement it; the request path is the same for both.

use std::os::fd::AsRawFd;

use monoio::io::{
    AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent, OwnedReadHalf, OwnedWriteHalf,
    Splitable,
};
use monoio::net::TcpStream;

use crate::tls::{PlainQueue, TlsReadHalf, TlsStream, TlsWriteHalf};

/// The scheme a client used, as `X-Forwarded-Proto` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Scheme::Http => b"http",
            Scheme::Https => b"https",
        }
    }
}

/// The write half of a connection that [`super::PollIo`] writes HTTP/2 frames to.
pub(crate) trait WriteHalf: AsyncWriteRent + Unpin + 'static {
    /// Where frames can go synchronously, encrypted into TLS records at once (so they need
    /// not be copied into a buffer first); `None`: a socket, written from a buffer.
    fn plain_queue(&self) -> Option<PlainQueue> {
        None
    }
}

impl WriteHalf for OwnedWriteHalf<TcpStream> {}

impl WriteHalf for crate::upstream::UpstreamWrite {
    fn plain_queue(&self) -> Option<PlainQueue> {
        match self {
            crate::upstream::UpstreamWrite::Tcp(_) => None,
            crate::upstream::UpstreamWrite::Tls(w) => Some(w.plain_queue()),
        }
    }
}

impl WriteHalf for TlsWriteHalf {
    fn plain_queue(&self) -> Option<PlainQueue> {
        Some(TlsWriteHalf::plain_queue(self))
    }
}

/// A client connection's byte stream.
pub(crate) trait ClientStream:
    AsyncReadRent + AsyncWriteRent + CancelableAsyncReadRent + AsRawFd + 'static
{
    /// Whether an idle connection can give its task back ([`Self::into_parkable`]).
    const PARKABLE: bool;
    /// Whether the stream is a whole connection (not one stream of a multiplexed one): only
    /// then may the worker shut its socket down while it waits for a request (the drain).
    const WHOLE_CONNECTION: bool = true;
    /// Whether the stream keeps what it is given to send until the client takes it (see
    /// [`Self::write_spent`]).
    const KEEPS_WRITES: bool = false;
    /// The read buffer a connection starts with (see `downstream::BODY_BUF`).
    const READ_BUF: usize = 8 * 1024;
    /// Whether the client's protocol carries HTTP/1.1 transfer codings, so that an answer
    /// coded with one other than `chunked` can be passed on as it is (HTTP/2 has none).
    const TRANSFER_CODINGS: bool = true;
    /// Gathered writes of at most this many bytes go out as one copy
    /// ([`crate::gather::Gather::write_all`]); 0 for streams that gather themselves.
    const COALESCE: usize = 0;
    /// Whether the stream is a whole connection that may turn out to speak HTTP/2 with
    /// prior knowledge (a cleartext TCP connection).
    const PRIOR_KNOWLEDGE: bool;
    type ReadHalf: AsyncReadRent + Unpin + 'static;
    type WriteHalf: WriteHalf;

    /// The scheme of the listener the client reached.
    fn scheme(&self) -> Scheme;

    /// The TLS SNI name the client sent, lower-case.
    fn sni(&self) -> Option<&str> {
        None
    }

    /// The client connection to watch while the gateway waits for an upstream on its
    /// behalf; `None` for a stream of a multiplexed connection (HTTP/2 ends a stream with
    /// RST_STREAM, see [`Self::poll_reset`]).
    fn watch(&self) -> Option<crate::io::ClientWatch> {
        Some(crate::io::ClientWatch {
            fd: self.as_raw_fd(),
            tls: false,
        })
    }

    /// Whether the client has gone (closed or reset) while the gateway was busy: one
    /// non-blocking look at the socket.
    fn client_gone(&self) -> bool {
        self.watch().is_some_and(crate::io::ClientWatch::gone)
    }

    /// Writes `buf[range]` when the caller needs none of `buf`'s bytes afterwards: a stream
    /// that keeps what it sends until the client takes it (an HTTP/2 stream, waiting for the
    /// client's flow-control window) may take the buffer itself and leave an empty one of
    /// the same capacity in its place, instead of copying.
    async fn write_spent(
        &mut self,
        buf: &mut Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> std::io::Result<()>
    where
        Self: Sized,
    {
        crate::io::write_range(self, buf, range).await
    }

    /// Ends a connection whose answers all went out whole, the way that tells the client so:
    /// over TLS, close_notify before the close's FIN (RFC 8446 §6.1; without it a client
    /// cannot tell an answer delimited by the close from one cut short). Plain TCP and HTTP/2
    /// streams have nothing to add to the close that follows. Never after an answer cut
    /// short.
    async fn close_whole(&mut self) {}

    /// Whether the client's end of the stream, once a read gave `Ok(0)`, will have come
    /// without close_notify (a TLS client's FIN alone, which anyone on the path can forge),
    /// asked after the stream is split: a tunnel does not pass such an end on as a clean one.
    fn truncation(&self) -> impl Fn() -> bool + 'static {
        || false
    }

    /// An HTTP/2 stream's request body as HTTP/2 frames (for an HTTP/2 upstream), if the
    /// client stream is one and nothing of the body was read through it yet: the bytes
    /// already taken from the stream, then the stream.
    fn take_h2_body(&mut self) -> Option<(bytes::Bytes, h2::RecvStream)> {
        None
    }

    /// An HTTP/2 stream's answer side, for answering in HTTP/2 frames directly (trailers
    /// included); after this, writes to the stream are dropped.
    fn take_h2_respond(&mut self) -> Option<super::http2::H2Answer> {
        None
    }

    /// Ready once the client has reset (cancelled) the request: an HTTP/2 stream's
    /// RST_STREAM. Never for a whole connection.
    fn poll_reset(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::task::Poll::Pending
    }

    /// [`Self::poll_reset`] without a borrow of the stream, until the answer's head goes:
    /// `None` for a whole connection.
    fn reset_watch(&self) -> Option<super::http2::ResetWatch> {
        None
    }

    /// After a reset [`Self::reset_watch`] saw: whether it was the HTTP/2 library's own, for
    /// a malformed request (a body against its `content-length`, RFC 9113 8.1.1), rather
    /// than the client's.
    fn reset_for_malformed(&mut self) -> bool {
        false
    }

    /// The client's TCP socket when the stream writes to it unchanged (plain TCP): a large
    /// body can then be spliced into it ([`crate::splice`]).
    fn splice_socket(&self) -> Option<&TcpStream> {
        None
    }

    /// A read half and a write half that may run at once (for a tunnel).
    fn into_halves(self) -> (Self::ReadHalf, Self::WriteHalf);

    /// The bare TCP socket, for parking an idle connection in the worker's epoll set; `Err`
    /// (the stream itself) where state above TCP (a TLS session) cannot be parked.
    fn into_parkable(self) -> Result<TcpStream, Self>
    where
        Self: Sized;
}

impl ClientStream for TcpStream {
    const PARKABLE: bool = true;
    const COALESCE: usize = crate::gather::COALESCE_MAX;
    const PRIOR_KNOWLEDGE: bool = true;
    type ReadHalf = OwnedReadHalf<TcpStream>;
    type WriteHalf = OwnedWriteHalf<TcpStream>;

    fn scheme(&self) -> Scheme {
        Scheme::Http
    }

    fn splice_socket(&self) -> Option<&TcpStream> {
        Some(self)
    }

    fn into_halves(self) -> (Self::ReadHalf, Self::WriteHalf) {
        self.into_split()
    }

    fn into_parkable(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
}

impl ClientStream for TlsStream {
    const PARKABLE: bool = false;
    const PRIOR_KNOWLEDGE: bool = false;
    type ReadHalf = TlsReadHalf;
    type WriteHalf = TlsWriteHalf;

    fn scheme(&self) -> Scheme {
        Scheme::Https
    }

    fn sni(&self) -> Option<&str> {
        TlsStream::sni(self)
    }

    fn watch(&self) -> Option<crate::io::ClientWatch> {
        Some(crate::io::ClientWatch {
            fd: self.as_raw_fd(),
            tls: true,
        })
    }

    async fn close_whole(&mut self) {
        // A client that is gone makes this fail: nothing more to do either way.
        let _ = self.close_notify().await;
    }

    fn truncation(&self) -> impl Fn() -> bool + 'static {
        let t = TlsStream::truncation(self);
        move || t.get()
    }

    fn into_halves(self) -> (Self::ReadHalf, Self::WriteHalf) {
        self.split()
    }

    fn into_parkable(self) -> Result<TcpStream, Self> {
        Err(self)
    }
}
