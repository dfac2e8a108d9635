//! Compiling an upstream's config: targets (literal addresses or host names, never resolved
//! here), balancing, health checks, passive ejection, retries and circuit limits.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Balance, RetryConfig, RetryMethods, UpstreamConfig, UpstreamProtocol};
use crate::live::{LiveTarget, Passive, TargetSet, TargetState, UpstreamLive, FAILURE_KINDS};
use crate::snapshot::{
    Circuit, HashOn, HealthCheck, RetryPolicy, Target, Upstream, MAX_TARGETS, MAX_WEIGHT,
};
use crate::validate::check_id;
use crate::ConfigError;

/// Validates and compiles `upstreams[i]`, filling in what the gateway sets (`tls.ca_sha256`).
/// Its live set holds the literal addresses only; the control plane adds the resolved ones.
pub(crate) fn compile_upstream(
    u: &mut UpstreamConfig,
    i: usize,
    certs: &[std::sync::Arc<crate::tls::Certificate>],
) -> Result<Upstream, ConfigError> {
    let at = format!("upstreams[{i}]");
    let field = |name: &str, reason: String| ConfigError::field(format!("{at}.{name}"), reason);
    let within = |name: &str, v: u64, lo: u64, hi: u64| within(format!("{at}.{name}"), v, lo, hi);
    check_id(&u.id, &format!("{at}.id"))?;
    let srv = match &u.discovery {
        Some(d) => {
            if !u.targets.is_empty() {
                return Err(field(
                    "targets",
                    "must be empty when `discovery` finds the targets".into(),
                ));
            }
            if !valid_host(d.dns_srv.trim_end_matches('.')) {
                return Err(field(
                    "discovery.dns_srv",
                    format!("{:?} is not a DNS name", d.dns_srv),
                ));
            }
            Some(d.dns_srv.trim_end_matches('.').into())
        }
        None => {
            if u.targets.is_empty() || u.targets.len() > MAX_TARGETS {
                return Err(field(
                    "targets",
                    format!("must have 1 to {MAX_TARGETS} targets (or set `discovery`)"),
                ));
            }
            None
        }
    };
    let mut targets = Vec::with_capacity(u.targets.len());
    for (j, t) in u.targets.iter().enumerate() {
        let weight = t.weight.unwrap_or(1);
        within(
            &format!("targets[{j}].weight"),
            weight.into(),
            1,
            MAX_WEIGHT.into(),
        )?;
        let (addr, host) =
            parse_address(&t.address).map_err(|e| field(&format!("targets[{j}].address"), e))?;
        // The same target however it is spelled (`127.0.0.1:080`, `[0::1]:80`, a name's
        // case or final dot): a second entry would be merged into the first, its weight and
        // flags dropped without a word.
        if let Some(o) = (targets.iter()).find(|o: &&Target| (o.addr, &o.host) == (addr, &host)) {
            let at = format!("targets[{j}].address");
            if *o.address == *t.address {
                return Err(field(&at, format!("{:?} is listed twice", t.address)));
            }
            // Accepted before: a stored config keeps the first.
            let why = format!("{:?} is the target {:?} again", t.address, o.address);
            if crate::validate::tolerated(&at, &why) {
                continue;
            }
            return Err(field(&at, why));
        }
        targets.push(Target {
            address: t.address.as_str().into(),
            addr,
            host,
            weight,
            draining: t.draining,
            backup: t.backup,
        });
    }
    if u.discovery.is_none() && !targets.is_empty() && targets.iter().all(|t| t.backup) {
        return Err(field(
            "targets",
            "every target is a `backup`: at least one must not be (or set `discovery`)".into(),
        ));
    }
    let balance = u.balance.unwrap_or(Balance::RoundRobin);
    let hash_on = match (balance, &u.hash_on) {
        (Balance::Hash, Some(h)) => parse_hash_on(h).map_err(|e| field("hash_on", e))?,
        (Balance::Hash, None) => {
            return Err(field(
                "hash_on",
                "is required with balance = \"hash\"".into(),
            ))
        }
        (_, Some(_)) => {
            return Err(field(
                "hash_on",
                "only applies with balance = \"hash\"".into(),
            ))
        }
        (_, None) => HashOn::None,
    };
    let tls = match (&mut u.tls, u.protocol) {
        (None, UpstreamProtocol::H2) => {
            return Err(field(
                "protocol",
                "\"h2\" is HTTP/2 over TLS and needs `tls` (cleartext HTTP/2 is \"h2c\")".into(),
            ))
        }
        (Some(_), UpstreamProtocol::H2c) => {
            return Err(field(
                "protocol",
                "\"h2c\" is cleartext HTTP/2; over `tls` it is \"h2\"".into(),
            ))
        }
        (None, _) => None,
        (Some(t), p) => Some(crate::tls::compile_upstream_tls(
            t,
            p.is_h2(),
            certs,
            &format!("{at}.tls"),
        )?),
    };
    let health_check = match &u.health_check {
        None => None,
        Some(h) => {
            if !h.path.starts_with('/') || h.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(field(
                    "health_check.path",
                    "must start with `/` and hold no spaces or control characters".into(),
                ));
            }
            within("health_check.interval_ms", h.interval_ms, 100, 3_600_000)?;
            if !(1..=h.interval_ms).contains(&h.timeout_ms) {
                return Err(field(
                    "health_check.timeout_ms",
                    format!(
                        "must be between 1 and interval_ms ({}): a check ends before the next \
                         (the default, 1000, is too long for a shorter interval: set it too)",
                        h.interval_ms
                    ),
                ));
            }
            for (name, v) in [
                ("healthy_after", h.healthy_after),
                ("unhealthy_after", h.unhealthy_after),
            ] {
                within(&format!("health_check.{name}"), v.into(), 1, 100)?;
            }
            if h.expect_status.is_empty()
                || h.expect_status.iter().any(|s| !(100..=599).contains(s))
            {
                return Err(field(
                    "health_check.expect_status",
                    "must list 1 or more statuses from 200 to 599".into(),
                ));
            }
            // A check's status is its final answer's: interim ones are skipped, so a 1xx
            // listed could never pass (accepted before; a stored config's is left out).
            let mut expect = h.expect_status.clone();
            if expect.iter().any(|s| *s < 200) {
                let why = "a 1xx is an interim answer, which a check skips: must list \
                           statuses from 200 to 599";
                if !crate::validate::tolerated(&format!("{at}.health_check.expect_status"), why) {
                    return Err(field("health_check.expect_status", why.into()));
                }
                expect.retain(|s| *s >= 200);
                if expect.is_empty() {
                    expect.push(200);
                }
            }
            // A gRPC check passes on `grpc-status: 0` only (and SERVING): a failed call is
            // no HTTP status to list (before, one listing 503 passed a NOT_SERVING target).
            if u.protocol == UpstreamProtocol::Grpc && *expect != [200] {
                let why = "a grpc check passes on grpc-status 0 only: expect_status does \
                           not apply to it";
                if !crate::validate::tolerated(&format!("{at}.health_check.expect_status"), why) {
                    return Err(field("health_check.expect_status", why.into()));
                }
                expect = vec![200];
            }
            Some(HealthCheck {
                path: h.path.as_str().into(),
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms),
                healthy_after: h.healthy_after,
                unhealthy_after: h.unhealthy_after,
                expect_status: expect.into(),
                protocol: u.protocol,
                tls: tls.clone(),
            })
        }
    };
    let passive = match &u.passive {
        None => None,
        Some(p) => {
            within(
                "passive.consecutive_failures",
                p.consecutive_failures.into(),
                1,
                1000,
            )?;
            within("passive.ejection_ms", p.ejection_ms, 1, 3_600_000)?;
            within(
                "passive.max_ejected_percent",
                p.max_ejected_percent.into(),
                0,
                100,
            )?;
            Some(Passive {
                consecutive_failures: p.consecutive_failures,
                ejection_ms: p.ejection_ms,
                max_ejected_percent: p.max_ejected_percent,
            })
        }
    };
    let retry = match &u.retry {
        None => None,
        Some(r) => {
            within("retry.attempts", r.attempts.into(), 1, 10)?;
            within("retry.budget_percent", r.budget_percent.into(), 0, 100)?;
            if r.budget_min_per_s > 1_000_000 {
                return Err(field(
                    "retry.budget_min_per_s",
                    "must be at most 1000000".into(),
                ));
            }
            if let Some(t) = r.per_try_timeout_ms {
                within("retry.per_try_timeout_ms", t, 1, 86_400_000)?;
            }
            if let Some(t) = r.overall_timeout_ms {
                within("retry.overall_timeout_ms", t, 1, 86_400_000)?;
            }
            let backoff = match (r.backoff_ms, r.max_backoff_ms) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(field(
                        "retry.max_backoff_ms",
                        "bounds `backoff_ms`, which is not set".into(),
                    ))
                }
                (Some(base), max) => {
                    within("retry.backoff_ms", base, 1, 10_000)?;
                    let max = max.unwrap_or((base * 10).min(10_000));
                    within("retry.max_backoff_ms", max, base, 10_000)?;
                    Some((Duration::from_millis(base), Duration::from_millis(max)))
                }
            };
            let (mut on_kinds, mut on_status, mut on_grpc) = (0u8, 0u128, 0u32);
            // gRPC upstreams retry what gRPC clients retry: UNAVAILABLE, unless told otherwise.
            let grpc_default = ["grpc:UNAVAILABLE".to_owned()];
            let on = match u.protocol {
                UpstreamProtocol::Grpc if r.on == RetryConfig::default().on => &grpc_default[..],
                _ => &r.on[..],
            };
            for (k, name) in on.iter().enumerate() {
                match retry_on(name) {
                    Some(RetryOn::Kinds(bits)) => on_kinds |= bits,
                    Some(RetryOn::Status(s)) => on_status |= 1u128 << (s - 500),
                    Some(RetryOn::Grpc(c)) => on_grpc |= 1 << c,
                    None => {
                        return Err(field(
                            &format!("retry.on[{k}]"),
                            format!(
                                "{name:?} is not an error kind ({}, or the groups connect, \
                                 reset, timeout), a status from 500 to 599 or grpc:CODE \
                                 (a gRPC status name such as grpc:UNAVAILABLE)",
                                FAILURE_KINDS[..6].join(", ")
                            ),
                        ))
                    }
                }
            }
            if on_grpc != 0 && u.protocol != UpstreamProtocol::Grpc {
                return Err(field(
                    "retry.on",
                    "grpc:CODE entries need `protocol = \"grpc\"`".into(),
                ));
            }
            if on_grpc & (1 << GRPC_UNAVAILABLE) != 0 {
                // What a gRPC client sees as UNAVAILABLE when the gateway reports it.
                on_kinds |= retry_bits("connect") | retry_bits("reset");
            }
            Some(RetryPolicy {
                attempts: r.attempts,
                on_kinds,
                on_status,
                on_grpc,
                all_methods: r.methods == RetryMethods::All,
                budget_percent: r.budget_percent,
                budget_min_per_s: r.budget_min_per_s,
                per_try: r.per_try_timeout_ms.map(Duration::from_millis),
                overall: r.overall_timeout_ms.map(Duration::from_millis),
                backoff,
            })
        }
    };
    let circuit = match &u.circuit {
        None => None,
        Some(c) => {
            for (name, v) in [
                ("max_connections", c.max_connections),
                ("max_pending", c.max_pending),
                ("max_requests", c.max_requests),
            ] {
                if let Some(v) = v {
                    within(&format!("circuit.{name}"), v.into(), 1, 1_000_000)?;
                }
            }
            Some(Circuit {
                max_connections: c.max_connections.unwrap_or(u32::MAX),
                max_pending: c.max_pending.unwrap_or(u32::MAX),
                max_requests: c.max_requests.unwrap_or(u32::MAX),
            })
        }
    };
    let max_streams = match (u.protocol, u.max_streams) {
        (UpstreamProtocol::Http1, Some(_)) => {
            return Err(field(
                "max_streams",
                "applies to `protocol = \"h2c\"`, `\"h2\"` or `\"grpc\"` only".into(),
            ))
        }
        (_, Some(n)) => {
            within("max_streams", n.into(), 1, 1000)?;
            n
        }
        (_, None) => 100,
    };
    let mut timeouts = crate::snapshot::UpstreamTimeouts::default();
    if let Some(t) = &u.timeouts {
        let own = |name: &str, v: Option<u64>| -> Result<Option<Duration>, ConfigError> {
            match v {
                None => Ok(None),
                Some(ms) => {
                    within(&format!("timeouts.{name}"), ms, 1, 86_400_000)?;
                    Ok(Some(Duration::from_millis(ms)))
                }
            }
        };
        timeouts.connect = own("connect_ms", t.connect_ms)?;
        timeouts.response_head = own("response_head_ms", t.response_head_ms)?;
        timeouts.body = own("body_ms", t.body_ms)?;
        timeouts.send = own("send_ms", t.send_ms)?;
    }
    let live = UpstreamLive::new(literal_set(&targets));
    Ok(Upstream {
        id: u.id.as_str().into(),
        targets,
        srv,
        balance,
        hash_on,
        health_check,
        passive,
        retry,
        circuit,
        protocol: u.protocol,
        tls,
        max_streams,
        timeouts,
        live,
    })
}

