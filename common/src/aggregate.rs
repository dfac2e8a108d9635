//! Fan-out aggregates, client profiles, request-target templates and JSON response shapes:
//! their compiled forms and the checks that build them from the config.
//!
//! Nothing here runs per request; the data plane reads these structures.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::{
    AggregateConfig, ClientProfileConfig, NameValues, OnConflict, ShapeConfig, StepConfig,
};
use crate::snapshot::is_tchar;
use crate::validate::check_id;
use crate::ConfigError;

/// Most steps in one aggregate.
pub const MAX_STEPS: usize = 32;
/// Largest `max_step_bytes` / `response.max_bytes`.
pub const MAX_SHAPE_BYTES: usize = 64 * 1024 * 1024;
/// Default `max_step_bytes` / `response.max_bytes`.
pub const DEFAULT_SHAPE_BYTES: usize = 1024 * 1024;
/// Longest deadline or step timeout.
pub const MAX_DEADLINE_MS: u64 = 600_000;

/// A dot path into a JSON value (`product.sku` → `["product", "sku"]`).
pub type DotPath = Box<[Box<str>]>;

/// One piece of a request-target template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Bytes copied as they are.
    Literal(Box<str>),
    /// `{name}`: a route parameter.
    Param(Box<str>),
    /// `{query.name}`: a query parameter of the client's request.
    Query(Box<str>),
    /// `{step.a.b}`: a field of an earlier step's answer (after its `target`); `step` is
    /// the step's index in the aggregate.
    Step { step: usize, path: DotPath },
}

/// A compiled request-target template such as `/items/{id}?lang={query.lang}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Box<[Part]>,
    /// Whether the template has a `?` of its own.
    pub has_query: bool,
}

impl Template {
    /// Parses `text`; `step_ids` are the aggregate's steps (empty for a route's `rewrite`,
    /// which takes only route parameters).
    fn parse(text: &str, at: &str, step_ids: Option<&[&str]>) -> Result<Template, ConfigError> {
        let bad = |why: String| ConfigError::field(at, why);
        if !text.starts_with('/') {
            return Err(bad(format!("{text:?} must start with '/'")));
        }
        if text
            .bytes()
            .any(|b| !(0x21..0x7f).contains(&b) || b == b'#')
        {
            return Err(bad(format!(
                "{text:?} must hold visible ASCII without spaces or '#'"
            )));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Literal(rest.into()));
                    break;
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(bad(format!("{text:?} has a '}}' without its '{{'")));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].into()));
                    }
                    let close = rest[i..]
                        .find('}')
                        .ok_or_else(|| bad(format!("{text:?} has a '{{' without its '}}'")))?;
                    let name = &rest[i + 1..i + close];
                    parts.push(placeholder(name, text, at, step_ids)?);
                    rest = &rest[i + close + 1..];
                }
            }
        }
        Ok(Template {
            has_query: text.contains('?'),
            parts: parts.into_boxed_slice(),
        })
    }

    /// Route parameter names the template uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Param(n) => Some(&**n),
            _ => None,
        })
    }
}

fn placeholder(
    name: &str,
    text: &str,
    at: &str,
    step_ids: Option<&[&str]>,
) -> Result<Part, ConfigError> {
    let pieces: Vec<&str> = name.split('.').collect();
    if pieces.iter().any(|p| p.is_empty() || p.contains('{')) {
        return Err(ConfigError::field(
            at,
            format!("{text:?}: {{{name}}} is not a placeholder name"),
        ));
    }
    if pieces.len() == 1 {
        if !valid_param_name(name) {
            return Err(ConfigError::field(
                at,
                format!("{text:?}: {{{name}}}: a parameter name is letters, digits and '_'"),
            ));
        }
        return Ok(Part::Param(name.into()));
    }
    if pieces[0] == "query" {
        if pieces.len() != 2 {
            return Err(ConfigError::field(
                at,
                format!("{text:?}: {{{name}}}: a query placeholder is {{query.NAME}}"),
            ));
        }
        return Ok(Part::Query(pieces[1].into()));
    }
    let Some(steps) = step_ids else {
        return Err(ConfigError::field(
            at,
            format!("{text:?}: {{{name}}}: only route parameters can be used here"),
        ));
    };
    let step = steps.iter().position(|s| *s == pieces[0]).ok_or_else(|| {
        ConfigError::field(
            at,
            format!("{text:?}: {{{name}}} names no step {:?}", pieces[0]),
        )
    })?;
    Ok(Part::Step {
        step,
        path: pieces[1..].iter().map(|p| (*p).into()).collect(),
    })
}

