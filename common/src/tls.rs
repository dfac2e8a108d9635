//! Certificates and TLS settings, compiled: each certificate's chain and key are parsed and
//! checked against each other (and the clock), each TLS listener gets one rustls
//! `ServerConfig` whose resolver picks a certificate by the client's SNI name, and each TLS
//! upstream one `ClientConfig` (trusted authorities, ALPN, client certificate).
//!
//! A new snapshot brings new `ServerConfig`s: the next handshake uses them, a connection
//! already established keeps the session it has.

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{CertificateConfig, ListenerTlsConfig, UpstreamTlsConfig};
use crate::validate::read_named_text;
use crate::ConfigError;

/// Largest `cert_file` or `key_file` read (a chain of a few certificates is a few KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

/// The `ring` crypto provider every TLS config uses (no cmake, no C toolchain).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// One usable certificate.
#[derive(Debug)]
pub struct Certificate {
    pub id: String,
    /// DNS names from subjectAltName (without one, the subject's common name), lower-case.
    pub names: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub key: Arc<CertifiedKey>,
}

impl Certificate {
    /// Whether the certificate has expired at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after <= now_s
    }

    /// Whether the certificate is not valid yet at `now`, beyond a few minutes of clock
    /// difference between the gateway and its CA.
    pub fn early_at(&self, now: SystemTime) -> bool {
        const SKEW_S: i64 = 300;
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_before > now_s + SKEW_S
    }
}

/// The compiled TLS side of one listener.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub config: Arc<ServerConfig>,
    /// `config` with one TLS 1.3 session ticket instead of two, for a client that offers one
    /// to resume: it used one and gets one back, as OpenSSL (nginx) does after a resumption.
    /// rustls sends its `send_tls13_tickets` after every handshake, and each ticket costs
    /// about 3% of a resumption.
    pub resume_config: Arc<ServerConfig>,
    /// Whether ALPN offers `h2`.
    pub h2: bool,
}

