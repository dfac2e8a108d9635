//! The access log: one JSON object per line per request, written by a thread of its own so a
//! worker never waits for the disk.
//!
//! Each worker appends lines to its own buffer ([`WorkerLog`]). A full buffer, and every
//! buffer at the worker's 100 ms housekeeping tick, goes to the writer thread over a bounded
//! channel; the writer writes it with one `write` and sends it back empty for reuse. A worker
//! holds at most [`BUFFERS_PER_WORKER`] buffers of [`BUFFER_BYTES`]: when all are in flight
//! (the disk is slower than the traffic) a line is dropped and counted in
//! `gateway_access_log_dropped_total`, never waited for.
//!
//! Hot path for [`WorkerLog::append`] and [`write_fields`]: formatting goes straight into the
//! reused buffers (no allocation once they exist). The writer reopens the file when the
//! snapshot names another sink and when [`AccessLogWriter::reopen`] is called (SIGUSR1, after
//! logrotate moved the file).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use common::snapshot::LogSink;
use common::Snapshot;

/// Size of one log buffer.
pub const BUFFER_BYTES: usize = 256 * 1024;
/// Buffers one worker may have (one filling, the others on their way to the file).
pub const BUFFERS_PER_WORKER: usize = 4;
/// Longest `path` and `user_agent` written, in bytes of the original; longer ones are cut
/// (and end in `...`), so that a line always fits in a buffer.
pub const MAX_LOGGED_PATH: usize = 8 * 1024;
pub const MAX_LOGGED_USER_AGENT: usize = 1024;
/// Longest `method` written (a token of any length the head limit allows; methods in use
/// are a few letters).
pub const MAX_LOGGED_METHOD: usize = 64;
/// Room the end of a line can need (the fields known when the request ends: numbers, ids,
/// an address, an aggregate's failed steps), on top of the head's part, which is formatted
/// before the line is reserved and so has a known length.
pub const MAX_TAIL: usize = 16 * 1024;

/// A worker's end of the access log.
#[derive(Debug)]
pub struct WorkerLog {
    index: usize,
    /// The buffer lines are appended to (capacity 0 when every buffer is in flight).
    current: Vec<u8>,
    /// `None` once closed (the worker stopped).
    to_writer: Option<SyncSender<(usize, Vec<u8>)>>,
    returned: Receiver<Vec<u8>>,
    /// Buffers this worker has allocated (at most [`BUFFERS_PER_WORKER`]).
    allocated: usize,
    /// Texts of the client addresses and targets this worker logged last.
    pub client_ips: AddrTexts<IpAddr>,
    targets: AddrTexts<SocketAddr>,
}

impl WorkerLog {
    /// Room for one more line of at most `need` bytes (at most half a buffer), handing a full
    /// buffer to the writer if need be. `false`: no buffer is free, drop the line.
    pub fn reserve(&mut self, need: usize) -> bool {
        debug_assert!(need <= BUFFER_BYTES / 2);
        if self.to_writer.is_none() {
            return false;
        }
        if self.current.capacity() - self.current.len() >= need {
            return true;
        }
        self.flush();
        if self.current.capacity() == 0 {
            match self.returned.try_recv() {
                Ok(buf) => self.current = buf,
                Err(_) if self.allocated < BUFFERS_PER_WORKER => {
                    self.allocated += 1;
                    self.current = Vec::with_capacity(BUFFER_BYTES);
                }
                Err(_) => return false,
            }
        }
        self.current.capacity() - self.current.len() >= need
    }

    /// The buffer to append one line to, after [`WorkerLog::reserve`] said yes, and the texts
    /// of the targets logged last.
    pub fn buffer(&mut self) -> (&mut Vec<u8>, &mut AddrTexts<SocketAddr>) {
        (&mut self.current, &mut self.targets)
    }

    /// Hands what is buffered to the writer (if it can take it now).
    pub fn flush(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let Some(to_writer) = &self.to_writer else {
            return;
        };
        let buf = std::mem::take(&mut self.current);
        match to_writer.try_send((self.index, buf)) {
            Ok(()) => {
                if let Ok(spare) = self.returned.try_recv() {
                    self.current = spare;
                }
            }
            Err(TrySendError::Full((_, buf)) | TrySendError::Disconnected((_, buf))) => {
                self.current = buf;
            }
        }
    }
}