/// The targets with literal addresses, with fresh states (what an upstream has before the
/// control plane adopts it).
fn literal_set(targets: &[Target]) -> TargetSet {
    TargetSet::new(
        targets
            .iter()
            .filter_map(|t| {
                Some(LiveTarget {
                    addr: t.addr?,
                    weight: t.weight,
                    host: None,
                    draining: t.draining,
                    backup: t.backup,
                    state: TargetState::new(),
                })
            })
            .collect(),
    )
}

enum RetryOn {
    Kinds(u8),
    Status(u16),
    Grpc(u8),
}

/// gRPC status 14.
pub const GRPC_UNAVAILABLE: u8 = 14;

/// The gRPC status codes by name (their index is the code).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The failure-kind bits of a `retry.on` group or kind name.
fn retry_bits(name: &str) -> u8 {
    match retry_on(name) {
        Some(RetryOn::Kinds(bits)) => bits,
        _ => 0,
    }
}

fn retry_on(name: &str) -> Option<RetryOn> {
    if let Some(code) = name.strip_prefix("grpc:") {
        let c = GRPC_CODES.iter().position(|n| *n == code)?;
        return (c > 0).then_some(RetryOn::Grpc(c as u8));
    }
    let bit = |kind: &str| 1u8 << FAILURE_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
    let kinds = match name {
        "connect" => bit("connect_failed") | bit("connect_timeout"),
        "reset" => bit("upstream_closed"),
        "timeout" => bit("connect_timeout") | bit("send_timeout") | bit("response_timeout"),
        _ => match FAILURE_KINDS[..6].iter().position(|k| *k == name) {
            Some(i) => 1 << i,
            None => {
                let s: u16 = name.parse().ok()?;
                return (500..600).contains(&s).then_some(RetryOn::Status(s));
            }
        },
    };
    Some(RetryOn::Kinds(kinds))
}