/// Whether `name` may name a route parameter.
pub fn valid_param_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A compiled JSON reshaping, applied in the order `target`, `allow` / `deny`, `rename`,
/// `group`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub target: Option<DotPath>,
    pub allow: Box<[DotPath]>,
    pub deny: Box<[DotPath]>,
    pub rename: Box<[(Box<str>, Box<str>)]>,
    pub group: Option<Box<str>>,
    /// Largest body reshaped.
    pub max_bytes: usize,
}

impl Shape {
    /// Whether the shape changes nothing.
    pub fn is_identity(&self) -> bool {
        self.target.is_none()
            && self.allow.is_empty()
            && self.deny.is_empty()
            && self.rename.is_empty()
            && self.group.is_none()
    }
}

fn dot_path(text: &str, at: &str) -> Result<DotPath, ConfigError> {
    let pieces: Vec<&str> = text.split('.').collect();
    if text.len() > 256 || pieces.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::field(
            at,
            format!("{text:?} is not a dot path (`a.b.c`, no empty member names)"),
        ));
    }
    Ok(pieces.into_iter().map(Into::into).collect())
}

fn member_name(text: &str, at: &str) -> Result<Box<str>, ConfigError> {
    if text.is_empty() || text.len() > 256 {
        return Err(ConfigError::field(
            at,
            "must be a member name of 1 to 256 characters",
        ));
    }
    Ok(text.into())
}

#[allow(clippy::too_many_arguments)]
fn shape(
    target: Option<&str>,
    allow: &[String],
    deny: &[String],
    rename: &std::collections::BTreeMap<String, String>,
    group: Option<&str>,
    max_bytes: Option<usize>,
    at: &str,
) -> Result<Shape, ConfigError> {
    if !allow.is_empty() && !deny.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.deny"),
            "`allow` and `deny` cannot both be set",
        ));
    }
    let max_bytes = max_bytes.unwrap_or(DEFAULT_SHAPE_BYTES);
    if !(1..=MAX_SHAPE_BYTES).contains(&max_bytes) {
        return Err(ConfigError::field(
            format!("{at}.max_bytes"),
            format!("must be between 1 and {MAX_SHAPE_BYTES}"),
        ));
    }
    let list = |l: &[String], name: &str| -> Result<Box<[DotPath]>, ConfigError> {
        l.iter()
            .enumerate()
            .map(|(i, p)| dot_path(p, &format!("{at}.{name}[{i}]")))
            .collect()
    };
    let mut renamed: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(rename.len());
    for (from, to) in rename {
        let f = member_name(from, &format!("{at}.rename"))?;
        let t = member_name(to, &format!("{at}.rename.{from}"))?;
        // Two members made one: the answer would keep one of them only, silently.
        if let Some((other, _)) = renamed.iter().find(|(_, o)| *o == t) {
            let field = format!("{at}.rename.{from}");
            let why = format!("{other:?} is renamed to {to:?} too: one of the two would be lost");
            if !crate::validate::tolerated(&field, &why) {
                return Err(ConfigError::field(field, why));
            }
        }
        renamed.push((f, t));
    }
    Ok(Shape {
        target: target
            .map(|t| dot_path(t, &format!("{at}.target")))
            .transpose()?,
        allow: outermost(&list(allow, "allow")?),
        deny: list(deny, "deny")?,
        rename: renamed.into_boxed_slice(),
        group: group
            .map(|g| member_name(g, &format!("{at}.group")))
            .transpose()?,
        max_bytes,
    })
}

