//! The control plane: owns the authoritative config (persisted in the data directory with its
//! history), validates and compiles every change into a snapshot, publishes it to the workers
//! through one `ArcSwap`, serves the admin REST API on its own thread, and runs the process
//! (signals, graceful shutdown). The `gateway` binary is a thin `main` over [`run`].
//!
//! Start-up: a data directory that holds a config is resumed; an empty one is seeded from
//! `--config` (or the embedded default). `--config` over a non-empty data directory resumes
//! it when the file is unchanged since it was last applied, makes a changed file the next
//! revision when nothing was changed through the API since, and is refused when both changed,
//! unless `--replace-state` makes the file the next revision. SIGHUP re-reads `--config`
//! through the same validate-persist-publish path as the admin API.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod dns;
pub mod etcd;
pub mod json;
pub mod keys;
pub mod live;
pub mod logger;
pub mod store;
pub mod upgrade;
pub mod upstreams;

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::config::AdminConfig;
use common::{parse_config, Config, ConfigError, Format, Snapshot, DEFAULT_CONFIG};
use dataplane::{DataPlane, StartOptions};

use crate::api::{Admin, RuntimeInfo};
use crate::keys::NewKey;
use crate::store::etcd::{merge, node_settings, shared_settings, OpenError, Seed, SeedOrigin};
use crate::store::{EtcdStore, LocalStore, Store};

pub use cli::{Command, RunArgs};

/// Exit code for an invalid config or command line.
pub const EXIT_INVALID: i32 = 2;
/// Exit code for a failure to start (bind, runtime).
pub const EXIT_FAILURE: i32 = 1;

/// Where a config came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Embedded,
    File(PathBuf),
}

/// Reads and compiles a config from `source`, as one to publish (an expired certificate in
/// it is refused).
pub fn load(source: &ConfigSource, revision: u64) -> Result<Snapshot, ConfigError> {
    compile_new(read_config(source)?, revision)
}

/// Compiles a config that nothing serves yet: every certificate in it is being published, so
/// an expired one is refused.
fn compile_new(config: Config, revision: u64) -> Result<Snapshot, ConfigError> {
    let snapshot = Snapshot::compile(config, revision)?;
    snapshot.refuse_newly_expired(None, std::time::SystemTime::now())?;
    Ok(snapshot)
}

fn read_config(source: &ConfigSource) -> Result<Config, ConfigError> {
    match source {
        ConfigSource::Embedded => parse_config(DEFAULT_CONFIG, Format::Toml),
        ConfigSource::File(path) => common::load_config(path),
    }
}

/// For an unknown listener policy or certificate: that a node file's, taken from the store,
/// is checked with `validate --node`.
fn config_hint(e: &ConfigError) -> Option<String> {
    let unknown = e.to_string();
    let dangling = e.path().starts_with("listeners[")
        && (unknown.contains("unknown policy") || unknown.contains("no certificate has id"));
    dangling.then(|| {
        "(a node file, whose listeners name what the store holds? check it with \
         `gateway validate --node FILE`)"
            .to_owned()
    })
}

/// `gateway --check FILE`: validates and reports; returns the exit code. With `node` (a node
/// file, for a start with `--store`), the policies and certificates its listeners name and
/// it does not define are left to the store, and named.
pub fn check(path: &Path, node: bool) -> i32 {
    let source = ConfigSource::File(path.to_owned());
    let config = match read_config(&source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: invalid config: {e}", path.display());
            return EXIT_INVALID;
        }
    };
    if node && config.cluster.is_none() {
        eprintln!(
            "{}: invalid config: cluster: a node file needs [cluster] node_id",
            path.display()
        );
        return EXIT_INVALID;
    }
    let loaded = match node {
        false => compile_new(config, 1),
        true => Snapshot::compile_node_file(config, 1).and_then(|(s, from_store)| {
            if !from_store.is_empty() {
                eprintln!(
                    "{}: not checked here, as a start with --store takes them from the \
                         store: {}",
                    path.display(),
                    from_store.join(", ")
                );
            }
            s.refuse_newly_expired(None, std::time::SystemTime::now())?;
            Ok(s)
        }),
    };
    // What the start refuses too: a malformed token in the environment (the config's own
    // comes first), a driver it does not know...
    let setup = loaded.as_ref().ok().and_then(|s| {
        let token = s.config.admin.token.is_none().then(env_admin_token);
        (token.and_then(Result::err)).or_else(|| dataplane::DriverChoice::from_env().err())
    });
    match loaded {
        Ok(_) if setup.is_some() => {
            let why = setup.unwrap_or_default();
            eprintln!("{}: invalid setup: {why}", path.display());
            EXIT_INVALID
        }
        // ...and an exposed admin API on a generated token.
        Ok(s)
            if !s.admin_listen.ip().is_loopback()
                && s.config.admin.token.is_none()
                && std::env::var_os("GATEWAY_ADMIN_TOKEN").is_none() =>
        {
            eprintln!(
                "{}: invalid config: {}",
                path.display(),
                exposed_admin(s.admin_listen)
            );
            EXIT_INVALID
        }
        // An access log that names a directory, as the start refuses it too (which also
        // refuses one inside the data directory: that needs the directory, which a check
        // has not).
        Ok(s) => match store::local::refuse_log_path(
            &s.config,
            &store::local::process_files(Some(path), None, None),
        ) {
            Err((at, why)) => {
                eprintln!("{}: invalid config: {at}: {why}", path.display());
                EXIT_INVALID
            }
            Ok(()) => {
                // A node file's cluster secret, which only a start with --store reads: said,
                // not refused (a start without one takes the file).
                if let Err(why) = cluster_secret(&s.config) {
                    eprintln!(
                        "{}: warning: {why} (a start with --store refuses this file)",
                        path.display()
                    );
                }
                // A reader gone (`| head`) is no reason to panic: the exit code says it.
                let _ = writeln!(
                    std::io::stdout(),
                    "{}: OK ({} listener(s), {} upstream(s), {} route(s))",
                    path.display(),
                    s.listeners.len(),
                    s.upstreams.len(),
                    s.routes.len()
                );
                0
            }
        },
        Err(e) => {
            eprintln!("{}: invalid config: {e}", path.display());
            // A dangling listener reference in a node file: the store's, if that is one.
            if let Some(hint) = config_hint(&e).filter(|_| !node) {
                eprintln!("{}: {hint}", path.display());
            }
            EXIT_INVALID
        }
    }
}

/// Reads `[cluster] secret_file`, if the config names one, as a start with `--store` does.
fn cluster_secret(config: &Config) -> Result<(), String> {
    match config
        .cluster
        .as_ref()
        .and_then(|c| c.secret_file.as_deref())
    {
        Some(path) => store::etcd::read_secret(path).map(|_| ()),
        None => Ok(()),
    }
}

