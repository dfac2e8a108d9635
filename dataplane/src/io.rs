//! Reading into a connection's growable buffer with a deadline: the one read loop the client
//! side and the upstream side share.
//!
//! Hot path. A read that times out is never retried on the same connection: with io_uring the
//! cancelled read may already have consumed bytes, so the caller closes the connection.

use std::time::Instant;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::AsyncReadRent;

use crate::upstream::is_send_timeout;

/// Why reading from a socket stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadError {
    Timeout,
    Io,
    /// The peer left bytes the gateway sent unacknowledged past its send timeout
    /// (`ETIMEDOUT` from TCP_USER_TIMEOUT); the connection is gone.
    Stalled,
}

/// Reads more bytes into `buf` (after compacting consumed ones), up to `max` buffered,
/// failing at `deadline`. `Ok(0)`: end of stream.
pub(crate) async fn read_more<R: AsyncReadRent>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    deadline: Instant,
) -> Result<usize, ReadError> {
    read_at_most(stream, buf, pos, max, usize::MAX, deadline).await
}

/// Like [`read_more`], reading at most `most` bytes.
pub(crate) async fn read_at_most<R: AsyncReadRent>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    most: usize,
    deadline: Instant,
) -> Result<usize, ReadError> {
    if *pos == buf.len() {
        buf.clear();
        *pos = 0;
    } else if *pos > 0 && buf.len() == buf.capacity() {
        buf.copy_within(*pos.., 0);
        buf.truncate(buf.len() - *pos);
        *pos = 0;
    }
    if buf.len() == buf.capacity() {
        if buf.len() >= max {
            return Err(ReadError::Io);
        }
        // Grow by doubling, up to `max`.
        buf.reserve_exact(buf.capacity().max(1024).min(max - buf.len()));
    }
    let len = buf.len();
    let end = buf.capacity().min(len.saturating_add(most));
    let owned = std::mem::take(buf);
    let read = stream.read(owned.slice_mut(len..end));
    match monoio::time::timeout_at(deadline.into(), read).await {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            res.map_err(|e| {
                if is_send_timeout(&e) {
                    ReadError::Stalled
                } else {
                    ReadError::Io
                }
            })
        }
        // The buffer went with the cancelled read; the caller closes this connection.
        Err(_) => Err(ReadError::Timeout),
    }
}

/// Writes all of `buf[range]` from an owned buffer, lending it to the kernel and putting it
/// back whatever the outcome.
pub(crate) async fn write_range<W: monoio::io::AsyncWriteRent>(
    stream: &mut W,
    buf: &mut Vec<u8>,
    range: std::ops::Range<usize>,
) -> std::io::Result<()> {
    let owned = std::mem::take(buf);
    let (res, slice) = monoio::io::AsyncWriteRentExt::write_all(stream, owned.slice(range)).await;
    *buf = slice.into_inner();
    res.map(|_| ())
}

/// What a non-blocking peek at a socket saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peeked {
    /// Nothing to read yet: the peer is there and quiet.
    Nothing,
    /// Bytes are waiting.
    Data,
    /// The peer closed (FIN) or reset the connection.
    Closed,
}

/// Peeks at one byte of `fd` without consuming it or waiting (one `recv` with `MSG_PEEK`).
pub(crate) fn peek(fd: std::os::fd::RawFd) -> Peeked {
    let mut byte = 0u8;
    // SAFETY: the caller's socket `fd` is open for the duration of the call; recv writes at
    // most one byte into `byte`.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peeked::Closed,
        n if n > 0 => Peeked::Data,
        _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => {
            Peeked::Nothing
        }
        _ => Peeked::Closed,
    }
}

/// Runs `fut` to completion on a new runtime of the gateway's io_uring driver (`uring`) or
/// of its epoll fallback, for tests that must hold under both.
#[cfg(test)]
pub(crate) fn block_on_driver<F: std::future::Future>(uring: bool, fut: F) -> F::Output {
    if uring {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime (the gateway's own driver)")
            .block_on(fut)
    } else {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime")
            .block_on(fut)
    }
}
