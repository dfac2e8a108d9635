//! Request-head fixtures, each also fed cut at every offset to mimic partial reads.

use super::*;

fn limits() -> Limits {
    Limits {
        max_header_bytes: 4096,
        max_header_count: 32,
        max_uri_bytes: 1024,
        max_body_bytes: 1 << 20,
        max_connections: 1,
        merge_slashes: true,
    }
}

/// Parses `input`, checking that every strict prefix is either incomplete or fails the same
/// way (a prefix can never succeed where the whole fails, or end differently).
fn parse(input: &[u8]) -> Result<RequestHead, ParseError> {
    let mut plan = FieldPlan::default();
    let whole = parse_request(input, &limits(), &mut plan).map(|h| h.expect("complete fixture"));
    for cut in 0..input.len() {
        let mut p = FieldPlan::default();
        match (parse_request(&input[..cut], &limits(), &mut p), &whole) {
            (Ok(None), _) => {}
            (Ok(Some(h)), Ok(w)) => assert_eq!(h.head_end, w.head_end, "cut {cut}"),
            (Err(e), Err(w)) => assert_eq!(e, *w, "cut {cut}"),
            (got, want) => panic!("cut {cut}: {got:?} but whole gives {want:?}"),
        }
    }
    whole
}

/// What the gateway would forward of the field lines.
fn kept_fields(input: &[u8]) -> String {
    let mut plan = FieldPlan::default();
    let h = parse_request(input, &limits(), &mut plan).unwrap().unwrap();
    crate::codec::kept_fields(input, h.fields_start, h.fields_end, &plan)
}

#[test]
fn simple_get() {
    let input = b"GET /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
    let h = parse(input).unwrap();
    assert_eq!(h.method.of(input), b"GET");
    assert_eq!(h.path(input), b"/a/b");
    assert_eq!(h.host.unwrap().of(input), b"example.com");
    assert_eq!(
        (h.body, h.keep_alive, h.http10),
        (BodyKind::None, true, false)
    );
    assert_eq!(h.head_end, input.len());
    assert_eq!(
        &input[h.start..h.fields_start],
        b"GET /a/b?x=1 HTTP/1.1\r\n"
    );
}

#[test]
fn leading_empty_line_is_skipped() {
    let input = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let h = parse(input).unwrap();
    assert_eq!(h.start, 2);
}

#[test]
fn bodies() {
    let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n").unwrap();
    assert_eq!(h.body, BodyKind::Length(5));
    let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
    assert_eq!(h.body, BodyKind::Chunked);
    let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(h.body, BodyKind::None);
    let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n";
    assert_eq!(parse(input).unwrap_err(), ParseError::BodyTooLarge);
}

#[test]
fn keep_alive_rules() {
    let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
    assert!(!h.keep_alive);
    let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(!h.keep_alive && h.http10);
    let h = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
    assert!(h.keep_alive);
}