/// Parses and checks one certificate entry; `key_pem` is the key text from wherever it came.
/// Fills `names`, `not_after` and `key_sha256` into `c` and drops `key_pem` from it. Expiry
/// is not checked here, where every stored certificate is compiled again at each start and
/// each change, but when one is published ([`refuse_newly_expired`]).
pub fn compile_certificate(
    c: &mut CertificateConfig,
    at: &str,
) -> Result<Certificate, ConfigError> {
    let field = |f: &str| format!("{at}.{f}");
    let cert_text = match (&c.cert_pem, &c.cert_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::field(
                field("cert_file"),
                "give `cert_pem` or `cert_file`, not both",
            ))
        }
        (Some(pem), None) => pem.clone(),
        (None, Some(path)) => read_named_text(path, MAX_PEM_FILE).map_err(|e| {
            ConfigError::field(field("cert_file"), format!("cannot read {path:?}: {e}"))
        })?,
        (None, None) => {
            return Err(ConfigError::field(
                field("cert_pem"),
                "a certificate needs `cert_pem` or `cert_file`",
            ))
        }
    };
    let cert_at = if c.cert_pem.is_some() {
        "cert_pem"
    } else {
        "cert_file"
    };
    let (key_text, key_at) =
        match (&c.key_pem, &c.key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::field(
                    field("key_file"),
                    "give `key_pem` or `key_file`, not both",
                ))
            }
            (Some(pem), None) => (pem.clone(), "key_pem"),
            (None, Some(path)) => {
                let text = read_named_text(path, MAX_PEM_FILE).map_err(|e| {
                    ConfigError::field(field("key_file"), format!("cannot read {path:?}: {e}"))
                })?;
                (text, "key_file")
            }
            (None, None) => match (&c.key_sha256, &c.stored_key.0) {
                (Some(_), Some(key)) => (key.to_string(), "key_sha256"),
                (Some(_), None) => {
                    return Err(ConfigError::field(
                        field("key_sha256"),
                        "no stored key has this digest: send the key itself in `key_pem`",
                    ))
                }
                (None, _) => return Err(ConfigError::field(
                    field("key_pem"),
                    "a certificate needs `key_pem`, `key_file` or the `key_sha256` of a stored key",
                )),
            },
        };
    let digest = sha256_hex(key_text.as_bytes());
    if key_at == "key_sha256" {
        if c.key_sha256.as_deref() != Some(digest.as_str()) {
            return Err(ConfigError::field(
                field("key_sha256"),
                "the stored key does not match this digest",
            ));
        }
    } else if let Some(given) = &c.key_sha256 {
        // With `key_file` the digest is the gateway's own output, refreshed from the file.
        if *given != digest && key_at == "key_pem" {
            return Err(ConfigError::field(
                field("key_sha256"),
                "does not match `key_pem`; leave it out when sending a new key",
            ));
        }
    }

    // What `cert_pem` holds is stored and shown as it came: a private key in it would be
    // too (a bundled PEM file is read by `cert_file`, whose text is not kept).
    if c.cert_pem.is_some() && cert_text.contains("PRIVATE KEY-----") {
        return Err(ConfigError::field(
            field("cert_pem"),
            "holds a private key: give the key in `key_pem` (stored apart, never shown) and \
             only the certificates in `cert_pem`",
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ConfigError::field(field(cert_at), format!("not a PEM certificate chain: {e}"))
        })?;
    let Some(leaf) = chain.first() else {
        return Err(ConfigError::field(
            field(cert_at),
            "holds no `BEGIN CERTIFICATE` block",
        ));
    };
    let parsed = parse_leaf(leaf).ok_or_else(|| {
        ConfigError::field(
            field(cert_at),
            "the first certificate is not a valid X.509 certificate",
        )
    })?;
    // The rest of the chain goes to every client as it is: one that does not parse would
    // fail every handshake under these names (a line lost in a copy and paste).
    if let Some(n) = chain.iter().position(|c| !is_certificate(c)) {
        return Err(ConfigError::field(
            field(cert_at),
            format!(
                "certificate {} of the chain ({} in all) is not a valid X.509 certificate",
                n + 1,
                chain.len()
            ),
        ));
    }
    if key_text.contains("ENCRYPTED PRIVATE KEY-----")
        || key_text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(ConfigError::field(
            field(key_at),
            "an encrypted private key: the gateway takes keys without a passphrase (decrypt \
             it with `openssl pkey -in KEY -out KEY.dec`, and keep that file readable by the \
             gateway only)",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
        .map_err(|e| ConfigError::field(field(key_at), format!("not a PEM private key: {e}")))?;
    let signer = provider().key_provider.load_private_key(key).map_err(|e| {
        ConfigError::field(
            field(key_at),
            format!(
                "unusable private key ({e}): the gateway takes RSA keys of 2048 to 8192 bits, \
                 ECDSA keys on P-256 or P-384, and Ed25519 keys"
            ),
        )
    })?;
    let chain_digest = {
        let mut der = Vec::new();
        for cert in &chain {
            der.extend_from_slice(&(cert.len() as u32).to_be_bytes());
            der.extend_from_slice(cert);
        }
        sha256_hex(&der)
    };
    let certified = CertifiedKey::new(chain, signer);
    if certified.keys_match().is_err() {
        // The key of one of the chain's later certificates: the chain is out of order (the
        // leaf goes first), which is the chain's fault, not the key's.
        let later = certified.cert.iter().skip(1).any(|c| {
            CertifiedKey::new(vec![c.clone()], certified.key.clone())
                .keys_match()
                .is_ok()
        });
        return Err(if later {
            ConfigError::field(
                field(cert_at),
                "the certificate of this key is not the first: the chain goes leaf first",
            )
        } else {
            ConfigError::field(
                field(key_at),
                "the private key does not belong to the certificate",
            )
        });
    }
    // A certificate without a DNS name is taken: a client certificate for an upstream's
    // mutual TLS (a SPIFFE URI, an e-mail address, a common name with spaces), or one that
    // clients reach by address; SNI only never picks it by name.
    c.key_pem = None;
    c.key_sha256 = Some(digest);
    c.names = parsed.names.clone();
    c.not_after = Some(rfc3339(parsed.not_after));
    c.chain_sha256 = Some(chain_digest);
    Ok(Certificate {
        id: c.id.clone(),
        names: parsed.names,
        not_after: parsed.not_after,
        not_before: parsed.not_before,
        key: Arc::new(certified),
    })
}

/// Refuses a certificate that has expired at `now`, or is not valid yet, and is being
/// published: one of `certs` (compiled from `entries`, in their order) that `current` does
/// not already hold with the same id and chain. A certificate that expires while in use stays (and is still served,
/// as nginx does): a restart, or a change elsewhere in the config, does not depend on it.
pub fn refuse_newly_expired(
    entries: &[CertificateConfig],
    certs: &[Arc<Certificate>],
    current: &[Arc<Certificate>],
    now: SystemTime,
) -> Result<(), ConfigError> {
    for (i, (entry, cert)) in entries.iter().zip(certs).enumerate() {
        let kept = current
            .iter()
            .any(|c| c.id == cert.id && c.key.cert == cert.key.cert);
        let why = if cert.expired_at(now) {
            format!("the certificate expired at {}", rfc3339(cert.not_after))
        } else if cert.early_at(now) {
            format!(
                "the certificate is not valid before {}",
                rfc3339(cert.not_before)
            )
        } else {
            continue;
        };
        if !kept {
            let field = if entry.cert_file.is_some() {
                "cert_file"
            } else {
                "cert_pem"
            };
            return Err(ConfigError::field(
                format!("certificates[{i}].{field}"),
                why,
            ));
        }
    }
    Ok(())
}

/// The certificates among `certs` that have expired at `now`: id and expiry (RFC 3339).
pub fn expired(certs: &[Arc<Certificate>], now: SystemTime) -> Vec<(String, String)> {
    certs
        .iter()
        .filter(|c| c.expired_at(now))
        .map(|c| (c.id.clone(), rfc3339(c.not_after)))
        .collect()
}

/// Sessions one listener (its address) can resume, with one set of certificates: kept
/// across configs, so a change to the config (a route added) does not make every client's
/// next connection a full handshake (nginx keeps its session cache and ticket keys across
/// reloads too). A change to the listener's certificates (a key rotated, a name removed)
/// starts new ones: a session resumes the identity it was made with, which must not outlive
/// the certificate (nginx ties its sessions to the certificates the same way).
struct Sessions {
    /// TLS 1.2 session ids.
    cache: Arc<rustls::server::ServerSessionMemoryCache>,
    /// Stateless tickets (TLS 1.3, and TLS 1.2 clients that ask for them), keys rotated by
    /// rustls; `None` if the system's random source failed when it was made.
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

/// Session ids kept per listener (about 64 MiB at most in all with a few listeners;
/// tickets take no memory).
const SESSION_IDS: usize = 20_000;

/// Session states kept per listener address, the most recently used: the live config's, and
/// a dry run's or a refused change's beside it (more while more are in use).
const SESSION_SETS: usize = 3;

/// The session state of the listener on `address` with `certs`, made on first use.
fn sessions(address: &str, certs: &[Arc<Certificate>]) -> Arc<Sessions> {
    type Kept = Vec<(u64, Arc<Sessions>)>;
    static ALL: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Kept>>> =
        OnceLock::new();
    let mut print = std::hash::DefaultHasher::new();
    for c in certs {
        std::hash::Hash::hash(&c.key.cert, &mut print);
    }
    let print = std::hash::Hasher::finish(&print);
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let kept = all.entry(address.to_owned()).or_default();
    let entry = match kept.iter().position(|(p, _)| *p == print) {
        Some(i) => kept.remove(i),
        None => (
            print,
            Arc::new(Sessions {
                cache: rustls::server::ServerSessionMemoryCache::new(SESSION_IDS),
                ticketer: rustls::crypto::ring::Ticketer::new().ok(),
            }),
        ),
    };
    // Room for it: the least recently used sets that no compiled config holds any more. The
    // live config's is never pushed out (by dry runs or refused changes with other lists,
    // which would have made every client's next handshake a full one).
    while kept.len() >= SESSION_SETS {
        match kept
            .iter()
            .position(|(_, s)| Arc::strong_count(&s.cache) == 1)
        {
            Some(i) => drop(kept.remove(i)),
            None => break,
        }
    }
    kept.push(entry.clone());
    entry.1
}

/// Builds a listener's rustls config; `certs` are its certificates in its order.
pub fn compile_listener(
    tls: &ListenerTlsConfig,
    certs: Vec<Arc<Certificate>>,
    at: &str,
    address: &str,
) -> Result<ListenerTls, ConfigError> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version.as_str() {
        "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        other => {
            return Err(ConfigError::field(
                format!("{at}.min_version"),
                format!("{other:?} is not a TLS version this gateway offers: \"1.2\" or \"1.3\""),
            ))
        }
    };
    let mut alpn = Vec::with_capacity(tls.alpn.len());
    for (i, p) in tls.alpn.iter().enumerate() {
        if p != "h2" && p != "http/1.1" {
            return Err(ConfigError::field(
                format!("{at}.alpn[{i}]"),
                format!("{p:?} is not a protocol this gateway speaks: \"h2\" or \"http/1.1\""),
            ));
        }
        if tls.alpn[..i].contains(p) {
            return Err(ConfigError::field(
                format!("{at}.alpn[{i}]"),
                format!("{p:?} is listed twice"),
            ));
        }
        alpn.push(p.as_bytes().to_vec());
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| ConfigError::field(format!("{at}.min_version"), e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            certs: certs.clone(),
        }));
    config.alpn_protocols = alpn;
    let sessions = sessions(address, &certs);
    config.session_storage = sessions.cache.clone();
    if let Some(t) = &sessions.ticketer {
        config.ticketer = t.clone();
    }
    let mut resume_config = config.clone();
    resume_config.send_tls13_tickets = 1;
    Ok(ListenerTls {
        h2: tls.alpn.iter().any(|p| p == "h2"),
        config: Arc::new(config),
        resume_config: Arc::new(resume_config),
    })
}

