//! The config shared by a cluster of gateway nodes, in etcd (`--store etcd://...`).
//!
//! What is shared and what is per node: each node's own file (`--config`) holds its
//! [`node_settings`] (workers, listeners, admin, access_log, resolver, cluster); everything
//! else is shared through etcd. The config a node serves is the shared one merged with its
//! own settings.
//!
//! Keys under the prefix `P`:
//! - `P/config`: the current revision, one [`Record`] (the shared config, its revision
//!   number, per-item revisions, source and time) as JSON.
//! - `P/revisions/NNNNNNNNNNNNNNNNNNNN`: the last [`KEEP`] records, for history and rollback.
//! - `P/keys/SHA256`: certificates' private keys, encrypted with AES-256-GCM under the key in
//!   `[cluster] secret_file` (the digest of the key's PEM as associated data), never in the
//!   clear.
//! - `P/nodes/ID`: each node's record (applied revision, last seen, the shared ids its node
//!   file uses), bound to a lease so it disappears when the node does.
//!
//! A commit is one etcd transaction: if `P/config` still has the `mod_revision` the change
//! was validated against, put the new record, its history entry and its new keys, and drop
//! the history entry that falls out of [`KEEP`]; else read the newer record, which the caller
//! validates its change against again. So two nodes' writers never overwrite each other,
//! and a 2xx means etcd has committed the change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Config;
use ring::aead;
use serde_json::{json, Value};

use super::local::{item_revisions_after, now_ms, Record, StoredRevision, KEEP};
use super::StoreError;
use crate::etcd::{b64, num, Client, EtcdError, StoreUrl};
use crate::keys::NewKey;

/// Seconds a node's record outlives its last heartbeat.
pub const NODE_TTL_S: i64 = 10;
/// How long a starting node waits between two reads of a record that holds its id: longer
/// than a live node's heartbeat, so a live node's `last_seen` has moved.
pub const TWIN_RECHECK: Duration = Duration::from_millis(1500);

/// This node's own settings, taken from its node file: `workers`, `listeners`, `admin`,
/// `access_log`, `resolver` and `cluster` (the fields [`merge`] takes from the node);
/// everything else left at its default.
pub fn node_settings(c: &Config) -> Config {
    merge(c, &Config::default())
}

/// The shared part of `c`: everything but the [`node_settings`].
pub fn shared_settings(c: &Config) -> Config {
    merge(&Config::default(), c)
}

/// The shared config `shared` as served by the node with `node` settings: the one place
/// that says which fields are a node's own.
pub fn merge(node: &Config, shared: &Config) -> Config {
    Config {
        workers: node.workers,
        listeners: node.listeners.clone(),
        admin: node.admin.clone(),
        access_log: node.access_log.clone(),
        resolver: node.resolver.clone(),
        cluster: node.cluster.clone(),
        ..shared.clone()
    }
}

/// The shared ids a node's settings use (`policies/ID`, `certificates/ID`): a write that
/// removes one of them while that node is up is refused.
pub fn uses(node: &Config) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in &node.listeners {
        out.extend(l.policies.iter().map(|p| format!("policies/{p}")));
        if let Some(tls) = &l.tls {
            out.extend(tls.certificates.iter().map(|c| format!("certificates/{c}")));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What the store's connection looks like, shared with the watch and heartbeat threads.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the node serves: failures before that end the start with their own message.
    serving: AtomicBool,
    unreachable: AtomicBool,
    error: Mutex<Option<(u64, String)>>,
}

impl Health {
    pub fn serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
    }

    pub fn ok(&self) {
        if self.unreachable.swap(false, Ordering::Relaxed) {
            log::info!("config store reachable again");
        }
    }

    pub fn fail(&self, e: &EtcdError) {
        if let EtcdError::Unavailable(_) | EtcdError::Unknown(_) = e {
            if !self.unreachable.swap(true, Ordering::Relaxed)
                && self.serving.load(Ordering::Relaxed)
            {
                log::warn!("config store unreachable ({e}); serving the last config");
            }
        }
        let mut last = self.error.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((now_ms(), e.to_string()));
    }

    pub fn reachable(&self) -> bool {
        !self.unreachable.load(Ordering::Relaxed)
    }

    /// The last error and when it happened (ms since the epoch).
    pub fn last_error(&self) -> Option<(u64, String)> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a node could not open the store.
#[derive(Debug)]
pub enum OpenError {
    /// The node file or the command line is wrong.
    Invalid(String),
    /// etcd could not be read or written.
    Failed(String),
}

/// What an empty store starts with.
#[derive(Debug)]
pub struct Seed {
    /// The shared config (compiled).
    pub config: Config,
    /// The private keys it names.
    pub keys: Vec<NewKey>,
    /// Where it came from, for the revision's source.
    pub what: String,
}

/// Where a seed would come from.
#[derive(Debug, Clone, Copy)]
pub enum SeedOrigin {
    /// `--seed-from`: a store that already holds a config is an error.
    Explicit,
    /// The node file's shared resources (if it has any): ignored, with a warning, by a
    /// store that holds a config.
    NodeFile { has_shared: bool },
}

/// The etcd store of one node.
#[derive(Debug)]
pub struct EtcdStore {
    client: Client,
    dir: PathBuf,
    node_id: String,
    /// This node's own settings (from its node file).
    node: Config,
    /// The key private keys are encrypted with, from `[cluster] secret_file`.
    secret: Option<[u8; 32]>,
    /// The newest record seen in etcd, its config merged with `node`.
    revision: u64,
    item_revisions: BTreeMap<String, u64>,
    config: Config,
    /// etcd's `mod_revision` of `P/config` holding that record (0: none yet).
    mod_revision: i64,
    /// The highest config revision seen (here, or by a live node when this one started): a
    /// store restored from a backup goes back to a lower one, and the next commit goes on
    /// from here so no number names two configs.
    highest: u64,
    /// etcd's `mod_revision` of a record this build cannot read, once reported.
    unreadable: Option<(i64, String)>,
    /// The revision published to this node's workers.
    pub applied: u64,
    /// etcd's `mod_revision` of the record published: what tells whether the record held is
    /// published, since after a restore a lower or an already used revision number can name
    /// a different config.
    applied_mod: i64,
    /// A newer revision this node could not serve, and why.
    pub rejected: Option<(u64, String)>,
    /// etcd's `mod_revision` of the record of [`EtcdStore::rejected`].
    rejected_mod: i64,
    pub health: Arc<Health>,
    /// The lease this node's record (`P/nodes/ID`) was claimed under, for the heartbeat to
    /// keep.
    lease: i64,
    /// What [`EtcdStore::revisions`] read of each record, by key and `mod_revision`: a
    /// record is written once, so a listing reads only the ones it has not seen.
    listed: std::collections::HashMap<(String, i64), (u64, u64, String)>,
}

/// Reads `[cluster] secret_file`: 64 hex digits.
pub(crate) fn read_secret(path: &str) -> Result<[u8; 32], String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cluster.secret_file {path}: {e}"))?;
    let hex = text.trim();
    let mut out = [0u8; 32];
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "cluster.secret_file {path}: expected 64 hex digits (openssl rand -hex 32)"
        ));
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    Ok(out)
}

