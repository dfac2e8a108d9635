//! The `gateway` command line: `--check`, exit codes, error messages that name the field.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn gateway(args: &[&str]) -> (Option<i32>, String, String) {
    gateway_env(args, &[])
}

/// [`gateway`] with more environment variables.
fn gateway_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(args).env("GATEWAY_IO_DRIVER", "auto");
    if args.contains(&"--config") {
        cmd.arg("--data-dir").arg(temp_dir("cli-data"));
    }
    let out = cmd.envs(env.iter().copied()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> String {
    let path = temp_dir("cli").join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn check_accepts_a_valid_file() {
    let f = write(
        "ok.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/\"\nrespond = {}\n",
    );
    for args in [["--check", &f], ["validate", &f]] {
        let (code, out, _) = gateway(&args);
        assert_eq!(code, Some(0));
        assert!(
            out.ends_with("OK (1 listener(s), 0 upstream(s), 1 route(s))\n"),
            "{out}"
        );
    }
}

#[test]
fn check_and_run_refuse_an_invalid_file_naming_the_field() {
    let f = write(
        "bad.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/\"\nupstream = \"missing\"\n",
    );
    for args in [vec!["--check", &f], vec!["--config", &f]] {
        let (code, _, err) = gateway(&args);
        assert_eq!(code, Some(2));
        assert!(
            err.contains("invalid config: routes[0].upstream: unknown upstream \"missing\""),
            "{err}"
        );
    }
    let json = write("bad.json", "{\"listeners\": [{\"address\": 80}]}");
    let (code, _, err) = gateway(&["--check", &json]);
    assert_eq!(code, Some(2));
    assert!(err.contains("listeners[0].address: invalid type"), "{err}");
    let (code, _, err) = gateway(&["--check", "/nonexistent/gateway.toml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/gateway.toml"), "{err}");
}

#[test]
fn help_goes_to_a_reader_that_stops_early_without_a_panic() {
    // `gateway --help | head -1`: the pipe closes under the manual (before: a panic
    // message, "failed printing to stdout: Broken pipe", and exit 101).
    let file = write(
        "pipe.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    // And `validate FILE`'s OK line (the review found it panicking the same way).
    for args in [
        &["--help"][..],
        &["validate", "--help"],
        &["--version"],
        &["validate", &file],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn an_admin_token_file_no_header_can_carry_is_refused_at_start() {
    // Before: taken, and every API call then 401 (no client can send `ö` in a header the
    // API reads).
    let dir = temp_dir("token-file");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("data/admin-token"),
        "t\u{f6}ken-0123456789abcdef\n",
    )
    .unwrap();
    let f = write(
        "token-file.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--config", &f, "--data-dir"])
        .arg(dir.join("data"))
        .env_remove("GATEWAY_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // One that starts (the old behaviour) is stopped after 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no HTTP header can carry"), "{err}");
}

#[test]
fn check_takes_a_node_file_whose_listeners_name_what_the_store_holds() {
    // A node file's listener policies and certificates live in the store (the shared
    // config): `validate --node` says it does not check those, and checks the rest (before:
    // exit 2 for `unknown policy`, a file the same binary starts with --store).
    let node = "[cluster]\nnode_id = \"n1\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                policies = [\"ipf\"]\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                tls = { certificates = [\"api\"] }\n";
    let f = write("node.toml", node);
    let (code, out, err) = gateway(&["validate", "--node", &f]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("OK (2 listener(s)"), "{out}");
    assert!(
        err.contains("listeners[0].policies[0] \"ipf\"")
            && err.contains("listeners[1].tls.certificates[0] \"api\""),
        "{err}"
    );
    // Without --node it is checked as the start without --store would, and told how; not
    // for a listener error of another kind.
    let (code, _, err) = gateway(&["validate", &f]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("validate --node"), "{err}");
    let f2 = write(
        "wrong-kind.toml",
        "[[policies]]\nid = \"rl\"\nkind = \"rate_limit\"\nrate = 10\n\
         [[listeners]]\naddress = \"127.0.0.1:0\"\npolicies = [\"rl\"]\n",
    );
    let (code, _, err) = gateway(&["validate", &f2]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("validate --node"), "{err}");
    // The rest is checked all the same: the listener's TLS settings, a policy of the wrong
    // kind named at its own place in the list (the review found the tls block skipped
    // whole, and the fields renumbered).
    let cases = [
        (
            "tls = { certificates = [\"api\"], min_version = \"1.1\" }",
            "tls.min_version",
        ),
        (
            "tls = { certificates = [\"api\"] }\nh2c = true",
            "listeners[0].h2c",
        ),
        ("policies = [\"ipf\", \"rl\"]", "listeners[0].policies[1]"),
        // Listed twice, the store's as much as the file's (the second review).
        ("policies = [\"ipf\", \"ipf\"]", "listeners[0].policies[1]"),
        (
            "tls = { certificates = [\"api\", \"api\"] }",
            "listeners[0].tls.certificates[1]",
        ),
    ];
    for (listener, field) in cases {
        let text = format!(
            "[cluster]\nnode_id = \"n1\"\n[[policies]]\nid = \"rl\"\nkind = \"rate_limit\"\n\
             rate = 10\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{listener}\n"
        );
        let f = write("node-bad.toml", &text);
        let (code, _, err) = gateway(&["validate", "--node", &f]);
        assert_eq!(code, Some(2), "{listener}: {err}");
        assert!(err.contains(field), "{listener}: {err}");
    }
    // A file with [cluster] for Redis limits alone is no node file unless said: a dangling
    // listener policy is the error it is at its start.
    let f = write(
        "single.toml",
        "[cluster]\nnode_id = \"gw-1\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         policies = [\"ipf\"]\n",
    );
    let (code, _, err) = gateway(&["validate", &f]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown policy \"ipf\""), "{err}");
}

#[test]
fn check_refuses_an_exposed_admin_api_without_a_token_as_the_start_does() {
    // Before, `--check` said OK and the start then refused it (exit 2).
    let f = write(
        "open-admin.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:0\"\n",
    );
    for args in [vec!["--check", &f], vec!["--config", &f]] {
        let (code, _, err) = gateway(&args);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(err.contains("is not a loopback address"), "{err}");
    }
    let with_token = write(
        "token-admin.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:0\"\n\
         token = \"0123456789abcdef0123\"\n",
    );
    assert_eq!(gateway(&["--check", &with_token]).0, Some(0));
}

#[test]
fn check_says_what_a_start_with_a_store_would_refuse_in_the_cluster_secret() {
    // Before, `--check` said nothing of it, and `--store` then refused the node file (exit
    // 2). A start without `--store` never reads it: a warning, not a refusal.
    let dir = temp_dir("cli-secret");
    let short = dir.join("short.key");
    std::fs::write(&short, "abc\n").unwrap();
    let good = dir.join("good.key");
    std::fs::write(&good, format!("{}\n", "0f".repeat(32))).unwrap();
    for (secret, said) in [
        ("/nonexistent/cluster.key".into(), Some("No such file")),
        (short.display().to_string(), Some("expected 64 hex digits")),
        (good.display().to_string(), None),
    ] {
        let f = write(
            "node-secret.toml",
            &format!(
                "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
                 [cluster]\nnode_id = \"a\"\nsecret_file = \"{secret}\"\n"
            ),
        );
        let (got, out, err) = gateway(&["--check", &f]);
        assert_eq!(got, Some(0), "{secret}: {err}");
        assert!(out.contains("OK"), "{out}");
        match said {
            Some(said) => assert!(
                err.contains("warning") && err.contains(said) && err.contains("--store"),
                "{secret}: {err}"
            ),
            None => assert!(!err.contains("warning"), "{err}"),
        }
    }
}

#[test]
fn check_refuses_an_access_log_that_names_a_directory_as_the_start_does() {
    // Every line would be lost; before, `--check` said OK and the start then refused it.
    let dir = temp_dir("cli-log-dir");
    for path in [
        dir.display().to_string(),
        format!("{}/not-yet/", dir.display()),
    ] {
        let f = write(
            "log-dir.toml",
            &format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[access_log]\npath = \"{path}\"\n"),
        );
        for args in [vec!["--check", &f], vec!["--config", &f]] {
            let (code, _, err) = gateway(&args);
            assert_eq!(code, Some(2), "{args:?}: {err}");
            assert!(err.contains("is a directory"), "{args:?}: {err}");
        }
    }
}

