//! Vectored writes out of owned buffers: forwards a message head straight from the read buffer
//! it arrived in, with only the changed fields written anew.
//!
//! Hot path. A [`Gather`] owns the source buffer (a connection's read buffer), a scratch buffer
//! (new request line, added fields) and the iovec array pointing into both, so it can be handed
//! to io_uring and given back afterwards. Building one does not allocate once the vectors have
//! grown to their working size.

use monoio::buf::IoVecBuf;
use monoio::io::AsyncWriteRent;

use crate::codec::Span;

/// Where a piece of the output comes from.
#[derive(Debug, Clone, Copy)]
pub enum Piece {
    /// A range of the source buffer.
    Src(Span),
    /// A range of the scratch buffer.
    Extra(Span),
}

/// Owned iovec list over a source and a scratch buffer.
#[derive(Debug)]
pub struct Gather {
    src: Vec<u8>,
    extra: Vec<u8>,
    iov: Vec<libc::iovec>,
    /// First iovec not fully written.
    first: usize,
    remaining: usize,
}

impl Gather {
    /// Builds the iovecs for `pieces` (empty ones skipped). The buffers are moved in so the
    /// pointers stay valid while the kernel reads them.
    pub fn new(
        src: Vec<u8>,
        extra: Vec<u8>,
        mut iov: Vec<libc::iovec>,
        pieces: impl Iterator<Item = Piece>,
    ) -> Gather {
        iov.clear();
        let mut remaining = 0;
        // `for_each`, not a `for` loop: the pieces are chained iterators, which iterate
        // internally part after part instead of re-checking which part is current per item.
        pieces.for_each(|piece| {
            let (buf, span) = match piece {
                Piece::Src(s) => (&src, s),
                Piece::Extra(s) => (&extra, s),
            };
            if span.is_empty() {
                return;
            }
            let bytes = &buf[span.start..span.end];
            remaining += bytes.len();
            iov.push(libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            });
        });
        Gather {
            src,
            extra,
            iov,
            first: 0,
            remaining,
        }
    }

    /// Bytes still to write.
    pub fn len(&self) -> usize {
        self.remaining
    }

    /// Whether everything has been written.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// Gives the buffers back.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>, Vec<libc::iovec>) {
        (self.src, self.extra, self.iov)
    }

    /// The iovecs not yet written.
    pub fn unwritten(&self) -> &[libc::iovec] {
        &self.iov[self.first..]
    }

    /// Records that the first `n` unwritten bytes were written.
    pub fn consume(&mut self, mut n: usize) {
        self.remaining -= n;
        while n > 0 {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Writes everything, looping over short writes. Returns the gather (buffers intact) and
    /// the error, if any.
    pub async fn write_all<W: AsyncWriteRent>(
        mut self,
        stream: &mut W,
    ) -> (std::io::Result<()>, Gather) {
        while self.remaining > 0 {
            let (res, g) = stream.writev(self).await;
            self = g;
            match res {
                Ok(0) => {
                    return (
                        Err(std::io::Error::new(
                            std::io::ErrorKind::WriteZero,
                            "peer stopped reading",
                        )),
                        self,
                    )
                }
                // The usual case, everything at once: the iovecs need not be read again (by
                // now they are likely out of the cache, other connections ran meanwhile).
                Ok(n) if n == self.remaining => {
                    self.remaining = 0;
                    self.first = self.iov.len();
                }
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), self),
            }
        }
        (Ok(()), self)
    }
}

/// Sends `pieces` of `src` and `extra` with vectored writes, lending the buffers (and the
/// iovec array) to the kernel and putting them back afterwards, whatever the outcome.
/// Returns the number of bytes written.
pub async fn write_gathered<W: AsyncWriteRent>(
    stream: &mut W,
    src: &mut Vec<u8>,
    extra: &mut Vec<u8>,
    iov: &mut Vec<libc::iovec>,
    pieces: impl Iterator<Item = Piece>,
) -> std::io::Result<usize> {
    let g = Gather::new(
        std::mem::take(src),
        std::mem::take(extra),
        std::mem::take(iov),
        pieces,
    );
    let total = g.len();
    let (res, g) = g.write_all(stream).await;
    (*src, *extra, *iov) = g.into_parts();
    res.map(|()| total)
}

// SAFETY: the iovecs point into `src` and `extra`, heap buffers owned by this value that are not
// touched while it is lent to the runtime; moving a `Vec` does not move its heap data, so the
// pointers stay valid for as long as the runtime holds the value. `first..len` are live iovecs.
unsafe impl IoVecBuf for Gather {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.first..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.first
    }
}