/// Why an admin API listening on `addr`, off loopback, with a generated token is refused
/// (by the start, and by `--check` where the file sets no token).
fn exposed_admin(addr: std::net::SocketAddr) -> String {
    format!(
        "admin.listen {addr} is not a loopback address: set [admin] token or \
         GATEWAY_ADMIN_TOKEN explicitly before exposing the admin API"
    )
}

/// A start-up failure: the exit code and what to tell the operator.
type Fail = (i32, String);

/// The name of the data directory's lock file, which holds its owner's pid.
const LOCK_FILE: &str = "lock";

/// Takes the data directory for this process alone (`flock` on its lock file, which then
/// holds this pid): two gateways on one directory would write into one journal, each from
/// its own idea of where it ends, and an acknowledged write could be lost. A binary
/// upgrade's successor goes on with its predecessor's lock (`inherited`); any other process
/// is refused (exit 1) while the holder lives.
fn lock_data_dir(dir: &Path, inherited: Option<std::fs::File>) -> Result<std::fs::File, Fail> {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    let failed = |e: std::io::Error| {
        (
            EXIT_FAILURE,
            format!("cannot lock {}: {e}", dir.join(LOCK_FILE).display()),
        )
    };
    // The descriptor a predecessor named is this directory's lock file only if it is that
    // file: an older build in between (a downgrade, then an upgrade) passes the variable on
    // without the descriptor, whose number may then be another file's. Not ours: left open.
    let inherited = inherited.and_then(|f| {
        use std::os::unix::fs::MetadataExt as _;
        let ours = f.metadata().ok();
        let lock = std::fs::metadata(dir.join(LOCK_FILE)).ok();
        match (ours, lock) {
            (Some(a), Some(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()) => Some(f),
            _ => {
                let _ = std::os::fd::IntoRawFd::into_raw_fd(f);
                None
            }
        }
    });
    let mut file = match inherited {
        Some(f) => f,
        None => {
            store::local::private_dir(dir).map_err(|e| {
                (
                    EXIT_FAILURE,
                    format!("cannot make the data directory {}: {e}", dir.display()),
                )
            })?;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.join(LOCK_FILE))
                .map_err(failed)?
        }
    };
    // SAFETY: flock on an open descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(failed(e));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let alive = |pid: libc::pid_t| {
            // SAFETY: kill(2) with signal 0 only checks that the process exists.
            let rc = unsafe { libc::kill(pid, 0) };
            rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        };
        let holder = match holder.trim().parse::<libc::pid_t>() {
            Ok(pid) if pid > 0 && alive(pid) => format!("the gateway with pid {pid}"),
            // The pid written last is gone while the lock is held: a binary upgrade's
            // successor died while its predecessor, which holds the lock too, drains.
            Ok(pid) if pid > 0 => format!(
                "another process (pid {pid}, which took it last, has exited: the process it \
                 took over from may still be draining)"
            ),
            _ => "another process".to_owned(),
        };
        return Err((
            EXIT_FAILURE,
            format!(
                "{} is in use by {holder}: one gateway per data directory (a binary upgrade, \
                 SIGUSR2 to the running one, hands it over)",
                dir.display()
            ),
        ));
    }
    write_lock_pid(&file).map_err(failed)?;
    Ok(file)
}

/// Writes this process's pid into the data directory's lock file (`lock`, held by it).
fn write_lock_pid(lock: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let pid = format!("{}\n", std::process::id());
    lock.set_len(0)?;
    lock.write_all_at(pid.as_bytes(), 0)
}

/// Opens or seeds the data directory. A successor of a binary upgrade (`resume`) resumes the
/// stored config whatever `--config` says.
/// `files`: what this process reads whatever its config ([`process_files`]).
fn open_state(
    args: &RunArgs,
    dir: &Path,
    resume: bool,
    files: &[(PathBuf, String)],
) -> Result<LocalStore, Fail> {
    let source = match &args.config {
        Some(p) => ConfigSource::File(p.clone()),
        None => ConfigSource::Embedded,
    };
    let describe = |e: ConfigError| match &source {
        ConfigSource::File(p) => (
            EXIT_INVALID,
            format!("{}: invalid config: {e}", p.display()),
        ),
        ConfigSource::Embedded => (EXIT_INVALID, format!("embedded config: invalid: {e}")),
    };
    let stored = LocalStore::open(dir).map_err(|e| {
        (
            EXIT_FAILURE,
            format!("cannot read the state in {}: {e}", dir.display()),
        )
    })?;
    match stored {
        Some(mut store) => {
            if resume {
                log::info!(
                    "upgrade: resuming config revision {} from {}",
                    store.revision(),
                    dir.display()
                );
                return Ok(store);
            }
            let Some(path) = &args.config else {
                log::info!(
                    "resuming config revision {} from {}",
                    store.revision(),
                    dir.display()
                );
                return Ok(store);
            };
            // A file unchanged since the gateway last took it (its bytes): the stored config
            // is resumed as it is, with the changes made through the API since, and the file
            // is not even compiled (a certificate it names may have been renewed, or expired:
            // the stored config is what runs, as without --config).
            // Read once: what is compiled is what the record names.
            let (bytes, digest) = applied::read_file(path)?;
            let known = applied::read(dir);
            if let Some(taken) = known
                .as_ref()
                .filter(|k| k.digest == digest && !args.replace_state)
            {
                let why = format!("is unchanged since revision {}", taken.revision);
                applied::log_resuming(&store, path, &why);
                return Ok(store);
            }
            let mut config = applied::parse(path, bytes).map_err(describe)?;
            refuse_paths(dir, &config, &source, files)?;
            let new_keys = keys::take_new(&config);
            keys::load(dir, &mut config);
            // Stored as compiled: API keys only as their hashes, private keys in keys/.
            let config = compile_new(config, store.revision() + 1)
                .map_err(describe)?
                .config;
            let source = if args.replace_state {
                "file (--replace-state)".to_owned()
            } else {
                match file_over_state(&store, &config, path, known)? {
                    Over::Apply(source) => source,
                    Over::Resume { file_made } => {
                        applied::record(dir, &digest, file_made);
                        return Ok(store);
                    }
                }
            };
            keys::save(dir, &new_keys)
                .map_err(|e| (EXIT_FAILURE, format!("cannot write {}: {e}", dir.display())))?;
            store
                .commit(config, &source)
                .map_err(|e| (EXIT_FAILURE, format!("cannot write {}: {e}", dir.display())))?;
            applied::record(dir, &digest, store.revision());
            if args.replace_state {
                log::info!(
                    "{} replaced the stored config as revision {}",
                    path.display(),
                    store.revision()
                );
            } else {
                log::info!(
                    "{} is new to this data directory or changed since it was taken, and nothing \
                     was changed through the admin API since: it is revision {}",
                    path.display(),
                    store.revision()
                );
            }
            Ok(store)
        }
        None => {
            // A file read once: its bytes are what is stored and what the record names.
            let (mut config, digest) = match &source {
                ConfigSource::File(p) => {
                    let (bytes, digest) = applied::read_file(p)?;
                    (applied::parse(p, bytes).map_err(describe)?, Some(digest))
                }
                ConfigSource::Embedded => (read_config(&source).map_err(describe)?, None),
            };
            refuse_paths(dir, &config, &source, files)?;
            let new_keys = keys::take_new(&config);
            keys::load(dir, &mut config);
            let config = compile_new(config, 1).map_err(describe)?.config;
            keys::save(dir, &new_keys)
                .map_err(|e| (EXIT_FAILURE, format!("cannot write {}: {e}", dir.display())))?;
            let what = match &source {
                ConfigSource::File(p) => format!("file {}", p.display()),
                ConfigSource::Embedded => {
                    log::info!("no --config given; using the embedded default config (demo routes, no upstream)");
                    "embedded default".to_owned()
                }
            };
            let store = LocalStore::create(dir, config, &what).map_err(|e| {
                (
                    EXIT_FAILURE,
                    format!("cannot create the state in {}: {e}", dir.display()),
                )
            })?;
            if let Some(digest) = digest {
                applied::record(dir, &digest, store.revision());
            }
            Ok(store)
        }
    }
}

