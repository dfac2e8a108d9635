//! Config parsing, validation and routing tests.

use super::*;

/// The minimal file from the data-plane issue: must work unchanged.
const ISSUE_EXAMPLE: &str = r#"
workers = 1                      # optional; default: the CPUs this process may run on

[[listeners]]
address = "127.0.0.1:8080"

[[upstreams]]
id = "backend"
targets = [{ address = "127.0.0.1:9001", weight = 1 }]   # weight optional

[[routes]]
id = "all"
path_prefix = "/"                # or: path = "/exact"
hosts = ["api.example.com", "*.example.com"]   # optional
methods = ["GET", "POST"]        # optional
strip_prefix = false             # optional
upstream = "backend"
"#;

fn compile(text: &str) -> Result<Snapshot, ConfigError> {
    Snapshot::compile(parse_config(text, Format::detect(None, text))?, 1)
}

fn route_id<'a>(s: &'a Snapshot, host: Option<&str>, path: &str, method: &str) -> Option<&'a str> {
    s.router
        .find(host.map(str::as_bytes), path.as_bytes(), |id| {
            s.routes[id as usize].accepts(method.as_bytes())
        })
        .map(|id| &*s.routes[id as usize].id)
}

#[test]
fn issue_example_compiles() {
    let s = compile(ISSUE_EXAMPLE).unwrap();
    assert_eq!(s.workers, Some(1));
    assert_eq!(s.listeners, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(
        route_id(&s, Some("api.example.com"), "/x", "GET"),
        Some("all")
    );
    assert_eq!(
        route_id(&s, Some("a.b.example.com:80"), "/", "POST"),
        Some("all")
    );
    assert_eq!(route_id(&s, Some("example.com"), "/", "GET"), None);
    assert_eq!(route_id(&s, Some("api.example.com"), "/", "DELETE"), None);
}

#[test]
fn default_config_compiles_and_answers() {
    let s = compile(DEFAULT_CONFIG).unwrap();
    assert_eq!(route_id(&s, None, "/health", "GET"), Some("health"));
    assert_eq!(route_id(&s, Some("x"), "/anything", "POST"), Some("hello"));
}

#[test]
fn bodies_are_copied_unless_splicing_is_asked_for() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    assert!(!compile(base).unwrap().splice);
    assert!(
        compile(&format!("{base}[relay]\nsplice = true\n"))
            .unwrap()
            .splice
    );
    let e = err(&format!("{base}[relay]\nsplice = \"yes\"\n"));
    assert!(e.to_string().contains("splice"), "{e}");
}

#[test]
fn json_is_accepted_too() {
    let json = r#"{"listeners":[{"address":"127.0.0.1:0"}],
        "routes":[{"id":"r","path":"/x","respond":{"body":"hi"}}]}"#;
    let s = compile(json).unwrap();
    assert_eq!(route_id(&s, None, "/x", "GET"), Some("r"));
}

#[test]
fn route_precedence_is_host_then_path_then_method() {
    let s = compile(
        r#"
[[listeners]]
address = "127.0.0.1:0"
[[routes]]
id = "any-prefix"
path_prefix = "/"
respond = {}
[[routes]]
id = "any-api"
path_prefix = "/api"
respond = {}
[[routes]]
id = "wild"
path_prefix = "/"
hosts = ["*.example.com"]
respond = {}
[[routes]]
id = "wild-longer"
path_prefix = "/"
hosts = ["*.eu.example.com"]
respond = {}
[[routes]]
id = "exact-host"
path_prefix = "/"
hosts = ["api.example.com"]
methods = ["GET"]
respond = {}
[[routes]]
id = "exact-path"
path = "/api/status"
respond = {}
[[routes]]
id = "post-only"
path = "/api/items"
methods = ["POST"]
respond = {}
"#,
    )
    .unwrap();
    assert_eq!(
        route_id(&s, Some("api.example.com"), "/api", "GET"),
        Some("exact-host")
    );
    // The exact host does not take DELETE, so the wildcard host is next.
    assert_eq!(
        route_id(&s, Some("api.example.com"), "/api", "DELETE"),
        Some("wild")
    );
    assert_eq!(
        route_id(&s, Some("x.eu.example.com"), "/", "GET"),
        Some("wild-longer")
    );
    assert_eq!(
        route_id(&s, Some("other"), "/api/status", "GET"),
        Some("exact-path")
    );
    assert_eq!(
        route_id(&s, Some("other"), "/api/v1", "GET"),
        Some("any-api")
    );
    assert_eq!(
        route_id(&s, Some("other"), "/apiv1", "GET"),
        Some("any-prefix")
    );
    assert_eq!(route_id(&s, None, "/api/items", "POST"), Some("post-only"));
    assert_eq!(route_id(&s, None, "/api/items", "GET"), Some("any-api"));
}

fn err(text: &str) -> ConfigError {
    compile(text).unwrap_err()
}

