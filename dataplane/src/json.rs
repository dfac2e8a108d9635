//! JSON kept as the text it arrived in, opened only where a shape or a merge has to look
//! inside: [`Node`]. An aggregate's step answers are checked once ([`check`], the gateway's
//! own one-pass checker in `validate`, no tree), then each object that `target`, `allow`, `deny`,
//! `rename` or a merge collision needs is split into its members, whose values stay
//! borrowed slices of the answer; the merged answer is written out from those slices. Only
//! what changes is rebuilt, so a typical aggregate allocates a few vectors per step instead
//! of a node per JSON value (the `aggregate` bench measures both ways).
//!
//! Arrays that a shape filters element by element and values that `append` combines fall back
//! to `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use common::aggregate::{DotPath, Shape};
use common::config::OnConflict;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// One JSON value.
#[derive(Debug, Clone)]
pub enum Node<'a> {
    /// Unchanged text of the answer: one JSON value, already checked.
    Raw(&'a str),
    /// An object that was opened: its members in order, each key once.
    Object(Members<'a>),
    /// A value built or changed as a tree.
    Value(Value),
}

/// An opened object's members.
pub type Members<'a> = Vec<(Cow<'a, str>, Node<'a>)>;

mod validate;

pub(crate) use validate::stop_bytes;
pub use validate::{Invalid, MAX_DEPTH};

/// Why a value could not be made into a tree.
pub type Error = serde_json::Error;

/// Checks that `text` is one JSON value (nothing else around it) and keeps it as text; an
/// object is split into its members in the same pass (merging needs them anyway).
pub fn parse(text: &[u8]) -> Result<Node<'_>, Invalid> {
    let checked = check(text)?;
    restore(text, &checked).ok_or(Invalid {
        at: 0,
        what: "not the text that was checked",
    })
}

/// What [`check`] learnt about a text, kept beside it so that [`restore`] gives its
/// [`Node`] again without a second pass: for an object, where each member's key and value
/// lie in the text.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    members: Option<Vec<validate::MemberSpan>>,
    /// The keys with escapes, unescaped, in the members' order (rare: names are plain in
    /// practice).
    unescaped: Vec<Box<str>>,
}

/// Checks `text` like [`parse`], keeping the result as offsets (the text can then move, to
/// be borrowed again by [`restore`]). One pass of [`validate`]'s checker, not serde_json's.
pub fn check(text: &[u8]) -> Result<Checked, Invalid> {
    let Some(mut members) = validate::check(text)? else {
        return Ok(Checked::default());
    };
    let mut unescaped = Vec::new();
    for m in members.iter().filter(|m| m.escaped) {
        // The quoted key, unescaped.
        let key = m.key();
        let quoted = &text[key.start - 1..key.end + 1];
        let name: String = serde_json::from_slice(quoted).map_err(|_| Invalid {
            at: key.start,
            what: "a member name that cannot be decoded (a lone surrogate)",
        })?;
        unescaped.push(name.into_boxed_str());
    }
    // Kept until the merge: without the growth's spare room.
    members.shrink_to_fit();
    Ok(Checked {
        members: Some(members),
        unescaped,
    })
}

/// The [`Node`] of a text [`check`] accepted, without checking it again. `None` only if the
/// text is not the one that was checked.
pub fn restore<'a>(text: &'a [u8], checked: &Checked) -> Option<Node<'a>> {
    let text = std::str::from_utf8(text).ok()?;
    let Some(members) = &checked.members else {
        return Some(Node::Raw(text.trim()));
    };
    let mut out = Vec::with_capacity(members.len());
    let mut index = KeyIndex::default();
    let mut unescaped = checked.unescaped.iter();
    for m in members {
        let key = match m.escaped {
            false => Cow::Borrowed(text.get(m.key())?),
            true => Cow::Owned(unescaped.next()?.to_string()),
        };
        let value = Node::Raw(text.get(m.value())?);
        // Of repeated keys the last is kept, as serde_json does.
        match index.find(&out, &key) {
            Some(i) => out[i].1 = value,
            None => index.push(&mut out, key, value),
        }
    }
    // Repeated keys leave room unused, which a group's value keeps until the merge is sent.
    if out.len() < out.capacity() / 2 {
        out.shrink_to_fit();
    }
    Some(Node::Object(out))
}