impl WorkerLog {
    /// The worker stops: its last lines go to the writer even if that means waiting for it,
    /// and the writer is told this worker is done (it ends once every worker is). Later lines
    /// are dropped and counted.
    pub fn close(&mut self) {
        if let Some(to_writer) = self.to_writer.take() {
            if !self.current.is_empty() {
                let _ = to_writer.send((self.index, std::mem::take(&mut self.current)));
            }
        }
    }
}

impl Drop for WorkerLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread and the workers' ends of it.
#[derive(Debug)]
pub struct AccessLogWriter {
    thread: Option<JoinHandle<()>>,
    reopen: Arc<AtomicBool>,
}

impl AccessLogWriter {
    /// Starts the writer thread; returns it and one [`WorkerLog`] per worker.
    pub fn start(
        config: Arc<ArcSwap<Snapshot>>,
        workers: usize,
    ) -> std::io::Result<(AccessLogWriter, Vec<WorkerLog>)> {
        let (to_writer, from_workers) = mpsc::sync_channel(workers * BUFFERS_PER_WORKER);
        let mut returns = Vec::with_capacity(workers);
        let mut logs = Vec::with_capacity(workers);
        for index in 0..workers {
            let (back, returned) = mpsc::sync_channel(BUFFERS_PER_WORKER);
            returns.push(back);
            logs.push(WorkerLog {
                index,
                current: Vec::new(),
                to_writer: Some(to_writer.clone()),
                returned,
                allocated: 0,
                client_ips: AddrTexts::default(),
                targets: AddrTexts::default(),
            });
        }
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        let thread = std::thread::Builder::new()
            .name("gw-access-log".into())
            .spawn(move || write_loop(config, from_workers, returns, flag))?;
        Ok((
            AccessLogWriter {
                thread: Some(thread),
                reopen,
            },
            logs,
        ))
    }

    /// Makes the writer close and reopen its file before the next batch (logrotate).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// [`AccessLogWriter::reopen`] as a handle that outlives a borrow of the writer.
    pub fn reopener(&self) -> impl Fn() + Send + 'static {
        let flag = self.reopen.clone();
        move || flag.store(true, Ordering::Release)
    }

    /// Waits for the writer to write what the workers handed it; it ends once every worker
    /// has dropped its [`WorkerLog`].
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether the writer has written everything and ended (see [`AccessLogWriter::join`]).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// Lines lost because the log could not be opened or written (a full disk, a removed
/// directory): `gateway_access_log_lost_total`. One writer per process.
pub static LOST_LINES: AtomicU64 = AtomicU64::new(0);

/// An open sink.
struct Open {
    sink: LogSink,
    out: Box<dyn Write>,
    /// The file itself, to cut a failed write back.
    file: Option<std::fs::File>,
}

impl Open {
    /// Writes a batch of whole lines, or none of it: a file is cut back to its length before
    /// a write that failed part-way (a full disk), so no torn line is left for the next batch
    /// to continue.
    fn write_batch(&mut self, batch: &[u8]) -> std::io::Result<()> {
        let before = match &self.file {
            Some(f) => Some(f.metadata()?.len()),
            None => None,
        };
        let written = self.out.write_all(batch).and_then(|()| self.out.flush());
        if written.is_err() {
            if let (Some(f), Some(len)) = (&self.file, before) {
                let _ = f.set_len(len);
            }
        }
        written
    }
}

fn open(sink: &LogSink) -> std::io::Result<Open> {
    let (out, file): (Box<dyn Write>, _) = match sink {
        LogSink::Stdout => (Box::new(std::io::stdout()), None),
        LogSink::File(path) => {
            // Opened without blocking: a FIFO no one reads (a log shipper not started yet,
            // or gone) held this thread in open() until one came, and with it every change
            // of the log's path and every SIGUSR1 reopen, while the lines were lost without
            // a word. Now the open fails (ENXIO), is said and counted, and is tried again.
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)?;
            blocking(&f)?;
            (Box::new(f.try_clone()?), Some(f))
        }
    };
    Ok(Open {
        sink: sink.clone(),
        out,
        file,
    })
}

