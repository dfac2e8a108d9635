//! The authoritative config, its revision and its history, persisted in the data directory.
//!
//! Layout:
//! - `journal.log`: one line of JSON per committed revision (its config, source, time and
//!   per-item revisions), appended and `fdatasync`ed before [`LocalStore::commit`] returns, so
//!   the caller answers 2xx only once the change is durable. An append to an existing file
//!   costs one write and one flush: no file is created, renamed or deleted per change, which
//!   is what made changes expensive (inode allocation and directory updates dominated).
//! - `current.json`: a checkpoint of one revision, replaced atomically (temp file, fsync,
//!   rename, directory fsync) when the journal is compacted.
//!
//! Opening reads the checkpoint and replays the journal's lines after it, one line at a time
//! (only the last record's config is read whole). A last line without its newline is a write
//! torn by a crash, never acknowledged: it is cut off before anything new is appended. A
//! whole line that does not parse or does not continue the revision sequence is damage (or
//! another writer): opening fails, naming its byte, and so does a journal missing or empty
//! beside the checkpoint (the first record is made durable before the first checkpoint, and
//! compaction keeps records). Taking either for a shorter journal would resume an older
//! revision and give the next writes the lost ones' numbers and ETags. Every
//! [`COMPACT_AT`] records the journal is rewritten (temp file, fsync, rename, directory
//! fsync) to the last [`KEEP`], copied through a small buffer, after a new checkpoint: a
//! crash between the two leaves the old journal, still whole.
//!
//! A data directory from before the journal (`current.json` and `revisions/*.json`) is
//! converted on open.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::Config;
use serde::{Deserialize, Serialize};

/// Revisions kept for listing and rollback.
pub const KEEP: usize = 100;
/// Journal records that trigger a compaction back to [`KEEP`].
pub const COMPACT_AT: usize = 2 * KEEP;

const JOURNAL: &str = "journal.log";
const CHECKPOINT: &str = "current.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Current {
    revision: u64,
    /// `kind/id` → revision at which that item last changed.
    item_revisions: BTreeMap<String, u64>,
    config: Config,
    /// Written after the journal's first record was made durable (every checkpoint of this
    /// build): a checkpoint without it, of revision 0 and with no record beside it, may be an
    /// older build's first start cut short (it wrote the checkpoint first) as well as a
    /// journal lost since, and the refusal to open it says both.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    after_first_record: bool,
}

/// One journal line: a committed revision (also the value of the etcd store's keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub revision: u64,
    pub created_ms: u64,
    pub source: String,
    pub item_revisions: BTreeMap<String, u64>,
    pub config: Config,
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

/// Where a record's line is in the journal.
#[derive(Debug, Clone)]
struct Indexed {
    revision: u64,
    created_ms: u64,
    source: String,
    offset: u64,
    len: usize,
}

