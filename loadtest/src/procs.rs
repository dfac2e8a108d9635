//! The processes under test: a static origin (nginx), the gateway, nginx and HAProxy as
//! reverse proxies, each pinned with `taskset`, each with the same worker count; plus CPU time
//! and RSS read from `/proc` for a process and its descendants.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Bodies the origin serves, by URL path.
pub const BODIES: [(&str, usize); 3] = [("13b", 13), ("4k", 4096), ("64k", 65536)];

/// The content of a body: 13 bytes are "Hello, world!", the others a repeating pattern.
pub fn body_bytes(len: usize) -> Vec<u8> {
    if len == 13 {
        return b"Hello, world!".to_vec();
    }
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A free loopback port (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The processes the harness started and has not yet stopped, and the cgroups it made and has
/// not yet removed: what a signal that stops the harness must clean up.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static CGROUPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// `program`, to be stopped with the harness: it gets SIGTERM when the harness's thread that
/// starts it ends, whatever ends it (`PR_SET_PDEATHSIG`; SIGKILL included). Every process is
/// started from the main thread, which ends only with the harness.
pub fn command(program: &str) -> Command {
    let parent = std::process::id();
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only async-signal-safe calls: prctl(2) and getppid(2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The harness may have gone before the request above: then it would never come.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the harness has exited"));
            }
            Ok(())
        });
    }
    cmd
}

/// The write end of the pipe [`on_signal`] reports a signal through.
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; the byte outlives the call.
    unsafe {
        libc::write(fd, (&byte as *const u8).cast(), 1);
    }
}