/// Clears `O_NONBLOCK` on an open file: its writes wait as a file's do (a FIFO's too, for
/// its reader), rather than fail part-way.
fn blocking(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is the open file `f` owns, alive for both calls; F_GETFL and F_SETFL
    // read and set its status flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_loop(
    config: Arc<ArcSwap<Snapshot>>,
    batches: Receiver<(usize, Vec<u8>)>,
    returns: Vec<SyncSender<Vec<u8>>>,
    reopen: Arc<AtomicBool>,
) {
    let mut current: Option<Open> = None;
    // Set by a failed open or write, cleared by the next write that works: the error is
    // logged once per outage, not once per batch.
    let mut failing = false;
    loop {
        let batch = batches.recv_timeout(Duration::from_millis(200));
        let snap = config.load();
        let wanted = snap.access_log.as_ref().map(|l| &l.sink);
        let reopen_now = reopen.swap(false, Ordering::AcqRel);
        if reopen_now || current.as_ref().map(|o| &o.sink) != wanted {
            if let Some(mut o) = current.take() {
                let _ = o.out.flush();
            }
        }
        if current.is_none() {
            if let Some(sink) = wanted {
                match open(sink) {
                    Ok(o) => current = Some(o),
                    Err(e) if !failing => {
                        failing = true;
                        let what = match sink {
                            LogSink::Stdout => "stdout".to_owned(),
                            LogSink::File(p) => p.display().to_string(),
                        };
                        log::error!(
                            "access log: cannot open {what}: {e}; lines are lost until it can"
                        );
                    }
                    Err(_) => {}
                }
            }
        }
        match batch {
            Ok((worker, mut buf)) => {
                let written = match current.as_mut().map(|o| o.write_batch(&buf)) {
                    Some(Ok(())) => {
                        failing = false;
                        true
                    }
                    Some(Err(e)) => {
                        if !failing {
                            log::error!(
                                "access log: write failed: {e}; lines are lost until it works"
                            );
                        }
                        failing = true;
                        current = None;
                        false
                    }
                    None => false,
                };
                if !written && wanted.is_some() {
                    let lines = buf.iter().filter(|&&b| b == b'\n').count();
                    LOST_LINES.fetch_add(lines as u64, Ordering::Relaxed);
                }
                buf.clear();
                let _ = returns[worker].try_send(buf);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Appends `s` as a JSON string (quotes included), escaping what JSON requires and any byte
/// that is not printable ASCII (`\u00XX` for each byte of a non-ASCII sequence), so no value
/// can break a line or the object; `s` is cut at `max` bytes with `...` appended.
pub fn json_str(out: &mut Vec<u8>, s: &[u8], max: usize) {
    // Most values need neither a cut nor an escape: one scan, one copy.
    if s.len() <= max && plain_run(s) == s.len() {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
    json_str_parts(out, &[s], max);
}

/// [`json_str`] of the concatenation of `parts`, without joining them first.
fn json_str_parts(out: &mut Vec<u8>, parts: &[&[u8]], max: usize) {
    out.push(b'"');
    let mut room = max;
    let mut cut = false;
    for part in parts {
        let take = part.len().min(room);
        escape_into(out, &part[..take]);
        room -= take;
        cut |= take < part.len();
    }
    if cut {
        out.extend_from_slice(b"...");
    }
    out.push(b'"');
}

/// How many bytes at the start of `s` go into a log line as they are: printable ASCII other
/// than a quote or a backslash. Eight bytes at a time while none needs escaping.
pub(crate) fn plain_run(s: &[u8]) -> usize {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Quotes, backslashes and control bytes, bytes from 0x80, and 0x7f (DEL), flagged in the
    // high bit of their byte. Only the lowest flag counts: higher ones can be borrows, which
    // only ever come from a real flag below them.
    let stops = |chunk: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let del = (w ^ (ONES * 0x7f)).wrapping_sub(ONES) & !(w ^ (ONES * 0x7f)) & HIGH;
        crate::json::stop_bytes(w) | (w & HIGH) | del
    };
    if s.len() < 8 {
        // One word: the value padded with a plain byte, which raises no flag.
        let mut word = [b'a'; 8];
        word[..s.len()].copy_from_slice(s);
        let found = stops(&word);
        return if found == 0 {
            s.len()
        } else {
            (found.trailing_zeros() / 8) as usize
        };
    }
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let found = stops(chunk);
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    if i < s.len() {
        // The rest as the last eight bytes, overlapping bytes already found plain (they
        // raise no flag, so the lowest flag is in the rest).
        let at = s.len() - 8;
        let found = stops(&s[at..]);
        return if found == 0 {
            s.len()
        } else {
            at + (found.trailing_zeros() / 8) as usize
        };
    }
    i
}

/// Appends `s` escaped for the inside of a JSON string: plain runs copied whole, the bytes
/// between them escaped one by one.
fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    let mut at = 0;
    loop {
        let plain = plain_run(&s[at..]);
        out.extend_from_slice(&s[at..at + plain]);
        at += plain;
        let Some(&b) = s.get(at) else { return };
        at += 1;
        escape_byte(out, b);
    }
}

/// Appends one byte as it goes inside a JSON string in a log line.
fn escape_byte(out: &mut Vec<u8>, b: u8) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x20..=0x7e => out.push(b),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
    }
}

#[cfg(test)]
mod escape_tests {
    use super::*;

    /// Byte by byte: what the runs of plain bytes must not change.
    fn slow(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in s {
            escape_byte(&mut out, b);
        }
        out
    }

    #[test]
    fn bytes_are_escaped_as_json_wants_them() {
        let mut out = Vec::new();
        for b in [b'a', b'"', b'\\', b'\n', 0x01, 0x7f, 0xe9] {
            escape_byte(&mut out, b);
        }
        assert_eq!(out, br#"a\"\\\n\u0001\u007f\u00e9"#);
    }

    #[test]
    fn numbers_are_written_as_display_writes_them() {
        let mut out = Vec::new();
        let mut check = |n: u64| {
            out.clear();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        };
        for n in 0..=10_001 {
            check(n);
        }
        for shift in 0..64 {
            check(1u64 << shift);
            check((1u64 << shift) - 1);
        }
        check(u64::MAX);
    }

    #[test]
    fn escaping_agrees_with_the_byte_by_byte_definition_at_every_position() {
        let specials = [
            b'"', b'\\', 0x00, 0x1f, b'\n', 0x7f, 0x80, 0xc3, 0xff, b' ', b'~',
        ];
        for len in 0..20 {
            for pos in 0..len.max(1) {
                for &sp in &specials {
                    let mut s: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                    if pos < len {
                        s[pos] = sp;
                    }
                    let mut out = Vec::new();
                    escape_into(&mut out, &s);
                    assert_eq!(out, slow(&s), "{s:?}");
                    // The whole string, through the one-copy path when nothing needs escaping.
                    out.clear();
                    json_str(&mut out, &s, 64);
                    assert_eq!(out, [&b"\""[..], &slow(&s), b"\""].concat(), "{s:?}");
                    // Cut at `max`, escaped or not.
                    if len > 3 {
                        out.clear();
                        json_str(&mut out, &s, 3);
                        assert_eq!(
                            out,
                            [&b"\""[..], &slow(&s[..3]), b"...\""].concat(),
                            "{s:?}"
                        );
                    }
                }
            }
        }
    }
}

/// Appends `n` in decimal (no `fmt` machinery: this runs for every logged request), two
/// digits per division. The digits are written left-aligned into a fixed array that is
/// appended whole and cut back to their number: a copy of a known size, which the compiler
/// turns into a few moves, where a copy of the digits alone would be a call to `memcpy`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
                                2021222324252627282930313233343536373839\
                                4041424344454647484950515253545556575859\
                                6061626364656667686970717273747576777879\
                                8081828384858687888990919293949596979899";
    if n < 10 {
        out.push(b'0' + n as u8);
        return;
    }
    let len = n.ilog10() as usize + 1;
    let mut digits = [0u8; 20];
    let mut i = len;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i] = PAIRS[pair];
        digits[i + 1] = PAIRS[pair + 1];
    }
    if n >= 10 {
        let pair = n as usize * 2;
        digits[0] = PAIRS[pair];
        digits[1] = PAIRS[pair + 1];
    } else {
        digits[0] = b'0' + n as u8;
    }
    let end = out.len() + len;
    out.extend_from_slice(&digits);
    out.truncate(end);
}