/// The live config and its history, in the data directory.
#[derive(Debug)]
pub struct LocalStore {
    dir: PathBuf,
    current: Current,
    journal: File,
    /// Byte length of the valid journal.
    journal_len: u64,
    /// The journal's records, oldest first.
    index: Vec<Indexed>,
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LocalStore {
    /// Opens the state in `dir`; `Ok(None)` when the directory holds none yet.
    pub fn open(dir: &Path) -> io::Result<Option<LocalStore>> {
        let path = dir.join(CHECKPOINT);
        if path.exists() {
            // State written by a build that left it readable to all (0644 in a 0755 dir).
            private_dir(dir)?;
            for name in [CHECKPOINT, JOURNAL] {
                let _ = fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o600));
            }
        }
        let text = match fs::read_to_string(&path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let checkpoint: Option<Current> = match &text {
            Some(t) => Some(serde_json::from_str(t).map_err(|e| invalid(&path, e))?),
            None => None,
        };
        // The layout before the journal: a checkpoint and a file per revision.
        let old_layout = dir.join("revisions").is_dir() && !dir.join(JOURNAL).exists();
        if let Some(c) = &checkpoint {
            if old_layout {
                convert_history(dir, c)?;
            }
        }
        let journal_path = dir.join(JOURNAL);
        let replay = replay(&journal_path)?;
        let mut current = match checkpoint {
            Some(c) => c,
            // No checkpoint and no whole record: a first start cut short (the journal's
            // first record is made durable before the checkpoint), nothing acknowledged.
            None if replay.index.is_empty() => return Ok(None),
            // No checkpoint, but a journal: it was lost, or a crash came before it was
            // written. The journal's records hold whole configs: it is the state.
            None => Current {
                revision: replay.index[0].revision.saturating_sub(1),
                item_revisions: BTreeMap::new(),
                config: Config::default(),
                after_first_record: true,
            },
        };
        if replay.index.is_empty() && !old_layout {
            // Every state since the journal came has its first record beside the
            // checkpoint, and compaction keeps the last ones: this one was deleted or
            // emptied, and with it any revision after the checkpoint's.
            let what = if replay.existed {
                "holds no whole record"
            } else {
                "is missing"
            };
            let recover = match current.revision {
                // An older build's first checkpoint, written before the first record: a first
                // start cut short looks the same as a journal lost since, and only the one who
                // ran it can tell them apart (a guess would wipe the other's revisions).
                0 if !current.after_first_record => "an older build wrote this checkpoint \
                      before its first record: if its first start on this directory was cut \
                      short (nothing was ever changed), remove the directory to start afresh; \
                      else its revisions were in the journal: restore the directory from a \
                      backup"
                    .to_owned(),
                // A first start's checkpoint: it holds no config of its own.
                0 => "nothing can be recovered from it (a first start's checkpoint, before any \
                      config). Restore the data directory from a backup, or move it away and \
                      start again from --config"
                    .to_owned(),
                n => format!(
                    "the revisions after {n}, if any, cannot be known. Restore the data \
                     directory from a backup, or move it away and start again (the `config` \
                     member of {CHECKPOINT} is revision {n}'s config, to give as --config)"
                ),
            };
            return Err(invalid(
                &journal_path,
                format!(
                    "{what} beside {CHECKPOINT} (revision {}): {recover}",
                    current.revision
                ),
            ));
        }
        // The checkpoint is of the last revision when it is written, and the journal kept
        // then holds it: a journal that ends before it lost records (an older copy of it).
        if let Some(last) = replay
            .index
            .last()
            .filter(|l| l.revision < current.revision)
        {
            return Err(invalid(
                &journal_path,
                format!(
                    "its last record is revision {} but {CHECKPOINT} is revision {}: the \
                     journal is older than the checkpoint (restored from another time?), and \
                     what came after it cannot be known. Restore both files from one backup",
                    last.revision, current.revision
                ),
            ));
        }
        // The records run on without a gap (`replay` checked): the last one is the state
        // when it is newer than the checkpoint, and the first newer one must follow it.
        if let (Some(first), Some(last)) = (replay.index.first(), replay.index.last()) {
            if last.revision > current.revision {
                if first.revision > current.revision + 1 {
                    return Err(invalid(
                        &journal_path,
                        format!(
                            "revision {} follows checkpoint revision {}",
                            first.revision, current.revision
                        ),
                    ));
                }
                let record: Record = serde_json::from_slice(&replay.last_line).map_err(|e| {
                    let at = last.offset;
                    invalid(
                        &journal_path,
                        format!("the record at byte {at} does not read: {e}"),
                    )
                })?;
                current = Current {
                    revision: record.revision,
                    item_revisions: record.item_revisions,
                    config: record.config,
                    after_first_record: true,
                };
            }
        }
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&journal_path)?;
        if replay.torn {
            // A torn tail from a crash: never acknowledged, so drop it before appending.
            journal.set_len(replay.valid_len)?;
            journal.sync_all()?;
        }
        let mut store = LocalStore {
            dir: dir.to_owned(),
            current,
            journal,
            journal_len: replay.valid_len,
            index: replay.index,
        };
        if store.index.is_empty() {
            // A checkpoint of the older layout without its history: start the journal with it.
            store.append(&Record {
                revision: store.current.revision,
                created_ms: 0,
                source: "recovered from current.json".to_owned(),
                item_revisions: store.current.item_revisions.clone(),
                config: store.current.config.clone(),
            })?;
        }
        Ok(Some(store))
    }

    /// Creates the state in `dir` with `config` as revision 1.
    pub fn create(dir: &Path, config: Config, source: &str) -> io::Result<LocalStore> {
        private_dir(dir)?;
        let _ = fs::remove_file(dir.join(JOURNAL));
        let current = Current {
            revision: 0,
            item_revisions: BTreeMap::new(),
            config: Config::default(),
            after_first_record: true,
        };
        let checkpoint = serde_json::to_vec(&current).map_err(io::Error::other)?;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(JOURNAL))?;
        File::open(dir)?.sync_all()?;
        let mut store = LocalStore {
            dir: dir.to_owned(),
            current,
            journal,
            journal_len: 0,
            index: Vec::new(),
        };
        store.commit(config, source)?;
        // The checkpoint only once the first record is durable: a checkpoint beside a
        // journal without a record is then always damage, never a first start cut short.
        write_file(dir, CHECKPOINT, &checkpoint)?;
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

    /// Revision at which each item (`kind/id`) last changed.
    pub fn item_revisions(&self) -> &BTreeMap<String, u64> {
        &self.current.item_revisions
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
        let item_revisions = item_revisions_after(
            &self.current.config,
            &self.current.item_revisions,
            &config,
            revision,
        );
        let record = Record {
            revision,
            created_ms: now_ms(),
            source: source.to_owned(),
            item_revisions,
            config,
        };
        self.append(&record)?;
        self.current = Current {
            revision,
            item_revisions: record.item_revisions,
            config: record.config,
            after_first_record: true,
        };
        if self.index.len() >= COMPACT_AT {
            // The change is already durable; a failed compaction only leaves a longer journal.
            if let Err(e) = self.compact() {
                log::warn!("cannot compact {}: {e}", self.dir.join(JOURNAL).display());
            }
        }
        Ok(revision)
    }

    /// Appends one record and flushes it to disk.
    fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        let result = self
            .journal
            .write_all(&line)
            .and_then(|()| self.journal.sync_data());
        if let Err(e) = result {
            // Whatever part of the line got out is cut off again, so the journal stays a
            // sequence of whole records and the next append starts clean.
            let _ = self.journal.set_len(self.journal_len);
            return Err(e);
        }
        self.index.push(Indexed {
            revision: record.revision,
            created_ms: record.created_ms,
            source: record.source.clone(),
            offset: self.journal_len,
            len: line.len(),
        });
        self.journal_len += line.len() as u64;
        Ok(())
    }

    /// Checkpoints the current revision, then rewrites the journal to its last [`KEEP`]
    /// records.
    fn compact(&mut self) -> io::Result<()> {
        write_file(
            &self.dir,
            CHECKPOINT,
            &serde_json::to_vec(&self.current).map_err(io::Error::other)?,
        )?;
        let keep_from = self.index.len().saturating_sub(KEEP);
        let base = self.index[keep_from].offset;
        let kept = self.journal_len - base;
        let mut old = File::open(self.dir.join(JOURNAL))?;
        old.seek(SeekFrom::Start(base))?;
        // Copied through a small buffer (the records kept may be large configs), and the
        // new journal's own handle kept from before its rename: reopening it after could
        // fail (out of descriptors) and leave commits going to the unlinked old file.
        self.journal = write_file_with(&self.dir, JOURNAL, |f| {
            if io::copy(&mut old.take(kept), f)? != kept {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the journal is shorter than the records it held",
                ));
            }
            Ok(())
        })?;
        self.index.drain(..keep_from);
        for r in &mut self.index {
            r.offset -= base;
        }
        self.journal_len = kept;
        Ok(())
    }

    /// Stored revisions, oldest first (without their configs).
    pub fn revisions(&self) -> Vec<StoredRevision> {
        let from = self.index.len().saturating_sub(KEEP);
        self.index[from..]
            .iter()
            .map(|r| StoredRevision {
                revision: r.revision,
                created_ms: r.created_ms,
                source: r.source.clone(),
                config: Config::default(),
            })
            .collect()
    }

    /// One stored revision, if it is still kept.
    pub fn load_revision(&self, n: u64) -> io::Result<Option<StoredRevision>> {
        let from = self.index.len().saturating_sub(KEEP);
        let Some(r) = self.index[from..].iter().find(|r| r.revision == n) else {
            return Ok(None);
        };
        let path = self.dir.join(JOURNAL);
        let mut f = File::open(&path)?;
        f.seek(SeekFrom::Start(r.offset))?;
        let mut line = vec![0u8; r.len];
        f.read_exact(&mut line)?;
        let record: Record = serde_json::from_slice(&line).map_err(|e| invalid(&path, e))?;
        Ok(Some(StoredRevision {
            revision: record.revision,
            created_ms: record.created_ms,
            source: record.source,
            config: record.config,
        }))
    }
}