/// On SIGINT, SIGTERM or SIGHUP, stops every process the harness started (SIGTERM, then
/// SIGKILL after 5 s), removes its cgroups, and exits with 128 + the signal's number. Ctrl-C
/// reaches the children too, but not the cgroups; `kill PID` or `timeout` reach the harness
/// alone, and its children outlived it.
pub fn stop_on_signals() -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills the two descriptors of `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    SIGNAL_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    let read_end = fds[0];
    std::thread::spawn(move || {
        let mut byte = 0u8;
        // SAFETY: read(2) into a byte that lives on this thread's stack; blocks until a
        // signal's handler writes.
        let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            stop_everything(i32::from(byte));
        }
    });
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a handler that only writes to a pipe; `sa` is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                bail!("sigaction: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn stop_everything(sig: i32) -> ! {
    eprintln!("loadtest: signal {sig}: stopping the processes it started");
    let pids = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for &pid in &pids {
        // SAFETY: kill(2) on a child of ours not yet reaped (registered until then).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = pids;
    while !left.is_empty() {
        let kill = Instant::now() >= deadline;
        left.retain(|&pid| {
            // SAFETY: kill(2) and waitpid(2) on our own child.
            unsafe {
                if kill {
                    libc::kill(pid, libc::SIGKILL);
                }
                let mut status = 0;
                let flags = if kill { 0 } else { libc::WNOHANG };
                libc::waitpid(pid, &mut status, flags) == 0
            }
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    let dirs = CGROUPS.lock().map(|l| l.clone()).unwrap_or_default();
    for dir in dirs {
        remove_cgroup(&dir);
    }
    std::process::exit(128 + sig)
}

/// A running process, stopped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    /// The gateway's admin API.
    pub admin: Option<SocketAddr>,
    child: Child,
    /// The cgroup the process runs in, where the harness could make one.
    cgroup: Option<Cgroup>,
    /// Processes this one needs (the Redis of `gateway+cluster`, the etcd of
    /// `gateway+etcd`), stopped after it.
    sidecars: Vec<Proc>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// CPU seconds used so far by the process, its descendants and its sidecars (a row's
    /// Redis or etcd does work for it, on the same CPUs): its cgroup's, in nanoseconds, where
    /// it has one, else from `/proc` in clock ticks.
    pub fn cpu_seconds(&self) -> f64 {
        let own = match self.cgroup().and_then(Cgroup::cpu_ns) {
            Some(ns) => ns as f64 / 1e9,
            None => cpu_seconds(self.pid()),
        };
        own + self.sidecars.iter().map(Proc::cpu_seconds).sum::<f64>()
    }

    /// Where [`Proc::cpu_seconds`] reads the time, for the report.
    pub fn cpu_clock(&self) -> &'static str {
        match self.cgroup() {
            Some(c) => c.kind.describe(),
            None => "/proc/PID/stat, clock ticks",
        }
    }

    /// The process's cgroup, if it joined it (the wrapper starts it anyway when it cannot).
    fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref().filter(|c| c.holds(self.pid()))
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = false;
        while !done && Instant::now() < deadline {
            done = matches!(self.child.try_wait(), Ok(Some(_)));
            if !done {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let pid = self.pid();
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|&p| p != pid);
        }
    }
}

/// Which cgroup interface a [`Cgroup`] is read through.
#[derive(Debug, Clone, Copy)]
enum CgroupKind {
    /// v1 `cpuacct`: `cpuacct.usage`, nanoseconds.
    V1,
    /// v2: `cpu.stat`'s `usage_usec` (there whether or not the cpu controller is on).
    V2,
}

impl CgroupKind {
    fn describe(self) -> &'static str {
        match self {
            CgroupKind::V1 => "cgroup v1 cpuacct.usage, ns",
            CgroupKind::V2 => "cgroup v2 cpu.stat usage_usec",
        }
    }
}

/// A cgroup of one process tree's own, read for its CPU time: the scheduler's count (in
/// nanoseconds, v2 in microseconds), including threads that have exited (io_uring's
/// workers among them), where `/proc` gives clock ticks of 10 ms. Made beside the harness's
/// own cgroup where it may (root, or a delegated hierarchy); removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    kind: CgroupKind,
}

impl Cgroup {
    /// A new cgroup for `name`, or `None` where none can be made (the caller then reads
    /// `/proc`).
    fn create(name: &str) -> Option<Cgroup> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let leaf = format!("loadtest-{}-{n}-{name}", std::process::id());
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        // "ID:CONTROLLERS:PATH" lines: v1's cpuacct line, then v2's "0::" line.
        let path_of = |want: &dyn Fn(&str) -> bool| {
            own.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
                want(controllers).then(|| path.trim_start_matches('/').to_owned())
            })
        };
        let mut places = Vec::new();
        if let Some(p) = path_of(&|c| c.split(',').any(|c| c == "cpuacct")) {
            for mount in ["/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct"] {
                places.push((Path::new(mount).join(&p), CgroupKind::V1));
            }
        }
        if let Some(p) = path_of(&|c| c.is_empty()) {
            for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                if Path::new(mount).join("cgroup.procs").exists() {
                    places.push((Path::new(mount).join(&p), CgroupKind::V2));
                }
            }
        }
        places.into_iter().find_map(|(parent, kind)| {
            let dir = parent.join(&leaf);
            std::fs::create_dir(&dir).ok()?;
            if let Ok(mut all) = CGROUPS.lock() {
                all.push(dir.clone());
            }
            let c = Cgroup { dir, kind };
            // Dropped (removed) if it cannot be read.
            c.cpu_ns().map(|_| c)
        })
    }

    /// Whether process `pid` is in the cgroup.
    fn holds(&self, pid: i32) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
    }

    /// CPU time of every task that ran in the cgroup, in nanoseconds.
    fn cpu_ns(&self) -> Option<u64> {
        match self.kind {
            CgroupKind::V1 => std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok(),
            CgroupKind::V2 => std::fs::read_to_string(self.dir.join("cpu.stat"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse::<u64>()
                .ok()
                .map(|us| us * 1000),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.dir);
        if let Ok(mut all) = CGROUPS.lock() {
            all.retain(|d| *d != self.dir);
        }
    }
}

/// Removes a cgroup's directory: possible once its last task has gone, which may take a
/// moment after the process it was made for has been reaped (nginx's workers exit after
/// their master is told).
fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `program` on `cpus`, in a cgroup of its own where one can be made (it joins it
/// before it runs, so every thread and child it makes is counted).
fn spawn_pinned(
    name: &str,
    cpus: &str,
    program: &str,
    args: &[&str],
    log: &Path,
    env: &[(&str, &str)],
) -> Result<(Child, Option<Cgroup>)> {
    let log_file = std::fs::File::create(log)?;
    let cgroup = Cgroup::create(name);
    let mut cmd = match &cgroup {
        Some(c) => {
            let mut cmd = command("sh");
            // Joined where it may be (a security module or a delegation may refuse it: the
            // process then runs outside, and is timed from `/proc`).
            cmd.arg("-c")
                .arg("echo $$ 2>/dev/null > \"$0\"; exec \"$@\"")
                .arg(c.dir.join("cgroup.procs"))
                .arg("taskset");
            cmd
        }
        None => command("taskset"),
    };
    cmd.arg("-c").arg(cpus).arg(program).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({program}); is it installed?"))?;
    if let Ok(mut live) = LIVE.lock() {
        live.push(child.id() as i32);
    }
    Ok((child, cgroup))
}

/// Waits until `addr` accepts connections.
fn wait_listening(name: &str, addr: SocketAddr, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{name} did not listen on {addr}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Where config files and logs of one run go.
#[derive(Debug, Clone)]
pub struct Workdir(pub PathBuf);

impl Workdir {
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// Starts nginx serving the three bodies with keep-alive.
pub fn start_origin(dir: &Workdir, workers: usize, cpus: &str) -> Result<Proc> {
    let www = dir.file("www");
    std::fs::create_dir_all(&www)?;
    for (name, len) in BODIES {
        std::fs::write(www.join(name), body_bytes(len))?;
    }
    let port = free_port()?;
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\nmaster_process on;\nworker_rlimit_nofile 65536;\n\
         error_log {err} warn;\npid {pid};\nevents {{ worker_connections 30000; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
           keepalive_requests 10000000;\n  keepalive_timeout 120s;\n  default_type application/octet-stream;\n  open_file_cache max=64 inactive=600s;\n  open_file_cache_valid 600s;\n\
           client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n\
           server {{\n    listen 127.0.0.1:{port} reuseport;\n    listen 127.0.0.2:{port} reuseport;\n    root {www};\n  }}\n}}\n",
        err = dir.file("origin.err").display(),
        pid = dir.file("origin.pid").display(),
        tmp = dir.file("tmp").display(),
        www = www.display(),
    );
    start_nginx(dir, "origin", &conf, port, cpus)
}

/// Starts one nginx answering on a port per body with that body as `application/json`;
/// returns it with the ports' addresses.
pub fn start_json_origins(
    dir: &Workdir,
    bodies: &[Vec<u8>],
    cpus: &str,
) -> Result<(Proc, Vec<SocketAddr>)> {
    let mut servers = String::new();
    let mut addrs = Vec::new();
    for body in bodies {
        let text = String::from_utf8_lossy(body);
        if text.contains(['\'', '\\']) {
            bail!("a JSON origin body cannot hold ' or \\");
        }
        let port = free_port()?;
        addrs.push(format!("127.0.0.1:{port}").parse()?);
        servers.push_str(&format!(
            "  server {{\n    listen 127.0.0.1:{port} reuseport;\n    location / {{\n      default_type application/json;\n      return 200 '{text}';\n    }}\n  }}\n"
        ));
    }
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\nworker_rlimit_nofile 65536;\n\
         error_log {err} warn;\npid {pid};\nevents {{ worker_connections 30000; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 120s;\n\
         client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n{servers}}}\n",
        err = dir.file("json-origin.err").display(),
        pid = dir.file("json-origin.pid").display(),
        tmp = dir.file("tmp").display(),
    );
    let first = addrs.first().map_or(0, |a: &SocketAddr| a.port());
    let p = start_nginx(dir, "json-origin", &conf, first, cpus)?;
    Ok((p, addrs))
}

/// The CPUs of a `taskset` list (`0,2-4`), in order.
pub fn cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b) = (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0));
            a..=b.max(a)
        })
        .collect()
}

/// nginx's `worker_cpu_affinity` pinning each of `workers` workers to one CPU of `cpus`, as
/// the gateway pins its workers (none for one worker: `taskset` pins it already).
fn nginx_affinity(workers: usize, cpus: &str) -> String {
    let list = cpu_list(cpus);
    if workers < 2 || list.is_empty() {
        return String::new();
    }
    let top = list.iter().max().copied().unwrap_or(0);
    let masks: Vec<String> = (0..workers)
        .map(|w| {
            let cpu = list[w % list.len()];
            (0..=top)
                .rev()
                .map(|c| if c == cpu { '1' } else { '0' })
                .collect()
        })
        .collect();
    format!("worker_cpu_affinity {};\n", masks.join(" "))
}

/// HAProxy's `cpu-map` pinning each of `workers` threads to one CPU of `cpus` (none for
/// one thread).
fn haproxy_cpu_map(workers: usize, cpus: &str) -> String {
    let list = cpu_list(cpus);
    if workers < 2 || list.is_empty() {
        return String::new();
    }
    (0..workers)
        .map(|t| format!("  cpu-map 1/{} {}\n", t + 1, list[t % list.len()]))
        .collect()
}

pub fn start_nginx(dir: &Workdir, name: &str, conf: &str, port: u16, cpus: &str) -> Result<Proc> {
    std::fs::create_dir_all(dir.file("tmp"))?;
    let path = dir.file(&format!("{name}.nginx.conf"));
    std::fs::write(&path, conf)?;
    let log = dir.file(&format!("{name}.log"));
    let (child, cgroup) = spawn_pinned(
        name,
        cpus,
        "nginx",
        &[
            "-p",
            &dir.0.display().to_string(),
            "-c",
            &path.display().to_string(),
        ],
        &log,
        &[],
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let p = Proc {
        name: name.to_owned(),
        addr,
        admin: None,
        child,
        cgroup,
        sidecars: Vec::new(),
    };
    wait_listening(name, addr, &log)?;
    Ok(p)
}

/// Which reverse proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No proxy: wrk straight at the origin, as the ceiling.
    Direct,
    Gateway,
    /// The gateway with an API-key and a rate-limit policy on its route (the limit is high
    /// enough never to refuse): what those policies cost per request.
    GatewayPolicies,
    /// `gateway+policies` with the rate limit counted for a cluster on Redis (`scope =
    /// "cluster"`, a redis-server the harness starts): what cluster limits cost per request
    /// beside node limits.
    GatewayCluster,
    /// The plain gateway with its config in etcd (`--store`, an etcd the harness starts)
    /// instead of its data directory: what the shared store costs per request (nothing is
    /// expected: the data plane reads the same snapshot).
    GatewayEtcd,
    /// `gateway+cluster` with its config in etcd: the cluster layout in full.
    GatewayEtcdCluster,
    /// The gateway with its access log on, every request written to a file: what the log
    /// costs per request.
    GatewayLog,
    /// The gateway with `[relay] splice = true`: large response bodies spliced through a pipe
    /// instead of copied through user space; the A/B of the splice setting at large bodies.
    GatewaySplice,
    /// Another gateway binary (`--baseline PATH`) with the plain gateway's config: an A/B of
    /// two builds inside one interleaved run.
    GatewayBaseline,
    /// The `--baseline` binary with `gateway+log`'s config: the A/B of what the access log
    /// costs in two builds.
    GatewayBaselineLog,
    /// Two targets (the origin on 127.0.0.1 and on 127.0.0.2), weighted round robin: the
    /// reference for the balancing and health-check rows.
    GatewayRr2,
    /// Two targets, `balance = "least_request"`.
    GatewayLeastRequest,
    /// Two targets, `balance = "hash"` on the path.
    GatewayHash,
    /// Two targets, round robin, an active health check on each every second.
    GatewayHealth,
    Nginx,
    Haproxy,
    /// nginx as an operator serving large answers tunes it: `proxy_buffer_size 64k;
    /// proxy_buffers 4 64k;`.
    NginxTuned,
    /// HAProxy with `tune.bufsize 65536`.
    HaproxyTuned,
    /// HAProxy in `mode tcp` with 64 KiB buffers and splicing: a relay that parses nothing,
    /// the reference for what the kernel's part costs (not a peer: it does no HTTP).
    L4Relay,
}

