//! After the policies: which of a route's answers a request gets (the first variant whose
//! client profile matches, else the route's own), and the values its templates are filled
//! from (route parameters, the query string, earlier steps' answers).
//!
//! Routes without variants or parameters cost one branch here.

use std::borrow::Cow;

use crate::codec::request::RequestHead;
use crate::json;
use crate::policy::each_field;
use crate::shape::{query_param, Values};
use common::aggregate::{glob_match, DotPath, ProfileMatch, Shape, Template};
use common::live::hash_bytes;
use common::router::match_pattern;
use common::snapshot::HashOn;
use common::{Route, RouteAction, Snapshot};

/// What answers a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Choice<'a> {
    pub action: &'a RouteAction,
    pub rewrite: Option<&'a Template>,
    pub shape: Option<&'a Shape>,
}

/// The route's answer for this request: the first variant whose profile matches, or the
/// route's own action.
pub(crate) fn choose<'a>(
    snap: &Snapshot,
    route: &'a Route,
    buf: &[u8],
    head: &RequestHead,
    consumer: Option<u32>,
) -> Choice<'a> {
    for v in route.variants.iter() {
        if profile_matches(&snap.profiles[v.profile].matcher, snap, buf, head, consumer) {
            return Choice {
                action: &v.action,
                rewrite: v.rewrite.as_ref(),
                shape: v.shape.as_ref(),
            };
        }
    }
    Choice {
        action: &route.action,
        rewrite: route.rewrite.as_ref(),
        shape: route.shape.as_ref(),
    }
}

fn profile_matches(
    m: &ProfileMatch,
    snap: &Snapshot,
    buf: &[u8],
    head: &RequestHead,
    consumer: Option<u32>,
) -> bool {
    let one_of = |values: &[Box<str>], v: &[u8]| values.iter().any(|x| x.as_bytes() == v);
    match m {
        ProfileMatch::Header { name, values } => {
            each_field(buf, head.fields_start, head.fields_end)
                .any(|(_, n, v)| n.eq_ignore_ascii_case(name.as_bytes()) && one_of(values, v))
        }
        ProfileMatch::UserAgent(globs) => head.user_agent.is_some_and(|ua| {
            let ua = ua.of(buf);
            globs.iter().any(|g| glob_match(g.as_bytes(), ua))
        }),
        ProfileMatch::Query { name, values } => query_of(buf, head)
            .and_then(|q| query_param(q, name.as_bytes()))
            .and_then(crate::shape::form_decode)
            .is_some_and(|v| one_of(values, &v)),
        ProfileMatch::ConsumerGroups(groups) => consumer
            .and_then(|c| snap.policies.consumers.get(c as usize))
            .is_some_and(|c| c.groups.iter().any(|g| groups.contains(g))),
    }
}

/// The request's query string (after `?`), if it has one.
pub(crate) fn query_of<'a>(buf: &'a [u8], head: &RequestHead) -> Option<&'a [u8]> {
    let t = head.origin_target.of(buf);
    t.get(head.path_len..)?.strip_prefix(b"?")
}

/// An earlier step's answer as it came (checked JSON) and the step's `target`.
pub(crate) type StepAnswer<'a> = Option<(&'a [u8], Option<&'a DotPath>)>;

/// Template values of one request: its route parameters and query, and (for aggregates) the
/// answers of the steps that ran before.
#[derive(Debug)]
pub(crate) struct RequestValues<'a> {
    pub params: &'a [(Box<str>, Vec<u8>)],
    pub query: Option<&'a [u8]>,
    pub steps: &'a [StepAnswer<'a>],
}

impl Values for RequestValues<'_> {
    fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| &v[..])
    }
    fn query(&self) -> Option<&[u8]> {
        self.query
    }
    fn step_field(&self, step: usize, path: &[Box<str>]) -> Option<Cow<'_, [u8]>> {
        let (raw, target) = (*self.steps.get(step)?)?;
        let answer = json::parse(raw).ok()?;
        let at = match target {
            Some(t) => json::lookup(&answer, t)?,
            None => answer,
        };
        json::scalar_text(&json::lookup(&at, path)?)
    }
}

/// The route's parameters as (name, raw segment) pairs.
pub(crate) fn params(route: &Route, path: &[u8]) -> Vec<(Box<str>, Vec<u8>)> {
    let mut out = Vec::with_capacity(route.params.len());
    let mut names = route.params.iter();
    match_pattern(&route.pattern, path, |seg| {
        if let Some(n) = names.next() {
            out.push((n.clone(), seg.to_vec()));
        }
    });
    out
}

/// The key `balance = "hash"` hashes for this request: a header's value, a cookie's, the
/// client address or the path (without the query). A missing header or cookie hashes as
/// empty, so such requests all go to one target.
pub(crate) fn hash_key(
    on: &HashOn,
    buf: &[u8],
    head: &RequestHead,
    client_ip: std::net::IpAddr,
) -> u64 {
    let fields = || each_field(buf, head.fields_start, head.fields_end);
    match on {
        HashOn::None => 0,
        HashOn::Header(name) => {
            let v = fields()
                .find(|(_, n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map_or(&[][..], |(_, _, v)| v);
            hash_bytes(v)
        }
        HashOn::Cookie(name) => {
            let v = fields()
                .filter(|(_, n, _)| n.eq_ignore_ascii_case(b"cookie"))
                .flat_map(|(_, _, v)| v.split(|&b| b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let eq = pair.iter().position(|&b| b == b'=')?;
                    (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
                })
                .unwrap_or_default();
            hash_bytes(v)
        }
        HashOn::ClientIp => match client_ip {
            std::net::IpAddr::V4(a) => hash_bytes(&a.octets()),
            std::net::IpAddr::V6(a) => hash_bytes(&a.octets()),
        },
        HashOn::Path => {
            let path = head.path(buf);
            let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
            hash_bytes(&path[..end])
        }
    }
}
