//! The authoritative config, its revision and its history, persisted in the data directory.
//!
//! Layout: `current.json` holds the live revision (config, revision number, per-item
//! revisions); `revisions/NNNNNNNNNNNNNNNNNNNN.json` hold the last [`KEEP`] revisions (up to
//! 15 more between trims) for listing and rollback. `current.json` is replaced atomically and
//! durably (a temp file in the same directory, fsync, rename over the old name, fsync of the
//! directory), so a crash at any point leaves either the old or the new state, whole, and
//! nothing acknowledged is lost: the caller answers 2xx only after [`Store::commit`] returns.
//! History entries are written the same way without the fsyncs, which would double the cost of
//! a change; one lost to a crash is rebuilt from `current.json` on the next start.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::Config;
use serde::{Deserialize, Serialize};

/// Revisions kept on disk for listing and rollback.
pub const KEEP: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Current {
    revision: u64,
    /// `kind/id` → revision at which that item last changed.
    item_revisions: BTreeMap<String, u64>,
    config: Config,
}

/// One stored revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRevision {
    pub revision: u64,
    /// Milliseconds since the Unix epoch when it was committed.
    pub created_ms: u64,
    /// What made it: `file`, `api`, `rollback of N`, ...
    pub source: String,
    pub config: Config,
}

/// The live config and its history.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    current: Current,
}

impl Store {
    /// Opens the state in `dir`; `Ok(None)` when the directory holds none yet.
    pub fn open(dir: &Path) -> io::Result<Option<Store>> {
        let path = dir.join("current.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let current: Current = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let store = Store {
            dir: dir.to_owned(),
            current,
        };
        store.repair_history()?;
        Ok(Some(store))
    }

    /// Rewrites the current revision's history entry if a crash lost it.
    fn repair_history(&self) -> io::Result<()> {
        let n = self.current.revision;
        if matches!(self.load_revision(n), Ok(Some(_))) {
            return Ok(());
        }
        let stored = StoredRevision {
            revision: n,
            created_ms: 0,
            source: "recovered from current.json".to_owned(),
            config: self.current.config.clone(),
        };
        fs::create_dir_all(self.dir.join("revisions"))?;
        write_file(
            &self.dir.join("revisions"),
            &revision_file(n),
            &serde_json::to_vec(&stored).map_err(io::Error::other)?,
            true,
        )
    }

    /// Creates the state in `dir` with `config` as revision 1.
    pub fn create(dir: &Path, config: Config, source: &str) -> io::Result<Store> {
        fs::create_dir_all(dir.join("revisions"))?;
        let mut store = Store {
            dir: dir.to_owned(),
            current: Current {
                revision: 0,
                item_revisions: BTreeMap::new(),
                config: Config::default(),
            },
        };
        store.commit(config, source)?;
        Ok(store)
    }

    pub fn revision(&self) -> u64 {
        self.current.revision
    }