impl Kind {
    /// Rows that run another gateway binary (`--baseline`).
    pub fn is_baseline(self) -> bool {
        matches!(self, Kind::GatewayBaseline | Kind::GatewayBaselineLog)
    }

    /// Rows with the access log on.
    pub fn logs(self) -> bool {
        matches!(self, Kind::GatewayLog | Kind::GatewayBaselineLog)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "origin-direct",
            Kind::Gateway => "gateway",
            Kind::GatewayPolicies => "gateway+policies",
            Kind::GatewayCluster => "gateway+cluster",
            Kind::GatewayEtcd => "gateway+etcd",
            Kind::GatewayEtcdCluster => "gateway+etcd+cluster",
            Kind::GatewayLog => "gateway+log",
            Kind::GatewaySplice => "gateway+splice",
            Kind::GatewayBaseline => "gateway-baseline",
            Kind::GatewayBaselineLog => "gateway-baseline+log",
            Kind::GatewayRr2 => "gateway+rr2",
            Kind::GatewayLeastRequest => "gateway+least_request",
            Kind::GatewayHash => "gateway+hash",
            Kind::GatewayHealth => "gateway+health",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::NginxTuned => "nginx+buf64k",
            Kind::HaproxyTuned => "haproxy+buf64k",
            Kind::L4Relay => "l4-relay",
        }
    }

    pub fn parse(s: &str) -> Result<Kind> {
        Ok(match s {
            "gateway" => Kind::Gateway,
            "gateway+policies" => Kind::GatewayPolicies,
            "gateway+cluster" => Kind::GatewayCluster,
            "gateway+etcd" => Kind::GatewayEtcd,
            "gateway+etcd+cluster" => Kind::GatewayEtcdCluster,
            "gateway+log" => Kind::GatewayLog,
            "gateway+splice" => Kind::GatewaySplice,
            "gateway-baseline" => Kind::GatewayBaseline,
            "gateway-baseline+log" => Kind::GatewayBaselineLog,
            "gateway+rr2" => Kind::GatewayRr2,
            "gateway+least_request" => Kind::GatewayLeastRequest,
            "gateway+hash" => Kind::GatewayHash,
            "gateway+health" => Kind::GatewayHealth,
            "nginx" => Kind::Nginx,
            "haproxy" => Kind::Haproxy,
            "nginx+buf64k" => Kind::NginxTuned,
            "haproxy+buf64k" => Kind::HaproxyTuned,
            "l4-relay" => Kind::L4Relay,
            other => bail!(
                "unknown proxy {other:?} (gateway, gateway+policies, gateway+cluster, gateway+etcd, \
                 gateway+etcd+cluster, gateway+log, gateway+splice, gateway-baseline, \
                 gateway-baseline+log, gateway+rr2, gateway+least_request, gateway+hash, gateway+health, nginx, haproxy, \
                 nginx+buf64k, haproxy+buf64k, l4-relay)"
            ),
        })
    }
}