fn seal(secret: &[u8; 32], key: &NewKey) -> Result<Vec<u8>, String> {
    use ring::rand::SecureRandom;
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, secret).map_err(|_| "bad secret")?;
    let sealing = aead::LessSafeKey::new(unbound);
    let mut nonce = [0u8; aead::NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| "no randomness")?;
    let mut data = key.pem().as_bytes().to_vec();
    sealing
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(key.sha256().as_bytes()),
            &mut data,
        )
        .map_err(|_| "encryption failed")?;
    Ok(serde_json::to_vec(&json!({
        "alg": "AES-256-GCM",
        "nonce": b64(&nonce),
        "ciphertext": b64(&data),
    }))
    .unwrap_or_default())
}

fn open_sealed(secret: &[u8; 32], sha256: &str, stored: &[u8]) -> Result<String, String> {
    let v: Value = serde_json::from_slice(stored).map_err(|e| e.to_string())?;
    let field = |name: &str| {
        let mut out = Vec::new();
        common::keys::decode_b64(v[name].as_str().unwrap_or("").as_bytes(), &mut out)
            .map(|()| out)
            .ok_or_else(|| format!("{name} is not base64"))
    };
    let nonce: [u8; aead::NONCE_LEN] = field("nonce")?
        .try_into()
        .map_err(|_| "bad nonce length".to_owned())?;
    let mut data = field("ciphertext")?;
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, secret).map_err(|_| "bad secret")?;
    let opening = aead::LessSafeKey::new(unbound);
    let plain = opening
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(sha256.as_bytes()),
            &mut data,
        )
        .map_err(|_| {
            "cannot decrypt: this node's cluster.secret_file differs from the writer's".to_owned()
        })?;
    let pem = String::from_utf8(plain.to_vec()).map_err(|_| "not UTF-8".to_owned())?;
    if common::tls::sha256_hex(pem.as_bytes()) != sha256 {
        return Err("decrypted key does not match its digest".to_owned());
    }
    Ok(pem)
}

/// Config revisions stay below 2^53, which a JSON number holds exactly and which a gateway
/// making a million changes a second reaches in 285 years: a larger one (written by hand,
/// in a record or a node's `highest_revision`) would let the numbers wrap round.
const MAX_REVISION: u64 = 1 << 53;

fn revision_key(n: u64) -> String {
    format!("revisions/{n:020}")
}

/// What a commit's transaction did.
enum Committed {
    /// Made, at this etcd revision.
    Made(i64),
    /// Not made: the config key holds this (or nothing) instead.
    Not(Option<crate::etcd::Kv>),
}

fn unavailable(e: EtcdError) -> StoreError {
    match e {
        // Not taken: nothing changed.
        EtcdError::Unavailable(m) => StoreError::Unavailable(format!("{m}; nothing changed")),
        // Taken, its answer lost: its outcome is not known.
        EtcdError::Unknown(m) => StoreError::Unavailable(format!(
            "{m}; the write may still have been made: read the config back before retrying"
        )),
        EtcdError::Refused(m) => StoreError::Failed(m),
    }
}