    pub fn config(&self) -> &Config {
        &self.current.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Revision at which the item `kind/id` last changed.
    pub fn item_revision(&self, kind: &str, id: &str) -> Option<u64> {
        self.current
            .item_revisions
            .get(&format!("{kind}/{id}"))
            .copied()
    }

    /// Makes `config` the next revision, durably. Returns its number.
    pub fn commit(&mut self, config: Config, source: &str) -> io::Result<u64> {
        let revision = self.current.revision + 1;
        let old: BTreeMap<String, serde_json::Value> =
            item_values(&self.current.config).into_iter().collect();
        let mut item_revisions = BTreeMap::new();
        for (key, value) in item_values(&config) {
            let unchanged = old.get(&key) == Some(&value);
            let rev = match self.current.item_revisions.get(&key) {
                Some(&r) if unchanged => r,
                _ => revision,
            };
            item_revisions.insert(key, rev);
        }
        let stored = StoredRevision {
            revision,
            created_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            source: source.to_owned(),
            config: config.clone(),
        };
        fs::create_dir_all(self.dir.join("revisions"))?;
        // The history entry is not fsynced on its own: only `current.json` must survive a crash
        // (it is what is resumed), and syncing both would double the cost of every change. A
        // history entry lost to a crash is rewritten from `current.json` on the next start.
        write_file(
            &self.dir.join("revisions"),
            &revision_file(revision),
            &serde_json::to_vec(&stored).map_err(io::Error::other)?,
            false,
        )?;
        let next = Current {
            revision,
            item_revisions,
            config,
        };
        write_file(
            &self.dir,
            "current.json",
            &serde_json::to_vec(&next).map_err(io::Error::other)?,
            true,
        )?;
        self.current = next;
        // Listing the directory on every commit would cost more than the write; trimming in
        // steps keeps at most KEEP + 15 files.
        if revision.is_multiple_of(16) {
            self.prune();
        }
        Ok(revision)
    }

    /// Stored revisions, oldest first (without their configs).
    pub fn revisions(&self) -> Vec<StoredRevision> {
        let mut out: Vec<StoredRevision> = self
            .revision_numbers()
            .into_iter()
            .filter_map(|n| self.load_revision(n).ok().flatten())
            .map(|mut r| {
                r.config = Config::default();
                r
            })
            .collect();
        out.sort_by_key(|r| r.revision);
        out
    }

    /// One stored revision, if it is still kept.
    pub fn load_revision(&self, n: u64) -> io::Result<Option<StoredRevision>> {
        let path = self.dir.join("revisions").join(revision_file(n));
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn revision_numbers(&self) -> Vec<u64> {
        let mut out: Vec<u64> = fs::read_dir(self.dir.join("revisions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        out.sort_unstable();
        out
    }

    fn prune(&self) {
        let numbers = self.revision_numbers();
        if numbers.len() > KEEP {
            for n in &numbers[..numbers.len() - KEEP] {
                let _ = fs::remove_file(self.dir.join("revisions").join(revision_file(*n)));
            }
        }
    }
}

fn revision_file(n: u64) -> String {
    format!("{n:020}.json")
}

/// `kind/id` → JSON of every route and upstream.
pub fn item_values(config: &Config) -> Vec<(String, serde_json::Value)> {
    let routes = config.routes.iter().map(|r| {
        (
            format!("routes/{}", r.id),
            serde_json::to_value(r).unwrap_or_default(),
        )
    });
    let upstreams = config.upstreams.iter().map(|u| {
        (
            format!("upstreams/{}", u.id),
            serde_json::to_value(u).unwrap_or_default(),
        )
    });
    let consumers = config.consumers.iter().map(|u| {
        (
            format!("consumers/{}", u.id),
            serde_json::to_value(u).unwrap_or_default(),
        )
    });
    let credentials = config.credentials.iter().map(|u| {
        (
            format!("credentials/{}", u.id),
            serde_json::to_value(u).unwrap_or_default(),
        )
    });
    let policies = config.policies.iter().map(|u| {
        (
            format!("policies/{}", u.id()),
            serde_json::to_value(u).unwrap_or_default(),
        )
    });
    routes
        .chain(upstreams)
        .chain(consumers)
        .chain(credentials)
        .chain(policies)
        .collect()
}

/// Writes `name` in `dir` through a temp file and a rename, so that it holds either its old
/// content or `bytes`, whole. With `durable`, the file and then the directory are fsynced, so
/// the new content also survives a crash once this returns.
fn write_file(dir: &Path, name: &str, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, dir.join(name))?;
    if durable {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::{RouteConfig, TargetConfig, UpstreamConfig};

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gw-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn route(id: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            id: id.into(),
            path_prefix: Some("/".into()),
            upstream: Some(upstream.into()),
            ..RouteConfig::default()
        }
    }

    #[test]
    fn commits_survive_reopen_and_track_item_revisions() {
        let d = dir();
        let mut config = Config::default();
        config.upstreams.push(UpstreamConfig {
            id: "u".into(),
            targets: vec![TargetConfig {
                address: "127.0.0.1:1".into(),
                weight: None,
            }],
        });
        config.routes.push(route("a", "u"));
        let mut store = Store::create(&d, config.clone(), "test").unwrap();
        assert_eq!(store.revision(), 1);
        config.routes.push(route("b", "u"));
        assert_eq!(store.commit(config.clone(), "test").unwrap(), 2);
        assert_eq!(store.item_revision("routes", "a"), Some(1));
        assert_eq!(store.item_revision("routes", "b"), Some(2));
        let reopened = Store::open(&d).unwrap().unwrap();
        assert_eq!(reopened.revision(), 2);
        assert_eq!(reopened.config(), &config);
        assert_eq!(reopened.item_revision("upstreams", "u"), Some(1));
        let revs: Vec<u64> = reopened.revisions().iter().map(|r| r.revision).collect();
        assert_eq!(revs, [1, 2]);
        assert_eq!(
            reopened
                .load_revision(1)
                .unwrap()
                .unwrap()
                .config
                .routes
                .len(),
            1
        );
        assert!(Store::open(&d.join("nothing")).unwrap().is_none());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn history_is_bounded() {
        let d = dir();
        let mut store = Store::create(&d, Config::default(), "test").unwrap();
        for i in 0..(KEEP + 5) {
            let c = Config {
                workers: Some(i % 7 + 1),
                ..Config::default()
            };
            store.commit(c, "test").unwrap();
        }
        let revs = store.revisions();
        assert!((KEEP..KEEP + 16).contains(&revs.len()), "{}", revs.len());
        assert_eq!(revs.last().unwrap().revision, store.revision());
        let _ = fs::remove_dir_all(&d);
    }
}
