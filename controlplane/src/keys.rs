//! Private keys of certificates, kept out of the config: each key accepted in `key_pem` is
//! written to `DATA_DIR/keys/<sha256>.pem` (directory 0700, file 0600) before the config that
//! names it by `key_sha256` is committed, and read back from there before every compile.
//! Keys are never deleted, so a rollback to an older revision finds its key again.

use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use common::config::StoredKey;
use common::tls::{is_sha256_hex, sha256_hex};
use common::Config;

/// A key sent in the clear that needs storing: its digest and its PEM text.
#[derive(Debug)]
pub struct NewKey {
    sha256: String,
    pem: String,
}

impl NewKey {
    pub fn new(pem: String) -> NewKey {
        NewKey {
            sha256: sha256_hex(pem.as_bytes()),
            pem,
        }
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// Whether the key with this digest is in the data directory.
pub fn has(dir: &Path, sha256: &str) -> bool {
    path(dir, sha256).is_some_and(|p| p.exists())
}

fn path(dir: &Path, sha256: &str) -> Option<PathBuf> {
    is_sha256_hex(sha256).then(|| dir.join("keys").join(format!("{sha256}.pem")))
}

/// The keys `config` carries in `key_pem` (compiling drops them from it).
pub fn take_new(config: &Config) -> Vec<NewKey> {
    config
        .certificates
        .iter()
        .filter_map(|c| c.key_pem.as_ref())
        .map(|pem| NewKey::new(pem.clone()))
        .collect()
}

/// Fills in the stored key of each certificate that names one only by `key_sha256`. A
/// missing file leaves it empty: compiling then says which field has no key.
pub fn load(dir: &Path, config: &mut Config) {
    for c in &mut config.certificates {
        if c.key_pem.is_some() || c.key_file.is_some() {
            continue;
        }
        let Some(file) = c.key_sha256.as_deref().and_then(|s| path(dir, s)) else {
            continue;
        };
        if let Ok(pem) = std::fs::read_to_string(file) {
            c.stored_key = StoredKey(Some(pem.into()));
        }
    }
}

/// Writes `keys` (mode 0600) that are not on disk yet, synced, before the config naming them
/// is committed.
pub fn save(dir: &Path, keys: &[NewKey]) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let keys_dir = dir.join("keys");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&keys_dir)?;
    for k in keys {
        let Some(file) = path(dir, &k.sha256) else {
            continue;
        };
        if file.exists() {
            continue;
        }
        let tmp = keys_dir.join(format!(".{}.tmp", k.sha256));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(k.pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)?;
    }
    std::fs::File::open(&keys_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::CertificateConfig;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_stored_0600_and_found_by_digest() {
        let dir = std::env::temp_dir().join(format!("gw-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = Config::default();
        config.certificates.push(CertificateConfig {
            id: "a".into(),
            key_pem: Some("-----BEGIN PRIVATE KEY-----\nabc\n".into()),
            ..Default::default()
        });
        let new = take_new(&config);
        assert_eq!(new.len(), 1);
        save(&dir, &new).unwrap();
        let file = path(&dir, &new[0].sha256).unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.join("keys"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        let mut later = Config::default();
        later.certificates.push(CertificateConfig {
            id: "a".into(),
            key_sha256: Some(new[0].sha256.clone()),
            ..Default::default()
        });
        load(&dir, &mut later);
        assert_eq!(
            later.certificates[0].stored_key.0.as_deref(),
            Some("-----BEGIN PRIVATE KEY-----\nabc\n")
        );
        // A digest that is not hex never becomes a path.
        later.certificates[0].key_sha256 = Some("../../etc/passwd".into());
        later.certificates[0].stored_key = StoredKey(None);
        load(&dir, &mut later);
        assert!(later.certificates[0].stored_key.0.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