/// `paths` without those another one holds (`a.b` when `a` is there too) or repeats: the
/// member an outer path keeps is kept whole, in any order.
fn outermost(paths: &[DotPath]) -> Box<[DotPath]> {
    let all: std::collections::HashSet<&[Box<str>]> = paths.iter().map(|p| &p[..]).collect();
    let mut seen = std::collections::HashSet::with_capacity(paths.len());
    let kept: Vec<DotPath> = (paths.iter())
        .filter(|p| !(1..p.len()).any(|k| all.contains(&p[..k])) && seen.insert(&p[..]))
        .cloned()
        .collect();
    kept.into_boxed_slice()
}

/// The member of an aggregate's answer that lists its failed steps.
pub const ERRORS_MEMBER: &str = "_errors";

/// Compiles a route's or variant's `response`.
pub fn compile_shape(c: &ShapeConfig, at: &str) -> Result<Shape, ConfigError> {
    let shape = shape(
        c.target.as_deref(),
        &c.allow,
        &c.deny,
        &c.rename,
        c.group.as_deref(),
        c.max_bytes,
        at,
    )?;
    // It would change no answer, yet ask for answers whole and unencoded, without ranges,
    // and drop their validators.
    let why = "reshapes nothing: give it a target, allow, deny, rename or group";
    if shape.is_identity() && !crate::validate::tolerated(at, why) {
        return Err(ConfigError::field(at, why));
    }
    Ok(shape)
}

/// Compiles a route's `rewrite` (route parameters only; the client's query is appended).
pub fn compile_rewrite(text: &str, params: &[Box<str>], at: &str) -> Result<Template, ConfigError> {
    let t = Template::parse(text, at, None)?;
    if t.parts.iter().any(|p| matches!(p, Part::Query(_))) {
        return Err(ConfigError::field(
            at,
            format!("{text:?}: a rewrite takes route parameters only ({{name}}); the client's query string is kept as it is"),
        ));
    }
    if t.has_query {
        return Err(ConfigError::field(
            at,
            format!("{text:?}: a rewrite is a path; the client's query string is kept"),
        ));
    }
    check_params(&t, params, at)?;
    // Its parameters are filled in escaped, and may not be dot segments (the request's
    // were checked): the text around them decides.
    if let Some(why) = crate::validate::path_flaw(text) {
        if !crate::validate::tolerated(at, why) {
            return Err(ConfigError::field(
                at,
                format!("{text:?} {why}: the upstream would be sent a path the gateway refuses"),
            ));
        }
    }
    Ok(t)
}

/// Refuses a template that uses a route parameter the route does not have.
pub fn check_params(t: &Template, params: &[Box<str>], at: &str) -> Result<(), ConfigError> {
    for p in t.params() {
        if !params.iter().any(|x| &**x == p) {
            return Err(ConfigError::field(
                at,
                format!("uses the route parameter {{{p}}}, which the route's path does not have"),
            ));
        }
    }
    Ok(())
}

/// A compiled aggregate.
#[derive(Debug)]
pub struct Aggregate {
    pub id: Box<str>,
    pub deadline: Duration,
    pub on_conflict: OnConflict,
    pub max_step_bytes: usize,
    pub steps: Box<[Step]>,
}

impl Aggregate {
    /// Whether one of the steps sends the client's request body.
    pub fn takes_body(&self) -> bool {
        self.steps.iter().any(|s| s.body)
    }
}

/// A compiled step.
#[derive(Debug)]
pub struct Step {
    pub id: Box<str>,
    /// Index into the snapshot's upstreams.
    pub upstream: usize,
    pub method: Box<str>,
    pub path: Template,
    pub required: bool,
    pub timeout: Duration,
    /// Indices of the steps that must answer first.
    pub after: Box<[usize]>,
    /// Lower-cased names of the client fields copied to the step.
    pub pass_headers: Box<[Box<str>]>,
    pub body: bool,
    pub shape: Shape,
}

