//! The client-stream seam: what a client connection's I/O is written against. Plain TCP
//! implements it today; a TLS stream implements it for HTTPS listeners without the request
//! path changing.

use std::os::fd::AsRawFd;

use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent, Split};
use monoio::net::TcpStream;

/// The scheme a client used, as `X-Forwarded-Proto` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// For TLS listeners (the TLS issue); nothing constructs it yet.
    #[allow(dead_code)]
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

/// A client connection's byte stream.
pub(crate) trait ClientStream:
    AsyncReadRent + AsyncWriteRent + CancelableAsyncReadRent + Split + AsRawFd + 'static
{
    /// The scheme of the listener the client reached.
    fn scheme(&self) -> Scheme;

    /// The bare TCP socket, for parking an idle connection in the worker's epoll set; `Err`
    /// (the stream itself) where state above TCP (a TLS session) cannot be parked.
    fn into_parkable(self) -> Result<TcpStream, Self>
    where
        Self: Sized;
}

impl ClientStream for TcpStream {
    fn scheme(&self) -> Scheme {
        Scheme::Http
    }

    fn into_parkable(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
}