/// The config table of the `gateway+splice` row.
pub const SPLICE_RELAY: &str = "[relay]\nsplice = true\n";

/// The admin token the harness gives the gateway.
pub const ADMIN_TOKEN: &str = "loadtest-admin-token-0123456789";

/// The API key every wrk run sends (proxies other than `gateway+policies` ignore it).
pub const API_KEY: &str = "loadtest-api-key-0001";

/// Gateway config text for `workers` workers in front of `origin`, its admin API on
/// `admin_port`; with `policies`, the route requires an API key and counts requests against
/// a per-client-IP rate limit that never refuses at these rates; with `access_log`, every
/// request is logged to that file; `balance` (the rows with two targets) gives the second
/// target (the origin on 127.0.0.2) and the upstream's balancing and health settings;
/// `cluster_redis`: the rate limit is cluster-scoped on the Redis at that port.
#[allow(clippy::too_many_arguments)]
pub fn gateway_config(
    port: u16,
    admin_port: u16,
    workers: usize,
    origin: SocketAddr,
    policies: bool,
    access_log: Option<&Path>,
    balance: Option<&str>,
    cluster_redis: Option<u16>,
) -> String {
    let mut s = String::new();
    let targets = match balance {
        None => format!("{{ address = \"{origin}\" }}"),
        Some(_) => format!(
            "{{ address = \"{origin}\" }}, {{ address = \"127.0.0.2:{}\" }}",
            origin.port()
        ),
    };
    let _ = write!(
        s,
        "workers = {workers}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n[[upstreams]]\nid = \"origin\"\n\
         targets = [{targets}]\n{}\n[upstream_pool]\nmax_idle_per_target = 1024\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"origin\"\n",
        balance.unwrap_or("")
    );
    if policies {
        let _ = write!(
            s,
            "policies = [\"key-auth\", \"per-ip-limit\"]\n\
             [[consumers]]\nid = \"loadtest\"\n\
             [[credentials]]\nid = \"loadtest-key\"\nconsumer = \"loadtest\"\nkind = \"api_key\"\nkey = \"{API_KEY}\"\n\
             [[policies]]\nid = \"key-auth\"\nkind = \"api_key\"\nheader = \"X-Api-Key\"\n\
             [[policies]]\nid = \"per-ip-limit\"\nkind = \"rate_limit\"\nrate = 1000000000\nburst = 1000000000\nkey = \"client_ip\"\n"
        );
        if let Some(redis) = cluster_redis {
            let _ = write!(
                s,
                "scope = \"cluster\"\n[cluster]\nnode_id = \"loadtest\"\nredis = \"redis://127.0.0.1:{redis}\"\n"
            );
        }
    }
    if let Some(path) = access_log {
        let _ = write!(s, "[access_log]\npath = \"{}\"\n", path.display());
    }
    let _ = write!(
        s,
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n"
    );
    s
}

