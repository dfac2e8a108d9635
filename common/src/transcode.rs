//! JSON/REST to gRPC transcoding: a `transcoders` item compiled from a protobuf descriptor
//! set (`protoc --include_imports --descriptor_set_out`), and the two conversions the data
//! plane runs per call.
//!
//! The HTTP mapping of each method comes from its `google.api.http` option (GET, PUT, POST,
//! DELETE, PATCH or a custom verb; path templates with `{field.path}` and `{field=pattern}`
//! variables, `*` and `**`, a `:verb` suffix; `body: "*"` or `body: "field"`;
//! `response_body`; `additional_bindings`). A method without the option is reachable as
//! `POST /package.Service/Method` with the whole request message as its JSON body.
//! Client-streaming methods are not transcoded (there is no JSON form of a stream of
//! requests); server-streaming ones are, into a JSON array or newline-delimited JSON.
//!
//! JSON is the canonical proto3 mapping (prost-reflect): lowerCamelCase names on output, both
//! spellings on input, 64-bit integers as strings, enums by name, Timestamp and Duration as
//! strings. A request is refused (400) with the JSON path of the first bad field: unknown
//! fields, wrong types, values out of range, or a message larger than `max_message_bytes`.

use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    SerializeOptions,
};
use serde_json::{Map, Value};

use crate::config::TranscoderConfig;
use crate::validate::check_id;
use crate::ConfigError;

/// The default and the largest `max_message_bytes`.
pub const DEFAULT_MAX_MESSAGE: u64 = 4 * 1024 * 1024;
const MAX_MAX_MESSAGE: u64 = 64 * 1024 * 1024;

/// A compiled `transcoders` item.
#[derive(Debug)]
pub struct Transcoder {
    pub id: Box<str>,
    /// The HTTP bindings of the services' methods, in the order they are tried.
    pub bindings: Vec<Binding>,
    pub max_message_bytes: usize,
    /// SHA-256 of the `descriptor_set` file as read (lower-case hex); `None` for
    /// `descriptor_set_base64`, which the config holds itself.
    pub file_sha256: Option<String>,
}

/// One HTTP binding of a method.
#[derive(Debug)]
pub struct Binding {
    /// The HTTP method, upper-case (`GET`, or a custom one).
    pub verb: Box<str>,
    pub template: Template,
    /// `/package.Service/Method`.
    pub grpc_path: Box<str>,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub body: BodyRule,
    /// `response_body`: the output field that is the whole answer.
    pub response_body: Option<FieldDescriptor>,
    pub server_streaming: bool,
}

/// Where the request's JSON body goes.
#[derive(Debug)]
pub enum BodyRule {
    /// No body: every field not in the path comes from the query string.
    None,
    /// `body: "*"`: the body is the request message (minus the path's fields).
    Whole,
    /// `body: "field"`: the body is that field.
    Field(FieldDescriptor),
}

/// A path template, flattened: literals, `*`, `**` and the spans of its variables.
#[derive(Debug)]
pub struct Template {
    units: Vec<Unit>,
    verb: Option<Box<str>>,
    /// Per variable, the field path it sets.
    vars: Vec<Vec<FieldDescriptor>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Unit {
    Literal(Box<str>),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path (last only).
    Rest,
    VarStart(usize),
    VarEnd(usize),
}

/// A request the transcoder refuses (400): the JSON path of the field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub message: String,
}

impl Refusal {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Compiles `transcoders[i]` (reading its `descriptor_set` file, if it names one).
pub fn compile_transcoder(t: &TranscoderConfig, i: usize) -> Result<Transcoder, ConfigError> {
    let at = format!("transcoders[{i}]");
    check_id(&t.id, &format!("{at}.id"))?;
    let bytes = match (&t.descriptor_set, &t.descriptor_set_base64) {
        (Some(path), None) => {
            crate::validate::read_named_file(path, MAX_DESCRIPTOR_FILE).map_err(|e| {
                ConfigError::field(format!("{at}.descriptor_set"), format!("{path}: {e}"))
            })?
        }
        (None, Some(b64)) => {
            let mut out = Vec::new();
            crate::keys::decode_b64(b64.as_bytes(), &mut out).ok_or_else(|| {
                ConfigError::field(format!("{at}.descriptor_set_base64"), "is not base64")
            })?;
            out
        }
        _ => {
            return Err(ConfigError::field(
                at,
                "exactly one of `descriptor_set` and `descriptor_set_base64` is required",
            ))
        }
    };
    let set_field = if t.descriptor_set.is_some() {
        "descriptor_set"
    } else {
        "descriptor_set_base64"
    };
    let pool = DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
        ConfigError::field(
            format!("{at}.{set_field}"),
            format!("is not a protobuf FileDescriptorSet with all its imports: {e}"),
        )
    })?;
    let max = t.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE);
    if !(1..=MAX_MAX_MESSAGE).contains(&max) {
        return Err(ConfigError::field(
            format!("{at}.max_message_bytes"),
            format!("must be between 1 and {MAX_MAX_MESSAGE}"),
        ));
    }
    if t.services.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.services"),
            "must name at least one service",
        ));
    }
    let http = pool.get_extension_by_name("google.api.http");
    let mut bindings = Vec::new();
    for (k, name) in t.services.iter().enumerate() {
        let sat = format!("{at}.services[{k}]");
        let service = pool.get_service_by_name(name).ok_or_else(|| {
            ConfigError::field(&sat, format!("the descriptor set has no service {name:?}"))
        })?;
        for method in service.methods() {
            if method.is_client_streaming() {
                continue;
            }
            let grpc_path = format!("/{}/{}", service.full_name(), method.name());
            let options = method.options();
            let rule = http
                .as_ref()
                .filter(|x| options.has_extension(x))
                .map(|x| options.get_extension(x).into_owned());
            let rule = match rule {
                Some(prost_reflect::Value::Message(m)) => m,
                _ => {
                    // No mapping: POST to the gRPC path with the message as the body.
                    let template = parse_template(&grpc_path, &method.input())
                        .map_err(|e| ConfigError::field(&sat, e))?;
                    bindings.push(Binding {
                        verb: "POST".into(),
                        template,
                        grpc_path: grpc_path.into(),
                        input: method.input(),
                        output: method.output(),
                        body: BodyRule::Whole,
                        response_body: None,
                        server_streaming: method.is_server_streaming(),
                    });
                    continue;
                }
            };
            let mut rules = vec![rule.clone()];
            if let Some(prost_reflect::Value::List(more)) = rule
                .get_field_by_name("additional_bindings")
                .map(|v| v.into_owned())
            {
                rules.extend(more.into_iter().filter_map(|v| match v {
                    prost_reflect::Value::Message(m) => Some(m),
                    _ => None,
                }));
            }
            for r in &rules {
                let b = binding(r, &method, &grpc_path).map_err(|e| {
                    ConfigError::field(&sat, format!("{}: {e}", method.full_name()))
                })?;
                bindings.push(b);
            }
        }
    }
    Ok(Transcoder {
        id: t.id.as_str().into(),
        bindings,
        max_message_bytes: max as usize,
        file_sha256: t
            .descriptor_set
            .is_some()
            .then(|| crate::tls::sha256_hex(&bytes)),
    })
}

