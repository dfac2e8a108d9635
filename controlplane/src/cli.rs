//! Command-line parsing for the `gateway` binary (no dependency: the grammar is tiny).

use std::path::PathBuf;

use dataplane::DriverChoice;

/// The short form, printed after a usage error.
pub const SYNOPSIS: &str = "\
usage: gateway [--config FILE] [--data-dir DIR] [--replace-state] [--workers N]
               [--io-driver auto|epoll]
       gateway --store etcd[s]://[USER:PASSWORD@]HOST:PORT[,...]/PREFIX
               --config NODE_FILE [--seed-from DIR] [--data-dir DIR] ...
       gateway validate [--node] FILE | --check [--node] FILE
       gateway --help | --version
Try 'gateway --help' for the manual.";

/// The manual, printed by `--help`.
pub const USAGE: &str = "\
NAME
    gateway - an API gateway: routing, aggregation, traffic policies, TLS and
    HTTP/2 at the edge, gRPC inside

SYNOPSIS
    gateway [--config FILE] [--data-dir DIR] [--replace-state] [--workers N]
            [--io-driver auto|epoll]
    gateway --store etcd[s]://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/PREFIX
            --config NODE_FILE [--seed-from DIR] [--data-dir DIR] [--workers N]
    gateway validate [--node] FILE
    gateway --check [--node] FILE
    gateway --help | --version

DESCRIPTION
    Runs the gateway: data-plane workers (one per CPU by default) serve the
    listeners of the config, and an admin REST API (127.0.0.1:9901 by default,
    bearer token) changes the config at runtime. Every accepted change is kept
    as a numbered revision in the data directory, or in etcd with --store.
    Without --config and without stored state, an embedded demo config listens
    on 127.0.0.1:8080.

OPTIONS
    --config FILE, -c FILE
        TOML (or JSON) config. Seeds an empty data directory; SIGHUP re-reads
        it. With --store: this node's own file (workers, listeners, admin,
        access_log, resolver, [cluster] with node_id).
    --data-dir DIR
        Where config revisions, the generated admin token and private keys are
        kept (default ./data). A stored config is resumed at start.
    --replace-state
        With --config over a data directory that holds a config: make the file
        the next revision. Without it, a file unchanged since the gateway last
        took it resumes the stored config (with the changes made through the
        admin API since), a changed one becomes the next revision when nothing
        changed the config since, and one changed while the config changed too
        is refused (exit 2).
    --store URL
        Share the config with other nodes through etcd (the v3 JSON gateway);
        etcds:// for TLS, with ?ca=FILE[&cert=FILE&key=FILE]. Escape '/', '@',
        ':' and '%' in the user or password as %2F, %40, %3A and %25.
    --store-file FILE
        --store with the URL read from FILE (keeps a password off the command
        line, which other local users can read).
    --seed-from DIR
        With --store: copy the config of the data directory DIR into an empty
        store once (exit 2 if it already holds one).
    --workers N, -w N
        Worker threads, 1 to 1024 (default: workers in the config, else one
        per CPU in the affinity mask).
    --io-driver auto|epoll
        auto (or io_uring, the same) uses io_uring where the kernel allows
        it, else epoll; epoll forces the fallback. Also GATEWAY_IO_DRIVER.
    validate FILE, --check FILE
        Validate FILE as the gateway would at start and exit: 0 valid, 2
        invalid with the offending field named.
    validate --node FILE
        FILE is a node file (for --store): the policies and certificates its
        listeners name and it does not define are the store's, left
        unchecked and named.
    --help, -h
        This manual.
    --version, -V
        The version.

SIGNALS
    SIGTERM, SIGINT   stop accepting, finish requests in flight (up to
                      shutdown.drain_timeout_ms), exit 0
    SIGHUP            re-read --config through the admin API's validation
    SIGUSR1           reopen the access log file (after rotation)
    SIGUSR2           binary upgrade: start the binary at this one's path on
                      the same sockets, hand over, drain; if the new one fails
                      to start, this one goes on serving

ENVIRONMENT
    GATEWAY_ADMIN_TOKEN   the admin API's bearer token (16+ characters)
    GATEWAY_IO_DRIVER     auto or epoll, as --io-driver
    NOTIFY_SOCKET         set by systemd (Type=notify): READY=1 once serving
    MIMALLOC_PURGE_DELAY  ms before unused memory goes back to the kernel
                          (default 10000 here; mimalloc's own is 1000)

FILES
    DATA_DIR/journal.log, DATA_DIR/current.json   config revisions
    DATA_DIR/admin-token                          generated admin token (0600)
    DATA_DIR/applied-file                         the --config file last taken (SHA-256)
    DATA_DIR/lock                                 held by the running gateway (its pid)
    DATA_DIR/keys/                                certificates' private keys
    deploy/gateway.service                        systemd unit

EXIT STATUS
    0 stopped by a signal, or a valid file; 1 a failure to start (a port in
    use, an unreachable store); 2 an invalid config or command line.

EXAMPLES
    gateway                                   # the embedded demo
    gateway --config gateway.toml --data-dir /var/lib/gateway
    gateway validate gateway.toml
    kill -USR2 $(pidof gateway)               # after installing a new binary";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(RunArgs),
    /// The file, and whether it is a node file (`--node`).
    Check(PathBuf, bool),
    Help,
    Version,
}