/// The compiled TLS side of one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// `server_name`; `None`: each target's host name, else its address.
    pub server_name: Option<ServerName<'static>>,
    /// What it was compiled from, and the client certificate's leaf: equal ones make the
    /// same connections (each compile makes a new `ClientConfig`, so that cannot tell).
    source: UpstreamTlsConfig,
    client_leaf: Option<CertificateDer<'static>>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.client_leaf == other.client_leaf
    }
}

impl Eq for UpstreamTls {}

impl UpstreamTls {
    /// The name a connection to a target resolved from `host` (`None`: a literal address)
    /// at `addr` sends and checks.
    pub fn name_for(&self, host: Option<&str>, addr: std::net::IpAddr) -> ServerName<'static> {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        host.and_then(|h| ServerName::try_from(h.to_owned()).ok())
            .unwrap_or(ServerName::IpAddress(addr.into()))
    }
}

/// Where the system's trusted authorities are (Debian's `ca-certificates`).
pub const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest CA bundle read (the system's is about 220 KiB).
const MAX_CA_FILE: u64 = 4 << 20;

/// Builds an upstream's rustls client config. `h2`: ALPN offers `h2` (else `http/1.1`);
/// `certs` are the compiled `certificates`, for a client certificate.
pub fn compile_upstream_tls(
    tls: &mut UpstreamTlsConfig,
    h2: bool,
    certs: &[Arc<Certificate>],
    at: &str,
) -> Result<UpstreamTls, ConfigError> {
    let field = |f: &str| format!("{at}.{f}");
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version.as_str() {
        "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        other => {
            return Err(ConfigError::field(
                field("min_version"),
                format!("{other:?} is not a TLS version this gateway speaks: \"1.2\" or \"1.3\""),
            ))
        }
    };
    let server_name = match &tls.server_name {
        None => None,
        Some(n) => match ServerName::try_from(n.clone()) {
            Ok(name) => Some(name),
            Err(_) => {
                return Err(ConfigError::field(
                    field("server_name"),
                    format!("{n:?} is neither a DNS name nor an IP address"),
                ))
            }
        },
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| ConfigError::field(field("min_version"), e.to_string()))?;
    tls.ca_sha256 = None;
    let builder = if tls.verify {
        let (roots, pinned, digest) = upstream_roots(tls, at)?;
        tls.ca_sha256 = Some(digest);
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| ConfigError::field(field("ca_pem"), e.to_string()))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinning { webpki, pinned }))
    } else {
        if tls.ca_pem.is_some() || tls.ca_file.is_some() {
            return Err(ConfigError::field(
                field("verify"),
                "is false, so `ca_pem` / `ca_file` would not be used: remove one or the other",
            ));
        }
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
    };
    let mut client_leaf = None;
    let mut config = match &tls.certificate {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let Some(c) = certs.iter().find(|c| c.id == *id) else {
                return Err(ConfigError::field(
                    field("certificate"),
                    format!("no certificate has id {id:?}"),
                ));
            };
            client_leaf = c.key.cert.first().cloned();
            builder.with_client_cert_resolver(Arc::new(ClientCertificate(c.key.clone())))
        }
    };
    config.alpn_protocols = vec![match h2 {
        true => b"h2".to_vec(),
        false => b"http/1.1".to_vec(),
    }];
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name,
        source: tls.clone(),
        client_leaf,
    })
}

