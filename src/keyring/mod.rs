//! The keyring: named secrets (DH-HMAC-CHAP secrets, TLS PSKs) that configurations and RPCs
//! refer to by name, as SPDK's keyring does (`keyring_file_add_key`, `keyring_get_keys`).
//!
//! A key is read from its file once, when added ([`file`] checks the file first: a regular
//! file, not a symlink, owned by the daemon's user, no access for group or other), and held in
//! memory that is wiped when the key goes ([`Secret`]). Only the name and the path ever leave
//! this module: `save_config` writes `keyring_file_add_key {name, path}`, `keyring_get_keys`
//! lists names and paths, the metric counts keys, log lines name keys and files. The secret's
//! bytes are reachable only through [`KeyRef::secret`], which the users of keys (DH-HMAC-CHAP,
//! TLS) take with [`Keyring::get`]; a key with users cannot be removed.

pub mod file;
pub mod rpc;

use crate::config::ConfigCall;
use crate::metrics::MetricsOut;
use crate::module::{Ctx, Module};
use crate::rpc::{RpcError, EBUSY, EEXIST, ENODEV};
use serde_json::json;
use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use zeroize::Zeroizing;

/// Why the keyring refused a request; mapped to JSON-RPC codes in one place ([`From`] below).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("key {0} already exists")]
    Exists(String),
    #[error("key {0} does not exist")]
    NotFound(String),
    #[error("key {name} is in use by {user}; remove that user first")]
    InUse { name: String, user: String },
    #[error("invalid key name {0:?}: use 1 to 255 characters, none of them a control character")]
    BadName(String),
    /// The key file cannot be used: [`file`] says why (mode, owner, symlink, ...).
    #[error("{0}")]
    File(#[from] file::FileError),
}

impl From<KeyringError> for RpcError {
    fn from(e: KeyringError) -> Self {
        let code = match &e {
            KeyringError::Exists(_) => EEXIST,
            KeyringError::NotFound(_) => ENODEV,
            KeyringError::InUse { .. } => EBUSY,
            KeyringError::BadName(_) => crate::rpc::INVALID_PARAMS,
            // SPDK's codes: -EPERM for a refused path, kind, mode or owner; -errno for an open.
            KeyringError::File(f) => f.code(),
        };
        RpcError::new(code, e.to_string())
    }
}

/// Key material: wiped from memory when dropped, never printed.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Secret {
        Secret(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A log line or a `{:?}` in an error must not carry the secret: both print the length only.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret([redacted; {} bytes])", self.0.len())
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[redacted; {} bytes]", self.0.len())
    }
}

/// One key of the keyring.
#[derive(Debug)]
pub struct Key {
    name: String,
    path: PathBuf,
    secret: Secret,
    /// Who holds a [`KeyRef`] now (one entry per reference), so that a refused removal can
    /// name them.
    users: Mutex<Vec<String>>,
}

impl Key {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn users(&self) -> MutexGuard<'_, Vec<String>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of [`KeyRef`]s held (SPDK's `refcnt`).
    pub fn refcnt(&self) -> usize {
        self.users().len()
    }
}

/// A user's hold on a key: the key cannot be removed while one exists. Dropping it releases
/// the hold.
#[derive(Debug)]
pub struct KeyRef {
    key: Arc<Key>,
    user: String,
}

impl KeyRef {
    pub fn name(&self) -> &str {
        &self.key.name
    }

    /// The key's bytes (file content without trailing whitespace), for the protocol that uses
    /// them; never for a log line or a reply.
    pub fn secret(&self) -> &[u8] {
        self.key.secret.expose()
    }
}

/// Another hold by the same user (an NVMe/TCP controller still connecting keeps one, and gives
/// its controller another once it connects).
impl Clone for KeyRef {
    fn clone(&self) -> KeyRef {
        self.key.users().push(self.user.clone());
        KeyRef { key: self.key.clone(), user: self.user.clone() }
    }
}

impl Drop for KeyRef {
    fn drop(&mut self) {
        let mut users = self.key.users();
        let i = users.iter().position(|u| *u == self.user);
        debug_assert!(i.is_some(), "KeyRef of {} by {} not in the key's user list", self.key.name, self.user);
        if let Some(i) = i {
            users.swap_remove(i);
        }
    }
}

/// The daemon's keys by name (the `keyring` subsystem).
#[derive(Default)]
pub struct Keyring {
    /// Added order is kept through `order` so that `save_config` writes the keys as they were
    /// added; lookups go through the map.
    keys: Mutex<BTreeMap<String, (u64, Arc<Key>)>>,
    next: std::sync::atomic::AtomicU64,
}

/// Longest key name (SPDK limits names only by its JSON decoder; 255 keeps log lines sane).
const MAX_NAME_LEN: usize = 255;

