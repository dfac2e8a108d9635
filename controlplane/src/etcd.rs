//! A small blocking client for etcd's v3 API through its JSON gateway over HTTP/1.1
//! (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, `/v3/lease/*`, `/v3/auth/authenticate`).
//! The gRPC API would need `protoc` at build time; the JSON gateway is part of every etcd
//! server since 3.3 and carries the same messages, with keys and values in base64 and 64-bit
//! numbers as strings.
//!
//! One request per connection (`Connection: close`): the config store writes rarely, and a
//! fresh connection after any failure is what a client must do anyway. The endpoints are
//! tried in turn, starting from the last one that answered. `etcds://` speaks TLS (rustls)
//! to the endpoints, verified against a CA file, with an optional client certificate.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use serde_json::{json, Value};

/// How long a connect may take, per endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a unary request may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer accepted (a config with its history is far smaller).
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// Longest a call's answer may take to come in whole (each read has `REQUEST_TIMEOUT`).
const CALL_WITHIN: Duration = Duration::from_secs(30);
/// Largest response head, and longest chunk-size line.
const MAX_HEAD: usize = 64 * 1024;
const MAX_CHUNK_LINE: u64 = 1024;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (connect, I/O or a 5xx): the store is unreachable.
    #[error("etcd unreachable: {0}")]
    Unavailable(String),
    /// etcd answered with an error (bad credentials, permission, bad request).
    #[error("etcd refused: {0}")]
    Refused(String),
    /// A write reached an endpoint, and its answer did not come back (or said the request
    /// timed out): whether it took effect is not known. Only [`Client::txn`] says so; it
    /// does not send the write again to another endpoint.
    #[error("etcd took the request, and its answer was lost: {0}")]
    Unknown(String),
}