/// What the journal holds, read line by line (a line at a time in memory, whatever its
/// length).
struct Replay {
    /// The file was there.
    existed: bool,
    /// Its records, in order, each the one after the one before.
    index: Vec<Indexed>,
    /// The last record's line, to be read whole.
    last_line: Vec<u8>,
    /// Bytes of whole records.
    valid_len: u64,
    /// A last line without its newline follows them: an append a crash cut short, never
    /// acknowledged (each is flushed whole before its answer), to be cut off.
    torn: bool,
}

/// Only what the index needs of a record: its config is checked to be JSON, not read.
#[derive(Deserialize)]
struct RecordHead {
    revision: u64,
    created_ms: u64,
    source: String,
    #[allow(dead_code)]
    item_revisions: serde::de::IgnoredAny,
    #[allow(dead_code)]
    config: serde::de::IgnoredAny,
}

/// Reads the journal at `path`. A whole line (one that ends in a newline) that is not the
/// record after the one before is damage in place, or something else writing to the file:
/// opening fails, naming its byte, rather than take the journal as ending there and drop
/// every revision after it (the next write would then reuse their numbers, and their ETags,
/// for other configs).
fn replay(path: &Path) -> io::Result<Replay> {
    let mut out = Replay {
        existed: false,
        index: Vec::new(),
        last_line: Vec::new(),
        valid_len: 0,
        torn: false,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    out.existed = true;
    let mut reader = io::BufReader::with_capacity(1 << 16, file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = io::BufRead::read_until(&mut reader, b'\n', &mut line)?;
        if n == 0 {
            return Ok(out);
        }
        if line.last() != Some(&b'\n') {
            out.torn = true;
            return Ok(out);
        }
        let prev = out.index.last().map(|r| r.revision);
        let head = serde_json::from_slice::<RecordHead>(&line)
            .ok()
            .filter(|h| prev.is_none_or(|p| h.revision == p + 1));
        let Some(head) = head else {
            return Err(invalid(
                path,
                format!(
                    "byte {} starts a whole line that is not the record after revision {} (a \
                     record damaged in place, or a line written by something else); nothing \
                     was changed. Restore the data directory from a backup, or move the line \
                     out if the records after it follow on, to resume",
                    out.valid_len,
                    prev.map_or_else(|| "none".to_owned(), |p| p.to_string())
                ),
            ));
        };
        out.index.push(Indexed {
            revision: head.revision,
            created_ms: head.created_ms,
            source: head.source,
            offset: out.valid_len,
            len: n,
        });
        out.valid_len += n as u64;
        std::mem::swap(&mut out.last_line, &mut line);
    }
}

/// Turns the per-revision files of the older layout into a journal (durably), then removes
/// them. Revisions are taken in order up to the checkpoint's.
fn convert_history(dir: &Path, current: &Current) -> io::Result<()> {
    let old = dir.join("revisions");
    let mut numbers: Vec<u64> = fs::read_dir(&old)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?.strip_suffix(".json")?.parse().ok()
        })
        .filter(|&n| n <= current.revision)
        .collect();
    numbers.sort_unstable();
    let mut out = Vec::new();
    let mut prev: Option<u64> = None;
    for n in numbers {
        let path = old.join(format!("{n:020}.json"));
        let Ok(bytes) = fs::read(&path) else { continue };
        let Ok(stored) = serde_json::from_slice::<StoredRevision>(&bytes) else {
            continue;
        };
        if prev.is_some_and(|p| n != p + 1) {
            // Only a contiguous run can be replayed; keep the most recent one.
            out.clear();
        }
        prev = Some(n);
        let item_revisions = if n == current.revision {
            current.item_revisions.clone()
        } else {
            BTreeMap::new()
        };
        let record = Record {
            revision: n,
            created_ms: stored.created_ms,
            source: stored.source,
            item_revisions,
            config: stored.config,
        };
        out.extend(serde_json::to_vec(&record).map_err(io::Error::other)?);
        out.push(b'\n');
    }
    if prev == Some(current.revision) {
        write_file(dir, JOURNAL, &out)?;
    }
    fs::remove_dir_all(&old)
}