impl EtcdStore {
    /// Connects to etcd and reads the shared config; an empty store is seeded with what
    /// `seed` makes as revision 1. `node_file` is this node's file, whose node settings are
    /// kept.
    pub fn open(
        url: StoreUrl,
        dir: &Path,
        node_file: &Config,
        seed: impl FnOnce() -> Result<Seed, OpenError>,
        origin: SeedOrigin,
        successor: bool,
    ) -> Result<EtcdStore, OpenError> {
        let cluster = node_file.cluster.as_ref().ok_or_else(|| {
            OpenError::Invalid(
                "--store needs [cluster] node_id in the node file (--config)".to_owned(),
            )
        })?;
        let secret = match &cluster.secret_file {
            Some(path) => Some(read_secret(path).map_err(OpenError::Invalid)?),
            None => None,
        };
        let client = Client::new(url).map_err(OpenError::Invalid)?;
        let mut store = EtcdStore {
            client,
            dir: dir.to_owned(),
            node_id: cluster.node_id.clone(),
            node: node_settings(node_file),
            secret,
            revision: 0,
            item_revisions: BTreeMap::new(),
            config: Config::default(),
            mod_revision: 0,
            highest: 0,
            unreadable: None,
            applied: 0,
            applied_mod: 0,
            rejected: None,
            rejected_mod: 0,
            health: Arc::new(Health::default()),
            lease: 0,
            listed: std::collections::HashMap::new(),
        };
        let url = store.client.url().redacted();
        let found = store
            .refresh()
            .map_err(|e| OpenError::Failed(format!("cannot read the config from {url}: {e}")))?;
        if let (true, Some((_, why))) = (found, &store.unreadable) {
            return Err(OpenError::Failed(format!("{url}: {why}")));
        }
        // An upgrade's successor takes the store as its predecessor left it: the seed was
        // for the first start (it is started with the same arguments).
        let explicit = matches!(origin, SeedOrigin::Explicit) && !successor;
        if found {
            if explicit {
                return Err(OpenError::Invalid(format!(
                    "{url} already holds config revision {}; --seed-from copies into an empty \
                     store only",
                    store.revision
                )));
            }
            // The highest revision the nodes saw, before this node's record (an upgrade's
            // predecessor's) is replaced by one that says it.
            store.learn_highest();
            store.claim_node_id(successor)?;
            if let SeedOrigin::NodeFile { has_shared: true } = origin {
                store.shared_ignored();
            }
            return Ok(store);
        }
        // No config, but the history is there (the config key deleted by hand): not empty,
        // which a seed is refused before anything is claimed.
        let kept = store
            .newest_kept()
            .map_err(|e| OpenError::Failed(format!("cannot read the history in {url}: {e}")))?;
        if let (true, Some(kept)) = (explicit, &kept) {
            return Err(OpenError::Invalid(format!(
                "{url} holds no config but the history of revisions up to {}: it is not \
                 empty, and --seed-from copies into an empty store only (start without it \
                 to write that revision again, or delete the prefix to seed it)",
                kept.revision
            )));
        }
        if successor && kept.is_none() {
            // Emptied since the predecessor read it (etcd rebuilt): the successor takes the
            // store as it finds it and seeds nothing (its --seed-from or node file would
            // replace what every node serves). The predecessor goes on serving, its node
            // record untouched.
            return Err(OpenError::Failed(format!(
                "{url} holds no config: an upgrade's successor does not seed the store; write \
                 the config again through a running node's admin API (numbered past the \
                 highest revision seen), then upgrade"
            )));
        }
        // A store rebuilt empty while nodes run: the seed's number goes on past theirs, so
        // no number (no ETag) names two configs.
        store.learn_highest();
        // A store without a config may still hold live nodes' records (its config key
        // deleted by hand), and two nodes may seed it at the same moment: the id is claimed
        // first all the same.
        store.claim_node_id(successor)?;
        match store.fill_empty(kept, seed, explicit, origin) {
            Ok(()) => Ok(store),
            Err(e) => {
                // Its record goes with it (before: it stood for the record's TTL, a live node
                // to the others, holding what its listeners use).
                store.abandon();
                Err(e)
            }
        }
    }

    /// Fills a store that holds no config, once this node's record is claimed: with the
    /// newest revision its history `kept`, else with the `seed` (see [`EtcdStore::open`]).
    fn fill_empty(
        &mut self,
        kept: Option<StoredRevision>,
        seed: impl FnOnce() -> Result<Seed, OpenError>,
        explicit: bool,
        origin: SeedOrigin,
    ) -> Result<(), OpenError> {
        let url = self.client.url().redacted();
        // No config, but the history is there (the config key deleted by hand): no empty
        // store, and this node's file would replace what every node serves. The newest
        // revision kept is written again, numbered on.
        if let Some(restored) = kept {
            let what = format!(
                "revision {} again ({url} held no config, but its history)",
                restored.revision
            );
            self.highest = self.highest.max(restored.revision);
            match self.commit(restored.config, &what, &[]) {
                Ok(rev) => log::warn!("config store: wrote {what} as revision {rev}"),
                Err(StoreError::Conflict) => {}
                Err(e) => return Err(OpenError::Failed(format!("cannot restore {url}: {e}"))),
            }
            return Ok(());
        }
        let seed = seed()?;
        let merged = merge(&self.node, &seed.config);
        match self.commit(merged, &seed.what, &seed.keys) {
            Ok(rev) => log::info!("seeded {url} with {} as revision {rev}", seed.what),
            // Another node seeded it at the same moment: that config stands, and this node
            // is one that found it (before, a --seed-from that lost went on quietly).
            Err(StoreError::Conflict) => {
                self.refresh().map_err(|e| {
                    OpenError::Failed(format!("cannot read the config from {url}: {e}"))
                })?;
                if explicit {
                    return Err(OpenError::Invalid(format!(
                        "{url} was seeded by another node at the same moment (config revision \
                         {}); --seed-from copies into an empty store only",
                        self.revision
                    )));
                }
                if let SeedOrigin::NodeFile { has_shared: true } = origin {
                    self.shared_ignored();
                }
            }
            Err(e) => return Err(OpenError::Failed(format!("cannot seed {url}: {e}"))),
        }
        Ok(())
    }

