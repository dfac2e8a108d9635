//! Runs the HTTP/1.1 intermediary conformance cases (`conformance/`, from the team's shared
//! suite) against the gateway, with the suite's own logging origin, under both drivers.
//! Every MUST case has to pass; the runner exits non-zero on any failure.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

both_drivers!(conformance_cases_pass);

/// The same cases over TLS (io_uring only: the TLS layer is the same on both drivers).
#[test]
fn conformance_cases_pass_over_tls() {
    run(Driver::IoUring, true);
}

/// Kills the origin process when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn conformance_cases_pass(driver: Driver) {
    run(driver, false);
}

fn run(driver: Driver, tls: bool) {
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance");
    let dir = temp_dir("conformance");
    let log = dir.join("origin.jsonl");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _origin = Killed(
        Command::new("python3")
            .arg(suite.join("standin/origin.py"))
            .env("ORIGIN_PORT", port.to_string())
            .env("ORIGIN_LOG", &log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the conformance suite"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "conformance origin did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let origin = format!("127.0.0.1:{port}").parse().unwrap();
    let mut config = proxy_config(origin, "[timeouts]\nupstream_response_head_ms = 3000\n");
    if tls {
        let cert = crate::tls::Cert::new(&dir, "localhost");
        config = config.replacen(
            "address = \"127.0.0.1:0\"\n",
            "address = \"127.0.0.1:0\"\ntls = { certificates = [\"local\"] }\n",
            1,
        );
        config.push_str(&format!(
            "\n[[certificates]]\nid = \"local\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.cert.display(),
            cert.key.display()
        ));
    }
    let gw = Gateway::start(&config, driver);
    let out = Command::new("python3")
        .arg(suite.join("run_cases.py"))
        .args(tls.then_some("--tls"))
        .arg("--proxy")
        .arg(gw.addr.to_string())
        .arg("--origin-log")
        .arg(&log)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(out.status.success(), "conformance failures: {summary}");
    assert!(summary.contains(" 0 failed"), "{summary}");
    let passed: usize = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 60, "only {passed} cases ran: {summary}");
}
