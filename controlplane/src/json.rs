//! Admin request bodies read as JSON, more strictly than `serde_json` reads a `Value`: an
//! object that names a member twice is refused. RFC 8259 4 leaves such an object's meaning
//! to the reader, and `serde_json` keeps the last value; a reviewer reading the first one
//! would approve a change other than the one applied.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a body is not JSON the API takes.
#[derive(Debug, PartialEq)]
pub enum JsonError {
    /// Not JSON: `serde_json`'s message, with the line and column.
    Syntax(String),
    /// A member named twice in one object; `pointer` (RFC 6901) names the second.
    Duplicate { pointer: String },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax(e) => f.write_str(e),
            JsonError::Duplicate { pointer } => {
                write!(f, "{pointer}: a member named twice in one object")
            }
        }
    }
}

/// `bytes` as a JSON value, refusing duplicate member names.
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let path = RefCell::new(Vec::new());
    let duplicate = RefCell::new(false);
    let seed = Strict {
        path: &path,
        duplicate: &duplicate,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    value.map_err(|e| {
        if *duplicate.borrow() {
            let mut pointer = String::new();
            for part in path.borrow().iter() {
                push_pointer_step(&mut pointer, part);
            }
            JsonError::Duplicate { pointer }
        } else {
            JsonError::Syntax(e.to_string())
        }
    })
}

/// Appends `/` and `step` (a member name or an index) to a JSON pointer, `~` and `/` escaped
/// (RFC 6901 3).
pub fn push_pointer_step(pointer: &mut String, step: &str) {
    pointer.push('/');
    pointer.push_str(&step.replace('~', "~0").replace('/', "~1"));
}

/// Reads one value. `path` holds the members and indices down to the value being read;
/// an error leaves it where the error was.
#[derive(Clone, Copy)]
struct Strict<'a> {
    path: &'a RefCell<Vec<String>>,
    duplicate: &'a RefCell<bool>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so `from_f64` always gives a number here.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            self.path.borrow_mut().push(out.len().to_string());
            let Some(v) = seq.next_element_seed(self)? else {
                self.path.borrow_mut().pop();
                return Ok(Value::Array(out));
            };
            self.path.borrow_mut().pop();
            out.push(v);
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let repeated = out.contains_key(&name);
            self.path.borrow_mut().push(name);
            if repeated {
                *self.duplicate.borrow_mut() = true;
                return Err(de::Error::custom("duplicate member"));
            }
            let v = map.next_value_seed(self)?;
            let name = self.path.borrow_mut().pop().unwrap_or_default();
            out.insert(name, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_serde_json_reads() {
        let text = r#" {"a": [1, -2, 3.5, true, null, "x\u00e9"], "b": {"c": {}}, "d": []} "#;
        let want: Value = serde_json::from_str(text).unwrap();
        assert_eq!(parse(text.as_bytes()), Ok(want));
        assert_eq!(parse(b"18446744073709551615"), Ok(Value::from(u64::MAX)));
    }

    #[test]
    fn refuses_a_member_named_twice_and_points_at_it() {
        let dup = |text: &str| match parse(text.as_bytes()) {
            Err(JsonError::Duplicate { pointer }) => pointer,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(dup(r#"{"a":1,"a":2}"#), "/a");
        assert_eq!(dup(r#"{"x":[{"y":1},{"k/~":1,"k/~":2}]}"#), "/x/1/k~1~0");
        assert_eq!(dup(r#"{"x":{"y":{}},"x":1}"#), "/x");
        // The same name in sibling objects is fine.
        assert!(parse(br#"[{"a":1},{"a":2}]"#).is_ok());
    }

    #[test]
    fn malformed_text_is_a_syntax_error() {
        for text in [r#"{"a":1"#, r#"{"a":1} x"#, "", "[1,]", r#"{"a":NaN}"#] {
            assert!(
                matches!(parse(text.as_bytes()), Err(JsonError::Syntax(_))),
                "{text}"
            );
        }
    }
}