/// The authorities an upstream's certificates are checked against, those given in
/// `ca_pem` / `ca_file` (empty for the system's), which a target may also present as its own
/// certificate, and the SHA-256 (hex) of their PEM text.
type Roots = (RootCertStore, Vec<CertificateDer<'static>>, String);

fn upstream_roots(tls: &UpstreamTlsConfig, at: &str) -> Result<Roots, ConfigError> {
    let (text, name) = match (&tls.ca_pem, &tls.ca_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::field(
                format!("{at}.ca_file"),
                "give `ca_pem` or `ca_file`, not both",
            ))
        }
        (Some(pem), None) => (pem.clone(), "ca_pem"),
        (None, file) => {
            let path = file.as_deref().unwrap_or(SYSTEM_CAS);
            let text = read_named_text(path, MAX_CA_FILE).map_err(|e| {
                let hint = match file {
                    Some(_) => String::new(),
                    None => {
                        " (the system's trusted authorities; give `ca_pem` or `ca_file`)".to_owned()
                    }
                };
                ConfigError::field(
                    format!("{at}.ca_file"),
                    format!("cannot read {path:?}{hint}: {e}"),
                )
            })?;
            (text, "ca_file")
        }
    };
    // What `ca_pem` holds is stored and shown as it came, as `cert_pem`'s is. (A config
    // stored before this rule still starts.)
    let why = "holds a private key, which would be stored and shown as sent: give only the \
               authorities' certificates";
    let at_pem = format!("{at}.ca_pem");
    if tls.ca_pem.is_some()
        && text.contains("PRIVATE KEY-----")
        && !crate::validate::tolerated(&at_pem, why)
    {
        return Err(ConfigError::field(at_pem, why));
    }
    let mut roots = RootCertStore::empty();
    let mut pinned = Vec::new();
    let mut bad = 0usize;
    for cert in CertificateDer::pem_slice_iter(text.as_bytes()) {
        let cert = cert.map_err(|e| {
            ConfigError::field(format!("{at}.{name}"), format!("not PEM certificates: {e}"))
        })?;
        if tls.ca_pem.is_some() || tls.ca_file.is_some() {
            pinned.push(cert.clone());
        }
        // A system bundle may hold a certificate webpki cannot use; one that holds nothing
        // usable is refused below.
        if roots.add(cert).is_err() {
            bad += 1;
        }
    }
    if roots.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.{name}"),
            match bad {
                0 => "holds no PEM certificate".to_owned(),
                n => format!("holds no usable certificate ({n} refused)"),
            },
        ));
    }
    Ok((roots, pinned, sha256_hex(text.as_bytes())))
}

