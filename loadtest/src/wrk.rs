//! Running wrk pinned to its CPUs and reading its report.

use anyhow::{bail, Context, Result};

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// Runs `wrk --latency` against `url`, sending the API key the `gateway+policies` route wants.
pub fn run(
    cpus: &str,
    threads: usize,
    connections: usize,
    seconds: u64,
    url: &str,
) -> Result<WrkResult> {
    let out = crate::procs::command("taskset")
        .args(["-c", cpus, "wrk", "--latency"])
        .arg(format!("-t{threads}"))
        .arg(format!("-c{}", connections.max(threads)))
        .arg(format!("-d{seconds}s"))
        .args(["-H", &format!("X-Api-Key: {}", crate::procs::API_KEY)])
        .arg(url)
        .output()
        .context("running wrk; is it installed (apt-get install wrk)?")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

/// Runs `wrk --latency` with a Lua `script` (plain, no API key) against `url`.
pub fn run_script(
    cpus: &str,
    connections: usize,
    seconds: u64,
    script: Option<&std::path::Path>,
    url: &str,
) -> Result<WrkResult> {
    let mut cmd = crate::procs::command("taskset");
    cmd.args(["-c", cpus, "wrk", "--latency", "-t1"])
        .arg(format!("-c{}", connections.max(1)))
        .arg(format!("-d{seconds}s"));
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50_us = micros(v)?,
            ["99%", v] => r.p99_us = micros(v)?,
            [n, "requests", "in", took, ..] => {
                r.requests = n.parse()?;
                r.seconds = seconds(took.trim_end_matches(','))?;
            }
            ["Requests/sec:", v] => r.rps = v.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if r.requests == 0 {
        bail!("no requests completed");
    }
    Ok(r)
}

/// A run's length as wrk prints it (`5.00s`, `1.00m` from a minute on, `1.00h`), in
/// seconds.
fn seconds(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (v.strip_suffix('s').unwrap_or(v), 1.0)
    };
    Ok(num.parse::<f64>()? * scale)
}

/// `831.00us`, `1.36ms`, `2.00s` in microseconds.
fn micros(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("latency {v:?}")
    };
    Ok(num.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report() {
        let text = "Running 5s test @ http://127.0.0.1:9102/13b\n  1 threads and 50 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     0.90ms  222.74us   5.06ms   73.99%\n  Latency Distribution\n     50%  831.00us\n     75%    1.00ms\n     90%    1.10ms\n     99%    1.36ms\n  268000 requests in 5.00s, 33.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 5\nRequests/sec:  53550.29\nTransfer/sec:      6.62MB\n";
        let r = parse(text).unwrap();
        assert_eq!((r.requests, r.non_2xx, r.socket_errors), (268000, 5, 3));
        assert_eq!((r.p50_us, r.p99_us, r.seconds), (831.0, 1360.0, 5.0));
        assert!((r.rps - 53550.29).abs() < 1e-6);
        // From a minute on wrk gives the run's length in minutes (before: refused).
        let long = text.replace("in 5.00s,", "in 1.50m,");
        assert_eq!(parse(&long).unwrap().seconds, 90.0);
    }
}
