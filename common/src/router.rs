//! The compiled router: picks a route for (host, path, method) without allocating.
//!
//! Hot path. Order, fixed and documented in the README:
//! 1. host: the exact host table, then wildcard hosts (longest suffix first), then routes without
//!    `hosts`;
//! 2. within a host table: the exact path, then parametrised paths (`/products/{id}`; at the
//!    first segment where two differ, a literal segment wins over a parameter), then path
//!    prefixes from the longest to the shortest;
//! 3. within one path entry: routes in config order whose `methods` contain the method.
//!
//! The first candidate whose methods match wins; when a more specific candidate exists but does
//! not accept the method, the search goes on to the less specific ones.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a: keys are short, trusted (they come from the config) and looked up per request, so
/// a cheap non-cryptographic hash is the right trade. Lookups use client bytes but cannot grow
/// the table, so hash flooding cannot hurt.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// Longest host name the router compares (RFC 1035 caps names at 253 octets).
pub const MAX_HOST_LEN: usize = 255;

/// One segment of a parametrised path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// Matches exactly these bytes.
    Literal(Box<[u8]>),
    /// Matches any one non-empty segment.
    Param,
}

/// Whether `path` (without its query) matches `pattern`; calls `capture` with each
/// parameter's segment, in order.
pub fn match_pattern<'a>(
    pattern: &[Seg],
    path: &'a [u8],
    mut capture: impl FnMut(&'a [u8]),
) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    let mut segs = rest.split(|&b| b == b'/');
    for p in pattern {
        let Some(seg) = segs.next() else {
            return false;
        };
        match p {
            Seg::Literal(l) if **l == *seg => {}
            Seg::Param if !seg.is_empty() => capture(seg),
            _ => return false,
        }
    }
    segs.next().is_none()
}

/// Routes sharing a host key, indexed by path.
#[derive(Debug, Default)]
pub(crate) struct PathTable {
    exact: FnvMap<Box<[u8]>, Vec<u32>>,
    /// Parametrised paths, most specific first (see the module's order).
    params: Vec<(Box<[Seg]>, Vec<u32>)>,
    prefix: FnvMap<Box<[u8]>, Vec<u32>>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Vec<usize>,
}

impl PathTable {
    pub(crate) fn insert_exact(&mut self, path: &[u8], route: u32) {
        self.exact.entry(path.into()).or_default().push(route);
    }

    pub(crate) fn insert_param(&mut self, path: &[u8], route: u32) {
        let pattern: Box<[Seg]> = path[1..]
            .split(|&b| b == b'/')
            .map(|s| {
                if s.first() == Some(&b'{') {
                    Seg::Param
                } else {
                    Seg::Literal(s.into())
                }
            })
            .collect();
        match self.params.iter_mut().find(|(p, _)| *p == pattern) {
            Some((_, ids)) => ids.push(route),
            None => self.params.push((pattern, vec![route])),
        }
        // Literal before parameter at the first difference; then fewer segments first.
        let rank = |p: &[Seg]| -> Vec<u8> {
            p.iter()
                .map(|s| u8::from(matches!(s, Seg::Param)))
                .collect()
        };
        self.params.sort_by_key(|(p, _)| rank(p));
    }

    pub(crate) fn insert_prefix(&mut self, prefix: &[u8], route: u32) {
        self.prefix.entry(prefix.into()).or_default().push(route);
        if !self.prefix_lens.contains(&prefix.len()) {
            self.prefix_lens.push(prefix.len());
            self.prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    fn find(&self, path: &[u8], mut accept: impl FnMut(u32) -> bool) -> Option<u32> {
        if let Some(ids) = self.exact.get(path) {
            if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                return Some(id);
            }
        }
        for (pattern, ids) in &self.params {
            if match_pattern(pattern, path, |_| {}) {
                if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                    return Some(id);
                }
            }
        }
        for &len in &self.prefix_lens {
            if len > path.len() {
                continue;
            }
            let Some(ids) = self.prefix.get(&path[..len]) else {
                continue;
            };
            // A prefix matches at a segment boundary, or anywhere when it ends with '/'.
            let boundary = len == path.len() || path[len] == b'/' || path[len - 1] == b'/';
            if !boundary {
                continue;
            }
            if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                return Some(id);
            }
        }
        None
    }
}

/// Host tables, built by [`crate::Snapshot::compile`].
#[derive(Debug, Default)]
pub struct Router {
    pub(crate) exact_hosts: FnvMap<Box<[u8]>, PathTable>,
    /// `(".example.com", table)`, longest suffix first.
    pub(crate) wildcard_hosts: Vec<(Box<[u8]>, PathTable)>,
    pub(crate) any_host: PathTable,
}

