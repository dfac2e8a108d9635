//! Test harness: starts the real `gateway` binary on loopback (port 0, the bound port read from
//! its log), origin servers written here, and raw-socket clients. Deadlines, not sleeps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// I/O driver a test runs the gateway on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

/// Generates one test per driver from `fn name(driver: Driver)`.
#[macro_export]
macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $name() { super::$name($crate::support::Driver::IoUring) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name($crate::support::Driver::Epoll) } )*
        }
    };
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, `gw-test-PID-TAG-N`. A run's directories stay
/// for a look after a failure until the next run starts, which removes them.
pub fn temp_dir(tag: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_earlier_runs_dirs);
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gw-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the `gw-test-PID-*` directories of test runs that have ended: each run leaves
/// hundreds of megabytes (gateway binaries copied for the upgrade tests, load tests' access
/// logs), which would fill the temp dir run after run. A run holds a lock on
/// `gw-test-PID.lock` while it lives, so one whose lock can be taken has ended, whatever PID
/// namespace it ran in (a run from before the locks: its PID runs no more). Only the user's
/// own directories are looked at.
fn remove_earlier_runs_dirs() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let tmp = std::env::temp_dir();
    let lock = |pid: &str| tmp.join(format!("gw-test-{pid}.lock"));
    // Whether the lock file can be locked now (held by nobody), with it, or `None` without it.
    let take = |path: &std::path::Path| {
        let f = std::fs::File::options().write(true).open(path).ok()?;
        // SAFETY: flock on a descriptor `f` owns for the call.
        let taken = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Some((taken, f))
    };
    let own = lock(&std::process::id().to_string());
    if std::fs::File::create(&own).is_ok() {
        if let Some((_, f)) = take(&own) {
            // Held until the process ends.
            std::mem::forget(f);
        }
    }
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("gw-test-")) else {
            continue;
        };
        let pid = rest.split(['-', '.']).next().unwrap_or("");
        let mine = entry.metadata().is_ok_and(|m| m.uid() == uid);
        if pid.parse::<u32>().is_err() || pid == std::process::id().to_string() || !mine {
            continue;
        }
        let ended = match take(&lock(pid)) {
            Some((taken, _)) => taken,
            None => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        };
        if ended {
            let path = entry.path();
            let _ = match path.is_dir() {
                true => std::fs::remove_dir_all(path),
                false => std::fs::remove_file(path),
            };
        }
    }
}