/// What kind of value a node is, by its first byte.
fn first_byte(n: &Node<'_>) -> u8 {
    match n {
        Node::Raw(r) => r.trim_start().bytes().next().unwrap_or(b'n'),
        Node::Object(_) => b'{',
        Node::Value(Value::Object(_)) => b'{',
        Node::Value(Value::Array(_)) => b'[',
        Node::Value(_) => b'0',
    }
}

impl<'a> Node<'a> {
    /// Whether the value is a JSON object.
    pub fn is_object(&self) -> bool {
        first_byte(self) == b'{'
    }

    /// The members of an object (opened in place); `None` for other values.
    pub fn members(&mut self) -> Option<&mut Members<'a>> {
        if !self.is_object() {
            return None;
        }
        match self {
            Node::Raw(r) => {
                let Object(m) = serde_json::from_str(r).ok()?;
                *self = Node::Object(m);
            }
            Node::Value(Value::Object(map)) => {
                let m = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (Cow::Owned(k), Node::Value(v)))
                    .collect();
                *self = Node::Object(m);
            }
            _ => {}
        }
        match self {
            Node::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The value as a `serde_json::Value` (parsed if still text). Fails for text nested
    /// deeper than serde_json's 127 levels, which [`check`] refuses too.
    /// [`Node::into_value`] of a copy: this node stays as it is, also when it cannot be read.
    fn to_value(&self) -> Result<Value, Error> {
        Ok(match self {
            Node::Raw(r) => serde_json::from_str(r)?,
            Node::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.to_string(), v.to_value()?)))
                    .collect::<Result<_, Error>>()?,
            ),
            Node::Value(v) => v.clone(),
        })
    }

    pub fn into_value(self) -> Result<Value, Error> {
        Ok(match self {
            Node::Raw(r) => serde_json::from_str(r)?,
            Node::Object(m) => Value::Object(
                m.into_iter()
                    .map(|(k, v)| Ok((k.into_owned(), v.into_value()?)))
                    .collect::<Result<_, Error>>()?,
            ),
            Node::Value(v) => v,
        })
    }

    /// The member at `path`, taken out of this value; `Ok(None)` where there is none (a
    /// value on the way that is no object, or has no such member). `Err` for an object on
    /// the way that cannot be opened: whether it holds the member is unknown.
    fn take(&mut self, path: &[Box<str>]) -> Result<Option<Node<'a>>, ShapeError> {
        self.take_in(path, true)
    }

    /// [`Node::take`]; `index`: whether a number reaches into an array (a `target` does; an
    /// `allow` path does not, so that it keeps nothing of an array, and two paths with one
    /// index cannot take elements out from under each other).
    fn take_in(&mut self, path: &[Box<str>], index: bool) -> Result<Option<Node<'a>>, ShapeError> {
        let Some((first, rest)) = path.split_first() else {
            return Ok(None);
        };
        if let (true, b'[', Ok(index)) = (index, first_byte(self), first.parse::<usize>()) {
            // An array's element by its index, as placeholders read them (`items.0`).
            let node = std::mem::replace(self, Node::Value(Value::Null));
            let mut value = node.into_value().map_err(|_| ShapeError::Unreadable)?;
            let element = match &mut value {
                Value::Array(items) if index < items.len() => Some(items.remove(index)),
                _ => None,
            };
            *self = Node::Value(value);
            let Some(element) = element else {
                return Ok(None);
            };
            let mut element = Node::Value(element);
            return match rest.is_empty() {
                true => Ok(Some(element)),
                false => element.take(rest),
            };
        }
        if !self.is_object() {
            return Ok(None);
        }
        let m = self.members().ok_or(ShapeError::Unreadable)?;
        let Some(i) = m.iter().position(|(k, _)| k == &**first) else {
            return Ok(None);
        };
        if rest.is_empty() {
            Ok(Some(m.remove(i).1))
        } else {
            m[i].1.take_in(rest, index)
        }
    }

    /// Removes the member at `path` wherever it is, arrays on the way gone through (see
    /// [`crate::shape::remove_all`]). `Err` for a value on the way that cannot be opened.
    fn remove_all(&mut self, path: &[Box<str>]) -> Result<(), ShapeError> {
        let Some((first, rest)) = path.split_first() else {
            return Ok(());
        };
        match first_byte(self) {
            b'[' => {
                let node = std::mem::replace(self, Node::Value(Value::Null));
                let mut value = node.into_value().map_err(|_| ShapeError::Unreadable)?;
                crate::shape::remove_all(&mut value, path);
                *self = Node::Value(value);
            }
            b'{' => {
                let m = self.members().ok_or(ShapeError::Unreadable)?;
                if let Some(i) = m.iter().position(|(k, _)| k == &**first) {
                    if rest.is_empty() {
                        m.remove(i);
                    } else {
                        m[i].1.remove_all(rest)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes the value as JSON text.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Node::Raw(r) => out.extend_from_slice(r.trim().as_bytes()),
            Node::Object(m) => {
                out.push(b'{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let _ = serde_json::to_writer(&mut *out, &**k);
                    out.push(b':');
                    v.write(out);
                }
                out.push(b'}');
            }
            Node::Value(v) => {
                let _ = serde_json::to_writer(&mut *out, v);
            }
        }
    }
}

/// Puts `value` at `path` in `dst`, making the objects on the way.
fn put<'a>(dst: &mut Members<'a>, path: &[Box<str>], value: Node<'a>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let i = match dst.iter().position(|(k, _)| k == &**first) {
        Some(i) => i,
        None => {
            dst.push((Cow::Owned(first.to_string()), Node::Object(Vec::new())));
            dst.len() - 1
        }
    };
    if rest.is_empty() {
        dst[i].1 = value;
        return;
    }
    if !dst[i].1.is_object() {
        dst[i].1 = Node::Object(Vec::new());
    }
    if let Some(m) = dst[i].1.members() {
        put(m, rest, value);
    }
}