impl Router {
    /// Finds the route for a request. `host` is the `Host` value (or absolute-form authority)
    /// as received, possibly with a port; `path` is the target before `?`. `accept` is asked
    /// whether a candidate route takes the request's method.
    pub fn find(
        &self,
        host: Option<&[u8]>,
        path: &[u8],
        mut accept: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        let mut lower = [0u8; MAX_HOST_LEN];
        if let Some(host) = host.and_then(|h| normalize_host(h, &mut lower)) {
            if let Some(table) = self.exact_hosts.get(host) {
                if let Some(id) = table.find(path, &mut accept) {
                    return Some(id);
                }
            }
            for (suffix, table) in &self.wildcard_hosts {
                if host.len() > suffix.len() && host.ends_with(suffix) {
                    if let Some(id) = table.find(path, &mut accept) {
                        return Some(id);
                    }
                }
            }
        }
        self.any_host.find(path, accept)
    }
}

/// Strips the port and lower-cases `host` into `out`; `None` when it is too long to match any
/// configured host.
pub fn normalize_host<'a>(host: &[u8], out: &'a mut [u8; MAX_HOST_LEN]) -> Option<&'a [u8]> {
    let name = if host.first() == Some(&b'[') {
        // IP literal: keep the brackets, drop ":port" after them.
        let end = host.iter().position(|&b| b == b']')?;
        &host[..=end]
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    // A trailing dot names the same host (RFC 1034 absolute name).
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.len() > MAX_HOST_LEN {
        return None;
    }
    let out = &mut out[..name.len()];
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalization() {
        let mut b = [0u8; MAX_HOST_LEN];
        assert_eq!(
            normalize_host(b"API.Example.com:8080", &mut b),
            Some(&b"api.example.com"[..])
        );
        assert_eq!(normalize_host(b"[::1]:80", &mut b), Some(&b"[::1]"[..]));
        assert_eq!(normalize_host(b"a.b.", &mut b), Some(&b"a.b"[..]));
        assert_eq!(normalize_host(&[b'a'; 300], &mut b), None);
    }

    #[test]
    fn parametrised_paths_rank_between_exact_and_prefix() {
        let mut t = PathTable::default();
        t.insert_prefix(b"/products", 0);
        t.insert_param(b"/products/{id}", 1);
        t.insert_exact(b"/products/new", 2);
        t.insert_param(b"/products/{id}/reviews", 3);
        t.insert_param(b"/{kind}/special", 4);
        t.insert_param(b"/products/{x}/{y}", 5);
        t.insert_param(b"/products/top/{n}", 6);
        assert_eq!(t.find(b"/products/7", |_| true), Some(1));
        assert_eq!(t.find(b"/products/new", |_| true), Some(2));
        assert_eq!(t.find(b"/products/7/reviews", |_| true), Some(3));
        // Literal `products` wins over `{kind}` at the first segment.
        assert_eq!(t.find(b"/products/special", |_| true), Some(1));
        assert_eq!(t.find(b"/things/special", |_| true), Some(4));
        assert_eq!(t.find(b"/products/top/3", |_| true), Some(6));
        assert_eq!(t.find(b"/products/a/b", |_| true), Some(5));
        // An empty segment is no parameter value: the prefix route takes it.
        assert_eq!(t.find(b"/products/", |_| true), Some(0));
        assert_eq!(t.find(b"/products/1/2/3", |_| true), Some(0));
        let mut got = Vec::new();
        let p = [Seg::Literal((*b"p").into()), Seg::Param, Seg::Param];
        assert!(match_pattern(&p, b"/p/a%20b/c", |v| got.push(v.to_vec())));
        assert_eq!(got, vec![b"a%20b".to_vec(), b"c".to_vec()]);
        assert!(!match_pattern(&p, b"/p/a", |_| {}));
    }

    #[test]
    fn prefix_segment_boundary() {
        let mut t = PathTable::default();
        t.insert_prefix(b"/api", 0);
        t.insert_prefix(b"/static/", 1);
        assert_eq!(t.find(b"/api", |_| true), Some(0));
        assert_eq!(t.find(b"/api/v1", |_| true), Some(0));
        assert_eq!(t.find(b"/apix", |_| true), None);
        assert_eq!(t.find(b"/static/a.css", |_| true), Some(1));
        assert_eq!(t.find(b"/static", |_| true), None);
    }
}
