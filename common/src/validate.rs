//! Checks shared by the config compilers (`snapshot`, `policy`): ids, host patterns, tokens.
//! A leaf module: it imports nothing of the crate but the error type, so the compilers can
//! share it without depending on each other.

use crate::ConfigError;

/// An id: 1 to 64 letters, digits, `-`, `_` or `.`, and not `.` or `..`, which a client
/// removes from `/v1/routes/..` as a dot segment (RFC 3986 5.2.4) before sending it, so the
/// API could not name the item; `at` names the field.
pub(crate) fn check_id(id: &str, at: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ConfigError::field(
            at,
            format!("{id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"),
        ));
    }
    if matches!(id, "." | "..") && !tolerated(at, "an id the API cannot name") {
        return Err(ConfigError::field(
            at,
            format!("{id:?} cannot be an id: it is a dot segment of a URL path"),
        ));
    }
    Ok(())
}

/// The index of the first id that an earlier one repeats: the duplicate check of a list in
/// one pass (a scan of the items before each is quadratic: 65,536 routes took 5.6 s).
pub(crate) fn first_repeat<'a>(ids: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().position(|id| !seen.insert(id))
}

std::thread_local! {
    /// Set while a node file is checked on its own (see [`from_store`]).
    static NODE_FILE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set while a config stored by an earlier build is compiled (see [`tolerated`]).
    static STORED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// What such a compile let through, for the caller to log.
    static NOTES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `compile` on a config stored by an earlier build, where a rule added since must not
/// keep the gateway from starting on its own state: such a rule gives way (see
/// [`tolerated`]). Returns what it let through.
pub(crate) fn compiling_stored<T>(compile: impl FnOnce() -> T) -> (T, Vec<String>) {
    STORED.with(|s| s.set(true));
    let out = compile();
    STORED.with(|s| s.set(false));
    (out, NOTES.with(|n| std::mem::take(&mut *n.borrow_mut())))
}

/// Runs `compile` on a node file alone (`gateway validate --node`): the policies and
/// certificates its listeners name and it does not define are the store's, which a start
/// with `--store` adds (see [`from_store`]). Returns those left unchecked.
pub(crate) fn compiling_node_file<T>(compile: impl FnOnce() -> T) -> (T, Vec<String>) {
    NODE_FILE.with(|s| s.set(true));
    let out = compile();
    NODE_FILE.with(|s| s.set(false));
    (out, NOTES.with(|n| std::mem::take(&mut *n.borrow_mut())))
}

/// Whether the reference at `at` to `id`, which the config does not define, is left to the
/// store (a node file checked alone), noting it; `false` otherwise (an unknown id).
pub(crate) fn from_store(at: &str, id: &str) -> bool {
    if !NODE_FILE.with(std::cell::Cell::get) {
        return false;
    }
    NOTES.with(|n| n.borrow_mut().push(format!("{at} {id:?}")));
    true
}

/// Whether a rule added in a later build gives way for the config being compiled (one stored
/// before it, see [`compiling_stored`]), noting `at` and `why`; `false` for a new config,
/// which the rule refuses.
pub(crate) fn tolerated(at: &str, why: &str) -> bool {
    if !STORED.with(std::cell::Cell::get) {
        return false;
    }
    NOTES.with(|n| n.borrow_mut().push(format!("{at}: {why}")));
    true
}

/// A field name as CGI-style upstreams read it: lower-case, `-` for `_` (`X_Forwarded_For`
/// is their `HTTP_X_FORWARDED_FOR`, as `X-Forwarded-For` is).
pub(crate) fn cgi_name(name: impl AsRef<[u8]>) -> String {
    let norm = |&b: &u8| match b {
        b'_' => '-',
        b => char::from(b.to_ascii_lowercase()),
    };
    name.as_ref().iter().map(norm).collect()
}

/// Whether `name` (without a trailing dot) is a host name: dot-separated labels of letters,
/// digits, `-` and `_`, 1 to 63 long, 253 in all.
pub fn host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A host name in a route or domain policy: a [`host_name`] (a `*.` wildcard is checked by
/// the caller), or a bracketed IPv6 literal.
pub(crate) fn valid_host_pattern(name: &str) -> bool {
    host_name(name)
        || name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|ip| {
                ip.parse::<std::net::Ipv6Addr>().is_ok()
                    || tolerated(name, "not an IPv6 address: never matches")
            })
}

/// What keeps requests from ever having `path` (a route's), or makes the gateway refuse a
/// path it would write itself (a rewrite's, a redirect's): a `%` without two hex digits
/// after it or `%00`, or a `.` or `..` segment (also spelled `%2e`, or with `;` parameters):
/// a request with one is refused (`400`).
pub(crate) fn path_flaw(path: &str) -> Option<&'static str> {
    if let Some(why) = escape_flaw(path) {
        return Some(why);
    }
    // Separators as requests are read (`%2F`, `%5C` and a backslash too: upstreams differ).
    let lower = path.to_ascii_lowercase();
    let split = lower
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/");
    let flawed = split.split('/').any(|seg| {
        let name = seg.split(';').next().unwrap_or(seg);
        let name = name.replace("%2e", ".");
        name == "." || name == ".."
    });
    flawed.then_some("has a '.' or '..' segment, which requests may not have")
}

