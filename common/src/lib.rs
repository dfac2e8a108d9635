//! The gateway's shared model: the declarative [`Config`] (one schema for the config file and the
//! admin API), its validation, and the compiled [`Snapshot`] the data plane reads.
//!
//! The only way to a `Snapshot` is [`Snapshot::compile`]; [`load_config`] reads a file in TOML
//! or JSON and reports errors with the path of the offending field. No async runtime here.

pub mod aggregate;
pub mod cidr;
pub mod config;
pub mod headers;
pub mod keys;
pub mod live;
pub mod policy;
pub mod reason;
pub mod router;
pub mod slots;
pub mod snapshot;
pub mod tls;
pub mod transcode;
pub mod upstreams;
mod validate;

pub use config::Config;
pub use snapshot::{
    Limits, ListenerProtocols, Route, RouteAction, Snapshot, Target, Timeouts, Upstream, Variant,
};
pub use validate::{host_name, to_hex};

use std::path::Path;

/// A configuration that cannot be used, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid TOML / JSON, or a field has the wrong type or is unknown.
    #[error("{path}: {reason}")]
    Syntax { path: String, reason: String },
    /// A field holds a value the gateway cannot use.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    /// The file could not be read.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
}

impl ConfigError {
    /// An invalid field, named by its path (`routes[2].upstream`).
    pub fn field(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: without_private_keys(path.into()),
            reason: without_private_keys(reason.into()),
        }
    }

    /// The path of the field the error is about (`.` for the whole document).
    pub fn path(&self) -> &str {
        match self {
            ConfigError::Syntax { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::Io { path, .. } => path,
        }
    }
}

/// Which syntax a config text is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// JSON for a `.json` file or a text starting with `{`, TOML otherwise.
    pub fn detect(path: Option<&Path>, text: &str) -> Format {
        let json_ext = path
            .and_then(|p| p.extension())
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if json_ext || text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Toml
        }
    }
}

/// Parses a config text (no semantic checks: see [`Snapshot::compile`]).
/// `url` with the password of its `USER:PASSWORD@` part (if any) written as `***`, for error
/// messages and logs: `redis://:***@host:6379`.
pub fn redact_url(url: &str) -> String {
    // After `SCHEME://`; in a URL that mistypes it (`etcd:/`, `etcd//`), after a scheme's
    // `:` or from the start: a mistyped URL is one a message shows.
    let scheme = |c: usize| {
        url[..c]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+')
    };
    let scheme_end = match url.find("://") {
        Some(i) => i + 3,
        None => url.find(':').filter(|&c| scheme(c)).map_or(0, |c| c + 1),
    };
    let rest = &url[scheme_end..];
    // Up to the last `@`: a password may hold any character, a raw `/`, `?` or `@` too
    // (which the parsers refuse or read), and an `@` further on (in a path or an option's
    // file) only hides more than it must. The user is kept where it is plainly one.
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let user =
        (rest[..at].find(':').map(|c| &rest[..c])).filter(|u| !u.contains(['@', '/', '?', '#']));
    match user {
        Some(user) => format!("{}{user}:***{}", &url[..scheme_end], &rest[at..]),
        None => format!("{}***{}", &url[..scheme_end], &rest[at..]),
    }
}

/// `text` with each PEM private key in it replaced by `<private key>`. An error message that
/// quotes a value (a key sent in the wrong field, or as a file name) is answered and logged:
/// it must not carry the key. A key without its end marker is cut to the end of the text.
pub fn without_private_keys(text: String) -> String {
    const LABEL: &str = "PRIVATE KEY-----";
    if !text.contains(LABEL) {
        return text;
    }
    // One pass: each search starts where the last cut ended.
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(label) = rest.find(LABEL) {
        let start = rest[..label].rfind("-----BEGIN").unwrap_or(label);
        out.push_str(&rest[..start]);
        out.push_str("<private key>");
        let after = label + LABEL.len();
        rest = match rest[after..].find("-----END") {
            Some(e) => {
                let marker = after + e;
                rest[marker..]
                    .find(LABEL)
                    .map_or("", |l| &rest[marker + l + LABEL.len()..])
            }
            None => "",
        };
    }
    out.push_str(rest);
    out
}

pub fn parse_config(text: &str, format: Format) -> Result<Config, ConfigError> {
    // A map key is part of the path: a key sent as one is not quoted either.
    let syntax = |path: String, reason: String| ConfigError::Syntax {
        path: if path.is_empty() || path == "." {
            ".".to_owned()
        } else {
            without_private_keys(path)
        },
        reason: without_private_keys(reason),
    };
    match format {
        Format::Json => {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de)
                .map_err(|e| syntax(e.path().to_string(), e.inner().to_string()))
        }
        Format::Toml => {
            // The line a TOML error is at, counted from 1.
            let at_line = |message: &str, span: Option<std::ops::Range<usize>>| match span {
                Some(span) => {
                    let line = text.as_bytes()[..span.start.min(text.len())]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1;
                    format!("{message} (line {line})")
                }
                None => message.to_owned(),
            };
            let de = toml::Deserializer::parse(text)
                .map_err(|e| syntax(".".into(), at_line(e.message(), e.span())))?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let inner = e.inner();
                syntax(e.path().to_string(), at_line(inner.message(), inner.span()))
            })
        }
    }
}

/// Reads and parses a config file.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_config(&text, Format::detect(Some(path), &text))
}

/// The config used when the gateway is started without `--config`: a listener on
/// 127.0.0.1:8080 whose demo routes answer without any upstream.
pub const DEFAULT_CONFIG: &str = r#"# Embedded default: answers on 127.0.0.1:8080 without any upstream.
[[listeners]]
address = "127.0.0.1:8080"

[[routes]]
id = "health"
path = "/health"
respond = { status = 200, body = "ok\n" }

[[routes]]
id = "hello"
path_prefix = "/"
respond = { status = 200, body = "Hello from the gateway. Configure routes with --config FILE.\n" }

[access_log]
path = "stdout"
"#;

#[cfg(test)]
mod tests;