fn parse_hash_on(h: &str) -> Result<HashOn, String> {
    let token = |name: &str| !name.is_empty() && name.bytes().all(crate::snapshot::is_tchar);
    match h.split_once(':') {
        Some(("header", name)) if token(name) => {
            Ok(HashOn::Header(name.to_ascii_lowercase().into()))
        }
        Some(("cookie", name)) if token(name) => Ok(HashOn::Cookie(name.into())),
        None if h == "client_ip" => Ok(HashOn::ClientIp),
        None if h == "path" => Ok(HashOn::Path),
        _ => Err(format!(
            "{h:?} is not header:NAME, cookie:NAME, client_ip or path"
        )),
    }
}

/// A target address parsed: the literal address, or the host name and port.
type Parsed = (Option<SocketAddr>, Option<(Box<str>, u16)>);

/// A target address: a literal `IP:PORT`, or `HOST:PORT` with a DNS name.
pub fn parse_address(address: &str) -> Result<Parsed, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{address:?} has port 0"));
        }
        return Ok((Some(addr), None));
    }
    let bad = || format!("{address:?} is not IP:PORT or HOST:PORT with a port from 1 to 65535");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_end_matches('.');
    if port == 0 || !valid_host(host) {
        return Err(bad());
    }
    Ok((None, Some((host.to_ascii_lowercase().into(), port))))
}

