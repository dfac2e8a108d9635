//! The one classified proxy error: what went wrong ([`ErrorKind`], a closed list), which side
//! caused it, and whether the request may be tried again. The kind alone decides the status the
//! client gets and the metric label; the access log's `error` field and the
//! `gateway_errors_total{side,kind}` counter use the same names (listed in the README).
//!
//! Hot path: plain `Copy` values, no allocation, no formatting.

use crate::codec::request::ParseError;
use crate::status::Status;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something the gateway cannot serve, was too slow, or left.
    Client,
    /// An upstream failed, misbehaved or was too slow.
    Upstream,
    /// The gateway's own decision: no route, a policy refused.
    Gateway,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Gateway => "gateway",
        }
    }
}

/// Every way a request can fail. Adding one means adding it to [`ErrorKind::ALL`], which the
/// metrics render and a unit test checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A request head or body the gateway cannot parse or frame unambiguously (400).
    BadRequest,
    /// Request target longer than `max_uri_bytes` (414).
    UriTooLong,
    /// Request head larger than `max_header_bytes` or with too many fields (431).
    HeadTooLarge,
    /// Request body larger than `max_body_bytes` (413).
    BodyTooLarge,
    /// An HTTP version other than 1.0 and 1.1 (505).
    VersionNotSupported,
    /// A method the gateway does not proxy, such as `CONNECT` (405).
    MethodNotAllowed,
    /// An `Expect` other than `100-continue` (417).
    ExpectationFailed,
    /// A transfer coding other than `chunked` (501).
    UnsupportedTransferCoding,
    /// The client did not send the head or body within its timeout (408).
    ClientTimeout,
    /// The client closed its connection before the answer was written (logged as 499).
    ClientClosed,
    /// No route matches the request (404).
    NoRoute,
    /// On TLS, the request's host is not the SNI name the connection was opened for (421).
    Misdirected,
    /// A policy refused the request (its own status: 401, 403, 421 or 429).
    PolicyDenied,
    /// The upstream refused or reset the connection attempt (502).
    ConnectFailed,
    /// The connection attempt took longer than `upstream_connect_ms` (504).
    ConnectTimeout,
    /// The TLS handshake with the target failed: its certificate is not trusted or does not
    /// name it, or they have no TLS version, cipher or protocol in common (502). Counted as
    /// `connect_failed` for passive health and `retry.on`.
    UpstreamTls,
    /// The upstream left request bytes unacknowledged past `upstream_send_ms` (504).
    SendTimeout,
    /// No response head within `upstream_response_head_ms`, or a body stalled past
    /// `upstream_body_ms` (504 when nothing was sent yet).
    ResponseTimeout,
    /// The upstream closed or reset the connection before or while answering (502).
    UpstreamClosed,
    /// A gRPC call's own deadline (`grpc-timeout`) passed before its answer was complete
    /// (504, DEADLINE_EXCEEDED). The client's choice, not the target's failure: not counted
    /// against the target, never retried.
    DeadlineExceeded,
    /// A response the gateway cannot frame (502).
    UpstreamMalformed,
    /// A required step of an aggregate failed (its own 4xx, else 502, 504 for a timeout).
    StepFailed,
    /// Two steps of an aggregate set the same key under `on_conflict = "error"` (502).
    StepConflict,
    /// The upstream has no address to send to (a host name not resolved yet, an SRV name
    /// with no records) (503, `X-Gateway-Reason: no_targets`).
    NoTargets,
    /// The upstream's `circuit.max_connections` is reached and a new connection is needed
    /// (503, `X-Gateway-Reason: max_connections`).
    CircuitMaxConnections,
    /// `circuit.max_pending` requests already wait for a new connection (503).
    CircuitMaxPending,
    /// `circuit.max_requests` requests to the upstream are already in flight (503).
    CircuitMaxRequests,
    /// The gateway could not open a socket to the target: out of file descriptors or memory
    /// (503, `X-Gateway-Reason: no_socket`). Its own shortage, not the target's
    /// failure: not counted against the target (before, `connect_failed` ejected healthy
    /// targets), never retried.
    NoSocket,
    /// The drain after SIGTERM (`shutdown.drain_timeout_ms`) ended before the answer was
    /// complete: the request was given up and its connection closed (stream reset) without
    /// a canned answer, whatever had been sent (logged as 503 when nothing had).
    DrainTimeout,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 29] = [
        ErrorKind::BadRequest,
        ErrorKind::UriTooLong,
        ErrorKind::HeadTooLarge,
        ErrorKind::BodyTooLarge,
        ErrorKind::VersionNotSupported,
        ErrorKind::MethodNotAllowed,
        ErrorKind::ExpectationFailed,
        ErrorKind::UnsupportedTransferCoding,
        ErrorKind::ClientTimeout,
        ErrorKind::ClientClosed,
        ErrorKind::NoRoute,
        ErrorKind::Misdirected,
        ErrorKind::PolicyDenied,
        ErrorKind::ConnectFailed,
        ErrorKind::ConnectTimeout,
        ErrorKind::UpstreamTls,
        ErrorKind::SendTimeout,
        ErrorKind::ResponseTimeout,
        ErrorKind::UpstreamClosed,
        ErrorKind::DeadlineExceeded,
        ErrorKind::UpstreamMalformed,
        ErrorKind::StepFailed,
        ErrorKind::StepConflict,
        ErrorKind::NoTargets,
        ErrorKind::CircuitMaxConnections,
        ErrorKind::CircuitMaxPending,
        ErrorKind::CircuitMaxRequests,
        ErrorKind::NoSocket,
        ErrorKind::DrainTimeout,
    ];

    /// The name used in the access log and as the metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::HeadTooLarge => "head_too_large",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::VersionNotSupported => "version_not_supported",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::ExpectationFailed => "expectation_failed",
            ErrorKind::UnsupportedTransferCoding => "unsupported_transfer_coding",
            ErrorKind::ClientTimeout => "client_timeout",
            ErrorKind::ClientClosed => "client_closed",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::Misdirected => "misdirected",
            ErrorKind::PolicyDenied => "policy_denied",
            ErrorKind::ConnectFailed => "connect_failed",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::UpstreamTls => "upstream_tls",
            ErrorKind::SendTimeout => "send_timeout",
            ErrorKind::ResponseTimeout => "response_timeout",
            ErrorKind::UpstreamClosed => "upstream_closed",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::UpstreamMalformed => "upstream_malformed",
            ErrorKind::StepFailed => "step_failed",
            ErrorKind::StepConflict => "step_conflict",
            ErrorKind::NoTargets => "no_targets",
            ErrorKind::CircuitMaxConnections => "circuit_max_connections",
            ErrorKind::CircuitMaxPending => "circuit_max_pending",
            ErrorKind::CircuitMaxRequests => "circuit_max_requests",
            ErrorKind::NoSocket => "no_socket",
            ErrorKind::DrainTimeout => "drain_timeout",
        }
    }

    /// What the gateway's own 503 says in `X-Gateway-Reason`.
    pub fn reason(self) -> Option<&'static [u8]> {
        Some(match self {
            ErrorKind::NoTargets => b"no_targets",
            ErrorKind::CircuitMaxConnections => b"max_connections",
            ErrorKind::CircuitMaxPending => b"max_pending",
            ErrorKind::CircuitMaxRequests => b"max_requests",
            ErrorKind::NoSocket => b"no_socket",
            _ => return None,
        })
    }

    /// This kind's index in [`common::live::FAILURE_KINDS`]: a failure of the target (counted
    /// per target, for passive health, and what `retry.on` names).
    pub fn target_failure(self) -> Option<usize> {
        Some(match self {
            ErrorKind::ConnectFailed | ErrorKind::UpstreamTls => 0,
            ErrorKind::ConnectTimeout => 1,
            ErrorKind::SendTimeout => 2,
            ErrorKind::ResponseTimeout => 3,
            ErrorKind::UpstreamClosed => 4,
            ErrorKind::UpstreamMalformed => 5,
            _ => return None,
        })
    }

    pub fn side(self) -> Side {
        match self {
            ErrorKind::BadRequest
            | ErrorKind::UriTooLong
            | ErrorKind::HeadTooLarge
            | ErrorKind::BodyTooLarge
            | ErrorKind::VersionNotSupported
            | ErrorKind::MethodNotAllowed
            | ErrorKind::ExpectationFailed
            | ErrorKind::UnsupportedTransferCoding
            | ErrorKind::ClientTimeout
            | ErrorKind::ClientClosed
            | ErrorKind::DeadlineExceeded
            | ErrorKind::Misdirected => Side::Client,
            ErrorKind::NoRoute
            | ErrorKind::PolicyDenied
            | ErrorKind::NoTargets
            | ErrorKind::CircuitMaxConnections
            | ErrorKind::CircuitMaxPending
            | ErrorKind::CircuitMaxRequests
            | ErrorKind::NoSocket
            | ErrorKind::DrainTimeout => Side::Gateway,
            ErrorKind::ConnectFailed
            | ErrorKind::ConnectTimeout
            | ErrorKind::UpstreamTls
            | ErrorKind::SendTimeout
            | ErrorKind::ResponseTimeout
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamMalformed
            | ErrorKind::StepFailed
            | ErrorKind::StepConflict => Side::Upstream,
        }
    }

    /// The canned answer the gateway sends for this kind; `None` where there is nobody to
    /// answer (the client left) or the answer is the policy's own.
    pub fn response(self) -> Option<Status> {
        Some(match self {
            ErrorKind::BadRequest => Status::BadRequest,
            ErrorKind::UriTooLong => Status::UriTooLong,
            ErrorKind::HeadTooLarge => Status::HeadersTooLarge,
            ErrorKind::BodyTooLarge => Status::PayloadTooLarge,
            ErrorKind::VersionNotSupported => Status::VersionNotSupported,
            ErrorKind::MethodNotAllowed => Status::MethodNotAllowed,
            ErrorKind::ExpectationFailed => Status::ExpectationFailed,
            ErrorKind::UnsupportedTransferCoding => Status::NotImplemented,
            ErrorKind::ClientTimeout => Status::RequestTimeout,
            ErrorKind::NoRoute => Status::NotFound,
            ErrorKind::Misdirected => Status::MisdirectedRequest,
            ErrorKind::ConnectFailed
            | ErrorKind::UpstreamTls
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamMalformed
            | ErrorKind::StepFailed
            | ErrorKind::StepConflict => Status::BadGateway,
            ErrorKind::ConnectTimeout
            | ErrorKind::SendTimeout
            | ErrorKind::ResponseTimeout
            | ErrorKind::DeadlineExceeded => Status::GatewayTimeout,
            ErrorKind::NoTargets
            | ErrorKind::CircuitMaxConnections
            | ErrorKind::CircuitMaxPending
            | ErrorKind::CircuitMaxRequests
            | ErrorKind::NoSocket => Status::ServiceUnavailable,
            ErrorKind::ClientClosed | ErrorKind::PolicyDenied | ErrorKind::DrainTimeout => {
                return None
            }
        })
    }

    /// The status recorded for a request that ended with this error before any answer was
    /// sent: the canned answer's, 499 for a client that left, 503 for one the drain's end
    /// gave up.
    pub fn status(self) -> u16 {
        match self.response() {
            Some(s) => s.code(),
            None if self == ErrorKind::PolicyDenied => 403,
            None if self == ErrorKind::DrainTimeout => 503,
            None => 499,
        }
    }
}