/// The admin section every test config gets unless it has its own: a free port and a known
/// token.
pub const ADMIN_SECTION: &str =
    "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"test-admin-token-0123456789\"\n";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A running gateway process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Gateway {
    child: Option<Child>,
    /// The first listener.
    pub addr: SocketAddr,
    /// Every listener, in config order.
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts the gateway on `config` (TOML; its listener should use port 0).
    pub fn start(config: &str, driver: Driver) -> Gateway {
        Self::start_with(config, driver, &[])
    }

    pub fn start_with(config: &str, driver: Driver, extra_args: &[&str]) -> Gateway {
        let dir = temp_dir("gw");
        let config_path = dir.join("gateway.toml");
        let text = if config.contains("[admin]") {
            config.to_owned()
        } else {
            format!("{config}{ADMIN_SECTION}")
        };
        std::fs::write(&config_path, text).unwrap();
        let data_dir = dir.join("data");
        Self::spawn(
            &["--config", config_path.to_str().unwrap()],
            &data_dir,
            config_path.clone(),
            driver,
            extra_args,
        )
    }

    /// Starts the gateway with an existing config file and data directory.
    pub fn start_with_data(
        config: &std::path::Path,
        data_dir: &std::path::Path,
        extra_args: &[&str],
    ) -> Gateway {
        Self::spawn(
            &["--config", config.to_str().unwrap()],
            data_dir,
            config.to_owned(),
            Driver::IoUring,
            extra_args,
        )
    }

    /// Starts the gateway on an existing data directory (no --config).
    pub fn resume(data_dir: &std::path::Path, driver: Driver) -> Gateway {
        Self::spawn(&[], data_dir, PathBuf::new(), driver, &[])
    }

    /// Starts the gateway binary at `bin` (a copy, which a test may replace) on `config`,
    /// with `env` added to its environment.
    pub fn start_binary(bin: &std::path::Path, config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = temp_dir("gw");
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, format!("{config}{ADMIN_SECTION}")).unwrap();
        Self::spawn_program(
            bin.as_os_str(),
            &["--config", config_path.to_str().unwrap()],
            &dir.join("data"),
            &[],
            config_path.clone(),
            Driver::IoUring,
            env,
        )
    }

    fn spawn(
        args: &[&str],
        data_dir: &std::path::Path,
        config_path: PathBuf,
        driver: Driver,
        extra_args: &[&str],
    ) -> Gateway {
        Self::spawn_program(
            env!("CARGO_BIN_EXE_gateway").as_ref(),
            args,
            data_dir,
            extra_args,
            config_path,
            driver,
            &[],
        )
    }

    /// Runs `program` with `args`, `--data-dir data_dir`, then `extra_args`, and `env` added.
    fn spawn_program(
        program: &std::ffi::OsStr,
        args: &[&str],
        data_dir: &std::path::Path,
        extra_args: &[&str],
        config_path: PathBuf,
        driver: Driver,
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .envs(env.iter().copied());
        cmd.env(
            "GATEWAY_IO_DRIVER",
            match driver {
                Driver::IoUring => "auto",
                Driver::Epoll => "epoll",
            },
        );
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn gateway");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let listener = line
                    .strip_prefix("gateway: listening on http://")
                    .or_else(|| line.strip_prefix("gateway: listening on https://"));
                if let Some(rest) = listener {
                    let addr = rest.split(' ').next().unwrap();
                    let _ = tx.send((false, addr.parse::<SocketAddr>().unwrap()));
                }
                if let Some(rest) = line.strip_prefix("gateway: admin API listening on http://") {
                    let addr = rest.split(' ').next().unwrap();
                    let _ = tx.send((true, addr.parse::<SocketAddr>().unwrap()));
                }
                log2.lock().unwrap().push(line);
            }
        });
        // Every listener, in config order, then the admin API.
        let mut addrs = Vec::new();
        let admin = loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok((false, a)) => addrs.push(a),
                Ok((true, a)) => break a,
                Err(_) => {
                    let _ = child.kill();
                    panic!("gateway did not start: {:?}", log.lock().unwrap());
                }
            }
        };
        let gw = Gateway {
            child: Some(child),
            addr: addrs[0],
            listeners: addrs,
            admin,
            config_path,
            data_dir: data_dir.to_owned(),
            log,
        };
        if driver == Driver::IoUring {
            // The kernel here supports io_uring; make sure the test really ran on it.
            gw.wait_log("driver io_uring", Duration::from_secs(5));
        } else {
            gw.wait_log("driver epoll", Duration::from_secs(5));
        }
        gw
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.log.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.wait_exit_status(timeout).and_then(|s| s.code())
    }

    /// Waits for the process to exit and returns how it ended.
    pub fn wait_exit_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raw HTTP/1.1 client connection with a read buffer.
