//! Where the gateway's events go: the `log` facade, written to stderr one line each as
//! `gateway: <message>` (warnings and errors say so), which is what systemd's journal and the
//! tests read. The access log is separate (`dataplane::access_log`).

use std::io::Write;

/// The stderr logger.
#[derive(Debug)]
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            _ => "",
        };
        // One write per line, so lines from several threads never interleave.
        let line = format!("gateway: {level}{}\n", record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger (once; later calls keep the first).
pub fn init() {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
