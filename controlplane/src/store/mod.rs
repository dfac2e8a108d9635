//! Where the authoritative config and its history live: the data directory of a single node
//! ([`LocalStore`], the default), or etcd, shared by a cluster of nodes ([`EtcdStore`]). The
//! admin API sees one [`Store`] with the same revisions, per-item revisions and history on
//! either.

pub mod etcd;
pub mod local;

use std::path::Path;

use common::Config;

pub use etcd::EtcdStore;
pub use local::{item_values, LocalStore, StoredRevision, COMPACT_AT, KEEP};

use crate::keys::NewKey;

/// Why a commit (or a read of the history) did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another node committed first: the store now holds its revision; build the change
    /// again on it.
    #[error("another revision was committed first")]
    Conflict,
    /// The shared store cannot be reached; nothing is known to have changed.
    #[error("{0}")]
    Unavailable(String),
    /// The write was refused or could not be made durable.
    #[error("{0}")]
    Failed(String),
    /// The store holds a config this build cannot read (a newer build wrote it).
    #[error("{0}")]
    Unreadable(String),
    /// The store refused the write for its size.
    #[error("{0}")]
    TooLarge(String),
}

/// The config store of this node.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process
pub enum Store {
    Local(LocalStore),
    Etcd(EtcdStore),
}

impl Store {
    /// The latest committed revision this node knows.
    pub fn revision(&self) -> u64 {
        match self {
            Store::Local(s) => s.revision(),
            Store::Etcd(s) => s.revision(),
        }
    }

    /// The revision the next commit makes.
    pub fn next_revision(&self) -> u64 {
        match self {
            Store::Local(s) => s.revision() + 1,
            Store::Etcd(s) => s.next_revision(),
        }
    }

    /// The config of [`Store::revision`] (with an etcd store: the shared resources merged
    /// with this node's own settings).
    pub fn config(&self) -> &Config {
        match self {
            Store::Local(s) => s.config(),
            Store::Etcd(s) => s.config(),
        }
    }

    /// The data directory (private keys, the admin token).
    pub fn dir(&self) -> &Path {
        match self {
            Store::Local(s) => s.dir(),
            Store::Etcd(s) => s.dir(),
        }
    }

    /// Revision at which the item `kind/id` last changed.
    pub fn item_revision(&self, kind: &str, id: &str) -> Option<u64> {
        match self {
            Store::Local(s) => s.item_revision(kind, id),
            Store::Etcd(s) => s.item_revision(kind, id),
        }
    }

    /// Revision at which each item (`kind/id`) last changed.
    pub fn item_revisions(&self) -> &std::collections::BTreeMap<String, u64> {
        match self {
            Store::Local(s) => s.item_revisions(),
            Store::Etcd(s) => s.item_revisions(),
        }
    }

    /// Makes `config` the next revision, durably, with the private keys it introduces
    /// stored first. Returns its number.
    pub fn commit(
        &mut self,
        config: Config,
        source: &str,
        new_keys: &[NewKey],
    ) -> Result<u64, StoreError> {
        match self {
            Store::Local(s) => {
                crate::keys::save(s.dir(), new_keys).map_err(|e| {
                    StoreError::Failed(format!(
                        "a private key could not be written to the data directory: {e}"
                    ))
                })?;
                s.commit(config, source).map_err(|e| {
                    StoreError::Failed(format!(
                        "the change could not be written to the data directory: {e}"
                    ))
                })
            }
            Store::Etcd(s) => s.commit(config, source, new_keys),
        }
    }

    /// Stored revisions, oldest first (without their configs).
    pub fn revisions(&mut self) -> Result<Vec<StoredRevision>, StoreError> {
        match self {
            Store::Local(s) => Ok(s.revisions()),
            Store::Etcd(s) => s.revisions(),
        }
    }

    /// One stored revision, if it is still kept.
    pub fn load_revision(&mut self, n: u64) -> Result<Option<StoredRevision>, StoreError> {
        match self {
            Store::Local(s) => s
                .load_revision(n)
                .map_err(|e| StoreError::Failed(e.to_string())),
            Store::Etcd(s) => s.load_revision(n),
        }
    }
}