pub struct Client {
    pub stream: TcpStream,
    /// Read and not yet taken as part of a response.
    pub buf: Vec<u8>,
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The head as received, without the final CRLF CRLF.
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends `GET path` with `Connection: close` and reads until the connection ends (the
    /// read timeout's 10 s at most), whether its answer came whole or was cut short.
    pub fn get_to_close(&mut self, path: &str) {
        self.send(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let _ = self.stream.read_to_end(&mut self.buf);
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Reads one response to a request of `method`.
    pub fn read_response_to(&mut self, method: &str) -> Response {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            assert!(
                self.fill() > 0,
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
        self.buf.drain(..head_end + 4);
        let status: u16 = head[9..12].parse().unwrap();
        let mut resp = Response {
            status,
            head,
            body: Vec::new(),
        };
        if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            return resp;
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            let (body, used) = loop {
                if let Some(done) = decode_chunked(&self.buf) {
                    break done;
                }
                assert!(self.fill() > 0, "closed inside a chunked body");
            };
            resp.body = body;
            self.buf.drain(..used);
        } else if let Some(cl) = resp.header("content-length") {
            let n: usize = cl.parse().unwrap();
            while self.buf.len() < n {
                assert!(self.fill() > 0, "closed inside a body");
            }
            resp.body = self.buf.drain(..n).collect();
        } else {
            while self.fill() > 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    pub fn read_response(&mut self) -> Response {
        self.read_response_to("GET")
    }

    /// Sends `request` and reads the response.
    pub fn roundtrip(&mut self, request: &str) -> Response {
        self.send(request.as_bytes());
        let method = request.split(' ').next().unwrap().to_owned();
        self.read_response_to(&method)
    }

    /// Whether the peer closes the connection within `timeout` (nothing else arriving).
    pub fn is_closed_within(&mut self, timeout: Duration) -> bool {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 1];
        let closed = match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => panic!("unexpected byte after the response"),
            Err(e) => matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        closed
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body at the start of `buf`: (data, bytes used incl. trailers).
pub fn decode_chunked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        let eol = find(&buf[at..], b"\r\n")? + at;
        let size_str = std::str::from_utf8(&buf[at..eol]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        at = eol + 2;
        if size == 0 {
            let end = find(&buf[at - 2..], b"\r\n\r\n")? + at - 2 + 4;
            return Some((out, end));
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        out.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// One request as an origin received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Connection number (1-based, per origin).
    pub conn: usize,
    /// The raw head, without the final CRLF CRLF.
    pub head: String,
    /// The body bytes as they came on the wire (chunked framing kept).
    pub raw_body: Vec<u8>,
}

impl Received {
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap()
    }

    /// The request target (the request line's second word).
    pub fn target(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// What an origin answers to a request.
pub type Handler = dyn Fn(&Received, &mut TcpStream) -> Keep + Send + Sync;

/// Whether the origin keeps the connection after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Open,
    Close,
    /// Close with a TCP reset (no FIN first): what the other side reads is cut, not ended.
    Reset,
}

/// A threaded origin server on 127.0.0.1 that records what it receives.
pub struct Origin {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Origin {
    /// Answers every request with `200 OK` and a body naming the request target.
    pub fn echo() -> Origin {
        Self::echo_ending("")
    }

    /// `echo` with `end` after each body (`"\n"`: a line reader sees each body whole).
    pub fn echo_ending(end: &'static str) -> Origin {
        Self::start(Arc::new(move |req: &Received, s: &mut TcpStream| {
            let body = format!("origin saw {}{end}", req.target());
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            Keep::Open
        }))
    }

    pub fn start(handler: Arc<Handler>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        thread::spawn(move || {
            let mut conn_no = 0;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                conn_no += 1;
                let handler = handler.clone();
                let rec = rec.clone();
                let conn = conn_no;
                thread::spawn(move || serve_origin(stream, conn, &*handler, &rec));
            }
        });
        Origin { addr, received }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until the origin has seen `n` requests.
    pub fn wait_requests(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "origin saw {} of {n} requests",
                r.len()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn serve_origin(mut s: TcpStream, conn: usize, handler: &Handler, rec: &Mutex<Vec<Received>>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    // Handlers may write a response in pieces; without this, Nagle holds the last piece back
    // until the gateway's delayed ACK.
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 65536];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut req = Received {
            conn,
            head,
            raw_body: Vec::new(),
        };
        let body_len = if req
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                if let Some((_, used)) = decode_chunked(&buf) {
                    break used;
                }
                let mut chunk = [0u8; 65536];
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        } else {
            let n: usize = req
                .header("content-length")
                .map_or(0, |v| v.parse().unwrap());
            while buf.len() < n {
                let mut chunk = [0u8; 65536];
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            n
        };
        req.raw_body = buf.drain(..body_len).collect();
        rec.lock().unwrap().push(req.clone());
        match handler(&req, &mut s) {
            Keep::Open => {}
            Keep::Close => {
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            Keep::Reset => {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                return;
            }
        }
    }
}

/// `head` without its one `Date` line, which must be an IMF-fixdate within a minute of now:
/// the gateway adds one to an answer whose upstream sent none (RFC 9110 6.6.1).
pub fn undated(head: &str) -> String {
    let dates: Vec<&str> = head.lines().filter(|l| l.starts_with("Date: ")).collect();
    assert_eq!(dates.len(), 1, "{head}");
    let when = httpdate::parse_http_date(&dates[0]["Date: ".len()..]).expect("an IMF-fixdate");
    let skew = when
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "{head}");
    head.lines()
        .filter(|l| !l.starts_with("Date: "))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// A loopback port with nothing listening on it (bound, then closed).
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A config with one listener on port 0 and one catch-all route to `origin`, plus `extra`
/// TOML appended.
pub fn proxy_config(origin: SocketAddr, extra: &str) -> String {
    format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[upstreams]]\nid = \"origin\"\ntargets = [{{ address = \"{origin}\" }}]\n\n[[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"origin\"\n\n{extra}"
    )
}

/// `proxy_config` with request ids and trace context off: for the tests that assert the exact
/// bytes of forwarded heads (`access_log.rs` tests those fields on the same paths).
pub fn framing_config(origin: SocketAddr, extra: &str) -> String {
    format!(
        "{}
[tracing]
request_id = false
traceparent = false
",
        proxy_config(origin, extra)
    )
}

impl Gateway {
    /// One admin API request with the test token; `body` is sent as JSON.
    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.admin_with(
            method,
            path,
            body,
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
    }

    /// One admin API request with exactly the extra `headers` given (plus Content-Type for
    /// a body unless `headers` names one).
    pub fn admin_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut c = Client::connect(self.admin);
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                req.push_str("Content-Type: application/json\r\n");
            }
            req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
        } else {
            req.push_str("\r\n");
        }
        c.send(req.as_bytes());
        c.read_response_to(method)
    }
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// What one curl run gave: its exit status, the body, the last line (what `-w` wrote) and
/// stderr.
pub struct CurlOut {
    pub code: Option<i32>,
    pub body: String,
    pub last: String,
    pub stderr: String,
}

/// Runs `curl -sS --max-time MAX_S -w "\nWRITE_OUT" ARGS...`; `for_what` names the tests
/// that need curl, for the message if it is missing.
pub fn curl_run(max_s: u32, write_out: &str, args: &[&str], for_what: &str) -> CurlOut {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", &max_s.to_string(), "-w"])
        .arg(format!("\n{write_out}"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("curl is needed for {for_what}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", ""));
    CurlOut {
        code: out.status.code(),
        body: body.to_owned(),
        last: last.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The access log's lines once there are at least `n` (whole: the file ends with a line
/// end), each parsed: a torn line fails here.
pub fn wait_log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let count = text.lines().count();
        if count >= n && text.ends_with('\n') {
            return text
                .lines()
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("torn or invalid line {l:?}: {e}"))
                })
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{count} of {n} lines in {}:\n{text}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs openssl with `args` in `dir`, which must succeed.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI (Debian openssl) is needed: scripts/test installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed P-256 CA in `dir` (`ca.pem`, `ca.key`).
pub fn make_ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// `NAME.key` and `NAME.pem` in `dir`: a P-256 certificate for the subject `/CN=cn` with the
/// subjectAltName `san` (`IP:127.0.0.1`, `DNS:a,DNS:b`), signed by the CA [`make_ca`] made
/// there.
pub fn signed_leaf(dir: &std::path::Path, name: &str, cn: &str, san: &str) {
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// The start of a Python `h2` client script for [`run_h2_client`]: `s`, a socket to the
/// address given as its argument, and `c`, a client connection on it (outbound fields not
/// validated, so that a test may send what a client should not), its preface sent.
const H2_CLIENT_START: &str = r#"
import socket, sys, time
import h2.config, h2.connection
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                         validate_outbound_headers=False))
c.initiate_connection()
s.sendall(c.data_to_send())
"#;

/// Runs `steps`, Python with `s` and `c` of [`H2_CLIENT_START`], against `addr` (PyPI
/// `h2`); panics with its errors if it fails.
pub fn run_h2_client(addr: impl std::fmt::Display, steps: &str) {
    let script = format!("{H2_CLIENT_START}{steps}\ntime.sleep(0.5)\ns.close()\n");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(addr.to_string())
        .output()
        .expect("python3 with the PyPI package h2 (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback listener whose accept queue is full (it never accepts): connects to its address
/// hang until their timeout. Keep the value: dropped, the queue empties.
pub struct StuckTarget {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

impl StuckTarget {
    pub fn start() -> StuckTarget {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let fillers = (0..4)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()
            })
            .collect();
        StuckTarget {
            addr,
            _socket: socket,
            _fillers: fillers,
        }
    }
}

/// A data directory at `data` holding `text`, a config a build with looser rules stored
/// and this one refuses as new (asserted).
pub fn stored_by_an_earlier_build(data: &std::path::Path, text: &str) {
    let config = common::parse_config(text, common::Format::Toml).unwrap();
    assert!(
        common::Snapshot::compile(config.clone(), 1).is_err(),
        "strict today"
    );
    controlplane::store::LocalStore::create(data, config, "an earlier build").unwrap();
}