/// Checks a target's certificate as webpki does (a chain to a trusted authority, the name,
/// validity), and also takes one that is itself among the authorities given: a self-signed
/// certificate given as its own authority, which webpki refuses as a CA used as an end
/// entity while OpenSSL (and so nginx's `proxy_ssl_trusted_certificate`) takes it. Its name,
/// validity and purposes (key usage, extended key usage) are still checked.
#[derive(Debug)]
struct Pinning {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for Pinning {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let checked = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if !self.pinned.iter().any(|p| p[..] == end_entity[..]) {
            return checked;
        }
        let leaf = parse_leaf(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        // What it may be used for is checked too, as OpenSSL does, also where webpki took it
        // (a self-signed end entity as its own anchor, whose key usage webpki does not read):
        // before, a pinned certificate made for clients only, or a CA's that signs
        // certificates only, was taken to serve.
        if !leaf.serves_tls {
            return Err(rustls::CertificateError::InvalidPurpose.into());
        }
        if checked.is_ok() {
            return checked;
        }
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        let now = now.as_secs() as i64;
        if now >= leaf.not_after {
            return Err(rustls::CertificateError::Expired.into());
        }
        if now < leaf.not_before {
            return Err(rustls::CertificateError::NotValidYet.into());
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Presents one certificate to every target that asks for one.
#[derive(Debug)]
struct ClientCertificate(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.key.choose_scheme(schemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify = false`: any certificate is accepted; the handshake's signatures are still
/// checked, so the session is encrypted (to whoever holds the key), just not authenticated.
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Picks a listener's certificate by SNI: an exact name, then a wildcard (`*.example.com`
/// covers one label), then the first. Among several at the same step (an ECDSA and an RSA
/// certificate for one name, say), the first whose key the client can use.
#[derive(Debug)]
pub struct SniResolver {
    certs: Vec<Arc<Certificate>>,
}

impl SniResolver {
    /// The certificate for a client that sent `sni` (already lower-case ASCII, as rustls
    /// gives it), `usable` telling whether the client can take a certificate's key: the
    /// first usable that names it exactly, else the first usable wildcard for it, else (none
    /// naming it) the first usable of all. Where certificates name it but the client can use
    /// none, the first of them (the handshake fails on it, as it would on any). `usable` is
    /// not asked when the listener has only one certificate.
    pub fn pick(
        &self,
        sni: Option<&str>,
        usable: impl Fn(&Certificate) -> bool,
    ) -> Option<&Arc<Certificate>> {
        let parent = sni.and_then(|n| n.split_once('.')).map(|(_, p)| p);
        let exact = |c: &Certificate| sni.is_some_and(|name| c.names.iter().any(|n| n == name));
        let wild = |c: &Certificate| {
            let covers = |n: &String| n.strip_prefix("*.").is_some_and(|p| Some(p) == parent);
            parent.is_some() && c.names.iter().any(covers)
        };
        let mut first = None;
        for step in [&exact as &dyn Fn(&Certificate) -> bool, &wild] {
            for c in self.certs.iter().filter(|c| step(c)) {
                first = first.or(Some(c));
                if self.certs.len() == 1 || usable(c) {
                    return Some(c);
                }
            }
        }
        if first.is_some() {
            return first;
        }
        let mut all = self.certs.iter();
        all.clone()
            .find(|c| self.certs.len() == 1 || usable(c))
            .or_else(|| all.next())
    }
}

/// Whether a client can take `key`: it offers a signature scheme the key signs with, and a
/// cipher suite that goes with the key's algorithm (any TLS 1.3 suite; for TLS 1.2, an
/// ECDHE_ECDSA suite for an ECDSA key, ECDHE_RSA for an RSA one).
fn client_can_use(key: &CertifiedKey, hello: &ClientHello<'_>) -> bool {
    let alg = key.key.algorithm();
    let suites = &provider().cipher_suites;
    let suite_fits = hello.cipher_suites().iter().any(|offered| {
        suites
            .iter()
            .any(|s| s.suite() == *offered && s.usable_for_signature_algorithm(alg))
    });
    suite_fits && key.key.choose_scheme(hello.signature_schemes()).is_some()
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let usable = |c: &Certificate| client_can_use(&c.key, &hello);
        self.pick(hello.server_name(), usable)
            .map(|c| c.key.clone())
    }
}

/// Lower-case hex SHA-256, as `key_sha256` holds it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::validate::to_hex(&sha2::Sha256::digest(bytes))
}

/// Whether `s` is a SHA-256 as `key_sha256` holds it (64 lower-case hex digits).
pub fn is_sha256_hex(s: &str) -> bool {
    crate::validate::hex32(s).is_some()
}

/// What the gateway reads from a leaf certificate.
#[derive(Debug, PartialEq)]
pub struct Leaf {
    pub names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    /// Whether its extensions let it serve TLS, as OpenSSL's purpose check for a server
    /// takes it: no extended key usage, or one with `serverAuth` (or a server-gated-crypto
    /// purpose, Microsoft's or Netscape's); no key usage, or one with `digitalSignature`,
    /// `keyEncipherment` or `keyAgreement`; no Netscape certificate type, or one with its
    /// SSL server bit.
    pub serves_tls: bool,
}

/// Whether `der` is one whole X.509 certificate, as far as [`parse_leaf`] reads one (its
/// outer sequence spans exactly the bytes given).
fn is_certificate(der: &[u8]) -> bool {
    Der::read(der, 0x30).is_some_and(|(_, rest)| rest.is_empty()) && parse_leaf(der).is_some()
}

/// Reads the names and expiry from a DER certificate: a DER walk over the fields it needs
/// (RFC 5280 4.1), nothing more. `None` if the structure is not a certificate.
pub fn parse_leaf(der: &[u8]) -> Option<Leaf> {
    let (cert, _) = Der::read(der, 0x30)?;
    let (tbs, _) = Der::read(cert, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = Der::read(rest, 0xa0)?.1; // version
    }
    rest = Der::read(rest, 0x02)?.1; // serialNumber
    rest = Der::read(rest, 0x30)?.1; // signature
    rest = Der::read(rest, 0x30)?.1; // issuer
    let (validity, after) = Der::read(rest, 0x30)?;
    let ((tag, body), v) = Der::any(validity)?;
    let not_before = parse_time(tag, body)?;
    let ((tag, body), _) = Der::any(v)?;
    let not_after = parse_time(tag, body)?;
    let (subject, after) = Der::read(after, 0x30)?;
    let mut rest = Der::read(after, 0x30)?.1; // subjectPublicKeyInfo
    let mut names = Vec::new();
    let mut has_alt_names = false;
    let mut serves_tls = true;
    while let Some(((tag, body), next)) = Der::any(rest) {
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let (exts, _) = Der::read(body, 0x30)?;
        let mut exts = exts;
        while !exts.is_empty() {
            let (ext, next) = Der::read(exts, 0x30)?;
            exts = next;
            let (oid, mut ext_rest) = Der::read(ext, 0x06)?;
            if ext_rest.first() == Some(&0x01) {
                ext_rest = Der::read(ext_rest, 0x01)?.1; // critical
            }
            let (value, _) = Der::read(ext_rest, 0x04)?;
            match oid {
                // extKeyUsage: a list of purposes, serverAuth among them.
                [0x55, 0x1d, 0x25] => {
                    serves_tls &= Der::read(value, 0x30).is_some_and(|(mut list, _)| {
                        while let Some((purpose, next)) = Der::read(list, 0x06) {
                            // serverAuth, msSGC (1.3.6.1.4.1.311.10.3.3), nsSGC
                            // (2.16.840.1.113730.4.1), as OpenSSL's server check takes them.
                            if purpose == [0x2b, 6, 1, 5, 5, 7, 3, 1]
                                || purpose == [0x2b, 6, 1, 4, 1, 0x82, 0x37, 0x0a, 3, 3]
                                || purpose == [0x60, 0x86, 0x48, 1, 0x86, 0xf8, 0x42, 4, 1]
                            {
                                return true;
                            }
                            list = next;
                        }
                        false
                    });
                }
                // Netscape's certificate type (2.16.840.1.113730.1.1): a bit string whose
                // second bit is "SSL server".
                [0x60, 0x86, 0x48, 1, 0x86, 0xf8, 0x42, 1, 1] => {
                    serves_tls &= Der::read(value, 0x03)
                        .is_some_and(|(bits, _)| bits.get(1).is_some_and(|b| b & 0x40 != 0));
                }
                // keyUsage: a bit string whose first bits are digitalSignature (0),
                // nonRepudiation, keyEncipherment (2), dataEncipherment, keyAgreement (4).
                [0x55, 0x1d, 0x0f] => {
                    serves_tls &= Der::read(value, 0x03).is_some_and(|(bits, _)| {
                        bits.get(1).is_some_and(|b| b & (0x80 | 0x20 | 0x08) != 0)
                    });
                }
                _ => {}
            }
            if oid != [0x55, 0x1d, 0x11] {
                continue; // not subjectAltName
            }
            has_alt_names = true;
            let (mut general, _) = Der::read(value, 0x30)?;
            while !general.is_empty() {
                let (t, next) = Der::any(general)?;
                general = next;
                if t.0 == 0x82 {
                    let name = std::str::from_utf8(t.1).ok()?;
                    names.push(name.to_ascii_lowercase());
                }
            }
        }
    }
    if !has_alt_names {
        // No subjectAltName: the subject's last common name, as older clients read it. With
        // one (an IP address, a URI), clients never read the common name (RFC 6125 6.4.4).
        let mut rdns = subject;
        while !rdns.is_empty() {
            let (set, next) = Der::read(rdns, 0x31)?;
            rdns = next;
            let (atv, _) = Der::read(set, 0x30)?;
            let (oid, value) = Der::read(atv, 0x06)?;
            if oid == [0x55, 0x04, 0x03] {
                let (t, _) = Der::any(value)?;
                if let Ok(cn) = std::str::from_utf8(t.1) {
                    if !cn.is_empty() && !cn.contains(' ') {
                        names = vec![cn.to_ascii_lowercase()];
                    }
                }
            }
        }
    }
    Some(Leaf {
        names,
        not_before,
        not_after,
        serves_tls,
    })
}

/// DER tag-length-value reading.
struct Der;

/// One DER element, `(tag, body)`, and the input after it.
type Element<'a> = ((u8, &'a [u8]), &'a [u8]);

impl Der {
    /// The next element, whatever its tag: `((tag, body), rest)`.
    fn any(input: &[u8]) -> Option<Element<'_>> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let mut len = 0usize;
            for &b in &rest[..n] {
                len = (len << 8) | b as usize;
            }
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        Some(((tag, &rest[..len]), &rest[len..]))
    }

    /// The next element, which must have tag `tag`: `(body, rest)`.
    fn read(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let ((t, body), rest) = Der::any(input)?;
        (t == tag).then_some((body, rest))
    }
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, 0x18) to Unix
/// seconds.
fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match tag {
        0x17 if text.len() == 13 => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 15 => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let (h, m, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x17, b"491231235959"), None);
        assert_eq!(parse_time(0x18, b"2038011903140xZ"), None);
        for t in [0, 86_399, 1_700_000_000, 4_102_444_800] {
            let text = rfc3339(t);
            let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_digit).collect();
            let mut g = digits.clone();
            g.push(b'Z');
            assert_eq!(parse_time(0x18, &g), Some(t), "{text}");
        }
    }

    const API_PEM: &str = include_str!("../testdata/api.pem");
    const API_KEY: &str = include_str!("../testdata/api.key");
    const OTHER_PEM: &str = include_str!("../testdata/other.pem");
    const OTHER_KEY: &str = include_str!("../testdata/other.key");

    fn entry(cert: &str, key: &str) -> CertificateConfig {
        CertificateConfig {
            id: "c".into(),
            cert_pem: Some(cert.into()),
            key_pem: Some(key.into()),
            ..Default::default()
        }
    }

    fn field_of(e: ConfigError) -> String {
        e.path().to_owned()
    }

    #[test]
    fn a_good_pair_compiles_and_shows_names_expiry_and_digest() {
        let mut c = entry(API_PEM, API_KEY);
        let cert = compile_certificate(&mut c, "certificates[0]").unwrap();
        assert_eq!(cert.names, ["api.example", "*.api.example"]);
        assert_eq!(c.names, cert.names);
        assert!(c.not_after.as_deref().unwrap().starts_with("2126-"));
        assert_eq!(c.key_pem, None, "the key never stays in the config");
        assert_eq!(
            c.key_sha256.as_deref(),
            Some(&*sha256_hex(API_KEY.as_bytes()))
        );
        // An RSA certificate with only a common name.
        let mut o = entry(OTHER_PEM, OTHER_KEY);
        let other = compile_certificate(&mut o, "certificates[1]").unwrap();
        assert_eq!(other.names, ["other.example"]);
    }

    #[test]
    fn an_expired_certificate_is_refused_when_published_not_while_in_use() {
        let later = UNIX_EPOCH + std::time::Duration::from_secs(7_000_000_000);
        let now = SystemTime::now();
        let mut entries = vec![entry(API_PEM, API_KEY), entry(OTHER_PEM, OTHER_KEY)];
        entries[1].id = "o".into();
        let certs: Vec<Arc<Certificate>> = entries
            .iter_mut()
            .enumerate()
            .map(|(i, e)| Arc::new(compile_certificate(e, &format!("certificates[{i}]")).unwrap()))
            .collect();
        // Not expired: published whatever runs.
        refuse_newly_expired(&entries, &certs, &[], now).unwrap();
        // Expired and new (nothing runs, or what runs has another chain or id): refused,
        // naming the field the certificate came from.
        let e = refuse_newly_expired(&entries, &certs, &[], later).unwrap_err();
        assert!(e.to_string().contains("expired at 2126-"), "{e}");
        assert_eq!(field_of(e), "certificates[0].cert_pem");
        let mut from_file = entries.clone();
        from_file[0].cert_pem = None;
        from_file[0].cert_file = Some("/etc/gateway/api.pem".into());
        let e = refuse_newly_expired(&from_file, &certs, &[], later).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].cert_file");
        let e = refuse_newly_expired(&entries, &certs, &certs[1..], later).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].cert_pem");
        // Already served with the same id and chain: kept, expired or not.
        refuse_newly_expired(&entries, &certs, &certs, later).unwrap();
        assert_eq!(expired(&certs, now), []);
        let gone = expired(&certs, later);
        assert_eq!(gone.len(), 2);
        assert_eq!(gone[0].0, "c");
        assert!(gone[0].1.starts_with("2126-"), "{gone:?}");
        // Not valid yet (its notBefore more than the allowed clock difference away): refused
        // the same way, saying from when.
        let before = UNIX_EPOCH + std::time::Duration::from_secs(certs[0].not_before as u64);
        let e = refuse_newly_expired(
            &entries,
            &certs,
            &[],
            before - std::time::Duration::from_secs(600),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not valid before"), "{e}");
        assert_eq!(field_of(e), "certificates[0].cert_pem");
        refuse_newly_expired(
            &entries,
            &certs,
            &[],
            before - std::time::Duration::from_secs(60),
        )
        .unwrap();
    }

    #[test]
    fn bad_pairs_are_refused_naming_the_field() {
        let at = "certificates[0]";
        let e = compile_certificate(&mut entry(API_PEM, OTHER_KEY), at).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].key_pem");
        let e = compile_certificate(&mut entry("junk", API_KEY), at).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].cert_pem");
        let e = compile_certificate(&mut entry(API_PEM, "junk"), at).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].key_pem");
        // A digest with no key behind it, and a digest that is not the key's.
        let mut c = entry(API_PEM, API_KEY);
        c.key_pem = None;
        c.key_sha256 = Some("0".repeat(64));
        let e = compile_certificate(&mut c.clone(), at).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].key_sha256");
        c.stored_key = crate::config::StoredKey(Some(API_KEY.into()));
        let e = compile_certificate(&mut c, at).unwrap_err();
        assert_eq!(field_of(e), "certificates[0].key_sha256");
    }

    #[test]
    fn sni_prefers_exact_then_wildcard_then_the_first() {
        let mut a = entry(OTHER_PEM, OTHER_KEY);
        let mut b = entry(API_PEM, API_KEY);
        let first = Arc::new(compile_certificate(&mut a, "a").unwrap());
        let api = Arc::new(compile_certificate(&mut b, "b").unwrap());
        let r = SniResolver {
            certs: vec![first, api],
        };
        let pick = |n: Option<&str>| r.pick(n, |_| true).unwrap().names[0].clone();
        assert_eq!(pick(Some("api.example")), "api.example");
        assert_eq!(pick(Some("v1.api.example")), "api.example");
        // A wildcard covers one label only.
        assert_eq!(pick(Some("a.b.api.example")), "other.example");
        assert_eq!(pick(Some("unknown.test")), "other.example");
        assert_eq!(pick(None), "other.example");
    }

    #[test]
    fn among_certificates_for_one_name_the_first_the_client_can_use_wins() {
        let cert = |id: &str, pem: &str, key: &str| {
            let mut c = entry(pem, key);
            c.id = id.into();
            Arc::new(compile_certificate(&mut c, "c").unwrap())
        };
        let r = SniResolver {
            certs: vec![
                cert("other", OTHER_PEM, OTHER_KEY),
                cert("api-1", API_PEM, API_KEY),
                cert("api-2", API_PEM, API_KEY),
            ],
        };
        let pick = |n: Option<&str>, usable: &dyn Fn(&Certificate) -> bool| {
            r.pick(n, usable).unwrap().id.clone()
        };
        assert_eq!(pick(Some("api.example"), &|_| true), "api-1");
        assert_eq!(pick(Some("api.example"), &|c| c.id != "api-1"), "api-2");
        assert_eq!(pick(Some("v1.api.example"), &|c| c.id != "api-1"), "api-2");
        // None usable: the first, for the handshake to fail on as before.
        assert_eq!(pick(Some("api.example"), &|_| false), "api-1");
        // Without a match: the first usable of all.
        assert_eq!(pick(None, &|c| c.id == "api-2"), "api-2");
        // Certificates for the name, none usable: not another name's.
        assert_eq!(pick(Some("api.example"), &|c| c.id == "other"), "api-1");
        // A single candidate is taken without asking.
        let asked = std::cell::Cell::new(0);
        let r = SniResolver {
            certs: vec![cert("api-1", API_PEM, API_KEY)],
        };
        let counting = |_: &Certificate| {
            asked.set(asked.get() + 1);
            false
        };
        assert_eq!(r.pick(Some("api.example"), counting).unwrap().id, "api-1");
        assert_eq!(asked.get(), 0);
    }

    #[test]
    fn der_walk_refuses_truncated_input() {
        assert_eq!(parse_leaf(&[]), None);
        assert_eq!(parse_leaf(&[0x30, 0x05, 0x30, 0x03]), None);
        assert_eq!(parse_leaf(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