/// Compiles the aggregate at `aggregates[i]` (`repeated`: an earlier one has its id);
/// `upstream_ids` are the snapshot's upstreams' indexes by id.
pub fn compile_aggregate(
    a: &AggregateConfig,
    i: usize,
    repeated: bool,
    upstream_ids: &HashMap<&str, usize>,
) -> Result<Aggregate, ConfigError> {
    let at = format!("aggregates[{i}]");
    check_id(&a.id, &format!("{at}.id"))?;
    if repeated {
        return Err(ConfigError::field(
            format!("{at}.id"),
            format!("duplicate aggregate id {:?}", a.id),
        ));
    }
    if !(1..=MAX_DEADLINE_MS).contains(&a.deadline_ms) {
        return Err(ConfigError::field(
            format!("{at}.deadline_ms"),
            format!("must be between 1 and {MAX_DEADLINE_MS}"),
        ));
    }
    if !(1..=MAX_SHAPE_BYTES).contains(&a.max_step_bytes) {
        return Err(ConfigError::field(
            format!("{at}.max_step_bytes"),
            format!("must be between 1 and {MAX_SHAPE_BYTES}"),
        ));
    }
    if a.steps.is_empty() || a.steps.len() > MAX_STEPS {
        return Err(ConfigError::field(
            format!("{at}.steps"),
            format!("must have 1 to {MAX_STEPS} steps"),
        ));
    }
    let ids: Vec<&str> = a.steps.iter().map(|s| s.id.as_str()).collect();
    let mut steps = Vec::with_capacity(a.steps.len());
    for (j, s) in a.steps.iter().enumerate() {
        steps.push(compile_step(
            s,
            &format!("{at}.steps[{j}]"),
            j,
            &ids,
            a,
            upstream_ids,
        )?);
    }
    if let Some(k) = steps.iter().filter(|s| s.body).nth(1).map(|s| &s.id) {
        let j = ids.iter().position(|x| **x == **k).unwrap_or(0);
        return Err(ConfigError::field(
            format!("{at}.steps[{j}].body"),
            "at most one step may take the client's request body",
        ));
    }
    check_cycles(&steps, &at)?;
    Ok(Aggregate {
        id: a.id.as_str().into(),
        deadline: Duration::from_millis(a.deadline_ms),
        on_conflict: a.on_conflict,
        max_step_bytes: a.max_step_bytes,
        steps: steps.into_boxed_slice(),
    })
}