/// Writes `n` (below 10^len) zero-padded into all of `dst`.
pub(crate) fn fill_padded(dst: &mut [u8], mut n: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends a duration as milliseconds with three decimals (microsecond resolution).
pub fn json_ms(out: &mut Vec<u8>, d: Duration) {
    let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
    push_u64(out, us / 1000);
    let mut fraction = *b".000";
    fill_padded(&mut fraction[1..], us % 1000);
    out.extend_from_slice(&fraction);
}

thread_local! {
    /// The last timestamp formatted on this thread, in milliseconds since the epoch, and its
    /// text: lines in the same millisecond copy it, lines in the same second only format their
    /// milliseconds.
    static LAST_TIME: std::cell::Cell<(u64, [u8; 26])> =
        const { std::cell::Cell::new((u64::MAX, *b"\"YYYY-MM-DDTHH:MM:SS.mmmZ\"")) };
}

/// Appends `t` as an RFC 3339 UTC timestamp with milliseconds, in quotes.
pub fn json_time(out: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    // Without `as_millis`'s 128-bit arithmetic; a time past year 584 million saturates.
    let ms = since
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(since.subsec_millis()))
        .min(u64::MAX - 1);
    let (last, mut quoted) = LAST_TIME.with(|c| c.get());
    if last != ms {
        let secs = ms / 1000;
        if last / 1000 != secs {
            // In place: no buffer is allocated, not even once a second.
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            fill_padded(&mut quoted[1..5], y.clamp(0, 9999) as u64);
            fill_padded(&mut quoted[6..8], u64::from(m));
            fill_padded(&mut quoted[9..11], u64::from(d));
            fill_padded(&mut quoted[12..14], rem / 3600);
            fill_padded(&mut quoted[15..17], rem / 60 % 60);
            fill_padded(&mut quoted[18..20], rem % 60);
        }
        fill_padded(&mut quoted[21..24], ms % 1000);
        LAST_TIME.with(|c| c.set((ms, quoted)));
    }
    out.extend_from_slice(&quoted);
}

