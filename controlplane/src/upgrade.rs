//! Binary upgrades without a dropped connection, nginx-style: on `SIGUSR2` the running
//! gateway starts the binary at the path it was started from (the new one, once installed
//! there) with the same arguments, handing it its listening sockets and its admin socket as
//! inherited file descriptors. The successor opens the same data directory (or etcd store),
//! validates the config, serves on the sockets it was given and says it is ready through a
//! pipe; only then does the old process stop accepting and drain. If the successor exits or
//! does not become ready in time, the old one kills it and goes on serving.
//!
//! Nothing is re-bound, so no connection waiting in a socket's accept queue is lost: the
//! queues belong to the sockets, which both processes hold for a moment. The old process
//! cancels its pending accepts instead of shutting the sockets down (`begin_handover`).
//! While the successor starts, the old process holds its config store's lock, so no admin
//! write lands in between; once the successor is ready, writes that still reach the old one
//! answer `503` and it takes no more admin connections.
//!
//! Also here: `sd_notify` for systemd's `Type=notify` (`READY=1`, and `MAINPID` from a
//! successor, which `NotifyAccess=all` lets systemd take as the service's new main process).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Listening sockets handed over, by listener index: `3,4 5,6` (listeners separated by
/// spaces, each listener's sockets by commas).
pub const LISTENERS_ENV: &str = "GATEWAY_UPGRADE_LISTENERS";
/// The admin API's listening socket.
pub const ADMIN_ENV: &str = "GATEWAY_UPGRADE_ADMIN";
/// The pipe to write `ready` to once serving.
pub const READY_ENV: &str = "GATEWAY_UPGRADE_READY";
/// The descriptor of the data directory's lock file (see `lock_data_dir` in the crate's
/// root), which the successor holds on: a `flock` belongs to the open file, shared by the
/// descriptor handed over, where a new open of the file would be refused while this process
/// drains.
pub const LOCK_ENV: &str = "GATEWAY_UPGRADE_LOCK";