    /// Lets go of this node's record (its lease revoked): a start that fails after claiming
    /// it.
    pub fn abandon(&mut self) {
        if self.lease != 0 {
            let _ = self.client.revoke(self.lease);
            self.lease = 0;
        }
    }

    /// Warns that the node file's shared resources were not used: the store holds a config.
    fn shared_ignored(&self) {
        log::warn!(
            "{} holds config revision {}: the shared resources in the node file are ignored \
             (they seed an empty store only)",
            self.client.url().redacted(),
            self.revision,
        );
    }

    pub fn url(&self) -> &StoreUrl {
        self.client.url()
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn node_settings(&self) -> &Config {
        &self.node
    }

    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// etcd's `mod_revision` of the record held (0: none yet).
    pub fn mod_revision(&self) -> i64 {
        self.mod_revision
    }

    /// Whether the record held is the one this node's workers run, or one it could not serve.
    pub fn published_or_rejected(&self) -> bool {
        self.mod_revision == self.applied_mod
            || (self.rejected.is_some() && self.mod_revision == self.rejected_mod)
    }

    /// The record held is what this node's workers run now.
    pub fn mark_published(&mut self) {
        self.applied = self.revision;
        self.applied_mod = self.mod_revision;
        self.rejected = None;
    }

    /// The record held cannot be served here, for `why`.
    pub fn mark_rejected(&mut self, why: String) {
        self.rejected = Some((self.revision, why));
        self.rejected_mod = self.mod_revision;
    }

    /// The revision the next commit makes: past every one seen, so after the store went
    /// back (restored from a backup) a number already used names no other config (an old
    /// ETag matching again).
    pub fn next_revision(&self) -> u64 {
        self.revision.max(self.highest) + 1
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Revision at which each item (`kind/id`) last changed.
    pub fn item_revisions(&self) -> &BTreeMap<String, u64> {
        &self.item_revisions
    }

    pub fn item_revision(&self, kind: &str, id: &str) -> Option<u64> {
        self.item_revisions.get(&format!("{kind}/{id}")).copied()
    }

    /// Reads `name` (every key under it when `prefix`), noting whether etcd answered.
    fn read(&mut self, name: &str, prefix: bool) -> Result<Vec<crate::etcd::Kv>, EtcdError> {
        let r = self.client.range(name, prefix).map(|(kvs, _)| kvs);
        self.track(r)
    }

    fn track<T>(&self, r: Result<T, EtcdError>) -> Result<T, EtcdError> {
        match &r {
            Ok(_) => self.health.ok(),
            Err(e) => self.health.fail(e),
        }
        r
    }

    /// Takes a record read from etcd if it is newer than the one held; whether it was.
    pub fn adopt(&mut self, value: &[u8], mod_revision: i64) -> bool {
        if mod_revision <= self.mod_revision {
            return false;
        }
        // A revision number no gateway counts up to (written by hand): the next one would
        // wrap round to numbers, and ETags, that name other configs.
        let by_hand = |n: &dyn std::fmt::Display| {
            format!(
                "its revision {n} is beyond the largest a gateway counts to ({}): written by \
                 hand? write a record with a smaller one",
                MAX_REVISION - 1
            )
        };
        let parsed = serde_json::from_slice::<Record>(value)
            .map_err(|e| {
                // A number that fits no revision (negative, fractional, past u64) is a hand's.
                let v = serde_json::from_slice::<serde_json::Value>(value).ok();
                match v.as_ref().map(|v| &v["revision"]) {
                    Some(n) if n.is_number() && !n.is_u64() => by_hand(n),
                    _ => format!("written by a newer one? ({e}): upgrade this node"),
                }
            })
            .and_then(|r| match r.revision {
                n if n >= MAX_REVISION => Err(by_hand(&n)),
                _ => Ok(r),
            });
        let record: Record = match parsed {
            Ok(r) => r,
            Err(e) => {
                // Logged once per record, however often it is read.
                if self.unreadable.as_ref().map(|u| u.0) != Some(mod_revision) {
                    log::error!(
                        "config store: unreadable record at etcd revision {mod_revision}: {e}"
                    );
                }
                let why = format!(
                    "the store holds a config (etcd revision {mod_revision}) this build cannot \
                     read, {e}"
                );
                self.rejected = Some((self.revision + 1, why.clone()));
                self.unreadable = Some((mod_revision, why));
                return false;
            }
        };
        self.unreadable = None;
        self.mod_revision = mod_revision;
        self.revision = record.revision;
        self.highest = self.highest.max(record.revision);
        self.item_revisions = record.item_revisions;
        self.config = merge(&self.node, &record.config);
        true
    }

    /// Takes what etcd holds now (a whole read of `P/config`), even if older than the record
    /// held: etcd's `mod_revision` of a key never goes back, unless the store was restored
    /// from a backup or rebuilt, and then its record is the config (said loudly, and
    /// published though its revision number is lower). Whether it was taken.
    pub fn adopt_current(&mut self, value: &[u8], mod_revision: i64) -> bool {
        if mod_revision < self.mod_revision {
            log::error!(
                "config store: etcd went back from etcd revision {} (config revision {}) to \
                 {mod_revision}: restored from a backup, or rebuilt? Taking the config it holds",
                self.mod_revision,
                self.revision
            );
            let (mod_before, revision_before) = (self.mod_revision, self.revision);
            self.mod_revision = 0;
            if self.adopt(value, mod_revision) {
                return true;
            }
            (self.mod_revision, self.revision) = (mod_before, revision_before);
            return false;
        }
        self.adopt(value, mod_revision)
    }

    /// etcd holds no config any more (rebuilt empty, or the key deleted by hand): the next
    /// record written there is taken whatever its etcd revision, which starts again low.
    /// Meanwhile the config held goes on being served, and numbers go on past it.
    pub fn forget_record(&mut self) {
        if self.mod_revision == 0 {
            return;
        }
        log::error!(
            "config store: etcd holds no config any more (it held config revision {} at etcd \
             revision {}): rebuilt empty? Serving that config until one is written",
            self.revision,
            self.mod_revision
        );
        // What was decided about the record held (published, or refused) stays decided.
        if self.applied_mod == self.mod_revision {
            self.applied_mod = 0;
        }
        if self.rejected_mod == self.mod_revision {
            self.rejected_mod = 0;
        }
        self.mod_revision = 0;
        self.unreadable = None;
    }

    /// Reads `P/config` and adopts what it holds; whether etcd holds a config at all.
    pub fn refresh(&mut self) -> Result<bool, StoreError> {
        let kvs = self.read("config", false).map_err(unavailable)?;
        match kvs.first() {
            Some(kv) => {
                self.adopt_current(&kv.value, kv.mod_revision);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Refuses a write while the store holds a record this build cannot read.
    pub fn check_readable(&self) -> Result<(), StoreError> {
        match &self.unreadable {
            Some((_, why)) => Err(StoreError::Unreadable(why.clone())),
            None => Ok(()),
        }
    }

    /// Commits `config` (this node's settings dropped) as the next revision if nothing was
    /// committed since the held one; else adopts the newer one and answers
    /// [`StoreError::Conflict`].
    pub fn commit(
        &mut self,
        config: Config,
        source: &str,
        new_keys: &[NewKey],
    ) -> Result<u64, StoreError> {
        let revision = self.next_revision();
        if revision >= MAX_REVISION {
            return Err(StoreError::Failed(format!(
                "the next config revision would be {revision}, beyond the largest a gateway \
                 counts to ({}): a number written by hand?",
                MAX_REVISION - 1
            )));
        }
        let shared = shared_settings(&config);
        let record = Record {
            revision,
            created_ms: now_ms(),
            source: source.to_owned(),
            item_revisions: item_revisions_after(
                &self.config,
                &self.item_revisions,
                &config,
                revision,
            ),
            config: shared,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Failed(e.to_string()))?;
        let put = |key: String, value: &[u8]| json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(value)}});
        let mut success = vec![
            put(self.client.key("config"), &bytes),
            put(self.client.key(&revision_key(revision)), &bytes),
        ];
        if revision > KEEP as u64 {
            let old = self.client.key(&revision_key(revision - KEEP as u64));
            success.push(json!({"request_delete_range": {"key": b64(old.as_bytes())}}));
        }
        if !new_keys.is_empty() {
            let secret = self.secret.as_ref().ok_or_else(|| {
                StoreError::Failed("no [cluster] secret_file to encrypt private keys".to_owned())
            })?;
            // This node keeps its own copy too, as a single node does.
            crate::keys::save(&self.dir, new_keys).map_err(|e| {
                StoreError::Failed(format!(
                    "a private key could not be written to the data directory: {e}"
                ))
            })?;
            for k in new_keys {
                let sealed = seal(secret, k).map_err(StoreError::Failed)?;
                success.push(put(
                    self.client.key(&format!("keys/{}", k.sha256())),
                    &sealed,
                ));
            }
        }
        let config_key = b64(self.client.key("config").as_bytes());
        let txn = json!({
            "compare": [{
                "key": config_key,
                "target": "MOD",
                "result": "EQUAL",
                "mod_revision": self.mod_revision.to_string(),
            }],
            "success": success,
            "failure": [{"request_range": {"key": config_key}}],
        });
        let r = self.client.txn(&txn);
        if let Err(EtcdError::Refused(m) | EtcdError::Unavailable(m)) = &r {
            // etcd's --max-request-bytes (1.5 MiB by default), or its gRPC gateway's bound:
            // etcd answered, and is as reachable as before.
            if m.contains("request is too large") || m.contains("larger than max") {
                self.health.ok();
                return Err(StoreError::TooLarge(format!(
                    "etcd refused the write of {} bytes (the config, written twice: as the \
                     current one and in the history) for its size ({m}): raise etcd's \
                     --max-request-bytes, or make the config smaller",
                    2 * bytes.len()
                )));
            }
        }
        let outcome = match r {
            Err(EtcdError::Unknown(lost)) => self.outcome_of(&bytes, revision, &lost),
            r => self.track(r).map(|answer| {
                if answer["succeeded"].as_bool() == Some(true) {
                    Committed::Made(num(&answer["header"]["revision"]))
                } else {
                    let now = crate::etcd::kvs(&answer["responses"][0]["response_range"]);
                    Committed::Not(now.into_iter().next())
                }
            }),
        };
        match outcome.map_err(unavailable)? {
            Committed::Made(mod_revision) => {
                self.mod_revision = mod_revision;
                self.revision = revision;
                self.highest = revision;
                self.item_revisions = record.item_revisions;
                self.config = merge(&self.node, &record.config);
                Ok(revision)
            }
            // What the config key holds now: newer, or older if the store went back.
            Committed::Not(Some(kv)) => {
                self.adopt_current(&kv.value, kv.mod_revision);
                self.check_readable()?;
                Err(StoreError::Conflict)
            }
            Committed::Not(None) => {
                // The config key was deleted behind our back: start the sequence again.
                self.mod_revision = 0;
                Err(StoreError::Conflict)
            }
        }
    }

    /// What became of a commit whose answer was lost (`bytes`, the record it wrote as the
    /// config and as revision `revision`), read back: made if the revision's key holds this
    /// record (another node's writes may have followed it, so the config key alone cannot
    /// say); not made if it holds another's, or if it is absent and the config key moved on;
    /// still unknown when the config is unchanged or a read fails.
    fn outcome_of(
        &mut self,
        bytes: &[u8],
        revision: u64,
        lost: &str,
    ) -> Result<Committed, EtcdError> {
        let failed =
            |e: EtcdError| EtcdError::Unknown(format!("{lost}; and reading it back failed: {e}"));
        let read = self
            .client
            .range(&revision_key(revision), false)
            .map(|(kvs, _)| kvs);
        let made = self.track(read).map_err(failed)?.into_iter().next();
        if let Some(kv) = made.as_ref().filter(|kv| kv.value == bytes) {
            log::warn!("config store: a write's answer was lost ({lost}); read back, it was made");
            return Ok(Committed::Made(kv.mod_revision));
        }
        let read = self.client.range("config", false).map(|(kvs, _)| kvs);
        let config = self.track(read).map_err(failed)?.into_iter().next();
        if made.is_none() && config.as_ref().map_or(0, |kv| kv.mod_revision) == self.mod_revision {
            // Not made, as far as etcd shows now.
            return Err(EtcdError::Unknown(format!(
                "{lost}; read back, the config is unchanged"
            )));
        }
        // Another write came first: ours can no longer be applied (its compare fails).
        Ok(Committed::Not(config))
    }

    /// Stored revisions, oldest first (without their configs). The keys are listed without
    /// their values; only records not listed before are read (one at a time: each holds a
    /// whole config), so the dashboard's polling costs one small read.
    pub fn revisions(&mut self) -> Result<Vec<StoredRevision>, StoreError> {
        let keys = self.client.range_keys("revisions/");
        let keys = self.track(keys).map_err(unavailable)?;
        let under = self.client.key("");
        let mut seen = std::collections::HashMap::with_capacity(keys.len());
        let mut list = Vec::with_capacity(keys.len());
        for kv in keys {
            let id = (kv.key, kv.mod_revision);
            let meta = match self.listed.remove(&id) {
                Some(meta) => meta,
                None => {
                    let name = id.0.strip_prefix(&under).unwrap_or(&id.0).to_owned();
                    // Gone since the listing (the history trimmed): left out.
                    let Some(kv) = self.read(&name, false).map_err(unavailable)?.pop() else {
                        continue;
                    };
                    match serde_json::from_slice::<Record>(&kv.value) {
                        Ok(r) => (r.revision, r.created_ms, r.source),
                        Err(_) => continue,
                    }
                }
            };
            list.push(StoredRevision {
                revision: meta.0,
                created_ms: meta.1,
                source: meta.2.clone(),
                config: Config::default(),
            });
            seen.insert(id, meta);
        }
        self.listed = seen;
        list.sort_by_key(|r| r.revision);
        let from = list.len().saturating_sub(KEEP);
        Ok(list.split_off(from))
    }

    /// One stored revision (its shared config merged with this node's settings).
    /// The newest revision the history keeps, whole (this node's settings merged in).
    fn newest_kept(&mut self) -> Result<Option<StoredRevision>, StoreError> {
        match self.revisions()?.last() {
            Some(r) => self.load_revision(r.revision),
            None => Ok(None),
        }
    }

    pub fn load_revision(&mut self, n: u64) -> Result<Option<StoredRevision>, StoreError> {
        let kvs = self.read(&revision_key(n), false).map_err(unavailable)?;
        let Some(kv) = kvs.first() else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&kv.value)
            .map_err(|e| StoreError::Failed(format!("revision {n} is unreadable: {e}")))?;
        Ok(Some(StoredRevision {
            revision: record.revision,
            created_ms: record.created_ms,
            source: record.source,
            config: merge(&self.node, &record.config),
        }))
    }

    /// Copies the private keys `config` names that this node does not have yet from etcd
    /// into the data directory (decrypted, mode 0600).
    pub fn fetch_keys(&mut self, config: &Config) -> Result<(), String> {
        let missing: Vec<String> = config
            .certificates
            .iter()
            .filter(|c| c.key_pem.is_none() && c.key_file.is_none())
            .filter_map(|c| c.key_sha256.clone())
            .filter(|sha| !crate::keys::has(&self.dir, sha))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let secret = self.secret.ok_or_else(|| {
            "certificates' private keys are in etcd, encrypted: this node needs the \
             [cluster] secret_file the writer used"
                .to_owned()
        })?;
        let mut found = Vec::new();
        for sha in missing {
            let kvs = self
                .read(&format!("keys/{sha}"), false)
                .map_err(|e| e.to_string())?;
            let kv = kvs
                .first()
                .ok_or_else(|| format!("private key {sha} is not in etcd"))?;
            let pem = open_sealed(&secret, &sha, &kv.value)
                .map_err(|e| format!("private key {sha}: {e}"))?;
            found.push(NewKey::new(pem));
        }
        crate::keys::save(&self.dir, &found).map_err(|e| e.to_string())
    }

    /// Every node's record (`id`, `applied_revision`, `last_seen`, `uses`).
    pub fn nodes(&mut self) -> Result<Vec<Value>, StoreError> {
        let kvs = self.read("nodes/", true).map_err(unavailable)?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
            .collect())
    }

