//! The `handshake-full` row's client: [`CLIENTS`] threads, each opening a connection, making a
//! full TLS handshake (rustls with ring, no session resumption, TLS 1.3 or 1.2 as the server
//! chooses), sending one `GET` with `Connection: close`, reading the whole answer and the end
//! of the stream, over and over for the run's seconds. Unlike `openssl s_time`, which it
//! replaces, it times each request: from `connect` to the answer's last byte, the latency a
//! client that cannot resume sees.
//!
//! It runs as its own process (`loadtest handshake-client`, started under `taskset` on the
//! client CPUs like wrk and h2load) and prints one line that [`drive`] reads back.
//!
//! The server's certificate is not checked against a trust anchor (the harness makes it and
//! gives it to both proxies; a load generator has no use for the check), but the handshake's
//! signature is verified as usual, so the server does all of its work.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use crate::wrk::WrkResult;

/// Connections in flight at once (one per thread).
pub const CLIENTS: usize = 4;

/// Longest wait for the connection or for one read before the handshake counts as failed.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the client on `cpus` against `addr` for `seconds`, fetching `path` once per handshake.
pub fn drive(cpus: &str, addr: SocketAddr, seconds: u64, path: &str) -> Result<WrkResult> {
    let exe = std::env::current_exe().context("finding the loadtest binary")?;
    let out = crate::procs::command("taskset")
        .args(["-c", cpus])
        .arg(exe)
        .arg("handshake-client")
        .arg(addr.to_string())
        .arg(path)
        .arg(seconds.to_string())
        .arg(CLIENTS.to_string())
        .output()
        .context("running loadtest handshake-client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "handshake-client failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_summary(&text).with_context(|| format!("unexpected handshake-client output: {text:?}"))
}

/// `loadtest handshake-client ADDR PATH SECONDS CLIENTS`: runs the client in this process
/// and prints its summary line.
pub fn client_main(args: &[String]) -> Result<()> {
    let [addr, path, seconds, clients] = args else {
        bail!("usage: loadtest handshake-client ADDR PATH SECONDS CLIENTS");
    };
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let seconds: u64 = seconds.parse().context("SECONDS")?;
    let clients: usize = clients.parse().context("CLIENTS")?;
    if !(1..=600).contains(&seconds) || !(1..=256).contains(&clients) {
        bail!("SECONDS must be 1..600 and CLIENTS 1..256");
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let config = Arc::new(client_config()?);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (config, request) = (config.clone(), request.clone());
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match fetch(&config, addr, request.as_bytes()) {
                        Ok(status) => {
                            tally.latencies_us.push(t0.elapsed().as_micros() as u64);
                            if !(200..300).contains(&status) {
                                tally.non_2xx += 1;
                            }
                        }
                        Err(_) => tally.errors += 1,
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        let t = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        all.latencies_us.extend(t.latencies_us);
        all.non_2xx += t.non_2xx;
        all.errors += t.errors;
    }
    let r = all.result(started.elapsed().as_secs_f64());
    println!("{}", summary_line(&r));
    Ok(())
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    non_2xx: u64,
    errors: u64,
}

impl Tally {
    fn result(mut self, seconds: f64) -> WrkResult {
        self.latencies_us.sort_unstable();
        let at = |q: f64| -> f64 {
            let v = &self.latencies_us;
            if v.is_empty() {
                return 0.0;
            }
            v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64
        };
        let requests = self.latencies_us.len() as u64;
        WrkResult {
            requests,
            seconds,
            rps: requests as f64 / seconds,
            p50_us: at(0.50),
            p99_us: at(0.99),
            non_2xx: self.non_2xx,
            socket_errors: self.errors,
        }
    }
}

fn summary_line(r: &WrkResult) -> String {
    format!(
        "handshakes {} seconds {:.3} non_2xx {} errors {} p50_us {} p99_us {}",
        r.requests, r.seconds, r.non_2xx, r.socket_errors, r.p50_us, r.p99_us
    )
}

fn parse_summary(text: &str) -> Option<WrkResult> {
    let line = text.lines().find(|l| l.starts_with("handshakes "))?;
    let words: Vec<&str> = line.split(' ').collect();
    let field = |name: &str| -> Option<&str> {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1).copied()
    };
    // A run with no handshake done has no figures (not zeros in its medians).
    let requests: u64 = field("handshakes")?.parse().ok().filter(|&n| n > 0)?;
    let seconds: f64 = field("seconds")?.parse().ok()?;
    Some(WrkResult {
        requests,
        seconds,
        rps: requests as f64 / seconds,
        p50_us: field("p50_us")?.parse().ok()?,
        p99_us: field("p99_us")?.parse().ok()?,
        non_2xx: field("non_2xx")?.parse().ok()?,
        socket_errors: field("errors")?.parse().ok()?,
    })
}

fn client_config() -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(
            provider.signature_verification_algorithms,
        )))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// One connection: handshake, request, the whole answer (timed), then the end of the stream.