/// Arguments of a normal run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunArgs {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub replace_state: bool,
    pub workers: Option<usize>,
    pub driver: Option<DriverChoice>,
    /// `--store etcd://...`: the shared config store.
    pub store: Option<String>,
    /// `--seed-from DIR`: a data directory to copy into an empty etcd store.
    pub seed_from: Option<PathBuf>,
    /// `--store-file FILE`: where `store` was read from.
    pub store_file: Option<PathBuf>,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let args: Vec<String> = args.into_iter().collect();
    // `-h` anywhere asks for the manual, also where a value is due (`validate --help`, which
    // was read as a file to check: "invalid config", exit 2).
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    let mut run = RunArgs::default();
    let mut check = None;
    let mut node = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        // A flag that takes no value with one (`--replace-state=false`) must not pass for
        // the bare flag: that one would replace the stored config.
        let bare = matches!(
            flag.as_str(),
            "-h" | "--help" | "-V" | "--version" | "--replace-state" | "--node"
        );
        if bare && inline.is_some() {
            return Err(format!("{flag} takes no value (got {arg:?})"));
        }
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "-c" | "--config" => run.config = Some(PathBuf::from(value("--config")?)),
            "--check" | "validate" => {
                let name = flag.clone();
                let mut file = value(&name)?;
                // `validate --node FILE`, the flag before the file.
                if file == "--node" {
                    node = true;
                    file = value(&name)?;
                }
                check = Some(PathBuf::from(file));
            }
            "--node" => node = true,
            "--data-dir" => run.data_dir = Some(PathBuf::from(value("--data-dir")?)),
            "--replace-state" => run.replace_state = true,
            "--store" => run.store = Some(value("--store")?),
            // The URL (and the password in it) out of the command line, which any local
            // user can read in /proc.
            "--store-file" => {
                let path = value("--store-file")?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("--store-file {path:?}: {e}"))?;
                let url = text.trim();
                // A second line or a comment (another URL, `# production`) would otherwise
                // end up in the key prefix: a line break or control character anywhere, or a
                // space past the credentials (a password may have one, as with `--store`).
                // The text is not shown: it holds the password.
                let past_credentials = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
                if url
                    .chars()
                    .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
                    || past_credentials.chars().any(char::is_whitespace)
                {
                    return Err(format!(
                        "--store-file {path:?}: holds more than the URL on one line (a line \
                         break, a control character, or a space past the user and password: \
                         write one in a path as %20)"
                    ));
                }
                run.store = Some(url.to_owned());
                run.store_file = Some(PathBuf::from(path));
            }
            "--seed-from" => run.seed_from = Some(PathBuf::from(value("--seed-from")?)),
            "-w" | "--workers" => {
                let v = value("--workers")?;
                match v.parse::<usize>() {
                    Ok(n) if (1..=1024).contains(&n) => run.workers = Some(n),
                    _ => return Err(format!("--workers {v:?}: expected a number from 1 to 1024")),
                }
            }
            "--io-driver" => {
                run.driver = Some(match value("--io-driver")?.as_str() {
                    "auto" | "io_uring" => DriverChoice::Auto,
                    "epoll" => DriverChoice::Epoll,
                    other => {
                        return Err(format!(
                            "--io-driver {other:?}: expected auto (or io_uring) or epoll"
                        ))
                    }
                })
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if run.store.is_none() && run.seed_from.is_some() {
        return Err("--seed-from needs --store".to_owned());
    }
    if run.store.is_some() && run.replace_state {
        return Err(
            "--replace-state is for a data directory; with --store, change the shared \
                    config through the admin API"
                .to_owned(),
        );
    }
    if run.replace_state && run.config.is_none() {
        return Err(
            "--replace-state needs --config FILE: it makes that file the next revision".to_owned(),
        );
    }
    if run.store.is_some() && run.config.is_none() {
        return Err("--store needs --config NODE_FILE (with [cluster] node_id)".to_owned());
    }
    match check {
        Some(path) if run == RunArgs::default() => Ok(Command::Check(path, node)),
        Some(_) => Err("--check takes no other option but --node".to_owned()),
        None if node => Err("--node is for validate (or --check)".to_owned()),
        None => Ok(Command::Run(run)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(p(&[]), Ok(Command::Run(RunArgs::default())));
        assert_eq!(
            p(&["--config", "g.toml", "--workers", "2"]),
            Ok(Command::Run(RunArgs {
                config: Some("g.toml".into()),
                workers: Some(2),
                ..RunArgs::default()
            }))
        );
        assert_eq!(
            p(&["--check=g.toml"]),
            Ok(Command::Check("g.toml".into(), false))
        );
        for args in [
            ["validate", "--node", "g.toml"],
            ["validate", "g.toml", "--node"],
        ] {
            assert_eq!(p(&args), Ok(Command::Check("g.toml".into(), true)));
        }
        assert!(p(&["--node"]).is_err());
        assert_eq!(
            p(&["validate", "g.toml"]),
            Ok(Command::Check("g.toml".into(), false))
        );
        assert!(p(&["validate"]).is_err());
        for args in [
            &["validate", "--help"][..],
            &["validate", "-h"],
            &["--check", "--help"],
            &["validate", "--node", "--help"],
            &["--config", "g.toml", "-h"],
        ] {
            assert_eq!(p(args), Ok(Command::Help), "{args:?}");
        }
        assert_eq!(
            p(&["--io-driver", "epoll"]),
            Ok(Command::Run(RunArgs {
                driver: Some(DriverChoice::Epoll),
                ..RunArgs::default()
            }))
        );
        assert!(p(&["--workers", "0"]).is_err());
        assert!(p(&["--config"]).is_err());
        assert!(p(&["--bogus"]).is_err());
        assert!(p(&["--check", "a", "--workers", "2"]).is_err());
        assert_eq!(
            p(&["--store", "etcd://127.0.0.1:2379/gw", "--config", "n.toml"]),
            Ok(Command::Run(RunArgs {
                config: Some("n.toml".into()),
                store: Some("etcd://127.0.0.1:2379/gw".into()),
                ..RunArgs::default()
            }))
        );
        assert!(p(&["--store", "etcd://127.0.0.1:2379/gw"]).is_err());
        // The URL from a file, its line end dropped.
        let file = std::env::temp_dir().join(format!("gw-store-url-{}", std::process::id()));
        std::fs::write(&file, "etcd://gw:pw@127.0.0.1:2379/gw\n").unwrap();
        assert_eq!(
            p(&["--store-file", file.to_str().unwrap(), "--config", "n.toml"]),
            Ok(Command::Run(RunArgs {
                config: Some("n.toml".into()),
                store: Some("etcd://gw:pw@127.0.0.1:2379/gw".into()),
                store_file: Some(file.clone()),
                ..RunArgs::default()
            }))
        );
        // A second line is refused, and the error does not show the password.
        std::fs::write(&file, "etcd://gw:pw@127.0.0.1:2379/gw\n# old: etcd://x\n").unwrap();
        let e = p(&["--store-file", file.to_str().unwrap(), "-c", "n.toml"]).unwrap_err();
        assert!(
            e.contains("more than the URL on one line") && !e.contains("pw"),
            "{e}"
        );
        for inside in ["g\tw", "gw  # production store", "gw\u{2028}old"] {
            std::fs::write(&file, format!("etcd://gw:pw@127.0.0.1:2379/{inside}\n")).unwrap();
            assert!(p(&["--store-file", file.to_str().unwrap(), "-c", "n.toml"]).is_err());
        }
        // Line ends and spaces around it are no part of it; a space in the password is
        // (`--store` takes it).
        std::fs::write(&file, " etcd://gw:pw@127.0.0.1:2379/gw \r\n\n").unwrap();
        assert!(p(&["--store-file", file.to_str().unwrap(), "-c", "n.toml"]).is_ok());
        std::fs::write(&file, "etcd://gw:p w@127.0.0.1:2379/gw\n").unwrap();
        assert!(p(&["--store-file", file.to_str().unwrap(), "-c", "n.toml"]).is_ok());
        let _ = std::fs::remove_file(&file);
        assert!(p(&[
            "--store-file",
            "/nonexistent/store-url",
            "--config",
            "n.toml"
        ])
        .is_err());
        assert!(p(&["--seed-from", "data"]).is_err());
        assert!(p(&["--store=etcd://h:1/g", "-c", "n", "--replace-state"]).is_err());
        // Without a file it would replace the state with nothing it could name (before:
        // ignored, and the embedded default started).
        let e = p(&["--replace-state", "--data-dir", "d"]).unwrap_err();
        assert!(e.contains("needs --config"), "{e}");
        assert!(p(&["--replace-state", "-c", "f"]).is_ok());
    }

    #[test]
    fn a_flag_that_takes_no_value_refuses_one() {
        let p = |a: &[&str]| parse(a.iter().map(|s| s.to_string()));
        // Before, `--replace-state=false` replaced the stored config as the bare flag does.
        for flag in ["--replace-state=false", "--help=x", "--version=1"] {
            let e = p(&["-c", "g.toml", flag]).unwrap_err();
            assert!(e.contains("takes no value"), "{flag}: {e}");
        }
        assert!(p(&["-c", "g.toml", "--replace-state"]).is_ok());
        assert!(p(&["--config=g.toml", "--data-dir=d"]).is_ok());
    }
}