/// What [`file_over_state`] decided.
enum Over {
    /// The stored config resumes; the file is what made revision `file_made` (or holds).
    Resume { file_made: u64 },
    /// The file becomes the next revision, with this source.
    Apply(String),
}

/// What a start with `--config FILE` (`config`, compiled) over a data directory that holds a
/// config does without `--replace-state`, when the file is not the one last taken (`known`:
/// what the directory remembers of that one): one that compiles to the stored config, or to
/// the revision it made last (a directory an earlier build kept, without a record), resumes
/// it; a changed one over a config nothing changed since the file was last taken becomes
/// the next revision, as SIGHUP would make it; one changed while the config changed too
/// (through the admin API, a rollback) is refused (exit 2), rather than either side's changes
/// silently dropped.
fn file_over_state(
    store: &LocalStore,
    config: &common::Config,
    path: &Path,
    known: Option<applied::Taken>,
) -> Result<Over, Fail> {
    if api::diff(store.config(), config).is_empty() {
        applied::log_resuming(store, path, "holds the same config");
        return Ok(Over::Resume {
            file_made: store.revision(),
        });
    }
    let source = format!("file {}", path.display());
    // Since the file was last taken: the revisions made otherwise.
    let (since, first) = match known {
        Some(k) if k.revision >= store.revision() => return Ok(Over::Apply(source)),
        Some(k) => (
            format!("since it became revision {}", k.revision),
            k.revision + 1,
        ),
        // A directory an earlier build kept (or one seeded without a file): its history says
        // what the file made last, and what was made since.
        None => {
            let revisions = store.revisions();
            let from_file = |s: &str| s == "file reload" || s.starts_with("file ");
            let made = (revisions.iter().rev())
                .take_while(|r| !from_file(&r.source))
                .filter(|r| r.source.starts_with("api") || r.source.starts_with("rollback"))
                .map(|r| r.revision)
                .min();
            let Some(first) = made else {
                return Ok(Over::Apply(source));
            };
            let last_file = (revisions.iter().rev())
                .find(|r| from_file(&r.source))
                .and_then(|r| store.load_revision(r.revision).ok().flatten());
            match last_file {
                // The file as it made that revision: unchanged, the stored config resumes.
                Some(r) if api::diff(&r.config, config).is_empty() => {
                    let why = format!("is unchanged since revision {}", r.revision);
                    applied::log_resuming(store, path, &why);
                    return Ok(Over::Resume {
                        file_made: r.revision,
                    });
                }
                Some(r) => (format!("since it made revision {}", r.revision), first),
                None => ("from what any kept revision holds".to_owned(), first),
            }
        }
    };
    Err((
        EXIT_INVALID,
        format!(
            "{} changed {since}, and revisions {first} to {} of {} were made through the admin \
             API since: refusing to choose between them. Add --replace-state to make the file \
             the next revision (those revisions stay in the history: POST \
             /v1/revisions/{}:rollback brings them back), or restore the file as it was to \
             resume revision {}",
            path.display(),
            store.revision(),
            store.dir().display(),
            store.revision(),
            store.revision()
        ),
    ))
}

/// What the data directory remembers of the config file it last took (`DIR/applied-file`):
/// the SHA-256 of its bytes and the revision it became, or was found to hold. Written when a
/// file seeds the directory, replaces its config at a start, or is reloaded (SIGHUP).
pub(crate) mod applied {
    use std::path::Path;

    const FILE: &str = "applied-file";

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Taken {
        pub digest: String,
        pub revision: u64,
    }

    /// The bytes of the config file `path` and their SHA-256 (hex): read once, so that what
    /// is compiled is what the record names.
    pub(crate) fn read_file(path: &Path) -> Result<(Vec<u8>, String), super::Fail> {
        let bytes = std::fs::read(path).map_err(|e| {
            (
                super::EXIT_INVALID,
                format!("{}: cannot read it: {e}", path.display()),
            )
        })?;
        let digest = common::tls::sha256_hex(&bytes);
        Ok((bytes, digest))
    }

    /// Logs that the stored config is resumed over the file `path`, and `why`.
    pub(crate) fn log_resuming(store: &crate::store::local::LocalStore, path: &Path, why: &str) {
        log::info!(
            "resuming config revision {} from {} ({} {why})",
            store.revision(),
            store.dir().display(),
            path.display()
        );
    }

    /// The config in `bytes`, read from `path` (whose name says JSON or TOML), which must be
    /// UTF-8 (as a file read for a start must be).
    pub(crate) fn parse(
        path: &Path,
        bytes: Vec<u8>,
    ) -> Result<common::Config, common::ConfigError> {
        let text = String::from_utf8(bytes).map_err(|e| common::ConfigError::Io {
            path: path.display().to_string(),
            reason: format!("not UTF-8: {e}"),
        })?;
        common::parse_config(&text, common::Format::detect(Some(path), &text))
    }

    pub(crate) fn read(dir: &Path) -> Option<Taken> {
        let text = std::fs::read_to_string(dir.join(FILE)).ok()?;
        let (digest, revision) = text.trim().split_once(' ')?;
        Some(Taken {
            digest: digest.to_owned(),
            revision: revision.parse().ok()?,
        })
    }

    /// Remembers `digest` as the file taken at `revision` (a failure only costs the next
    /// start a compile of the file: logged, not fatal).
    pub(crate) fn record(dir: &Path, digest: &str, revision: u64) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = dir.join(format!(".{FILE}.tmp"));
        // Durable as the journal is: a record older than the revisions would refuse a
        // restart with the file it names.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                writeln!(f, "{digest} {revision}")?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, dir.join(FILE)))
            .and_then(|()| std::fs::File::open(dir)?.sync_all());
        if let Err(e) = written {
            log::warn!("cannot write {}: {e}", dir.join(FILE).display());
        }
    }
}