/// A string field of an `HttpRule` message.
fn rule_str(rule: &DynamicMessage, name: &str) -> String {
    rule.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One `HttpRule` of a method.
fn binding(
    rule: &DynamicMessage,
    method: &prost_reflect::MethodDescriptor,
    grpc_path: &str,
) -> Result<Binding, String> {
    let mut found = None;
    for verb in ["get", "put", "post", "delete", "patch"] {
        if rule.has_field_by_name(verb) {
            found = Some((verb.to_ascii_uppercase(), rule_str(rule, verb)));
        }
    }
    if rule.has_field_by_name("custom") {
        if let Some(prost_reflect::Value::Message(c)) =
            rule.get_field_by_name("custom").map(|v| v.into_owned())
        {
            found = Some((rule_str(&c, "kind"), rule_str(&c, "path")));
        }
    }
    let (verb, path) = found.ok_or("its google.api.http rule has no pattern")?;
    if verb.is_empty() || !verb.bytes().all(crate::snapshot::is_tchar) {
        return Err(format!("{verb:?} is not an HTTP method"));
    }
    let input = method.input();
    let template = parse_template(&path, &input)?;
    let body = match rule_str(rule, "body").as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        name => BodyRule::Field(
            input
                .get_field_by_name(name)
                .ok_or_else(|| format!("body field {name:?} is not in {}", input.full_name()))?,
        ),
    };
    let output = method.output();
    let response_body = match rule_str(rule, "response_body").as_str() {
        "" => None,
        name => Some(output.get_field_by_name(name).ok_or_else(|| {
            format!(
                "response_body field {name:?} is not in {}",
                output.full_name()
            )
        })?),
    };
    Ok(Binding {
        verb: verb.into(),
        template,
        grpc_path: grpc_path.into(),
        input,
        output,
        body,
        response_body,
        server_streaming: method.is_server_streaming(),
    })
}

/// Parses a path template (`/v1/{name=shelves/*}/books/{book.id}:publish`) whose variables
/// name fields of `input`.
fn parse_template(t: &str, input: &MessageDescriptor) -> Result<Template, String> {
    let bad = |why: &str| format!("path template {t:?}: {why}");
    let rest = t
        .strip_prefix('/')
        .ok_or_else(|| bad("must start with /"))?;
    // The verb: a `:` after the last `/` outside braces.
    let mut depth = 0i32;
    let (mut last_slash, mut colon) = (0, None);
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '/' if depth == 0 => {
                last_slash = i;
                colon = None;
            }
            ':' if depth == 0 && i >= last_slash => colon = Some(i),
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(bad("unbalanced braces"));
        }
    }
    if depth != 0 {
        return Err(bad("unbalanced braces"));
    }
    let (segs, verb) = match colon {
        Some(i) => (&rest[..i], Some(rest[i + 1..].into())),
        None => (rest, None),
    };
    let mut units = Vec::new();
    let mut vars = Vec::new();
    let mut pieces = Vec::new();
    let mut start = 0;
    depth = 0;
    for (i, c) in segs.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '/' if depth == 0 => {
                pieces.push(&segs[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&segs[start..]);
    for piece in pieces {
        if let Some(inner) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
            let path = field_path(input, field, false).map_err(|e| bad(&e))?;
            let k = vars.len();
            vars.push(path);
            units.push(Unit::VarStart(k));
            for p in pattern.split('/') {
                units.push(simple_unit(p).ok_or_else(|| bad("bad variable pattern"))?);
            }
            units.push(Unit::VarEnd(k));
        } else {
            units.push(simple_unit(piece).ok_or_else(|| bad("bad segment"))?);
        }
    }
    // `**` only at the end (a variable around it may close after it).
    let rest_at = units.iter().position(|u| *u == Unit::Rest);
    if let Some(p) = rest_at {
        if units[p + 1..].iter().any(|u| !matches!(u, Unit::VarEnd(_))) {
            return Err(bad("** must be the last segment"));
        }
    }
    Ok(Template { units, verb, vars })
}

/// A literal, `*` or `**` segment.
fn simple_unit(p: &str) -> Option<Unit> {
    match p {
        "*" => Some(Unit::One),
        "**" => Some(Unit::Rest),
        "" => None,
        lit if !lit.contains(['{', '}', '*', '=']) => Some(Unit::Literal(lit.into())),
        _ => None,
    }
}