/// A name server as `[resolver] nameservers` lists it: `IP:PORT`, or `IP` (port 53).
pub fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| {
        s.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// Most `[resolver] nameservers`: a lookup tries each in turn, each for up to `timeout_ms`,
/// and a config write waits for its new names' first lookups (glibc uses at most 3).
pub const MAX_NAMESERVERS: usize = 8;

/// Checks `[resolver]`.
pub(crate) fn check_resolver(r: &crate::config::ResolverConfig) -> Result<(), ConfigError> {
    if r.nameservers.len() > MAX_NAMESERVERS {
        return Err(ConfigError::field(
            "resolver.nameservers",
            format!("at most {MAX_NAMESERVERS} name servers"),
        ));
    }
    for (i, s) in r.nameservers.iter().enumerate() {
        if parse_nameserver(s).is_none_or(|a| a.port() == 0) {
            return Err(ConfigError::field(
                format!("resolver.nameservers[{i}]"),
                format!("{s:?} is not IP or IP:PORT"),
            ));
        }
    }
    within("resolver.min_ttl_ms".into(), r.min_ttl_ms, 1, 86_400_000)?;
    if !(r.min_ttl_ms..=86_400_000).contains(&r.max_ttl_ms) {
        return Err(ConfigError::field(
            "resolver.max_ttl_ms",
            "must be between min_ttl_ms and 86400000",
        ));
    }
    within("resolver.timeout_ms".into(), r.timeout_ms, 1, 60_000)?;
    Ok(())
}

/// `v` in `lo..=hi`, or the error "must be between LO and HI" at `path`.
pub(crate) fn within(path: String, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::field(
            path,
            format!("must be between {lo} and {hi}"),
        ))
    }
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_` (SRV names), each 1 to
/// 63 characters, 253 in all.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_literal_or_host_names_never_resolved_here() {
        let (a, h) = parse_address("127.0.0.1:80").unwrap();
        assert_eq!((a.unwrap().port(), h), (80, None));
        let (a, h) = parse_address("Catalog.Internal:8080").unwrap();
        assert_eq!((a, h), (None, Some(("catalog.internal".into(), 8080))));
        for bad in [
            "catalog",
            "catalog:0",
            "catalog:http",
            "a b:80",
            "1.2.3:80",
            ":80",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_on_takes_kinds_groups_and_statuses() {
        let Some(RetryOn::Kinds(k)) = retry_on("connect") else {
            panic!()
        };
        assert_eq!(k, 0b11);
        assert!(matches!(retry_on("503"), Some(RetryOn::Status(503))));
        assert!(retry_on("404").is_none() && retry_on("status_5xx").is_none());
        assert!(matches!(
            retry_on("upstream_malformed"),
            Some(RetryOn::Kinds(32))
        ));
    }
}