/// The files this process reads whatever its config (see [`store::local::process_files`]).
fn process_files(args: &RunArgs) -> Vec<(PathBuf, String)> {
    let etcd = (args.store.as_deref()).and_then(|u| crate::etcd::StoreUrl::parse(u).ok());
    store::local::process_files(
        args.config.as_deref(),
        args.store_file.as_deref(),
        etcd.as_ref(),
    )
}

/// Refuses a config file whose access log would write into the data directory `dir` or a
/// file the gateway reads, before anything is stored.
fn refuse_paths(
    dir: &Path,
    config: &common::Config,
    source: &ConfigSource,
    files: &[(PathBuf, String)],
) -> Result<(), Fail> {
    store::local::refuse_paths_in(dir, config, files).map_err(|(at, why)| {
        let what = match source {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded => "embedded config".to_owned(),
        };
        (EXIT_INVALID, format!("{what}: invalid config: {at}: {why}"))
    })
}

/// Connects to the etcd store `url` as the node described by `--config`, seeding an empty
/// store from `--seed-from` or from the node file's shared resources.
/// `successor`: this process is a binary upgrade's (its predecessor's record is its own);
/// `files`: what this process reads whatever its config ([`process_files`]).
fn open_etcd(
    args: &RunArgs,
    url: &str,
    dir: &Path,
    successor: bool,
    files: &[(PathBuf, String)],
) -> Result<EtcdStore, Fail> {
    let url = crate::etcd::StoreUrl::parse(url).map_err(|e| (EXIT_INVALID, e))?;
    let Some(path) = &args.config else {
        return Err((
            EXIT_INVALID,
            "--store needs --config NODE_FILE (with [cluster] node_id)".to_owned(),
        ));
    };
    let bad = |e: String| {
        (
            EXIT_INVALID,
            format!("{}: invalid config: {e}", path.display()),
        )
    };
    // EtcdStore::open refuses a node file without [cluster] node_id.
    let file = read_config(&ConfigSource::File(path.clone())).map_err(|e| bad(e.to_string()))?;
    // Held to what `validate --node` holds it to: the store's configs are compiled with the
    // tolerance an earlier build's state gets, which let through a node file the check
    // refuses (a listener naming one certificate twice).
    if file.cluster.is_some() {
        Snapshot::compile_node_file(file.clone(), 1).map_err(|e| bad(e.to_string()))?;
    }
    // The node's access log, before etcd is touched (the shared config's files are checked
    // once it is read).
    refuse_paths(dir, &file, &ConfigSource::File(path.clone()), files)?;
    store::local::private_dir(dir).map_err(|e| {
        (
            EXIT_FAILURE,
            format!("cannot create the data directory {}: {e}", dir.display()),
        )
    })?;
    let node = node_settings(&file);
    let origin = match &args.seed_from {
        Some(_) => SeedOrigin::Explicit,
        None => SeedOrigin::NodeFile {
            has_shared: shared_settings(&file)
                != shared_settings(&parse_config("", Format::Toml).unwrap_or_default()),
        },
    };
    let seed = || -> Result<Seed, OpenError> {
        let (seed, keys, what) = match &args.seed_from {
            Some(seed_dir) => {
                let local = LocalStore::open(seed_dir)
                    .map_err(|e| OpenError::Failed(format!("{}: {e}", seed_dir.display())))?
                    .ok_or_else(|| {
                        OpenError::Invalid(format!(
                            "--seed-from {}: holds no config",
                            seed_dir.display()
                        ))
                    })?;
                let mut config = local.config().clone();
                keys::load(seed_dir, &mut config);
                let keys: Vec<NewKey> = config
                    .certificates
                    .iter()
                    .filter_map(|c| c.stored_key.0.as_ref())
                    .map(|pem| NewKey::new(pem.to_string()))
                    .collect();
                let what = format!(
                    "data directory {} (revision {})",
                    seed_dir.display(),
                    local.revision()
                );
                (merge(&node, &config), keys, what)
            }
            None => (
                file.clone(),
                keys::take_new(&file),
                format!("file {}", path.display()),
            ),
        };
        // Seeded as compiled (API keys as their hashes), as every stored config is. A data
        // directory's config was stored by an earlier build: what a rule added since refuses
        // is let through, said, as at the start of a node on that directory (before: such a
        // directory could not be seeded until fixed by hand).
        let mut check = seed;
        keys::load(dir, &mut check);
        let invalid = |e: ConfigError| OpenError::Invalid(format!("{what}: invalid config: {e}"));
        let compiled = match args.seed_from.is_some() {
            true => {
                let (compiled, notes) = Snapshot::compile_stored(check, 1).map_err(invalid)?;
                for note in notes {
                    log::warn!(
                        "{what}: {note} (allowed by the build that stored it; a write through \
                         the API must fix it)"
                    );
                }
                compiled
            }
            false => compile_new(check, 1).map_err(invalid)?,
        };
        Ok(Seed {
            config: shared_settings(&compiled.config),
            keys,
            what,
        })
    };
    let store = EtcdStore::open(url, dir, &file, seed, origin, successor).map_err(|e| match e {
        OpenError::Invalid(m) => (EXIT_INVALID, m),
        OpenError::Failed(m) => (EXIT_FAILURE, m),
    })?;
    Ok(store)
}

/// The node record a starting node claimed in etcd, revoked (with its lease) if the start
/// fails before it serves: it would otherwise stand for its TTL as a live node's, holding
/// what its listeners use (the review of 0b5223f found a failed admin bind leaving it).
struct Claim(Option<(crate::etcd::Client, i64)>);

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some((mut client, lease)) = self.0.take().filter(|(_, l)| *l != 0) {
            let _ = client.revoke(lease);
        }
    }
}