#[test]
fn errors_name_the_field() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    let e = err(&format!(
        "{base}[[routes]]\nid = \"r\"\npath = \"/\"\nupstream = \"nope\"\n"
    ));
    assert_eq!(e.path(), "routes[0].upstream");
    assert!(e.to_string().contains("unknown upstream \"nope\""), "{e}");

    let e = err(&format!(
        "{base}[[routes]]\nid = \"r\"\npath = \"/\"\nupstrem = \"x\"\n"
    ));
    assert_eq!(e.path(), "routes[0].upstrem");
    assert!(e.to_string().contains("unknown field `upstrem`"), "{e}");

    let e = err("[[listeners]]\naddress = \"localhost\"\n");
    assert_eq!(e.path(), "listeners[0].address");

    let e = err(&format!(
        "{base}[[upstreams]]\nid = \"u\"\ntargets = [{{ address = \"127.0.0.1:1\", weight = 0 }}]\n"
    ));
    assert_eq!(e.path(), "upstreams[0].targets[0].weight");

    let e = err(&format!("{base}[limits]\nmax_header_count = 1000\n"));
    assert_eq!(e.path(), "limits.max_header_count");

    let e = err(&format!("{base}[limits]\nmax_connections = 0\n"));
    assert_eq!(e.path(), "limits.max_connections");

    let e = err(&format!("{base}[timeouts]\nclient_header_ms = 0\n"));
    assert_eq!(e.path(), "timeouts.client_header_ms");

    let e = err(&format!("workers = \"two\"\n{base}"));
    assert_eq!(e.path(), "workers");

    let servers = ["\"127.0.0.1\""; 9].join(", ");
    let e = err(&format!("{base}[resolver]\nnameservers = [{servers}]\n"));
    assert_eq!(e.path(), "resolver.nameservers");
    assert!(e.to_string().contains("at most 8"), "{e}");

    let e = err("listeners = []\n");
    assert_eq!(e.path(), "listeners");

    let e = err(&format!(
        "{base}[[routes]]\nid = \"a\"\npath = \"/x\"\nrespond = {{}}\n[[routes]]\nid = \"b\"\npath = \"/x\"\nrespond = {{}}\n"
    ));
    assert_eq!(e.path(), "routes[1]");
    assert!(e.to_string().contains("routes[0]"), "{e}");

    // Shadowing is by path, host (any case) and method; the first route shadowed is named.
    let route = |id: &str, path: &str, hosts: &str, methods: &str| {
        format!(
            "[[routes]]\nid = \"{id}\"\npath = \"{path}\"\nhosts = [{hosts}]\n\
             methods = [{methods}]\nrespond = {{}}\n"
        )
    };
    let table = [
        route("a", "/x/{id}", "\"a.com\"", "\"GET\""),
        route("b", "/x/{id}", "\"b.com\"", ""),
        route("c", "/x/{id}", "\"c.com\"", "\"POST\""),
        // Another host, another method, a path that differs: no clash.
        route("d", "/x/{id}", "\"d.com\"", ""),
        route("e", "/x/{id}", "\"a.com\"", "\"PUT\""),
        route("f", "/x/{id}/y", "\"a.com\"", "\"GET\""),
    ]
    .concat();
    assert!(compile(&format!("{base}{table}")).is_ok());
    let late = route("g", "/x/{sku}", "\"C.COM\", \"B.com\"", "\"POST\"");
    let e = err(&format!("{base}{table}{late}"));
    assert_eq!(e.path(), "routes[6]");
    assert!(e.to_string().contains("routes[1] (\"b\")"), "{e}");
    let late = route("g", "/x/{sku}", "\"c.com\", \"a.com\"", "\"POST\", \"GET\"");
    assert!(err(&format!("{base}{table}{late}"))
        .to_string()
        .contains("routes[0] (\"a\")"));
    // Without hosts, only routes without hosts are in the way.
    let bare = "[[routes]]\nid = \"h\"\npath = \"/x/{n}\"\nrespond = {}\n";
    assert!(compile(&format!("{base}{table}{bare}")).is_ok());
    let e = err(&format!(
        "{base}{table}{bare}{}",
        bare.replace("\"h\"", "\"i\"")
    ));
    assert!(e.to_string().contains("routes[6] (\"h\")"), "{e}");
    // What a route takes, not only what it names: no `methods` takes all but TRACE, so a
    // TRACE route beside it is reachable; GET takes HEAD, so a HEAD route after a GET one is
    // never chosen (before it, it answers HEAD); `a.com.` is `a.com` (before: the first
    // refused, the others taken).
    let two = |a: String, b: String| format!("{base}{a}{b}");
    for (a, b) in [
        (route("p", "/t", "", ""), route("q", "/t", "", "\"TRACE\"")),
        (route("p", "/t", "", "\"TRACE\""), route("q", "/t", "", "")),
        (
            route("p", "/t", "", "\"HEAD\""),
            route("q", "/t", "", "\"GET\""),
        ),
    ] {
        let text = two(a, b);
        assert!(compile(&text).is_ok(), "{text}");
    }
    for (a, b) in [
        (
            route("p", "/t", "", "\"GET\""),
            route("q", "/t", "", "\"HEAD\""),
        ),
        (
            route("p", "/t", "", "\"GET\", \"POST\""),
            route("q", "/t", "", "\"HEAD\""),
        ),
        (
            route("p", "/t", "\"a.com\"", ""),
            route("q", "/t", "\"A.com.\"", ""),
        ),
    ] {
        let text = two(a, b);
        assert_eq!(err(&text).path(), "routes[1]", "{text}");
        // A config stored by an earlier build that took it still starts, noting it.
        let stored = parse_config(&text, Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    // A parametrised path's segments are bounded (the lookup walks them recursively).
    let deep = format!("/{{id}}{}", "/a".repeat(63));
    assert!(compile(&format!("{base}{}", route("r", &deep, "", ""))).is_ok());
    let e = err(&format!(
        "{base}{}",
        route("r", &format!("{deep}/a"), "", "")
    ));
    assert_eq!(e.path(), "routes[0].path");
    assert!(e.to_string().contains("at most 64 segments"), "{e}");

    let e = err(&format!(
        "{base}[[routes]]\nid = \"a\"\npath = \"/x\"\nhosts = [\"bad host\"]\nrespond = {{}}\n"
    ));
    assert_eq!(e.path(), "routes[0].hosts[0]");
    let e = err(&format!(
        "{base}[[routes]]\nid = \"a\"\npath = \"/x\"\nhosts = [\"[not an ipv6\\r\\n]\"]\nrespond = {{}}\n"
    ));
    assert_eq!(e.path(), "routes[0].hosts[0]");

    // Sockets that cannot both be bound: a wildcard takes its port for every address of
    // its family (listeners are IPv6-only, so IPv4 and IPv6 do not meet).
    let e = err("[[listeners]]\naddress = \"0.0.0.0:23085\"\n[[listeners]]\naddress = \"127.0.0.1:23085\"\n");
    assert_eq!(e.path(), "listeners[1].address");
    let e =
        err("[[listeners]]\naddress = \"0.0.0.0:23085\"\n[admin]\nlisten = \"127.0.0.1:23085\"\n");
    assert_eq!(e.path(), "admin.listen");
    assert!(compile("[[listeners]]\naddress = \"0.0.0.0:23085\"\n[[listeners]]\naddress = \"[::]:23085\"\n[[listeners]]\naddress = \"127.0.0.1:23086\"\n").is_ok());
}

#[test]
fn smooth_weighted_round_robin_interleaves() {
    let s = compile(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\ntargets = [\
         { address = \"127.0.0.1:1\", weight = 5 }, { address = \"127.0.0.1:2\" }, \
         { address = \"127.0.0.1:3\" }]\n",
    )
    .unwrap();
    assert_eq!(
        &*s.upstreams[0].live.set.load().schedule,
        &[0, 0, 1, 0, 2, 0, 0]
    );
}

#[test]
fn strip_prefix_length_ignores_trailing_slash() {
    let s = compile(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
         targets = [{ address = \"127.0.0.1:1\" }]\n[[routes]]\nid = \"r\"\n\
         path_prefix = \"/api/\"\nstrip_prefix = true\nupstream = \"u\"\n",
    )
    .unwrap();
    assert_eq!(s.routes[0].strip_prefix_len, 4);
}

const POLICY_BASE: &str = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n[[upstreams]]\nid = \"orders\"\ntargets = [{ address = \"127.0.0.1:9001\" }]\n";

fn invalid_at(extra: &str) -> String {
    match compile(&format!("{POLICY_BASE}{extra}")) {
        Err(e) => e.path().to_owned(),
        Ok(_) => panic!("accepted: {extra}"),
    }
}

#[test]
fn a_routes_own_cors_policy_replaces_a_global_one_and_two_are_refused() {
    let cors =
        |id: &str| format!("[[policies]]\nid = \"{id}\"\nkind = \"cors\"\norigins = [\"*\"]\n");
    let text = format!(
        "global_policies = [\"g\"]\n{POLICY_BASE}{}{}{}\
         [[routes]]\nid = \"own\"\npath = \"/own\"\nupstream = \"orders\"\npolicies = [\"r\"]\n\
         [[routes]]\nid = \"plain\"\npath = \"/plain\"\nupstream = \"orders\"\n",
        cors("g"),
        cors("r"),
        cors("r2")
    );
    let s = compile(&text).unwrap();
    let ids = |i: usize| -> Vec<&str> {
        s.routes[i]
            .policies
            .iter()
            .map(|&p| &*s.policies.list[p as usize].id)
            .collect()
    };
    assert_eq!(ids(0), ["r"]);
    assert_eq!(ids(1), ["g"]);
    let twice = text.replace("policies = [\"r\"]", "policies = [\"r\", \"r2\"]");
    assert_eq!(
        compile(&twice)
            .err()
            .map(|e| e.path().to_owned())
            .as_deref(),
        Some("routes[0].policies[1]")
    );
    let globals = text.replace(
        "global_policies = [\"g\"]",
        "global_policies = [\"g\", \"r2\"]",
    );
    assert_eq!(
        compile(&globals)
            .err()
            .map(|e| e.path().to_owned())
            .as_deref(),
        Some("global_policies[1]")
    );
}

#[test]
fn policies_run_in_stage_order_with_global_ones() {
    let text = format!(
        "global_policies = [\"limit\"]\n{POLICY_BASE}\
         [[consumers]]\nid = \"app\"\n\
         [[credentials]]\nid = \"k\"\nconsumer = \"app\"\nkind = \"api_key\"\nkey = \"0123456789\"\n\
         [[policies]]\nid = \"limit\"\nkind = \"rate_limit\"\nrate = 10\n\
         [[policies]]\nid = \"keys\"\nkind = \"api_key\"\n\
         [[policies]]\nid = \"ips\"\nkind = \"ip_filter\"\nallow = [\"10.0.0.0/8\"]\n\
         [[routes]]\nid = \"r\"\npath_prefix = \"/\"\nupstream = \"orders\"\npolicies = [\"keys\", \"ips\"]\n"
    );
    let s = compile(&text).unwrap();
    let ids: Vec<&str> = s.routes[0]
        .policies
        .iter()
        .map(|&i| &*s.policies.list[i as usize].id)
        .collect();
    assert_eq!(ids, ["ips", "keys", "limit"]);
    // The key is replaced by its hash in the compiled (stored) config.
    let c = &s.config.credentials[0];
    assert!(c.key.is_none());
    assert_eq!(
        c.key_sha256.as_deref(),
        Some("84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882")
    );
}

#[test]
fn invalid_policies_name_the_field() {
    let route = "[[routes]]\nid = \"r\"\npath = \"/\"\nupstream = \"orders\"\n";
    assert_eq!(
        invalid_at("[[policies]]\nid = \"p\"\nkind = \"ip_filter\"\nallow = [\"10.0.0.0/33\"]\n"),
        "policies[0].allow[0]"
    );
    assert_eq!(
        invalid_at("[[credentials]]\nid = \"k\"\nconsumer = \"ghost\"\nkind = \"api_key\"\nkey = \"0123456789\"\n"),
        "credentials[0].consumer"
    );
    assert_eq!(
        invalid_at("[[consumers]]\nid = \"a\"\n[[credentials]]\nid = \"k\"\nconsumer = \"a\"\nkind = \"api_key\"\n"),
        "credentials[0].key"
    );
    assert_eq!(
        invalid_at(&format!("{route}policies = [\"ghost\"]\n")),
        "routes[0].policies[0]"
    );
    assert_eq!(
        invalid_at("[[policies]]\nid = \"p\"\nkind = \"rate_limit\"\nrate = 5\nkey = \"cookie\"\n"),
        "policies[0].key"
    );
    assert_eq!(
        invalid_at(
            "[[policies]]\nid = \"p\"\nkind = \"jwt\"\nalgorithm = \"HS256\"\nsecret = \"short\"\n"
        ),
        "policies[0].secret"
    );
    assert_eq!(
        invalid_at("[[policies]]\nid = \"p\"\nkind = \"cors\"\norigins = [\"*\"]\nallow_credentials = true\n"),
        "policies[0].allow_credentials"
    );
    assert_eq!(
        invalid_at(
            "[[policies]]\nid = \"p\"\nkind = \"domain\"\nhosts = [\"a.example\"]\nstatus = 404\n"
        ),
        "policies[0].status"
    );
    assert_eq!(
        invalid_at("[[policies]]\nid = \"p\"\nkind = \"ip_filter\"\nallow = [\"10.0.0.0/8\"]\n[[consumers]]\nid = \"a\"\npolicies = [\"p\"]\n"),
        "consumers[0].policies[0]"
    );
    assert_eq!(
        invalid_at(&format!("[[consumers]]\nid = \"a\"\n[[policies]]\nid = \"p\"\nkind = \"acl\"\nconsumers = [\"a\"]\n{route}policies = [\"p\"]\n")),
        "routes[0].policies"
    );
    // A consumer's rate limit with one bucket for the policy: every consumer listing it
    // would share one quota (before: taken; one consumer's requests refused another's).
    let limited = |key: &str| {
        format!(
            "{POLICY_BASE}[[policies]]\nid = \"p\"\nkind = \"rate_limit\"\nrate = 2\n{key}\
             [[consumers]]\nid = \"a\"\npolicies = [\"p\"]\n\
             [[consumers]]\nid = \"b\"\npolicies = [\"p\"]\n"
        )
    };
    // One consumer alone may have its own quota so.
    compile(&format!(
        "{POLICY_BASE}[[policies]]\nid = \"p\"\nkind = \"rate_limit\"\nrate = 2\n\
         [[consumers]]\nid = \"a\"\npolicies = [\"p\"]\n"
    ))
    .unwrap();
    for key in ["", "key = \"route\"\n"] {
        let e = compile(&limited(key)).unwrap_err();
        assert_eq!(e.path(), "consumers[0].policies[0]", "{e}");
        assert!(e.to_string().contains("key = \"consumer\""), "{e}");
        // A config stored by an earlier build that took it still starts, noting it.
        let stored = parse_config(&limited(key), Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
        assert_eq!(notes.len(), 2, "one for each consumer: {notes:?}");
    }
    for key in ["consumer", "client_ip", "header:x-tier"] {
        compile(&limited(&format!("key = \"{key}\"\n"))).unwrap();
    }
    // burst * (1 hour / 1) overflows the bucket's nanosecond counter.
    assert_eq!(
        invalid_at("[[policies]]\nid = \"p\"\nkind = \"rate_limit\"\nrate = 1\nper = \"hour\"\nburst = 10000000\n"),
        "policies[0].burst"
    );
    for reserved in [
        "Content-Length",
        "host",
        "Transfer-Encoding",
        "X-Forwarded-For",
    ] {
        assert_eq!(
            invalid_at(&format!(
                "[[policies]]\nid = \"p\"\nkind = \"api_key\"\nheader = \"{reserved}\"\n"
            )),
            "policies[0].header"
        );
    }
    assert_eq!(
        invalid_at(
            "[[policies]]\nid = \"p\"\nkind = \"api_key\"\nconsumer_header = \"Authorization\"\n"
        ),
        "policies[0].consumer_header"
    );
    // Fields the gateway writes itself (before, a key read from X-Request-Id went on to the
    // upstream, back to the client and into the log as the request id).
    for (field, name) in [
        ("header", "X-Request-Id"),
        ("header", "traceparent"),
        ("consumer_header", "X-Request-Id"),
        ("consumer_header", "Max-Forwards"),
        ("consumer_header", "Via"),
    ] {
        let text = format!("[[policies]]\nid = \"p\"\nkind = \"api_key\"\n{field} = \"{name}\"\n");
        assert_eq!(invalid_at(&text), format!("policies[0].{field}"), "{name}");
        // A config stored by an earlier build that took it still starts, noting it.
        let stored = parse_config(&format!("{POLICY_BASE}{text}"), Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
    // `*` is a name like any other with credentials: it would expose nothing.
    assert_eq!(
        invalid_at("[[policies]]\nid = \"p\"\nkind = \"cors\"\norigins = [\"https://a.example\"]\nallow_credentials = true\nexpose_headers = [\"*\"]\n"),
        "policies[0].expose_headers"
    );
    let err = compile(&format!("client_ip_header = \"x-real-ip\"\n{POLICY_BASE}")).unwrap_err();
    assert_eq!(err.path(), "client_ip_header");
    let err = compile(&format!("trusted_proxies = [\"nope\"]\n{POLICY_BASE}")).unwrap_err();
    assert_eq!(err.path(), "trusted_proxies[0]");
    // Without trusted proxies, the fields that read what they write would do nothing; nor
    // does the sampled flag of a traceparent never made.
    for (field, fix) in [
        (
            "client_ip_header = \"forwarded\"",
            "trusted_proxies = [\"10.0.0.0/8\"]",
        ),
        (
            "trust_forwarded_proto = true",
            "trusted_proxies = [\"10.0.0.0/8\"]",
        ),
        ("tracing = { sampled = false, traceparent = false }", ""),
    ] {
        let err = compile(&format!("{field}\n{POLICY_BASE}")).unwrap_err();
        let at = err.path().to_owned();
        assert!(
            field.starts_with(&at) || at == "tracing.sampled",
            "{field}: {err}"
        );
        assert!(err.to_string().contains("would have no effect"), "{err}");
        let fixed = format!("{field}\n{fix}\n{POLICY_BASE}").replace(", traceparent = false", "");
        compile(&fixed).unwrap();
        let stored = parse_config(&format!("{field}\n{POLICY_BASE}"), Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
}

#[test]
fn api_keys_are_found_by_digest_only() {
    use crate::policy::{api_key_digest, constant_time_eq, ApiKeys};
    let mut keys = ApiKeys::default();
    assert!(keys.insert(api_key_digest(b"first-key-0001"), 0));
    assert!(keys.insert(api_key_digest(b"second-key-002"), 1));
    assert!(!keys.insert(api_key_digest(b"first-key-0001"), 2));
    assert_eq!(keys.len(), 2);
    assert_eq!(keys.find(&api_key_digest(b"second-key-002")), Some(1));
    assert_eq!(keys.find(&api_key_digest(b"second-key-003")), None);
    // Same first 8 bytes, different rest: only the full digest matches.
    let mut near = api_key_digest(b"first-key-0001");
    near[31] ^= 1;
    assert_eq!(keys.find(&near), None);
    assert!(!constant_time_eq(&near, &api_key_digest(b"first-key-0001")));
}

#[test]
fn retry_backoff_grows_and_is_bounded() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                [[routes]]\nid = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\n";
    let up = |retry: &str| {
        format!(
            "{base}[[upstreams]]\nid = \"u\"\ntargets = [{{ address = \"127.0.0.1:9\" }}]\n\
             retry = {{ {retry} }}\n"
        )
    };
    let policy = |retry: &str| {
        let s = compile(&up(retry)).unwrap();
        s.upstreams[0].retry.clone().unwrap()
    };
    // None set: a retry goes at once.
    let r = policy("attempts = 3");
    assert_eq!(r.backoff(1, 12345), std::time::Duration::ZERO);
    // 100 ms: retry n waits between half of and all of 100 ms x (2^n - 1), at most 1 s.
    let r = policy("attempts = 5, backoff_ms = 100");
    let ms = |d: std::time::Duration| d.as_micros() as f64 / 1000.0;
    for (n, lo, hi) in [
        (1, 50.0, 100.0),
        (2, 150.0, 300.0),
        (3, 350.0, 700.0),
        (4, 500.0, 1000.0),
    ] {
        for random in [0, 1, 99_999, u64::MAX / 3, u64::MAX] {
            let got = ms(r.backoff(n, random));
            assert!(
                lo <= got && got <= hi,
                "retry {n}, random {random}: {got} ms"
            );
        }
        assert_eq!(ms(r.backoff(n, 0)), lo);
    }
    // Spread over the range, not stuck at one end.
    let waits: std::collections::HashSet<u128> = (0..64u64)
        .map(|i| {
            r.backoff(1, i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .as_micros()
        })
        .collect();
    assert!(waits.len() > 32, "{waits:?}");
    let r = policy("backoff_ms = 100, max_backoff_ms = 150");
    assert!(ms(r.backoff(9, u64::MAX)) <= 150.0);
    assert_eq!(r.overall, None);
    let r = policy("overall_timeout_ms = 2500");
    assert_eq!(r.overall, Some(std::time::Duration::from_millis(2500)));
    for (retry, path) in [
        ("backoff_ms = 0", "upstreams[0].retry.backoff_ms"),
        ("backoff_ms = 10001", "upstreams[0].retry.backoff_ms"),
        (
            "backoff_ms = 100, max_backoff_ms = 99",
            "upstreams[0].retry.max_backoff_ms",
        ),
        (
            "backoff_ms = 100, max_backoff_ms = 10001",
            "upstreams[0].retry.max_backoff_ms",
        ),
        ("max_backoff_ms = 100", "upstreams[0].retry.max_backoff_ms"),
        (
            "overall_timeout_ms = 0",
            "upstreams[0].retry.overall_timeout_ms",
        ),
        (
            "overall_timeout_ms = 86400001",
            "upstreams[0].retry.overall_timeout_ms",
        ),
    ] {
        assert_eq!(err(&up(retry)).path(), path, "{retry}");
    }
}

#[test]
fn upstream_protocols_and_what_they_allow() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                [[routes]]\nid = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\n";
    let up = |extra: &str| {
        format!("{base}[[upstreams]]\nid = \"u\"\ntargets = [{{ address = \"127.0.0.1:9\" }}]\n{extra}\n")
    };
    let s = compile(&up("protocol = \"grpc\"\nretry = {}")).unwrap();
    let u = &s.upstreams[0];
    assert_eq!(u.protocol, config::UpstreamProtocol::Grpc);
    assert_eq!(u.max_streams, 100);
    // gRPC upstreams retry UNAVAILABLE by default, and what a client sees as UNAVAILABLE.
    let r = u.retry.as_ref().unwrap();
    assert!(r.on_grpc(14) && !r.on_grpc(4));
    assert!(
        r.on_kind(0) && r.on_kind(4) && !r.on_kind(3),
        "connect failures and resets, not response timeouts"
    );
    let s = compile(&up("protocol = \"h2c\"\nmax_streams = 7")).unwrap();
    assert_eq!(s.upstreams[0].max_streams, 7);
    // A retry list that names codes takes exactly those.
    let s = compile(&up(
        "protocol = \"grpc\"\nretry = { on = [\"grpc:RESOURCE_EXHAUSTED\", \"503\"] }",
    ))
    .unwrap();
    let r = s.upstreams[0].retry.as_ref().unwrap();
    assert!(r.on_grpc(8) && !r.on_grpc(14) && r.on_status(503));

    for (extra, path) in [
        ("max_streams = 10", "upstreams[0].max_streams"),
        (
            "protocol = \"h2c\"\nmax_streams = 0",
            "upstreams[0].max_streams",
        ),
        (
            "protocol = \"grpc\"\nmax_streams = 1001",
            "upstreams[0].max_streams",
        ),
        (
            "retry = { on = [\"grpc:UNAVAILABLE\"] }",
            "upstreams[0].retry.on",
        ),
        (
            "protocol = \"grpc\"\nretry = { on = [\"grpc:NOPE\"] }",
            "upstreams[0].retry.on[0]",
        ),
        (
            "protocol = \"grpc\"\nretry = { on = [\"grpc:OK\"] }",
            "upstreams[0].retry.on[0]",
        ),
    ] {
        assert_eq!(err(&up(extra)).path(), path, "{extra}");
    }
    assert_eq!(
        err(&up("protocol = \"http3\"")).path(),
        "upstreams[0].protocol"
    );
    // Shaping and aggregate steps need HTTP/1.1 upstreams.
    let shaped = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nid = \"u\"\nprotocol = \"h2c\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n\
         [[routes]]\nid = \"r\"\npath = \"/\"\nupstream = \"u\"\nresponse = { allow = [\"a\"] }\n";
    assert_eq!(err(shaped).path(), "routes[0].response");
    let aggregate = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nid = \"u\"\nprotocol = \"grpc\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n\
         [[aggregates]]\nid = \"a\"\n[[aggregates.steps]]\nid = \"s\"\nupstream = \"u\"\npath = \"/x\"\n\
         [[routes]]\nid = \"r\"\npath = \"/\"\naggregate = \"a\"\n";
    assert_eq!(err(aggregate).path(), "aggregates[0].steps[0].upstream");
    // A step id with a `.`: `{a.b.sku}` is step `a`'s field `b.sku`, so step `a.b` could
    // never be named (before: taken, its placeholders read from step `a`). Tolerated in a
    // stored config.
    let dotted = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nid = \"u\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n\
         [[aggregates]]\nid = \"a\"\n[[aggregates.steps]]\nid = \"a.b\"\nupstream = \"u\"\n\
         path = \"/x\"\n[[routes]]\nid = \"r\"\npath = \"/\"\naggregate = \"a\"\n";
    assert_eq!(err(dotted).path(), "aggregates[0].steps[0].id");
    let stored = parse_config(dotted, Format::Toml).unwrap();
    let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
}

#[test]
fn cluster_scoped_rate_limits_need_redis() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                [[policies]]\nid = \"rl\"\nkind = \"rate_limit\"\nrate = 10\n";
    let s = compile(&format!(
        "{base}scope = \"cluster\"\non_store_error = \"local\"\n\
         [cluster]\nnode_id = \"n1\"\nredis = \"redis://:secret@127.0.0.1:6390/2\"\nsync_ms = 10\n"
    ))
    .unwrap();
    let c = s.cluster.as_ref().unwrap();
    assert_eq!(&*c.node_id, "n1");
    assert_eq!(c.sync, std::time::Duration::from_millis(10));
    let r = c.redis.as_ref().unwrap();
    assert_eq!(
        (&*r.address, r.password.as_deref(), r.db),
        ("127.0.0.1:6390", Some("secret"), 2)
    );
    // A password with colons stays whole after the leading colon (before: read as a user
    // and a password); `USER:PASSWORD` splits at the first; escapes are decoded.
    for (url, user, password) in [
        ("redis://:pa:ss@h:1", None, Some("pa:ss")),
        ("redis://app:pa:ss@h:1", Some("app"), Some("pa:ss")),
        ("redis://app:p%40ss%3A@h:1", Some("app"), Some("p@ss:")),
        ("redis://secret@h:1", None, Some("secret")),
        ("redis://h:1", None, None),
    ] {
        let r = crate::snapshot::RedisAddr::parse(url).unwrap();
        assert_eq!(
            (r.user.as_deref(), r.password.as_deref()),
            (user, password),
            "{url}"
        );
    }
    for bad in [
        "redis://:bad%zz@h:1",
        "redis://:bad%+1@h:1",
        "redis://:bad%4@h:1",
    ] {
        assert!(crate::snapshot::RedisAddr::parse(bad).is_err(), "{bad}");
    }
    let policy::PolicyKind::RateLimit(rl) = &s.policies.list[0].kind else {
        panic!("a rate limit")
    };
    assert_eq!(rl.scope, config::RateScope::Cluster);
    assert_eq!(rl.on_store_error, config::StoreErrorMode::Local);
    for (text, path) in [
        (format!("{base}scope = \"cluster\"\n"), "policies[0].scope"),
        (
            format!("{base}scope = \"cluster\"\n[cluster]\nnode_id = \"n1\"\n"),
            "policies[0].scope",
        ),
        (
            format!("{base}on_store_error = \"deny\"\n"),
            "policies[0].on_store_error",
        ),
        (
            format!("{base}[cluster]\nnode_id = \"n 1\"\n"),
            "cluster.node_id",
        ),
        (
            format!("{base}[cluster]\nnode_id = \"n1\"\nredis = \"http://x:1\"\n"),
            "cluster.redis",
        ),
        (
            format!("{base}[cluster]\nnode_id = \"n1\"\nredis = \"redis://x\"\n"),
            "cluster.redis",
        ),
        (
            format!("{base}[cluster]\nnode_id = \"n1\"\nsync_ms = 0\n"),
            "cluster.sync_ms",
        ),
    ] {
        assert_eq!(err(&text).path(), path, "{text}");
    }
}

#[test]
fn urls_are_shown_without_their_passwords() {
    for (url, shown) in [
        (
            "redis://:hunter2@10.0.0.1:6379/2",
            "redis://:***@10.0.0.1:6379/2",
        ),
        ("etcd://gw:p@ss@h:1/g", "etcd://gw:***@h:1/g"),
        ("etcd://gw:pa/ss@h:1/g", "etcd://gw:***@h:1/g"),
        ("etcd://gw:pa?ss@h:1/g", "etcd://gw:***@h:1/g"),
        ("etcd://gw:p@ss?word@h:1/g", "etcd://gw:***@h:1/g"),
        ("etcd://gw:se?cret/word@h:1/g", "etcd://gw:***@h:1/g"),
        (
            "redis://:se?cret/word@10.0.0.1:6379",
            "redis://:***@10.0.0.1:6379",
        ),
        (
            "etcds://gw:pa#s?s@h:1/g?ca=/c",
            "etcds://gw:***@h:1/g?ca=/c",
        ),
        ("redis://10.0.0.1:6379", "redis://10.0.0.1:6379"),
        ("etcd://gw:x&y=/z@h:1/g", "etcd://gw:***@h:1/g"),
        ("etcd://gw:p@ss/x@h:1/g", "etcd://gw:***@h:1/g"),
        ("etcd://gw:se?c=ret/word@h:1/g", "etcd://gw:***@h:1/g"),
        ("redis://:pa/ss@127.0.0.1/0", "redis://:***@127.0.0.1/0"),
        ("etcds://[::1]:2379/g", "etcds://[::1]:2379/g"),
        (
            "etcd://u:p@[::1]:2379,h:2/g",
            "etcd://u:***@[::1]:2379,h:2/g",
        ),
        // A password without a user, a malformed host, an option-like password.
        ("etcd://s3cret@h:1/g", "etcd://***@h:1/g"),
        ("redis://s3cret@h:6379/0@x", "redis://***@x"),
        ("etcd://gw:s3cret@h:2379x/g", "etcd://gw:***@h:2379x/g"),
        ("etcd://gw:pa&key=1@h:1", "etcd://gw:***@h:1"),
        // An `@` further on (a path's, an option's file) hides more than it must, never less.
        ("etcd://h:1/a@b", "etcd://h:***@b"),
        // A mistyped scheme.
        ("etcd:/gw:s3cret@h:1/g", "etcd:***@h:1/g"),
        ("etcd//gw:s3cret@h:1/g", "***@h:1/g"),
        ("redis:/u:s3cret@127.0.0.1:6379", "redis:***@127.0.0.1:6379"),
        ("etcds://h:1/g?ca=/x?y@z:1.pem", "etcds://h:***@z:1.pem"),
        (
            "etcds://gw:pa/x?y@h:1/g?ca=/a@b.pem",
            "etcds://gw:***@b.pem",
        ),
    ] {
        assert_eq!(crate::redact_url(url), shown);
    }
    let e = crate::snapshot::RedisAddr::parse("redis://:hunter2@127.0.0.1:99999").unwrap_err();
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn a_default_max_connections_is_left_out_of_what_older_builds_read() {
    // Builds before `[limits] max_connections` refuse unknown fields: a store written by this
    // build (an etcd record during a rolling upgrade) stays readable by them while it is
    // left at its default.
    let written = serde_json::to_value(Config::default()).unwrap();
    assert!(
        written["limits"].get("max_connections").is_none(),
        "{written}"
    );
    let mut config = Config::default();
    config.limits.max_connections = 10;
    let written = serde_json::to_value(&config).unwrap();
    assert_eq!(written["limits"]["max_connections"], 10);
    let back: Config = serde_json::from_value(written).unwrap();
    assert_eq!(back.limits.max_connections, 10);
}

#[test]
fn a_repeated_id_is_refused_at_its_second_use_and_dot_ids_at_any() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    let upstream = |id: &str| {
        format!("[[upstreams]]\nid = \"{id}\"\ntargets = [{{ address = \"127.0.0.1:1\" }}]\n")
    };
    let route =
        |id: &str| format!("[[routes]]\nid = \"{id}\"\npath = \"/r-{id}\"\nrespond = {{}}\n");
    let aggregate = |id: &str| {
        format!(
            "[[aggregates]]\nid = \"{id}\"\n[[aggregates.steps]]\nid = \"s\"\nupstream = \"u\"\n\
             path = \"/x\"\n"
        )
    };
    let profile = |id: &str| format!("[[client_profiles]]\nid = \"{id}\"\nuser_agent = [\"x\"]\n");
    let cases = [
        (
            format!("{base}{}{}{}", route("a"), route("b"), route("a")),
            "routes[2].id",
        ),
        (
            format!("{base}{}{}", upstream("u"), upstream("u")),
            "upstreams[1].id",
        ),
        (
            format!(
                "{base}{}{}{}",
                upstream("u"),
                aggregate("g"),
                aggregate("g")
            ),
            "aggregates[1].id",
        ),
        (
            format!("{base}{}{}", profile("p"), profile("p")),
            "client_profiles[1].id",
        ),
    ];
    for (text, path) in cases {
        let e = err(&text);
        assert_eq!(e.path(), path, "{text}");
        assert!(e.to_string().contains("duplicate"), "{e}");
    }
    // Each id once, however many: fine.
    let many: String = (0..300).map(|i| route(&format!("r{i}"))).collect();
    assert_eq!(compile(&format!("{base}{many}")).unwrap().routes.len(), 300);
    // `.` and `..` are dot segments, which clients remove from `/v1/routes/..`.
    for id in [".", ".."] {
        let text = format!("{base}{}", route(id));
        assert_eq!(err(&text).path(), "routes[0].id", "{id}");
        // A config stored by an earlier build that took them still starts, noting it.
        let config = parse_config(&text, Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(config, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
    assert!(compile(&format!("{base}{}", route("..."))).is_ok());
}

#[test]
fn a_stored_route_path_with_a_lower_case_escape_is_routed_upper_cased() {
    // Requests have their escapes upper-cased before routing: a route an earlier build
    // stored as `/vault%2fkeys` keeps matching what it matched (before, the review found
    // it tolerated as written, matching nothing: its traffic fell to the catch-all).
    let text = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"v\"\n\
                path_prefix = \"/vault%2fkeys/%e2%82%ac\"\nrespond = {}\n";
    assert_eq!(err(text).path(), "routes[0].path_prefix");
    let stored = parse_config(text, Format::Toml).unwrap();
    let (snap, notes) = Snapshot::compile_stored(stored, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    let path = snap.config.routes[0].path_prefix.as_deref();
    assert_eq!(path, Some("/vault%2Fkeys/%E2%82%AC"));
}

#[test]
fn a_respond_route_gives_the_fields_its_status_needs() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/l\"\n";
    for (status, edits) in [
        (
            401,
            "response_headers = { set = { \"www-authenticate\" = \"Basic realm=\\\"x\\\"\" } }",
        ),
        (405, "response_headers = { set = { Allow = \"GET\" } }"),
        (405, "response_headers = { set = { Allow = \"\" } }"),
        (
            407,
            "response_headers = { set = { \"Proxy-Authenticate\" = \"Basic\" } }",
        ),
        (403, ""),
        (204, ""),
    ] {
        let text = format!("{base}respond = {{ status = {status} }}\n{edits}\n");
        compile(&text).unwrap_or_else(|e| panic!("{status}: {e}"));
    }
}

#[test]
fn paths_no_request_can_have_are_refused_where_routes_redirects_and_rewrites_name_them() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
                targets = [{ address = \"127.0.0.1:1\" }]\n";
    let route = |extra: &str| format!("{base}[[routes]]\nid = \"r\"\n{extra}\n");
    // Refused naming `field`; a config stored by an earlier build that took it still starts,
    // noting it.
    let refused = |extra: &str, field: &str| {
        let text = route(extra);
        assert_eq!(err(&text).path(), field, "{extra}");
        let stored = parse_config(&text, Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
        assert_eq!(notes.len(), 1, "{extra}: {notes:?}");
    };
    // Requests are decoded (unreserved escapes), refused with a malformed escape, %00 or a
    // dot segment, and CONNECT never reaches a route: such a route could never match, and
    // such a rewrite or redirect sends what the gateway itself refuses (before: taken).
    for (extra, field) in [
        ("path = \"/%6Frders\"\nrespond = {}", "routes[0].path"),
        (
            "path_prefix = \"/a%7e\"\nrespond = {}",
            "routes[0].path_prefix",
        ),
        ("path = \"/n%\"\nrespond = {}", "routes[0].path"),
        (
            "path = \"/l\"\nrespond = { status = 401 }",
            "routes[0].respond.status",
        ),
        (
            "path = \"/l\"\nrespond = { status = 405 }\n\
             response_headers = { set = { \"WWW-Authenticate\" = \"Basic\" } }",
            "routes[0].respond.status",
        ),
        (
            "path = \"/l\"\nrespond = { status = 426 }",
            "routes[0].respond.status",
        ),
        (
            "path = \"/l\"\nrespond = { status = 401 }\n\
             response_headers = { set = { \"WWW-Authenticate\" = \"\" } }",
            "routes[0].respond.status",
        ),
        (
            "path = \"/l\"\nrespond = { status = 204, content_type = \"application/json\" }",
            "routes[0].respond.content_type",
        ),
        ("path = \"/q%00\"\nrespond = {}", "routes[0].path"),
        ("path = \"/p%2fq\"\nrespond = {}", "routes[0].path"),
        (
            "path_prefix = \"/%e2%82%ac\"\nrespond = {}",
            "routes[0].path_prefix",
        ),
        (
            "path_prefix = \"/x/../y\"\nrespond = {}",
            "routes[0].path_prefix",
        ),
        ("path = \"/x/%2E;p/y\"\nrespond = {}", "routes[0].path"),
        ("path = \"/a/%2F..%2Fb\"\nrespond = {}", "routes[0].path"),
        ("path = \"/a\\\\..\\\\b\"\nrespond = {}", "routes[0].path"),
        (
            "path = \"/c\"\nmethods = [\"CONNECT\"]\nrespond = {}",
            "routes[0].methods[0]",
        ),
        (
            "path = \"/i/{id}\"\nupstream = \"u\"\nrewrite = \"/x/%zz/{id}\"",
            "routes[0].rewrite",
        ),
        (
            "path = \"/i/{id}\"\nupstream = \"u\"\nrewrite = \"/../{id}\"",
            "routes[0].rewrite",
        ),
        (
            "path = \"/d\"\nredirect = { path = \"/a%zz\" }",
            "routes[0].redirect.path",
        ),
        (
            "path = \"/d\"\nredirect = { path = \"/a/./b\" }",
            "routes[0].redirect.path",
        ),
    ] {
        refused(extra, field);
    }
    // Fields that would be silently without effect, and a route's redirect back to itself
    // (before: taken; the redirect answered with its own URL, round and round).
    for (extra, field) in [
        (
            "path = \"/m\"\nmethods = [\"get\"]\nrespond = {}",
            "routes[0].methods[0]",
        ),
        (
            "path_prefix = \"/s\"\nstrip_prefix = true\nrespond = {}",
            "routes[0].strip_prefix",
        ),
        (
            "path = \"/a\"\nredirect = { path = \"/a\" }",
            "routes[0].redirect.path",
        ),
        (
            "path_prefix = \"/rd\"\nredirect = { path = \"/rd/x\" }",
            "routes[0].redirect.path",
        ),
        (
            "path_prefix = \"/rd/\"\nredirect = { path = \"/rd/\" }",
            "routes[0].redirect.path",
        ),
        (
            "path = \"/i/{id}\"\nredirect = { path = \"/i/7\" }",
            "routes[0].redirect.path",
        ),
    ] {
        refused(extra, field);
    }
    // A redirect another route answers is no loop: a catch-all to a more specific route, a
    // POST-only route's 303 to the GET route of its path, a prefix to its more specific
    // prefix (before the first version of the check refused them all).
    let two = |a: &str, b: &str| {
        format!("{base}[[routes]]\nid = \"a\"\n{a}\n[[routes]]\nid = \"b\"\n{b}\n")
    };
    for (a, b) in [
        (
            "path_prefix = \"/app/\"\nupstream = \"u\"",
            "path_prefix = \"/\"\nredirect = { path = \"/app/\" }",
        ),
        (
            "path = \"/form\"\nmethods = [\"GET\"]\nupstream = \"u\"",
            "path = \"/form\"\nmethods = [\"POST\"]\nredirect = { path = \"/form\", status = 303 }",
        ),
        (
            "path_prefix = \"/docs/v2\"\nupstream = \"u\"",
            "path_prefix = \"/docs\"\nredirect = { path = \"/docs/v2\" }",
        ),
        (
            "path = \"/h\"\nhosts = [\"b.test\"]\nupstream = \"u\"",
            "path = \"/h\"\nhosts = [\"*.test\"]\nredirect = { path = \"/h\", host = \"b.test\" }",
        ),
    ] {
        compile(&two(a, b)).unwrap_or_else(|e| panic!("{a} / {b}: {e}"));
    }
    // A catch-all's 301 or 302 to a route that takes only GET: what clients follow it with
    // (GET) reaches that route.
    for status in [301, 302] {
        let text = two(
            "path = \"/\"\nmethods = [\"GET\"]\nupstream = \"u\"",
            &format!("path_prefix = \"/\"\nredirect = {{ path = \"/\", status = {status} }}"),
        );
        compile(&text).unwrap_or_else(|e| panic!("{status}: {e}"));
    }
    // Routed back to itself for some host it answers, for the method the client sends
    // next (307 and 308 keep it), or once the path is routed as a request's is: a loop.
    for (a, b) in [
        (
            "path = \"/h\"\nhosts = [\"b.test\"]\nupstream = \"u\"",
            "path = \"/h\"\nhosts = [\"*.test\"]\nredirect = { path = \"/h\" }",
        ),
        (
            "path = \"/a\"\nhosts = [\"x.a.test\"]\nupstream = \"u\"",
            "path_prefix = \"/\"\nhosts = [\"*.a.test\"]\nredirect = { path = \"/a\" }",
        ),
        (
            "path = \"/p\"\nmethods = [\"GET\"]\nupstream = \"u\"",
            "path = \"/p\"\nmethods = [\"POST\"]\nredirect = { path = \"/p\", status = 307 }",
        ),
        (
            "path = \"/q\"\nmethods = [\"POST\"]\nupstream = \"u\"",
            "path = \"/q\"\nmethods = [\"HEAD\"]\nredirect = { path = \"/q\", status = 308 }",
        ),
        (
            "path = \"/t\"\nupstream = \"u\"",
            "path = \"/s\"\nredirect = { path = \"//s\" }",
        ),
        (
            "path = \"/t\"\nupstream = \"u\"",
            "path = \"/e\"\nredirect = { path = \"/%65\" }",
        ),
        (
            "path = \"/t\"\nupstream = \"u\"",
            "path = \"/%2F\"\nredirect = { path = \"/%2f\" }",
        ),
        // A route without `methods` takes POST too: a 307 keeps it, past a GET-only route;
        // and DELETE, past a route of GET, POST and PUT.
        (
            "path = \"/login\"\nmethods = [\"GET\"]\nupstream = \"u\"",
            "path_prefix = \"/\"\nredirect = { path = \"/login\", status = 307 }",
        ),
        (
            "path = \"/x\"\nmethods = [\"GET\", \"POST\", \"PUT\"]\nupstream = \"u\"",
            "path_prefix = \"/\"\nredirect = { path = \"/x\", status = 308 }",
        ),
        // A HEAD stays a HEAD after a 303.
        (
            "path = \"/g\"\nmethods = [\"GET\"]\nupstream = \"u\"",
            "path = \"/h\"\nmethods = [\"HEAD\"]\nredirect = { path = \"/h\", status = 303 }",
        ),
    ] {
        let e = err(&two(a, b));
        assert_eq!(e.path(), "routes[1].redirect.path", "{b}: {e}");
    }
    for extra in [
        "path = \"/m\"\nmethods = [\"PURGE\", \"purge\"]\nrespond = {}",
        "path_prefix = \"/rd\"\nredirect = { path = \"/rdx\" }",
        "path = \"/i/{id}\"\nredirect = { path = \"/i/7/8\" }",
        "path = \"/a\"\nredirect = { path = \"/a\", host = \"b.test\" }",
        "path = \"/a\"\nredirect = { path = \"/a\", port = 8443 }",
        "path_prefix = \"/s\"\nstrip_prefix = true\nupstream = \"u\"",
    ] {
        compile(&route(extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    // Other escapes, dots within names, and parameters stay.
    for extra in [
        "path = \"/p%2Fq/a.b/..c\"\nrespond = {}",
        "path_prefix = \"/%20x/\"\nrespond = {}",
        "path = \"/i/{id}\"\nupstream = \"u\"\nrewrite = \"/v1.2/%2F/{id}\"",
        "path = \"/d\"\nredirect = { path = \"/%C3%A9\" }",
    ] {
        compile(&route(extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
}

#[test]
fn a_route_path_with_a_run_of_slashes_needs_merge_slashes_off() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    let route = |field: &str, path: &str| {
        format!("[[routes]]\nid = \"r\"\n{field} = \"{path}\"\nrespond = {{}}\n")
    };
    // Requests' paths are merged before routing: such a route would never match.
    for (field, path) in [
        ("path", "//a"),
        ("path_prefix", "/a//"),
        ("path", "/a//{id}"),
    ] {
        let text = format!("{base}{}", route(field, path));
        let e = err(&text);
        assert_eq!(e.path(), format!("routes[0].{field}"), "{path}");
        assert!(e.to_string().contains("merge_slashes"), "{e}");
        // A config stored by an earlier build that took it still starts, noting it.
        let config = parse_config(&text, Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(config, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        // With merging off, requests keep their runs, and the route can match.
        let s = compile(&format!("merge_slashes = false\n{text}")).unwrap();
        assert!(!s.limits.merge_slashes);
    }
    assert!(
        compile(&format!("{base}{}", route("path", "/a/b/")))
            .unwrap()
            .limits
            .merge_slashes
    );
}

#[test]
fn route_header_edits_compile_and_refuse_what_the_gateway_writes() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                [[upstreams]]\nid = \"u\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n\
                [[aggregates]]\nid = \"agg\"\nsteps = [{ id = \"a\", upstream = \"u\", \
                path = \"/a\" }]\n\
                [[client_profiles]]\nid = \"m\"\n\
                header = { name = \"X-Client\", values = [\"m\"] }\n\
                [[consumers]]\nid = \"c\"\n\
                [[policies]]\nid = \"key\"\nkind = \"api_key\"\n\
                [[policies]]\nid = \"cors\"\nkind = \"cors\"\norigins = [\"https://a.test\"]\n";
    let route = |action: &str, extra: &str| {
        format!("{base}[[routes]]\nid = \"r\"\npath_prefix = \"/\"\n{action}\n{extra}\n")
    };
    let up = |extra: &str| route("upstream = \"u\"", extra);
    let s = compile(&up(
        "request_headers = { set = { Host = \"in.svc\", \"X-Env\" = \"prod\" }, \
         remove = [\"Cookie\"] }\n\
         response_headers = { set = { \"Cache-Control\" = \"no-store\" }, remove = [\"Server\"] }",
    ))
    .unwrap();
    let h = s.routes[0].headers.as_deref().unwrap();
    let names = |list: &[Box<[u8]>]| -> Vec<String> {
        list.iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect()
    };
    assert_eq!(names(&h.request_drop), ["host", "x-env", "cookie"]);
    assert_eq!(&*h.request_lines, b"Host: in.svc\r\nX-Env: prod\r\n");
    assert!(h.sets_host);
    assert_eq!(names(&h.response_drop), ["cache-control", "server"]);
    assert_eq!(&*h.response_lines, b"Cache-Control: no-store\r\n");
    assert!(compile(&up("")).unwrap().routes[0].headers.is_none());
    let at = "routes[0]";
    for (action, extra, path) in [
        (
            "upstream = \"u\"",
            "request_headers = { set = { Connection = \"x\" } }",
            format!("{at}.request_headers.set.Connection"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X-Forwarded-For\" = \"1.2.3.4\" } }",
            format!("{at}.request_headers.set.X-Forwarded-For"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X-Real-IP\" = \"1.2.3.4\" } }",
            format!("{at}.request_headers.set.X-Real-IP"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { remove = [\"Host\"] }",
            format!("{at}.request_headers.remove[0]"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X A\" = \"1\" } }",
            format!("{at}.request_headers.set.X A"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X-A\" = \" padded\" } }",
            format!("{at}.request_headers.set.X-A"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X-A\" = \"a\\r\\nX-B: b\" } }",
            format!("{at}.request_headers.set.X-A"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X-A\" = \"1\" }, remove = [\"x-a\"] }",
            format!("{at}.request_headers.remove[0]"),
        ),
        (
            "upstream = \"u\"\npolicies = [\"key\"]",
            "request_headers = { set = { \"x-consumer-id\" = \"forged\" } }",
            format!("{at}.request_headers.set.x-consumer-id"),
        ),
        (
            "upstream = \"u\"\nresponse = { deny = [\"cost\"] }",
            "request_headers = { set = { \"Accept-Encoding\" = \"gzip\" } }",
            format!("{at}.request_headers.set.Accept-Encoding"),
        ),
        (
            "aggregate = \"agg\"",
            "request_headers = { set = { Host = \"in.svc\" } }",
            format!("{at}.request_headers.set.Host"),
        ),
        (
            "respond = { body = \"hi\" }",
            "request_headers = { set = { \"X-A\" = \"1\" } }",
            format!("{at}.request_headers"),
        ),
        (
            "respond = { body = \"hi\" }",
            "response_headers = { set = { \"Content-Type\" = \"text/html\" } }",
            format!("{at}.response_headers.set.Content-Type"),
        ),
        (
            "upstream = \"u\"",
            "response_headers = { remove = [\"Content-Length\"] }",
            format!("{at}.response_headers.remove[0]"),
        ),
        (
            "upstream = \"u\"",
            "response_headers = { set = { Date = \"x\" } }",
            format!("{at}.response_headers.set.Date"),
        ),
        (
            "upstream = \"u\"\nvariants = [{ profile = \"m\", upstream = \"u\" }]",
            "response_headers = { set = { Vary = \"Accept\" } }",
            format!("{at}.response_headers.set.Vary"),
        ),
        (
            "upstream = \"u\"\npolicies = [\"cors\"]",
            "response_headers = { remove = [\"Access-Control-Allow-Origin\"] }",
            format!("{at}.response_headers.remove[0]"),
        ),
        // Spelled with `_`, as CGI-style upstreams read names and as the edits match
        // fields (before: accepted, and `Content_Length` dropped the real one).
        (
            "upstream = \"u\"",
            "request_headers = { remove = [\"Content_Length\"] }",
            format!("{at}.request_headers.remove[0]"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"Transfer_Encoding\" = \"chunked\" } }",
            format!("{at}.request_headers.set.Transfer_Encoding"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X_Forwarded_For\" = \"6.6.6.6\" } }",
            format!("{at}.request_headers.set.X_Forwarded_For"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X_Request_Id\" = \"forged\" } }",
            format!("{at}.request_headers.set.X_Request_Id"),
        ),
        (
            "upstream = \"u\"\npolicies = [\"key\"]",
            "request_headers = { set = { \"X_Consumer_Id\" = \"forged\" } }",
            format!("{at}.request_headers.set.X_Consumer_Id"),
        ),
        (
            "upstream = \"u\"",
            "request_headers = { set = { \"X-A\" = \"1\" }, remove = [\"x_a\"] }",
            format!("{at}.request_headers.remove[0]"),
        ),
        (
            "upstream = \"u\"",
            "response_headers = { remove = [\"Content_Length\"] }",
            format!("{at}.response_headers.remove[0]"),
        ),
        (
            "upstream = \"u\"",
            "response_headers = { set = { \"Transfer_Encoding\" = \"chunked\" } }",
            format!("{at}.response_headers.set.Transfer_Encoding"),
        ),
    ] {
        let e = err(&route(action, extra));
        assert_eq!(e.path(), path, "{action} {extra}: {e}");
    }
    // Stored by an earlier build, such an edit is noted and ignored: neither its drop nor
    // its line is made.
    let stored = parse_config(
        &up(
            "request_headers = { set = { \"Content_Length\" = \"0\", \"X-Env\" = \"p\" }, \
             remove = [\"X_Real_IP\", \"Cookie\", \"x_env\"] }\n\
             response_headers = { remove = [\"Content_Length\"] }",
        ),
        Format::Toml,
    )
    .unwrap();
    // (`x_env` beside `X-Env`: named twice now, where an earlier build told them apart; the
    // review of 11dcf02 found such a data directory refused at start.)
    let (s, notes) = Snapshot::compile_stored(stored, 1).unwrap();
    assert_eq!(notes.len(), 4, "{notes:?}");
    let twice = |n: &String| n.contains("remove[2]") && n.contains("named twice");
    assert!(notes.iter().any(twice), "{notes:?}");
    // Whichever of the two has the `_` (the second review found the `_` one first refused);
    // the same name in another case stays refused, as earlier builds refused it.
    let stored = |edits: &str| {
        let text = up(&format!("request_headers = {{ {edits} }}"));
        Snapshot::compile_stored(parse_config(&text, Format::Toml).unwrap(), 1)
    };
    for edits in [
        "remove = [\"x_one\", \"X-One\"]",
        "set = { \"x_two\" = \"1\" }, remove = [\"X-Two\"]",
    ] {
        let (_, notes) = stored(edits).unwrap_or_else(|e| panic!("{edits}: {e}"));
        assert_eq!(notes.len(), 1, "{edits}: {notes:?}");
    }
    assert!(stored("remove = [\"X-One\", \"x-one\"]").is_err());
    assert!(notes[0].contains("set.Content_Length"), "{notes:?}");
    let h = s.routes[0].headers.as_ref().unwrap();
    assert_eq!(&*h.request_lines, b"X-Env: p\r\n");
    // (`X_Real_IP`'s drop stays: the client's copies go whatever routes say.)
    assert_eq!(names(&h.request_drop), ["x-env", "x_real_ip", "cookie"]);
    assert!(h.response_drop.is_empty());
    // A route an earlier build stored with an X-Real-IP edit starts, noted; the edit is
    // dropped, so the gateway's own goes out alone (before: two X-Real-IP lines).
    let stored = parse_config(
        &up("request_headers = { set = { \"X-Real-IP\" = \"1.2.3.4\", \"X-Env\" = \"p\" } }"),
        Format::Toml,
    )
    .unwrap();
    let (s, notes) = Snapshot::compile_stored(stored, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("set.X-Real-IP"), "{notes:?}");
    let h = s.routes[0].headers.as_ref().unwrap();
    assert_eq!(&*h.request_lines, b"X-Env: p\r\n");
    for (value, ok) in [
        ("in.svc", true),
        ("in.svc:8080", true),
        ("10.0.0.1:80", true),
        ("[::1]:80", true),
        ("", false),
        ("a b", false),
        ("in.svc:0", false),
        ("in.svc:99999", false),
        ("*.svc", false),
    ] {
        let text = up(&format!(
            "request_headers = {{ set = {{ Host = \"{value}\" }} }}"
        ));
        match ok {
            true => drop(compile(&text).unwrap_or_else(|e| panic!("{value:?}: {e}"))),
            false => assert_eq!(
                err(&text).path(),
                format!("{at}.request_headers.set.Host"),
                "{value:?}"
            ),
        }
    }
    for extra in [
        "request_headers = { set = { \"Max-Forwards\" = \"3\" } }",
        "request_headers = { remove = [\"Expect\"] }",
        "request_headers = { set = { \"grpc-timeout\" = \"1S\" } }",
        "response_headers = { remove = [\"grpc-status\"] }",
    ] {
        assert!(err(&up(extra)).path().starts_with(at), "{extra}");
    }
    // What is refused in one place is fine where nothing else writes it.
    for (action, extra) in [
        (
            "upstream = \"u\"",
            "request_headers = { set = { Authorization = \"Basic eA==\" } }",
        ),
        (
            "upstream = \"u\"",
            "response_headers = { set = { Vary = \"Accept\" } }",
        ),
        (
            "respond = { body = \"hi\" }",
            "response_headers = { set = { \"X-Frame-Options\" = \"DENY\" } }",
        ),
        (
            "aggregate = \"agg\"",
            "request_headers = { set = { \"X-Env\" = \"prod\" } }",
        ),
    ] {
        compile(&route(action, extra)).unwrap_or_else(|e| panic!("{action} {extra}: {e}"));
    }
}

#[test]
fn an_upstreams_own_timeouts_replace_the_global_ones() {
    let text = |own: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
             [timeouts]\nupstream_connect_ms = 100\nupstream_response_head_ms = 200\n\
             upstream_body_ms = 300\nupstream_send_ms = 400\n\
             [[upstreams]]\nid = \"u\"\ntargets = [{{ address = \"127.0.0.1:9\" }}]\n{own}\n"
        )
    };
    let ms = std::time::Duration::from_millis;
    let s = compile(&text("timeouts = { response_head_ms = 5000, send_ms = 7 }")).unwrap();
    let mut t = s.timeouts;
    s.upstreams[0].timeouts.apply(&mut t);
    assert_eq!(
        (
            t.upstream_connect,
            t.upstream_response_head,
            t.upstream_body,
            t.upstream_send
        ),
        (ms(100), ms(5000), ms(300), ms(7))
    );
    // The others untouched, and nothing without any.
    assert_eq!(t.client_header, s.timeouts.client_header);
    let s = compile(&text("")).unwrap();
    let mut t = s.timeouts;
    s.upstreams[0].timeouts.apply(&mut t);
    assert_eq!(t.upstream_response_head, ms(200));
    for (own, path) in [
        (
            "timeouts = { connect_ms = 0 }",
            "upstreams[0].timeouts.connect_ms",
        ),
        (
            "timeouts = { body_ms = 86400001 }",
            "upstreams[0].timeouts.body_ms",
        ),
        ("timeouts = { idle_ms = 5 }", "upstreams[0].timeouts"),
    ] {
        let e = err(&text(own));
        assert!(e.path().starts_with(path), "{own}: {e}");
    }
}

#[test]
fn redirects_are_checked() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                [[upstreams]]\nid = \"u\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n\
                [[routes]]\nid = \"r\"\npath_prefix = \"/old\"\n";
    let s = compile(&format!(
        "{base}redirect = {{ scheme = \"https\", host = \"API.test\", port = 8443, \
         path = \"/x\", strip_query = true }}\n"
    ))
    .unwrap();
    let snapshot::RouteAction::Redirect(r) = &s.routes[0].action else {
        panic!("{:?}", s.routes[0].action);
    };
    assert_eq!(r.status, 301);
    assert_eq!(
        (
            r.scheme.as_deref(),
            r.host.as_deref(),
            r.port,
            r.path.as_deref()
        ),
        (Some("https"), Some("api.test"), Some(8443), Some("/x"))
    );
    assert!(r.strip_query);
    for (extra, path) in [
        (
            "redirect = { status = 300, path = \"/x\" }",
            "routes[0].redirect.status",
        ),
        (
            "redirect = { scheme = \"ftp\" }",
            "routes[0].redirect.scheme",
        ),
        (
            "redirect = { host = \"*.test\" }",
            "routes[0].redirect.host",
        ),
        ("redirect = { host = \"a b\" }", "routes[0].redirect.host"),
        ("redirect = { port = 0 }", "routes[0].redirect.port"),
        ("redirect = { path = \"x\" }", "routes[0].redirect.path"),
        ("redirect = { path = \"/a?b\" }", "routes[0].redirect.path"),
        ("redirect = { strip_query = true }", "routes[0].redirect"),
        (
            "redirect = { scheme = \"https\" }\nupstream = \"u\"",
            "routes[0]",
        ),
        (
            "redirect = { scheme = \"https\" }\nstrip_prefix = true",
            "routes[0].strip_prefix",
        ),
        (
            "redirect = { path = \"/x\" }\n\
             request_headers = { set = { \"X-A\" = \"1\" } }",
            "routes[0].request_headers",
        ),
        (
            "redirect = { path = \"/x\" }\n\
             response_headers = { set = { Location = \"/\" } }",
            "routes[0].response_headers.set.Location",
        ),
        // A route matches on the new scheme's listeners too: it would send the client to
        // where it is.
        (
            "redirect = { scheme = \"https\" }",
            "routes[0].redirect.scheme",
        ),
    ] {
        let e = err(&format!("{base}{extra}\n"));
        assert_eq!(e.path(), path, "{extra}: {e}");
    }
    // A listener's redirect answers every request on it; one to its own scheme and nothing
    // else would loop.
    let listener = |redirect: &str, tls: bool| {
        let tls = match tls {
            true => "tls = { certificates = [\"c\"] }\n",
            false => "",
        };
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n{tls}redirect = {redirect}\n\
             [[listeners]]\naddress = \"127.0.0.1:0\"\n"
        )
    };
    let s = compile(&listener("{ scheme = \"https\", port = 8443 }", false)).unwrap();
    let r = s.listener_redirects[0].as_deref().unwrap();
    assert_eq!((r.scheme.as_deref(), r.port), (Some("https"), Some(8443)));
    assert!(s.listener_redirects[1].is_none());
    assert_eq!(
        err(&listener("{ scheme = \"http\" }", false)).path(),
        "listeners[0].redirect"
    );
    assert_eq!(
        err(&listener("{ status = 399, scheme = \"https\" }", false)).path(),
        "listeners[0].redirect.status"
    );
    // Nor may one keep scheme, host and port: a path alone, or the listener's own port.
    let on = |address: &str, redirect: &str| {
        format!("[[listeners]]\naddress = \"{address}\"\nredirect = {redirect}\n")
    };
    for (address, redirect) in [
        ("127.0.0.1:0", "{ path = \"/\" }"),
        ("127.0.0.1:8080", "{ port = 8080 }"),
        (
            "127.0.0.1:8080",
            "{ scheme = \"http\", port = 8080, path = \"/x\" }",
        ),
    ] {
        let e = err(&on(address, redirect));
        assert_eq!(e.path(), "listeners[0].redirect", "{redirect}");
        assert!(e.to_string().contains("again and again"), "{e}");
        // A config stored by an earlier build that took it still starts, noting it.
        let stored = parse_config(&on(address, redirect), Format::Toml).unwrap();
        let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
    compile(&on("127.0.0.1:8080", "{ port = 8081 }")).unwrap();
    compile(&on("127.0.0.1:8080", "{ host = \"www.test\" }")).unwrap();
    // A trailing dot ends a fully qualified name.
    compile(&format!("{base}redirect = {{ host = \"docs.test.\" }}\n")).unwrap();
}

#[test]
fn upstream_tls_is_checked_and_compiled() {
    const PEM: &str = include_str!("../testdata/api.pem");
    const KEY: &str = include_str!("../testdata/api.key");
    let up = |protocol: &str, tls: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
             targets = [{{ address = \"127.0.0.1:1\" }}]\n{protocol}{tls}\n\
             [[certificates]]\nid = \"client\"\ncert_pem = \"\"\"{PEM}\"\"\"\nkey_pem = \"\"\"{KEY}\"\"\"\n"
        )
    };
    let ca = format!("ca_pem = \"\"\"{PEM}\"\"\"");
    let ok = compile(&up(
        "",
        &format!("tls = {{ server_name = \"api.example\", {ca} }}"),
    ))
    .unwrap();
    let tls = ok.upstreams[0].tls.as_ref().unwrap();
    assert_eq!(tls.config.alpn_protocols, [b"http/1.1".to_vec()]);
    // What the authorities' text was, in the stored config: a changed file shows.
    let stored = ok.config.upstreams[0].tls.as_ref().unwrap();
    let digest = crate::tls::sha256_hex(PEM.as_bytes());
    assert_eq!(stored.ca_sha256.as_deref(), Some(digest.as_str()));
    let name = tls.name_for(Some("other.example"), [127, 0, 0, 1].into());
    assert_eq!(name.to_str(), "api.example");
    // Health checks go over the same TLS.
    let hc = "health_check = { path = \"/h\" }\n";
    let s = compile(&up(hc, &format!("tls = {{ {ca} }}"))).unwrap();
    assert_eq!(
        s.upstreams[0].health_check.as_ref().unwrap().tls.as_ref(),
        s.upstreams[0].tls.as_ref()
    );
    // Without `server_name`: the target's host name, else its address.
    let tls = s.upstreams[0].tls.as_ref().unwrap();
    assert_eq!(
        tls.name_for(Some("svc.internal"), [10, 0, 0, 1].into())
            .to_str(),
        "svc.internal"
    );
    assert_eq!(
        tls.name_for(None, [10, 0, 0, 1].into()).to_str(),
        "10.0.0.1"
    );
    // HTTP/2 over TLS offers h2; so does gRPC over TLS; a client certificate by id.
    let s = compile(&up(
        "protocol = \"h2\"\n",
        &format!("tls = {{ {ca}, certificate = \"client\" }}"),
    ))
    .unwrap();
    let tls = s.upstreams[0].tls.as_ref().unwrap();
    assert_eq!(tls.config.alpn_protocols, [b"h2".to_vec()]);
    assert!(tls.config.client_auth_cert_resolver.has_certs());
    let s = compile(&up("protocol = \"grpc\"\n", "tls = { verify = false }")).unwrap();
    assert_eq!(
        s.upstreams[0].tls.as_ref().unwrap().config.alpn_protocols,
        [b"h2".to_vec()]
    );
    // A private key in `ca_pem` is refused; a config stored by an earlier build that took
    // one still starts, noting it (the first version of the rule stopped such a gateway
    // from starting on its own state, exit 2).
    let with_key = up("", &format!("tls = {{ ca_pem = \"\"\"{PEM}{KEY}\"\"\" }}"));
    assert_eq!(err(&with_key).path(), "upstreams[0].tls.ca_pem");
    let stored = parse_config(&with_key, Format::Toml).unwrap();
    let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    // Nothing trusted, nothing to digest; one given is replaced.
    let given = "tls = { verify = false, ca_sha256 = \"00\" }";
    let s = compile(&up("", given)).unwrap();
    assert_eq!(s.config.upstreams[0].tls.as_ref().unwrap().ca_sha256, None);

    for (protocol, tls, path, says) in [
        (
            "protocol = \"h2\"\n",
            "",
            "upstreams[0].protocol",
            "needs `tls`",
        ),
        (
            "protocol = \"h2c\"\n",
            "tls = { verify = false }",
            "upstreams[0].protocol",
            "cleartext",
        ),
        (
            "",
            "tls = { ca_pem = \"junk\" }",
            "upstreams[0].tls.ca_pem",
            "no PEM certificate",
        ),
        (
            "",
            "tls = { ca_file = \"/nonexistent/ca.pem\" }",
            "upstreams[0].tls.ca_file",
            "cannot read",
        ),
        (
            "",
            "tls = { server_name = \"a b\" }",
            "upstreams[0].tls.server_name",
            "neither",
        ),
        (
            "",
            "tls = { min_version = \"1.1\" }",
            "upstreams[0].tls.min_version",
            "\"1.2\"",
        ),
        (
            "",
            "tls = { certificate = \"nope\" }",
            "upstreams[0].tls.certificate",
            "\"nope\"",
        ),
        (
            "",
            "tls = { verify = false, ca_pem = \"x\" }",
            "upstreams[0].tls.verify",
            "would not be used",
        ),
        (
            "",
            "tls = { verfy = false }",
            "upstreams[0].tls.verfy",
            "unknown field",
        ),
    ] {
        let e = err(&up(protocol, tls));
        assert_eq!(e.path(), path, "{tls}: {e}");
        assert!(e.to_string().contains(says), "{tls}: {e}");
    }
}

#[test]
fn error_messages_never_quote_a_private_key() {
    let key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\n-----END PRIVATE KEY-----\n";
    // Given where a list of names belongs: the parser quotes the string it got.
    let text = format!(
        "[[certificates]]\nid = \"c\"\nnames = {:?}\ncert_pem = \"x\"\nkey_pem = \"y\"\n",
        key
    );
    let e = parse_config(&text, Format::Toml).unwrap_err().to_string();
    assert!(!e.contains("MIIE"), "{e}");
    assert!(e.contains("<private key>"), "{e}");
    // Nor as a map key, which the path names.
    let text = format!(
        "[[routes]]\nid = \"r\"\npath = \"/\"\nrespond = {{ body = \"x\" }}\n\
         request_headers = {{ set = {{ {:?} = 5 }} }}\n",
        key
    );
    let e = parse_config(&text, Format::Toml).unwrap_err().to_string();
    assert!(!e.contains("MIIE"), "{e}");
    // In one pass: a long text of labels takes linear time (it took 0.56 s per MiB).
    let many = "PRIVATE KEY----- -----END PRIVATE KEY----- ".repeat(50_000);
    let started = std::time::Instant::now();
    let cut = without_private_keys(many);
    assert_eq!(cut, "<private key> ".repeat(50_000));
    println!("{:?} for 2 MB of labels", started.elapsed());
    // Escaped, two of them, one without its end, an EC key's label.
    for (given, want) in [
        (format!("a {key:?} b"), "a \"<private key>\\n\" b"),
        (
            "x -----BEGIN EC PRIVATE KEY-----\\nAAA\\n-----END EC PRIVATE KEY----- y \
             -----BEGIN PRIVATE KEY-----\\nBBB"
                .to_owned(),
            "x <private key> y <private key>",
        ),
        ("no key here".to_owned(), "no key here"),
    ] {
        assert_eq!(without_private_keys(given), want);
    }
}

#[test]
fn a_health_check_expects_final_statuses_only() {
    let text = |statuses: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
             targets = [{{ address = \"127.0.0.1:1\" }}]\n\
             health_check = {{ path = \"/h\", expect_status = [{statuses}] }}\n"
        )
    };
    // A check skips interim answers: a 1xx listed could never pass.
    let e = err(&text("200, 103"));
    assert_eq!(e.path(), "upstreams[0].health_check.expect_status");
    assert!(e.to_string().contains("interim"), "{e}");
    let s = compile(&text("204, 599")).unwrap();
    assert_eq!(
        *s.upstreams[0].health_check.as_ref().unwrap().expect_status,
        [204, 599]
    );
    // A config stored by an earlier build that took one still starts without it.
    for (statuses, kept) in [("200, 103", [200]), ("101", [200])] {
        let config = parse_config(&text(statuses), Format::Toml).unwrap();
        let (s, notes) = Snapshot::compile_stored(config, 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        let hc = s.upstreams[0].health_check.as_ref().unwrap();
        assert_eq!(*hc.expect_status, kept, "{statuses}");
    }
}

#[test]
fn a_grpc_health_check_lists_no_statuses() {
    let text = |statuses: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
             protocol = \"grpc\"\ntargets = [{{ address = \"127.0.0.1:1\" }}]\n\
             health_check = {{ path = \"/grpc.health.v1.Health/Check\"{statuses} }}\n"
        )
    };
    // A failed call is no status to list: one listing 503 passed a NOT_SERVING target.
    let e = err(&text(", expect_status = [200, 503]"));
    assert_eq!(e.path(), "upstreams[0].health_check.expect_status");
    assert!(e.to_string().contains("grpc-status 0 only"), "{e}");
    for ok in ["", ", expect_status = [200]"] {
        let s = compile(&text(ok)).unwrap();
        assert_eq!(
            *s.upstreams[0].health_check.as_ref().unwrap().expect_status,
            [200]
        );
    }
    // Stored by an earlier build: starts, passing on grpc-status 0 only, the note naming
    // the upstream.
    let config = parse_config(&text(", expect_status = [503]"), Format::Toml).unwrap();
    let (s, notes) = Snapshot::compile_stored(config, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("upstreams[0].health_check.expect_status: "),
        "{notes:?}"
    );
    assert_eq!(
        *s.upstreams[0].health_check.as_ref().unwrap().expect_status,
        [200]
    );
}

#[test]
fn one_target_spelled_two_ways_is_refused() {
    let text = |a: &str, b: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
             targets = [{{ address = \"{a}\" }}, {{ address = \"{b}\", weight = 3 }}]\n"
        )
    };
    for (a, b) in [
        ("127.0.0.1:80", "127.0.0.1:80"),
        ("127.0.0.1:80", "127.0.0.1:080"),
        ("[::1]:80", "[0::1]:80"),
        ("api.test:80", "API.test.:80"),
    ] {
        // Before, the second was merged into the first at run time, its weight dropped.
        let e = err(&text(a, b));
        assert_eq!(e.path(), "upstreams[0].targets[1].address", "{a} {b}");
        // A config stored by an earlier build that took it still starts, with the first.
        let config = parse_config(&text(a, b), Format::Toml).unwrap();
        if a == b {
            assert!(Snapshot::compile_stored(config, 1).is_err(), "never taken");
            continue;
        }
        let (s, notes) = Snapshot::compile_stored(config, 1).unwrap();
        assert_eq!(notes.len(), 1, "{a} {b}: {notes:?}");
        assert_eq!(s.upstreams[0].targets.len(), 1);
        assert_eq!(s.upstreams[0].targets[0].weight, 1);
    }
    assert!(compile(&text("127.0.0.1:80", "127.0.0.2:80")).is_ok());
    assert!(compile(&text("api.test:80", "api.test:81")).is_ok());
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    // Before, a syntax error (as a SIGHUP of a file cut short logs it) said no line.
    let e = err("[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes\n");
    assert!(e.to_string().ends_with("(line 3)"), "{e}");
    // An error in a value: its own line, also when it starts the line.
    let e = err("[[listeners]]\naddress = \"127.0.0.1:0\"\n[limits]\nmax_connections = \"x\"\n");
    assert!(e.to_string().ends_with("(line 4)"), "{e}");
}

#[test]
fn a_wildcard_under_an_ip_address_is_refused() {
    // No request can carry a name under an IP address: `a.[::1]` is no Host (before,
    // accepted and matching nothing).
    let route = |host: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/\"\n\
             hosts = [\"{host}\"]\nrespond = {{ body = \"x\" }}\n"
        )
    };
    let domain = |host: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[policies]]\nid = \"d\"\n\
             kind = \"domain\"\nhosts = [\"{host}\"]\n"
        )
    };
    for (text, at) in [
        (route("*.[::1]"), "routes[0].hosts[0]"),
        (domain("*.[::1]"), "policies[0].hosts[0]"),
    ] {
        let e = err(&text);
        assert_eq!(e.path(), at);
        assert!(
            e.to_string()
                .contains("wildcard names the names under a DNS name"),
            "{e}"
        );
        // Stored by an earlier build: starts, noting it.
        let (_, notes) =
            Snapshot::compile_stored(parse_config(&text, Format::Toml).unwrap(), 1).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
    assert!(compile(&route("[::1]")).is_ok());
    assert!(compile(&domain("*.example.com")).is_ok());
}

#[test]
fn cors_origins_are_the_ones_browsers_send() {
    let cors = |origin: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[policies]]\nid = \"c\"\nkind = \"cors\"\n\
             origins = [\"{origin}\"]\n"
        )
    };
    // Before, each was accepted and never matched a request's Origin.
    for bad in [
        "https://*.example.com",
        "https://user@a.example.com",
        "https://a.example.com#x",
        "https://a.example.com?x",
        "http://a.example.com:abc",
        "http://a.example.com:0",
        "http://a.example.com:70000",
        "https://[::1",
        "https://a..example.com",
        "ftp://a.example.com",
        // Browsers read these as 127.0.0.1, and send that.
        "http://127.0.0.01:8080",
        "http://2130706433",
        "http://a.0x7f",
    ] {
        let e = err(&cors(bad));
        assert_eq!(e.path(), "policies[0].origins[0]", "{bad}");
        assert!(
            e.to_string().contains("not an origin a browser sends"),
            "{bad}: {e}"
        );
    }
    // A default port is left out and a port written as a number, as browsers write them.
    for (written, compiled) in [
        ("https://A.example.com:443", "https://a.example.com"),
        ("http://a.example.com:080", "http://a.example.com"),
        ("https://a.example.com:08443", "https://a.example.com:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://127.0.0.1", "http://127.0.0.1"),
        // A fully qualified name, as a page at it sends it.
        ("https://example.com.", "https://example.com."),
        // IP addresses as browsers write them (before, as written: never matched).
        ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
        ("http://[::FFFF:127.0.0.1]", "http://[::ffff:7f00:1]"),
        (
            "http://[2001:DB8:0:0:1:0:0:1]",
            "http://[2001:db8::1:0:0:1]",
        ),
        ("http://[1:0:0:2:0:0:0:3]", "http://[1:0:0:2::3]"),
        ("http://[1:2:3:4:5:6:7:0]", "http://[1:2:3:4:5:6:7:0]"),
        ("http://127.0.0.1.", "http://127.0.0.1"),
    ] {
        let s = compile(&cors(written)).unwrap();
        let crate::policy::PolicyKind::Cors(c) = &s.policies.list[0].kind else {
            panic!("a cors policy")
        };
        assert_eq!(&*c.origins[0], compiled.as_bytes(), "{written}");
    }
    // A stored config that took a wildcard (never matching) still starts, noting it.
    let stored = parse_config(&cors("https://*.example.com"), Format::Toml).unwrap();
    let (_, notes) = Snapshot::compile_stored(stored, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
}

#[test]
fn a_listener_naming_one_certificate_twice_is_refused() {
    const PEM: &str = include_str!("../testdata/api.pem");
    const KEY: &str = include_str!("../testdata/api.key");
    let text = |ids: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ certificates = {ids} }}\n\
             [[certificates]]\nid = \"c\"\ncert_pem = \"\"\"{PEM}\"\"\"\n\
             key_pem = \"\"\"{KEY}\"\"\"\n"
        )
    };
    compile(&text("[\"c\"]")).unwrap();
    let e = compile(&text("[\"c\", \"c\"]")).unwrap_err();
    assert_eq!(e.path(), "listeners[0].tls.certificates[1]");
    assert!(e.to_string().contains("listed twice"), "{e}");
    // A config stored by an earlier build that took it still starts, noting it.
    let config = parse_config(&text("[\"c\", \"c\"]"), Format::Toml).unwrap();
    let (_, notes) = Snapshot::compile_stored(config, 1).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
}

#[test]
fn two_routes_for_one_ipv6_address_written_two_ways_clash() {
    // The router files `[0:0::1]` as `[::1]`: the second could never be chosen (the review of
    // b1924b6 found both taken, the second unreachable).
    let text = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                [[routes]]\nid = \"a\"\npath = \"/x\"\nhosts = [\"[::1]\"]\n\
                respond = { body = \"a\" }\n[[routes]]\nid = \"b\"\npath = \"/x\"\n\
                hosts = [\"[0:0::1]\"]\nrespond = { body = \"b\" }\n";
    let e = compile(text).map(drop).expect_err("refused");
    assert!(e.to_string().contains("could never be chosen"), "{e}");
    let s = compile(&text.replace("[0:0::1]", "[::2]")).unwrap();
    assert_eq!(route_id(&s, Some("[0::2]:80"), "/x", "GET"), Some("b"));
}
