//! The admin dashboard in a real browser: headless Chromium (Debian `chromium`) driven by
//! `tests/ui/dashboard.mjs` through playwright-core (npm; `scripts/test` installs both). It
//! signs in (a wrong token gets 401 first, one no header can carry a message), sees an
//! upstream's backup target marked and a route added through the API appear, watches req/s
//! move under load in two tabs over one live stream, rolls back a revision with its
//! confirmation, shows a diff and the access log, and signs out of a double-clicked sign-in
//! with nothing left running. Screenshots are kept in `target/tmp/dashboard/` as test
//! artifacts.

use std::path::Path;
use std::process::Command;

use crate::support::*;

#[test]
fn the_dashboard_works_in_chromium() {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    assert!(
        ui.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: scripts/test installs it (npm ci in {})",
        ui.display()
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: scripts/test installs Debian's chromium"
    );
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let log = temp_dir("dashboard-log").join("access.log");
    let gw = Gateway::start(
        &format!(
            "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
             [[routes]]\nid = \"hello\"\npath = \"/\"\nrespond = {{ body = \"hello\" }}\n\n\
             [[upstreams]]\nid = \"spare\"\ntargets = [{{ address = \"127.0.0.1:9\" }}, \
             {{ address = \"127.0.0.1:10\", backup = true }}]\n\n\
             [access_log]\npath = \"{}\"\n",
            log.display()
        ),
        Driver::IoUring,
    );
    let out = Command::new("node")
        .current_dir(&ui)
        .arg("dashboard.mjs")
        .arg(format!("http://{}", gw.admin))
        .arg(ADMIN_TOKEN)
        .arg(format!("http://{}", gw.addr))
        .arg(&shots)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node (Debian nodejs) is needed: scripts/test installs it");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed (screenshots in {}): {stdout}{stderr}",
        shots.display()
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    // The rollback honours If-Match: a stale ETag is refused, the current one accepted.
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let stale = gw.admin_with(
        "POST",
        "/v1/revisions/2:rollback",
        None,
        &[("Authorization", &auth), ("If-Match", "\"config-r2\"")],
    );
    assert_eq!(stale.status, 412, "{}", stale.body_str());
    let current = gw.admin_with(
        "POST",
        "/v1/revisions/2:rollback?dry_run=true",
        None,
        &[("Authorization", &auth), ("If-Match", "\"config-r3\"")],
    );
    assert_eq!(current.status, 200, "{}", current.body_str());
    for shot in [
        "01-wrong-token.png",
        "02-route-added.png",
        "03-live-under-load.png",
        "04-rolled-back.png",
        "05-overview.png",
    ] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot} is not a PNG");
    }
}
