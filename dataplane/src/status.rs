//! Responses the gateway sends itself.
//!
//! Hot path: every response is a `&'static [u8]` written as is. Each exists in a keep-alive and a
//! `Connection: close` form; a unit test checks that every Content-Length is right.

/// A status the gateway answers with on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    MisdirectedRequest,
    ExpectationFailed,
    HeadersTooLarge,
    NotImplemented,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
    VersionNotSupported,
}

macro_rules! canned {
    ($code:literal $reason:literal, $len:literal, $body:literal $(, $field:literal)?) => {
        (
            concat!(
                "HTTP/1.1 ",
                $code,
                " ",
                $reason,
                "\r\nContent-Type: text/plain; charset=utf-8\r\n",
                $($field, "\r\n",)?
                "Content-Length: ",
                $len,
                "\r\n\r\n",
                $body
            )
            .as_bytes(),
            concat!(
                "HTTP/1.1 ",
                $code,
                " ",
                $reason,
                "\r\nContent-Type: text/plain; charset=utf-8\r\n",
                $($field, "\r\n",)?
                "Content-Length: ",
                $len,
                "\r\nConnection: close\r\n\r\n",
                $body
            )
            .as_bytes(),
        )
    };
}

impl Status {
    /// Every status, for tests and docs.
    pub const ALL: [Status; 14] = [
        Status::BadRequest,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::RequestTimeout,
        Status::PayloadTooLarge,
        Status::UriTooLong,
        Status::MisdirectedRequest,
        Status::ExpectationFailed,
        Status::HeadersTooLarge,
        Status::NotImplemented,
        Status::BadGateway,
        Status::ServiceUnavailable,
        Status::GatewayTimeout,
        Status::VersionNotSupported,
    ];

    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::UriTooLong => 414,
            Status::MisdirectedRequest => 421,
            Status::ExpectationFailed => 417,
            Status::HeadersTooLarge => 431,
            Status::NotImplemented => 501,
            Status::BadGateway => 502,
            Status::ServiceUnavailable => 503,
            Status::GatewayTimeout => 504,
            Status::VersionNotSupported => 505,
        }
    }

    /// The full response; with `close` it says `Connection: close` (and the caller closes).
    pub fn response(self, close: bool) -> &'static [u8] {
        let (keep, closing) = match self {
            Status::BadRequest => canned!("400" "Bad Request", "23", "400 malformed request.\n"),
            Status::NotFound => {
                canned!("404" "Not Found", "35", "404 no route matches this request.\n")
            }
            // CONNECT, and TRACE where no route names it (RFC 9110 15.5.6: a 405 says what
            // is allowed).
            Status::MethodNotAllowed => canned!(
                "405" "Method Not Allowed",
                "31",
                "405 method not supported here.\n",
                "Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"
            ),
            Status::RequestTimeout => {
                canned!("408" "Request Timeout", "34", "408 request not received in time.\n")
            }
            Status::PayloadTooLarge => {
                canned!("413" "Content Too Large", "31", "413 request body is too large.\n")
            }
            Status::UriTooLong => {
                canned!("414" "URI Too Long", "29", "414 request target too long.\n")
            }
            Status::MisdirectedRequest => canned!(
                "421" "Misdirected Request",
                "57",
                "421 the request's host differs from the TLS server name.\n"
            ),
            Status::ExpectationFailed => {
                canned!("417" "Expectation Failed", "29", "417 unsupported expectation.\n")
            }
            Status::HeadersTooLarge => {
                canned!("431" "Request Header Fields Too Large", "28", "431 request head too large.\n")
            }
            Status::NotImplemented => {
                canned!("501" "Not Implemented", "35", "501 transfer coding not supported.\n")
            }
            Status::BadGateway => {
                canned!("502" "Bad Gateway", "35", "502 upstream failed or misbehaved.\n")
            }
            Status::ServiceUnavailable => {
                canned!("503" "Service Unavailable", "43", "503 no upstream can take this request now.\n")
            }
            Status::GatewayTimeout => {
                canned!("504" "Gateway Timeout", "37", "504 upstream did not answer in time.\n")
            }
            Status::VersionNotSupported => {
                canned!("505" "HTTP Version Not Supported", "32", "505 HTTP version not supported.\n")
            }
        };
        if close {
            closing
        } else {
            keep
        }
    }
}

/// `HTTP/1.1 100 Continue`, sent before reading a body the client is waiting to send.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_responses_are_well_framed() {
        for s in Status::ALL {
            for close in [false, true] {
                let r = std::str::from_utf8(s.response(close)).unwrap();
                let (head, body) = r.split_once("\r\n\r\n").unwrap();
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {} ", s.code())),
                    "{head}"
                );
                let cl: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(cl, body.len(), "{s:?}: {body:?}");
                assert_eq!(head.contains("Connection: close"), close);
                // The reason phrases are the one table's (`common::reason`).
                let status_line = head.lines().next().unwrap();
                assert_eq!(
                    status_line,
                    format!("HTTP/1.1 {} {}", s.code(), common::reason::phrase(s.code()))
                );
                assert!(body.starts_with(&s.code().to_string()));
                assert_eq!(
                    head.contains("\r\nAllow: GET, HEAD, POST"),
                    s == Status::MethodNotAllowed
                );
            }
        }
    }
}

/// Appends `Date: <IMF-fixdate>\r\n` for now, as an answer of the gateway's own must carry
/// (RFC 9110 6.6.1: an origin with a clock sends one); made once a second per thread.
pub fn push_date(out: &mut Vec<u8>) {
    use std::cell::Cell;
    const LEN: usize = 37;
    thread_local! {
        static LAST: Cell<(u64, [u8; LEN])> = const { Cell::new((u64::MAX, [0; LEN])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (at, mut line) = LAST.with(Cell::get);
    if at != now {
        line = date_line(now);
        LAST.with(|c| c.set((now, line)));
    }
    out.extend_from_slice(&line);
}

/// `Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n` for `secs` since 1970 (RFC 9110 5.6.7): the
/// fields written into a template in place, as the access log writes its times.
fn date_line(secs: u64) -> [u8; 37] {
    use crate::access_log::fill_padded;
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = (secs / 86_400) as i64;
    let (y, m, d) = crate::access_log::civil_from_days(days);
    let s = secs % 86_400;
    let mut out = *b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n";
    out[6..9].copy_from_slice(DAYS[(days % 7) as usize]);
    fill_padded(&mut out[11..13], u64::from(d));
    out[14..17].copy_from_slice(MONTHS[(m - 1) as usize]);
    fill_padded(&mut out[18..22], y.clamp(0, 9999) as u64);
    fill_padded(&mut out[23..25], s / 3600);
    fill_padded(&mut out[26..28], s / 60 % 60);
    fill_padded(&mut out[29..31], s % 60);
    out
}

#[cfg(test)]
mod date_tests {
    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(
            &super::date_line(784_111_777),
            b"Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        );
        assert_eq!(
            &super::date_line(0),
            b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        );
        assert_eq!(
            &super::date_line(1_796_469_924),
            b"Date: Sat, 05 Dec 2026 11:25:24 GMT\r\n"
        );
        assert_eq!(
            &super::date_line(951_782_400),
            b"Date: Tue, 29 Feb 2000 00:00:00 GMT\r\n"
        );
    }
}