/// Returns the answer's status.
fn fetch(config: &Arc<ClientConfig>, addr: SocketAddr, request: &[u8]) -> Result<u16> {
    let tcp = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let name = ServerName::try_from("localhost")?;
    let conn = ClientConnection::new(config.clone(), name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request)?;
    tls.flush()?;
    let status = crate::read_answer(&mut tls, &mut Vec::with_capacity(1024), false)?;
    // The server closes (`Connection: close`); a close without close_notify is not an error.
    let mut chunk = [0u8; 4096];
    while matches!(tls.read(&mut chunk), Ok(n) if n > 0) {}
    Ok(status)
}

/// Accepts the server's certificate as it is; verifies the handshake's signatures with it.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;

    type Kinds = std::thread::JoinHandle<Vec<rustls::HandshakeKind>>;

    /// A TLS server on loopback that answers `answers` connections with a 2-byte body and
    /// says how each handshake went.
    fn server(answers: usize) -> (SocketAddr, Kinds) {
        let pem = include_bytes!("../../common/testdata/api.pem");
        let key = include_bytes!("../../common/testdata/api.key");
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let kinds = std::thread::spawn(move || {
            (0..answers)
                .map(|_| {
                    let (tcp, _) = listener.accept().unwrap();
                    let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut got = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !got.ends_with(b"\r\n\r\n") {
                        let n = tls.read(&mut chunk).unwrap();
                        assert!(n > 0, "the client left before its request");
                        got.extend_from_slice(&chunk[..n]);
                    }
                    assert!(got.starts_with(b"GET /x HTTP/1.1\r\n"));
                    tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .unwrap();
                    tls.conn.send_close_notify();
                    tls.flush().unwrap();
                    tls.conn.handshake_kind().unwrap()
                })
                .collect()
        });
        (addr, kinds)
    }

    #[test]
    fn every_connection_makes_a_full_handshake_and_reads_the_answer() {
        let (addr, kinds) = server(3);
        let config = Arc::new(client_config().unwrap());
        let request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        for _ in 0..3 {
            assert_eq!(fetch(&config, addr, request).unwrap(), 200);
        }
        // The server offers tickets and keeps sessions; the client must not use them.
        let kinds = kinds.join().unwrap();
        assert_eq!(kinds, [rustls::HandshakeKind::Full; 3]);
    }

    #[test]
    fn the_summary_line_round_trips_with_percentiles() {
        let t = Tally {
            latencies_us: (1..=1000).rev().collect(),
            non_2xx: 2,
            errors: 3,
        };
        let r = t.result(2.0);
        assert_eq!((r.requests, r.rps), (1000, 500.0));
        assert_eq!((r.p50_us, r.p99_us), (501.0, 991.0));
        // A run with no handshake done gives no figures.
        let zero = summary_line(&WrkResult {
            requests: 0,
            ..r.clone()
        });
        assert!(parse_summary(&zero).is_none(), "{zero}");
        let back = parse_summary(&format!("noise\n{}\n", summary_line(&r))).unwrap();
        assert_eq!(
            (back.requests, back.non_2xx, back.socket_errors),
            (1000, 2, 3)
        );
        assert_eq!(
            (back.p50_us, back.p99_us, back.seconds),
            (501.0, 991.0, 2.0)
        );
        assert!(parse_summary("handshakes x").is_none());
    }
}