impl From<ParseError> for ErrorKind {
    fn from(e: ParseError) -> ErrorKind {
        match e {
            ParseError::Malformed => ErrorKind::BadRequest,
            ParseError::UriTooLong => ErrorKind::UriTooLong,
            ParseError::HeadTooLarge => ErrorKind::HeadTooLarge,
            ParseError::VersionNotSupported => ErrorKind::VersionNotSupported,
            ParseError::MethodNotAllowed => ErrorKind::MethodNotAllowed,
            ParseError::ExpectationFailed => ErrorKind::ExpectationFailed,
            ParseError::UnsupportedTransferCoding => ErrorKind::UnsupportedTransferCoding,
            ParseError::BodyTooLarge => ErrorKind::BodyTooLarge,
        }
    }
}

/// Why a step failed: the label in `_errors`, the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepError {
    /// The step's own timeout.
    Timeout,
    /// The aggregate's deadline.
    Deadline,
    /// No connection, or the connection failed before a whole answer.
    Upstream,
    /// The step answered with a status outside 2xx.
    Status,
    /// The answer is not JSON (its type, or an encoding).
    NotJson,
    InvalidJson,
    /// The answer is larger than `max_step_bytes`.
    TooLarge,
    /// A placeholder of its path has no scalar value.
    MissingField,
    /// Its `target` names a member the answer does not have.
    TargetMissing,
    /// Its result is not an object and it has no `group`.
    NotAnObject,
    /// A step it waits for failed.
    Dependency,
}