#[test]
fn check_refuses_a_malformed_admin_token_in_the_environment_as_the_start_does() {
    // Before, `--check` said OK and the start then refused it.
    let f = write(
        "env-token.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    for args in [vec!["--check", &f], vec!["--config", &f]] {
        let (code, _, err) = gateway_env(&args, &[("GATEWAY_ADMIN_TOKEN", "short")]);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("GATEWAY_ADMIN_TOKEN must be"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = gateway_env(
        &["--check", &f],
        &[("GATEWAY_ADMIN_TOKEN", "a-long-enough-token-1")],
    );
    assert_eq!(code, Some(0), "{err}");
    // So is an I/O driver the start would refuse.
    let (code, _, err) = gateway_env(&["--check", &f], &[("GATEWAY_IO_DRIVER", "bogus")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("GATEWAY_IO_DRIVER"), "{err}");
}

#[test]
fn a_start_refused_for_its_environment_or_a_missing_file_writes_nothing() {
    // Before, the data directory was created and seeded, then the start refused.
    let f = write(
        "env-driver.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let missing = temp_dir("cli-missing").join("nothing.toml");
    let cases = [
        (
            f.as_str(),
            ("GATEWAY_IO_DRIVER", "bogus"),
            "GATEWAY_IO_DRIVER",
        ),
        (
            missing.to_str().unwrap(),
            ("GATEWAY_IO_DRIVER", "auto"),
            "cannot read",
        ),
    ];
    for (config, env, says) in cases {
        let data = temp_dir("cli-untouched").join("data");
        let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--config", config, "--data-dir", data.to_str().unwrap()])
            .env(env.0, env.1)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!data.exists(), "{config}: the data directory was made");
    }
}

#[test]
fn an_access_log_inside_the_data_directory_is_refused_before_anything_is_stored() {
    // Its lines would go into the config store's journal or checkpoint.
    let data = temp_dir("cli-log-in-data");
    for name in ["journal.log", "current.json", "sub/access.log"] {
        let f = write(
            "log-in-data.toml",
            &format!(
                "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/\"\n\
                 respond = {{}}\n[access_log]\npath = \"{}/{name}\"\n",
                data.display()
            ),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--config", &f, "--data-dir", data.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name}: the gateway started with its log in the data directory");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains("/access_log/path") && err.contains("inside the data directory"),
            "{name}: {err}"
        );
        assert!(!data.join("journal.log").exists(), "{name}: nothing stored");
    }
}

#[test]
fn an_access_log_over_the_store_url_file_is_refused_before_etcd_is_read() {
    // Before: taken, and the log's lines in the --store-file made the next start fail to
    // read the store (`permission denied`: the password line was no longer the URL).
    let dir = temp_dir("cli-store-file");
    let url = dir.join("store-url");
    // No etcd listens there: the refusal comes before any call.
    std::fs::write(&url, "etcd://gw:pw@127.0.0.1:1/gw\n").unwrap();
    let node = dir.join("node.toml");
    std::fs::write(
        &node,
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[cluster]\nnode_id = \"a\"\n\
             [access_log]\npath = \"{}\"\n",
            url.display()
        ),
    )
    .unwrap();
    let (code, _, err) = gateway(&[
        "--store-file",
        url.to_str().unwrap(),
        "--config",
        node.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("/access_log/path") && err.contains("--store-file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&url).unwrap(),
        "etcd://gw:pw@127.0.0.1:1/gw\n"
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = gateway(&["--frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown argument \"--frobnicate\""), "{err}");
    assert!(err.contains("Try 'gateway --help'"), "{err}");
    let (code, out, _) = gateway(&["--help"]);
    assert_eq!(code, Some(0));
    for section in [
        "NAME",
        "SYNOPSIS",
        "OPTIONS",
        "SIGNALS",
        "EXIT STATUS",
        "--check FILE",
    ] {
        assert!(out.contains(section), "{section}: {out}");
    }
    let (code, out, _) = gateway(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("gateway "), "{out}");
}

#[test]
fn a_port_already_in_use_is_refused() {
    let config = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/\"\nrespond = {}\n";
    let first = Gateway::start(config, Driver::IoUring);
    // Its own admin port is a free one: only the taken listener may be what fails (the
    // default 9901 may be in use on the machine running the tests).
    let taken = format!(
        "{}{ADMIN_SECTION}",
        config.replace("127.0.0.1:0", &first.addr.to_string())
    );
    let f = write("taken.toml", &taken);
    let (code, _, err) = gateway(&["--config", &f]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("cannot listen on {}", first.addr)),
        "{err}"
    );
    // The first instance still answers.
    let mut c = first.connect();
    assert_eq!(c.roundtrip("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    assert!(!c.is_closed_within(Duration::from_millis(100)));
}

#[test]
fn a_restart_right_after_a_crash_comes_up_on_the_same_port() {
    // What a supervisor with Restart=always does: kill -9, then start again at once. The dead
    // process's io_uring releases its listening sockets asynchronously, so the port is still
    // bound for a moment (a few ms on this kernel, so this rarely hits it; the worker's unit
    // test `a_listener_only_io_uring_still_holds_is_waited_out` always does); the new process
    // waits that out instead of exiting with "address in use".
    let config = "workers = 2\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\nid = \"r\"\npath = \"/\"\nrespond = {}\n";
    for round in 0..3 {
        let mut first = Gateway::start(config, Driver::IoUring);
        let addr = first.addr;
        let fixed = write(
            &format!("restart-{round}.toml"),
            &format!(
                "{}{ADMIN_SECTION}",
                config.replace("127.0.0.1:0", &addr.to_string())
            ),
        );
        // A connection in flight when it dies, as in real life.
        let mut c = first.connect();
        assert_eq!(c.roundtrip("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
        first.signal(libc::SIGKILL);
        assert!(first.wait_exit_status(Duration::from_secs(5)).is_some());
        let data = temp_dir("restart").join("data");
        let second = Gateway::start_with_data(std::path::Path::new(&fixed), &data, &[]);
        assert_eq!(second.addr, addr);
        let mut c = second.connect();
        assert_eq!(c.roundtrip("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    }
}

/// `deploy/gateway.service` passes `systemd-analyze verify` (Debian systemd) without a
/// warning, with ExecStart pointing at the binary under test (verify checks that it exists).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/gateway.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/gateway "));
    let dir = temp_dir("unit");
    let path = dir.join("gateway.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/gateway", env!("CARGO_BIN_EXE_gateway")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian systemd) is needed: scripts/test installs it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.trim(), "", "systemd-analyze warned");
    // And it does catch a broken unit.
    std::fs::write(&path, unit.replace("Type=notify", "Type=notifyy")).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("notifyy"));
}

#[test]
fn state_stored_before_a_stricter_rule_still_starts() {
    // A data directory written by a build whose rules were looser (a 204 with a body, a
    // pass_headers entry now refused): the gateway starts on it, leaves out what the new
    // rules refuse, and says so; only a write through the API must fix it.
    let dir = temp_dir("cli-stored-looser");
    let data = dir.join("data");
    stored_by_an_earlier_build(
        &data,
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
             [[routes]]\nid = \"nc\"\npath = \"/nc\"\nrespond = {{ status = 204, body = \"x\" }}\n\
             [[upstreams]]\nid = \"u\"\ntargets = [{{ address = \"127.0.0.1:1\" }}]\n\
             [[aggregates]]\nid = \"a\"\n[[aggregates.steps]]\nid = \"s\"\nupstream = \"u\"\n\
             path = \"/x\"\npass_headers = [\"Forwarded\"]\n{ADMIN_SECTION}"
        ),
    );
    let gw = Gateway::resume(&data, Driver::IoUring);
    let mut c = gw.connect();
    let r = c.roundtrip("GET /nc HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.body.len()), (204, 0), "{}", r.head);
    let warned = gw.wait_log("respond.body", Duration::from_secs(5));
    assert!(
        warned.contains("a write through the API must fix it"),
        "{warned}"
    );
    gw.wait_log("pass_headers[0]", Duration::from_secs(5));
}

#[test]
fn a_signal_during_a_slow_start_does_not_kill_the_process() {
    // An etcd store that accepts and never answers keeps the start waiting (3 s); a SIGHUP
    // meanwhile (a reload right after the start) took its default action and killed the
    // process. Now it waits, and the start ends as it would have: exit 1, saying why.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = write(
        "node.toml",
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\n\
         listen = \"127.0.0.1:0\"\n[cluster]\nnode_id = \"n1\"\n",
    );
    let start = |stderr: std::process::Stdio| {
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--store")
            .arg(format!("etcd://{}/gw", silent.local_addr().unwrap()))
            .arg("--config")
            .arg(&node)
            .arg("--data-dir")
            .arg(temp_dir("cli-signal-data"))
            .stderr(stderr)
            .spawn()
            .unwrap()
    };
    let mut child = start(std::process::Stdio::piped());
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still starting");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}: {err}");
    assert!(err.contains("cannot read the config from etcd"), "{err}");
    // SIGTERM still stops a start at once (Ctrl-C, `systemctl stop`).
    let mut child = start(std::process::Stdio::null());
    std::thread::sleep(Duration::from_millis(300));
    let signalled = std::time::Instant::now();
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
}