fn compile_step(
    s: &StepConfig,
    at: &str,
    j: usize,
    ids: &[&str],
    a: &AggregateConfig,
    upstream_ids: &HashMap<&str, usize>,
) -> Result<Step, ConfigError> {
    check_id(&s.id, &format!("{at}.id"))?;
    if s.id == "query" {
        return Err(ConfigError::field(
            format!("{at}.id"),
            "\"query\" is reserved for {query.NAME} placeholders",
        ));
    }
    // `{a.b.sku}` names step `a`'s field `b.sku`: a step `a.b` could never be named, and
    // beside a step `a` its placeholders would be taken for `a`'s.
    if s.id.contains('.') {
        let why = "a step id has no '.': `{step.field}` placeholders split at the first one";
        if !crate::validate::tolerated(&format!("{at}.id"), why) {
            return Err(ConfigError::field(format!("{at}.id"), why));
        }
    }
    if ids[..j].contains(&s.id.as_str()) {
        return Err(ConfigError::field(
            format!("{at}.id"),
            format!("duplicate step id {:?}", s.id),
        ));
    }
    let upstream = upstream_ids
        .get(s.upstream.as_str())
        .copied()
        .ok_or_else(|| {
            ConfigError::field(
                format!("{at}.upstream"),
                format!("unknown upstream {:?}", s.upstream),
            )
        })?;
    let method = s.method.as_deref().unwrap_or("GET");
    if method.is_empty() || !method.bytes().all(is_tchar) || method == "CONNECT" {
        return Err(ConfigError::field(
            format!("{at}.method"),
            format!("{method:?} is not a method token the gateway sends"),
        ));
    }
    if let Some(upper) = crate::validate::standard_method_miscased(method) {
        let field = format!("{at}.method");
        if !crate::validate::tolerated(&field, "another case than the method's") {
            return Err(ConfigError::field(
                field,
                format!("methods are case-sensitive (RFC 9110 9.1): {method:?} is not {upper}"),
            ));
        }
    }
    // What the gateway would refuse from a client, it does not send (the path up to its
    // query; escapes checked in the query too).
    let flaw = crate::validate::path_flaw(s.path.split('?').next().unwrap_or_default())
        .or_else(|| crate::validate::escape_flaw(&s.path));
    if let Some(why) = flaw {
        let field = format!("{at}.path");
        if !crate::validate::tolerated(&field, why) {
            return Err(ConfigError::field(
                field,
                format!(
                    "{:?} {why}: the upstream would be sent what the gateway refuses",
                    s.path
                ),
            ));
        }
    }
    let mut after = Vec::with_capacity(s.after.len());
    for (k, name) in s.after.iter().enumerate() {
        let idx = ids.iter().position(|x| x == name).ok_or_else(|| {
            ConfigError::field(
                format!("{at}.after[{k}]"),
                format!("names no step {name:?} of this aggregate"),
            )
        })?;
        if idx == j {
            return Err(ConfigError::field(
                format!("{at}.after[{k}]"),
                "a step cannot wait for itself",
            ));
        }
        if !after.contains(&idx) {
            after.push(idx);
        }
    }
    let path = Template::parse(&s.path, &format!("{at}.path"), Some(ids))?;
    let is_head = |m: Option<&str>| m == Some("HEAD");
    for p in path.parts.iter() {
        if let Part::Step { step, .. } = p {
            let why = "a HEAD step's answer has no body, so no field to read";
            if is_head(a.steps[*step].method.as_deref())
                && !crate::validate::tolerated(&format!("{at}.path"), why)
            {
                return Err(ConfigError::field(
                    format!("{at}.path"),
                    format!("uses a field of step {:?}: {why}", ids[*step]),
                ));
            }
            if !after.contains(step) {
                return Err(ConfigError::field(
                    format!("{at}.path"),
                    format!(
                        "uses a field of step {:?}, which must be listed in `after`",
                        ids[*step]
                    ),
                ));
            }
        }
    }
    let timeout_ms = s.timeout_ms.unwrap_or(a.deadline_ms);
    if !(1..=MAX_DEADLINE_MS).contains(&timeout_ms) {
        return Err(ConfigError::field(
            format!("{at}.timeout_ms"),
            format!("must be between 1 and {MAX_DEADLINE_MS}"),
        ));
    }
    let mut pass = Vec::with_capacity(s.pass_headers.len());
    for (k, h) in s.pass_headers.iter().enumerate() {
        if h.is_empty() || !h.bytes().all(is_tchar) {
            return Err(ConfigError::field(
                format!("{at}.pass_headers[{k}]"),
                format!("{h:?} is not a field name"),
            ));
        }
        let lower = h.to_ascii_lowercase();
        // Spelled with `_` too, which CGI-style upstreams read as `-` (`X_Forwarded_For` is
        // their `X-Forwarded-For`).
        let canon = crate::validate::cgi_name(h);
        // Every `X-Forwarded-*` field says where the request came from, which only the
        // gateway may tell (`-Port`, `-Prefix`, `-Server` as much as `-For`).
        let refused = if HOP_OR_GATEWAY_FIELDS.contains(&canon.as_str())
            || canon.starts_with("x-forwarded-")
        {
            Some(format!("{h:?} is set by the gateway itself"))
        } else if PART_OR_CONDITION_FIELDS.contains(&canon.as_str()) {
            Some(format!(
                "{h:?} asks for part of an answer or for none (206, 304, 412), but a step's \
                 answer is merged whole"
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            let field = format!("{at}.pass_headers[{k}]");
            // A stored config's entry is left out, not copied.
            if crate::validate::tolerated(&field, &why) {
                continue;
            }
            return Err(ConfigError::field(field, why));
        }
        pass.push(lower.into_boxed_str());
    }
    if is_head(Some(method)) {
        let taking = [
            ("target", s.target.is_some()),
            ("allow", !s.allow.is_empty()),
            ("deny", !s.deny.is_empty()),
            ("rename", !s.rename.is_empty()),
        ];
        let why = "a HEAD step's answer has no body to take members from (it merges as {})";
        if let Some((name, _)) = taking.iter().find(|(_, set)| *set) {
            let field = format!("{at}.{name}");
            if !crate::validate::tolerated(&field, why) {
                return Err(ConfigError::field(field, why));
            }
        }
    }
    let shape = shape(
        s.target.as_deref(),
        &s.allow,
        &s.deny,
        &s.rename,
        s.group.as_deref(),
        None,
        at,
    )?;
    // `_errors` is the gateway's member, listing the failed steps: a step's data put there
    // would be replaced whenever one fails.
    let why = format!("{ERRORS_MEMBER:?} is the gateway's, for the steps that failed");
    if shape.group.as_deref() == Some(ERRORS_MEMBER)
        && !crate::validate::tolerated(&format!("{at}.group"), &why)
    {
        return Err(ConfigError::field(format!("{at}.group"), why));
    }
    if let Some((from, _)) = shape.rename.iter().find(|(from, to)| {
        &**to == ERRORS_MEMBER && !crate::validate::tolerated(&format!("{at}.rename.{from}"), &why)
    }) {
        return Err(ConfigError::field(format!("{at}.rename.{from}"), why));
    }
    Ok(Step {
        id: s.id.as_str().into(),
        upstream,
        method: method.into(),
        path,
        required: s.required,
        timeout: Duration::from_millis(timeout_ms),
        after: after.into_boxed_slice(),
        pass_headers: pass.into_boxed_slice(),
        body: s.body,
        shape,
    })
}

/// Fields that ask for a range of an answer or make it conditional: a step's answer would
/// then be partial (`206`) or none at all (`304`, `412`).
const PART_OR_CONDITION_FIELDS: [&str; 6] = [
    "range",
    "if-range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
];

/// Fields a step's request gets from the gateway, or that say where the request came from
/// (which only the gateway may tell), never copied from the client.
const HOP_OR_GATEWAY_FIELDS: [&str; 27] = [
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "expect",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "traceparent",
    "tracestate",
    "content-language",
    "forwarded",
    "x-real-ip",
    "http2-settings",
    "via",
    // Path overrides IIS and Symfony-style frameworks take from a proxy: another path than
    // the step's.
    "x-original-url",
    "x-rewrite-url",
];

fn check_cycles(steps: &[Step], at: &str) -> Result<(), ConfigError> {
    // 0: not visited, 1: on the current path, 2: done.
    fn visit(i: usize, steps: &[Step], state: &mut [u8], at: &str) -> Result<(), ConfigError> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                return Err(ConfigError::field(
                    format!("{at}.steps[{i}].after"),
                    format!("step {:?} waits for itself through `after`", steps[i].id),
                ))
            }
            _ => {}
        }
        state[i] = 1;
        for &d in steps[i].after.iter() {
            visit(d, steps, state, at)?;
        }
        state[i] = 2;
        Ok(())
    }
    let mut state = vec![0u8; steps.len()];
    for i in 0..steps.len() {
        visit(i, steps, &mut state, at)?;
    }
    Ok(())
}

