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
    /// Parametrised paths, a segment per level (see [`ParamNode`]).
    params: ParamNode,
    prefix: FnvMap<Box<[u8]>, Vec<u32>>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Vec<usize>,
    /// The prefixes as servers read them that decode escaped slashes and drop `;`
    /// parameters (see [`as_read`]), and their lengths, longest first.
    read_prefix: FnvMap<Box<[u8]>, Vec<u32>>,
    read_lens: Vec<usize>,
}

/// How a path found its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    /// By `path`: the path as it is names it.
    Exact,
    /// By a `{name}` pattern.
    Pattern,
    Prefix,
}

/// Most segments a parametrised path may have: the lookup descends one level per segment,
/// recursively, so a bound keeps its stack small.
pub const MAX_PARAM_SEGMENTS: usize = 64;

/// A level of the parametrised paths' tree: one node per distinct leading run of segments
/// (parameters counted alike), so a lookup costs the request path's segments, not the
/// number of routes.
#[derive(Debug, Default)]
struct ParamNode {
    /// Routes whose pattern ends here, in config order.
    routes: Vec<u32>,
    /// The next segment when it is literal.
    literal: FnvMap<Box<[u8]>, ParamNode>,
    /// The next segment when it is a parameter.
    param: Option<Box<ParamNode>>,
}

impl ParamNode {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.param.is_none()
    }

    /// The first route accepted among the patterns below this node that match `rest` (the
    /// segments still to match; `None` when none is left), and where in the path the last
    /// literal segment it matched ends (`at`: where `rest` starts; `literal`: that end so
    /// far). The module's order falls out of the walk: a literal child is tried before the
    /// parameter, and only patterns with as many segments as the path can match it.
    fn find(
        &self,
        rest: Option<&[u8]>,
        at: usize,
        literal: usize,
        accept: &mut impl FnMut(u32) -> bool,
    ) -> Option<(u32, usize)> {
        let Some(rest) = rest else {
            let id = self.routes.iter().copied().find(|&id| accept(id))?;
            return Some((id, literal));
        };
        let (seg, next) = match rest.iter().position(|&b| b == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let end = at + seg.len();
        if !self.literal.is_empty() {
            let found = self.literal.get(seg);
            if let Some(found) = found.and_then(|n| n.find(next, end + 1, end, accept)) {
                return Some(found);
            }
        }
        match &self.param {
            // A parameter is never empty.
            Some(n) if !seg.is_empty() => n.find(next, end + 1, literal, accept),
            _ => None,
        }
    }
}

impl PathTable {
    pub(crate) fn insert_exact(&mut self, path: &[u8], route: u32) {
        self.exact.entry(path.into()).or_default().push(route);
    }

    /// Adds a parametrised path (`/products/{id}`), of at most [`MAX_PARAM_SEGMENTS`].
    pub(crate) fn insert_param(&mut self, path: &[u8], route: u32) {
        let mut node = &mut self.params;
        for s in path[1..].split(|&b| b == b'/') {
            node = if s.first() == Some(&b'{') {
                node.param.get_or_insert_with(Default::default)
            } else {
                node.literal.entry(s.into()).or_default()
            };
        }
        node.routes.push(route);
    }

    pub(crate) fn insert_prefix(&mut self, prefix: &[u8], route: u32) {
        self.prefix.entry(prefix.into()).or_default().push(route);
        if !self.prefix_lens.contains(&prefix.len()) {
            self.prefix_lens.push(prefix.len());
            self.prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        }
        let read = read_as_servers_do(prefix).map_or_else(|| prefix.to_vec(), |(r, _)| r);
        if !self.read_lens.contains(&read.len()) {
            self.read_lens.push(read.len());
            self.read_lens.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.read_prefix.entry(read.into()).or_default().push(route);
    }

    /// The route for `path`, and how it matched. A prefix matches at a segment boundary, or
    /// anywhere when it ends with '/'; and at what servers read as one (see
    /// [`ends_segment`]).
    fn find(&self, path: &[u8], mut accept: impl FnMut(u32) -> bool) -> Option<(u32, Match)> {
        if let Some((id, how, _)) = self.exact_or_pattern(path, &mut accept) {
            return Some((id, how));
        }
        for &len in &self.prefix_lens {
            if len > path.len() {
                continue;
            }
            let ids = match self.prefix.get(&path[..len]) {
                Some(ids) if len == path.len() || path[len - 1] == b'/' => ids,
                Some(ids) if ends_segment(&path[len..]) => ids,
                _ => match self.with_escaped_slash(path, len) {
                    Some(ids) => ids,
                    None => continue,
                },
            };
            if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                return Some((id, Match::Prefix));
            }
        }
        None
    }