/// The member at `path` of a value (`[]`: the value itself), without changing it. Array
/// elements are reached by their index.
pub fn lookup<'a>(node: &Node<'a>, path: &[Box<str>]) -> Option<Node<'a>> {
    let Some((first, rest)) = path.split_first() else {
        return Some(node.clone());
    };
    let child = match node {
        Node::Raw(r) => {
            let t = r.trim_start();
            if t.starts_with('{') {
                let Object(m) = serde_json::from_str(t).ok()?;
                m.into_iter().find(|(k, _)| k == &**first)?.1
            } else if t.starts_with('[') {
                let items: Vec<&RawValue> = serde_json::from_str(t).ok()?;
                Node::Raw(items.get(first.parse::<usize>().ok()?)?.get())
            } else {
                return None;
            }
        }
        Node::Object(m) => m.iter().find(|(k, _)| k == &**first)?.1.clone(),
        Node::Value(v) => {
            Node::Value(crate::shape::lookup(v, std::slice::from_ref(first))?.clone())
        }
    };
    lookup(&child, rest)
}

/// A scalar as placeholder text: a string's content, a number's or boolean's text; `None`
/// for null, objects and arrays.
pub fn scalar_text(node: &Node<'_>) -> Option<Cow<'static, [u8]>> {
    match node {
        Node::Raw(r) => {
            let t = r.trim();
            match t.as_bytes().first()? {
                b'"' => {
                    let s: String = serde_json::from_str(t).ok()?;
                    Some(Cow::Owned(s.into_bytes()))
                }
                b'-' | b'0'..=b'9' | b't' | b'f' => Some(Cow::Owned(t.as_bytes().to_vec())),
                _ => None,
            }
        }
        Node::Object(_) => None,
        Node::Value(v) => crate::shape::scalar_text(v).map(|c| Cow::Owned(c.into_owned())),
    }
}

/// Why a shape could not be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeError {
    /// `target` names a member the value does not have.
    TargetMissing,
    /// A value the shape has to open cannot be read as a tree (see [`UNREADABLE`]).
    Unreadable,
}

/// What JSON text [`check`] lets through that a shape or a merge cannot open.
pub const UNREADABLE: &str = "JSON the gateway cannot open to shape or merge: a number beyond \
     a double's range, or a key with a lone surrogate";

/// Why two answers could not be merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeError {
    /// `on_conflict = "error"` and two values met at this path (outermost key first).
    Conflict(Vec<String>),
    /// Two values that meet cannot be opened (see [`UNREADABLE`]).
    Unreadable,
}