/// `GATEWAY_ADMIN_TOKEN`, when set: refused unless it is at least 16 visible ASCII
/// characters.
fn env_admin_token() -> Result<Option<String>, String> {
    match std::env::var("GATEWAY_ADMIN_TOKEN") {
        Ok(t) if t.len() >= 16 && t.bytes().all(|b| (0x21..0x7f).contains(&b)) => Ok(Some(t)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        _ => Err("GATEWAY_ADMIN_TOKEN must be at least 16 visible ASCII characters".to_owned()),
    }
}

/// The admin token: from the config, from `GATEWAY_ADMIN_TOKEN`, or generated once and kept
/// in the data directory (mode 0600). Returns it and where it came from.
fn admin_token(admin: &AdminConfig, dir: &Path) -> Result<(String, String), Fail> {
    if let Some(t) = &admin.token {
        return Ok((t.clone(), "[admin] token".to_owned()));
    }
    if let Some(t) = env_admin_token().map_err(|why| (EXIT_INVALID, why))? {
        return Ok((t, "GATEWAY_ADMIN_TOKEN".to_owned()));
    }
    let path = dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        // What an `Authorization` header can carry and the API reads: visible ASCII, spaces
        // and tabs (before, such a file's token was taken, and no client could present it).
        if t.bytes()
            .any(|b| !(b == b'\t' || (0x20..0x7f).contains(&b)))
        {
            return Err((
                EXIT_INVALID,
                format!(
                    "{}: holds characters no HTTP header can carry (visible ASCII, spaces and \
                     tabs only): no client could present the token",
                    path.display()
                ),
            ));
        }
        if t.len() >= 16 {
            return Ok((t, path.display().to_string()));
        }
    }
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| (EXIT_FAILURE, format!("cannot read /dev/urandom: {e}")))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| f.sync_all())
        })
        .map_err(|e| {
            (
                EXIT_FAILURE,
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
    log::info!("generated an admin token in {}", path.display());
    Ok((token, path.display().to_string()))
}

/// Runs the gateway until SIGTERM / SIGINT; returns the process exit code.
pub fn run(args: RunArgs) -> i32 {
    logger::init();
    match start(args) {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("gateway: {message}");
            code
        }
    }
}

fn start(args: RunArgs) -> Result<i32, Fail> {
    // What needs nothing on disk is checked before anything is written there: the driver
    // the environment asks for, and the config file's being there.
    let driver = match args.driver {
        Some(d) => d,
        None => dataplane::DriverChoice::from_env().map_err(|e| (EXIT_INVALID, e))?,
    };
    // (Not for an upgrade's successor, which resumes the stored config whatever the file
    // says, and may find it moved since.)
    let successor = std::env::var_os(upgrade::READY_ENV).is_some();
    if let Some(path) = args.config.as_ref().filter(|_| !successor) {
        std::fs::metadata(path).map_err(|e| {
            (
                EXIT_INVALID,
                format!("{}: cannot read: {e}", path.display()),
            )
        })?;
    }
    // The signals that ask for something of a running gateway are blocked first, before
    // the start's slow parts (the store, etcd, binding): a SIGHUP or SIGUSR1 that came
    // meanwhile (a `systemctl reload` right after the start) took its default action and
    // killed the process. One that comes now waits, and is taken once the gateway serves.
    // SIGTERM and SIGINT still stop a start at once (blocked below, before any other thread
    // exists, so every thread inherits the mask).
    block_signals(&[libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2]);
    // A write past the file size limit (systemd's LimitFSIZE=, `ulimit -f`) fails with
    // EFBIG instead of ending the process: the access log counts the line lost.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let origin = upgrade::Origin::current();
    let mut inherited = upgrade::take().map_err(|e| {
        (
            EXIT_FAILURE,
            format!("cannot take the sockets handed over by the previous process: {e}"),
        )
    })?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("data"));
    let lock = lock_data_dir(&data_dir, inherited.as_mut().and_then(|i| i.lock.take()))?;
    let files = process_files(&args);
    let successor = inherited.is_some();
    let mut store = match &args.store {
        Some(url) => Store::Etcd(open_etcd(&args, url, &data_dir, successor, &files)?),
        None => Store::Local(open_state(&args, &data_dir, successor, &files)?),
    };
    // Until it serves, a start that fails lets the node record it claimed go (an upgrade's
    // successor leaves it to its predecessor, which serves on).
    let mut claim = Claim(match &store {
        Store::Etcd(e) if !successor => Some((e.client(), e.lease())),
        _ => None,
    });
    let mut stored = store.config().clone();
    if let Store::Etcd(e) = &mut store {
        e.fetch_keys(&stored).map_err(|e| (EXIT_FAILURE, e))?;
    }
    keys::load(&data_dir, &mut stored);
    if let Err((at, why)) = store::local::refuse_paths_in(&data_dir, &stored, &files) {
        // Stored by a build that allowed it: the gateway starts without the log rather than
        // write into its own state, and a write through the API must fix it.
        log::error!(
            "config revision {}: {at}: {why}; the access log is off until the config changes",
            store.revision()
        );
        stored.access_log = None;
    }
    let (mut snapshot, notes) =
        Snapshot::compile_stored(stored, store.revision()).map_err(|e| {
            (
                EXIT_INVALID,
                format!(
                    "stored config revision {} is invalid: {e}",
                    store.revision()
                ),
            )
        })?;
    for note in notes {
        log::warn!(
            "config revision {}: {note} (allowed by the build that stored it; a write \
             through the API must fix it)",
            store.revision()
        );
    }
    // Stored certificates were checked when they were published; one that has expired since
    // is still served (as nginx does), and said so. A `cert_file` whose chain changed while
    // the gateway was down is served as it reads now, but counts as unpublished: the next
    // change publishes it (and refuses it if it has expired), as if it had changed while the
    // gateway ran.
    let published = &store.config().certificates;
    for (i, entry) in snapshot.config.certificates.iter().enumerate() {
        let changed = entry.cert_file.is_some()
            && published
                .get(i)
                .is_some_and(|p| p.id == entry.id && p.chain_sha256 != entry.chain_sha256);
        if changed {
            log::warn!(
                "certificate {:?}: its cert_file changed since config revision {} was \
                 published; served as it reads now, published by the next change (the admin \
                 API shows the published names and expiry until then)",
                entry.id,
                store.revision()
            );
            snapshot.unpublished_certificates.push(entry.id.clone());
        }
    }
    for (id, at) in common::tls::expired(&snapshot.certificates, std::time::SystemTime::now()) {
        log::warn!("certificate {id:?} expired at {at}; still served until it is replaced");
    }
    let workers = args
        .workers
        .or(snapshot.workers)
        .unwrap_or_else(|| dataplane::allowed_cpus().len().max(1));
    let admin_config = store.config().admin.clone();
    let (token, token_source) = admin_token(&admin_config, &data_dir)?;
    let admin_addr = snapshot.admin_listen;
    if !admin_addr.ip().is_loopback() && token_source.ends_with("admin-token") {
        return Err((EXIT_INVALID, exposed_admin(admin_addr)));
    }
    let handed_admin = inherited.as_mut().and_then(|i| i.admin.take());
    let admin_listener = match handed_admin {
        // As for a listener's: an admin address changed in the file since the start is
        // refused (the upgrade fails, the old process serves on), not ignored.
        Some(l) => l.local_addr().and_then(|bound| {
            let port = admin_addr.port();
            if bound.ip() == admin_addr.ip() && (port == 0 || port == bound.port()) {
                Ok(l)
            } else {
                Err(std::io::Error::other(format!(
                    "the socket handed over is bound to {bound}; an address changed since \
                     the start takes a restart"
                )))
            }
        }),
        None => std::net::TcpListener::bind(admin_addr),
    }
    .and_then(|l| l.set_nonblocking(true).map(|()| l))
    .map_err(|e| {
        (
            EXIT_FAILURE,
            format!("cannot listen on {admin_addr} for the admin API: {e}"),
        )
    })?;
    let admin_bound = admin_listener
        .local_addr()
        .map_err(|e| (EXIT_FAILURE, e.to_string()))?;

    // Signals are taken synchronously by this thread: all of them blocked before any other
    // thread exists, so every thread inherits the mask.
    let signals = block_signals(&[
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ]);
    let upstreams = upstreams::Upstreams::start().map_err(|e| {
        (
            EXIT_FAILURE,
            format!("cannot start the upstream manager: {e}"),
        )
    })?;
    upstreams.adopt(&mut snapshot);
    snapshot.claim_metric_slots();
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let plane = dataplane::start(
        shared.clone(),
        StartOptions {
            workers,
            driver,
            inherited: inherited
                .as_mut()
                .map(|i| std::mem::take(&mut i.listeners))
                .unwrap_or_default(),
        },
    )
    .map_err(|e| (EXIT_FAILURE, e.to_string()))?;
    let etcd = match &mut store {
        Store::Etcd(e) => {
            e.mark_published();
            Some((e.client(), e.health.clone(), e.lease()))
        }
        Store::Local(_) => None,
    };
    let admin = Arc::new(Admin::new(store, shared.clone(), token, upstreams, files));
    let mut membership = None;
    if let Some((client, health, lease)) = etcd {
        health.serving();
        let m = cluster::spawn(admin.clone(), client, health, lease, successor).map_err(|e| {
            (
                EXIT_FAILURE,
                format!("cannot start the config store threads: {e}"),
            )
        })?;
        membership = Some(m);
    }
    admin.set_runtime(RuntimeInfo {
        workers: plane.workers,
        metrics: plane.metrics.clone(),
        driver: plane.driver.to_string(),
        listeners: plane.addresses.clone(),
        admin: admin_bound,
    });
    let admin_fd = std::os::fd::AsRawFd::as_raw_fd(&admin_listener);
    let stop_admin = Arc::new(tokio::sync::Notify::new());
    spawn_admin(admin.clone(), admin_listener, stop_admin.clone())?;
    log_started(&plane, &shared.load());
    log::info!("admin API listening on http://{admin_bound} (bearer token from {token_source})");
    match inherited.as_mut() {
        Some(i) => {
            log::info!(
                "upgrade: serving on the sockets handed over (pid {})",
                std::process::id()
            );
            i.ready();
            upgrade::sd_notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        }
        None => upgrade::sd_notify("READY=1"),
    }
    claim.0 = None;
    let handover = Handover {
        origin,
        admin_fd,
        lock,
        stop_admin,
        membership,
    };
    Ok(wait_for_signals(
        &signals,
        args.config.as_deref(),
        &admin,
        &shared,
        plane,
        &handover,
    ))
}