/// The per-item revisions once `next` is committed as `revision` over `old` (with
/// `old_revisions`): an item keeps its revision while its value stays the same.
pub fn item_revisions_after(
    old: &Config,
    old_revisions: &BTreeMap<String, u64>,
    next: &Config,
    revision: u64,
) -> BTreeMap<String, u64> {
    let old: BTreeMap<String, serde_json::Value> = item_values(old).into_iter().collect();
    item_values(next)
        .into_iter()
        .map(|(key, value)| {
            let rev = match old_revisions.get(&key) {
                Some(&r) if old.get(&key) == Some(&value) => r,
                _ => revision,
            };
            (key, rev)
        })
        .collect()
}

/// `kind/id` → JSON of every item of every resource kind.
pub fn item_values(config: &Config) -> Vec<(String, serde_json::Value)> {
    fn items<'a, T: Serialize>(
        kind: &'a str,
        list: &'a [T],
        id: impl Fn(&T) -> &str + 'a,
    ) -> impl Iterator<Item = (String, serde_json::Value)> + 'a {
        list.iter().map(move |x| {
            (
                format!("{kind}/{}", id(x)),
                serde_json::to_value(x).unwrap_or_default(),
            )
        })
    }
    items("routes", &config.routes, |r| &r.id)
        .chain(items("upstreams", &config.upstreams, |u| &u.id))
        .chain(items("consumers", &config.consumers, |u| &u.id))
        .chain(items("credentials", &config.credentials, |u| &u.id))
        .chain(items("policies", &config.policies, |p| p.id()))
        .chain(items("aggregates", &config.aggregates, |a| &a.id))
        .chain(items("client_profiles", &config.client_profiles, |p| &p.id))
        .chain(items("certificates", &config.certificates, |c| &c.id))
        .chain(items("transcoders", &config.transcoders, |t| &t.id))
        .collect()
}

/// Why `config` cannot run with its state in `dir`: an access log that would write into
/// the store's own files (its journal or checkpoint, or anything else there), or another
/// path [`refuse_log_path`] refuses. `Err` names the field and says why.
pub fn refuse_paths_in(
    dir: &Path,
    config: &Config,
    process_files: &[(PathBuf, String)],
) -> Result<(), (&'static str, String)> {
    let Some(log) = &config.access_log else {
        return Ok(());
    };
    refuse_log_path(config, process_files)?;
    if log.path == "stdout" || !inside(dir, Path::new(&log.path)) {
        return Ok(());
    }
    Err((
        "/access_log/path",
        format!(
            "{} is inside the data directory {}, where the log would write into the config \
             store's files; choose a path outside it",
            log.path,
            dir.display()
        ),
    ))
}