/// The first part of a shape: the member `target` names (the value itself without one).
pub fn apply_target<'a>(shape: &Shape, mut v: Node<'a>) -> Result<Node<'a>, ShapeError> {
    match &shape.target {
        Some(t) => v.take(t)?.ok_or(ShapeError::TargetMissing),
        None => Ok(v),
    }
}

/// The rest of a shape, after `target`: `allow` / `deny`, `rename`, `group`.
pub fn apply_rest<'a>(shape: &Shape, mut v: Node<'a>) -> Result<Node<'a>, ShapeError> {
    let filters = !shape.allow.is_empty() || !shape.deny.is_empty() || !shape.rename.is_empty();
    if filters {
        if first_byte(&v) == b'[' {
            // Element by element: as a tree.
            let mut value = v.into_value().map_err(|_| ShapeError::Unreadable)?;
            let only_filters = Shape {
                group: None,
                target: None,
                ..shape.clone()
            };
            value = crate::shape::apply_rest(&only_filters, value);
            v = Node::Value(value);
        } else if v.is_object() {
            filter(&mut v, &shape.allow, &shape.deny)?;
            if let Some(m) = v.members() {
                // All at once: `{a = "b", b = "a"}` swaps the two.
                let mut moved = Vec::with_capacity(shape.rename.len());
                for (from, to) in shape.rename.iter() {
                    if let Some(i) = m.iter().position(|(k, _)| k == &**from) {
                        moved.push((to, m.remove(i).1));
                    }
                }
                for (to, x) in moved {
                    m.retain(|(k, _)| k != &**to);
                    m.push((Cow::Owned(to.to_string()), x));
                }
            }
        }
    }
    if let Some(g) = &shape.group {
        v = Node::Object(vec![(Cow::Owned(g.to_string()), v)]);
    }
    Ok(v)
}

fn filter<'a>(v: &mut Node<'a>, allow: &[DotPath], deny: &[DotPath]) -> Result<(), ShapeError> {
    if !allow.is_empty() {
        let mut kept = Vec::with_capacity(allow.len());
        for path in allow {
            if let Some(x) = v.take_in(path, false)? {
                put(&mut kept, path, x);
            }
        }
        *v = Node::Object(kept);
    }
    for path in deny {
        v.remove_all(path)?;
    }
    Ok(())
}

/// Applies `shape` in its order: `target`, `allow` / `deny`, `rename`, `group`.
pub fn apply<'a>(shape: &Shape, v: Node<'a>) -> Result<Node<'a>, ShapeError> {
    apply_rest(shape, apply_target(shape, v)?)
}

/// Merges the members `src` into `dst`: objects recursively, other values that meet by
/// `policy`. All or nothing: when `src` cannot be merged (a conflict under
/// [`OnConflict::Error`], values that meet but cannot be opened), `dst` holds what it held
/// (objects opened in places, the same text).
pub fn merge<'a>(
    dst: &mut Members<'a>,
    mut src: Members<'a>,
    policy: OnConflict,
) -> Result<(), MergeError> {
    prepare(dst, &mut src, policy)?;
    merge_prepared(dst, src, policy)
}

/// Checks that `src` merges into `dst` before either changes: opens the objects that meet
/// (in place: the same members, as text), and for [`OnConflict::Append`] checks that the
/// other values that meet can be read into trees, so that merging them cannot fail half-way.
fn prepare<'a>(
    dst: &mut Members<'a>,
    src: &mut Members<'a>,
    policy: OnConflict,
) -> Result<(), MergeError> {
    let index = KeyIndex::of(dst);
    for (k, v) in src.iter_mut() {
        let Some(i) = index.find(dst, k) else {
            continue;
        };
        let existing = &mut dst[i].1;
        if existing.is_object() && v.is_object() {
            let (Some(a), Some(b)) = (existing.members(), v.members()) else {
                return Err(MergeError::Unreadable);
            };
            match prepare(a, b, policy) {
                Err(MergeError::Conflict(mut path)) => {
                    path.insert(0, k.to_string());
                    return Err(MergeError::Conflict(path));
                }
                other => other?,
            }
            continue;
        }
        match policy {
            OnConflict::Error => return Err(MergeError::Conflict(vec![k.to_string()])),
            OnConflict::First | OnConflict::Last => {}
            OnConflict::Append => {
                // Read beside the nodes, which stay as they are: the merge reads them again
                // (a number read into a tree loses digits, so an earlier step's value read
                // here and then left by a failure later on would not be what it gave).
                for node in [&*existing, &*v] {
                    if !matches!(node, Node::Value(_)) && node.to_value().is_err() {
                        return Err(MergeError::Unreadable);
                    }
                }
            }
        }
    }
    Ok(())
}

