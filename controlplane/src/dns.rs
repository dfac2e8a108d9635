//! A small DNS stub client for discovery: A, AAAA and SRV queries to the configured name
//! servers over UDP (TCP when an answer is truncated), with the answers' TTLs. Messages are
//! built and parsed with `simple-dns`; there is no cache here: the caller re-queries when the
//! TTL (clamped by `[resolver]`) runs out. Runs on the control plane's upstream thread, never
//! on a worker.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a lookup gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no name server answered within {0} ms")]
    Timeout(u128),
    #[error("no such name (NXDOMAIN)")]
    NxDomain,
    #[error("name server said {0}")]
    Rcode(String),
    #[error("no records in the answer")]
    Empty,
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// What a query answered: the records of the asked type and the smallest TTL among them.
#[derive(Debug)]
struct Answer {
    ips: Vec<IpAddr>,
    srv: Vec<Srv>,
    /// Addresses of SRV targets the server added (additional section), with their TTL.
    extra: Vec<(String, IpAddr, u32)>,
    ttl: u32,
    /// An SRV record with target `.`: the service is decidedly not available (RFC 2782).
    unavailable: bool,
}

/// Name servers and the per-server timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    /// Consult `/etc/hosts` first (the system's resolution: no `nameservers` configured).
    pub hosts_file: bool,
}

/// How long an `/etc/hosts` answer is kept before the file is read again.
const HOSTS_FILE_TTL: u32 = 30;

impl Resolver {
    /// `nameservers` as configured (`IP` or `IP:PORT`), or, when empty, the system's:
    /// `/etc/hosts` first, then the name servers of `/etc/resolv.conf`.
    pub fn new(nameservers: &[String], timeout: Duration) -> Result<Resolver, String> {
        let mut servers = Vec::new();
        for s in nameservers {
            servers.push(
                common::upstreams::parse_nameserver(s)
                    .ok_or_else(|| format!("{s:?} is not IP or IP:PORT"))?,
            );
        }
        let hosts_file = servers.is_empty();
        if hosts_file {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            servers = system_servers(&text);
        }
        Ok(Resolver {
            servers,
            timeout,
            hosts_file,
        })
    }