/// Starts a redis-server on a free loopback port (no persistence), pinned to `cpus`.
fn start_redis(dir: &Workdir, cpus: &str) -> Result<Proc> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = dir.file("redis.log");
    let (child, cgroup) = spawn_pinned(
        "redis-server",
        cpus,
        "redis-server",
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        &log,
        &[],
    )?;
    let p = Proc {
        name: "redis".into(),
        addr,
        admin: None,
        child,
        cgroup,
        sidecars: Vec::new(),
    };
    wait_listening("redis", addr, &log)?;
    Ok(p)
}

/// Starts an etcd server (`name`) on free loopback ports with its data under `dir`, pinned
/// to `cpus`.
fn start_etcd(dir: &Workdir, cpus: &str, name: &str) -> Result<Proc> {
    let port = free_port()?;
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let client = format!("http://127.0.0.1:{port}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = dir.file(&format!("{name}.log"));
    let data = dir.file(&format!("{name}-data"));
    let _ = std::fs::remove_dir_all(&data);
    let (child, cgroup) = spawn_pinned(
        "etcd",
        cpus,
        "etcd",
        &[
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("default={peer}"),
        ],
        &log,
        &[],
    )?;
    let p = Proc {
        name: "etcd".into(),
        addr,
        admin: None,
        child,
        cgroup,
        sidecars: Vec::new(),
    };
    wait_listening("etcd", addr, &log)?;
    Ok(p)
}

/// Starts the gateway `bin` on the config file `conf` (which listens on `addr`, its admin API
/// on `admin_port`), pinned to `cpus`; with `store`, the config is shared through that etcd
/// store and `conf` is the node file.
#[allow(clippy::too_many_arguments)]
pub fn start_gateway(
    dir: &Workdir,
    bin: &Path,
    cpus: &str,
    name: &str,
    conf: &Path,
    addr: SocketAddr,
    admin_port: u16,
    store: Option<&str>,
) -> Result<Proc> {
    let log = dir.file(&format!("{name}.log"));
    let data = dir.file(&format!("{name}-data"));
    let (conf, data) = (conf.display().to_string(), data.display().to_string());
    let mut args = vec!["--config", &conf, "--data-dir", &data];
    if let Some(url) = store {
        args.extend(["--store", url]);
    }
    let (child, cgroup) = spawn_pinned(
        "gateway",
        cpus,
        &bin.display().to_string(),
        &args,
        &log,
        &[],
    )?;
    let p = Proc {
        name: name.into(),
        addr,
        admin: Some(format!("127.0.0.1:{admin_port}").parse()?),
        child,
        cgroup,
        sidecars: Vec::new(),
    };
    wait_listening(name, addr, &log)?;
    Ok(p)
}

/// Starts one reverse proxy in front of `origin`.
pub fn start_proxy(
    kind: Kind,
    dir: &Workdir,
    gateway_bin: &Path,
    workers: usize,
    cpus: &str,
    origin: SocketAddr,
) -> Result<Proc> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    match kind {
        Kind::Direct => bail!("the origin is not started as a proxy"),
        Kind::Gateway
        | Kind::GatewayPolicies
        | Kind::GatewayCluster
        | Kind::GatewayEtcd
        | Kind::GatewayEtcdCluster
        | Kind::GatewayLog
        | Kind::GatewaySplice
        | Kind::GatewayBaseline
        | Kind::GatewayBaselineLog
        | Kind::GatewayRr2
        | Kind::GatewayLeastRequest
        | Kind::GatewayHash
        | Kind::GatewayHealth => {
            let name = kind.name();
            let conf = dir.file(&format!("{name}.toml"));
            let admin_port = free_port()?;
            let access_log = dir.file(&format!("{name}-access.log"));
            let cluster = matches!(kind, Kind::GatewayCluster | Kind::GatewayEtcdCluster);
            let redis = match cluster {
                true => Some(start_redis(dir, cpus)?),
                false => None,
            };
            let etcd = match kind {
                Kind::GatewayEtcd | Kind::GatewayEtcdCluster => {
                    Some(start_etcd(dir, cpus, &format!("{name}-etcd"))?)
                }
                _ => None,
            };
            let text = gateway_config(
                port,
                admin_port,
                workers,
                origin,
                kind == Kind::GatewayPolicies || cluster,
                kind.logs().then_some(access_log.as_path()),
                match kind {
                    Kind::GatewayRr2 => Some(""),
                    Kind::GatewayLeastRequest => Some("balance = \"least_request\""),
                    Kind::GatewayHash => Some("balance = \"hash\"\nhash_on = \"path\""),
                    Kind::GatewayHealth => Some(
                        "health_check = { path = \"/\", interval_ms = 1000, expect_status = [200, 403, 404] }",
                    ),
                    _ => None,
                },
                redis.as_ref().map(|r| r.addr.port()),
            );
            let text = match kind {
                Kind::GatewaySplice => format!("{text}{SPLICE_RELAY}"),
                _ => text,
            };
            let (text, store) = match &etcd {
                // The node file seeds the empty store with everything but its node settings.
                Some(e) => {
                    let node = if cluster {
                        text
                    } else {
                        format!("{text}[cluster]\nnode_id = \"loadtest\"\n")
                    };
                    (node, Some(format!("etcd://{}/loadtest", e.addr)))
                }
                None => (text, None),
            };
            std::fs::write(&conf, text)?;
            let mut gw = start_gateway(
                dir,
                gateway_bin,
                cpus,
                name,
                &conf,
                addr,
                admin_port,
                store.as_deref(),
            )?;
            gw.sidecars.extend(redis);
            gw.sidecars.extend(etcd);
            Ok(gw)
        }
        Kind::Nginx | Kind::NginxTuned => {
            let (name, buffers) = if kind == Kind::NginxTuned {
                (
                    "nginx-tuned-proxy",
                    "      proxy_buffer_size 64k;\n      proxy_buffers 4 64k;\n",
                )
            } else {
                ("nginx-proxy", "")
            };
            let conf = format!(
                "worker_processes {workers};\n{affinity}daemon off;\nmaster_process on;\nworker_rlimit_nofile 65536;\n\
                 error_log {err} warn;\npid {pid};\nevents {{ worker_connections 30000; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 120s;\n\
                   client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n\
                   upstream origin {{\n    server {origin};\n    keepalive 1024;\n    keepalive_requests 10000000;\n  }}\n\
                   server {{\n    listen 127.0.0.1:{port} reuseport;\n    location / {{\n      proxy_pass http://origin;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n{buffers}    }}\n  }}\n}}\n",
                err = dir.file(&format!("{name}.err")).display(),
                pid = dir.file(&format!("{name}.pid")).display(),
                tmp = dir.file("tmp").display(),
                affinity = nginx_affinity(workers, cpus),
            );
            start_nginx(dir, name, &conf, port, cpus)
        }
        Kind::Haproxy | Kind::HaproxyTuned | Kind::L4Relay => {
            let (name, tune, mode) = match kind {
                Kind::HaproxyTuned => (
                    "haproxy-tuned",
                    "  tune.bufsize 65536\n",
                    "mode http\n  http-reuse always",
                ),
                // Its best form: 64 KiB buffers and splice(2) between the sockets where the
                // kernel allows, so bodies need not pass through user space at all.
                Kind::L4Relay => (
                    "l4-relay",
                    // Pipes within the file limit (two descriptors each).
                    "  tune.bufsize 65536\n  maxpipes 256\n",
                    "mode tcp\n  option splice-auto",
                ),
                _ => ("haproxy", "", "mode http\n  http-reuse always"),
            };
            let cpu_map = haproxy_cpu_map(workers, cpus);
            let conf = format!(
                "global\n  nbthread {workers}\n{cpu_map}  maxconn 9000\n{tune}\ndefaults\n  {mode}\n  timeout connect 5s\n\
                 timeout client 120s\n  timeout server 120s\n\n\
                 frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\n\
                 backend be\n  server origin {origin}\n"
            );
            let path = dir.file(&format!("{name}.cfg"));
            std::fs::write(&path, conf)?;
            let log = dir.file(&format!("{name}.log"));
            let (child, cgroup) = spawn_pinned(
                name,
                cpus,
                "haproxy",
                &["-f", &path.display().to_string(), "-db"],
                &log,
                &[],
            )?;
            let p = Proc {
                name: name.into(),
                addr,
                admin: None,
                child,
                cgroup,
                sidecars: Vec::new(),
            };
            wait_listening(name, addr, &log)?;
            Ok(p)
        }
    }
}