/// [`merge`] once [`prepare`] has passed.
fn merge_prepared<'a>(
    dst: &mut Members<'a>,
    src: Members<'a>,
    policy: OnConflict,
) -> Result<(), MergeError> {
    let mut index = KeyIndex::of(dst);
    for (k, mut v) in src {
        let Some(i) = index.find(dst, &k) else {
            index.push(dst, k, v);
            continue;
        };
        let existing = &mut dst[i].1;
        if existing.is_object() && v.is_object() {
            let (Some(a), Some(b)) = (existing.members(), v.members()) else {
                return Err(MergeError::Unreadable);
            };
            match merge_prepared(a, std::mem::take(b), policy) {
                Err(MergeError::Conflict(mut path)) => {
                    path.insert(0, k.into_owned());
                    return Err(MergeError::Conflict(path));
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            continue;
        }
        match policy {
            OnConflict::Error => return Err(MergeError::Conflict(vec![k.into_owned()])),
            OnConflict::First => {}
            OnConflict::Last => *existing = v,
            OnConflict::Append => {
                let old = std::mem::replace(existing, Node::Value(Value::Null));
                let (Ok(old), Ok(new)) = (old.into_value(), v.into_value()) else {
                    return Err(MergeError::Unreadable);
                };
                *existing = Node::Value(match (old, new) {
                    (Value::Array(mut a), Value::Array(b)) => {
                        a.extend(b);
                        Value::Array(a)
                    }
                    (Value::Array(mut a), b) => {
                        a.push(b);
                        Value::Array(a)
                    }
                    (a, b) => Value::Array(vec![a, b]),
                });
            }
        }
    }
    Ok(())
}

/// Finds members by key: a scan for small objects, a hash index once one grows past
/// [`KeyIndex::SCAN`] members, so a large object costs linear time, not quadratic.
#[derive(Default)]
struct KeyIndex<'a> {
    map: Option<std::collections::HashMap<Cow<'a, str>, usize>>,
}

impl<'a> KeyIndex<'a> {
    const SCAN: usize = 32;

    fn find(&self, members: &Members<'a>, key: &str) -> Option<usize> {
        match &self.map {
            Some(m) => m.get(key).copied(),
            None => members.iter().position(|(k, _)| k == key),
        }
    }

    fn push(&mut self, members: &mut Members<'a>, key: Cow<'a, str>, value: Node<'a>) {
        if let Some(m) = &mut self.map {
            m.insert(key.clone(), members.len());
        }
        members.push((key, value));
        if self.map.is_none() && members.len() > Self::SCAN {
            self.map = Some(
                members
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (k.clone(), i))
                    .collect(),
            );
        }
    }

    /// An index over `members` as they are.
    fn of(members: &Members<'a>) -> KeyIndex<'a> {
        let mut ix = KeyIndex::default();
        if members.len() > Self::SCAN {
            ix.map = Some(
                members
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (k.clone(), i))
                    .collect(),
            );
        }
        ix
    }
}