    /// The route an `exact` path or a `{name}` pattern gives `path`, how, and where in
    /// `path` the literal part of what matched ends (all of it for an exact path).
    fn exact_or_pattern(
        &self,
        path: &[u8],
        accept: &mut impl FnMut(u32) -> bool,
    ) -> Option<(u32, Match, usize)> {
        if let Some(ids) = self.exact.get(path) {
            if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                return Some((id, Match::Exact, path.len()));
            }
        }
        let params = &self.params;
        if let (Some(rest), false) = (path.strip_prefix(b"/"), params.is_empty()) {
            if let Some((id, literal)) = params.find(Some(rest), 1, 1, &mut *accept) {
                return Some((id, Match::Pattern, literal));
            }
        }
        None
    }

    /// The route for `read`, a path as servers read it that decode escaped slashes and
    /// drop `;` parameters ([`as_read`]), its prefixes read so too; and where in `read` the
    /// literal part of what matched ends (a prefix's end; a pattern's last literal segment's).
    fn find_read(&self, read: &[u8], mut accept: impl FnMut(u32) -> bool) -> Option<(u32, usize)> {
        if let Some((id, _, literal)) = self.exact_or_pattern(read, &mut accept) {
            return Some((id, literal));
        }
        for &len in &self.read_lens {
            if len > read.len() {
                continue;
            }
            let Some(ids) = self.read_prefix.get(&read[..len]) else {
                continue;
            };
            let boundary = len == read.len() || read[len] == b'/' || read[len - 1] == b'/';
            if !boundary {
                continue;
            }
            if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                return Some((id, len));
            }
        }
        None
    }

    /// The routes of a prefix of length `len` that ends with '/', where `path` has an escaped
    /// `/` or `\\` there (`/admin%2Fsecret` under `/admin/`; see [`ends_segment`]).
    fn with_escaped_slash(&self, path: &[u8], len: usize) -> Option<&Vec<u32>> {
        let escape = path.get(len - 1..len + 2)?;
        if escape != b"%2F" && escape != b"%5C" {
            return None;
        }
        let mut key = path[..len].to_vec();
        key[len - 1] = b'/';
        self.prefix.get(&key[..])
    }
}

/// Whether `rest`, the path after a prefix, starts a new segment, or parameters of the last
/// one, as servers read it: a `/`, a `;` (servlet containers drop `;` parameters), a `\\`
/// (Windows servers), or an escaped `/` or `\\` (most frameworks decode them before they
/// route; request paths have their escapes upper-cased). So `/admin%2Fsecret` and
/// `/admin;x/secret` are `/admin`'s, as nginx, Envoy and Kong, which match prefixes as
/// strings, have them.
fn ends_segment(rest: &[u8]) -> bool {
    matches!(rest.first(), Some(b'/' | b';' | b'\\'))
        || rest.starts_with(b"%2F")
        || rest.starts_with(b"%5C")
}

/// `path` as servers read it that decode an escaped `/` or `\\` before they route (Flask, most
/// frameworks; `%2F`, `%5C`), take `\\` for `/` (Windows servers), or drop `;` parameters
/// (servlet containers): those as `/`, the parameters left out, and a `/` so made merged
/// with one beside it (runs of `/` the path had are left to `merge_slashes`); and where in
/// it the first change is. `None` when it has none of them (most paths: one scan, nothing
/// made).
#[inline]
fn as_read(path: &[u8]) -> Option<(Vec<u8>, usize)> {
    if !path.iter().any(|&b| matches!(b, b'%' | b';' | b'\\')) {
        return None;
    }
    read_as_servers_do(path)
}