    /// This node's record, as the heartbeat publishes it. `host` and `data_dir` tell a
    /// second node started with the same id from this one's next run.
    pub fn node_record(&self) -> Value {
        json!({
            "id": self.node_id,
            "applied_revision": self.applied,
            "last_seen": now_ms(),
            "uses": uses(&self.node),
            "host": host_name(),
            "boot_id": boot_id(),
            "data_dir_id": dir_id(&self.dir),
            "highest_revision": self.highest,
            "data_dir": self
                .dir
                .canonicalize()
                .unwrap_or_else(|_| self.dir.clone())
                .to_string_lossy(),
        })
    }

    /// Claims this node's id: writes its record under a lease of its own, in a transaction
    /// that holds only if no other node's record is there, so of two nodes started at the
    /// same moment with one id one runs and the other is refused. While another live node
    /// holds the id the node does not start: the two would overwrite each other's record
    /// (one of them missing from `/v1/nodes` and from the check that nothing a node uses is
    /// removed) and share one share of the cluster limits. A record of this node's own last
    /// run ([`same_node`]: a restart, or the process a binary upgrade replaces) is taken
    /// over; `successor`: this process is an upgrade's, to which an older build's record of
    /// this host and data directory path is its predecessor's.
    ///
    /// A record another node left when it stopped (its lease not yet expired: a container
    /// replaced under a new host name) is waited out: the node starts once it expires, within
    /// [`NODE_TTL_S`]. One whose `last_seen` moves meanwhile is a live node's. The heartbeat
    /// keeps the lease ([`EtcdStore::lease`]) and writes the record only while it holds it.
    fn claim_node_id(&mut self, successor: bool) -> Result<(), OpenError> {
        let url = self.client.url().redacted();
        let key = format!("nodes/{}", self.node_id);
        let failed = |e: EtcdError| {
            OpenError::Failed(format!("cannot claim this node's record in {url}: {e}"))
        };
        // Granted before each attempt, not once: a wait for a stopped node's record to
        // expire would outlast it.
        let mut lease = 0;
        let mine = self.node_record();
        let record = serde_json::to_vec(&mine).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(NODE_TTL_S as u64 + 2);
        let mut first_seen: Option<Value> = None;
        let refused = loop {
            let held = self.read(&key, false).map_err(failed)?.into_iter().next();
            let compare = match &held {
                None => json!({"target": "CREATE", "create_revision": "0"}),
                // This claim, whose answer was lost.
                Some(kv) if lease != 0 && kv.lease == lease => break None,
                Some(kv) => {
                    let other = serde_json::from_slice::<Value>(&kv.value).unwrap_or_default();
                    let (host, dir) = (&other["host"], &other["data_dir"]);
                    // This node's own last run (this data directory, whose lock this process
                    // holds: its writer is gone, or is the process this upgrade's successor
                    // replaces, whose older build's record says no directory).
                    if same_node(&other, &mine, successor) {
                        json!({"target": "MOD", "mod_revision": kv.mod_revision.to_string()})
                    } else {
                        let live = first_seen
                            .as_ref()
                            .is_some_and(|first| first["last_seen"] != other["last_seen"]);
                        if live || Instant::now() >= deadline {
                            // Another volume at this host name and data directory path (two
                            // containers sharing the host's name) is another node too.
                            break Some(format!(
                                "node_id {:?} is in use by a live node (host {host}, data \
                                 directory {dir}): give each node its own [cluster] node_id",
                                self.node_id
                            ));
                        }
                        if first_seen.is_none() {
                            log::warn!(
                                "node_id {:?}: etcd holds the record of a node on host {host} \
                                 (data directory {dir}); waiting up to {NODE_TTL_S} s for it \
                                 to expire, as a stopped node's does",
                                self.node_id
                            );
                        }
                        first_seen.get_or_insert(other);
                        std::thread::sleep(TWIN_RECHECK);
                        continue;
                    }
                }
            };
            if lease != 0 {
                let _ = self.client.revoke(lease);
            }
            lease = self.client.grant(NODE_TTL_S).map_err(failed)?;
            match self.client.put_if(&key, &record, lease, compare) {
                Ok(Ok(())) => break None,
                // Another node wrote it meanwhile, or the answer was lost: read it again.
                Ok(Err(_)) | Err(EtcdError::Unknown(_)) if Instant::now() < deadline => {}
                Ok(Err(_)) | Err(EtcdError::Unknown(_)) => {
                    break Some(format!(
                        "node_id {:?}: its record in {url} kept changing for {} s; is another \
                         node starting with it?",
                        self.node_id,
                        NODE_TTL_S + 2
                    ))
                }
                Err(e) => return Err(failed(e)),
            }
        };
        match refused {
            None => {
                self.lease = lease;
                Ok(())
            }
            Some(why) => {
                if lease != 0 {
                    let _ = self.client.revoke(lease);
                }
                Err(OpenError::Invalid(why))
            }
        }
    }