/// An object's text split into its members, values left as text; of repeated keys the last
/// is kept (as serde_json does).
struct Object<'a>(Members<'a>);

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<'de>, A::Error> {
                let mut out: Members<'de> = Vec::with_capacity(map.size_hint().unwrap_or(8));
                let mut index = KeyIndex::default();
                while let Some(Key(k)) = map.next_key()? {
                    let v: &'de RawValue = map.next_value()?;
                    match index.find(&out, &k) {
                        Some(i) => out[i].1 = Node::Raw(v.get()),
                        None => index.push(&mut out, k, Node::Raw(v.get())),
                    }
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A key, borrowed from the text when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn paths(p: &[&str]) -> Box<[DotPath]> {
        p.iter()
            .map(|s| s.split('.').map(Into::into).collect())
            .collect()
    }

    fn text(n: &Node<'_>) -> Value {
        let mut out = Vec::new();
        n.write(&mut out);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn shapes_open_only_what_they_touch() {
        let body = br#"{"data": {"qty": 3, "cost": 9, "where": {"city": "Oslo", "zip": "1"}}, "x": [1, 2]}"#;
        let shape = Shape {
            target: Some(vec!["data".into()].into_boxed_slice()),
            allow: paths(&["qty", "where.city"]),
            rename: vec![("qty".into(), "in_stock".into())].into_boxed_slice(),
            group: Some("stock".into()),
            ..Shape::default()
        };
        let n = apply(&shape, parse(body).unwrap()).unwrap();
        assert_eq!(
            text(&n),
            json!({"stock": {"in_stock": 3, "where": {"city": "Oslo"}}})
        );
        let missing = apply(&shape, parse(br#"{"nodata": 1}"#).unwrap());
        assert_eq!(missing.unwrap_err(), ShapeError::TargetMissing);
        // A target reaches into arrays by index, as placeholders do.
        let indexed = Shape {
            target: Some(vec!["items".into(), "1".into(), "sku".into()].into_boxed_slice()),
            ..Shape::default()
        };
        let listed = br#"{"items": [{"sku": "a"}, {"sku": "b"}]}"#;
        assert_eq!(
            text(&apply(&indexed, parse(listed).unwrap()).unwrap()),
            json!("b")
        );
        let past = Shape {
            target: Some(vec!["items".into(), "2".into()].into_boxed_slice()),
            ..Shape::default()
        };
        assert_eq!(
            apply(&past, parse(listed).unwrap()).map(|_| ()),
            Err(ShapeError::TargetMissing)
        );
        // Untouched members are written back as they came, spacing and all.
        let deny = Shape {
            deny: paths(&["data.cost"]),
            ..Shape::default()
        };
        let mut out = Vec::new();
        apply(&deny, parse(body).unwrap()).unwrap().write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"data":{"qty":3,"where":{"city": "Oslo", "zip": "1"}},"x":[1, 2]}"#
        );
        // Arrays are filtered element by element.
        let arr = Shape {
            deny: paths(&["cost"]),
            ..Shape::default()
        };
        let n = apply(&arr, parse(br#"[{"cost": 1, "x": 2}, {"y": 3}]"#).unwrap()).unwrap();
        assert_eq!(text(&n), json!([{"x": 2}, {"y": 3}]));
        // An allow path with an index keeps nothing of the array (no element taken twice).
        let by_index = Shape {
            allow: paths(&["items.0.a", "items.0.b"]),
            ..Shape::default()
        };
        let two = br#"{"items": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]}"#;
        assert_eq!(
            text(&apply(&by_index, parse(two).unwrap()).unwrap()),
            json!({})
        );
        // A denied path goes through the arrays on its way, at any depth.
        let nested = Shape {
            deny: paths(&["items.cost", "items.parts.secret"]),
            ..Shape::default()
        };
        let body = br#"{"items": [{"sku": "a", "cost": 1, "parts": [{"secret": 1, "n": 2}]},
                                  {"sku": "b", "cost": 2}, 7], "cost": 9}"#;
        let n = apply(&nested, parse(body).unwrap()).unwrap();
        assert_eq!(
            text(&n),
            json!({"items": [{"sku": "a", "parts": [{"n": 2}]}, {"sku": "b"}, 7], "cost": 9})
        );
        let in_array = [b"[", &body[..], b"]"].concat();
        let n = apply(&nested, parse(&in_array).unwrap()).unwrap();
        assert_eq!(
            text(&n)[0]["items"][0],
            json!({"sku": "a", "parts": [{"n": 2}]})
        );
        // Nesting past MAX_DEPTH is refused when the text is checked.
        let deep = format!("[{}1{}]", "[".repeat(200), "]".repeat(200));
        assert!(parse(deep.as_bytes()).is_err());
        // Valid JSON a filter cannot open is an error, never left as it came: a key with a
        // lone surrogate, a number beyond a double.
        let secret = Shape {
            deny: paths(&["user.password", "cost"]),
            ..Shape::default()
        };
        let unreadable = [
            r#"{"user": {"\udc00": 1, "password": "hunter2"}}"#,
            r#"[{"cost": 1, "n": 1e400}]"#,
        ];
        for body in unreadable {
            let n = parse(body.as_bytes()).expect("checked as valid");
            assert_eq!(
                apply(&secret, n).map(|_| ()),
                Err(ShapeError::Unreadable),
                "{body}"
            );
        }
    }

    #[test]
    fn objects_that_cannot_be_opened_are_not_merged_silently() {
        let a = br#"{"user": {"name": "a"}}"#;
        let b = br#"{"user": {"\udc00": 1, "email": "b@x"}}"#;
        let mut dst = Vec::new();
        for (i, body) in [&a[..], &b[..]].into_iter().enumerate() {
            let mut n = parse(body).unwrap();
            let merged = merge(
                &mut dst,
                std::mem::take(n.members().unwrap()),
                OnConflict::Last,
            );
            assert_eq!(merged.is_err(), i == 1, "{merged:?}");
        }
    }

    #[test]
    fn a_merge_that_fails_leaves_what_was_merged_before_as_it_was() {
        // The audit's cases: the second answer meets the first in a value it cannot open
        // (a number out of range under `append`, a lone surrogate in an object). Before, the
        // first's `n` became null, and the failed answer's `a` stayed in the document.
        // `n` has more digits than a double keeps: it must come back as it was written.
        let first = br#"{"o": {"x": 1}, "n": 123456789012345678901234567890, "z": 1}"#;
        for (second, policy) in [
            (&br#"{"a": 5, "n": 1e400, "z": 9}"#[..], OnConflict::Append),
            (
                br#"{"a": 5, "o": {"\udc00": 1, "y": 2}, "z": 9}"#,
                OnConflict::Append,
            ),
            (
                br#"{"a": 5, "o": {"\udc00": 1, "y": 2}, "z": 9}"#,
                OnConflict::Last,
            ),
            (br#"{"a": 5, "o": {"y": 2}, "n": 2}"#, OnConflict::Error),
            (br#"{"n": 5, "z": 1e400}"#, OnConflict::Append),
        ] {
            let mut dst = Vec::new();
            let mut n = parse(first).unwrap();
            merge(&mut dst, std::mem::take(n.members().unwrap()), policy).unwrap();
            let mut n = parse(second).unwrap();
            let merged = merge(&mut dst, std::mem::take(n.members().unwrap()), policy);
            assert!(merged.is_err(), "{}", String::from_utf8_lossy(second));
            let mut out = Vec::new();
            Node::Object(dst).write(&mut out);
            let out = String::from_utf8(out).unwrap();
            assert!(
                out.contains("123456789012345678901234567890"),
                "{}: {out}",
                String::from_utf8_lossy(second)
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["o"], json!({"x": 1}), "{out}");
            assert_eq!(v["z"], json!(1), "{out}");
            assert_eq!(v.as_object().unwrap().len(), 3, "{out}");
        }
    }

    #[test]
    fn renames_apply_at_once() {
        let swap = Shape {
            rename: vec![("a".into(), "b".into()), ("b".into(), "a".into())].into_boxed_slice(),
            ..Shape::default()
        };
        let n = apply(&swap, parse(br#"{"a": 1, "b": 2, "c": 3}"#).unwrap()).unwrap();
        assert_eq!(text(&n), json!({"a": 2, "b": 1, "c": 3}));
        // The same on an array's elements (the tree path).
        let n = apply(&swap, parse(br#"[{"a": 1, "b": 2}]"#).unwrap()).unwrap();
        assert_eq!(text(&n), json!([{"a": 2, "b": 1}]));
    }

    #[test]
    fn merges_follow_the_policy() {
        let a = br#"{"id": 1, "tags": ["a"], "meta": {"x": 1}}"#;
        let b = br#"{"id": 2, "tags": ["b"], "meta": {"y": 2}}"#;
        let run = |policy| {
            let mut dst = Vec::new();
            for body in [&a[..], &b[..]] {
                let mut n = parse(body).unwrap();
                merge(&mut dst, std::mem::take(n.members().unwrap()), policy)?;
            }
            Ok::<_, MergeError>(text(&Node::Object(dst)))
        };
        assert_eq!(
            run(OnConflict::Error),
            Err(MergeError::Conflict(vec!["id".to_owned()]))
        );
        assert_eq!(
            run(OnConflict::First),
            Ok(json!({"id": 1, "tags": ["a"], "meta": {"x": 1, "y": 2}}))
        );
        assert_eq!(
            run(OnConflict::Last),
            Ok(json!({"id": 2, "tags": ["b"], "meta": {"x": 1, "y": 2}}))
        );
        assert_eq!(
            run(OnConflict::Append),
            Ok(json!({"id": [1, 2], "tags": ["a", "b"], "meta": {"x": 1, "y": 2}}))
        );
        // A nested collision names its whole path.
        let mut dst = Vec::new();
        let mut n = parse(br#"{"m": {"k": {"z": 1}}}"#).unwrap();
        merge(
            &mut dst,
            std::mem::take(n.members().unwrap()),
            OnConflict::Error,
        )
        .unwrap();
        let mut n = parse(br#"{"m": {"k": {"z": 2}}}"#).unwrap();
        let err = merge(
            &mut dst,
            std::mem::take(n.members().unwrap()),
            OnConflict::Error,
        );
        assert_eq!(
            err,
            Err(MergeError::Conflict(vec![
                "m".into(),
                "k".into(),
                "z".into()
            ]))
        );
        // Values nested past the limit never get this far: the check refuses them.
        let deep = format!("{{\"d\": {}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn keys_with_escapes_repeats_and_many_members() {
        let mut n = parse(br#"{"a\"b": 1, "x": 1, "x": 2}"#).unwrap();
        let m = n.members().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, "a\"b");
        assert_eq!(text(&n), json!({"a\"b": 1, "x": 2}));
        // Past the scan threshold, lookups go through the index.
        let big: Map<String, Value> = (0..500).map(|i| (format!("k{i}"), json!(i))).collect();
        let body = serde_json::to_vec(&Value::Object(big.clone())).unwrap();
        let mut dst = Vec::new();
        let mut n = parse(&body).unwrap();
        merge(
            &mut dst,
            std::mem::take(n.members().unwrap()),
            OnConflict::Error,
        )
        .unwrap();
        let mut again = parse(br#"{"k499": 1, "new": true}"#).unwrap();
        let err = merge(
            &mut dst,
            std::mem::take(again.members().unwrap()),
            OnConflict::Error,
        );
        assert_eq!(err, Err(MergeError::Conflict(vec!["k499".to_owned()])));
        assert_eq!(dst.len(), 500);
    }

    #[test]
    fn a_checked_text_is_restored_without_a_second_pass() {
        let body = br#" {"a": [1, 2], "k\u0065y": {"x": "y"}} "#.to_vec();
        let checked = check(&body).unwrap();
        let moved = body.clone();
        drop(body);
        let n = restore(&moved, &checked).unwrap();
        assert_eq!(text(&n), json!({"a": [1, 2], "key": {"x": "y"}}));
        let twice = br#"{"x": 1, "y": 0, "x": 2}"#;
        let n = restore(twice, &check(twice).unwrap()).unwrap();
        assert_eq!(text(&n), json!({"x": 2, "y": 0}));
        let scalar = b"[1, 2]".to_vec();
        let c = check(&scalar).unwrap();
        assert_eq!(text(&restore(&scalar, &c).unwrap()), json!([1, 2]));
        assert!(check(b"{\"a\": 1,}").is_err());
        // A member name that cannot be decoded is refused, not renamed.
        assert!(check(br#"{"\ud800": 1}"#).is_err());
    }

    #[test]
    fn lookups_and_scalars() {
        let n = parse(br#"{"p": {"sku": "A/1", "n": 7, "ok": true, "o": {}, "list": ["x", "y"]}}"#)
            .unwrap();
        let at = |p: &str| {
            let path: Vec<Box<str>> = p.split('.').map(Into::into).collect();
            lookup(&n, &path)
                .and_then(|v| scalar_text(&v))
                .map(|c| c.into_owned())
        };
        assert_eq!(at("p.sku"), Some(b"A/1".to_vec()));
        assert_eq!(at("p.n"), Some(b"7".to_vec()));
        assert_eq!(at("p.ok"), Some(b"true".to_vec()));
        assert_eq!(at("p.list.1"), Some(b"y".to_vec()));
        assert_eq!(at("p.o"), None);
        assert_eq!(at("p.nope"), None);
        assert!(parse(b"{\"a\": ").is_err());
        assert!(parse(b"{} {}").is_err());
    }
}
