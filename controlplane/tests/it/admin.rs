//! The admin REST API through the real binary: CRUD, ETags and preconditions, dry runs,
//! problem+json errors, authentication, revisions and rollback, durability across `kill -9`,
//! and config changes under traffic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

fn base_config(origin: std::net::SocketAddr) -> String {
    format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"origin\"\ntargets = [{{ address = \"{origin}\" }}]\n[[routes]]\nid = \"health\"\npath = \"/health\"\nrespond = {{ body = \"ok\" }}\n"
    )
}

fn start(origin: &Origin) -> Gateway {
    Gateway::start(&base_config(origin.addr), Driver::IoUring)
}

fn revision(gw: &Gateway) -> u64 {
    gw.admin("GET", "/v1/status", None).json()["revision"]
        .as_u64()
        .unwrap()
}

fn problem(r: &Response, status: u16) -> Value {
    assert_eq!(r.status, status, "{}\n{}", r.head, r.body_str());
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{}",
        r.head
    );
    let p = r.json();
    assert_eq!(p["status"], json!(status));
    assert!(p["title"].is_string() && p["detail"].is_string(), "{p}");
    p
}

#[test]
fn routes_and_upstreams_crud() {
    let origin = Origin::echo();
    let gw = start(&origin);
    // Create.
    let r = gw.admin(
        "PUT",
        "/v1/upstreams/api",
        Some(&format!(
            r#"{{"targets":[{{"address":"{}"}}]}}"#,
            origin.addr
        )),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    assert_eq!(r.header("location"), Some("/v1/upstreams/api"));
    let etag = r.header("etag").unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(
        r.json(),
        json!({"id": "api", "targets": [{"address": origin.addr.to_string()}]})
    );
    let r = gw.admin(
        "PUT",
        "/v1/routes/api",
        Some(r#"{"path_prefix":"/api","upstream":"api"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    // Read.
    let r = gw.admin("GET", "/v1/upstreams/api", None);
    assert_eq!((r.status, r.header("etag")), (200, Some(etag.as_str())));
    let r = gw.admin("GET", "/v1/routes", None);
    let list = r.json();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["health", "api"]);
    // Replace (idempotent: the same body twice keeps the revision and the ETag).
    let body = r#"{"path_prefix":"/api","upstream":"api","methods":["GET"]}"#;
    let r = gw.admin("PUT", "/v1/routes/api", Some(body));
    assert_eq!(r.status, 200);
    let rev = revision(&gw);
    let again = gw.admin("PUT", "/v1/routes/api", Some(body));
    assert_eq!(
        (again.status, again.header("etag")),
        (200, r.header("etag"))
    );
    assert_eq!(revision(&gw), rev);
    // Merge patch.
    let r = gw.admin_with(
        "PATCH",
        "/v1/routes/api",
        Some(r#"{"methods":null,"strip_prefix":true}"#),
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("Content-Type", "application/merge-patch+json"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(
        r.json(),
        json!({"id": "api", "path_prefix": "/api", "strip_prefix": true, "upstream": "api"})
    );
    // The route answers through the data plane.
    let mut c = gw.connect();
    assert_eq!(
        c.roundtrip("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
            .body_str(),
        "origin saw /x"
    );
    // An upstream still in use cannot go.
    let p = problem(&gw.admin("DELETE", "/v1/upstreams/api", None), 409);
    assert!(p["detail"].as_str().unwrap().contains("routes/api"), "{p}");
    assert_eq!(gw.admin("DELETE", "/v1/routes/api", None).status, 204);
    assert_eq!(gw.admin("DELETE", "/v1/upstreams/api", None).status, 204);
    problem(&gw.admin("GET", "/v1/routes/api", None), 404);
    problem(&gw.admin("DELETE", "/v1/routes/api", None), 404);
    problem(&gw.admin("GET", "/v1/widgets", None), 404);
    assert_eq!(
        c.roundtrip("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").status,
        404
    );
}

#[test]
fn new_route_answers_on_an_open_keep_alive_connection() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let mut c = gw.connect();
    assert_eq!(
        c.roundtrip("GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        404
    );
    let r = gw.admin(
        "PUT",
        "/v1/routes/orders",
        Some(r#"{"path_prefix":"/orders","upstream":"origin"}"#),
    );
    assert_eq!(r.status, 201);
    let r = c.roundtrip("GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.body_str()), (200, "origin saw /orders/1"));
}

#[test]
fn conditional_writes() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let etag = gw
        .admin("GET", "/v1/routes/health", None)
        .header("etag")
        .unwrap()
        .to_owned();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let write = |body: &str| {
        gw.admin_with(
            "PUT",
            "/v1/routes/health",
            Some(body),
            &[("Authorization", &auth), ("If-Match", &etag)],
        )
    };
    // Two writers read the same ETag: the first wins, the second is told.
    assert_eq!(
        write(r#"{"path":"/health","respond":{"body":"one"}}"#).status,
        200
    );
    let p = problem(
        &write(r#"{"path":"/health","respond":{"body":"two"}}"#),
        412,
    );
    assert!(p["detail"].as_str().unwrap().contains(&etag), "{p}");
    assert_eq!(
        gw.admin("GET", "/v1/routes/health", None).json()["respond"]["body"],
        json!("one")
    );
    // A stale ETag is a 412 whatever the body holds: preconditions come before the content
    // (RFC 9110 13.2.1; before: 400 for a body that was not JSON). But what the head alone
    // refuses (another type, a coding, a declared length past the limit) comes before them,
    // as "failures that can be detected before significant processing" (before: 412, and
    // the etcd store answered 415).
    problem(&write("{not json"), 412);
    let typed = |path: &str, body: &str| {
        let method = if path.ends_with(":batch") {
            "POST"
        } else {
            "PUT"
        };
        gw.admin_with(
            method,
            path,
            Some(body),
            &[
                ("Authorization", &auth),
                ("If-Match", "\"stale\""),
                ("Content-Type", "text/plain"),
            ],
        )
    };
    problem(&typed("/v1/routes/health", "x"), 415);
    problem(&typed("/v1/config", "x"), 415);
    problem(&typed("/v1/config:batch", "x"), 415);
    let big = "x".repeat(1_100_000);
    let r = gw.admin_with(
        "PUT",
        "/v1/routes/health",
        Some(&big),
        &[("Authorization", &auth), ("If-Match", "\"stale\"")],
    );
    problem(&r, 413);
    // If-None-Match: * creates only.
    let create_only = |id: &str| {
        gw.admin_with(
            "PUT",
            &format!("/v1/routes/{id}"),
            Some(r#"{"path":"/x","respond":{}}"#),
            &[("Authorization", &auth), ("If-None-Match", "*")],
        )
    };
    assert_eq!(create_only("x").status, 201);
    problem(&create_only("x"), 412);
    // Every line of a precondition counts (one list), and If-None-Match compares weakly.
    let current = gw
        .admin("GET", "/v1/routes/x", None)
        .header("etag")
        .unwrap()
        .to_owned();
    let weak = format!("W/{current}");
    for headers in [
        vec![("If-None-Match", "\"other\""), ("If-None-Match", "*")],
        vec![("If-None-Match", weak.as_str())],
    ] {
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend(headers.iter().copied());
        let r = gw.admin_with(
            "PUT",
            "/v1/routes/x",
            Some(r#"{"path":"/y","respond":{}}"#),
            &all,
        );
        problem(&r, 412);
    }
    let r = gw.admin_with(
        "PUT",
        "/v1/routes/x",
        Some(r#"{"path":"/y","respond":{}}"#),
        &[
            ("Authorization", &auth),
            ("If-Match", "\"other\""),
            ("If-Match", &current),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    // The whole config has an ETag too.
    let cfg = gw.admin("GET", "/v1/config", None);
    let cfg_etag = cfg.header("etag").unwrap().to_owned();
    let body = cfg.body_str().to_owned();
    let put = |tag: &str| {
        gw.admin_with(
            "PUT",
            "/v1/config",
            Some(&body),
            &[("Authorization", &auth), ("If-Match", tag)],
        )
    };
    problem(&put("\"stale\""), 412);
    assert_eq!(put(&cfg_etag).status, 200);
    // Refusals and the token-free endpoints too; the dashboard's files are `no-cache`.
    let refused = gw.admin_with("GET", "/v1/config", None, &[]);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("cache-control"), Some("no-store"));
    let health = gw.admin_with("GET", "/v1/health", None, &[]);
    assert_eq!(health.header("cache-control"), Some("no-store"));
    let ui = gw.admin_with("GET", "/ui/app.js", None, &[]);
    assert_eq!(ui.header("cache-control"), Some("no-cache"));
}

#[test]
fn conditional_reads() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let get = |path: &str, field: &str, value: &str| {
        gw.admin_with(
            "GET",
            path,
            None,
            &[("Authorization", &auth), (field, value)],
        )
    };
    for path in ["/v1/config", "/v1/routes", "/v1/routes/health"] {
        let r = gw.admin("GET", path, None);
        // Kept out of caches: answers carry secrets (before: no Cache-Control, and the
        // dashboard's browser stored them on disk).
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
        let etag = r.header("etag").unwrap().to_owned();
        // A cache that holds the current answer gets 304, the ETag and no body (RFC 9110
        // 13.1.2, 15.4.5); a weak copy of the tag and a list naming it match too.
        let weak = format!("W/{etag}");
        let listed = format!("\"old\", {etag}");
        for tag in [etag.as_str(), &weak, &listed, "*"] {
            let r = get(path, "If-None-Match", tag);
            assert_eq!(r.status, 304, "{path} {tag}: {}", r.head);
            assert_eq!(r.header("etag"), Some(etag.as_str()), "{path}");
            assert!(r.body.is_empty(), "{path}: {}", r.body_str());
        }
        let r = get(path, "If-None-Match", "\"old\"");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        // If-Match on a read: 412 unless it names the current one.
        problem(&get(path, "If-Match", "\"old\""), 412);
        assert_eq!(get(path, "If-Match", &etag).status, 200, "{path}");
    }
    // A change gives a new ETag, so the old one no longer gets 304.
    let old = gw
        .admin("GET", "/v1/routes/health", None)
        .header("etag")
        .unwrap()
        .to_owned();
    let r = gw.admin(
        "PUT",
        "/v1/routes/health",
        Some(r#"{"path":"/health","respond":{"body":"new"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    let r = get("/v1/routes/health", "If-None-Match", &old);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["respond"]["body"], json!("new"));
    // A missing item: 404 whatever the preconditions, which are ignored where the answer
    // without them is not a 2xx (RFC 9110 13.2.1); so for a PATCH. A PUT would create it, so
    // there `If-Match` decides: it names nothing that exists.
    problem(&get("/v1/routes/none", "If-Match", "*"), 404);
    problem(&get("/v1/routes/none", "If-None-Match", "*"), 404);
    let write = |method: &str, kind: &str| {
        gw.admin_with(
            method,
            "/v1/routes/none",
            Some(r#"{"path":"/none","respond":{}}"#),
            &[
                ("Authorization", &auth),
                ("If-Match", "*"),
                ("Content-Type", kind),
            ],
        )
    };
    problem(&write("PATCH", "application/merge-patch+json"), 404);
    problem(&write("PUT", "application/json"), 412);
}

#[test]
fn dry_run_changes_nothing_and_reports_the_diff() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let before = gw.admin("GET", "/v1/config", None);
    let r = gw.admin(
        "PUT",
        "/v1/routes/new?dry_run=true",
        Some(r#"{"path":"/new","upstream":"origin"}"#),
    );
    assert_eq!(r.status, 200);
    let diff = r.json();
    assert_eq!(diff["dry_run"], json!(true));
    assert_eq!(
        diff["changes"],
        json!([{"op": "add", "kind": "routes", "id": "new"}])
    );
    let r = gw.admin("DELETE", "/v1/routes/health?dry_run=true", None);
    assert_eq!(
        r.json()["changes"],
        json!([{"op": "remove", "kind": "routes", "id": "health"}])
    );
    let after = gw.admin("GET", "/v1/config", None);
    assert_eq!(
        (after.body_str(), after.header("etag")),
        (before.body_str(), before.header("etag"))
    );
    problem(&gw.admin("GET", "/v1/routes/new", None), 404);
    // A write that changes nothing makes no revision, so its dry run names none to come.
    let rev = revision(&gw);
    let same = gw.admin("GET", "/v1/routes/health", None);
    let r = gw.admin(
        "PUT",
        "/v1/routes/health?dry_run=true",
        Some(same.body_str()),
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(
        (
            r.json()["would_be_revision"].clone(),
            r.json()["changes"].clone()
        ),
        (json!(rev), json!([]))
    );
    // The query is read with its escapes decoded, in the name as in the value.
    for query in ["dry_run=%74rue", "dry%5Frun=1"] {
        let r = gw.admin(
            "PUT",
            &format!("/v1/routes/new?{query}"),
            Some(r#"{"path":"/new","upstream":"origin"}"#),
        );
        assert_eq!(
            r.json()["dry_run"],
            json!(true),
            "{query}: {}",
            r.body_str()
        );
    }
    problem(
        &gw.admin("PUT", "/v1/routes/new?dry_run=%zz", Some("{}")),
        400,
    );
    assert_eq!(revision(&gw), rev);
    problem(&gw.admin("GET", "/v1/routes/new", None), 404);
    // Validation still runs in a dry run.
    problem(
        &gw.admin(
            "PUT",
            "/v1/routes/bad?dry_run=true",
            Some(r#"{"path":"/b","upstream":"nope"}"#),
        ),
        422,
    );
}

#[test]
fn bad_input_is_refused_with_the_field_and_changes_nothing() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let rev = revision(&gw);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let p = problem(
        &gw.admin("PUT", "/v1/routes/r", Some(r#"{"path": "/r", "#)),
        400,
    );
    assert_eq!(p["title"], json!("Malformed JSON"));
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/routes/r",
            Some(r#"{"path":"/r","respond":{},"colour":"red"}"#),
        ),
        400,
    );
    assert_eq!(p["pointer"], json!("/colour"), "{p}");
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/upstreams/u",
            Some(r#"{"targets":[{"address":"127.0.0.1:1","weight":"heavy"}]}"#),
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/targets/0/weight"), "{p}");
    // Inside a policy (a `kind`-tagged type) too, the pointer names the field.
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/policies/p1",
            Some(r#"{"kind":"ip_filter","allow":"x"}"#),
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/allow"), "{p}");
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/policies/p1",
            Some(r#"{"kind":"ip_filter","alow":["10.0.0.0/8"]}"#),
        ),
        400,
    );
    assert_eq!(p["pointer"], json!("/alow"), "{p}");
    let mut whole = gw.admin("GET", "/v1/config", None).json();
    whole["policies"] = json!([{"id": "p1", "kind": "ip_filter", "allow": "x"}]);
    let p = problem(
        &gw.admin("PUT", "/v1/config", Some(&whole.to_string())),
        422,
    );
    assert_eq!(p["pointer"], json!("/policies/0/allow"), "{p}");
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/upstreams/u",
            Some(r#"{"targets":[{"address":"127.0.0.1:1","weight":0}]}"#),
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/targets/0/weight"), "{p}");
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/routes/r",
            Some(r#"{"path":"/r","upstream":"missing"}"#),
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/upstream"), "{p}");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("unknown upstream \"missing\""),
        "{p}"
    );
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/routes/r",
            Some(r#"{"id":"other","path":"/r","respond":{}}"#),
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/id"));
    // A 204, 205 or 304 has no body: one given would follow a head the client reads as
    // whole, and be taken for the next answer (a 205 was sent with its body before).
    for status in [204, 205, 304] {
        let p = problem(
            &gw.admin(
                "PUT",
                "/v1/routes/r",
                Some(&format!(
                    r#"{{"path":"/r","respond":{{"status":{status},"body":"HTTP/1.1 200 OK"}}}}"#
                )),
            ),
            422,
        );
        assert_eq!(p["pointer"], json!("/respond/body"), "{p}");
    }
    // Settings the running gateway cannot take: refused, naming them.
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["workers"] = json!(7);
    let p = problem(
        &gw.admin("PUT", "/v1/config", Some(&config.to_string())),
        422,
    );
    assert_eq!(p["pointer"], json!("/workers"), "{p}");
    config["workers"] = json!(1);
    config["access_log"] = json!({"path": gw.data_dir.join("journal.log")});
    let p = problem(
        &gw.admin("PUT", "/v1/config", Some(&config.to_string())),
        422,
    );
    assert_eq!(p["pointer"], json!("/access_log/path"), "{p}");
    // A directory: every line would be lost (before: taken).
    let elsewhere = temp_dir("admin-log-dir");
    config["access_log"] = json!({ "path": elsewhere });
    let p = problem(
        &gw.admin("PUT", "/v1/config", Some(&config.to_string())),
        422,
    );
    assert_eq!(p["pointer"], json!("/access_log/path"), "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("is a directory"),
        "{p}"
    );
    let big = format!(
        r#"{{"path":"/r","respond":{{"body":"{}"}}}}"#,
        "x".repeat(1_100_000)
    );
    problem(&gw.admin("PUT", "/v1/routes/r", Some(&big)), 413);
    let r = gw.admin_with(
        "PUT",
        "/v1/routes/r",
        Some(r#"{"path":"/r","respond":{}}"#),
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
    );
    problem(&r, 415);
    // Two types, JSON first, are no type (before: the first was taken).
    let r = gw.admin_with(
        "PUT",
        "/v1/routes/r",
        Some(r#"{"path":"/r","respond":{}}"#),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Content-Type", "text/plain"),
        ],
    );
    problem(&r, 415);
    // A PATCH refused for its media type names the ones taken (RFC 5789 2.2).
    let r = gw.admin_with(
        "PATCH",
        "/v1/routes/health",
        Some(r#"{"respond":{}}"#),
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
    );
    problem(&r, 415);
    assert_eq!(
        r.header("accept-patch"),
        Some("application/merge-patch+json, application/json")
    );
    // A path the API cannot read is refused like any other bad input: problem+json.
    for path in ["/v1/routes/%FF", "/v1/revisions/%FF"] {
        problem(&gw.admin("GET", path, None), 400);
    }
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/config",
            Some(r#"{"listeners":[{"address":"127.0.0.1:1"}]}"#),
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/listeners"));
    // A member named twice: which one counts would be a guess.
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/routes/r",
            Some(r#"{"path":"/r","respond":{"status":200,"status":500}}"#),
        ),
        400,
    );
    assert_eq!(
        (p["title"].clone(), p["pointer"].clone()),
        (json!("Malformed JSON"), json!("/respond/status")),
        "{p}"
    );
    // A compressed body is refused for its coding, naming the one taken.
    let coded = |coding: &str| {
        gw.admin_with(
            "PUT",
            "/v1/routes/r?dry_run=true",
            Some(r#"{"path":"/r","respond":{}}"#),
            &[("Authorization", &auth), ("Content-Encoding", coding)],
        )
    };
    let r = coded("gzip");
    let p = problem(&r, 415);
    assert!(p["detail"].as_str().unwrap().contains("gzip"), "{p}");
    assert_eq!(r.header("accept-encoding"), Some("identity"));
    assert_eq!(coded("identity").status, 200);
    // `.` and `..` are dot segments: a client removes them from the URL, so no item may
    // have them as its id.
    for id in ["%2E", "%2e%2E"] {
        let p = problem(
            &gw.admin(
                "PUT",
                &format!("/v1/routes/{id}"),
                Some(r#"{"path":"/r","respond":{}}"#),
            ),
            422,
        );
        assert_eq!(p["pointer"], json!("/id"), "{p}");
    }
    // In a batch, an error in what an operation wrote points into that operation.
    let batch = |ops: &str| {
        gw.admin(
            "POST",
            "/v1/config:batch",
            Some(&format!(r#"{{"operations":[{ops}]}}"#)),
        )
    };
    let p = problem(
        &batch(
            r#"{"op":"put","kind":"routes","id":"r","value":{"path":"/r","respond":{}}},
               {"op":"put","kind":"routes","id":"s","value":{"path":"/s","upstream":"gone"}}"#,
        ),
        422,
    );
    assert_eq!(p["pointer"], json!("/operations/1/value/upstream"), "{p}");
    let p = problem(
        &batch(r#"{"op":"put","kind":"routes","id":"r","value":{"path":"/r","colour":1}}"#),
        422,
    );
    assert_eq!(p["pointer"], json!("/operations/0/value/colour"), "{p}");
    // A patch that nulls a field the kind does not have: 422 in a batch as alone.
    let patch = r#"{"op":"patch","kind":"routes","id":"health","value":{"colour":null}}"#;
    let p = problem(&batch(patch), 422);
    assert_eq!(p["pointer"], json!("/operations/0/value/colour"), "{p}");
    let p = problem(
        &gw.admin("PATCH", "/v1/routes/health", Some(r#"{"colour":null}"#)),
        422,
    );
    assert_eq!(p["pointer"], json!("/colour"), "{p}");
    assert_eq!(revision(&gw), rev);
    problem(&gw.admin("GET", "/v1/routes/r", None), 404);
}

#[test]
fn a_malformed_chunked_body_is_a_bad_request() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let rev = revision(&gw);
    let mut s = std::net::TcpStream::connect(gw.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "PUT /v1/routes/r HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         zz\r\n{{}}\r\n0\r\n\r\n"
    );
    std::io::Write::write_all(&mut s, request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("Malformed Body"), "{text}");
    assert_eq!(revision(&gw), rev);
}

#[test]
fn every_endpoint_but_health_needs_the_token() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let health = gw.admin_with("GET", "/v1/health", None, &[]);
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );
    // Every endpoint the router serves (the same table the OpenAPI document is checked
    // against), with its path parameters filled in.
    let operations: Vec<(&str, String, Option<&str>)> = controlplane::api::ENDPOINTS
        .iter()
        .filter(|(_, p)| *p != "/v1/health")
        .map(|&(method, path)| {
            let path = path
                .replace("{kind}", "routes")
                .replace("{id}", "health")
                .replace("{revision}", "1");
            let body = matches!(method, "PUT" | "PATCH" | "POST").then_some("{}");
            (method, path, body)
        })
        .collect();
    assert!(operations.len() >= 14);
    let rev = revision(&gw);
    for (method, path, body) in &operations {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer wrong-token-0123456789")],
            vec![("Authorization", "Basic dGVzdA==")],
        ] {
            let r = gw.admin_with(method, path, *body, &headers);
            let p = problem(&r, 401);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"gateway-admin\""),
                "{method} {path}: {p}"
            );
        }
    }
    assert_eq!(revision(&gw), rev);
    // The right token, read as RFC 9110 writes it (before: two spaces were a 401), and two
    // fields, right then wrong, are no token (before: the first counted, the other order
    // was a 401).
    let spaced = format!("bearer  {ADMIN_TOKEN}");
    let right = format!("Bearer {ADMIN_TOKEN}");
    let r = gw.admin_with("GET", "/v1/config", None, &[("Authorization", &spaced)]);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let two = [
        ("Authorization", right.as_str()),
        ("Authorization", "Bearer wrong"),
    ];
    let r = gw.admin_with("GET", "/v1/config", None, &two);
    problem(&r, 401);
    // Without one it is served bare.
    let r = gw.admin(
        "PUT",
        "/v1/routes/nc",
        Some(r#"{"path":"/nc","respond":{"status":204}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    let mut c = gw.connect();
    let r = c.roundtrip("GET /nc HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 204);
    assert_eq!(r.header("content-length"), None, "{}", r.head);
    assert_eq!(r.header("content-type"), None, "{}", r.head);
    // The connection goes on with the next answer where it should be.
    assert_eq!(
        c.roundtrip("GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
            .body_str(),
        "ok"
    );
    // A 205 has no content either, but HTTP/1.1 framing reads one without a length to the
    // connection's end: it says `Content-Length: 0`.
    let r = gw.admin(
        "PUT",
        "/v1/routes/rc",
        Some(r#"{"path":"/rc","respond":{"status":205}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    let r = c.roundtrip("GET /rc HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 205);
    assert_eq!(r.header("content-length"), Some("0"), "{}", r.head);
    assert_eq!(r.header("content-type"), None, "{}", r.head);
    assert_eq!(
        c.roundtrip("GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
            .body_str(),
        "ok"
    );
    // The scheme's name in any case (RFC 9110 11.1).
    let r = gw.admin_with(
        "GET",
        "/v1/routes",
        None,
        &[("Authorization", &format!("bEARer {ADMIN_TOKEN}"))],
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
}

#[test]
fn a_write_answers_with_what_it_wrote_whatever_writes_beside_it() {
    // Three clients writing one route at once: each answer shows that client's own value
    // and the ETag of that revision, never another's written in between.
    let origin = Origin::echo();
    let gw = start(&origin);
    std::thread::scope(|scope| {
        for t in 0..3 {
            let gw = &gw;
            scope.spawn(move || {
                for n in 0..25 {
                    let mine = format!("t{t}-{n}");
                    let r = gw.admin(
                        "PUT",
                        "/v1/routes/race",
                        Some(&format!(
                            r#"{{"path":"/race","respond":{{"body":"{mine}"}}}}"#
                        )),
                    );
                    assert!(r.status == 200 || r.status == 201, "{}", r.body_str());
                    assert_eq!(r.json()["respond"]["body"], json!(mine));
                    // The ETag names the revision that holds this value.
                    let etag = r.header("etag").unwrap().to_owned();
                    let rev: u64 = etag
                        .trim_matches('"')
                        .rsplit("-r")
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let old = gw
                        .admin("GET", &format!("/v1/revisions/{rev}"), None)
                        .json();
                    let route = old["config"]["routes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|r| r["id"] == "race")
                        .cloned()
                        .unwrap();
                    assert_eq!(route["respond"]["body"], json!(mine), "{etag}");
                }
            });
        }
    });
}

#[test]
fn dry_runs_and_refused_writes_use_up_no_metric_slots() {
    // Route ids get per-route metric slots (4096, never given back) when their config is
    // published, not each time one is validated.
    let origin = Origin::echo();
    let gw = start(&origin);
    let mut config = gw.admin("GET", "/v1/config", None).json();
    let routes = config["routes"].as_array_mut().unwrap();
    for i in 0..4100 {
        routes.push(json!({"id": format!("dry-{i}"), "path": format!("/dry/{i}"), "respond": {}}));
    }
    let r = gw.admin("PUT", "/v1/config?dry_run=true", Some(&config.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let r = gw.admin(
        "PUT",
        "/v1/routes/real",
        Some(r#"{"path":"/real","respond":{"body":"real"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    let mut c = gw.connect();
    for _ in 0..3 {
        assert_eq!(
            c.roundtrip("GET /real HTTP/1.1\r\nHost: a\r\n\r\n").status,
            200
        );
    }
    // A request is counted as its answer is logged, just after it went out: waited for
    // (a full run under load once read 2).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = gw.admin("GET", "/metrics", None).body_str().to_owned();
        let counted = m.contains("gateway_requests_total{route=\"real\",class=\"2xx\"} 3");
        if counted || std::time::Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        m.contains("gateway_requests_total{route=\"real\",class=\"2xx\"} 3"),
        "{}",
        m.lines()
            .filter(|l| l.starts_with("gateway_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_config_over_a_mebibyte_can_still_be_put_back() {
    // Items are at most 1 MiB each, the whole config (PUT /v1/config, a batch) up to
    // 32 MiB: what GET returns can always be PUT back.
    let origin = Origin::echo();
    let gw = start(&origin);
    let body = "x".repeat(60_000);
    for i in 0..20 {
        let r = gw.admin(
            "PUT",
            &format!("/v1/routes/big-{i}"),
            Some(&format!(
                r#"{{"path":"/big/{i}","respond":{{"body":"{body}"}}}}"#
            )),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
    }
    let config = gw.admin("GET", "/v1/config", None);
    assert!(config.body.len() > 1024 * 1024, "{}", config.body.len());
    let r = gw.admin("PUT", "/v1/config", Some(config.body_str()));
    assert_eq!(r.status, 200, "{}", r.body_str());
}

#[test]
fn revisions_rollback_and_batches() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let r1 = revision(&gw);
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/a",
            Some(r#"{"path":"/a","respond":{"body":"a"}}"#)
        )
        .status,
        201
    );
    // A batch is all or nothing: a bad last operation leaves the first undone too.
    let bad = r#"{"operations":[{"op":"put","kind":"routes","id":"b","value":{"path":"/b","respond":{}}},{"op":"delete","kind":"routes","id":"missing"}]}"#;
    let p = problem(&gw.admin("POST", "/v1/config:batch", Some(bad)), 422);
    assert_eq!(p["pointer"], json!("/operations/1"), "{p}");
    problem(&gw.admin("GET", "/v1/routes/b", None), 404);
    let good = r#"{"operations":[{"op":"put","kind":"routes","id":"b","value":{"path":"/b","respond":{}}},{"op":"patch","kind":"routes","id":"a","value":{"respond":{"body":"a2"}}},{"op":"delete","kind":"routes","id":"health"}]}"#;
    let r = gw.admin("POST", "/v1/config:batch", Some(good));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let rev = r.json()["revision"].as_u64().unwrap();
    assert_eq!(rev, r1 + 2);
    let list = gw.admin("GET", "/v1/revisions", None).json();
    assert_eq!(list["current"], json!(rev));
    let numbers: Vec<u64> = list["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [r1, r1 + 1, r1 + 2]);
    let old = gw.admin("GET", &format!("/v1/revisions/{r1}"), None).json();
    assert_eq!(old["config"]["routes"][0]["id"], json!("health"));
    // Roll back to the first revision: a new revision with the old config.
    let r = gw.admin("POST", &format!("/v1/revisions/{r1}:rollback"), None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(r.json()["revision"], json!(rev + 1));
    let mut c = gw.connect();
    assert_eq!(
        c.roundtrip("GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
            .body_str(),
        "ok"
    );
    assert_eq!(
        c.roundtrip("GET /b HTTP/1.1\r\nHost: a\r\n\r\n").status,
        404
    );
    problem(&gw.admin("POST", "/v1/revisions/999:rollback", None), 404);
    // Digits only: `+1` is not another name of revision 1.
    problem(&gw.admin("GET", &format!("/v1/revisions/+{r1}"), None), 404);
    // A revision is read and its rollback POSTed: the other method is a 405 naming the
    // right one (not a 404, nor an `Allow` that lists the method just refused).
    let r = gw.admin("POST", &format!("/v1/revisions/{r1}"), None);
    problem(&r, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = gw.admin("GET", &format!("/v1/revisions/{r1}:rollback"), None);
    problem(&r, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    for (method, path, allow) in [
        ("PUT", format!("/v1/revisions/{r1}"), "GET, HEAD"),
        ("DELETE", format!("/v1/revisions/{r1}:rollback"), "POST"),
    ] {
        let r = gw.admin(method, &path, None);
        problem(&r, 405);
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    // What names nothing is a 404 whatever the method (before: 405 with an `Allow` listing
    // methods that all fail with 404); without the token, a 401 (before: 405).
    for (method, path) in [
        ("GET", "/v1/revisions/999:rollback"),
        ("DELETE", "/v1/revisions/999"),
        ("POST", "/v1/bogus"),
        ("POST", "/v1/bogus/x"),
        ("PUT", "/v1/routes/x/health"),
        ("PUT", "/v1/upstreams/nothing/health"),
    ] {
        let r = gw.admin(method, path, None);
        problem(&r, 404);
        assert_eq!(r.header("allow"), None, "{method} {path}");
    }
    let r = gw.admin_with("DELETE", "/v1/config", None, &[]);
    problem(&r, 401);
    problem(&gw.admin("DELETE", "/v1/config", None), 405);
    // What needs no token says 405 without one (the review found 401 asking for it).
    for path in ["/v1/health", "/ui", "/ui/app.js"] {
        let r = gw.admin_with("POST", path, Some("{}"), &[]);
        assert_eq!(
            (r.status, r.header("allow")),
            (405, Some("GET,HEAD")),
            "{path}"
        );
    }
    problem(&gw.admin_with("POST", "/ui/nope.js", Some("{}"), &[]), 404);
    // A path is read as the handlers read it: `%72outes` is `routes` (the review found 404).
    problem(&gw.admin("POST", "/v1/%72outes", None), 405);
    let status = gw.admin("GET", "/v1/status", None).json();
    assert_eq!(status["revision"], json!(rev + 1));
    assert_eq!(status["published_revision"], json!(rev + 1));
    assert_eq!(status["io_driver"], json!("io_uring"));
    assert_eq!(status["workers"], json!(1));
    assert_eq!(status["listeners"], json!([gw.addr.to_string()]));
}

#[test]
fn route_order_is_part_of_the_config_and_batches_keep_it() {
    let origin = Origin::echo();
    let gw = start(&origin);
    // Two routes of one path, for other methods: their order is part of the config.
    for (id, body) in [
        (
            "sa",
            r#"{"path":"/same","methods":["GET"],"respond":{"body":"A"}}"#,
        ),
        (
            "sb",
            r#"{"path":"/same","methods":["POST"],"respond":{"status":204}}"#,
        ),
    ] {
        let r = gw.admin("PUT", &format!("/v1/routes/{id}"), Some(body));
        assert_eq!(r.status, 201, "{}", r.body_str());
    }
    let order = || -> Vec<String> {
        let routes = gw.admin("GET", "/v1/routes", None).json();
        (routes["items"].as_array().unwrap().iter())
            .map(|x| x["id"].as_str().unwrap().to_owned())
            .filter(|id| id.starts_with('s'))
            .collect()
    };
    assert_eq!(order(), ["sa", "sb"]);
    // Within a path the first route in config order that takes the method is chosen: a
    // HEAD route after the GET one (which takes HEAD too) would never be.
    let p = problem(
        &gw.admin(
            "PUT",
            "/v1/routes/sc",
            Some(r#"{"path":"/same","methods":["HEAD"],"respond":{"status":204}}"#),
        ),
        422,
    );
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("could never be chosen"),
        "{p}"
    );
    let before = revision(&gw);
    // The same routes in the other order: a change (a revision), not "no change".
    let mut config = gw.admin("GET", "/v1/config", None).json();
    let routes = config["routes"].as_array_mut().unwrap();
    let (a, b) = (
        routes.iter().position(|r| r["id"] == "sa").unwrap(),
        routes.iter().position(|r| r["id"] == "sb").unwrap(),
    );
    routes.swap(a, b);
    let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(
        r.json()["changes"],
        json!([{"op": "reorder", "kind": "routes"}]),
        "{}",
        r.body_str()
    );
    assert_eq!(revision(&gw), before + 1);
    assert_eq!(order(), ["sb", "sa"]);
    // A rollback restores the order too.
    let r = gw.admin("POST", &format!("/v1/revisions/{before}:rollback"), None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(
        r.json()["changes"],
        json!([{"op": "reorder", "kind": "routes"}])
    );
    assert_eq!(order(), ["sa", "sb"]);

    // A batch: puts, a patch of an item put earlier in it, a delete and a put again of the
    // same id (which comes back at the end, as two separate writes would leave it), and a
    // put that replaces an item in place.
    let ops = json!({"operations": [
        {"op": "put", "kind": "consumers", "id": "c1", "value": {}},
        {"op": "put", "kind": "consumers", "id": "c2", "value": {}},
        {"op": "put", "kind": "consumers", "id": "c3", "value": {}},
        {"op": "patch", "kind": "consumers", "id": "c1", "value": {"policies": []}},
        {"op": "delete", "kind": "consumers", "id": "c1"},
        {"op": "put", "kind": "consumers", "id": "c1", "value": {}},
        {"op": "put", "kind": "routes", "id": "sa",
         "value": {"path": "/same", "methods": ["GET"], "respond": {"body": "A2"}}},
        {"op": "delete", "kind": "consumers", "id": "c2"},
    ]});
    let r = gw.admin("POST", "/v1/config:batch", Some(&ops.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let ids = |kind: &str| -> Vec<String> {
        gw.admin("GET", &format!("/v1/{kind}"), None).json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids("consumers"), ["c3", "c1"]);
    let routes = ids("routes");
    let (sa, sb) = (
        routes.iter().position(|x| x == "sa").unwrap(),
        routes.iter().position(|x| x == "sb").unwrap(),
    );
    assert!(sa < sb, "replaced in place: {routes:?}");
    let mut c = gw.connect();
    let r = c.roundtrip("GET /same HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.body_str(), "A2");
    // A patch or delete of an id the batch deleted fails, pointed at that operation.
    let ops = json!({"operations": [
        {"op": "delete", "kind": "consumers", "id": "c3"},
        {"op": "patch", "kind": "consumers", "id": "c3", "value": {}},
    ]});
    let p = problem(
        &gw.admin("POST", "/v1/config:batch", Some(&ops.to_string())),
        422,
    );
    assert_eq!(p["pointer"], json!("/operations/1"), "{p}");
}

/// Kills the gateway with SIGKILL and starts it again on its data directory alone.
fn kill_9_and_resume(mut gw: Gateway) -> Gateway {
    gw.signal(libc::SIGKILL);
    let status = gw
        .wait_exit_status(Duration::from_secs(5))
        .expect("killed gateway exits");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let data = gw.data_dir.clone();
    drop(gw);
    Gateway::resume(&data, Driver::IoUring)
}

#[test]
fn acknowledged_changes_survive_kill_9() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let r = gw.admin(
        "PUT",
        "/v1/routes/durable",
        Some(r#"{"path":"/durable","respond":{"body":"still here"}}"#),
    );
    assert_eq!(r.status, 201);
    // Restart on the data directory alone: the acknowledged change is there.
    let gw = kill_9_and_resume(gw);
    gw.wait_log("resuming config revision 2", Duration::from_secs(5));
    let mut c = gw.connect();
    assert_eq!(
        c.roundtrip("GET /durable HTTP/1.1\r\nHost: a\r\n\r\n")
            .body_str(),
        "still here"
    );
}

#[test]
fn a_rollback_keeps_the_settings_that_need_a_restart() {
    // Revision 2 through the API; then a restart with a file that changes `workers` (a
    // setting the running gateway cannot take) replaces it. Rolling back to revision 2
    // brings its routes back with today's workers (before: 422 "workers cannot change", so
    // no revision before such a restart could ever be rolled back to).
    let origin = Origin::echo();
    let gw = start(&origin);
    let (data, config) = (gw.data_dir.clone(), gw.config_path.clone());
    let route = r#"{"path":"/kept","respond":{"body":"kept"}}"#;
    assert_eq!(gw.admin("PUT", "/v1/routes/kept", Some(route)).status, 201);
    assert_eq!(revision(&gw), 2);
    drop(gw);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("workers = 1"), "{text}");
    std::fs::write(&config, text.replace("workers = 1", "workers = 2")).unwrap();
    let gw = Gateway::start_with_data(&config, &data, &["--replace-state"]);
    assert_eq!(revision(&gw), 3);
    problem(&gw.admin("GET", "/v1/routes/kept", None), 404);
    let r = gw.admin("POST", "/v1/revisions/2:rollback", None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let now = gw.admin("GET", "/v1/config", None).json();
    assert_eq!(now["workers"], 2, "{now}");
    let mut c = gw.connect();
    let answer = c.roundtrip("GET /kept HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(answer.body_str(), "kept");
    // A listener's settings that change at runtime are rolled back with the rest (its
    // address alone needs a restart): a redirect put on it goes again (the review found a
    // first version keeping today's listeners whole, redirect and all).
    let before = revision(&gw);
    let mut redirected = now.clone();
    redirected["listeners"][0]["redirect"] = json!({"scheme": "https"});
    let r = gw.admin("PUT", "/v1/config", Some(&redirected.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(
        gw.connect()
            .roundtrip("GET /kept HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        301
    );
    let r = gw.admin("POST", &format!("/v1/revisions/{before}:rollback"), None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let answer = gw
        .connect()
        .roundtrip("GET /kept HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((answer.status, answer.body_str()), (200, "kept"));
    // The same address spelled otherwise (a leading zero in the port) is the same listener:
    // its redirect comes back (the second review found the addresses compared as text).
    let kept = |gw: &Gateway| {
        (gw.connect())
            .roundtrip("GET /kept HTTP/1.1\r\nHost: a\r\n\r\n")
            .status
    };
    let mut respelled = now.clone();
    let address = now["listeners"][0]["address"].as_str().unwrap().to_owned();
    let (host, port) = address.rsplit_once(':').unwrap();
    respelled["listeners"][0]["address"] = json!(format!("{host}:0{port}"));
    respelled["listeners"][0]["redirect"] = json!({"scheme": "https"});
    let r = gw.admin("PUT", "/v1/config", Some(&respelled.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let redirected = revision(&gw);
    let r = gw.admin("PUT", "/v1/config", Some(&now.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(kept(&gw), 200);
    let r = gw.admin(
        "POST",
        &format!("/v1/revisions/{redirected}:rollback"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(kept(&gw), 301);
}

#[test]
fn a_rollback_gives_each_listener_at_an_address_its_own_settings_back() {
    // Two listeners on port 0 (a free port each), the first redirecting: rolled back, each
    // gets its own settings (the third review found the first one's copied onto both).
    let config = "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                  redirect = { scheme = \"https\" }\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
                  [[routes]]\nid = \"h\"\npath = \"/h\"\nrespond = { body = \"ok\" }\n";
    let gw = Gateway::start(config, Driver::IoUring);
    let r = gw.admin("PUT", "/v1/routes/x", Some(r#"{"path":"/x","respond":{}}"#));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let r = gw.admin("POST", "/v1/revisions/1:rollback", None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let status = |i: usize| {
        Client::connect(gw.listeners[i])
            .roundtrip("GET /h HTTP/1.1\r\nHost: a\r\n\r\n")
            .status
    };
    assert_eq!((status(0), status(1)), (301, 200));
}

#[test]
fn config_file_over_stored_state_resumes_applies_or_needs_replace_state() {
    // As a service manager starts it: the same `--config` every time.
    let origin = Origin::echo();
    let gw = start(&origin);
    let (data, config) = (gw.data_dir.clone(), gw.config_path.clone());
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/kept",
            Some(r#"{"path":"/kept","respond":{}}"#)
        )
        .status,
        201
    );
    drop(gw);
    // The file unchanged since it was applied: the stored config is resumed, with the
    // change made through the API. (Before, every start with --config over a data
    // directory was refused, exit 2: a systemd restart of deploy/gateway.service failed.)
    let gw = Gateway::start_with_data(&config, &data, &[]);
    gw.wait_log("is unchanged since revision 1", Duration::from_secs(5));
    assert_eq!(revision(&gw), 2);
    assert_eq!(gw.admin("GET", "/v1/routes/kept", None).status, 200);
    // Past the 100 revisions the history keeps (the review found a start refused then).
    for i in 0..101 {
        let body = format!(r#"{{"path":"/kept","respond":{{"body":"{i}"}}}}"#);
        assert_eq!(gw.admin("PUT", "/v1/routes/kept", Some(&body)).status, 200);
    }
    drop(gw);
    let gw = Gateway::start_with_data(&config, &data, &[]);
    gw.wait_log("is unchanged since revision 1", Duration::from_secs(5));
    assert_eq!(revision(&gw), 103);
    drop(gw);
    // The file changed too: neither side wins silently.
    let edited = |extra: &str| {
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}{extra}")).unwrap();
    };
    edited("\n[[routes]]\nid = \"filed\"\npath = \"/filed\"\nrespond = {}\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("revisions 2 to 103"), "{stderr}");
    assert!(stderr.contains("--replace-state"), "{stderr}");
    let gw = Gateway::start_with_data(&config, &data, &["--replace-state"]);
    gw.wait_log(
        "replaced the stored config as revision 104",
        Duration::from_secs(5),
    );
    problem(&gw.admin("GET", "/v1/routes/kept", None), 404);
    drop(gw);
    // Changed again with nothing changed through the API since: the file is applied.
    edited("\n[[routes]]\nid = \"filed-2\"\npath = \"/filed-2\"\nrespond = {}\n");
    let gw = Gateway::start_with_data(&config, &data, &[]);
    gw.wait_log(
        "nothing was changed through the admin API since: it is revision 105",
        Duration::from_secs(5),
    );
    assert_eq!(gw.admin("GET", "/v1/routes/filed-2", None).status, 200);
    // Changed again and applied with SIGHUP: a restart with it resumes.
    edited("\n[[routes]]\nid = \"filed-3\"\npath = \"/filed-3\"\nrespond = {}\n");
    gw.signal(libc::SIGHUP);
    gw.wait_log("(revision 106)", Duration::from_secs(5));
    drop(gw);
    let gw = Gateway::start_with_data(&config, &data, &[]);
    gw.wait_log("is unchanged since revision 106", Duration::from_secs(5));
    assert_eq!(revision(&gw), 106);
    // A change through the API, then a restart on a directory without the record (as one an
    // earlier build kept): the file is compared with the revision it made last, and resumes.
    // (The second review found such a restart refused.)
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/api",
            Some(r#"{"path":"/api","respond":{}}"#)
        )
        .status,
        201
    );
    drop(gw);
    std::fs::remove_file(data.join("applied-file")).unwrap();
    let gw = Gateway::start_with_data(&config, &data, &[]);
    gw.wait_log("is unchanged since revision 106", Duration::from_secs(5));
    assert_eq!(revision(&gw), 107);
    assert_eq!(gw.admin("GET", "/v1/routes/api", None).status, 200);
    // A file that is not UTF-8 is refused by SIGHUP as by a start (before, read with its
    // bytes replaced, and recorded as taken).
    let mut bytes = std::fs::read(&config).unwrap();
    bytes.extend_from_slice(
        b"\n[[routes]]\nid = \"latin\"\npath = \"/l\"\nrespond = { body = \"caf\xe9\" }\n",
    );
    std::fs::write(&config, bytes).unwrap();
    gw.signal(libc::SIGHUP);
    gw.wait_log("not UTF-8", Duration::from_secs(5));
    assert_eq!(revision(&gw), 107);
}

#[test]
fn a_second_gateway_on_one_data_directory_is_refused() {
    // Before, it started (with --replace-state it even committed a revision into the
    // running one's journal) and failed only at its listeners: the running one's next
    // acknowledged write was lost at its restart.
    let origin = Origin::echo();
    let gw = start(&origin);
    // Another gateway started on the running one's files: refused (exit 1); what it said.
    let refused = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&gw.config_path)
            .arg("--data-dir")
            .arg(&gw.data_dir)
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for extra in [&[][..], &["--replace-state"][..]] {
        let stderr = refused(extra);
        let holder = format!("in use by the gateway with pid {}", gw.pid());
        assert!(stderr.contains(&holder), "{stderr}");
    }
    // A pid in the lock that has exited (a binary upgrade's successor that died while the
    // process it took over from drains, holding the lock) is not named as the holder.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    std::fs::write(gw.data_dir.join("lock"), format!("{dead}\n")).unwrap();
    let stderr = refused(&[]);
    assert!(
        stderr.contains(&format!("pid {dead}, which took it last, has exited")),
        "{stderr}"
    );
    std::fs::write(gw.data_dir.join("lock"), format!("{}\n", gw.pid())).unwrap();
    // The running one goes on, its journal its own.
    assert_eq!(revision(&gw), 1);
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/r2",
            Some(r#"{"path":"/r2","respond":{}}"#)
        )
        .status,
        201
    );
    assert_eq!(revision(&gw), 2);
    assert_eq!(gw.admin("GET", "/v1/revisions/2", None).status, 200);
}

#[test]
fn generated_token_is_private_and_public_admin_needs_a_configured_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("token");
    let config = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let path = dir.join("g.toml");
    std::fs::write(&path, config).unwrap();
    let gw = Gateway::start_with_data(&path, &dir.join("data"), &[]);
    let token_file = dir.join("data/admin-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.len() >= 32);
    let ok = gw.admin_with(
        "GET",
        "/v1/status",
        None,
        &[("Authorization", &format!("Bearer {token}"))],
    );
    assert_eq!(ok.status, 200);
    drop(gw);
    let public = dir.join("public.toml");
    std::fs::write(
        &public,
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:0\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&public)
        .arg("--data-dir")
        .arg(dir.join("data2"))
        .env_remove("GATEWAY_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn five_hundred_route_changes_under_traffic_fail_no_request() {
    let origin = Origin::echo();
    let gw = Arc::new(start(&origin));
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/api",
            Some(r#"{"path_prefix":"/api","upstream":"origin"}"#)
        )
        .status,
        201
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let client = {
        let (gw, stop, ok, failed) = (gw.clone(), stop.clone(), ok.clone(), failed.clone());
        thread::spawn(move || {
            let mut c = gw.connect();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let r = c.roundtrip("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n");
                if r.status == 200 && r.body_str() == "origin saw /api/x" {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let t0 = std::time::Instant::now();
    for i in 0..500 {
        let body = format!(r#"{{"path":"/churn","respond":{{"body":"{i}"}}}}"#);
        assert!(matches!(
            gw.admin("PUT", "/v1/routes/churn", Some(&body)).status,
            200 | 201
        ));
    }
    eprintln!(
        "500 changes in {:?}, {} requests",
        t0.elapsed(),
        ok.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "only {} requests ran",
        ok.load(Ordering::Relaxed)
    );
    let mut c = gw.connect();
    assert_eq!(
        c.roundtrip("GET /churn HTTP/1.1\r\nHost: a\r\n\r\n")
            .body_str(),
        "499"
    );
}

#[test]
fn metrics_count_requests_by_route_and_class() {
    let origin = Origin::echo();
    let gw = start(&origin);
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/api",
            Some(r#"{"path_prefix":"/api","upstream":"origin"}"#)
        )
        .status,
        201
    );
    let dead = closed_port();
    let body = format!(r#"{{"targets":[{{"address":"{dead}"}}]}}"#);
    assert_eq!(
        gw.admin("PUT", "/v1/upstreams/dead", Some(&body)).status,
        201
    );
    assert_eq!(
        gw.admin(
            "PUT",
            "/v1/routes/dead",
            Some(r#"{"path":"/dead","upstream":"dead"}"#)
        )
        .status,
        201
    );
    let mut c = gw.connect();
    for _ in 0..3 {
        assert_eq!(
            c.roundtrip("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").status,
            200
        );
    }
    assert_eq!(
        c.roundtrip("GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        200
    );
    assert_eq!(
        c.roundtrip("GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        404
    );
    assert_eq!(
        gw.connect()
            .roundtrip("GET /dead HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        502
    );
    // A worker counts a request right after its response is written, so a scrape may briefly
    // lag the client: scrape until every expected line is there.
    let expected = [
        "gateway_requests_total{route=\"api\",class=\"2xx\"} 3",
        "gateway_requests_total{route=\"health\",class=\"2xx\"} 1",
        "gateway_requests_total{route=\"(none)\",class=\"4xx\"} 1",
        "gateway_requests_total{route=\"dead\",class=\"5xx\"} 1",
        "gateway_errors_total{side=\"upstream\",kind=\"connect_failed\"} 1",
        "gateway_errors_total{side=\"gateway\",kind=\"no_route\"} 1",
        "gateway_request_duration_seconds_count 6",
        "gateway_upstream_response_duration_seconds_count 3",
        "gateway_config_revision 4",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let r = gw.admin("GET", "/metrics", None);
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let text = r.body_str().to_owned();
        let missing: Vec<&&str> = expected
            .iter()
            .filter(|l| !text.lines().any(|t| t == **l))
            .collect();
        if missing.is_empty() {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing {missing:?} in:\n{text}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    // The open keep-alive connection is counted (it may also be parked between requests).
    assert!(text.contains("gateway_open_connections "), "{text}");
}

#[test]
fn openapi_document_is_served() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let r = gw.admin("GET", "/v1/openapi.json", None);
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("application/json"))
    );
    let doc = r.json();
    assert_eq!(doc["openapi"], json!("3.0.3"));
    assert!(doc["paths"]["/v1/routes/{id}"]["patch"].is_object());
    assert!(doc["paths"]["/v1/upstreams/{id}"]["delete"].is_object());
}

#[test]
fn kill_9_during_a_burst_of_changes_keeps_every_acknowledged_one() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let admin = gw.admin;
    let acked = Arc::new(AtomicUsize::new(0));
    let writer = {
        let acked = acked.clone();
        thread::spawn(move || {
            for i in 1..=2000usize {
                let body = format!(r#"{{"path":"/burst","respond":{{"body":"{i}"}}}}"#);
                let req = format!(
                    "PUT /v1/routes/burst HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let Ok(mut s) = std::net::TcpStream::connect(admin) else {
                    return;
                };
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if s.write_all(req.as_bytes()).is_err() {
                    return;
                }
                let mut resp = Vec::new();
                let _ = s.read_to_end(&mut resp);
                if resp.starts_with(b"HTTP/1.1 200") || resp.starts_with(b"HTTP/1.1 201") {
                    acked.store(i, Ordering::SeqCst);
                } else {
                    return;
                }
            }
        })
    };
    // Let some changes through, then kill the gateway in the middle of the burst.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acked.load(Ordering::SeqCst) < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "changes are not being acknowledged"
        );
        thread::sleep(Duration::from_millis(2));
    }
    let gw = kill_9_and_resume(gw);
    writer.join().unwrap();
    let last_acked = acked.load(Ordering::SeqCst);
    // The stored config loads, and holds the last acknowledged change or a later one (a change
    // can be durable and then lose its answer to the kill, never the reverse).
    let body = gw
        .connect()
        .roundtrip("GET /burst HTTP/1.1\r\nHost: a\r\n\r\n")
        .body_str()
        .to_owned();
    let stored: usize = body
        .parse()
        .unwrap_or_else(|_| panic!("unexpected body {body:?}"));
    assert!(
        stored >= last_acked,
        "stored {stored} < last acknowledged {last_acked}"
    );
    assert!(
        stored <= last_acked + 1,
        "stored {stored} was never sent after {last_acked}"
    );
}

#[test]
fn clients_that_never_finish_a_request_cannot_take_every_descriptor() {
    // The admin port is reachable before the token is checked: 300 connections that each
    // send half a request line and then nothing. The API takes at most 256 of them (the rest
    // wait in the listen backlog) and the data plane keeps its descriptors.
    let origin = Origin::echo();
    let gw = start(&origin);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut s = std::net::TcpStream::connect(gw.admin).unwrap();
        std::io::Write::write_all(&mut s, b"GET /v1/health HTTP/1.1\r\n").unwrap();
        held.push(s);
    }
    // Until the count has not moved for half a second: the accepts are asynchronous.
    let (mut last, mut still) = (0, 0);
    for _ in 0..200 {
        thread::sleep(Duration::from_millis(50));
        let now = fds();
        (last, still) = (now, if now == last { still + 1 } else { 0 });
        if still == 10 {
            break;
        }
    }
    let taken = last - before;
    assert!(
        (200..=260).contains(&taken),
        "{taken} descriptors for 300 connections"
    );
    let r = gw
        .connect()
        .roundtrip("GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    // Once they leave, the API answers again.
    drop(held);
    assert_eq!(gw.admin("GET", "/v1/status", None).status, 200);
}

#[test]
fn a_body_declared_too_large_is_refused_before_it_is_sent() {
    let origin = Origin::echo();
    let gw = start(&origin);
    let mut s = std::net::TcpStream::connect(gw.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "PUT /v1/routes/r HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 99999999999\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
    // 413 at once: no `100 Continue` first, and no wait for the body.
    let mut got = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut got).unwrap();
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
}

#[test]
fn the_live_streams_total_counts_requests_no_route_matched() {
    // 20 requests for a path no route has (404) and 5 for /health while a 2-second stream
    // runs: the stream's total counts all 25, its route line the 5. Before, the total was
    // the sum of the listed routes only (5).
    let origin = Origin::echo();
    let gw = start(&origin);
    let lines = thread::scope(|s| {
        let stream = s.spawn(|| gw.admin("GET", "/v1/stream?seconds=2", None));
        // The stream counts from its start; its first line comes a second later.
        thread::sleep(Duration::from_millis(300));
        let mut c = gw.connect();
        for i in 0..25 {
            let path = if i < 20 { "/nowhere" } else { "/health" };
            let r = c.roundtrip(&format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n"));
            assert_eq!(r.status, if i < 20 { 404 } else { 200 });
        }
        stream.join().unwrap()
    });
    assert_eq!(lines.status, 200);
    let lines: Vec<Value> = lines
        .body_str()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Two lines, each covering about a second (before: a first line at once, all zeros).
    assert_eq!(lines.len(), 2, "{lines:?}");
    let sum = |f: &dyn Fn(&Value) -> f64| lines.iter().map(f).sum::<f64>();
    let total = sum(&|l| l["total"]["rps"].as_f64().unwrap());
    let health = sum(&|l| l["routes"][0]["rps"].as_f64().unwrap());
    assert!((23.5..=25.5).contains(&total), "{total}: {lines:?}");
    assert!((4.5..=5.5).contains(&health), "{health}: {lines:?}");
}