/// [`as_read`] for a path with a `%`, `;` or `\\` in it.
fn read_as_servers_do(path: &[u8]) -> Option<(Vec<u8>, usize)> {
    let escaped = |i: usize| {
        let e = path.get(i..i + 3)?;
        (e.eq_ignore_ascii_case(b"%2F") || e.eq_ignore_ascii_case(b"%5C")).then_some(())
    };
    let any = path
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b';' || b == b'\\' || (b == b'%' && escaped(i).is_some()));
    if !any {
        return None;
    }
    let mut out = Vec::with_capacity(path.len());
    // The last byte out is a `/` the reading made.
    let mut made = false;
    let mut first = None;
    let mut i = 0;
    while i < path.len() {
        let slash = match path[i] {
            b'\\' => Some(1),
            b'%' if escaped(i).is_some() => Some(3),
            _ => None,
        };
        if let Some(n) = slash {
            first.get_or_insert(out.len());
            if out.last() != Some(&b'/') {
                out.push(b'/');
            }
            made = true;
            i += n;
        } else if path[i] == b';' {
            // The parameters, up to the segment's end: a segment of them alone leaves a `/`
            // beside the next one, which servers merge (`/admin/;x/secret`).
            first.get_or_insert(out.len());
            while i < path.len() && path[i] != b'/' && path[i] != b'\\' && escaped(i).is_none() {
                i += 1;
            }
            made = true;
        } else if path[i] == b'/' && made && out.last() == Some(&b'/') {
            i += 1;
            made = false;
        } else {
            out.push(path[i]);
            made = false;
            i += 1;
        }
    }
    Some((out, first.unwrap_or(0)))
}

/// A configured host (lower-cased, without its trailing dot) as [`normalize_host`] writes a
/// request's: an IPv6 literal in RFC 5952's form.
pub(crate) fn canonical_host(name: &str) -> std::borrow::Cow<'_, str> {
    let ip = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .and_then(|n| n.parse::<std::net::Ipv6Addr>().ok());
    match ip {
        Some(ip) => format!("[{ip}]").into(),
        None => name.into(),
    }
}

/// Host tables, built by [`crate::Snapshot::compile`].
#[derive(Debug, Default)]
pub struct Router {
    pub(crate) exact_hosts: FnvMap<Box<[u8]>, PathTable>,
    /// By suffix: `*.example.com`'s table under `.example.com`.
    pub(crate) wildcard_hosts: FnvMap<Box<[u8]>, PathTable>,
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
        self.walk(host, |t| t.find(path, &mut accept))
            .map(|(id, _)| id)
    }

    /// [`Router::find`], and whether the path is ambiguous: it has an escaped `/` or `\\`, a
    /// raw `\\` or `;` parameters, and servers that decode or drop those (see [`as_read`])
    /// read it as another route's than the prefix route it matches as it is
    /// (`/v1%2Fadmin/x` under `/v1`, `/v1/admin`'s to them). Such a request is refused: its
    /// route's policies, or its `strip_prefix`, would depend on how the upstream reads it.
    /// A path an exact `path` takes as it is stays its; so does one a `{name}` pattern takes,
    /// unless the route it is read as names, literally, what the reading changed
    /// (`/users/admin%2Fx` under `/users/{id}` is `/users/admin`'s to them; `/products/a%2Fb`
    /// stays `/products/{id}`'s beside `/products`).
    pub fn find_as_read(
        &self,
        host: Option<&[u8]>,
        path: &[u8],
        mut accept: impl FnMut(u32) -> bool,
    ) -> Option<(u32, bool)> {
        let (id, how) = self.walk(host, |t| t.find(path, &mut accept))?;
        if how == Match::Exact {
            return Some((id, false));
        }
        let Some((read, changed)) = as_read(path) else {
            return Some((id, false));
        };
        let other = self.walk(host, |t| t.find_read(&read, &mut accept));
        let ambiguous = match (how, other) {
            (Match::Pattern, Some((other, literal))) => other != id && literal >= changed,
            (Match::Pattern, None) => false,
            _ => other.map(|(other, _)| other) != Some(id),
        };
        Some((id, ambiguous))
    }

    /// The first table of `host` (its exact name's, its wildcards' from the longest, then
    /// any host's) where `look` finds a route.
    fn walk<T>(
        &self,
        host: Option<&[u8]>,
        mut look: impl FnMut(&PathTable) -> Option<T>,
    ) -> Option<T> {
        let mut lower = [0u8; MAX_HOST_LEN];
        if let Some(host) = host.and_then(|h| normalize_host(h, &mut lower)) {
            if let Some(table) = self.exact_hosts.get(host) {
                if let Some(found) = look(table) {
                    return Some(found);
                }
            }
            if !self.wildcard_hosts.is_empty() {
                // Each suffix from a dot, the longest first; never the whole host.
                for (i, _) in host.iter().enumerate().skip(1).filter(|(_, &b)| b == b'.') {
                    let Some(table) = self.wildcard_hosts.get(&host[i..]) else {
                        continue;
                    };
                    if let Some(found) = look(table) {
                        return Some(found);
                    }
                }
            }
        }
        look(&self.any_host)
    }
}