    /// The lease this node's record was claimed under.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Takes the highest config revision the live nodes have seen (their records say it):
    /// after a restore from a backup, a node started since goes on past it too.
    fn learn_highest(&mut self) {
        if let Ok(nodes) = self.nodes() {
            let seen = (nodes.iter())
                .filter_map(|n| n["highest_revision"].as_u64())
                .filter(|&h| h < MAX_REVISION);
            self.highest = seen.fold(self.highest, u64::max);
        }
    }

    /// Other nodes that use one of `removed` (`kind/id`): "`kind/id` (node N)" each. Only
    /// what a node file's listeners can use (policies, certificates) is looked up, so a
    /// write that removes nothing of those (a dry run too) does not wait on etcd.
    pub fn used_elsewhere(&mut self, removed: &[String]) -> Result<Vec<String>, StoreError> {
        let usable = |r: &&String| r.starts_with("policies/") || r.starts_with("certificates/");
        if !removed.iter().any(|r| usable(&r)) {
            return Ok(Vec::new());
        }
        let mut users = Vec::new();
        for node in self.nodes()? {
            let id = node["id"].as_str().unwrap_or("?");
            if id == self.node_id {
                continue;
            }
            for used in node["uses"].as_array().into_iter().flatten() {
                if let Some(u) = used.as_str().filter(|u| removed.iter().any(|r| r == u)) {
                    users.push(format!("{u} (listeners of node {id})"));
                }
            }
        }
        Ok(users)
    }

