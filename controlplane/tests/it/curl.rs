//! curl as the client: keep-alive reuse, a chunked upload, a 10 MiB download.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::support::*;

both_drivers!(curl_keep_alive_upload_and_download);

const BIG: usize = 10 * 1024 * 1024;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 256) as u8).collect()
}

fn curl_keep_alive_upload_and_download(driver: Driver) {
    let origin = Origin::start(Arc::new(|req: &Received, s: &mut TcpStream| {
        if req.request_line().starts_with("GET /big") {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
            let _ = s.write_all(&pattern(BIG));
        } else {
            let body = match decode_chunked(&req.raw_body) {
                Some((data, _)) => data,
                None => req.raw_body.clone(),
            };
            let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
            let text = format!("{} bytes, sum {sum}", body.len());
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
        }
        Keep::Open
    }));
    let gw = Gateway::start(
        &proxy_config(origin.addr, "[limits]\nmax_body_bytes = 4194304\n"),
        driver,
    );
    let base = format!("http://{}", gw.addr);

    // Two URLs in one curl run share one connection: the second transfer makes no connect.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}:%{num_connects} ",
        ])
        .arg(format!("{base}/one"))
        .arg(format!("{base}/two"))
        .output()
        .expect("curl is needed (scripts/test installs it)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200:1 200:0 ");

    // Chunked upload from stdin.
    let upload = pattern(3 * 1024 * 1024 + 17);
    let mut child = Command::new("curl")
        .args([
            "-s",
            "-T",
            "-",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect:",
        ])
        .arg(format!("{base}/upload"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&upload).unwrap();
    let out = child.wait_with_output().unwrap();
    let sum: u64 = upload.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{} bytes, sum {sum}", upload.len())
    );
    let seen = origin.requests();
    let up = seen
        .iter()
        .find(|r| r.request_line().starts_with("PUT /upload"))
        .unwrap();
    assert_eq!(up.header("transfer-encoding"), Some("chunked"));

    // 10 MiB download, byte-exact.
    let dir = temp_dir("curl");
    let file = dir.join("big");
    let out = Command::new("curl")
        .args(["-s", "-o"])
        .arg(&file)
        .args(["-w", "%{http_code} %{size_download}"])
        .arg(format!("{base}/big"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("200 {BIG}"));
    assert!(
        std::fs::read(&file).unwrap() == pattern(BIG),
        "downloaded bytes differ"
    );
}