/// Refuses an access log path that names a directory, or ends with `/` as one does (every
/// line would be lost: a directory cannot be opened to append to), or a file the gateway
/// reads: one of `process_files` (see [`process_files`]), or one `config` names (a
/// certificate, a key, an authority, a descriptor set, the cluster's secret). Lines appended
/// to one of those make it unreadable: a config file the next start refuses (exit 2, again
/// at every restart), a certificate the next publish refuses.
pub fn refuse_log_path(
    config: &Config,
    process_files: &[(PathBuf, String)],
) -> Result<(), (&'static str, String)> {
    let Some(log) = config.access_log.as_ref().filter(|l| l.path != "stdout") else {
        return Ok(());
    };
    let path = Path::new(&log.path);
    if log.path.ends_with('/') || path.is_dir() {
        return Err((
            "/access_log/path",
            format!("{} is a directory: name a file (in it)", log.path),
        ));
    }
    let read = process_files.iter().cloned().chain(files_read(config));
    for (file, what) in read {
        if same_file(path, &file) {
            return Err((
                "/access_log/path",
                format!(
                    "{} is {what}, which the log's lines would make unreadable; choose another \
                     path",
                    log.path
                ),
            ));
        }
    }
    Ok(())
}

/// The files this process reads whatever its config, each with what it is: its `--config`
/// file, its `--store-file`, the TLS files of its etcd URL, and the system's CA bundle
/// (upstreams' and etcd's default authorities).
pub fn process_files(
    config_file: Option<&Path>,
    store_file: Option<&Path>,
    etcd: Option<&crate::etcd::StoreUrl>,
) -> Vec<(PathBuf, String)> {
    let mut files = vec![(
        PathBuf::from(common::tls::SYSTEM_CAS),
        "the system's CA bundle".to_owned(),
    )];
    if let Some(f) = config_file {
        files.push((f.to_owned(), "the config file (--config)".to_owned()));
    }
    if let Some(f) = store_file {
        files.push((
            f.to_owned(),
            "the store URL's file (--store-file)".to_owned(),
        ));
    }
    if let Some(tls) = etcd.and_then(|u| u.tls.as_ref()) {
        let named = [(&tls.ca, "ca"), (&tls.cert, "cert"), (&tls.key, "key")];
        for (file, what) in named {
            if let Some(f) = file {
                files.push((f.clone(), format!("the etcd URL's {what} file (--store)")));
            }
        }
    }
    files
}

/// The files `config` names for the gateway to read, each with what it is.
fn files_read(config: &Config) -> Vec<(std::path::PathBuf, String)> {
    let mut files = Vec::new();
    let mut add = |file: &Option<String>, what: String| {
        if let Some(f) = file {
            files.push((f.into(), what));
        }
    };
    for c in &config.certificates {
        add(&c.cert_file, format!("certificate {:?}'s cert_file", c.id));
        add(&c.key_file, format!("certificate {:?}'s key_file", c.id));
    }
    for u in &config.upstreams {
        if let Some(tls) = &u.tls {
            add(&tls.ca_file, format!("upstream {:?}'s tls.ca_file", u.id));
        }
    }
    for t in &config.transcoders {
        add(
            &t.descriptor_set,
            format!("transcoder {:?}'s descriptor_set", t.id),
        );
    }
    if let Some(c) = &config.cluster {
        add(&c.secret_file, "[cluster] secret_file".to_owned());
    }
    files
}

/// Whether `a` and `b` name one file: the same inode where both exist (through links of
/// either kind), else the same path once resolved as [`inside`] resolves it.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => resolve(a) == resolve(b),
    }
}

/// Whether `path` is `dir` or inside it, after following symbolic links (as far as they
/// exist: a file not created yet is placed by its directory).
fn inside(dir: &Path, path: &Path) -> bool {
    resolve(path).starts_with(resolve(dir))
}

/// `p` with its symbolic links followed, as far as they exist: a file not created yet is
/// placed by its directory.
fn resolve(p: &Path) -> std::path::PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| {
        match (
            p.parent().and_then(|d| fs::canonicalize(d).ok()),
            p.file_name(),
        ) {
            (Some(d), Some(name)) => d.join(name),
            _ => std::path::absolute(p).unwrap_or_else(|_| p.to_owned()),
        }
    })
}

/// Makes `dir` (and its parents) if needed, and leaves it to the gateway's user alone: the
/// state in it holds the config's secrets (the admin token, JWT secrets, store passwords).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Writes `name` in `dir` through a temp file and a rename, durably: the file and then the
/// directory are fsynced, so `name` holds either its old content or `bytes`, whole, and the
/// new content survives a crash once this returns.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_file_with(dir, name, |f| f.write_all(bytes)).map(|_| ())
}