impl StepError {
    pub const ALL: [StepError; 11] = [
        StepError::Timeout,
        StepError::Deadline,
        StepError::Upstream,
        StepError::Status,
        StepError::NotJson,
        StepError::InvalidJson,
        StepError::TooLarge,
        StepError::MissingField,
        StepError::TargetMissing,
        StepError::NotAnObject,
        StepError::Dependency,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StepError::Timeout => "timeout",
            StepError::Deadline => "deadline",
            StepError::Upstream => "upstream",
            StepError::Status => "status",
            StepError::NotJson => "not_json",
            StepError::InvalidJson => "invalid_json",
            StepError::TooLarge => "too_large",
            StepError::MissingField => "missing_field",
            StepError::TargetMissing => "target_missing",
            StepError::NotAnObject => "not_an_object",
            StepError::Dependency => "dependency",
        }
    }
}

/// Why a proxied route's JSON answer was relayed unchanged instead of reshaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not `application/json` (or `+json`).
    NotJson,
    /// A `Content-Encoding` other than identity.
    Compressed,
    /// Larger than the shape's `max_bytes`.
    TooLarge,
    /// Not valid JSON.
    InvalidJson,
    /// No member at the shape's `target`.
    TargetMissing,
    /// A status outside 2xx.
    Status,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::NotJson,
        SkipReason::Compressed,
        SkipReason::TooLarge,
        SkipReason::InvalidJson,
        SkipReason::TargetMissing,
        SkipReason::Status,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SkipReason::NotJson => "not_json",
            SkipReason::Compressed => "compressed",
            SkipReason::TooLarge => "too_large",
            SkipReason::InvalidJson => "invalid_json",
            SkipReason::TargetMissing => "target_missing",
            SkipReason::Status => "status",
        }
    }
}