#[test]
fn smuggling_vectors_are_rejected() {
    let bad: &[(&[u8], ParseError)] = &[
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", ParseError::UnsupportedTransferCoding),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", ParseError::UnsupportedTransferCoding),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0cchunked\r\n\r\n", ParseError::Malformed),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\nHost: a\n\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", ParseError::Malformed),
        // An empty host before a port, a port past 65535 (before: served).
        (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", ParseError::Malformed),
        (b"GET http://:80/x HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", ParseError::Malformed),
        // An empty label (before: served, `x..a.test` by a `*.a.test` route).
        (b"GET / HTTP/1.1\r\nHost: x..a.test\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.1\r\n\r\n", ParseError::Malformed),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", ParseError::VersionNotSupported),
        (b"\r\nGET / HTTP/3.0\r\nHost: a\r\n\r\n", ParseError::VersionNotSupported),
        // A space in the target, or two between parts: a malformed line, not a version the
        // gateway does not speak, though it ends with one (before: 505).
        (b"GET /search?q=a b HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET /a  HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET /a b c HTTP/1.0\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET /a b HTTP/1.1", ParseError::Malformed),
        // No version at all (the name is case-sensitive): malformed, not unsupported.
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET / HTTP/1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"GET x HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::MethodNotAllowed),
        // In every target form: a CONNECT is a tunnel, whatever its target looks like.
        (b"CONNECT /p HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::MethodNotAllowed),
        (b"CONNECT http://a/p HTTP/1.1\r\nHost: a\r\n\r\n", ParseError::MethodNotAllowed),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: telepathy\r\n\r\n", ParseError::ExpectationFailed),
        (b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n", ParseError::Malformed),
    ];
    for (input, want) in bad {
        assert_eq!(
            parse(input).unwrap_err(),
            *want,
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn hop_by_hop_and_forwarding_fields_are_dropped() {
    let input = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop-Me, Host\r\nX-Drop-Me: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nProxy-Authorization: y\r\nUpgrade: z\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
        X-Original-URL: /admin\r\nx_rewrite_url: /admin\r\n\
        Content_Length: 5\r\nTransfer_encoding: chunked\r\nX-Keep: yes\r\n\r\n";
    assert_eq!(kept_fields(input), "Host: a\r\nX-Keep: yes\r\n");
    let mut plan = FieldPlan::default();
    parse_request(input, &limits(), &mut plan).unwrap();
    assert_eq!(plan.xff.len(), 1);
    assert_eq!(plan.xff[0].of(input), b"1.2.3.4");
}

#[test]
fn absolute_form_replaces_host() {
    let input = b"GET http://Good.example:8080/p?q HTTP/1.1\r\nHost: evil.example\r\nX: 1\r\n\r\n";
    let h = parse(input).unwrap();
    assert!(h.absolute);
    assert_eq!(h.host.unwrap().of(input), b"Good.example:8080");
    assert_eq!(h.origin_target.of(input), b"/p?q");
    assert_eq!(h.path(input), b"/p");
    assert_eq!(kept_fields(input), "X: 1\r\n");
    let h = parse(b"GET http://a HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(h.path(b"GET http://a HTTP/1.1\r\nHost: a\r\n\r\n"), b"/");
    // An empty path with a query is `/` too (RFC 9112 3.2.1).
    let input = b"GET http://a?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
    let h = parse(input).unwrap();
    assert_eq!(
        (h.path(input), h.origin_target.of(input)),
        (&b"/"[..], &b"?x=1"[..])
    );
    assert_eq!(
        parse(b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n").unwrap_err(),
        ParseError::Malformed
    );
    // An empty Host names no host (RFC 9110 4.2.1): refused, unless an absolute-form
    // target gives one.
    for input in [
        &b"GET / HTTP/1.1\r\nHost: \r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: \r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: \r\n\r\n",
    ] {
        assert_eq!(
            parse(input).unwrap_err(),
            ParseError::Malformed,
            "{input:?}"
        );
    }
    let input = b"GET http://a/p HTTP/1.1\r\nHost: \r\n\r\n";
    assert_eq!(parse(input).unwrap().host.unwrap().of(input), b"a");
}

#[test]
fn upgrade_and_expect() {
    let input = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let h = parse(input).unwrap();
    assert_eq!(h.upgrade.unwrap().of(input), b"websocket");
    let h = parse(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").unwrap();
    assert!(h.upgrade.is_none());
    let h =
        parse(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
            .unwrap();
    assert!(h.expect_continue);
    let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n").unwrap();
    assert!(!h.expect_continue);
    // A list whose empty elements do not count (RFC 9110 5.6.1; before: 417 for each).
    for expect in [
        "100-continue,",
        "100-continue, 100-continue",
        " , 100-continue",
    ] {
        let input =
            format!("POST / HTTP/1.1\r\nHost: a\r\nExpect: {expect}\r\nContent-Length: 1\r\n\r\n");
        assert!(parse(input.as_bytes()).unwrap().expect_continue, "{expect}");
    }
    let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nExpect:\r\n\r\n").unwrap();
    assert!(!h.expect_continue);
    let other = b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue, x\r\n\r\n";
    assert_eq!(parse(other).unwrap_err(), ParseError::ExpectationFailed);
}

#[test]
fn limits_give_the_right_status() {
    let l = limits();
    let mut plan = FieldPlan::default();
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(1100));
    assert_eq!(
        parse_request(long_uri.as_bytes(), &l, &mut plan).unwrap_err(),
        ParseError::UriTooLong
    );
    let huge_line = format!("GET /{}", "a".repeat(5000));
    assert_eq!(
        parse_request(huge_line.as_bytes(), &l, &mut plan).unwrap_err(),
        ParseError::UriTooLong
    );
    let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X: y\r\n".repeat(40));
    assert_eq!(
        parse_request(many.as_bytes(), &l, &mut plan).unwrap_err(),
        ParseError::HeadTooLarge
    );
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "y".repeat(5000)
    );
    assert_eq!(
        parse_request(big.as_bytes(), &l, &mut plan).unwrap_err(),
        ParseError::HeadTooLarge
    );
    let partial_big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "y".repeat(5000));
    assert_eq!(
        parse_request(partial_big.as_bytes(), &l, &mut plan).unwrap_err(),
        ParseError::HeadTooLarge
    );
}

#[test]
fn dot_segments_are_found_in_every_spelling() {
    for bad in [
        &b"/a/../b"[..],
        b"/..",
        b"/.",
        b"/a/.",
        b"/a/./b",
        b"/a/%2e%2E/b",
        b"/a/.%2e/b",
        b"/a%2f..%2fb",
        b"/a%5C..",
        b"/a\\..\\b",
        b"/public/..;/admin",
        b"/public/..;x=1/admin",
        b"/a/.;/b",
    ] {
        assert!(has_dot_segment(bad), "{}", String::from_utf8_lossy(bad));
    }
    for good in [
        &b"/"[..],
        b"/a/b",
        b"/a/.b/c",
        b"/a/b./c",
        b"/.well-known/x",
        b"/a/.../b",
        b"/a%2fb",
        b"/%2",
        b"/a%",
        b"/a;v=1/b",
        b"/a/x;..",
    ] {
        assert!(!has_dot_segment(good), "{}", String::from_utf8_lossy(good));
    }
}

#[test]
fn malformed_escapes_and_nul_in_the_path_are_refused() {
    for target in ["/%zz", "/a%2", "/a%", "/%g0/x", "/a%00b", "/%2%61", "/x%C"] {
        let input = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            parse(input.as_bytes()).unwrap_err(),
            ParseError::Malformed,
            "{target}"
        );
    }
    // The query is not the path: upstreams read it their own way, and clients send `100%`.
    for target in ["/a?q=%zz", "/a?x=%", "/%2F%20%E2%82%AC", "/%C3%A9?q=%c3"] {
        let input = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
        let head = parse(input.as_bytes()).unwrap();
        assert!(!head.escaped && !head.slash_runs, "{target}");
    }
}

#[test]
fn escapes_are_upper_cased_in_place() {
    // RFC 3986 6.2.2.1: `%2f` and `%2F` are one character; routes are written upper-cased.
    let input = "GET /p%2fq/%e2%82%ACx%2E?q=%2f HTTP/1.1\r\nHost: a\r\n\r\n";
    let (head, buf) = decoded(input);
    assert_eq!(head.target.of(&buf), b"/p%2Fq/%E2%82%ACx.?q=%2f");
    assert_eq!(head.decoded, 2);
    assert_eq!(kept_fields(&buf[head.start..]), "Host: a\r\n");
}

/// Parses `input` and decodes its path; returns the head and the buffer.
fn decoded(input: &str) -> (RequestHead, Vec<u8>) {
    let mut buf = input.as_bytes().to_vec();
    let mut head = parse(&buf).unwrap();
    assert!(head.escaped || head.slash_runs, "{input}");
    normalize_path(&mut buf, &mut head);
    (head, buf)
}

#[test]
fn escaped_unreserved_characters_are_decoded_in_place() {
    let input = "\r\nGET /%6Frders/%7euser%2Fx%20%2D%5f%2e%41%39?q=%6F HTTP/1.1\r\nHost: a\r\n\r\n";
    let (head, buf) = decoded(input);
    let line = "GET /orders/~user%2Fx%20-_.A9?q=%6F HTTP/1.1\r\n";
    assert_eq!(&buf[head.start..head.fields_start], line.as_bytes());
    assert_eq!(head.method.of(&buf), b"GET");
    assert_eq!(head.target.of(&buf), b"/orders/~user%2Fx%20-_.A9?q=%6F");
    assert_eq!(head.path(&buf), b"/orders/~user%2Fx%20-_.A9");
    assert_eq!(head.decoded, 2 * 7);
    assert_eq!(head.head_end - head.start + head.decoded, input.len() - 2);
    assert_eq!(head.host.unwrap().of(&buf), b"a");
    assert_eq!(kept_fields(&buf[head.start..]), "Host: a\r\n");
    // Decoded once: a second pass finds nothing left to decode.
    let (mut again, mut twice) = (head, buf.clone());
    again.escaped = true;
    normalize_path(&mut twice, &mut again);
    assert_eq!(again.decoded, head.decoded);
    assert_eq!(twice, buf);

    // Absolute form: the authority inside the target moves with it.
    let (head, buf) = decoded("GET http://h.example/%61b/c HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(head.host.unwrap().of(&buf), b"h.example");
    assert_eq!(head.path(&buf), b"/ab/c");
    assert_eq!(head.origin_target.of(&buf), b"/ab/c");
    assert_eq!(
        &buf[head.start..head.fields_start],
        b"GET http://h.example/ab/c HTTP/1.1\r\n"
    );
}

#[test]
fn runs_of_slashes_are_merged_unless_turned_off() {
    let input = "GET //orders///1//?q=//x HTTP/1.1\r\nHost: a\r\n\r\n";
    let (head, buf) = decoded(input);
    assert_eq!(head.target.of(&buf), b"/orders/1/?q=//x");
    assert_eq!(head.path(&buf), b"/orders/1/");
    assert_eq!(head.decoded, 4);
    assert_eq!(head.head_end - head.start + head.decoded, input.len());
    // With escapes, in one pass; an escaped slash is not a slash (nginx keeps `%2F` too).
    let (head, buf) = decoded("GET http://h/%6F//%2F/x HTTP/1.1\r\nHost: y\r\n\r\n");
    assert_eq!(head.origin_target.of(&buf), b"/o/%2F/x");
    assert_eq!(head.host.unwrap().of(&buf), b"h");
    // `merge_slashes = false`: as sent.
    let mut plan = FieldPlan::default();
    let limits = Limits {
        merge_slashes: false,
        ..limits()
    };
    let head = parse_request(input.as_bytes(), &limits, &mut plan)
        .unwrap()
        .unwrap();
    assert!(!head.escaped && !head.slash_runs);
    assert_eq!(head.path(input.as_bytes()), b"//orders///1//");
    // Escapes are still decoded then, the runs kept.
    let input = "GET /%6F//x HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut buf = input.as_bytes().to_vec();
    let mut head = parse_request(&buf, &limits, &mut plan).unwrap().unwrap();
    normalize_path(&mut buf, &mut head);
    assert_eq!(head.path(&buf), b"/o//x");
    // A path of slashes only is `/`.
    let (head, buf) = decoded("GET /// HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(head.target.of(&buf), b"/");
    // A single slash anywhere: nothing to do.
    assert!(
        !parse(b"GET /a/b/?x=// HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .slash_runs
    );
}

/// What [`normalize_path`] should make of `path` (a valid one): escaped unreserved characters
/// decoded, the others upper-cased, then, with `merge`, each run of `/` one.
fn normalized_by_hand(path: &[u8], merge: bool) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < path.len() {
        let c = match path[i] {
            b'%' => unescape(path[i + 1], path[i + 2]).filter(|&c| is_unreserved(c)),
            _ => None,
        };
        if path[i] == b'%' && c.is_none() {
            out.extend(path[i..i + 3].to_ascii_uppercase());
            i += 3;
            continue;
        }
        let (b, step) = c.map_or((path[i], 1), |c| (c, 3));
        if !(merge && b == b'/' && step == 1 && out.last() == Some(&b'/')) {
            out.push(b);
        }
        i += step;
    }
    out
}

#[test]
fn normalizing_agrees_with_a_plain_rewrite_on_many_paths() {
    // Paths made of pieces that exercise escapes, slash runs and dots, in origin and absolute
    // form, with and without a query and merging; every span still reads right afterwards.
    const PIECES: &[&str] = &["/", "//", "a", "%61", "%2F", "%2f", "~", "%7E", "-", "x."];
    let mut seed = 0x2545_f491_u64;
    for n in 0..4000 {
        let mut path = String::new();
        for _ in 0..(1 + n % 7) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            path.push_str(PIECES[(seed % PIECES.len() as u64) as usize]);
        }
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        let (merge, absolute, query) = (n % 2 == 0, n % 3 == 0, n % 5 == 0);
        let target = format!(
            "{}{path}{}",
            if absolute { "http://h.test" } else { "" },
            if query { "?q=%61//" } else { "" }
        );
        let input = format!("\r\nPUT {target} HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n");
        let mut plan = FieldPlan::default();
        let limits = Limits {
            merge_slashes: merge,
            ..limits()
        };
        let Ok(Some(mut head)) = parse_request(input.as_bytes(), &limits, &mut plan) else {
            // A dot segment made of the pieces (`/x./` is not one, `%2F` separates): refused
            // as such, which has its own tests.
            assert!(has_dot_segment(path.as_bytes()), "{target}");
            continue;
        };
        let mut buf = input.as_bytes().to_vec();
        normalize_path(&mut buf, &mut head);
        let want = normalized_by_hand(path.as_bytes(), merge);
        assert_eq!(head.path(&buf), &want[..], "{target}");
        let mut line = format!("PUT {}", if absolute { "http://h.test" } else { "" }).into_bytes();
        line.extend_from_slice(&want);
        line.extend_from_slice(if query { &b"?q=%61//"[..] } else { b"" });
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert_eq!(&buf[head.start..head.fields_start], &line[..], "{target}");
        assert_eq!(head.method.of(&buf), b"PUT");
        let host: &[u8] = if absolute { b"h.test" } else { b"a" };
        assert_eq!(head.host.unwrap().of(&buf), host, "{target}");
        assert_eq!(head.head_end - head.start + head.decoded, input.len() - 2);
        // The fields after the line are where they were (an absolute form's Host goes).
        let fields = if absolute {
            "X: y\r\n"
        } else {
            "Host: a\r\nX: y\r\n"
        };
        assert_eq!(kept_fields(&buf[head.start..]), fields, "{target}");
        assert!(!head.escaped && !head.slash_runs);
    }
}

#[test]
fn a_later_minor_version_is_read_as_http11() {
    for (line, want) in [
        (
            &b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"[..],
            Some(&b"GET / HTTP/1.1\r\n"[..]),
        ),
        (b"GET /x HTTP/1.9", Some(b"GET /x HTTP/1.1")),
        // After the empty lines a client may send first (before: read as an empty line).
        (b"\r\nGET / HTTP/1.2\r\n", Some(b"\r\nGET / HTTP/1.1\r\n")),
        (b"\n\r\nGET /x HTTP/1.3", Some(b"\n\r\nGET /x HTTP/1.1")),
        (b"\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\n", None),
        (b"GET / HTTP/1.0\r\n", None),
        (b"GET / HTTP/2.0\r\n", None),
        (b"GET / HTTP/1.10\r\n", None),
        (b"GET / HTTP/1.", None),
        (b"HTTP/1.2", None),
    ] {
        let mut buf = line.to_vec();
        assert_eq!(
            as_http11(&mut buf),
            want.is_some(),
            "{}",
            String::from_utf8_lossy(line)
        );
        if let Some(want) = want {
            assert!(buf.starts_with(want), "{}", String::from_utf8_lossy(&buf));
        } else {
            assert_eq!(buf, line);
        }
    }
    let mut buf = b"GET / HTTP/1.2\r\nHost: a\r\n\r\n".to_vec();
    assert!(as_http11(&mut buf));
    assert!(parse(&buf).is_ok());
}