/// The most fields a query parameter's or template variable's name may go through (`a.b.c`
/// is 3): a template variable thousands deep (a descriptor's `google.api.http` path) over a
/// message that holds itself overflowed a worker's stack at the first request it matched.
/// A JSON body's nesting is bounded by serde_json's own limit (127 levels).
pub const MAX_FIELD_PATH: usize = 32;

/// Largest `descriptor_set` file read (all of googleapis with its imports is a few MiB).
const MAX_DESCRIPTOR_FILE: u64 = 64 << 20;

/// The fields along `a.b.c` in `msg`: messages on the way, a scalar, enum or
/// well-known-type message at the end. A template variable (`query` false) names fields by
/// their proto names and ends on a singular field; a query parameter (`query` true) may use
/// JSON names and end on a repeated scalar.
fn field_path(
    msg: &MessageDescriptor,
    path: &str,
    query: bool,
) -> Result<Vec<FieldDescriptor>, String> {
    let mut out = Vec::new();
    let mut cur = msg.clone();
    let names: Vec<&str> = path.split('.').collect();
    // A message that holds itself makes any depth valid: one query parameter (or template
    // variable) a few thousand fields deep would then recurse that deep (building, reading
    // and dropping the message) and overflow a worker's stack, which no request may do.
    if names.len() > MAX_FIELD_PATH {
        return Err(format!("{path:?}: more than {MAX_FIELD_PATH} fields deep"));
    }
    for (k, name) in names.iter().enumerate() {
        let f = cur
            .get_field_by_name(name)
            .or_else(|| cur.get_field_by_json_name(name).filter(|_| query))
            .ok_or_else(|| format!("{path:?}: no field {name:?} in {}", cur.full_name()))?;
        let last = k + 1 == names.len();
        if f.is_map() || (f.is_list() && !(query && last)) {
            return Err(format!("{path:?}: {name} is repeated"));
        }
        match f.kind() {
            Kind::Message(m) if !last => cur = m,
            Kind::Message(m) if !m.full_name().starts_with("google.protobuf.") => {
                return Err(format!("{path:?}: {name} is a message"));
            }
            _ if !last => return Err(format!("{path:?}: {name} is not a message")),
            _ => {}
        }
        out.push(f);
    }
    Ok(out)
}

impl Template {
    /// Matches a request path (before `?`); the variables' raw values (still
    /// percent-encoded) as spans of `path`.
    /// Whether this template is the more specific of two that match one path: one with a
    /// custom verb beats one without; then at the first segment where they differ a literal
    /// beats `*`, which beats `**`, and the template's end beats a `**` that matches nothing
    /// more (two that match one path differ there only by a `**` after the other's end).
    fn more_specific_than(&self, other: &Template) -> bool {
        fn ranks(t: &Template) -> impl Iterator<Item = u8> + '_ {
            let units = t.units.iter().filter_map(|u| match u {
                Unit::Literal(_) => Some(2u8),
                Unit::One => Some(1),
                Unit::Rest => Some(0),
                Unit::VarStart(_) | Unit::VarEnd(_) => None,
            });
            units.chain(std::iter::once(3))
        }
        match (self.verb.is_some(), other.verb.is_some()) {
            (true, false) => true,
            (false, true) => false,
            _ => ranks(self).cmp(ranks(other)) == std::cmp::Ordering::Greater,
        }
    }

    /// Whether variable `k` may span several segments (`{name=shelves/*}`, `**`): its value
    /// keeps `%2F` escaped, as google.api.http says, so a `/` in one segment cannot pass for
    /// a separator.
    fn multi_segment(&self, k: usize) -> bool {
        let Some(start) = self.units.iter().position(|u| *u == Unit::VarStart(k)) else {
            return false;
        };
        let inside = self.units[start + 1..]
            .iter()
            .take_while(|u| **u != Unit::VarEnd(k));
        let mut segments = 0;
        for u in inside {
            match u {
                Unit::Rest => return true,
                Unit::Literal(_) | Unit::One => segments += 1,
                _ => {}
            }
        }
        segments > 1
    }

    pub fn matches<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(v) => {
                let (p, verb) = path.rsplit_once(':')?;
                if verb != &**v || p.ends_with('/') && !p.is_empty() {
                    return None;
                }
                p
            }
            None => path,
        };
        // Segment boundaries: byte offsets of each segment in `path`.
        let mut segs = Vec::with_capacity(8);
        let mut start = 0;
        for (i, b) in path.bytes().enumerate() {
            if b == b'/' {
                segs.push((start, i));
                start = i + 1;
            }
        }
        segs.push((start, path.len()));
        let mut j = 0;
        let mut starts = vec![0usize; self.vars.len()];
        let mut values = vec![""; self.vars.len()];
        for u in &self.units {
            match u {
                Unit::Literal(l) => {
                    let &(a, b) = segs.get(j)?;
                    if path[a..b] != **l {
                        return None;
                    }
                    j += 1;
                }
                Unit::One => {
                    let &(a, b) = segs.get(j)?;
                    if a == b {
                        return None;
                    }
                    j += 1;
                }
                Unit::Rest => j = segs.len(),
                Unit::VarStart(k) => starts[*k] = j,
                Unit::VarEnd(k) => {
                    let from = starts[*k];
                    values[*k] = if j > from {
                        &path[segs[from].0..segs[j - 1].1]
                    } else {
                        ""
                    };
                }
            }
        }
        (j == segs.len()).then_some(values)
    }
}