/// TLS to the endpoints (`etcds://`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    /// PEM file of the CA(s) that sign etcd's certificate; default the system's bundle.
    pub ca: Option<PathBuf>,
    /// PEM files of a client certificate and its key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The system's CA bundle (Debian `ca-certificates`), used when `ca` is not given.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `etcd[s]://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/PREFIX[?ca=F&cert=F&key=F]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    pub endpoints: Vec<String>,
    /// Key prefix, with a leading and no trailing `/`.
    pub prefix: String,
    pub user: Option<(String, String)>,
    pub tls: Option<TlsFiles>,
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        // Messages show the URL without its password.
        let shown = common::redact_url(url);
        let usage = || {
            format!(
                "--store {shown:?}: expected etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT]/PREFIX \
                 or etcds://...?ca=FILE[&cert=FILE&key=FILE]"
            )
        };
        let (rest, tls) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
            (Some(r), _) => (r, None),
            (_, Some(r)) => (r, Some(TlsFiles::default())),
            _ => return Err(usage()),
        };
        // A piece of a URL with credentials is not shown: where they end is only guessed.
        let piece = |p: &str| match url.contains('@') {
            true => "(not shown: the URL has credentials)".to_owned(),
            false => format!("{p:?}"),
        };
        // The credentials end at the last `@` before the first `/` (a password may hold a
        // `?`, `#` or `@`); an `@` past it, in the prefix or in anything but an option's
        // file, is a password's with a raw `/` (or a prefix's, which may not have one):
        // refused before anything after it is read (or shown). The options start at the
        // first `?` after the credentials.
        let slash = rest.find('/').unwrap_or(rest.len());
        let options_at = rest[slash..].find('?').map_or(rest.len(), |q| slash + q);
        let file = |o: &str| ["ca=", "cert=", "key="].iter().any(|f| o.starts_with(f));
        let option_at = (rest.get(options_at + 1..).unwrap_or_default())
            .split('&')
            .any(|o| o.contains('@') && !file(o));
        if rest[slash..options_at].contains('@') || option_at {
            return Err(format!(
                "--store {shown:?}: write a '/', '@', ':' or '%' in the user or password \
                 as %2F, %40, %3A or %25 (a prefix holds no '@')"
            ));
        }
        let creds_end = rest[..slash].rfind('@').map_or(0, |at| at + 1);
        let (rest, query) = match rest[creds_end..].find('?') {
            Some(q) => (&rest[..creds_end + q], Some(&rest[creds_end + q + 1..])),
            None => (rest, None),
        };
        let mut tls = tls;
        if let Some(q) = query {
            let files = tls
                .as_mut()
                .ok_or_else(|| format!("--store {shown:?}: ?ca, ?cert and ?key need etcds://"))?;
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let slot = match k {
                    "ca" => &mut files.ca,
                    "cert" => &mut files.cert,
                    "key" => &mut files.key,
                    _ => return Err(format!("--store {shown:?}: unknown option {}", piece(k))),
                };
                if v.is_empty() {
                    return Err(format!("--store {shown:?}: {k} needs a file"));
                }
                *slot = Some(PathBuf::from(v));
            }
            if files.cert.is_some() != files.key.is_some() {
                return Err(format!("--store {shown:?}: cert and key go together"));
            }
        }
        let (authority, prefix) = match rest.split_once('/') {
            Some((a, p)) => (a, p.trim_end_matches('/')),
            None => (rest, ""),
        };
        let (user, hosts) = match authority.rsplit_once('@') {
            Some((creds, hosts)) => {
                let (u, p) = creds.split_once(':').ok_or_else(|| {
                    format!("--store {shown:?}: credentials must be USER:PASSWORD")
                })?;
                let decoded = |s: &str| {
                    common::snapshot::percent_decoded(s).ok_or_else(|| {
                        format!("--store {shown:?}: a '%' in the credentials starts %XX")
                    })
                };
                (Some((decoded(u)?, decoded(p)?)), hosts)
            }
            None => (None, authority),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(format!("--store {shown:?}: no endpoint"));
        }
        for e in &endpoints {
            match e.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => {
                    return Err(format!(
                        "--store {shown:?}: endpoint {} is not HOST:PORT",
                        piece(e)
                    ))
                }
            }
        }
        if prefix.is_empty() || prefix.split('/').any(str::is_empty) {
            return Err(format!(
                "--store {shown:?}: give a key prefix such as /gateway (without empty segments)"
            ));
        }
        Ok(StoreUrl {
            endpoints,
            prefix: format!("/{prefix}"),
            user,
            tls,
        })
    }

    /// The URL without its password, for logs and `/v1/status`.
    pub fn redacted(&self) -> String {
        let user = match &self.user {
            Some((u, _)) => format!("{u}:***@"),
            None => String::new(),
        };
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!(
            "{scheme}://{user}{}{}",
            self.endpoints.join(","),
            self.prefix
        )
    }

    /// The TLS client config for `etcds://`: the CA file (or the system's CAs) as roots, the
    /// client certificate if given.
    fn client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        let Some(files) = &self.tls else {
            return Ok(None);
        };
        let ca = files
            .ca
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CAS));
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&ca)
            .map_err(|e| format!("etcd CA file {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("etcd CA file {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("etcd CA file {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("etcd CA file {}: no certificate", ca.display()));
        }
        let builder = rustls::ClientConfig::builder_with_provider(common::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("etcd client cert {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("etcd client key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("etcd client cert: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// A connection to one endpoint, plain or TLS.
#[derive(Debug)]
struct Conn {
    io: ConnIo,
}

#[derive(Debug)]
enum ConnIo {
    Plain(Sock),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Sock>>),
}

/// The socket under a connection, and when reading from it must stop.
#[derive(Debug)]
struct Sock {
    stream: TcpStream,
    /// A call's answer must be read whole by then: each read has its own timeout, and an
    /// endpoint that sent a little at a time would otherwise hold the call (and the store's
    /// lock around it) for good. Looked at by every read of the socket, so that a TLS
    /// record trickled a byte at a time (which rustls reads in as many socket reads) is cut
    /// short too. `None` for a watch's stream, which runs for as long as it runs.
    deadline: Option<Instant>,
    /// Each read's own timeout.
    timeout: Duration,
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "answer not whole in time",
                ));
            }
            self.stream.set_read_timeout(Some(left.min(self.timeout)))?;
        }
        self.stream.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl Conn {
    fn sock(&mut self) -> &mut Sock {
        match &mut self.io {
            ConnIo::Plain(s) => s,
            ConnIo::Tls(s) => &mut s.sock,
        }
    }

    /// From now on, reads without a deadline, each within `timeout` (a watch's stream).
    fn stream_on(&mut self, timeout: Duration) -> io::Result<()> {
        let sock = self.sock();
        sock.deadline = None;
        sock.timeout = timeout;
        sock.stream.set_read_timeout(Some(timeout))
    }

    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &self.io {
            ConnIo::Plain(s) => s.stream.as_raw_fd(),
            ConnIo::Tls(s) => s.sock.stream.as_raw_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.io {
            ConnIo::Plain(s) => s.read(buf),
            ConnIo::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.io {
            ConnIo::Plain(s) => s.write(buf),
            ConnIo::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.io {
            ConnIo::Plain(s) => s.flush(),
            ConnIo::Tls(s) => s.flush(),
        }
    }
}

/// One key-value pair as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// When a call's answer must have come (see [`Sock::deadline`]).
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// Whichever endpoint answers.
    At(Instant),
    /// This long at each endpoint tried.
    EachEndpoint(Duration),
}

/// A connection-less client: each call opens its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    url: StoreUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The endpoint to try first (the last one that answered).
    preferred: usize,
    token: Option<String>,
}

pub fn b64(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 4 / 3 + 4);
    common::keys::encode_b64_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn unb64(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match v.as_str() {
        Some(s) if common::keys::decode_b64(s.as_bytes(), &mut out).is_some() => out,
        _ => Vec::new(),
    }
}

/// A 64-bit number, which the gateway sends as a string (absent when zero).
pub fn num(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The key just after every key that starts with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub fn kvs(answer: &Value) -> Vec<Kv> {
    answer["kvs"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|kv| Kv {
                    key: String::from_utf8_lossy(&unb64(&kv["key"])).into_owned(),
                    value: unb64(&kv["value"]),
                    mod_revision: num(&kv["mod_revision"]),
                    lease: num(&kv["lease"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a request that an endpoint took whole, without answering, goes to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    Yes,
    No,
}

impl Client {
    /// A client for `url`; fails only on unreadable TLS files.
    pub fn new(url: StoreUrl) -> Result<Client, String> {
        Ok(Client {
            tls: url.client_config()?,
            url,
            preferred: 0,
            token: None,
        })
    }

    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// The full key for `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.url.prefix)
    }

    /// One unary call; the answer's JSON. A read, or a write that may be made twice (a put
    /// of the same value, a lease): an endpoint that took it and did not answer is followed
    /// by the next one.
    pub fn call(&mut self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        self.call_as(path, body, Resend::Yes)
    }

    /// A transaction, sent to one endpoint only once it has taken it: the first may have
    /// applied it, and a copy sent to the next would then fail its compare, as if another
    /// write had come first. [`EtcdError::Unknown`] when its outcome is not known.
    pub fn txn(&mut self, body: &Value) -> Result<Value, EtcdError> {
        self.call_as("/v3/kv/txn", body, Resend::No)
    }

    fn call_as(&mut self, path: &str, body: &Value, resend: Resend) -> Result<Value, EtcdError> {
        if self.url.user.is_some() && self.token.is_none() {
            self.authenticate()?;
        }
        match self.call_once(path, body, resend) {
            Err(EtcdError::Refused(m)) if self.url.user.is_some() && m.contains("token") => {
                // The token expired (etcd's simple tokens last 5 minutes by default); a
                // refused request was not applied.
                self.authenticate()?;
                self.call_once(path, body, resend)
            }
            other => other,
        }
    }

    fn authenticate(&mut self) -> Result<(), EtcdError> {
        let Some((user, password)) = self.url.user.clone() else {
            return Ok(());
        };
        self.token = None;
        let answer = self.call_once(
            "/v3/auth/authenticate",
            &json!({"name": user, "password": password}),
            Resend::Yes,
        )?;
        match answer["token"].as_str() {
            Some(t) => {
                self.token = Some(t.to_owned());
                Ok(())
            }
            None => Err(EtcdError::Refused(format!(
                "authentication as {user:?} gave no token"
            ))),
        }
    }

    fn call_once(&mut self, path: &str, body: &Value, resend: Resend) -> Result<Value, EtcdError> {
        let within = Instant::now() + CALL_WITHIN;
        let answer = self.send(path, body, REQUEST_TIMEOUT, Deadline::At(within), resend)?;
        let lost = |m: String| match resend {
            Resend::Yes => EtcdError::Unavailable(m),
            Resend::No => EtcdError::Unknown(m),
        };
        let text = read_answer(answer).map_err(|e| lost(format!("{path}: {e}")))?;
        let value: Value = serde_json::from_slice(&text)
            .map_err(|e| EtcdError::Unavailable(format!("{path}: answer is not JSON: {e}")))?;
        // Streaming endpoints answered in one message wrap it in "result".
        let value = match value.get("result") {
            Some(r) => r.clone(),
            None => value,
        };
        if let Some(err) = value.get("error").or_else(|| value.get("message")) {
            let msg = err.as_str().unwrap_or("error").to_owned();
            // gRPC code 14 UNAVAILABLE (no leader, shutting down) is the store being away; it
            // and 4 DEADLINE_EXCEEDED ("request timed out") leave a write's outcome unknown.
            return Err(match num(&value["code"]) {
                14 | 4 => lost(msg),
                _ => EtcdError::Refused(msg),
            });
        }
        Ok(value)
    }

    /// Connects to the first endpoint that takes the connection and sends the request; with
    /// [`Resend::No`], not to the next one once an endpoint has taken the request whole.
    fn send(
        &mut self,
        path: &str,
        body: &Value,
        timeout: Duration,
        deadline: Deadline,
        resend: Resend,
    ) -> Result<Answer, EtcdError> {
        let body = serde_json::to_vec(body).map_err(|e| EtcdError::Refused(e.to_string()))?;
        let n = self.url.endpoints.len();
        let mut last = String::new();
        for i in 0..n {
            let at = (self.preferred + i) % n;
            let endpoint = &self.url.endpoints[at];
            let mut sent = false;
            // An endpoint tried after one that used up the call's time still gets a request's
            // (the review found a healthy second endpoint given none after a trickling first,
            // and blamed for it; once it answers, it is tried first).
            let deadline = match deadline {
                Deadline::At(at) => at.max(Instant::now() + REQUEST_TIMEOUT),
                Deadline::EachEndpoint(within) => Instant::now() + within,
            };
            match self.send_to(endpoint, path, &body, timeout, deadline, &mut sent) {
                Ok(s) => {
                    self.preferred = at;
                    return Ok(s);
                }
                Err(e) if sent && resend == Resend::No => {
                    // The next time starts with the next endpoint: this one took the
                    // request and did not answer.
                    self.preferred = (at + 1) % n;
                    return Err(EtcdError::Unknown(format!("{endpoint}: {e}")));
                }
                Err(e) => last = format!("{endpoint}: {e}"),
            }
        }
        Err(EtcdError::Unavailable(last))
    }

    fn send_to(
        &self,
        endpoint: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
        deadline: Instant,
        sent: &mut bool,
    ) -> io::Result<Answer> {
        let mut last = io::Error::other("no address");
        for addr in endpoint.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
                    let auth = match &self.token {
                        Some(t) => format!("Authorization: {t}\r\n"),
                        None => String::new(),
                    };
                    let head = format!(
                        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: \
                         application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let sock = Sock {
                        stream,
                        deadline: Some(deadline),
                        timeout,
                    };
                    let io = match &self.tls {
                        Some(config) => {
                            let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
                            let host = host.trim_start_matches('[').trim_end_matches(']');
                            let name = ServerName::try_from(host.to_owned())
                                .map_err(|e| io::Error::other(format!("{host}: {e}")))?;
                            let tls = rustls::ClientConnection::new(config.clone(), name)
                                .map_err(io::Error::other)?;
                            ConnIo::Tls(Box::new(rustls::StreamOwned::new(tls, sock)))
                        }
                        None => ConnIo::Plain(sock),
                    };
                    let mut conn = Conn { io };
                    conn.write_all(head.as_bytes())?;
                    conn.write_all(body)?;
                    conn.flush()?;
                    *sent = true;
                    let mut reader = BufReader::new(conn);
                    let (status, chunked, length) = read_head(&mut reader)?;
                    if status >= 500 {
                        return Err(io::Error::other(format!("HTTP {status}")));
                    }
                    return Ok(Answer {
                        reader,
                        chunked,
                        length,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Reads keys: the one `name`, or every key starting with `name` when `prefix`.
    pub fn range(&mut self, name: &str, prefix: bool) -> Result<(Vec<Kv>, i64), EtcdError> {
        let key = self.key(name);
        let mut req = json!({"key": b64(key.as_bytes())});
        if prefix {
            req["range_end"] = json!(b64(&prefix_end(&key)));
        }
        let answer = self.call("/v3/kv/range", &req)?;
        Ok((kvs(&answer), num(&answer["header"]["revision"])))
    }

    /// Every key under `name`, without its value (each [`Kv::value`] empty).
    pub fn range_keys(&mut self, name: &str) -> Result<Vec<Kv>, EtcdError> {
        let key = self.key(name);
        let end = b64(&prefix_end(&key));
        let req = json!({"key": b64(key.as_bytes()), "range_end": end, "keys_only": true});
        let answer = self.call("/v3/kv/range", &req)?;
        Ok(kvs(&answer))
    }

    /// The revision at which the key `name` last changed (0 if it does not exist), without
    /// its value: a linearizable read, which a member cut off from the others cannot answer.
    pub fn mod_revision(&mut self, name: &str) -> Result<i64, EtcdError> {
        let req = json!({"key": b64(self.key(name).as_bytes()), "keys_only": true});
        let answer = self.call("/v3/kv/range", &req)?;
        Ok(kvs(&answer).first().map_or(0, |kv| kv.mod_revision))
    }

    /// Puts one key, bound to `lease` when not zero.
    pub fn put(&mut self, name: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let mut req = json!({"key": b64(self.key(name).as_bytes()), "value": b64(value)});
        if lease != 0 {
            req["lease"] = json!(lease.to_string());
        }
        self.call("/v3/kv/put", &req).map(drop)
    }

    /// Puts `name`, bound to `lease` when not zero, if the key passes `compare` (an etcd
    /// `Compare` on it without its key, such as `{"target": "CREATE", "create_revision":
    /// "0"}`: the key does not exist): `Ok(Ok(()))` when put, else `Ok(Err(..))` with what the
    /// key holds now (`None`: nothing). One transaction, not sent again to another endpoint
    /// once one took it (its answer lost: [`EtcdError::Unknown`]).
    pub fn put_if(
        &mut self,
        name: &str,
        value: &[u8],
        lease: i64,
        mut compare: Value,
    ) -> Result<Result<(), Option<Kv>>, EtcdError> {
        let key = b64(self.key(name).as_bytes());
        compare["key"] = json!(key);
        compare["result"] = json!("EQUAL");
        let mut put = json!({"key": key, "value": b64(value)});
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let answer = self.txn(&json!({
            "compare": [compare],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": key}}],
        }))?;
        if answer["succeeded"].as_bool() == Some(true) {
            return Ok(Ok(()));
        }
        let now = kvs(&answer["responses"][0]["response_range"]);
        Ok(Err(now.into_iter().next()))
    }

    /// A lease of `ttl` seconds; its id.
    pub fn grant(&mut self, ttl: i64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/grant", &json!({"TTL": ttl.to_string()}))?;
        match num(&answer["ID"]) {
            0 => Err(EtcdError::Refused("lease grant gave no id".to_owned())),
            id => Ok(id),
        }
    }

    /// Revokes a lease: the keys bound to it go at once.
    pub fn revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}))
            .map(drop)
    }

    /// Refreshes a lease; false when it has expired.
    pub fn keep_alive(&mut self, lease: i64) -> Result<bool, EtcdError> {
        let answer = self.call("/v3/lease/keepalive", &json!({"ID": lease.to_string()}))?;
        Ok(num(&answer["TTL"]) > 0)
    }

    /// Opens a watch on `name` (every key under it when `prefix`) from `start` on.
    pub fn watch(&mut self, name: &str, prefix: bool, start: i64) -> Result<Watch, EtcdError> {
        if self.url.user.is_some() && self.token.is_none() {
            self.authenticate()?;
        }
        let key = self.key(name);
        let mut create = json!({"key": b64(key.as_bytes()), "start_revision": start.to_string()});
        if prefix {
            create["range_end"] = json!(b64(&prefix_end(&key)));
        }
        // Progress notifications every ~10 minutes keep idle connections alive; the read
        // timeout below is longer than etcd's default progress interval.
        create["progress_notify"] = json!(true);
        // The answer's head within a request's time at each endpoint, as a whole (not only
        // each read of it): a member (or a proxy in front of it) that takes the watch and
        // never answers, or trickles the head, is left for the next endpoint (before: up to
        // the stream's 15 minutes, which the stall check, knowing no socket yet, could not
        // cut short).
        let mut answer = self.send(
            "/v3/watch",
            &json!({"create_request": create}),
            REQUEST_TIMEOUT,
            Deadline::EachEndpoint(REQUEST_TIMEOUT),
            Resend::Yes,
        )?;
        answer
            .reader
            .get_mut()
            .stream_on(Duration::from_secs(15 * 60))
            .map_err(|e| EtcdError::Unavailable(format!("watch: {e}")))?;
        let fd = answer.reader.get_ref().fd();
        Ok(Watch {
            body: Chunked::new(answer.reader),
            fd,
        })
    }
}

/// An open watch: a stream of JSON messages, one per line.
#[derive(Debug)]
pub struct Watch {
    body: Chunked,
    /// Its socket, for [`Watch::fd`].
    fd: std::os::fd::RawFd,
}

/// One watch message.
#[derive(Debug)]
pub enum WatchEvent {
    /// Keys changed, at the given etcd revision.
    Changes(Vec<Kv>, i64),
    /// The watch is running (created, or a progress notification).
    Progress,
    /// The watch ended (compacted history or cancelled): read everything again.
    Ended(String),
}

impl Watch {
    /// The watch's socket: shut down from another thread, it makes a blocked
    /// [`Watch::next_event`] fail at once (the caller must know the watch is still open).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    pub fn next_event(&mut self) -> Result<WatchEvent, EtcdError> {
        let line = self
            .body
            .line()
            .map_err(|e| EtcdError::Unavailable(format!("watch: {e}")))?;
        let value: Value = serde_json::from_slice(&line)
            .map_err(|e| EtcdError::Unavailable(format!("watch: not JSON: {e}")))?;
        let r = value.get("result").unwrap_or(&value);
        if let Some(e) = value.get("error") {
            return Ok(WatchEvent::Ended(e.to_string()));
        }
        if r["canceled"].as_bool() == Some(true) {
            return Ok(WatchEvent::Ended(format!(
                "watch cancelled (compact revision {}): {}",
                num(&r["compact_revision"]),
                r["cancel_reason"].as_str().unwrap_or("")
            )));
        }
        let Some(events) = r["events"].as_array() else {
            return Ok(WatchEvent::Progress);
        };
        let revision = num(&r["header"]["revision"]);
        let changed = events
            .iter()
            .map(|e| {
                let kv = &e["kv"];
                Kv {
                    key: String::from_utf8_lossy(&unb64(&kv["key"])).into_owned(),
                    // A DELETE event carries no value.
                    value: if e["type"].as_str() == Some("DELETE") {
                        Vec::new()
                    } else {
                        unb64(&kv["value"])
                    },
                    mod_revision: num(&kv["mod_revision"]),
                    lease: num(&kv["lease"]),
                }
            })
            .collect();
        Ok(WatchEvent::Changes(changed, revision))
    }
}

/// A response whose head has been read.
struct Answer {
    reader: BufReader<Conn>,
    chunked: bool,
    length: Option<usize>,
}

/// Reads a response head: its status code, whether the body is chunked, its length.
fn read_head(r: &mut impl BufRead) -> io::Result<(u16, bool, Option<usize>)> {
    let mut head = Vec::new();
    loop {
        // No line read further than the head's limit, however long it runs.
        let room = (MAX_HEAD + 1).saturating_sub(head.len()) as u64;
        let n = Read::take(&mut *r, room).read_until(b'\n', &mut head)?;
        if head.len() > MAX_HEAD {
            return Err(io::Error::other("response head too long"));
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(io::Error::other("malformed response head")),
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    Ok((resp.code.unwrap_or(0), chunked, length))
}

/// Reads a whole response body.
fn read_answer(answer: Answer) -> io::Result<Vec<u8>> {
    read_body(answer.reader, answer.chunked, answer.length)
}

/// [`read_answer`] on any reader.
fn read_body<R: BufRead>(mut r: R, chunked: bool, length: Option<usize>) -> io::Result<Vec<u8>> {
    if chunked {
        let mut body = Chunked::new(r);
        let mut all = Vec::new();
        let mut end = JsonEnd::default();
        // A streaming endpoint answering one request sends one message and ends; read up to
        // the end or the first complete message, whichever comes first. Whether the message
        // is complete is followed as the chunks come (parsing all of it again at each one
        // cost the square of its length in chunks).
        loop {
            match body.chunk()? {
                Some(c) => {
                    all.extend_from_slice(&c);
                    if all.len() > MAX_ANSWER {
                        return Err(io::Error::other("answer too large"));
                    }
                    if end.feed(&c)
                        && all.ends_with(b"\n")
                        && serde_json::from_slice::<Value>(&all).is_ok()
                    {
                        return Ok(all);
                    }
                }
                None => return Ok(all),
            }
        }
    }
    match length {
        Some(n) if n > MAX_ANSWER => Err(io::Error::other("answer too large")),
        Some(n) => {
            let mut body = vec![0u8; n];
            r.read_exact(&mut body)?;
            Ok(body)
        }
        None => {
            let mut body = Vec::new();
            r.take(MAX_ANSWER as u64 + 1).read_to_end(&mut body)?;
            Ok(body)
        }
    }
}

/// Where a JSON text stands, fed a piece at a time: whether the bytes so far end a
/// complete top-level object or array (strings and their escapes followed across pieces).
#[derive(Debug, Default)]
struct JsonEnd {
    depth: usize,
    started: bool,
    in_string: bool,
    escaped: bool,
}

impl JsonEnd {
    /// Takes `piece`; whether a top-level value has been closed and nothing but white
    /// space follows it.
    fn feed(&mut self, piece: &[u8]) -> bool {
        for &b in piece {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.started = true;
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        self.started && self.depth == 0 && !self.in_string
    }
}

/// A chunked body read as newline-separated messages.
#[derive(Debug)]
struct Chunked<R = BufReader<Conn>> {
    reader: R,
    pending: Vec<u8>,
    /// How much of `pending` holds no newline (looked at already).
    scanned: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(reader: R) -> Chunked<R> {
        Chunked {
            reader,
            pending: Vec::new(),
            scanned: 0,
            done: false,
        }
    }

    /// The next chunk's data; `None` at the end of the body.
    fn chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        let r = &mut self.reader;
        let mut size_line = Vec::new();
        if Read::take(&mut *r, MAX_CHUNK_LINE).read_until(b'\n', &mut size_line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if !size_line.ends_with(b"\n") {
            return Err(io::Error::other("chunk size line too long"));
        }
        let text = String::from_utf8_lossy(&size_line);
        let hex = text.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {hex:?}")))?;
        if size > MAX_ANSWER {
            return Err(io::Error::other("chunk too large"));
        }
        if size == 0 {
            self.done = true;
            return Ok(None);
        }
        let mut data = vec![0u8; size + 2];
        r.read_exact(&mut data)?;
        data.truncate(size);
        Ok(Some(data))
    }

    /// The next complete line (a message), without its newline.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let newline = self.pending[self.scanned..]
                .iter()
                .position(|&b| b == b'\n');
            if let Some(i) = newline.map(|k| self.scanned + k) {
                let mut line: Vec<u8> = self.pending.drain(..=i).collect();
                self.scanned = 0;
                line.pop();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
            // Only what comes next is looked at for a newline (rescanning all of it at each
            // chunk cost the square of a long message's length in chunks).
            self.scanned = self.pending.len();
            match self.chunk()? {
                Some(c) => {
                    self.pending.extend_from_slice(&c);
                    if self.pending.len() > MAX_ANSWER {
                        return Err(io::Error::other("watch message too large"));
                    }
                }
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_end_is_seen_only_once_the_value_closes() {
        let text = br#"{"a":"}{\"x]","b":[1,{"c":2}]}"#;
        // Fed a byte at a time: complete at the last byte only, whatever the strings hold.
        let mut end = JsonEnd::default();
        let seen: Vec<bool> = text.iter().map(|b| end.feed(&[*b])).collect();
        assert_eq!(seen.iter().position(|&d| d), Some(text.len() - 1));
        // Split anywhere in two pieces: the same.
        for k in 0..text.len() {
            let mut end = JsonEnd::default();
            assert!(!end.feed(&text[..k]), "{k}");
            assert!(end.feed(&text[k..]), "{k}");
        }
    }

    #[test]
    fn heads_chunk_lines_and_messages_are_read_within_bounds() {
        // A head line without end: an error after MAX_HEAD bytes, not a buffer without bound.
        let mut endless = BufReader::new(io::repeat(b'a'));
        let e = read_head(&mut endless).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        // A chunk-size line without end, the same.
        let mut body = Chunked::new(BufReader::new(io::repeat(b'f')));
        let e = body.chunk().unwrap_err();
        assert!(e.to_string().contains("chunk size line too long"), "{e}");
        // Messages split into one-byte chunks come out whole, and a body of one message
        // ends as soon as it is complete.
        let text = "{\"x\":1}\n\n{\"y\":\"a\\nb\"}\n";
        let chunked: String = text.chars().map(|c| format!("1\r\n{c}\r\n")).collect();
        let mut body = Chunked::new(chunked.as_bytes());
        assert_eq!(body.line().unwrap(), br#"{"x":1}"#);
        assert_eq!(body.line().unwrap(), br#"{"y":"a\nb"}"#);
        let one = read_body(chunked.as_bytes(), true, None).unwrap();
        assert_eq!(one, b"{\"x\":1}\n");
    }

    #[test]
    fn a_call_stops_reading_at_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut far, _) = listener.accept().unwrap();
        far.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        let past = Instant::now() - Duration::from_millis(1);
        let mut conn = Conn {
            io: ConnIo::Plain(Sock {
                stream,
                deadline: Some(past),
                timeout: REQUEST_TIMEOUT,
            }),
        };
        let e = conn.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Without one (a watch), the bytes are read.
        conn.stream_on(REQUEST_TIMEOUT).unwrap();
        assert!(conn.read(&mut [0u8; 16]).unwrap() > 0);
    }

    #[test]
    fn store_urls_parse() {
        let u = StoreUrl::parse("etcd://127.0.0.1:2379,127.0.0.2:2379/gateway/").unwrap();
        assert_eq!(u.endpoints, ["127.0.0.1:2379", "127.0.0.2:2379"]);
        assert_eq!(u.prefix, "/gateway");
        assert_eq!(u.user, None);
        let u = StoreUrl::parse("etcd://gw:s3cret@localhost:2379/a/b").unwrap();
        assert_eq!(u.user, Some(("gw".into(), "s3cret".into())));
        assert_eq!(u.prefix, "/a/b");
        assert_eq!(u.redacted(), "etcd://gw:***@localhost:2379/a/b");
        assert_eq!(u.tls, None);
        let u = StoreUrl::parse("etcds://h:2379/g?ca=/c.pem&cert=/a.pem&key=/a.key").unwrap();
        let files = u.tls.clone().unwrap();
        assert_eq!(files.ca, Some(PathBuf::from("/c.pem")));
        assert_eq!(files.key, Some(PathBuf::from("/a.key")));
        assert_eq!(u.prefix, "/g");
        assert_eq!(u.redacted(), "etcds://h:2379/g");
        for bad in [
            "http://127.0.0.1:2379/g",
            "etcd://127.0.0.1:2379",
            "etcd://127.0.0.1:2379/",
            "etcd://127.0.0.1/g",
            "etcd://127.0.0.1:0/g",
            "etcd://user@127.0.0.1:2379/g",
            "etcd:///g",
            "etcd://h:1/a//b",
            "etcd://h:1/g?ca=/c.pem",
            "etcds://h:1/g?ca=",
            "etcds://h:1/g?cert=/a.pem",
            "etcds://h:1/g?bogus=1",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        // A refused URL is shown without its password.
        let e = StoreUrl::parse("etcd://gw:etcdpass@h/g").unwrap_err();
        assert!(
            e.contains("etcd://gw:***@h/g") && !e.contains("etcdpass"),
            "{e}"
        );
        // Escapes in the credentials are decoded; a raw '/' in them is refused, unshown.
        let u = StoreUrl::parse("etcd://g%40w:pa%2Fss%25@h:1/g").unwrap();
        assert_eq!(u.user, Some(("g@w".into(), "pa/ss%".into())));
        let e = StoreUrl::parse("etcd://gw:pa/ss@h:1/g").unwrap_err();
        assert!(
            e.contains("%2F") && !e.contains("pa/ss") && !e.contains("\"pa"),
            "{e}"
        );
        assert!(StoreUrl::parse("etcd://gw:p%zz@h:1/g").is_err());
        // A `?` or `#` in the password is the password's (before: the options started at
        // it, and the message showed the whole password).
        let u = StoreUrl::parse("etcds://gw:Tr0u?b#4@h:1/g?ca=/c.pem").unwrap();
        assert_eq!(u.user, Some(("gw".into(), "Tr0u?b#4".into())));
        assert_eq!(
            (u.endpoints, u.prefix),
            (vec!["h:1".to_owned()], "/g".to_owned())
        );
        assert_eq!(u.tls.unwrap().ca, Some(PathBuf::from("/c.pem")));
        let e = StoreUrl::parse("etcd://gw:Tr0u?b@h:1/g?ca=/c.pem").unwrap_err();
        assert!(e.contains("need etcds") && !e.contains("Tr0u"), "{e}");
        // An `@` in the password before its `?`, a raw `/` after it: never shown either.
        let e = StoreUrl::parse("etcd://gw:p@ss?word@h:0/g").unwrap_err();
        assert!(!e.contains("ss?word"), "{e}");
        for raw in [
            "etcd://gw:se?cret/word@h:1/g",
            "etcds://gw:pa/x?y@h:1/g?ca=/c",
            "etcd://gw:se?c=ret/word@h:1/g",
            "etcd://gw:x&y=/zz@h:1/g",
            "etcd://gw:p@ss/xx@h:1/g",
            "etcd://gw:pa/ss@127.0.0.1/g",
        ] {
            let e = StoreUrl::parse(raw).unwrap_err();
            let shown = ["cret", "x?y", "y=/zz", "ss/xx", "pa/ss"];
            assert!(
                e.contains("%2F") && !shown.iter().any(|s| e.contains(s)),
                "{e}"
            );
        }
        // Nor a piece of one with a malformed endpoint or option.
        for raw in [
            "etcd://gw:s3cret@h:2379x/g",
            "etcds://gw:s3cret@h:1/g?bogus=1",
        ] {
            let e = StoreUrl::parse(raw).unwrap_err();
            assert!(!e.contains("s3cret"), "{e}");
        }
        // A password that looks like an option is the password's.
        let u = StoreUrl::parse("etcds://gw:s?ca=x@h:1/g").unwrap();
        assert_eq!(u.user, Some(("gw".into(), "s?ca=x".into())));
        // An `@` in an option's file is the file's.
        for file in ["/a@b.pem", "/x?y@z:1.pem"] {
            let u = StoreUrl::parse(&format!("etcds://h:1/g?ca={file}")).unwrap();
            assert_eq!(u.tls.unwrap().ca, Some(PathBuf::from(file)));
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/g/"), b"/g0");
        assert_eq!(prefix_end("a\u{7f}"), [b'a', 0x80]);
    }
}
