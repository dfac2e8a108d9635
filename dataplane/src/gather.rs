//! Vectored writes out of owned buffers: forwards a message head straight from the read buffer
//! it arrived in, with only the changed fields written anew.
//!
//! Hot path. A [`Gather`] owns the source buffer (a connection's read buffer), a scratch buffer
//! (new request line, added fields) and the iovec array pointing into both, so it can be handed
//! to io_uring and given back afterwards. Building one does not allocate once the vectors have
//! grown to their working size.
//!
//! A small gathered write to a plain socket (at most [`COALESCE_MAX`] bytes: a request head, a
//! small answer) goes out as one `send` of a copy of its pieces, made in the spare room of
//! its own buffers, instead of a `writev`: the kernel's vectored file-write path (importing
//! the iovec array, the file checks, the `kiocb`) cost more than the copy.

use monoio::buf::{IoBuf, IoVecBuf};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};

use crate::codec::Span;

/// Largest gathered write to a plain socket that is copied into one buffer and sent with
/// `send` rather than `writev`.
pub const COALESCE_MAX: usize = 8 * 1024;

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

    /// Copies the unwritten pieces into the spare room of `src` or `extra` (past their
    /// bytes, which the iovecs point at, so nothing moves) and writes the copy with `write`.
    /// `None`: neither buffer has the room, nothing was written.
    async fn write_copy<W: AsyncWriteRent>(
        &mut self,
        stream: &mut W,
    ) -> Option<std::io::Result<()>> {
        let total = self.remaining;
        let room = |v: &Vec<u8>| v.capacity() - v.len() >= total;
        let into_src = room(&self.src);
        if !into_src && !room(&self.extra) {
            return None;
        }
        let buf = if into_src {
            &mut self.src
        } else {
            &mut self.extra
        };
        let start = buf.len();
        let base = buf.as_mut_ptr();
        let mut at = start;
        for v in &self.iov[self.first..] {
            // SAFETY: each iovec describes initialised bytes of `src` or `extra` below their
            // lengths; the copy goes to `buf`'s spare capacity past its length (checked
            // above), which no iovec covers, and nothing reallocates.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), base.add(at), v.iov_len)
            };
            at += v.iov_len;
        }
        // SAFETY: `start..at` was just written.
        unsafe { buf.set_len(at) };
        let (res, slice) = stream.write_all(std::mem::take(buf).slice(start..at)).await;
        let mut owned = slice.into_inner();
        owned.truncate(start);
        if into_src {
            self.src = owned;
        } else {
            self.extra = owned;
        }
        if res.is_ok() {
            self.remaining = 0;
            self.first = self.iov.len();
        }
        Some(res.map(|_| ()))
    }

    /// Writes everything, looping over short writes. Returns the gather (buffers intact) and
    /// the error, if any. A write of at most `coalesce` bytes goes out as one copy (see the
    /// module's comment; 0 for streams that gather themselves, such as TLS).
    pub async fn write_all<W: AsyncWriteRent>(
        mut self,
        stream: &mut W,
        coalesce: usize,
    ) -> (std::io::Result<()>, Gather) {
        if self.remaining > 0 && self.remaining <= coalesce {
            if let Some(res) = self.write_copy(stream).await {
                return (res, self);
            }
        }
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
/// iovec array) to the kernel and putting them back afterwards, whatever the outcome; at most
/// `coalesce` bytes in all go as one copy ([`Gather::write_all`]). Returns the number of
/// bytes written.
pub async fn write_gathered<W: AsyncWriteRent>(
    stream: &mut W,
    src: &mut Vec<u8>,
    extra: &mut Vec<u8>,
    iov: &mut Vec<libc::iovec>,
    pieces: impl Iterator<Item = Piece>,
    coalesce: usize,
) -> std::io::Result<usize> {
    let g = Gather::new(
        std::mem::take(src),
        std::mem::take(extra),
        std::mem::take(iov),
        pieces,
    );
    let total = g.len();
    let (res, g) = g.write_all(stream, coalesce).await;
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

#[cfg(test)]
mod tests {
    use monoio::BufResult;

    use super::*;

    /// A stream that takes at most `most` bytes per call and records which call it got.
    #[derive(Default)]
    struct Recorder {
        most: usize,
        calls: Vec<&'static str>,
        got: Vec<u8>,
    }

    impl AsyncWriteRent for Recorder {
        async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            // SAFETY: `read_ptr` points at `bytes_init` initialised bytes owned by `buf`.
            let bytes = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            let n = bytes.len().min(self.most);
            self.calls.push("send");
            self.got.extend_from_slice(&bytes[..n]);
            (Ok(n), buf)
        }

        async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            // SAFETY: the iovecs describe initialised bytes owned by `buf`.
            let iovs =
                unsafe { std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len()) };
            let mut left = self.most;
            for v in iovs {
                let take = v.iov_len.min(left);
                // SAFETY: as above.
                self.got.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>().cast_const(), take)
                });
                left -= take;
            }
            self.calls.push("writev");
            (Ok(self.most - left), buf)
        }

        async fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }

        async fn shutdown(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Writes "GET / HTTP/1.1\r\n" from `src`, an added field from `extra`, the rest of `src`,
    /// with `coalesce`, through a recorder taking `most` bytes a call; `room`: spare capacity
    /// in `src` (0), `extra` (1) or neither (2).
    fn write(coalesce: usize, most: usize, filler: usize, room: u8) -> (Recorder, Vec<u8>, Gather) {
        let mut src = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        src.extend(std::iter::repeat_n(b'x', filler));
        src.extend_from_slice(b"\r\n");
        let mut extra = b"X-Added: 1\r\n".to_vec();
        match room {
            0 => src.reserve(2 * COALESCE_MAX),
            1 => {
                src.shrink_to_fit();
                extra.reserve(2 * COALESCE_MAX);
            }
            _ => {
                src.shrink_to_fit();
                extra.shrink_to_fit();
            }
        }
        let caps = (src.capacity(), extra.capacity());
        let line = Span { start: 0, end: 16 };
        let rest = Span {
            start: 16,
            end: src.len(),
        };
        let mut want = src[..16].to_vec();
        want.extend_from_slice(&extra);
        want.extend_from_slice(&src[16..]);
        let pieces = [
            Piece::Src(line),
            Piece::Extra(Span {
                start: 0,
                end: extra.len(),
            }),
            Piece::Src(rest),
        ];
        let g = Gather::new(src, extra, Vec::new(), pieces.into_iter());
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let (rec, g) = rt.block_on(async move {
            let mut rec = Recorder {
                most,
                ..Recorder::default()
            };
            let (res, g) = g.write_all(&mut rec, coalesce).await;
            res.unwrap();
            (rec, g)
        });
        // The buffers come back with their bytes and capacity (the copy took no new memory).
        let (src, extra, iov) = g.into_parts();
        assert_eq!((src.capacity(), extra.capacity()), caps);
        assert!(src.starts_with(b"GET / HTTP/1.1\r\nHost: a\r\n") && src.ends_with(b"\r\n"));
        assert_eq!(src.len(), 27 + filler);
        assert_eq!(extra, b"X-Added: 1\r\n");
        (rec, want, Gather::new(src, extra, iov, std::iter::empty()))
    }

    #[test]
    fn a_small_write_goes_as_one_copy_and_a_large_one_vectored() {
        // The copy is made in whichever buffer has the room.
        for room in [0, 1] {
            let (rec, want, _) = write(COALESCE_MAX, usize::MAX, 10, room);
            assert_eq!((rec.got, rec.calls), (want, vec!["send"]));
        }
        // Short writes: the copy goes on from where the last one stopped.
        let (rec, want, _) = write(COALESCE_MAX, 7, 10, 0);
        assert_eq!(rec.got, want);
        assert!(rec.calls.len() > 2 && rec.calls.iter().all(|c| *c == "send"));

        // Above the bound, for a stream that gathers itself (0), or with no room to copy
        // into: vectored, as before.
        let (rec, want, _) = write(COALESCE_MAX, usize::MAX, COALESCE_MAX, 0);
        assert_eq!((rec.got, rec.calls), (want, vec!["writev"]));
        let (rec, want, _) = write(0, 7, 10, 0);
        assert_eq!(rec.got, want);
        assert!(rec.calls.iter().all(|c| *c == "writev"));
        let (rec, want, _) = write(COALESCE_MAX, usize::MAX, 10, 2);
        assert_eq!((rec.got, rec.calls), (want, vec!["writev"]));
    }
}