impl Keyring {
    fn keys(&self) -> MutexGuard<'_, BTreeMap<String, (u64, Arc<Key>)>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the key in `path` (checked by [`file::read_key`]) and adds it as `name`.
    pub fn add_file_key(&self, name: &str, path: &Path) -> Result<(), KeyringError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(KeyringError::BadName(name.to_string()));
        }
        if self.keys().contains_key(name) {
            return Err(KeyringError::Exists(name.to_string()));
        }
        // Read outside the lock: a slow file system must not stall lookups.
        let secret = file::read_key(path)?;
        let key = Arc::new(Key { name: name.to_string(), path: path.to_path_buf(), secret, users: Mutex::new(Vec::new()) });
        let mut keys = self.keys();
        if keys.contains_key(name) {
            return Err(KeyringError::Exists(name.to_string()));
        }
        let order = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        keys.insert(name.to_string(), (order, key));
        log::info!("keyring: added key {name} from {}", path.display());
        Ok(())
    }

    /// Removes key `name`, unless something uses it.
    pub fn remove(&self, name: &str) -> Result<(), KeyringError> {
        let mut keys = self.keys();
        let (_, key) = keys.get(name).ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
        // Checked under the keyring's lock: `get` takes its reference under the same lock, so
        // no user can appear between this check and the removal.
        if let Some(user) = key.users().first() {
            return Err(KeyringError::InUse { name: name.to_string(), user: user.clone() });
        }
        keys.remove(name);
        log::info!("keyring: removed key {name}");
        Ok(())
    }

    /// Takes a hold on key `name` for `user` (a name for error messages: "host nqn.… of
    /// subsystem nqn.…"); the key cannot be removed until the [`KeyRef`] is dropped.
    pub fn get(&self, name: &str, user: &str) -> Result<KeyRef, KeyringError> {
        let keys = self.keys();
        let (_, key) = keys.get(name).ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
        key.users().push(user.to_string());
        Ok(KeyRef { key: key.clone(), user: user.to_string() })
    }

    /// Every key, in the order they were added.
    pub fn list(&self) -> Vec<Arc<Key>> {
        let keys = self.keys();
        let mut v: Vec<(u64, Arc<Key>)> = keys.values().cloned().collect();
        v.sort_by_key(|(o, _)| *o);
        v.into_iter().map(|(_, k)| k).collect()
    }

    pub fn len(&self) -> usize {
        self.keys().len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }
}

impl Module for Keyring {
    fn name(&self) -> &'static str {
        "keyring"
    }

    /// Names and paths only: the saved configuration reads each key from its file again.
    fn config(&self, _t: &Ctx) -> Vec<ConfigCall> {
        self.list().iter().map(|k| ConfigCall::new("keyring_file_add_key", json!({ "name": k.name, "path": k.path }))).collect()
    }

    fn metrics(&self, _t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        out.gauge("tidemark_keyring_keys", "Keys in the keyring (keyring_file_add_key).", &[(vec![], self.len() as f64)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The target's keyring.
pub fn keyring(t: &Ctx) -> Result<&Keyring, RpcError> {
    t.module::<Keyring>().ok_or_else(|| RpcError::internal("the keyring subsystem is missing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_key_in_use_cannot_be_removed_and_is_free_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let kr = Keyring::default();
        kr.add_file_key("k0", &key_file(dir.path(), "k0", "DHHC-1:00:c2VjcmV0:\n", 0o600)).unwrap();
        let r = kr.get("k0", "host nqn.h of nqn.s").unwrap();
        assert_eq!(r.secret(), b"DHHC-1:00:c2VjcmV0:", "trailing newline dropped");
        assert_eq!(kr.list()[0].refcnt(), 1);
        let e = kr.remove("k0").unwrap_err();
        assert_eq!(e, KeyringError::InUse { name: "k0".into(), user: "host nqn.h of nqn.s".into() });
        let rpc = RpcError::from(e);
        assert_eq!(rpc.code, EBUSY);
        assert!(rpc.message.contains("host nqn.h of nqn.s"), "{}", rpc.message);
        drop(r);
        assert_eq!(kr.list()[0].refcnt(), 0);
        kr.remove("k0").unwrap();
        assert_eq!(kr.remove("k0").unwrap_err(), KeyringError::NotFound("k0".into()));
        assert!(matches!(kr.get("k0", "x"), Err(KeyringError::NotFound(_))));
    }

    #[test]
    fn names_are_unique_and_listed_in_added_order() {
        let dir = tempfile::tempdir().unwrap();
        let kr = Keyring::default();
        for n in ["zz", "aa", "mm"] {
            kr.add_file_key(n, &key_file(dir.path(), n, "s", 0o400)).unwrap();
        }
        let names: Vec<String> = kr.list().iter().map(|k| k.name().to_string()).collect();
        assert_eq!(names, ["zz", "aa", "mm"]);
        assert_eq!(kr.add_file_key("aa", &dir.path().join("aa")).unwrap_err(), KeyringError::Exists("aa".into()));
        assert!(matches!(kr.add_file_key("", &dir.path().join("aa")), Err(KeyringError::BadName(_))));
        assert!(matches!(kr.add_file_key("a\nb", &dir.path().join("aa")), Err(KeyringError::BadName(_))));
    }

    #[test]
    fn debug_and_display_never_print_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let kr = Keyring::default();
        kr.add_file_key("k", &key_file(dir.path(), "k", "TOPSECRET-5f3a", 0o600)).unwrap();
        let r = kr.get("k", "test").unwrap();
        let shown = format!("{:?} {:?} {:?} {}", kr.list(), r, r.key.secret, r.key.secret);
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(shown.contains("redacted; 14 bytes"), "{shown}");
    }
}