/// A `%` without two hex digits after it, or `%00`, in `text` (a path or a query).
pub(crate) fn escape_flaw(text: &str) -> Option<&'static str> {
    let b = text.as_bytes();
    for (i, _) in text.match_indices('%') {
        match b.get(i + 1..i + 3) {
            Some([h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                if *h == b'0' && *l == b'0' {
                    return Some("has %00, which a request target may not have");
                }
            }
            _ => return Some("has a '%' without two hex digits after it (RFC 3986 2.1)"),
        }
    }
    None
}

/// A standard method (RFC 9110 9.3) spelled in another case (`get`): methods are
/// case-sensitive, so it names another method, one no client sends. Its proper spelling.
pub(crate) fn standard_method_miscased(m: &str) -> Option<String> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let upper = m.to_ascii_uppercase();
    (m != upper && STANDARD.contains(&upper.as_str())).then_some(upper)
}

/// Whether `path` escapes an unreserved character (`%6F` for `o`), which requests have
/// decoded before they are routed (RFC 3986 6.2.2.2): a route's path spelled so never
/// matches.
pub(crate) fn escapes_unreserved(path: &str) -> bool {
    (0..path.len()).any(|i| unreserved_escape(path.as_bytes(), i).is_some())
}

/// Whether an escape in `path` spells a hex digit in lower case (`%2f`), which requests have
/// upper-cased before they are routed (RFC 3986 6.2.2.1): a route's path spelled so never
/// matches.
pub(crate) fn lower_case_escape(path: &str) -> bool {
    let b = path.as_bytes();
    path.match_indices('%').any(|(i, _)| {
        b.get(i + 1..i + 3).is_some_and(|hex| {
            hex.iter().all(u8::is_ascii_hexdigit) && hex.iter().any(u8::is_ascii_lowercase)
        })
    })
}

/// `path` with the hex digits of its escapes upper-cased (`%2f` is `%2F`), as requests' paths
/// are before routing.
pub(crate) fn upper_case_escapes(path: &str) -> String {
    let mut out = path.as_bytes().to_vec();
    for (i, _) in path.match_indices('%') {
        if let Some(hex) = out.get_mut(i + 1..i + 3) {
            if hex.iter().all(u8::is_ascii_hexdigit) {
                hex.make_ascii_uppercase();
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

/// The unreserved character (a letter, a digit, `-`, `.`, `_`, `~`) that `b[i..]` escapes
/// (`%6F`), which requests have decoded before they are routed; `None` for anything else.
pub(crate) fn unreserved_escape(b: &[u8], i: usize) -> Option<u8> {
    let [b'%', h, l] = *b.get(i..i + 3)? else {
        return None;
    };
    let hex = |d: u8| char::from(d).to_digit(16);
    let c = u8::try_from(hex(h)? * 16 + hex(l)?).ok()?;
    (c.is_ascii_alphanumeric() || b"-._~".contains(&c)).then_some(c)
}

/// A host a gateway-written field may name (a redirect's, a route's `Host`): a host name
/// (a fully qualified one may end in a dot), an IPv4 address, or an IPv6 one in brackets.
pub(crate) fn valid_host_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    h.parse::<std::net::Ipv4Addr>().is_ok() || valid_host_pattern(h)
}

/// RFC 9110 `tchar`.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// 64 lower-case hex digits as 32 bytes (a SHA-256 as the config writes it).
pub(crate) fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let d = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = d(pair[0])? << 4 | d(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The contents of a file a config names (a certificate, a key, a descriptor set), at most
/// `limit` bytes. Only a regular file: the path may come through the admin API, and a
/// device (`/dev/zero`) would be read until memory ran out, a FIFO block the config's
/// writer (and every write after it) for good.
pub(crate) fn read_named_file(path: &str, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    if !std::fs::metadata(path)?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// [`read_named_file`] as UTF-8 text.
pub(crate) fn read_named_text(path: &str, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read_named_file(path, limit)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_their_limit_are_read() {
        let dir = std::env::temp_dir().join(format!("gw-named-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.pem");
        std::fs::write(&file, b"0123456789").unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(read_named_file(path, 10).unwrap(), b"0123456789");
        let e = read_named_file(path, 9).unwrap_err();
        assert!(e.to_string().contains("larger than 9 bytes"), "{e}");
        // A device is refused before anything is read; so is a directory.
        let e = read_named_file("/dev/zero", 10).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(read_named_file(dir.to_str().unwrap(), 10).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_patterns_are_names_or_ipv6_literals() {
        for ok in ["api.example.com", "a_b-c", "[::1]", "[2001:db8::7]"] {
            assert!(valid_host_pattern(ok), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            "a b",
            "[not an ipv6\r\n]",
            "[]",
            "[1.2.3.4]",
            "[::1",
        ] {
            assert!(!valid_host_pattern(bad), "{bad:?}");
        }
    }
}