/// Replaces `dir/name` with what `fill` writes atomically (a temporary file, synced,
/// renamed); the new file, open for appending.
fn write_file_with(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<File> {
    let tmp = dir.join(format!(".{name}.tmp"));
    // A leftover would keep its own mode.
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&tmp)?;
    fill(&mut f)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()?;
    Ok(f)
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

    /// A config with one upstream `u`.
    fn with_upstream() -> Config {
        let mut config = Config::default();
        config.upstreams.push(UpstreamConfig {
            id: "u".into(),
            targets: vec![TargetConfig {
                address: "127.0.0.1:1".into(),
                ..TargetConfig::default()
            }],
            ..UpstreamConfig::default()
        });
        config
    }

    #[test]
    fn a_lost_checkpoint_or_a_first_start_cut_short_is_no_dead_end() {
        let d = dir();
        let config = with_upstream();
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        store.commit(config.clone(), "test").unwrap();
        drop(store);
        // The checkpoint lost: the journal is the state, history and all.
        fs::remove_file(d.join(CHECKPOINT)).unwrap();
        let store = LocalStore::open(&d).unwrap().unwrap();
        assert_eq!(store.revision(), 2);
        assert_eq!(store.config(), &config);
        assert_eq!(store.revisions().len(), 2);
        drop(store);
        // A first start cut short: no checkpoint yet (it comes after the first record), the
        // first record torn.
        let e = dir().with_extension("first");
        let _ = fs::remove_dir_all(&e);
        private_dir(&e).unwrap();
        fs::write(e.join(JOURNAL), br#"{"revision":1,"created_ms":1,"sou"#).unwrap();
        assert!(LocalStore::open(&e).unwrap().is_none());
        LocalStore::create(&e, config.clone(), "test").unwrap();
        let store = LocalStore::open(&e).unwrap().unwrap();
        assert_eq!((store.revision(), store.config()), (1, &config));
        drop(store);
        // An older build's first checkpoint (no `after_first_record`: written before the
        // first record) with no record beside it: a first start cut short, or a journal lost
        // since, which the directory cannot tell apart. Refused, saying both (the second
        // review found a version taking it for no state: a lost journal's revisions gone
        // without a word).
        let _ = fs::remove_dir_all(&e);
        private_dir(&e).unwrap();
        let empty = br#"{"revision":0,"item_revisions":{},"config":{}}"#;
        write_file(&e, CHECKPOINT, empty).unwrap();
        let (err, ..) = refused(&e);
        assert!(
            err.contains("if its first start on this directory was cut short"),
            "{err}"
        );
        File::create(e.join(JOURNAL)).unwrap();
        assert!(refused(&e)
            .0
            .contains("an older build wrote this checkpoint"));
        let _ = fs::remove_dir_all(&e);
        let _ = fs::remove_dir_all(&d);
    }

    /// What `open` says of the data directory in `d` (it must refuse), and the journal's
    /// length before and after.
    #[test]
    fn an_access_log_over_a_file_the_config_reads_is_refused() {
        let d = dir();
        fs::create_dir_all(&d).unwrap();
        let pem = d.join("a.pem");
        fs::write(&pem, "x").unwrap();
        let mut c = Config {
            access_log: Some(common::config::AccessLogConfig {
                path: d.join("./a.pem").to_string_lossy().into_owned(),
                sample: 1.0,
            }),
            ..Config::default()
        };
        c.certificates.push(common::config::CertificateConfig {
            id: "api".into(),
            cert_file: Some(pem.to_string_lossy().into_owned()),
            ..Default::default()
        });
        let (at, why) = refuse_log_path(&c, &[]).unwrap_err();
        assert_eq!(at, "/access_log/path");
        assert!(why.contains("certificate \"api\"'s cert_file"), "{why}");
        // Through a hard link too; a file not created yet by its path.
        fs::hard_link(&pem, d.join("link.log")).unwrap();
        c.access_log.as_mut().unwrap().path = d.join("link.log").to_string_lossy().into();
        assert!(refuse_log_path(&c, &[]).is_err());
        let file = d.join("gw.toml");
        c.access_log.as_mut().unwrap().path = file.to_string_lossy().into();
        assert!(refuse_log_path(&c, &[]).is_ok());
        let url = crate::etcd::StoreUrl::parse(&format!(
            "etcds://127.0.0.1:2379/p?ca={}",
            d.join("ca.pem").display()
        ))
        .unwrap();
        let files = process_files(Some(&file), Some(&d.join("url")), Some(&url));
        let (_, why) = refuse_log_path(&c, &files).unwrap_err();
        assert!(why.contains("the config file (--config)"), "{why}");
        for (path, what) in [
            ("url", "--store-file"),
            ("ca.pem", "the etcd URL's ca file"),
        ] {
            c.access_log.as_mut().unwrap().path = d.join(path).to_string_lossy().into();
            let (_, why) = refuse_log_path(&c, &files).unwrap_err();
            assert!(why.contains(what), "{why}");
        }
        c.access_log.as_mut().unwrap().path = common::tls::SYSTEM_CAS.into();
        assert!(refuse_log_path(&c, &files).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    fn refused(d: &Path) -> (String, Option<u64>, Option<u64>) {
        let len = || fs::metadata(d.join(JOURNAL)).ok().map(|m| m.len());
        let before = len();
        let Err(err) = LocalStore::open(d) else {
            panic!("{} opened", d.display());
        };
        (err.to_string(), before, len())
    }

    #[test]
    fn a_damaged_or_lost_journal_is_refused_not_taken_for_a_shorter_one() {
        let d = dir();
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        for workers in [2, 3, 4] {
            let next = Config {
                workers: Some(workers),
                ..Config::default()
            };
            store.commit(next, "test").unwrap();
        }
        drop(store);
        let journal = fs::read(d.join(JOURNAL)).unwrap();
        // The last record damaged in place (a whole line): before, revision 4 was dropped,
        // the line cut off, and the next write numbered 4 again.
        let mut damaged = journal.clone();
        let at = damaged.len() - 10;
        damaged[at] = b'#';
        fs::write(d.join(JOURNAL), &damaged).unwrap();
        let (err, before, after) = refused(&d);
        assert!(
            err.contains("whole line that is not the record after revision 3"),
            "{err}"
        );
        assert_eq!(before, after, "nothing cut");
        // A record out of sequence at the end (revision 3 again): the same.
        let lines: Vec<&[u8]> = journal.split_inclusive(|&b| b == b'\n').collect();
        fs::write(
            d.join(JOURNAL),
            [lines.concat(), lines[2].to_vec()].concat(),
        )
        .unwrap();
        assert!(refused(&d).0.contains("not the record after revision 4"));
        // Emptied, or deleted, beside the checkpoint (before: the directory was taken for
        // a new one, seeded again from the config file).
        fs::write(d.join(JOURNAL), b"").unwrap();
        let (err, ..) = refused(&d);
        assert!(
            err.contains("holds no whole record beside current.json"),
            "{err}"
        );
        fs::remove_file(d.join(JOURNAL)).unwrap();
        let (err, ..) = refused(&d);
        assert!(err.contains("nothing can be recovered from it"), "{err}");
        assert!(
            err.contains("is missing beside current.json (revision 0)"),
            "{err}"
        );
        // The checkpoint lost and the first record damaged: before, the journal was taken
        // for a first start's and deleted, with the records after it.
        fs::remove_file(d.join(CHECKPOINT)).unwrap();
        let mut damaged = journal.clone();
        damaged[3] = b'#';
        fs::write(d.join(JOURNAL), &damaged).unwrap();
        let (err, before, after) = refused(&d);
        assert!(err.contains("byte 0"), "{err}");
        assert_eq!(
            (before, after),
            (Some(journal.len() as u64), Some(journal.len() as u64))
        );
        // Put back whole, it opens at revision 4.
        fs::write(d.join(JOURNAL), &journal).unwrap();
        assert_eq!(LocalStore::open(&d).unwrap().unwrap().revision(), 4);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_journal_older_than_the_checkpoint_is_refused() {
        // Past a compaction (the checkpoint is revision 201), the journal put back as an
        // older copy ending before it: before, the checkpoint was served, the records after
        // it lost without a word, and the next write left a gap that refused the next start.
        let d = dir();
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        let mut copy = Vec::new();
        for i in 0..COMPACT_AT + 5 {
            if i == 50 {
                copy = fs::read(d.join(JOURNAL)).unwrap();
            }
            let c = Config {
                workers: Some(i % 5 + 1),
                ..Config::default()
            };
            store.commit(c, "test").unwrap();
        }
        drop(store);
        fs::write(d.join(JOURNAL), &copy).unwrap();
        let (err, before, after) = refused(&d);
        let want = "its last record is revision 51 but current.json is revision 200";
        assert!(err.contains(want), "{err}");
        assert_eq!(before, after);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_state_is_readable_by_the_gateways_user_alone() {
        let d = dir();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        store.commit(Config::default(), "test").unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join(JOURNAL)), 0o600);
        assert_eq!(mode(&d.join(CHECKPOINT)), 0o600);
        drop(store);
        // State an older build left open to everyone is closed when it is opened.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        for f in [JOURNAL, CHECKPOINT] {
            fs::set_permissions(d.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        LocalStore::open(&d).unwrap().unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join(JOURNAL)), 0o600);
        assert_eq!(mode(&d.join(CHECKPOINT)), 0o600);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn commits_survive_reopen_and_track_item_revisions() {
        let d = dir();
        let mut config = with_upstream();
        config.routes.push(route("a", "u"));
        let mut store = LocalStore::create(&d, config.clone(), "test").unwrap();
        assert_eq!(store.revision(), 1);
        config.routes.push(route("b", "u"));
        assert_eq!(store.commit(config.clone(), "test").unwrap(), 2);
        assert_eq!(store.item_revision("routes", "a"), Some(1));
        assert_eq!(store.item_revision("routes", "b"), Some(2));
        let reopened = LocalStore::open(&d).unwrap().unwrap();
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
        assert!(LocalStore::open(&d.join("nothing")).unwrap().is_none());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn history_is_bounded() {
        let d = dir();
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        for i in 0..(KEEP + 5) {
            let c = Config {
                workers: Some(i % 7 + 1),
                ..Config::default()
            };
            store.commit(c, "test").unwrap();
        }
        let revs = store.revisions();
        assert_eq!(revs.len(), KEEP);
        assert_eq!(revs.last().unwrap().revision, store.revision());
        // Past a compaction, and reopened from the checkpoint and the journal.
        for i in 0..COMPACT_AT {
            let c = Config {
                workers: Some(i % 5 + 1),
                ..Config::default()
            };
            store.commit(c, "test").unwrap();
        }
        let journal_lines = fs::read_to_string(d.join(JOURNAL)).unwrap().lines().count();
        assert!(journal_lines < COMPACT_AT, "{journal_lines}");
        let reopened = LocalStore::open(&d).unwrap().unwrap();
        assert_eq!(reopened.revision(), store.revision());
        assert_eq!(reopened.config(), store.config());
        assert_eq!(reopened.revisions().len(), KEEP);
        let oldest = reopened.revisions()[0].revision;
        assert!(reopened.load_revision(oldest).unwrap().is_some());
        assert!(reopened.load_revision(oldest - 1).unwrap().is_none());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_journal_tail_is_dropped() {
        let d = dir();
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        let two = Config {
            workers: Some(2),
            ..Config::default()
        };
        store.commit(two.clone(), "test").unwrap();
        drop(store);
        // A crash in the middle of appending revision 3.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join(JOURNAL))
            .unwrap();
        f.write_all(br#"{"revision":3,"created_ms":1,"source":"torn","item_revi"#)
            .unwrap();
        drop(f);
        let mut store = LocalStore::open(&d).unwrap().unwrap();
        assert_eq!(store.revision(), 2);
        assert_eq!(store.config(), &two);
        // The next change follows on cleanly.
        store.commit(Config::default(), "test").unwrap();
        let store = LocalStore::open(&d).unwrap().unwrap();
        assert_eq!(store.revision(), 3);
        assert_eq!(store.revisions().len(), 3);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn records_after_a_stray_line_are_never_cut_off() {
        let d = dir();
        let mut store = LocalStore::create(&d, Config::default(), "test").unwrap();
        // Something else appends to the journal (an access log pointed at it), then
        // revisions 2 and 3 are committed after its line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join(JOURNAL))
            .unwrap();
        f.write_all(b"{\"ts\":\"2026-12-05T10:00:00Z\",\"status\":200}\n")
            .unwrap();
        drop(f);
        for workers in [2, 3] {
            let next = Config {
                workers: Some(workers),
                ..Config::default()
            };
            store.commit(next, "test").unwrap();
        }
        drop(store);
        let len = fs::metadata(d.join(JOURNAL)).unwrap().len();
        let Err(err) = LocalStore::open(&d) else {
            panic!("opened past a stray line");
        };
        assert!(
            err.to_string()
                .contains("whole line that is not the record"),
            "{err}"
        );
        assert_eq!(
            fs::metadata(d.join(JOURNAL)).unwrap().len(),
            len,
            "nothing cut"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_older_layout_is_converted() {
        let d = dir();
        fs::create_dir_all(d.join("revisions")).unwrap();
        let config = Config {
            workers: Some(3),
            ..Config::default()
        };
        for n in 1..=2u64 {
            let stored = StoredRevision {
                revision: n,
                created_ms: n,
                source: "old".into(),
                config: config.clone(),
            };
            fs::write(
                d.join("revisions").join(format!("{n:020}.json")),
                serde_json::to_vec(&stored).unwrap(),
            )
            .unwrap();
        }
        let current = Current {
            revision: 2,
            item_revisions: BTreeMap::new(),
            config: config.clone(),
            after_first_record: false,
        };
        fs::write(d.join(CHECKPOINT), serde_json::to_vec(&current).unwrap()).unwrap();
        let store = LocalStore::open(&d).unwrap().unwrap();
        assert_eq!(store.revision(), 2);
        assert_eq!(store.config(), &config);
        assert_eq!(store.revisions().len(), 2);
        assert!(!d.join("revisions").exists());
        let _ = fs::remove_dir_all(&d);
    }
}