/// Year, month, day of the proleptic Gregorian calendar for days since 1970-01-01
/// (H. Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Appends an IP address (IPv4-mapped IPv6 as IPv4) without quotes.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    crate::forward::write_ip(out, ip);
}

/// Appends an IP address as a JSON string.
pub fn json_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.push(b'"');
    push_ip(out, ip);
    out.push(b'"');
}

/// Appends a socket address as a JSON string (`"192.0.2.1:80"`, `"[2001:db8::1]:80"`).
pub fn json_addr(out: &mut Vec<u8>, addr: std::net::SocketAddr) {
    out.push(b'"');
    push_addr(out, addr);
    out.push(b'"');
}

/// Appends a socket address (`192.0.2.1:80`, `[2001:db8::1]:80`).
pub fn push_addr(out: &mut Vec<u8>, addr: std::net::SocketAddr) {
    if addr.is_ipv6() && addr.ip().to_canonical().is_ipv6() {
        out.push(b'[');
        push_ip(out, addr.ip());
        out.push(b']');
    } else {
        push_ip(out, addr.ip());
    }
    out.push(b':');
    push_u64(out, u64::from(addr.port()));
}

/// The JSON text of the last address written through it (a client's, a target's), kept so
/// that the next line with the same address copies it instead of formatting it again.
#[derive(Debug, Clone, Copy)]
pub struct AddrText<K> {
    key: Option<K>,
    len: u8,
    text: [u8; ADDR_TEXT],
}

/// Room for the longest address as a JSON string: `"[` the longest IPv6 text (45 bytes)
/// `]:65535"`.
const ADDR_TEXT: usize = 64;

impl<K: Copy + PartialEq> Default for AddrText<K> {
    fn default() -> Self {
        AddrText {
            key: None,
            len: 0,
            text: [0; ADDR_TEXT],
        }
    }
}

impl<K: Copy + PartialEq> AddrText<K> {
    /// Appends `key` as `format` writes it, from the copy kept when it is the last one seen.
    pub fn write(&mut self, out: &mut Vec<u8>, key: K, format: fn(&mut Vec<u8>, K)) {
        let start = out.len();
        if self.key == Some(key) {
            // The whole array, cut back: a copy of a known size (see `push_u64`).
            out.extend_from_slice(&self.text);
            out.truncate(start + usize::from(self.len));
            return;
        }
        format(out, key);
        let text = &out[start..];
        if let Some(kept) = self.text.get_mut(..text.len()) {
            kept.copy_from_slice(text);
            self.len = text.len() as u8;
            self.key = Some(key);
        }
    }
}

/// An address type whose texts [`AddrTexts`] keeps.
pub trait AddrKey: Copy + PartialEq {
    /// The address's bits folded into 64 (a cheap hash, spread by [`AddrTexts`]).
    fn fold(self) -> u64;
}

impl AddrKey for IpAddr {
    fn fold(self) -> u64 {
        match self {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        }
    }
}

impl AddrKey for SocketAddr {
    fn fold(self) -> u64 {
        self.ip().fold() ^ (u64::from(self.port()) << 40)
    }
}