    /// A field of this node's settings that `next` changes: its JSON pointer.
    pub fn changed_node_setting(&self, next: &Config) -> Option<&'static str> {
        let n = &self.node;
        if next.workers != n.workers {
            Some("/workers")
        } else if next.listeners != n.listeners {
            Some("/listeners")
        } else if next.admin != n.admin {
            Some("/admin")
        } else if next.access_log != n.access_log {
            Some("/access_log")
        } else if next.resolver != n.resolver {
            Some("/resolver")
        } else if next.cluster != n.cluster {
            Some("/cluster")
        } else {
            None
        }
    }
}

/// Whether `other` is a record of the node `mine` describes: of this build, the same host
/// name, boot (a machine's `boot_id`: two machines given one host name are two nodes) and
/// data directory (its path, device and inode: two containers sharing the host's name, each
/// with its own volume at one path, are two nodes). An older build's record cannot say which
/// volume it had: it is this node's own only to an upgrade's `successor`, whose predecessor
/// wrote it.
pub fn same_node(other: &Value, mine: &Value, successor: bool) -> bool {
    let field = |r: &Value, f: &str| r[f].as_str().filter(|v| !v.is_empty()).map(str::to_owned);
    let same_place = other["host"] == mine["host"] && other["data_dir"] == mine["data_dir"];
    match field(other, "data_dir_id") {
        Some(id) => {
            same_place
                && Some(id) == field(mine, "data_dir_id")
                && field(other, "boot_id") == field(mine, "boot_id")
        }
        None => successor && (other["host"].is_null() || same_place),
    }
}