/// Strips the port and lower-cases `host` into `out`; `None` when it is too long to match any
/// configured host. An IPv6 literal is written as RFC 5952 writes it (`[0:0::1]` is
/// `[::1]`), as configured hosts are ([`canonical_host`]).
pub fn normalize_host<'a>(host: &[u8], out: &'a mut [u8; MAX_HOST_LEN]) -> Option<&'a [u8]> {
    let name = if host.first() == Some(&b'[') {
        // IP literal: keep the brackets, drop ":port" after them.
        let end = host.iter().position(|&b| b == b']')?;
        let ip = std::str::from_utf8(&host[1..end]).ok();
        if let Some(ip) = ip.and_then(|s| s.parse::<std::net::Ipv6Addr>().ok()) {
            use std::io::Write as _;
            let mut w = &mut out[..];
            write!(w, "[{ip}]").ok()?;
            let n = MAX_HOST_LEN - w.len();
            return Some(&out[..n]);
        }
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

    /// The route [`PathTable::find`] gives `path`.
    fn look(t: &PathTable, path: &[u8], accept: impl FnMut(u32) -> bool) -> Option<u32> {
        t.find(path, accept).map(|f| f.0)
    }

    #[test]
    fn host_normalization() {
        let mut b = [0u8; MAX_HOST_LEN];
        assert_eq!(
            normalize_host(b"API.Example.com:8080", &mut b),
            Some(&b"api.example.com"[..])
        );
        assert_eq!(normalize_host(b"[::1]:80", &mut b), Some(&b"[::1]"[..]));
        // An IPv6 literal as RFC 5952 writes it, on both sides (an audit found a domain
        // policy's `[0:0:0:0:0:0:0:1]` refusing `Host: [::1]`).
        assert_eq!(normalize_host(b"[0:0::1]:80", &mut b), Some(&b"[::1]"[..]));
        assert_eq!(
            normalize_host(b"[2001:DB8:0:0::1]", &mut b),
            Some(&b"[2001:db8::1]"[..])
        );
        assert_eq!(canonical_host("[0:0:0:0:0:0:0:1]"), "[::1]");
        assert_eq!(canonical_host("api.example.com"), "api.example.com");
        // A zone id is no address: left as written.
        assert_eq!(
            normalize_host(b"[fe80::1%25eth0]", &mut b),
            Some(&b"[fe80::1%25eth0]"[..])
        );
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
        assert_eq!(look(&t, b"/products/7", |_| true), Some(1));
        assert_eq!(look(&t, b"/products/new", |_| true), Some(2));
        assert_eq!(look(&t, b"/products/7/reviews", |_| true), Some(3));
        // Literal `products` wins over `{kind}` at the first segment.
        assert_eq!(look(&t, b"/products/special", |_| true), Some(1));
        assert_eq!(look(&t, b"/things/special", |_| true), Some(4));
        assert_eq!(look(&t, b"/products/top/3", |_| true), Some(6));
        assert_eq!(look(&t, b"/products/a/b", |_| true), Some(5));
        // An empty segment is no parameter value: the prefix route takes it.
        assert_eq!(look(&t, b"/products/", |_| true), Some(0));
        assert_eq!(look(&t, b"/products/1/2/3", |_| true), Some(0));
        let mut got = Vec::new();
        let p = [Seg::Literal((*b"p").into()), Seg::Param, Seg::Param];
        assert!(match_pattern(&p, b"/p/a%20b/c", |v| got.push(v.to_vec())));
        assert_eq!(got, vec![b"a%20b".to_vec(), b"c".to_vec()]);
        assert!(!match_pattern(&p, b"/p/a", |_| {}));
    }

    /// The order the tree must keep, as the router had it before: every pattern in a list,
    /// ranked by where its parameters are (a literal first at the first difference), and
    /// each tried in turn.
    fn find_by_scanning(
        patterns: &[(Vec<u8>, u32)],
        path: &[u8],
        accept: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        let mut list: Vec<(Vec<Seg>, u32)> = patterns
            .iter()
            .map(|(p, id)| {
                let segs = p[1..]
                    .split(|&b| b == b'/')
                    .map(|s| match s.first() {
                        Some(b'{') => Seg::Param,
                        _ => Seg::Literal(s.into()),
                    })
                    .collect();
                (segs, *id)
            })
            .collect();
        list.sort_by_key(|(p, _)| {
            p.iter()
                .map(|s| matches!(s, Seg::Param))
                .collect::<Vec<_>>()
        });
        list.iter()
            .find(|(p, id)| match_pattern(p, path, |_| {}) && accept(*id))
            .map(|(_, id)| *id)
    }

    #[test]
    fn the_parameter_tree_finds_what_a_scan_in_rank_order_finds() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut compared = 0;
        for _ in 0..300 {
            let mut t = PathTable::default();
            let mut patterns = Vec::new();
            for id in 0..next(12) as u32 + 1 {
                let mut p = Vec::new();
                for _ in 0..next(4) + 1 {
                    p.push(b'/');
                    p.extend_from_slice(["a", "b", "", "{p}", "{q}"][next(5)].as_bytes());
                }
                t.insert_param(&p, id);
                patterns.push((p, id));
            }
            // Routes whose methods a request may not have: the walk goes on past them.
            let refused = next(4) as u32;
            let accept = |id: u32| id % 4 != refused;
            for _ in 0..40 {
                let mut path = Vec::new();
                for _ in 0..next(5) + 1 {
                    path.push(b'/');
                    path.extend_from_slice(["a", "b", "", "c"][next(4)].as_bytes());
                }
                let want = find_by_scanning(&patterns, &path, accept);
                assert_eq!(look(&t, &path, accept), want, "{patterns:?} {path:?}");
                compared += usize::from(want.is_some());
            }
        }
        // The draw must reach both outcomes often (of 12,000 lookups).
        assert!((1000..11_000).contains(&compared), "{compared}");
    }

    #[test]
    fn prefix_segment_boundary() {
        let mut t = PathTable::default();
        t.insert_prefix(b"/api", 0);
        t.insert_prefix(b"/static/", 1);
        assert_eq!(look(&t, b"/api", |_| true), Some(0));
        assert_eq!(look(&t, b"/api/v1", |_| true), Some(0));
        assert_eq!(look(&t, b"/apix", |_| true), None);
        assert_eq!(look(&t, b"/static/a.css", |_| true), Some(1));
        assert_eq!(look(&t, b"/static", |_| true), None);
        // Spellings servers read as under the prefix: its policies hold for them (before:
        // all went to the catch-all, and an upstream decoding `%2F` served them).
        t.insert_prefix(b"/", 2);
        for path in [
            &b"/api%2Fsecret"[..],
            b"/api%5Csecret",
            b"/api;x/secret",
            b"/api;x",
            b"/api\\secret",
        ] {
            let found = look(&t, path, |_| true);
            assert_eq!(found, Some(0), "{:?}", String::from_utf8_lossy(path));
        }
        assert_eq!(look(&t, b"/static%2Fa.css", |_| true), Some(1));
        assert_eq!(look(&t, b"/static%5Ca.css", |_| true), Some(1));
        assert_eq!(look(&t, b"/static%2", |_| true), Some(2));
        assert_eq!(look(&t, b"/static%20a", |_| true), Some(2));
        assert_eq!(look(&t, b"/api%20x", |_| true), Some(2));
        assert_eq!(look(&t, b"/apix;y", |_| true), Some(2));
    }

    #[test]
    fn a_path_servers_read_as_another_prefix_routes_is_ambiguous() {
        let mut t = PathTable::default();
        for (i, p) in [&b"/"[..], b"/v1", b"/v1/admin", b"/adm2/", b"/repos/g%2Fs"]
            .iter()
            .enumerate()
        {
            t.insert_prefix(p, i as u32);
        }
        t.insert_param(b"/users/{id}", 5);
        let router = Router {
            any_host: t,
            ..Router::default()
        };
        let find = |path: &[u8]| router.find_as_read(None, path, |_| true);
        let read = |path: &[u8]| as_read(path).map(|(read, _)| read);
        // `/v1/admin`'s to a decoding upstream, `/v1`'s or the catch-all's as it is: refused
        // (the review found a first fix serving these past `/v1/admin`'s policies).
        for path in [
            &b"/v1%2Fadmin/x"[..],
            b"/v1%5Cadmin/x",
            b"/v1;y/admin/x",
            b"/v1\\admin",
            b"/adm2;x/secret",
            b"/v1/;x/admin/y",
        ] {
            let found = find(path);
            assert!(
                found.is_some_and(|(_, a)| a),
                "{:?}",
                String::from_utf8_lossy(path)
            );
        }
        // The same route either way: served.
        for (path, id) in [
            (&b"/v1/admin/x"[..], 2),
            (b"/v1/admin%2Fx", 2),
            (b"/adm2%2Fx", 3),
            (b"/repos/g%2Fs%2Fx", 4),
            (b"/repos/g%2Fs;x", 4),
            (b"/x%2Fy", 0),
            (b"/users/a%2Fb", 5),
        ] {
            assert_eq!(
                find(path),
                Some((id, false)),
                "{:?}",
                String::from_utf8_lossy(path)
            );
        }
        // Runs of `/` the path had are the config's `merge_slashes`' to fold, not the
        // reading's: only those its decoding makes.
        assert_eq!(read(b"/a//b;x"), Some(b"/a//b".to_vec()));
        assert_eq!(read(b"/a%2F/b"), Some(b"/a/b".to_vec()));
        // A segment of parameters alone leaves no `//` behind (the third review found
        // `/admin/;x/secret` read as `/admin//secret`, which no route named).
        assert_eq!(read(b"/admin/;x/secret"), Some(b"/admin/secret".to_vec()));
        assert_eq!(read(b"/a;x/b"), Some(b"/a/b".to_vec()));
        assert_eq!(read(b"/v1;/;x/admin"), Some(b"/v1/admin".to_vec()));
        assert_eq!(read(b"/plain"), None);
        // Where the first change is: what a route named literally up to there is read past.
        assert_eq!(
            as_read(b"/users/admin%2Fx"),
            Some((b"/users/admin/x".to_vec(), 12))
        );
        assert_eq!(
            as_read(b"/users/admin;x"),
            Some((b"/users/admin".to_vec(), 12))
        );
    }

    #[test]
    fn a_pattern_keeps_its_path_unless_the_reading_reaches_another_routes_literal_part() {
        let mut t = PathTable::default();
        t.insert_prefix(b"/users/admin", 0);
        t.insert_param(b"/users/{id}", 1);
        t.insert_prefix(b"/", 2);
        t.insert_prefix(b"/products", 3);
        t.insert_param(b"/products/{id}", 4);
        t.insert_param(b"/products/{id}/reviews", 5);
        t.insert_exact(b"/users/me/keys", 6);
        t.insert_param(b"/projects/{id}", 7);
        t.insert_param(b"/projects/{id}/{sub}", 8);
        let router = Router {
            any_host: t,
            ..Router::default()
        };
        let find = |path: &[u8]| router.find_as_read(None, path, |_| true);
        // The pattern takes these as they are; a decoding upstream reads them as a route that
        // names what the reading changed (the second review of stop 60 found the first).
        for (path, id) in [
            (&b"/users/admin%2Fx"[..], 1),
            (b"/users/admin;x%2Fkeys", 1),
            (b"/users/me%2Fkeys", 1),
            (b"/products/a%2Freviews", 4),
        ] {
            let found = find(path);
            assert_eq!(
                found,
                Some((id, true)),
                "{:?}",
                String::from_utf8_lossy(path)
            );
        }
        // Read as routes that name nothing past the change: the pattern's.
        for (path, id) in [
            (&b"/products/a%2Fb"[..], 4),
            (b"/projects/group%2Fname", 7),
            (b"/users/bob;v=1", 1),
            // `/users/admin` is the pattern's too, whichever way it is read.
            (b"/users/admin;jsessionid=1", 1),
            (b"/users/x%2Fadmin", 1),
        ] {
            let found = find(path);
            assert_eq!(
                found,
                Some((id, false)),
                "{:?}",
                String::from_utf8_lossy(path)
            );
        }
    }
}