/// What a binary upgrade needs: how to start the successor, the admin socket to hand it, and
/// how to stop this process's admin server afterwards; and what a stop leaves.
struct Handover {
    origin: Option<upgrade::Origin>,
    admin_fd: std::os::fd::RawFd,
    /// The data directory's lock, held while the process lives.
    lock: std::fs::File,
    stop_admin: Arc<tokio::sync::Notify>,
    /// With an etcd store: this node's record there, taken out at a clean stop.
    membership: Option<cluster::Membership>,
}

/// SIGUSR2: starts the successor on this process's sockets and waits until it serves; its
/// pid. Admin writes are refused meanwhile (503, Upgrading), and by this process afterwards.
fn hand_over(admin: &Admin, plane: &DataPlane, h: &Handover) -> Result<u32, String> {
    let origin = h
        .origin
        .as_ref()
        .ok_or("the path of this binary is unknown")?;
    let frozen = admin.freeze();
    log::info!(
        "SIGUSR2: starting {} to take over the sockets",
        origin.exe.display()
    );
    use std::os::fd::AsRawFd as _;
    let successor = upgrade::spawn(origin, &plane.listener_fds, h.admin_fd, h.lock.as_raw_fd())
        .map_err(|e| format!("cannot start {}: {e}", origin.exe.display()))?;
    // A SIGTERM or SIGINT (left pending for `wait_for_signals`) ends the upgrade at once.
    let pid = successor
        .wait_ready(upgrade::READY_TIMEOUT, shutdown_pending)
        .inspect_err(|_| {
            // The successor may have written its pid into the lock file before it failed:
            // the file names the process that holds the directory, this one.
            if let Err(e) = write_lock_pid(&h.lock) {
                log::warn!("cannot write this process's pid into the data directory's lock: {e}");
            }
        })?;
    admin.retire(frozen, pid);
    Ok(pid)
}

/// Whether a SIGTERM or SIGINT waits to be taken (the signals are blocked and taken by
/// `wait_for_signals`).
fn shutdown_pending() -> bool {
    // SAFETY: sigpending fills the set it is given; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0
            && (libc::sigismember(&set, libc::SIGTERM) == 1
                || libc::sigismember(&set, libc::SIGINT) == 1)
    }
}

/// The admin listener, until `stop`: then it takes no more connections (those waiting in the
/// socket's queue are left to the process the socket was handed to) while the connections it
/// took go on being served. A graceful shutdown would close a connection accepted a moment
/// before whose request had not been read yet.
struct AdminListener {
    inner: tokio::net::TcpListener,
    stop: Arc<tokio::sync::Notify>,
    stopped: bool,
    /// One permit per open connection ([`ADMIN_MAX_CONNECTIONS`]).
    slots: Arc<tokio::sync::Semaphore>,
    failures: dataplane::FailureLog,
}

/// Most admin API connections open at once: past it, new ones wait in the listen backlog.
/// Without a bound, clients that never finish a request (the API is reachable before its
/// token is checked) could take every file descriptor of the process, the data plane's too.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// How long an admin API connection may be silent both ways (nothing read, nothing written)
/// while a request is awaited or read (an idle keep-alive connection too) before it is
/// closed. A response being written (the live stream's ticks) keeps it open.
const ADMIN_IDLE: Duration = Duration::from_secs(60);
/// How long a request may take from its first byte to the first byte of its response,
/// however its bytes trickle in: a client sending one byte a minute would otherwise hold a
/// connection slot (of [`ADMIN_MAX_CONNECTIONS`]) for ever.
const ADMIN_REQUEST: Duration = Duration::from_secs(60);

