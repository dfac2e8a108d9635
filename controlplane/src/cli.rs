//! Command-line parsing for the `gateway` binary (no dependency: the grammar is tiny).

use std::path::PathBuf;

use dataplane::DriverChoice;

/// Usage text printed by `--help` and on a usage error.
pub const USAGE: &str = "\
usage: gateway [--config FILE] [--data-dir DIR] [--replace-state]
               [--workers N] [--io-driver auto|epoll]
       gateway --store etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT]/PREFIX
               --config NODE_FILE [--seed-from DIR] [--data-dir DIR] ...
       gateway --check FILE
       gateway --help | --version

  --config FILE     TOML (or JSON) config that seeds an empty data directory;
                    without it, and with no stored state, an embedded demo
                    config listens on 127.0.0.1:8080
  --data-dir DIR    where accepted config revisions are stored (default ./data);
                    a stored config is resumed at start
  --replace-state   with --config over a data directory that already holds a
                    config: make the file the next revision (else refused)
  --store URL       share the config with other nodes through etcd: NODE_FILE
                    holds this node's own settings (workers, listeners, admin,
                    access_log, resolver, [cluster] with node_id); the rest is
                    in etcd under PREFIX (an empty store is seeded from
                    NODE_FILE's other resources). The data directory keeps this
                    node's admin token and its copy of private keys
  --seed-from DIR   with --store: copy the config of the data directory DIR
                    into an empty etcd store once (refused if it holds one)
  --workers N       worker threads (default: `workers` in the config, else one
                    per CPU in the affinity mask)
  --io-driver D     auto (io_uring when available) or epoll; also
                    GATEWAY_IO_DRIVER
  --check FILE      validate FILE and exit (0 valid, 2 invalid)

signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads --config";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(RunArgs),
    Check(PathBuf),
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
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut run = RunArgs::default();
    let mut check = None;
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
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "-c" | "--config" => run.config = Some(PathBuf::from(value("--config")?)),
            "--check" => check = Some(PathBuf::from(value("--check")?)),
            "--data-dir" => run.data_dir = Some(PathBuf::from(value("--data-dir")?)),
            "--replace-state" => run.replace_state = true,
            "--store" => run.store = Some(value("--store")?),
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
                    other => return Err(format!("--io-driver {other:?}: expected auto or epoll")),
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
    if run.store.is_some() && run.config.is_none() {
        return Err("--store needs --config NODE_FILE (with [cluster] node_id)".to_owned());
    }
    match check {
        Some(path) if run == RunArgs::default() => Ok(Command::Check(path)),
        Some(_) => Err("--check takes no other option".to_owned()),
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
        assert_eq!(p(&["--check=g.toml"]), Ok(Command::Check("g.toml".into())));
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
        assert!(p(&["--seed-from", "data"]).is_err());
        assert!(p(&["--store=etcd://h:1/g", "-c", "n", "--replace-state"]).is_err());
    }
}
