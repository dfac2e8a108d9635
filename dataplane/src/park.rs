//! Parked keep-alive connections: idle client connections that gave their buffers and task
//! back and wait, as a bare socket in the worker's own epoll set, for the client to send again.
//!
//! A connection idle for longer than `client_park_ms` is parked; the worker's unpark task
//! waits for that epoll fd to become readable (an io_uring poll, or a nested epoll under the
//! fallback driver) and spawns a connection task again for each socket that has data or was
//! closed. A parked connection costs a slot here and the socket: about 100 bytes, instead of a
//! task and its buffers. Slots carry a generation so a stale event can never resume the wrong
//! connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

/// A parked connection.
#[derive(Debug)]
pub(crate) struct Parked {
    pub stream: TcpStream,
    pub peer: crate::peer::Peer,
    since: Instant,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Parked>,
}

/// The parked connections of one worker.
#[derive(Debug)]
pub(crate) struct ParkLot {
    epoll: OwnedFd,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl ParkLot {
    pub fn new() -> io::Result<ParkLot> {
        // SAFETY: epoll_create1 has no memory preconditions; the fd is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ParkLot {
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            slots: Vec::new(),
            free: Vec::new(),
        })
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The epoll fd, readable when a parked connection has something to say.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Parks `stream`; gives it back when the kernel refuses to watch it.
    pub fn park(
        &mut self,
        stream: TcpStream,
        peer: crate::peer::Peer,
        now: Instant,
    ) -> Result<(), TcpStream> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: (u64::from(slot.generation) << 32) | u64::from(index),
        };
        // SAFETY: both fds are open; `event` is a valid epoll_event.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                &mut event,
            )
        };
        if rc != 0 {
            self.free.push(index);
            return Err(stream);
        }
        slot.conn = Some(Parked {
            stream,
            peer,
            since: now,
        });
        Ok(())
    }

    /// Takes the connection an epoll event's data names, if it is still parked.
    pub fn take(&mut self, data: u64) -> Option<Parked> {
        let index = (data & 0xffff_ffff) as usize;
        let generation = (data >> 32) as u32;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let parked = slot.conn.take()?;
        self.release(index, &parked);
        Some(parked)
    }

    fn release(&mut self, index: usize, parked: &Parked) {
        // SAFETY: both fds are open; DEL ignores the event argument.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                parked.stream.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
    }

    /// Closes connections parked for longer than `idle`.
    pub fn expire(&mut self, now: Instant, idle: Duration) {
        for index in 0..self.slots.len() {
            let expired = self.slots[index]
                .conn
                .as_ref()
                .is_some_and(|p| now.duration_since(p.since) >= idle);
            if expired {
                if let Some(parked) = self.slots[index].conn.take() {
                    self.release(index, &parked);
                }
            }
        }
    }

    /// Closes every parked connection (shutdown). Each is shut down first: under io_uring a
    /// dropped socket's close is an operation the event loop submits on its next turn, and
    /// a worker with nothing else to drain may not take another; the client sees its
    /// connection end now either way.
    pub fn clear(&mut self) {
        for slot in &self.slots {
            if let Some(parked) = &slot.conn {
                // SAFETY: the parked socket is open (its stream is held in the slot).
                unsafe { libc::shutdown(parked.stream.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        self.expire(Instant::now(), Duration::ZERO);
    }

    /// Takes every parked connection out (the drain of a binary upgrade resumes them, to
    /// answer a request their client may be sending already).
    pub fn take_all(&mut self) -> Vec<Parked> {
        let mut out = Vec::new();
        for index in 0..self.slots.len() {
            if let Some(parked) = self.slots[index].conn.take() {
                self.release(index, &parked);
                out.push(parked);
            }
        }
        out
    }
}