/// An admin API connection: its slot, and a read that fails after [`ADMIN_IDLE`] of silence
/// or [`ADMIN_REQUEST`] into a request not answered yet.
struct AdminConn {
    inner: tokio::net::TcpStream,
    /// The silence's deadline, made once per connection and moved on as each wait starts.
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// A read is waiting (`idle` is set for it).
    waiting: bool,
    /// When the first byte read since the last write came: a request not answered yet.
    started: Option<tokio::time::Instant>,
    /// [`ADMIN_IDLE`] and [`ADMIN_REQUEST`] (shorter in tests).
    limits: (Duration, Duration),
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl AdminConn {
    fn new(inner: tokio::net::TcpStream, slot: tokio::sync::OwnedSemaphorePermit) -> AdminConn {
        AdminConn::with_limits(inner, slot, (ADMIN_IDLE, ADMIN_REQUEST))
    }

    fn with_limits(
        inner: tokio::net::TcpStream,
        slot: tokio::sync::OwnedSemaphorePermit,
        limits: (Duration, Duration),
    ) -> AdminConn {
        AdminConn {
            inner,
            idle: Box::pin(tokio::time::sleep(limits.0)),
            waiting: false,
            started: None,
            limits,
            _slot: slot,
        }
    }
}

impl tokio::io::AsyncRead for AdminConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let (idle, request) = this.limits;
                    let mut deadline = tokio::time::Instant::now() + idle;
                    if let Some(started) = this.started {
                        deadline = deadline.min(started + request);
                    }
                    this.idle.as_mut().reset(deadline);
                }
                match std::future::Future::poll(this.idle.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                this.waiting = false;
                if buf.filled().len() > before && this.started.is_none() {
                    this.started = Some(tokio::time::Instant::now());
                }
                done
            }
        }
    }
}

impl tokio::io::AsyncWrite for AdminConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written {
            if n > 0 {
                // An answer is going out: the request is answered, and the connection is not
                // silent (hyper keeps a read waiting while it writes a response, a stream's
                // for an hour): the waiting read's deadline starts again from now (not when
                // the old one fires: an idle connection would then get twice the time).
                this.started = None;
                if this.waiting {
                    let deadline = tokio::time::Instant::now() + this.limits.0;
                    this.idle.as_mut().reset(deadline);
                }
            }
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if self.stopped {
                std::future::pending::<()>().await;
            }
            tokio::select! {
                biased;
                () = self.stop.notified() => self.stopped = true,
                accepted = accept_in_a_slot(&self.inner, &self.slots) => match accepted {
                    Ok((inner, addr, slot)) => return (AdminConn::new(inner, slot), addr),
                    Err(e) => {
                        if let Some(more) = self.failures.due(Instant::now()) {
                            log::warn!(
                                "admin API: accept failed: {e}{more} (said at most once a minute)"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Waits for a free connection slot, then accepts a connection into it.
async fn accept_in_a_slot(
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> std::io::Result<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, addr) = listener.accept().await?;
    Ok((stream, addr, slot))
}

/// Runs the admin API on its own thread with a current-thread tokio runtime; after `stop` it
/// accepts no more connections.
fn spawn_admin(
    admin: Arc<Admin>,
    listener: std::net::TcpListener,
    stop: Arc<tokio::sync::Notify>,
) -> Result<(), Fail> {
    // The admin threads share CPUs with the workers; a lower priority keeps their bursts
    // (validation, fsync wake-ups) from preempting request handling.
    let lower_priority = || {
        // SAFETY: setpriority on this thread's own id; no memory is involved.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        }
    };
    // Every request is handled on a blocking thread of its own (`api::app`'s
    // `off_runtime`): one that waits on the store (a hung etcd, a long fsync) holds that
    // thread, never the runtime's (`/v1/health` stays answered).
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("gw-admin")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
        .map_err(|e| (EXIT_FAILURE, format!("cannot start the admin runtime: {e}")))?;
    std::thread::Builder::new()
        .name("gw-admin".into())
        .spawn(move || {
            lower_priority();
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("admin API cannot use its listener: {e}");
                        return;
                    }
                };
                let listener = AdminListener {
                    inner: listener,
                    stop,
                    stopped: false,
                    slots: Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS)),
                    failures: dataplane::FailureLog::default(),
                };
                if let Err(e) = axum::serve(listener, api::app(admin)).await {
                    log::error!("admin API stopped: {e}");
                }
            });
        })
        .map_err(|e| (EXIT_FAILURE, format!("cannot spawn the admin thread: {e}")))?;
    Ok(())
}

fn log_started(plane: &DataPlane, snap: &Snapshot) {
    let cpus: Vec<String> = plane
        .cpus
        .iter()
        .map(|c| c.map_or_else(|| "-".to_owned(), |c| c.to_string()))
        .collect();
    if plane.cpus.iter().all(Option::is_none) {
        log::info!(
            "driver {}, {} worker(s), not pinned to CPUs",
            plane.driver,
            plane.workers
        );
    } else {
        log::info!(
            "driver {}, {} worker(s) pinned to CPUs [{}]",
            plane.driver,
            plane.workers,
            cpus.join(", ")
        );
    }
    for (i, addr) in plane.addresses.iter().enumerate() {
        match snap.listener_protocols.get(i) {
            Some(p) if p.tls.is_some() => log::info!("listening on https://{addr}"),
            Some(p) if p.h2c => log::info!("listening on http://{addr} (h2c too)"),
            _ => log::info!("listening on http://{addr}"),
        }
    }
}

/// The set of `signals`. Only sigemptyset and sigaddset: safe after a fork, before exec.
pub(crate) fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before sigaddset writes it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks `signals` in this thread (added to those blocked already); their set.
fn block_signals(signals: &[libc::c_int]) -> libc::sigset_t {
    let set = signal_set(signals);
    // SAFETY: pthread_sigmask only reads the set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// One of `signals` that is pending (blocked and sent), taken; `None` at once when none is.
fn take_pending(signals: &[libc::c_int]) -> Option<libc::c_int> {
    let set = signal_set(signals);
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: sigtimedwait reads the set and the timeout; with a zero timeout it takes one
    // pending signal of the set, if any, without waiting.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &now) };
    (sig > 0).then_some(sig)
}

/// For a drain: whether SIGTERM or SIGINT has now come twice, counting `already` that
/// started it (0 for a handover's drain, which a first one leaves going), which ends the
/// drain now. Said in the log.
fn stop_asked_twice(already: u32) -> impl FnMut() -> bool {
    let mut seen = already;
    move || {
        let Some(sig) = take_pending(&[libc::SIGTERM, libc::SIGINT]) else {
            return false;
        };
        seen += 1;
        if seen < 2 {
            log::info!("signal {sig}: draining already; another stops at once");
            return false;
        }
        log::info!("signal {sig} again: requests still in flight are given up now");
        true
    }
}

/// After a handover to `successor`: the signals that came while it started (this thread
/// was waiting for it) or that come while this process drains. A SIGHUP goes on to the
/// successor, which serves the `--config` file's config from now on (before, the reload was
/// lost without a word); a SIGUSR1 reopens this process's access log and goes on too (a
/// rotation may have come before or after the successor opened its own); a SIGUSR2 is said
/// and dropped (the upgrade it asked for has happened).
fn pass_on_pending(successor: u32, reopen_log: &dyn Fn()) {
    while let Some(sig) = take_pending(&[libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2]) {
        let name = match sig {
            libc::SIGHUP => "SIGHUP",
            libc::SIGUSR1 => "SIGUSR1",
            _ => "another SIGUSR2",
        };
        if sig == libc::SIGUSR1 {
            reopen_log();
        }
        match (sig, running(successor)) {
            (libc::SIGUSR2, true) => log::info!(
                "{name}: process {successor} serves now (send it there to upgrade again)"
            ),
            (libc::SIGUSR2, false) => log::warn!(
                "{name}: process {successor}, which took over from this one, has exited \
                 since; this one drains (start a gateway anew)"
            ),
            (_, true) => {
                log::info!("{name}: passed on to process {successor}, which serves now");
                // SAFETY: kill(2) signals the process this one started, which still runs.
                unsafe { libc::kill(successor as libc::pid_t, sig) };
            }
            (_, false) => log::warn!(
                "{name}: process {successor}, which took over from this one, has exited \
                 since; not passed on (send it to the process serving now)"
            ),
        }
    }
}

/// Whether process `pid` runs: there, and not a zombie (a successor that exited is one
/// until this process, its parent, exits: kill(2) would take a signal for it and drop it).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
    })
}

