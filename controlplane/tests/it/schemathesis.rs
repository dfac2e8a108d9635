//! Schemathesis (from PyPI; `scripts/test` installs it) against the admin API's own OpenAPI
//! document, with all its checks: every response must match the document, schema-valid input
//! must be accepted or refused for a documented reason, schema-violating input refused, no 5xx.

use std::path::Path;
use std::process::Command;

use crate::support::*;

#[test]
fn schemathesis_all_checks_pass() {
    let origin = Origin::echo();
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"origin\"\ntargets = [{{ address = \"{}\" }}]\n[[routes]]\nid = \"health\"\npath = \"/health\"\nrespond = {{ body = \"ok\" }}\n",
        origin.addr
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let settings = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".to_owned());
    let out = Command::new("st")
        .arg("--config-file")
        .arg(&settings)
        .arg("run")
        .arg(format!("http://{}/v1/openapi.json", gw.admin))
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args(["--checks", "all", "--max-examples", "40", "--seed", &seed])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis (`st`) is needed: scripts/test installs it with pip");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "schemathesis found failures (seed {seed})"
    );
    assert!(
        stdout.contains("Tested: 57"),
        "not every operation was tested"
    );
}