/// How long a successor may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What this process was started as, to start its successor the same way.
#[derive(Debug, Clone)]
pub struct Origin {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Origin {
    /// The binary's path and the arguments, read at start (the path is the one the binary was
    /// started from, which a package upgrade replaces).
    pub fn current() -> Option<Origin> {
        Some(Origin {
            exe: invoked_path().or_else(|| std::env::current_exe().ok())?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// The path this process was started by (`argv[0]`, made absolute against the directory it
/// started in, or found in `PATH` as a shell finds a bare name), its links not followed: a
/// deployment that switches a link to the new version (`/usr/local/bin/gateway ->
/// /opt/gateway/2.1/gateway`, alternatives) upgrades to what the link names then, as nginx
/// does. `/proc/self/exe` would name the old version's file, links resolved.
fn invoked_path() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let arg0 = PathBuf::from(std::env::args_os().next()?);
    if arg0.as_os_str().as_bytes().contains(&b'/') {
        return Some(std::env::current_dir().ok()?.join(arg0));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(&arg0))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .filter(|p| p.is_absolute())
}

/// What a predecessor handed over to this process.
#[derive(Debug)]
pub struct Inherited {
    pub listeners: Vec<Vec<TcpListener>>,
    pub admin: Option<TcpListener>,
    /// The data directory's lock, held by the predecessor (none from a build without one).
    pub lock: Option<File>,
    ready: Option<File>,
}

fn parse_fd(s: &str) -> Result<RawFd, String> {
    let fd: RawFd = s
        .parse()
        .map_err(|_| format!("{s:?} is not a file descriptor"))?;
    // SAFETY: F_GETFD only reads the descriptor's flags; a closed one fails with EBADF.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("file descriptor {fd} is not open"));
    }
    // SAFETY: as above; sets close-on-exec on a descriptor this process owns from now on.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

/// A listening TCP socket from an inherited descriptor.
fn listener(fd: RawFd) -> Result<TcpListener, String> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return Err(format!("file descriptor {fd} is not a listening socket"));
    }
    // SAFETY: the descriptor is open, a listening socket, and owned by nothing else in this
    // process (it was handed over for this).
    Ok(unsafe { TcpListener::from_raw_fd(fd) })
}

/// Takes what a predecessor handed over, if this process is a successor.
pub fn take() -> Result<Option<Inherited>, String> {
    let Ok(ready) = std::env::var(READY_ENV) else {
        return Ok(None);
    };
    let ready_fd = parse_fd(&ready)?;
    // SAFETY: an open descriptor (checked) handed to this process to own.
    let ready = unsafe { File::from(OwnedFd::from_raw_fd(ready_fd)) };
    let mut listeners = Vec::new();
    for group in std::env::var(LISTENERS_ENV).unwrap_or_default().split(' ') {
        let mut sockets = Vec::new();
        for fd in group.split(',').filter(|s| !s.is_empty()) {
            sockets.push(listener(parse_fd(fd)?)?);
        }
        listeners.push(sockets);
    }
    let admin = match std::env::var(ADMIN_ENV) {
        Ok(fd) => Some(listener(parse_fd(&fd)?)?),
        Err(_) => None,
    };
    // Not fatal when it is not open: an older build between two upgrades passes the variable
    // on and closes the descriptor at its exec (the lock is then taken afresh).
    let lock = match std::env::var(LOCK_ENV).map(|fd| parse_fd(&fd)) {
        // SAFETY: an open descriptor (checked) handed to this process to own.
        Ok(Ok(fd)) => Some(unsafe { File::from(OwnedFd::from_raw_fd(fd)) }),
        Ok(Err(e)) => {
            log::warn!("upgrade: the data directory's lock was not handed over ({e})");
            None
        }
        Err(_) => None,
    };
    for var in [READY_ENV, LISTENERS_ENV, ADMIN_ENV, LOCK_ENV] {
        std::env::remove_var(var);
    }
    Ok(Some(Inherited {
        listeners,
        admin,
        lock,
        ready: Some(ready),
    }))
}

impl Inherited {
    /// Tells the predecessor this process serves.
    pub fn ready(&mut self) {
        if let Some(mut pipe) = self.ready.take() {
            if let Err(e) = pipe.write_all(b"ready\n") {
                log::warn!("cannot tell the previous process this one is ready: {e}");
            }
        }
    }
}

/// A successor being started.
#[derive(Debug)]
pub struct Successor {
    child: Child,
    ready: File,
}

/// Starts the successor with the listening sockets (`listeners`, by listener index), the
/// admin socket and the data directory's lock.
pub fn spawn(
    origin: &Origin,
    listeners: &[Vec<RawFd>],
    admin: RawFd,
    lock: RawFd,
) -> std::io::Result<Successor> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let groups: Vec<String> = listeners
        .iter()
        .map(|g| {
            g.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let mut passed: Vec<RawFd> = listeners.iter().flatten().copied().collect();
    passed.push(admin);
    passed.push(lock);
    passed.push(write.as_raw_fd());
    let mut cmd = Command::new(&origin.exe);
    cmd.args(&origin.args)
        .env(LISTENERS_ENV, groups.join(" "))
        .env(ADMIN_ENV, admin.to_string())
        .env(LOCK_ENV, lock.to_string())
        .env(READY_ENV, write.as_raw_fd().to_string());
    passed.sort_unstable();
    // SAFETY: runs in the child between fork and exec and only makes system calls (close_range,
    // fcntl, pthread_sigmask), which are async-signal-safe; `passed` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Every other descriptor closes at exec: client connections accepted without
            // close-on-exec must not live on in the successor (their clients would wait for an
            // end of stream that never comes).
            let mut from: libc::c_uint = 3;
            for &fd in &passed {
                let fd = fd as libc::c_uint;
                if fd > from {
                    cloexec_range(from, fd - 1);
                }
                from = fd + 1;
            }
            cloexec_range(from, libc::c_uint::MAX);
            for &fd in &passed {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // This process blocks the signals it waits for; the successor starts with only
            // those that ask a running gateway for something blocked (its start blocks them
            // too): one sent to it before its start has set its mask (a `systemctl reload`
            // or logrotate's SIGUSR1 at that moment) waits for it, instead of taking its
            // default action and killing it. SIGTERM and SIGINT still stop it at once.
            let asks = crate::signal_set(&[libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2]);
            libc::pthread_sigmask(libc::SIG_SETMASK, &asks, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(write);
    Ok(Successor { child, ready: read })
}

impl Successor {
    /// Waits until the successor says it is ready (its pid), exits, or `timeout` passes; in
    /// the last two cases it is stopped and the reason returned.
    pub fn wait_ready(mut self, timeout: Duration, stop: impl Fn() -> bool) -> Result<u32, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            // Before the ready check: a shutdown signal that came in the same moment wins.
            if stop() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err("a shutdown signal came first; stopped the new process".into());
            }
            let mut pfd = libc::pollfd {
                fd: self.ready.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n > 0 {
                let mut buf = [0u8; 16];
                match self.ready.read(&mut buf) {
                    Ok(k) if k > 0 => got.extend_from_slice(&buf[..k]),
                    // The pipe's end: it can no longer say it is ready (and poll would
                    // return at once from here on: no busy wait for the rest of the bound).
                    Ok(_) if !got.starts_with(b"ready") => {
                        // A process that exits closes it first: its status, if it comes.
                        let gone = Instant::now() + Duration::from_secs(1);
                        while Instant::now() < gone && !stop() {
                            if let Ok(Some(status)) = self.child.try_wait() {
                                return Err(format!(
                                    "the new process exited ({status}) before it was ready"
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        let _ = self.child.kill();
                        let _ = self.child.wait();
                        return Err("the new process closed its ready pipe without saying it \
                                    was ready; stopped it"
                            .into());
                    }
                    _ => {}
                }
                if got.starts_with(b"ready") {
                    return Ok(self.child.id());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the new process exited ({status}) before it was ready"
                ));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "the new process was not ready within {} s; stopped it",
                    timeout.as_secs()
                ));
            }
        }
    }
}

/// Marks the descriptors `from..=to` close-on-exec (in a forked child, before exec).
fn cloexec_range(from: libc::c_uint, to: libc::c_uint) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on open descriptors.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, from, to, CLOSE_RANGE_CLOEXEC) };
    if rc != 0 {
        // Kernels before 5.11: one fcntl per descriptor, up to a bound.
        for fd in from..=to.min(65_535) {
            // SAFETY: fcntl on a descriptor number; a closed one fails with EBADF.
            unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Sends `state` to systemd when it started this service with `Type=notify`.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        log::warn!("cannot notify systemd ({}): {e}", path.to_string_lossy());
    }
}