/// Slots of [`AddrTexts`]: 2^`ADDR_SLOT_BITS`.
const ADDR_SLOT_BITS: u32 = 6;
const ADDR_SLOTS: usize = 1 << ADDR_SLOT_BITS;

/// The texts of the addresses a worker logged last, one per slot, the slot chosen by a hash
/// of the address (an address takes its slot from the one there before). Kept by the worker,
/// not by each connection, so an idle connection holds none of it.
#[derive(Debug)]
pub struct AddrTexts<K> {
    slots: Box<[AddrText<K>; ADDR_SLOTS]>,
}

impl<K: AddrKey> Default for AddrTexts<K> {
    fn default() -> Self {
        AddrTexts {
            slots: Box::new([AddrText::default(); ADDR_SLOTS]),
        }
    }
}

impl<K: AddrKey> AddrTexts<K> {
    /// Appends `key` as `format` writes it, from its slot's text when that is `key`'s.
    pub fn write(&mut self, out: &mut Vec<u8>, key: K, format: fn(&mut Vec<u8>, K)) {
        // Fibonacci hashing: the top bits of the product, as many as index a slot.
        let slot =
            (key.fold().wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - ADDR_SLOT_BITS)) as usize;
        self.slots[slot].write(out, key, format);
    }
}

/// Appends an id (a route, upstream or consumer id, an error kind: validated to letters,
/// digits, `-`, `_` and `.`, so nothing to escape) as a JSON string, or `null`.
pub fn json_id(out: &mut Vec<u8>, id: Option<&str>) {
    match id {
        Some(id) => {
            debug_assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            out.push(b'"');
            out.extend_from_slice(id.as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a value the parser or the gateway already limited to printable ASCII without
/// quotes or backslashes (a method, which is a token; a trace id, which is hex) as a JSON
/// string, without scanning it for bytes to escape.
pub fn json_plain(out: &mut Vec<u8>, s: &[u8]) {
    debug_assert_eq!(plain_run(s), s.len(), "{s:?}");
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

/// Appends a JSON string or `null`.
pub fn json_opt_str(out: &mut Vec<u8>, s: Option<&[u8]>, max: usize) {
    match s {
        Some(s) => json_str(out, s, max),
        None => out.extend_from_slice(b"null"),
    }
}

/// Fields of one line that come from the request head; written when the head is parsed, since
/// the head's buffer may be reused for the body before the request ends.
#[derive(Debug, Clone, Copy)]
pub struct HeadFields<'a> {
    pub started: SystemTime,
    pub request_id: &'a [u8],
    /// `request_id` has nothing to escape ([`crate::trace::RequestId::is_plain`]).
    pub request_id_plain: bool,
    pub client_ip: IpAddr,
    pub method: &'a [u8],
    pub host: Option<&'a [u8]>,
    /// The target as received.
    pub target: &'a [u8],
    /// Whether to leave out `target`'s query (of a head refused before it was screened for
    /// API keys).
    pub query_cut: bool,
    pub user_agent: Option<&'a [u8]>,
    pub trace_id: Option<&'a [u8]>,
}

/// Writes the head's part of a line: `{"ts":...` up to the last head field, with a trailing
/// comma. `client_ips` keeps client addresses' texts from one line to the next.
pub fn write_head_fields(
    out: &mut Vec<u8>,
    f: &HeadFields<'_>,
    client_ips: &mut AddrTexts<IpAddr>,
) {
    out.extend_from_slice(b"{\"ts\":");
    json_time(out, f.started);
    out.extend_from_slice(b",\"request_id\":");
    match (f.request_id.is_empty(), f.request_id_plain) {
        // `[tracing] request_id = false`: the gateway has none.
        (true, _) => out.extend_from_slice(b"null"),
        (false, true) => json_plain(out, f.request_id),
        (false, false) => json_str(out, f.request_id, 256),
    }
    out.extend_from_slice(b",\"client_ip\":");
    client_ips.write(out, f.client_ip, json_ip);
    out.extend_from_slice(b",\"method\":");
    // A token (the parser checked it), or empty for a head that did not parse.
    match f.method.len() <= MAX_LOGGED_METHOD {
        true => json_plain(out, f.method),
        false => json_str(out, f.method, MAX_LOGGED_METHOD),
    }
    out.extend_from_slice(b",\"host\":");
    json_opt_str(out, f.host, 1024);
    out.extend_from_slice(b",\"path\":");
    let target = match f.query_cut {
        true => f.target.split(|&b| b == b'?').next().unwrap_or(f.target),
        false => f.target,
    };
    json_str(out, target, MAX_LOGGED_PATH);
    out.extend_from_slice(b",\"user_agent\":");
    json_opt_str(out, f.user_agent, MAX_LOGGED_USER_AGENT);
    out.extend_from_slice(b",\"trace_id\":");
    // 32 hex digits, parsed or made by the gateway.
    match f.trace_id {
        Some(id) => json_plain(out, id),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b',');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_fails_part_way_is_cut_back() {
        // Takes 10 bytes, then the disk is full.
        struct FillsUp(std::fs::File, usize);
        impl Write for FillsUp {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let room = 10usize.saturating_sub(self.1);
                if room == 0 {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                }
                let n = self.0.write(&buf[..room.min(buf.len())])?;
                self.1 += n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let path = std::env::temp_dir().join(format!("gw-cut-back-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut o = open(&LogSink::File(path.clone())).unwrap();
        o.write_batch(b"{\"a\":1}\n").unwrap();
        let file = o.file.as_ref().unwrap().try_clone().unwrap();
        o.out = Box::new(FillsUp(file, 0));
        assert!(o.write_batch(b"{\"b\":2}\n{\"c\":3}\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let mut out = Vec::new();
        json_time(
            &mut out,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_633_600_123),
        );
        assert_eq!(out, b"\"2025-12-02T00:00:00.123Z\"");
        out.clear();
        json_time(
            &mut out,
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400),
        );
        assert_eq!(out, b"\"2000-02-29T00:00:00.000Z\"");
        out.clear();
        json_time(
            &mut out,
            SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_799),
        );
        assert_eq!(out, b"\"2099-12-31T23:59:59.000Z\"");
    }

    #[test]
    fn a_kept_timestamp_is_only_reused_within_its_millisecond() {
        // Each time as this thread writes it (after the ones before it, from its kept text)
        // and as a new thread writes it (from nothing).
        let base = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_633_599_998);
        let steps_us = [
            0,
            300,
            1_000,
            1_999,
            2_000,
            2_000,
            500,
            1_000_000,
            86_400_000_000,
            0,
        ];
        let mut t = base;
        for (i, &step) in steps_us.iter().enumerate() {
            // The last step goes back a day: a kept text must not survive that either.
            t = if i == steps_us.len() - 1 {
                t - Duration::from_secs(86_400)
            } else {
                t + Duration::from_micros(step)
            };
            let mut here = Vec::new();
            json_time(&mut here, t);
            let fresh = std::thread::spawn(move || {
                let mut out = Vec::new();
                json_time(&mut out, t);
                out
            })
            .join()
            .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&here),
                String::from_utf8_lossy(&fresh),
                "step {i}"
            );
        }
        let mut out = Vec::new();
        json_time(&mut out, base + Duration::from_millis(2));
        assert_eq!(out, b"\"2025-12-02T00:00:00.000Z\"");
    }

    #[test]
    fn hostile_values_cannot_break_a_line_or_the_object() {
        let mut out = Vec::new();
        json_str(&mut out, b"a\"b\\c\nd\re\x00f\x7f\xc3\xa9\"}", 100);
        let s = String::from_utf8(out.clone()).unwrap();
        assert!(!s.contains('\n') && !s.contains('\r'));
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\re\u{0}f\u{7f}\u{c3}\u{a9}\"}");
        out.clear();
        json_str(&mut out, b"abcdef", 3);
        assert_eq!(out, b"\"abc...\"");
    }

    #[test]
    fn numbers_and_addresses_are_written_like_display_does() {
        for n in [0u64, 7, 10, 99, 100, 65_535, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for a in [
            "127.0.0.1:8080",
            "[2001:db8::1]:443",
            "0.0.0.0:0",
            "255.255.255.255:65535",
        ] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            json_addr(&mut out, addr);
            assert_eq!(out, format!("\"{a}\"").as_bytes());
        }
        let mapped: std::net::SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        let mut out = Vec::new();
        json_addr(&mut out, mapped);
        assert_eq!(out, b"\"192.0.2.1:80\"");
    }

    #[test]
    fn a_kept_address_text_is_the_one_of_the_same_address() {
        let mut kept = AddrText::default();
        let addrs: Vec<std::net::SocketAddr> = [
            "127.0.0.1:8080",
            "127.0.0.1:8080",
            "127.0.0.1:8081",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "127.0.0.1:8080",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for (i, &a) in addrs.iter().enumerate() {
            let mut out = b"x".to_vec();
            kept.write(&mut out, a, json_addr);
            assert_eq!(out, format!("x\"{a}\"").as_bytes(), "address {i}");
        }
        // A worker's table: more addresses than slots, each written several times in turn.
        let mut table = AddrTexts::default();
        for round in 0..3u16 {
            for i in 0..(3 * ADDR_SLOTS as u16) {
                let a = std::net::SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80 + round));
                let mut out = Vec::new();
                table.write(&mut out, a, json_addr);
                assert_eq!(out, format!("\"{a}\"").as_bytes());
            }
        }
        let mut kept = AddrText::default();
        for ip in ["10.0.0.1", "10.0.0.1", "::1", "::1"] {
            let mut out = Vec::new();
            kept.write(&mut out, ip.parse::<IpAddr>().unwrap(), json_ip);
            assert_eq!(out, format!("\"{ip}\"").as_bytes());
        }
    }

    #[test]
    fn milliseconds_have_three_decimals() {
        let mut out = Vec::new();
        json_ms(&mut out, Duration::from_micros(1_234_567));
        assert_eq!(out, b"1234.567");
        out.clear();
        json_ms(&mut out, Duration::from_micros(5));
        assert_eq!(out, b"0.005");
    }

    #[test]
    fn an_unscreened_query_is_left_out_of_the_path() {
        let mut out = Vec::new();
        let f = HeadFields {
            started: SystemTime::UNIX_EPOCH,
            request_id: b"r",
            request_id_plain: true,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            method: b"GET",
            host: None,
            target: b"/p?api_key=s3cret&a=1",
            query_cut: true,
            user_agent: None,
            trace_id: None,
        };
        let path = |f: &HeadFields<'_>, out: &mut Vec<u8>| {
            out.clear();
            write_head_fields(out, f, &mut AddrTexts::default());
            out.pop();
            out.extend_from_slice(b"}");
            serde_json::from_slice::<serde_json::Value>(out).unwrap()["path"].clone()
        };
        assert_eq!(path(&f, &mut out), "/p");
        let f = HeadFields {
            query_cut: false,
            ..f
        };
        assert_eq!(path(&f, &mut out), "/p?api_key=s3cret&a=1");
    }

    #[test]
    fn head_fields_are_cut_to_their_limits() {
        // A method, path and user agent of 200 KiB each (possible with a large
        // `max_header_bytes`): the head's part of the line stays well within half a buffer.
        let long = vec![b'A'; 200 * 1024];
        let f = HeadFields {
            started: SystemTime::UNIX_EPOCH,
            request_id: b"r",
            request_id_plain: true,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            method: &long,
            host: Some(&long),
            target: &long,
            query_cut: false,
            user_agent: Some(&long),
            trace_id: None,
        };
        let mut out = Vec::new();
        write_head_fields(&mut out, &f, &mut AddrTexts::default());
        assert!(out.len() + MAX_TAIL <= BUFFER_BYTES / 2, "{}", out.len());
        out.pop();
        out.extend_from_slice(b"}");
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let method = line["method"].as_str().unwrap();
        assert!(
            method.starts_with("AAAA") && method.ends_with("..."),
            "{method}"
        );
        assert!(method.len() <= MAX_LOGGED_METHOD + 3, "{}", method.len());
    }

    #[test]
    fn a_worker_drops_lines_instead_of_waiting_when_every_buffer_is_in_flight() {
        let (to_writer, from_workers) = mpsc::sync_channel(1);
        let (_back, returned) = mpsc::sync_channel(BUFFERS_PER_WORKER);
        let mut log = WorkerLog {
            index: 0,
            current: Vec::new(),
            to_writer: Some(to_writer),
            returned,
            allocated: 0,
            client_ips: AddrTexts::default(),
            targets: AddrTexts::default(),
        };
        let mut written = 0;
        // Nobody drains the channel: one buffer goes in flight, the rest fill up.
        let line = BUFFER_BYTES / 3;
        while log.reserve(line) {
            let (b, _) = log.buffer();
            b.resize(b.len() + line, b'x');
            written += 1;
            assert!(written < 1000, "reserve never refused");
        }
        assert!(log.allocated <= BUFFERS_PER_WORKER);
        // The writer takes the buffer in flight and gives it back: there is room again.
        let (_, mut buf) = from_workers.try_recv().unwrap();
        buf.clear();
        _back.send(buf).unwrap();
        assert!(log.reserve(line));
    }
}