/// How a client profile recognises its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileMatch {
    /// A request field (name compared case-insensitively) with one of the values.
    Header {
        name: Box<str>,
        values: Box<[Box<str>]>,
    },
    /// A User-Agent matching one of the `*` patterns.
    UserAgent(Box<[Box<str>]>),
    /// A query parameter with one of the values.
    Query {
        name: Box<str>,
        values: Box<[Box<str>]>,
    },
    /// An authenticated consumer in one of the groups.
    ConsumerGroups(Box<[Box<str>]>),
}

/// A list of names or values.
pub type Names = Box<[Box<str>]>;

/// A compiled client profile.
#[derive(Debug)]
pub struct Profile {
    pub id: Box<str>,
    pub matcher: ProfileMatch,
}

/// Compiles `client_profiles[i]` (`repeated`: an earlier one has its id).
pub fn compile_profile(
    p: &ClientProfileConfig,
    i: usize,
    repeated: bool,
) -> Result<Profile, ConfigError> {
    let at = format!("client_profiles[{i}]");
    check_id(&p.id, &format!("{at}.id"))?;
    if repeated {
        return Err(ConfigError::field(
            format!("{at}.id"),
            format!("duplicate client profile id {:?}", p.id),
        ));
    }
    let set = [
        p.header.is_some(),
        !p.user_agent.is_empty(),
        p.query.is_some(),
        !p.consumer_groups.is_empty(),
    ];
    if set.iter().filter(|&&b| b).count() != 1 {
        return Err(ConfigError::field(
            at,
            "exactly one of `header`, `user_agent`, `query` and `consumer_groups` is required",
        ));
    }
    let values = |nv: &NameValues, kind: &str| -> Result<(Box<str>, Names), ConfigError> {
        if kind == "header" && (nv.name.is_empty() || !nv.name.bytes().all(is_tchar)) {
            return Err(ConfigError::field(
                format!("{at}.header.name"),
                format!("{:?} is not a field name", nv.name),
            ));
        }
        if nv.name.is_empty() || nv.name.len() > 256 {
            return Err(ConfigError::field(
                format!("{at}.{kind}.name"),
                "must be 1 to 256 characters",
            ));
        }
        if nv.values.is_empty() {
            return Err(ConfigError::field(
                format!("{at}.{kind}.values"),
                "at least one value is required",
            ));
        }
        // A field's value is compared without the whitespace around it, which it never has.
        if let Some(i) = (nv.values.iter()).position(|v| {
            kind == "header"
                && v.trim_matches([' ', '\t']).len() != v.len()
                && !crate::validate::tolerated(&format!("{at}.{kind}.values"), "never matches")
        }) {
            return Err(ConfigError::field(
                format!("{at}.{kind}.values[{i}]"),
                "a field value never starts or ends with whitespace, so this one would never match",
            ));
        }
        Ok((
            nv.name.as_str().into(),
            nv.values.iter().map(|v| v.as_str().into()).collect(),
        ))
    };
    let matcher = if let Some(h) = &p.header {
        let (name, values) = values(h, "header")?;
        ProfileMatch::Header { name, values }
    } else if let Some(q) = &p.query {
        let (name, values) = values(q, "query")?;
        ProfileMatch::Query { name, values }
    } else if !p.user_agent.is_empty() {
        for (k, g) in p.user_agent.iter().enumerate() {
            if g.is_empty() || g.len() > 256 {
                return Err(ConfigError::field(
                    format!("{at}.user_agent[{k}]"),
                    "must be a pattern of 1 to 256 characters",
                ));
            }
        }
        ProfileMatch::UserAgent(p.user_agent.iter().map(|g| g.as_str().into()).collect())
    } else {
        for (k, g) in p.consumer_groups.iter().enumerate() {
            check_id(g, &format!("{at}.consumer_groups[{k}]"))?;
        }
        ProfileMatch::ConsumerGroups(
            p.consumer_groups
                .iter()
                .map(|g| g.as_str().into())
                .collect(),
        )
    };
    Ok(Profile {
        id: p.id.as_str().into(),
        matcher,
    })
}