impl Transcoder {
    /// The binding for a request: `Ok` with the binding and its variables, `Err(true)` when
    /// the path matches some binding but not with this method (405), `Err(false)` when it
    /// matches none (404).
    pub fn find<'p>(&self, method: &str, path: &'p str) -> Result<(&Binding, Vec<&'p str>), bool> {
        let (i, vars) = self.find_index(method, path)?;
        Ok((&self.bindings[i], vars))
    }

    /// The methods some binding takes at `path`, for a 405's `Allow` (RFC 9110 10.2.1): in
    /// the bindings' order, each once, comma-separated.
    pub fn allowed(&self, path: &str) -> String {
        let mut allow: Vec<&str> = Vec::new();
        for b in &self.bindings {
            if b.template.matches(path).is_none() {
                continue;
            }
            let verbs: &[&str] = if &*b.verb == "GET" {
                &["GET", "HEAD"]
            } else {
                &[&b.verb]
            };
            for v in verbs {
                if !allow.contains(v) {
                    allow.push(v);
                }
            }
        }
        allow.join(", ")
    }

    /// [`Transcoder::find`], giving the binding's index in `bindings`.
    pub fn find_index<'p>(
        &self,
        method: &str,
        path: &'p str,
    ) -> Result<(usize, Vec<&'p str>), bool> {
        let mut path_known = false;
        // The most specific binding whose template matches (a literal segment before `*`,
        // `*` before `**`, then one with a custom verb), as Envoy's path matcher chooses:
        // `/v1/users/me` is not `/v1/users/{id}` with id "me", whichever is declared first;
        // among equals the first declared. HEAD is GET without the body (RFC 9110 9.3.2),
        // unless a binding takes HEAD itself. A `custom` binding of kind `*` takes any method
        // (google/api/http.proto: "leave the HTTP method unspecified"), after those that
        // name it.
        let mut best: Option<(usize, Vec<&'p str>)> = None;
        let mut as_get: Option<(usize, Vec<&'p str>)> = None;
        let mut any: Option<(usize, Vec<&'p str>)> = None;
        for (i, b) in self.bindings.iter().enumerate() {
            let Some(vars) = b.template.matches(path) else {
                continue;
            };
            path_known = true;
            let slot = if *b.verb == *method {
                &mut best
            } else if method == "HEAD" && &*b.verb == "GET" {
                &mut as_get
            } else if &*b.verb == "*" {
                &mut any
            } else {
                continue;
            };
            let better = slot
                .as_ref()
                .is_none_or(|(j, _)| b.template.more_specific_than(&self.bindings[*j].template));
            if better {
                *slot = Some((i, vars));
            }
        }
        best.or(as_get).or(any).ok_or(path_known)
    }
}

/// Percent-decodes `s` (and `+` as a space in a query string).
fn decode(s: &str, plus_space: bool) -> Result<String, ()> {
    decode_keeping(s, plus_space, false)
}

/// [`decode`], leaving `%2F` (either case) as it is when `keep_slash`.
fn decode_keeping(s: &str, plus_space: bool, keep_slash: bool) -> Result<String, ()> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or(())?;
                let v = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(())?;
                if keep_slash && v == b'/' {
                    out.extend_from_slice(&b[i..i + 3]);
                } else {
                    out.push(v);
                }
                i += 3;
            }
            b'+' if plus_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// The JSON form of a path or query value for the field `f`: booleans (and `BoolValue`s)
/// become JSON booleans, an enum's number a JSON number; everything else stays a string,
/// which the canonical mapping accepts for numbers, enum names, bytes and the well-known
/// types.
fn typed(f: &FieldDescriptor, v: String) -> Value {
    let boolean = match f.kind() {
        Kind::Bool => true,
        Kind::Message(m) => m.full_name() == "google.protobuf.BoolValue",
        _ => false,
    };
    match (boolean, v.as_str()) {
        (true, "true") => Value::Bool(true),
        (true, "false") => Value::Bool(false),
        // An enum by number (as grpc-gateway takes it); by name it stays a string.
        (_, n) if matches!(f.kind(), Kind::Enum(_)) && n.parse::<i32>().is_ok() => {
            Value::from(n.parse::<i32>().unwrap_or_default())
        }
        _ => Value::String(v),
    }
}

/// Sets `value` at the field path `fields` in `obj` (by JSON names), replacing what the body
/// set there under either spelling; a repeated leaf gets `value` appended.
fn set_path(
    obj: &mut Map<String, Value>,
    fields: &[FieldDescriptor],
    value: Value,
) -> Result<(), String> {
    let (leaf, parents) = fields.split_last().ok_or("empty field path")?;
    let mut cur = obj;
    // The body may use the proto name; the value moves under the JSON name.
    let rename = |m: &mut Map<String, Value>, f: &FieldDescriptor| {
        if f.name() != f.json_name() {
            if let Some(v) = m.remove(f.name()) {
                m.insert(f.json_name().to_owned(), v);
            }
        }
    };
    for f in parents {
        rename(cur, f);
        let entry = cur
            .entry(f.json_name().to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            _ => return Err(format!("{} is not an object", f.json_name())),
        };
    }
    rename(cur, leaf);
    if leaf.is_list() {
        let list = cur
            .entry(leaf.json_name().to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        match list {
            Value::Array(a) => a.push(value),
            _ => return Err(format!("{} is not a list", leaf.json_name())),
        }
    } else {
        cur.insert(leaf.json_name().to_owned(), value);
    }
    Ok(())
}

impl Binding {
    /// The request message, protobuf-encoded, from the path's variables, the query string
    /// and the JSON body.
    pub fn request_message(
        &self,
        vars: &[&str],
        query: Option<&str>,
        body: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, Refusal> {
        let empty = body.iter().all(u8::is_ascii_whitespace);
        let query = query.filter(|q| !q.is_empty());
        let msg = if vars.is_empty() && query.is_none() && matches!(self.body, BodyRule::Whole) {
            // The common case: the body is the message, read straight from the bytes, and
            // read again with the path tracked only when it is refused.
            let body = if empty { &b"{}"[..] } else { body };
            let mut de = serde_json::Deserializer::from_slice(body);
            let options = DeserializeOptions::new().deny_unknown_fields(true);
            match DynamicMessage::deserialize_with_options(self.input.clone(), &mut de, &options) {
                Ok(msg) => {
                    de.end().map_err(|e| Refusal::new("", e.to_string()))?;
                    msg
                }
                Err(_) => {
                    let mut de = serde_json::Deserializer::from_slice(body);
                    return Err(deserialize(&self.input, &mut de)
                        .err()
                        .unwrap_or_else(|| Refusal::new("", "invalid JSON")));
                }
            }
        } else {
            let mut obj = Map::new();
            match &self.body {
                BodyRule::None => {}
                BodyRule::Whole if empty => {}
                BodyRule::Whole => match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(m)) => obj = m,
                    Ok(_) => return Err(Refusal::new("", "the body must be a JSON object")),
                    Err(e) => return Err(Refusal::new("", e.to_string())),
                },
                BodyRule::Field(_) if empty => {}
                BodyRule::Field(f) => {
                    let v: Value = serde_json::from_slice(body)
                        .map_err(|e| Refusal::new(f.json_name(), e.to_string()))?;
                    obj.insert(f.json_name().to_owned(), v);
                }
            }
            for pair in query.into_iter().flat_map(|q| q.split('&')) {
                if pair.is_empty() {
                    continue;
                }
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let k = decode(k, true).map_err(|()| Refusal::new(k, "bad percent-encoding"))?;
                let v = decode(v, true).map_err(|()| Refusal::new(&k, "bad percent-encoding"))?;
                // A field the body binds comes from the body only (google.api.http: with
                // `body: "*"` there are no query parameters): a parameter must not replace
                // what the body said, which something that checked the body may rely on.
                if let BodyRule::Whole = &self.body {
                    return Err(Refusal::new(
                        &k,
                        "no query parameters: the body (`body: \"*\"`) gives every field not \
                         in the path",
                    ));
                }
                let path = field_path(&self.input, &k, true).map_err(|e| Refusal::new(&k, e))?;
                if let BodyRule::Field(f) = &self.body {
                    if path[0] == *f {
                        return Err(Refusal::new(
                            &k,
                            format!("the body gives `{}`, not the query", f.json_name()),
                        ));
                    }
                }
                let leaf = &path[path.len() - 1];
                let value = typed(leaf, v);
                set_path(&mut obj, &path, value).map_err(|e| Refusal::new(&k, e))?;
            }
            // The path's variables win over the body and the query.
            for (k, (raw, fields)) in vars.iter().zip(&self.template.vars).enumerate() {
                let name = json_path(fields);
                let keep_slash = self.template.multi_segment(k);
                let v = decode_keeping(raw, false, keep_slash)
                    .map_err(|()| Refusal::new(&name, "bad percent-encoding"))?;
                let leaf = &fields[fields.len() - 1];
                set_path(&mut obj, fields, typed(leaf, v)).map_err(|e| Refusal::new(&name, e))?;
            }
            deserialize(&self.input, &Value::Object(obj))?
        };
        let bytes = msg.encode_to_vec();
        if bytes.len() > max {
            return Err(Refusal::new(
                "",
                format!(
                    "the request message is {} bytes, more than max_message_bytes ({max})",
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    /// Appends the JSON form of one response message (or of its `response_body` field).
    pub fn response_json(&self, message: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let msg = DynamicMessage::decode(self.output.clone(), message).map_err(|e| {
            format!(
                "the upstream's answer is not a {}: {e}",
                self.output.full_name()
            )
        })?;
        let options = SerializeOptions::new();
        match &self.response_body {
            None => {
                let mut ser = serde_json::Serializer::new(&mut *out);
                msg.serialize_with_options(&mut ser, &options)
                    .map_err(|e| e.to_string())
            }
            Some(f) => {
                // A message holding only that field is `{"name":VALUE}`: the answer is
                // VALUE, with its own field order kept.
                let mut only = DynamicMessage::new(self.output.clone());
                only.set_field(f, msg.get_field(f).into_owned());
                let write = |m: &DynamicMessage, o: &SerializeOptions| {
                    let mut ser = serde_json::Serializer::new(Vec::new());
                    m.serialize_with_options(&mut ser, o)
                        .map(|()| ser.into_inner())
                };
                let all = write(&only, &options).map_err(|e| e.to_string())?;
                if all == b"{}" {
                    // The field holds its default, which the canonical form leaves out.
                    let full = write(&only, &options.skip_default_fields(false))
                        .map_err(|e| e.to_string())?;
                    let full: Value = serde_json::from_slice(&full).map_err(|e| e.to_string())?;
                    let v = full.get(f.json_name()).unwrap_or(&Value::Null);
                    return serde_json::to_writer(out, v).map_err(|e| e.to_string());
                }
                let start = f.json_name().len() + 4;
                let value = all
                    .get(start..all.len().saturating_sub(1))
                    .ok_or("response_body field missing")?;
                out.extend_from_slice(value);
                Ok(())
            }
        }
    }
}

/// The JSON path of a field path (`book.id` → `book.id` in JSON names).
fn json_path(fields: &[FieldDescriptor]) -> String {
    fields
        .iter()
        .map(|f| f.json_name())
        .collect::<Vec<_>>()
        .join(".")
}

/// Reads a message from JSON, refusing unknown fields; the refusal names the field's path.
fn deserialize<'de, D: serde::Deserializer<'de>>(
    desc: &MessageDescriptor,
    de: D,
) -> Result<DynamicMessage, Refusal>
where
    D::Error: std::fmt::Display,
{
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(de, &mut track);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc.clone(), tracked, &options).map_err(|e| {
        let message = e.to_string();
        let path = track.path().to_string();
        // `.`: the message itself; `?`: nowhere known (the JSON ended early).
        let mut field = if path == "." || path == "?" {
            String::new()
        } else {
            path
        };
        // An unknown field fails in its parent object: name the field itself.
        if let Some(name) = message
            .strip_prefix("unrecognized field name '")
            .and_then(|m| m.split('\'').next())
        {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(name);
        }
        Refusal::new(field, message)
    })
}

/// The HTTP status for a gRPC status code (google.rpc.Code's mapping).
pub fn http_status_for_grpc(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &[u8] = include_bytes!("../testdata/shop.pb");

    fn shop() -> Transcoder {
        transcoder(SHOP, "shop.v1.Orders")
    }

    /// A transcoder of `service` in the descriptor set `set`.
    fn transcoder(set: &[u8], service: &str) -> Transcoder {
        let mut b64 = Vec::new();
        crate::keys::encode_b64_into(set, &mut b64);
        let cfg = TranscoderConfig {
            id: "t".into(),
            descriptor_set_base64: Some(String::from_utf8(b64).unwrap()),
            services: vec![service.into()],
            ..TranscoderConfig::default()
        };
        compile_transcoder(&cfg, 0).unwrap()
    }

    fn order_json(b: &Binding, bytes: &[u8]) -> Value {
        let mut out = Vec::new();
        b.response_json(bytes, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    /// Decodes a request message back to JSON (through the binding's input type).
    fn request_json(b: &Binding, bytes: &[u8]) -> Value {
        let msg = DynamicMessage::decode(b.input.clone(), bytes).unwrap();
        serde_json::to_value(&msg).unwrap()
    }

    #[test]
    fn bindings_come_from_the_http_options() {
        let t = shop();
        let routes: Vec<(String, String)> = t
            .bindings
            .iter()
            .map(|b| (b.verb.to_string(), b.grpc_path.to_string()))
            .collect();
        assert!(routes.contains(&("GET".into(), "/shop.v1.Orders/GetOrder".into())));
        // additional_bindings: PATCH and PUT for one method.
        assert!(routes.contains(&("PATCH".into(), "/shop.v1.Orders/UpdateOrder".into())));
        assert!(routes.contains(&("PUT".into(), "/shop.v1.Orders/UpdateOrder".into())));
        // No option: POST to the gRPC path. Client streaming: left out.
        assert!(routes.contains(&("POST".into(), "/shop.v1.Orders/Echo".into())));
        assert!(!routes.iter().any(|(_, p)| p.ends_with("/Upload")));

        let (b, vars) = t.find("GET", "/v1/orders/A%2F1").unwrap();
        assert_eq!(
            (&*b.grpc_path, vars),
            ("/shop.v1.Orders/GetOrder", vec!["A%2F1"])
        );
        let (b, vars) = t.find("POST", "/v1/orders/7:cancel").unwrap();
        assert_eq!(
            (&*b.grpc_path, vars),
            ("/shop.v1.Orders/CancelOrder", vec!["7"])
        );
        let (b, _) = t.find("GET", "/v1/orders/7/items").unwrap();
        assert_eq!(&*b.grpc_path, "/shop.v1.Orders/GetItems");
        assert!(t.find("GET", "/v1/orders").is_ok());
        // A known path with another method: 405; an unknown path: 404.
        assert_eq!(t.find("DELETE", "/v1/orders").err(), Some(true));
        assert_eq!(t.allowed("/v1/orders"), "GET, HEAD, POST");
        // HEAD is GET's, without the body.
        let (b, vars) = t.find("HEAD", "/v1/orders/7").unwrap();
        assert_eq!(
            (&*b.grpc_path, vars),
            ("/shop.v1.Orders/GetOrder", vec!["7"])
        );
        assert_eq!(t.find("HEAD", "/shop.v1.Orders/Echo").err(), Some(true));
        assert_eq!(t.allowed("/v2/orders"), "");
        assert_eq!(t.find("GET", "/v2/orders").err(), Some(false));
        assert_eq!(t.find("GET", "/v1/orders/7/items/9").err(), Some(false));
    }

    #[test]
    fn the_most_specific_template_wins_and_multi_segment_values_keep_escaped_slashes() {
        let t = shop();
        let id_input = t
            .bindings
            .iter()
            .find(|b| b.input.get_field_by_name("id").is_some())
            .unwrap()
            .input
            .clone();
        let tpl = |s: &str| parse_template(s, &id_input).unwrap();
        let (param, literal) = (tpl("/v1/orders/{id}"), tpl("/v1/orders/me"));
        assert!(literal.more_specific_than(&param));
        assert!(!param.more_specific_than(&literal));
        let (rest, deep) = (tpl("/v1/{id=**}"), tpl("/v1/special/x"));
        assert!(deep.more_specific_than(&rest) && !rest.more_specific_than(&deep));
        assert!(param.more_specific_than(&rest));
        let verb = tpl("/v1/orders/{id}:run");
        assert!(verb.more_specific_than(&param) && !param.more_specific_than(&verb));
        // The end beats a `**` that matches nothing more, and a verb beats longer literals
        // (before: `/v1/orders/{id=**}` took `/v1/orders`, and `/v1/x/{id}` `/v1/x/a:run`).
        let (list, any) = (tpl("/v1/orders"), tpl("/v1/orders/{id=**}"));
        assert!(list.more_specific_than(&any) && !any.more_specific_than(&list));
        let (run, longer) = (tpl("/v1/{id=**}:run"), tpl("/v1/x/{id}"));
        assert!(run.more_specific_than(&longer) && !longer.more_specific_than(&run));
        // Both match a path with the verb; the one with it is chosen over `{id}` = "7:run".
        assert!(param.matches("/v1/orders/7:run").is_some());
        assert!(
            !param.more_specific_than(&param),
            "equals: the first declared stays"
        );
        // Multi-segment variables keep `%2F` as it is; one-segment ones decode it.
        assert!(!param.multi_segment(0));
        assert!(rest.multi_segment(0));
        assert!(tpl("/v1/{id=orders/*}").multi_segment(0));
        assert_eq!(
            decode_keeping("a%2Fb%2fc%20d", false, true).unwrap(),
            "a%2Fb%2fc d"
        );
        assert_eq!(decode_keeping("a%2Fb", false, false).unwrap(), "a/b");
        // A query value for an enum, by number as by name.
        let (b, vars) = t.find("GET", "/v1/orders").unwrap();
        let m = b
            .request_message(&vars, Some("status=2"), b"", t.max_message_bytes)
            .unwrap();
        let by_name = b
            .request_message(&vars, Some("status=SHIPPED"), b"", t.max_message_bytes)
            .unwrap();
        assert_eq!(request_json(b, &m), request_json(b, &by_name));
    }

    #[test]
    fn requests_take_path_query_and_body() {
        let t = shop();
        let max = t.max_message_bytes;
        // Path variable (percent-decoded).
        let (b, vars) = t.find("GET", "/v1/orders/A%2F1").unwrap();
        let m = b.request_message(&vars, None, b"", max).unwrap();
        assert_eq!(request_json(b, &m), serde_json::json!({"id": "A/1"}));
        // Query parameters: scalars, an enum by name, a repeated field, a bool, a Timestamp.
        let (b, vars) = t.find("GET", "/v1/orders").unwrap();
        let q = "customer=ann+lee&pageSize=20&status=SHIPPED&tags=a&tags=b&gift_only=true\
                 &since=2026-01-02T03:04:05Z";
        let m = b.request_message(&vars, Some(q), b"", max).unwrap();
        assert_eq!(
            request_json(b, &m),
            serde_json::json!({"customer": "ann lee", "pageSize": 20, "status": "SHIPPED",
                "tags": ["a", "b"], "giftOnly": true, "since": "2026-01-02T03:04:05Z"})
        );
        // A body field, with nested messages, a map, an int64 and a Duration.
        let (b, vars) = t.find("POST", "/v1/orders").unwrap();
        let body = br#"{"customer":"ann","items":[{"sku":"a","quantity":2,"priceCents":"1999"}],
                        "labels":{"k":"v"},"shipWithin":"3600s","status":"PENDING"}"#;
        let m = b
            .request_message(&vars, Some("requestId=r1"), body, max)
            .unwrap();
        assert_eq!(
            request_json(b, &m),
            serde_json::json!({"requestId": "r1", "order": {"customer": "ann",
                "items": [{"sku": "a", "quantity": 2, "priceCents": "1999"}],
                "labels": {"k": "v"}, "shipWithin": "3600s", "status": "PENDING"}})
        );
        // A nested path variable wins over the body's value.
        let (b, vars) = t.find("PATCH", "/v1/orders/o9").unwrap();
        let m = b
            .request_message(&vars, None, br#"{"id":"other","gift":true}"#, max)
            .unwrap();
        assert_eq!(
            request_json(b, &m),
            serde_json::json!({"order": {"id": "o9", "gift": true}})
        );
        // The whole body, no path variables: read straight from the bytes.
        let (b, vars) = t.find("POST", "/shop.v1.Orders/Echo").unwrap();
        let m = b
            .request_message(&vars, None, br#"{"id":"e","discount":0.5}"#, max)
            .unwrap();
        assert_eq!(
            request_json(b, &m),
            serde_json::json!({"id": "e", "discount": 0.5})
        );
    }

    #[test]
    fn the_query_never_replaces_what_the_body_binds() {
        // Before, `?reason=x` replaced the body's `reason` under `body: "*"`, and
        // `?order.customer=q` the body's `customer` under `body: "order"`.
        let t = shop();
        let max = t.max_message_bytes;
        let (b, vars) = t.find("PATCH", "/v1/orders/o1").unwrap();
        for q in ["order.customer=q", "order.gift=true"] {
            let e = b
                .request_message(&vars, Some(q), br#"{"customer":"b"}"#, max)
                .unwrap_err();
            assert!(e.message.contains("the body gives `order`"), "{q}: {e:?}");
        }
        let (b, vars) = t.find("POST", "/shop.v1.Orders/Echo").unwrap();
        let e = b
            .request_message(&vars, Some("id=q"), br#"{"id":"e"}"#, max)
            .unwrap_err();
        assert_eq!(e.field, "id");
        assert!(e.message.contains("no query parameters"), "{e:?}");
        // Fields the body does not bind still come from the query (`requestId` above).
    }

    /// A transcoder of `message deep.F { F not = 1; string v = 2; }` (a message that holds
    /// itself) and `service deep.S { rpc M(F) returns (F); }`.
    fn deep() -> Transcoder {
        use prost::Message as _;
        use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
        use prost_reflect::prost_types::{
            DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
            MethodDescriptorProto, ServiceDescriptorProto,
        };
        let field = |name: &str, number, ty: Type, type_name: Option<&str>| FieldDescriptorProto {
            name: Some(name.into()),
            json_name: Some(name.into()),
            number: Some(number),
            label: Some(Label::Optional as i32),
            r#type: Some(ty as i32),
            type_name: type_name.map(Into::into),
            ..Default::default()
        };
        let f = DescriptorProto {
            name: Some("F".into()),
            field: vec![
                field("not", 1, Type::Message, Some(".deep.F")),
                field("v", 2, Type::String, None),
            ],
            ..Default::default()
        };
        let m = MethodDescriptorProto {
            name: Some("M".into()),
            input_type: Some(".deep.F".into()),
            output_type: Some(".deep.F".into()),
            ..Default::default()
        };
        let file = FileDescriptorProto {
            name: Some("deep.proto".into()),
            package: Some("deep".into()),
            syntax: Some("proto3".into()),
            message_type: vec![f],
            service: vec![ServiceDescriptorProto {
                name: Some("S".into()),
                method: vec![m],
                ..Default::default()
            }],
            ..Default::default()
        };
        let set = FileDescriptorSet { file: vec![file] }.encode_to_vec();
        transcoder(&set, "deep.S")
    }

    #[test]
    fn a_query_parameter_goes_at_most_max_field_path_fields_deep() {
        // `deep.S/M` has only its default binding, `body: "*"`, which takes no query
        // parameters: the names are resolved as a binding that takes them resolves them.
        let t = deep();
        let (b, _) = t.find("POST", "/deep.S/M").unwrap();
        let name = |depth: usize| format!("{}v", "not.".repeat(depth - 1));
        let path = field_path(&b.input, &name(MAX_FIELD_PATH), true).unwrap();
        assert_eq!(path.len(), MAX_FIELD_PATH);
        assert_eq!(path[MAX_FIELD_PATH - 1].name(), "v");
        // 2,000 deep (8 KiB of query): refused, where it used to overflow the stack.
        for depth in [MAX_FIELD_PATH + 1, 2000] {
            let e = field_path(&b.input, &name(depth), true).unwrap_err();
            assert!(e.ends_with("more than 32 fields deep"), "{e}");
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        let t = shop();
        let max = t.max_message_bytes;
        let (echo, _) = t.find("POST", "/shop.v1.Orders/Echo").unwrap();
        let refuse = |body: &[u8]| echo.request_message(&[], None, body, max).unwrap_err();
        let r = refuse(br#"{"id":"e","colour":"red"}"#);
        assert_eq!(r.field, "colour", "{r:?}");
        let r = refuse(br#"{"items":[{"sku":"a","size":1}]}"#);
        assert_eq!(r.field, "items[0].size", "{r:?}");
        let r = refuse(br#"{"items":[{"sku":"a"},{"quantity":"many"}]}"#);
        assert_eq!(r.field, "items[1].quantity", "{r:?}");
        let r = refuse(br#"{"items":[{"quantity":3000000000}]}"#);
        assert_eq!(
            r.field, "items[0].quantity",
            "out of range for int32: {r:?}"
        );
        let r = refuse(br#"{"status":"LOST"}"#);
        assert_eq!(r.field, "status", "{r:?}");
        let r = refuse(br#"{"createdAt":"yesterday"}"#);
        assert_eq!(r.field, "createdAt", "{r:?}");
        let r = refuse(b"{\"id\":");
        assert!(!r.message.is_empty());
        // JSON that ends early is no field's fault (before: the field `?`).
        let r = refuse(b"{\"id\":\"a\"");
        assert_eq!(r.field, "", "{r:?}");
        // Unknown query parameters and a body over max_message_bytes.
        let (list, vars) = t.find("GET", "/v1/orders").unwrap();
        let r = list
            .request_message(&vars, Some("colour=red"), b"", max)
            .unwrap_err();
        assert_eq!(r.field, "colour");
        let big = format!(r#"{{"notes":["{}"]}}"#, "x".repeat(200));
        let r = echo
            .request_message(&[], None, big.as_bytes(), 100)
            .unwrap_err();
        assert!(r.message.contains("max_message_bytes"), "{r:?}");
    }

    #[test]
    fn answers_become_canonical_json() {
        let t = shop();
        let (echo, _) = t.find("POST", "/shop.v1.Orders/Echo").unwrap();
        let body = br#"{"id":"o1","items":[{"sku":"a","quantity":1,"priceCents":"5"}],
                        "createdAt":"2026-01-02T03:04:05Z","status":"SHIPPED","gift":false}"#;
        let m = echo.request_message(&[], None, body, 1 << 20).unwrap();
        // Defaults are left out; int64 as a string; the Timestamp as RFC 3339.
        assert_eq!(
            order_json(echo, &m),
            serde_json::json!({"id": "o1", "items": [{"sku": "a", "quantity": 1,
                "priceCents": "5"}], "createdAt": "2026-01-02T03:04:05Z", "status": "SHIPPED"})
        );
        // response_body: the answer is that field.
        let (items, _) = t.find("GET", "/v1/orders/o1/items").unwrap();
        assert_eq!(
            order_json(items, &m),
            serde_json::json!([{"sku": "a", "quantity": 1, "priceCents": "5"}])
        );
        let mut out = Vec::new();
        assert!(echo.response_json(b"\xff\xff", &mut out).is_err());
        // A response_body field left at its default is still there.
        let empty = echo.request_message(&[], None, b"{}", 1 << 20).unwrap();
        assert_eq!(order_json(items, &empty), serde_json::json!([]));
    }

    #[test]
    fn descriptor_sets_that_do_not_parse_or_lack_the_service_are_refused() {
        let base = TranscoderConfig {
            id: "t".into(),
            descriptor_set_base64: Some("AAAA".into()),
            services: vec!["shop.v1.Orders".into()],
            ..TranscoderConfig::default()
        };
        let e = compile_transcoder(&base, 2).unwrap_err();
        assert_eq!(e.path(), "transcoders[2].descriptor_set_base64");
        let mut b64 = Vec::new();
        crate::keys::encode_b64_into(SHOP, &mut b64);
        let other = TranscoderConfig {
            descriptor_set_base64: Some(String::from_utf8(b64).unwrap()),
            services: vec!["shop.v1.Orders".into(), "shop.v1.Nope".into()],
            ..base.clone()
        };
        let e = compile_transcoder(&other, 0).unwrap_err();
        assert_eq!(e.path(), "transcoders[0].services[1]");
        let neither = TranscoderConfig {
            descriptor_set_base64: None,
            ..base.clone()
        };
        assert_eq!(
            compile_transcoder(&neither, 0).unwrap_err().path(),
            "transcoders[0]"
        );
        let file = TranscoderConfig {
            descriptor_set_base64: None,
            descriptor_set: Some("/nonexistent/x.pb".into()),
            ..base
        };
        assert_eq!(
            compile_transcoder(&file, 0).unwrap_err().path(),
            "transcoders[0].descriptor_set"
        );
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        for (code, status) in [(0, 200), (3, 400), (4, 504), (5, 404), (7, 403), (8, 429)] {
            assert_eq!(http_status_for_grpc(code), status);
        }
        for (code, status) in [
            (9, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (16, 401),
            (99, 500),
        ] {
            assert_eq!(http_status_for_grpc(code), status);
        }
    }
}