fn wait_for_signals(
    set: &libc::sigset_t,
    config_file: Option<&Path>,
    admin: &Admin,
    shared: &ArcSwap<Snapshot>,
    plane: DataPlane,
    handover: &Handover,
) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc != 0 {
            continue;
        }
        match sig {
            libc::SIGHUP => match config_file {
                Some(path) => admin.reload_file(path),
                None => log::info!("SIGHUP ignored: no --config file to re-read"),
            },
            libc::SIGUSR1 => {
                log::info!("SIGUSR1: reopening the access log");
                plane.reopen_access_log();
            }
            libc::SIGUSR2 => match hand_over(admin, &plane, handover) {
                Ok(pid) => {
                    let reopen_log = plane.access_log_reopener();
                    pass_on_pending(pid, &reopen_log);
                    let drain = shared.load().drain_timeout;
                    log::info!(
                        "SIGUSR2: process {pid} serves now; this one stops accepting and drains \
                         (up to {} ms)",
                        drain.as_millis()
                    );
                    handover.stop_admin.notify_one();
                    plane.begin_handover();
                    let deadline = Instant::now() + drain + Duration::from_secs(2);
                    // While this one drains, what asks the serving process for something
                    // goes on to it (a reload or a reopen sent to this pid by a script
                    // that read it before the successor said it serves).
                    let mut twice = stop_asked_twice(0);
                    let all = plane.join_hurrying(deadline, || {
                        pass_on_pending(pid, &reopen_log);
                        twice()
                    });
                    log::info!("stopped{}", if all { "" } else { " (workers still busy)" });
                    return 0;
                }
                Err(e) => log::error!("SIGUSR2: upgrade failed, this process goes on serving: {e}"),
            },
            _ => {
                let drain = shared.load().drain_timeout;
                log::info!(
                    "signal {sig}: draining (up to {} ms), no new connections",
                    drain.as_millis()
                );
                plane.begin_shutdown();
                // The workers stop by themselves at the drain deadline; the margin covers
                // their last timer tick. Another SIGTERM or SIGINT meanwhile (a second
                // Ctrl-C) stops at once.
                let deadline = Instant::now() + drain + Duration::from_secs(2);
                let all = plane.join_hurrying(deadline, stop_asked_twice(1));
                if let Some(m) = &handover.membership {
                    m.leave();
                }
                log::info!("stopped{}", if all { "" } else { " (workers still busy)" });
                return 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::AdminConn;

    /// An admin connection with `limits` (silence, request) and the client's end of it.
    async fn pair(limits: (Duration, Duration)) -> (AdminConn, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inner, _) = listener.accept().await.unwrap();
        let slot = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        (AdminConn::with_limits(inner, slot, limits), client)
    }

    #[test]
    fn an_inherited_descriptor_that_is_not_the_lock_file_is_left_alone() {
        // An older build between two upgrades passes GATEWAY_UPGRADE_LOCK on without its
        // descriptor, whose number may then be another open file's: that one is neither
        // used as the lock (truncated, its pid written in) nor closed.
        let dir = std::env::temp_dir().join(format!("gw-lock-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let other_path = dir.join("other");
        std::fs::write(&other_path, "keep me").unwrap();
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&other_path)
            .unwrap();
        let data = dir.join("data");
        let lock = super::lock_data_dir(&data, Some(other)).unwrap();
        assert_eq!(std::fs::read_to_string(&other_path).unwrap(), "keep me");
        assert_eq!(
            std::fs::read_to_string(data.join(super::LOCK_FILE)).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(lock);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_admin_connection_closes_on_silence_or_a_request_that_trickles_not_while_answering() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let limits = (Duration::from_millis(300), Duration::from_millis(600));
            let timed_out = |r: &std::io::Result<usize>| {
                matches!(r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut)
            };
            // A response written for longer than the silence limit while a read waits (as
            // hyper keeps one waiting under a stream): open all along. Before, the read
            // failed at the silence limit (the dashboard's live stream, every 60 s).
            let (conn, mut client) = pair(limits).await;
            let (mut r, mut w) = tokio::io::split(conn);
            let mut byte = [0u8; 1];
            let (read, ()) = tokio::join!(r.read(&mut byte), async {
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    w.write_all(b"tick\n").await.unwrap();
                }
                client.write_all(b"G").await.unwrap();
            });
            assert_eq!(read.unwrap(), 1, "read the client's byte after 1.2 s of answer");
            // Then silence both ways: closed after the limit.
            let started = Instant::now();
            let read = r.read(&mut byte).await;
            assert!(timed_out(&read), "{read:?}");
            assert!(started.elapsed() >= Duration::from_millis(250));
            // A read waiting across an answer's writes, then silence: closed one limit after
            // the last write (the review found twice the limit: the deadline was moved on
            // only when the old one fired).
            let (conn, _client) = pair(limits).await;
            let (mut r, mut w) = tokio::io::split(conn);
            let started = Instant::now();
            let (read, ()) = tokio::join!(r.read(&mut byte), async {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    w.write_all(b"tick\n").await.unwrap();
                }
            });
            let after = started.elapsed();
            assert!(timed_out(&read), "{read:?}");
            assert!(
                after >= Duration::from_millis(650) && after < Duration::from_millis(850),
                "closed {after:?} after the read began (last write at 400 ms)"
            );
            // A request whose bytes come 150 ms apart (each within the silence limit) and is
            // never answered: closed 600 ms after its first byte. Before, never.
            let (mut conn, mut client) = pair(limits).await;
            let trickle = async {
                for _ in 0..8 {
                    if client.write_all(b"G").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            };
            let reads = async {
                let mut first = None;
                loop {
                    let read = conn.read(&mut byte).await;
                    first.get_or_insert_with(Instant::now);
                    if read.as_ref().is_ok_and(|&n| n > 0) {
                        continue;
                    }
                    return (read, first.unwrap().elapsed());
                }
            };
            let ((read, after), ()) = tokio::join!(reads, trickle);
            assert!(timed_out(&read), "{read:?}");
            assert!(
                after >= Duration::from_millis(500) && after < Duration::from_millis(1500),
                "{after:?}"
            );
        });
    }
}