/// Whether `text` matches `pattern`, where `*` matches any run of bytes.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && pattern[p] != b'*' && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_into_parts() {
        let t = Template::parse(
            "/stock/{product.sku}?lang={query.lang}&id={id}",
            "x",
            Some(&["product"]),
        )
        .unwrap();
        assert_eq!(
            &*t.parts,
            &[
                Part::Literal("/stock/".into()),
                Part::Step {
                    step: 0,
                    path: vec!["sku".into()].into_boxed_slice()
                },
                Part::Literal("?lang=".into()),
                Part::Query("lang".into()),
                Part::Literal("&id=".into()),
                Part::Param("id".into()),
            ]
        );
        assert!(t.has_query);
        for bad in [
            "items",
            "/a/{",
            "/a/}",
            "/a/{}",
            "/a/{x.}",
            "/a b",
            "/{nope.x}",
        ] {
            assert!(Template::parse(bad, "x", Some(&["a"])).is_err(), "{bad}");
        }
        assert!(Template::parse("/{a.b}", "x", None).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*iPhone*", b"Mozilla (iPhone; CPU)"));
        assert!(!glob_match(b"*iPhone*", b"Mozilla (Android)"));
        assert!(glob_match(b"curl/*", b"curl/8.1"));
        assert!(!glob_match(b"curl/*", b"xcurl/8.1"));
        assert!(glob_match(b"a*b*c", b"aXbYbc"));
        assert!(glob_match(b"*", b""));
    }
}