/// The data directory's device and inode (`DEV:INO`), empty if unreadable.
fn dir_id(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| format!("{}:{}", m.dev(), m.ino()))
        .unwrap_or_default()
}

/// This boot of this machine (`/proc/sys/kernel/random/boot_id`), empty if unreadable.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// This machine's host name (`/proc/sys/kernel/hostname`), empty if unreadable.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_says_whether_the_write_may_have_been_made() {
        // Before, every 503 said a write may have been made, a read's and a refused
        // connection's too.
        let not_sent = unavailable(EtcdError::Unavailable("connection refused".into()));
        assert!(
            not_sent.to_string().ends_with("nothing changed"),
            "{not_sent}"
        );
        let lost = unavailable(EtcdError::Unknown("timed out".into()));
        assert!(
            lost.to_string().contains("may still have been made"),
            "{lost}"
        );
    }

    #[test]
    fn keys_are_sealed_and_opened_only_with_the_same_secret() {
        let key = NewKey::new("-----BEGIN PRIVATE KEY-----\nxyz\n".to_owned());
        let secret = [7u8; 32];
        let sealed = seal(&secret, &key).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"));
        assert_eq!(
            open_sealed(&secret, key.sha256(), &sealed).unwrap(),
            key.pem()
        );
        assert!(open_sealed(&[8u8; 32], key.sha256(), &sealed).is_err());
        // Bound to its name: the same ciphertext under another digest does not open.
        let other = common::tls::sha256_hex(b"other");
        assert!(open_sealed(&secret, &other, &sealed).is_err());
    }

    #[test]
    fn node_and_shared_settings_split_and_merge() {
        let c: Config = common::parse_config(
            r#"
            workers = 2
            [[listeners]]
            address = "127.0.0.1:0"
            policies = ["ipf"]
            [[policies]]
            id = "ipf"
            kind = "ip_filter"
            allow = ["127.0.0.0/8"]
            [cluster]
            node_id = "a"
            "#,
            common::Format::Toml,
        )
        .unwrap();
        let node = node_settings(&c);
        let shared = shared_settings(&c);
        assert!(node.policies.is_empty() && shared.listeners.is_empty());
        assert!(shared.cluster.is_none() && shared.workers.is_none());
        assert_eq!(merge(&node, &shared), c);
        assert_eq!(uses(&node), ["policies/ipf"]);
    }
}