/// A classified failure of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} ({} side)", kind.label(), kind.side().label())]
pub struct ProxyError {
    pub kind: ErrorKind,
    /// Nothing of the request reached the upstream in a way it could have acted on, so the
    /// connector may send it again on a fresh connection.
    pub retryable: bool,
    /// The gRPC status a gRPC client is given for it, where the kind alone does not say
    /// (an HTTP/2 upstream's RST_STREAM code: CANCEL is CANCELLED, INTERNAL_ERROR INTERNAL).
    pub grpc_status: Option<u8>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind) -> ProxyError {
        ProxyError {
            kind,
            retryable: false,
            grpc_status: None,
        }
    }

    /// The same error, marked as safe to send again.
    pub fn retryable(self, yes: bool) -> ProxyError {
        ProxyError {
            retryable: yes,
            ..self
        }
    }
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> ProxyError {
        ProxyError::new(kind)
    }
}

impl From<ParseError> for ProxyError {
    fn from(e: ParseError) -> ProxyError {
        ProxyError::new(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_error_and_skip_reason_has_a_distinct_label() {
        let mut labels: Vec<&str> = StepError::ALL.iter().map(|e| e.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), StepError::ALL.len());
        let mut labels: Vec<&str> = SkipReason::ALL.iter().map(|e| e.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), SkipReason::ALL.len());
    }

    #[test]
    fn every_kind_has_a_distinct_label_and_a_status_of_its_side() {
        let mut labels: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ErrorKind::ALL.len());
        for kind in ErrorKind::ALL {
            let status = kind.status();
            match kind.side() {
                // The client's own deadline passing is a 504, as at other gRPC proxies.
                Side::Client => assert!(
                    (400..500).contains(&status)
                        || status == 501
                        || status == 505
                        || kind == ErrorKind::DeadlineExceeded,
                    "{kind:?}"
                ),
                Side::Upstream => assert!(status == 502 || status == 504, "{kind:?}"),
                // The drain's end sends nothing: its 503 is only what is logged.
                Side::Gateway => assert!(
                    (400..500).contains(&status)
                        || (status == 503 && kind.reason().is_some())
                        || (status == 503 && kind.response().is_none()),
                    "{kind:?}"
                ),
            }
        }
        assert_eq!(ErrorKind::DrainTimeout.response(), None);
        assert_eq!(ErrorKind::ClientClosed.status(), 499);
        assert_eq!(ErrorKind::NoRoute.status(), 404);
        assert_eq!(ErrorKind::SendTimeout.status(), 504);
        for (i, name) in common::live::FAILURE_KINDS[..6].iter().enumerate() {
            let kind = ErrorKind::ALL.iter().find(|k| k.label() == *name).unwrap();
            assert_eq!(kind.target_failure(), Some(i), "{name}");
        }
    }

    #[test]
    fn every_parse_error_maps_to_the_status_it_always_had() {
        let cases = [
            (ParseError::Malformed, 400),
            (ParseError::UriTooLong, 414),
            (ParseError::HeadTooLarge, 431),
            (ParseError::VersionNotSupported, 505),
            (ParseError::MethodNotAllowed, 405),
            (ParseError::ExpectationFailed, 417),
            (ParseError::UnsupportedTransferCoding, 501),
            (ParseError::BodyTooLarge, 413),
        ];
        for (e, status) in cases {
            assert_eq!(ErrorKind::from(e).status(), status, "{e:?}");
            assert_eq!(ErrorKind::from(e).side(), Side::Client);
        }
    }
}