    /// The A and AAAA addresses of `host`, the smallest TTL of their records, and which
    /// family's query failed (`Some(true)`: A, `Some(false)`: AAAA) while the other answered:
    /// the caller keeps that family's last addresses rather than take its absence for an
    /// answer (the list may then be empty: the other family has none). Either family may be
    /// missing; both missing is [`DnsError::Empty`].
    pub async fn lookup_ip(
        &self,
        host: &str,
    ) -> Result<(Vec<IpAddr>, u32, Option<bool>), DnsError> {
        if self.hosts_file {
            // A small local file, read on the manager thread.
            let text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            let ips = hosts_file_lookup(&text, host);
            if !ips.is_empty() {
                return Ok((ips, HOSTS_FILE_TTL, None));
            }
        }
        let (a, aaaa) = tokio::join!(self.query(host, TYPE::A), self.query(host, TYPE::AAAA));
        let mut ips = Vec::new();
        let mut ttl = u32::MAX;
        let mut first_err = None;
        let mut failed = None;
        let mut failures = 0;
        for (v4, r) in [(true, a), (false, aaaa)] {
            match r {
                Ok(ans) if !ans.ips.is_empty() => {
                    ttl = ttl.min(ans.ttl);
                    ips.extend(ans.ips);
                }
                // No such name, or no records of the type: an answer.
                Ok(_) | Err(DnsError::NxDomain) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                    failed = Some(v4);
                    failures += 1;
                }
            }
        }
        if ips.is_empty() {
            // One family failed, the other answered that it has no addresses (NODATA or
            // NXDOMAIN, RFC 2308): that is an answer, and only the failed family's last
            // addresses stay (before, the failure stood for both families, and the other's
            // removed addresses stayed too).
            if let (Some(v4), 1) = (failed, failures) {
                // No record gave a TTL: asked again after `min_ttl_ms`, as after a failed
                // lookup (not the failing family's growing pause, meant for a name that still
                // has the other family's addresses).
                return Ok((Vec::new(), 0, Some(v4)));
            }
            return Err(first_err.unwrap_or(DnsError::Empty));
        }
        ips.sort();
        ips.dedup();
        Ok((ips, ttl, failed))
    }

    /// The SRV records of `name` (all priorities), the addresses the server added for their
    /// targets, and the smallest TTL.
    pub async fn lookup_srv(
        &self,
        name: &str,
    ) -> Result<(Vec<Srv>, Vec<(String, IpAddr, u32)>, u32), DnsError> {
        let ans = self.query(name, TYPE::SRV).await?;
        // "Not available here" is an answer: no targets (its TTL says when to ask again).
        if ans.srv.is_empty() && !ans.unavailable {
            return Err(DnsError::Empty);
        }
        Ok((ans.srv, ans.extra, ans.ttl))
    }

    async fn query(&self, name: &str, qtype: TYPE) -> Result<Answer, DnsError> {
        let id: u16 = rand_id();
        let mut packet = Packet::new_query(id);
        packet.set_flags(PacketFlag::RECURSION_DESIRED);
        let qname = Name::new(name).map_err(|e| DnsError::Malformed(e.to_string()))?;
        packet.questions.push(Question::new(
            qname,
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = packet
            .build_bytes_vec()
            .map_err(|e| DnsError::Malformed(e.to_string()))?;
        let mut last = DnsError::Timeout(self.timeout.as_millis());
        for &server in &self.servers {
            match self.ask(server, &bytes, id, name, qtype).await {
                Ok(a) => return Ok(a),
                // "No such name" is an answer; other refusals (SERVFAIL, REFUSED) try the
                // next server.
                Err(DnsError::NxDomain) => return Err(DnsError::NxDomain),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        name: &str,
        qtype: TYPE,
    ) -> Result<Answer, DnsError> {
        let bind: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = tokio::net::UdpSocket::bind(bind).await?;
        socket.connect(server).await?;
        socket.send(query).await?;
        let mut buf = vec![0u8; 4096];
        let timeout = DnsError::Timeout(self.timeout.as_millis());
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                .await
                .map_err(|_| DnsError::Timeout(self.timeout.as_millis()))??;
            let Ok(packet) = Packet::parse(&buf[..n]) else {
                continue; // not an answer to us
            };
            if packet.id() != id {
                continue;
            }
            if packet.has_flags(PacketFlag::TRUNCATION) {
                let tcp = self.ask_tcp(server, query, id, name, qtype);
                return tokio::time::timeout_at(deadline, tcp)
                    .await
                    .map_err(|_| timeout)?;
            }
            return read_answer(&packet, name, qtype);
        }
    }

    async fn ask_tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        name: &str,
        qtype: TYPE,
    ) -> Result<Answer, DnsError> {
        let mut s = tokio::net::TcpStream::connect(server).await?;
        let mut msg = (query.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(query);
        s.write_all(&msg).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await?;
        let packet = Packet::parse(&buf).map_err(|e| DnsError::Malformed(e.to_string()))?;
        if packet.id() != id {
            return Err(DnsError::Malformed("answer to another query".into()));
        }
        read_answer(&packet, name, qtype)
    }
}

/// The longest CNAME chain followed in an answer.
const MAX_CNAMES: usize = 16;

/// A name as compared: lower case, without the root's trailing dot.
fn plain_name(name: &impl ToString) -> String {
    name.to_string().trim_end_matches('.').to_ascii_lowercase()
}

/// The records of `packet` that answer `name` (`qtype`): those owned by the name or by the
/// end of the CNAME chain it starts, not others a server put beside them.
fn read_answer(packet: &Packet<'_>, name: &str, qtype: TYPE) -> Result<Answer, DnsError> {
    match packet.rcode() {
        RCODE::NoError => {}
        RCODE::NameError => return Err(DnsError::NxDomain),
        other => return Err(DnsError::Rcode(format!("{other:?}"))),
    }
    let mut ans = Answer {
        ips: Vec::new(),
        srv: Vec::new(),
        extra: Vec::new(),
        ttl: u32::MAX,
        unavailable: false,
    };
    // The name and its aliases, following CNAMEs in whatever order they come, for at most
    // MAX_CNAMES links (as resolvers bound a chain; a loop ends where it comes back).
    let cnames: HashMap<String, String> = (packet.answers.iter())
        .filter_map(|rr| match &rr.rdata {
            RData::CNAME(c) => Some((plain_name(&rr.name), plain_name(&c.0))),
            _ => None,
        })
        .collect();
    let mut owners = HashSet::from([plain_name(&name)]);
    let mut at = plain_name(&name);
    for _ in 0..MAX_CNAMES {
        match cnames.get(&at) {
            Some(next) if owners.insert(next.clone()) => at = next.clone(),
            _ => break,
        }
    }
    for rr in &packet.answers {
        if !owners.contains(&plain_name(&rr.name)) {
            continue;
        }
        match (&rr.rdata, qtype) {
            (RData::A(a), TYPE::A) => ans.ips.push(IpAddr::from(Ipv4Addr::from(a.address))),
            (RData::AAAA(a), TYPE::AAAA) => ans
                .ips
                .push(IpAddr::from(std::net::Ipv6Addr::from(a.address))),
            (RData::SRV(s), TYPE::SRV) => {
                let target = plain_name(&s.target);
                if target.is_empty() {
                    ans.unavailable = true;
                } else if !common::host_name(&target) {
                    // RFC 2782: a domain name. Anything else (a quote, a line end) would go
                    // on into the log, the metrics' labels and the next lookups.
                    log::warn!("resolver: SRV {name}: {target:?} is no host name: left out");
                    continue;
                } else if s.port == 0 {
                    log::warn!("resolver: SRV {name}: {target} with port 0 left out");
                    continue;
                } else {
                    ans.srv.push(Srv {
                        priority: s.priority,
                        weight: s.weight,
                        port: s.port,
                        target,
                    });
                }
            }
            // The aliases on the way: the answer lasts no longer than the shortest link.
            (RData::CNAME(_), _) => {}
            _ => continue,
        }
        ans.ttl = ans.ttl.min(ttl_of(rr.ttl));
    }
    if !ans.srv.is_empty() {
        // With other targets beside it, `.` means nothing.
        ans.unavailable = false;
    }
    for rr in &packet.additional_records {
        let ip = match &rr.rdata {
            RData::A(a) => IpAddr::from(Ipv4Addr::from(a.address)),
            RData::AAAA(a) => IpAddr::from(std::net::Ipv6Addr::from(a.address)),
            _ => continue,
        };
        ans.extra.push((plain_name(&rr.name), ip, ttl_of(rr.ttl)));
    }
    Ok(ans)
}

/// A record's TTL as RFC 2181 (8) says to read it: one with the top bit set is 0.
fn ttl_of(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 {
        0
    } else {
        ttl
    }
}

/// The addresses a hosts file gives `host` (case-insensitively, any of a line's names).
fn hosts_file_lookup(text: &str, host: &str) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            words.any(|n| n.eq_ignore_ascii_case(host)).then_some(ip)
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The `nameserver` lines of a resolv.conf (127.0.0.1:53 when there are none).
fn system_servers(text: &str) -> Vec<SocketAddr> {
    let servers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            let ip = rest.trim().split(['%', ' ', '\t']).next()?;
            ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect();
    if servers.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 53))]
    } else {
        servers
    }
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: writes at most 2 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 2, 0) };
    if n == 2 {
        u16::from_ne_bytes(b)
    } else {
        std::process::id() as u16
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_records_and_its_aliases_are_its_answer() {
        use simple_dns::rdata::{A, CNAME};
        use simple_dns::ResourceRecord;
        fn rr(name: &str, rdata: RData<'static>) -> ResourceRecord<'static> {
            let name = Name::new_unchecked(name).into_owned();
            ResourceRecord::new(name, CLASS::IN, 60, rdata)
        }
        fn a(ip: [u8; 4]) -> RData<'static> {
            RData::A(A {
                address: u32::from(Ipv4Addr::from(ip)),
            })
        }
        fn cname(to: &str) -> RData<'static> {
            RData::CNAME(CNAME(Name::new_unchecked(to).into_owned()))
        }
        let ips = |records: Vec<ResourceRecord<'static>>| {
            let mut p = Packet::new_reply(1);
            p.answers = records;
            read_answer(&p, "svc.test", TYPE::A).unwrap().ips
        };
        // A chain listed end first (svc -> b -> c), another name's address beside it, a loop
        // elsewhere: c's address only.
        let got = ips(vec![
            rr("c.test", a([127, 0, 0, 3])),
            rr("b.test", cname("c.test")),
            rr("Svc.Test.", cname("b.test")),
            rr("other.test", a([127, 0, 0, 9])),
            rr("x.test", cname("y.test")),
            rr("y.test", cname("x.test")),
        ]);
        assert_eq!(got, [IpAddr::from([127, 0, 0, 3])]);
        // A loop from the name itself ends, with nothing.
        let got = ips(vec![
            rr("svc.test", cname("b.test")),
            rr("b.test", cname("svc.test")),
        ]);
        assert!(got.is_empty());
        // A chain is followed for 16 links at most (listed end first: each pass of the old
        // walk added one name, cubic in the chain's length).
        let chain = |links: usize| {
            let mut records = vec![rr(&format!("n{links}.test"), a([127, 0, 0, 4]))];
            for i in (1..=links).rev() {
                records.push(rr(
                    &format!("n{}.test", i - 1),
                    cname(&format!("n{i}.test")),
                ));
            }
            records.push(rr("svc.test", cname("n0.test")));
            ips(records)
        };
        assert_eq!(chain(15), [IpAddr::from([127, 0, 0, 4])]);
        assert!(chain(3000).is_empty());
    }

    #[test]
    fn an_answer_lasts_as_long_as_its_shortest_record_and_a_top_bit_ttl_is_zero() {
        use simple_dns::rdata::{A, CNAME};
        use simple_dns::ResourceRecord;
        fn rr(name: &str, ttl: u32, rdata: RData<'static>) -> ResourceRecord<'static> {
            let name = Name::new_unchecked(name).into_owned();
            ResourceRecord::new(name, CLASS::IN, ttl, rdata)
        }
        let a = || {
            RData::A(A {
                address: u32::from(Ipv4Addr::new(127, 0, 0, 3)),
            })
        };
        let cname = || RData::CNAME(CNAME(Name::new_unchecked("b.test").into_owned()));
        let ttl = |records: Vec<ResourceRecord<'static>>| {
            let mut p = Packet::new_reply(1);
            p.answers = records;
            read_answer(&p, "svc.test", TYPE::A).unwrap().ttl
        };
        // The alias's 5 s, not the address's 600 s.
        assert_eq!(
            ttl(vec![rr("svc.test", 5, cname()), rr("b.test", 600, a())]),
            5
        );
        assert_eq!(
            ttl(vec![rr("svc.test", 600, cname()), rr("b.test", 60, a())]),
            60
        );
        // RFC 2181 (8): a TTL with the most significant bit set reads as 0, not 68 years.
        assert_eq!(ttl(vec![rr("svc.test", 0x8000_0005, a())]), 0);
        // Another name's short TTL does not count.
        assert_eq!(
            ttl(vec![rr("svc.test", 60, a()), rr("x.test", 1, cname())]),
            60
        );
    }

    #[test]
    fn hosts_file_names_match_any_alias_case_insensitively() {
        let text = "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n\
                    10.0.0.5 Catalog.Internal catalog\n# 10.0.0.6 catalog\n";
        assert_eq!(
            hosts_file_lookup(text, "localhost"),
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            hosts_file_lookup(text, "catalog.internal"),
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(hosts_file_lookup(text, "comment").is_empty());
    }

    #[test]
    fn resolv_conf_name_servers_are_read_with_port_53() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n";
        assert_eq!(
            system_servers(text),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(system_servers(""), vec!["127.0.0.1:53".parse().unwrap()]);
        let parse = common::upstreams::parse_nameserver;
        assert_eq!(parse("127.0.0.1:5353"), "127.0.0.1:5353".parse().ok());
        assert_eq!(parse("::1"), "[::1]:53".parse().ok());
        assert_eq!(parse("dns.example"), None);
    }
}