/// Process ids of `root` and all its descendants.
fn tree(root: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(fields) = stat_fields(pid) {
                if let Some(ppid) = fields.get(1).and_then(|p| p.parse().ok()) {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name (field 3 onwards: state, ppid, ...).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds used so far by `root` and its descendants (utime + stime, plus the
/// cutime + cstime of children that already exited).
pub fn cpu_seconds(root: i32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            // stat fields 14..17 are utime, stime, cutime, cstime; `f` starts at field 3.
            (11..15)
                .filter_map(|i| f.get(i)?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum::<f64>()
        / ticks
}

/// Resident memory of `root` and its descendants, in KiB.
pub fn rss_kib(root: i32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit / setrlimit with a valid rlimit struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            return lim.rlim_cur;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_tree_is_timed_in_its_own_cgroup_exited_children_included() {
        let dir = std::env::temp_dir().join(format!("loadtest-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("spin.log");
        // A child that burns CPU in a subshell that exits before the check.
        let script = "( i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done ); exec sleep 30";
        let (child, cgroup) = spawn_pinned("spin", "0", "sh", &["-c", script], &log, &[]).unwrap();
        let p = Proc {
            name: "spin".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
            admin: None,
            child,
            cgroup,
            sidecars: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // The loop's subshell has exited once `sleep` runs.
        let sleeping = || {
            tree(p.pid()).into_iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
        };
        while !sleeping() {
            assert!(Instant::now() < deadline, "the loop did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        let from_proc = cpu_seconds(p.pid());
        let cpu = p.cpu_seconds();
        // The cgroup the process joined (a refused join leaves it timed from /proc).
        match p.cgroup() {
            Some(c) => {
                assert!(c.dir.join("cgroup.procs").exists());
                assert_eq!(p.cpu_clock(), c.kind.describe());
                // The exited subshell's time is counted (`/proc` has it as the shell's
                // cutime once reaped: the same time, in ticks).
                assert!(cpu > 0.05, "{cpu} s");
                assert!(
                    (cpu - from_proc).abs() < 0.05 + cpu * 0.1,
                    "{cpu} against {from_proc}"
                );
                let made = c.dir.clone();
                drop(p);
                assert!(!made.exists(), "the cgroup is removed with its process");
            }
            // Where no cgroup can be made (not root, no writable hierarchy): /proc's ticks.
            None => {
                assert_eq!(p.cpu_clock(), "/proc/PID/stat, clock ticks");
                assert_eq!(cpu, from_proc);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peers_pin_one_worker_per_cpu_like_the_gateway() {
        assert_eq!(cpu_list("1,3-5"), [1, 3, 4, 5]);
        assert_eq!(nginx_affinity(1, "1-4"), "");
        assert_eq!(
            nginx_affinity(3, "1-3"),
            "worker_cpu_affinity 0010 0100 1000;\n"
        );
        assert_eq!(haproxy_cpu_map(1, "1"), "");
        assert_eq!(
            haproxy_cpu_map(2, "4,6"),
            "  cpu-map 1/1 4\n  cpu-map 1/2 6\n"
        );
    }
}
