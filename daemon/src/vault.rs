//! The encrypted vault: secrets, internal sealed blobs and handle records in one redb file,
//! `<state_dir>/vault.redb`. The only module that uses redb and aes-gcm.
//!
//! Each secret version is sealed with AES-256-GCM under a fresh random 96-bit nonce, with
//! associated data binding it to its name and version, so a record copied to another name or
//! rolled back to another version fails to open. The master key never lives in the vault: it
//! comes from a key file ([`KeySource::File`], created 0600 on first start) or a systemd
//! credential ([`KeySource::SystemdCredential`]).
//!
//! Opening never damages an existing vault: the master key, the file's integrity and a sealed
//! key-check record are all verified on a copy-on-write view of the file (only the pages redb
//! writes are held in memory) before the file itself is opened for writing, so a wrong key or a
//! corrupt file is refused with the file byte-for-byte unchanged. A symlink or anything else
//! but a regular file is refused, never followed. The file's life (lock, creation, check,
//! open) is `crate::store`'s; this module says what a new vault holds and what makes a file a
//! vault opened with the right key.
//!
//! redb is synchronous and so is this API: from async code call it through
//! `tokio::task::spawn_blocking` (share the vault as `Arc<Vault>`; it is `Send + Sync`), and never
//! across an `.await`. Every write is one redb write transaction, committed durably (redb's
//! default `Durability::Immediate`) before the method returns.
//!
//! Handle records are stored as JSON, unsealed: what `handle list` shows, the token's SHA-256,
//! and for a shaped handle its shape (the secret's prefix, length and alphabet, nothing more).
//!
//! Never: log, print or return a secret value in an error; store a handle token (only its
//! SHA-256); create a new master key for a vault that already exists.

mod key;
mod seal;
mod tables;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use nix::fcntl::Flock;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableError, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::store::{self, Locked, Opened, StoreError, StoreName};

use agent_broker_core::{
    cgroup::CgroupPath,
    handle::{HandleBinding, HandleId, HandleRecord, TokenHash, TokenShape},
    secret::{SecretError, SecretName, SecretValue},
    time::{from_unix_secs, now_unix_secs, unix_secs},
};
use agent_broker_protocol::HandleInfo;
use seal::{Cipher, SealError};
use tables::{
    BLOBS, FORMAT, FORMAT_KEY, HANDLE_TOKENS, HANDLES, KEY_CHECK_AAD, KEY_CHECK_KEY,
    KEY_CHECK_PLAINTEXT, META, SECRETS, Sealed, SecretRecord, blob_aad, secret_aad,
};

/// File name of the vault inside the state directory.
pub const VAULT_FILE: &str = "vault.redb";
/// File name of the default master key file inside the state directory.
pub const KEY_FILE: &str = "master.key";
/// Name of the systemd credential holding the master key (`LoadCredential=` or
/// `LoadCredentialEncrypted=` in the unit).
pub const SYSTEMD_CREDENTIAL_NAME: &str = "agent-broker-master-key";
/// The variable systemd sets to the directory of a service's credentials.
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";
/// What messages call the vault and its file.
const NAME: StoreName = StoreName {
    store: "vault",
    file: "vault file",
};
/// The vault as a redb store file. `vault.lock` is held for as long as a [`Vault`] is open, so
/// two processes never open one vault.
static STORE: store::Spec = store::Spec {
    name: NAME,
    file: VAULT_FILE,
    // Point reads of small records: a vault's hot pages fit many times over, and the check on
    // open, which reads every page, stays bounded too.
    cache_size: 16 * 1024 * 1024,
    full_check_below: None,
};
/// Longest accepted internal blob name.
const MAX_BLOB_NAME_LEN: usize = 128;

/// Where the master key comes from. It is exactly `seal::MASTER_KEY_LEN` (32) raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A key file: must be a regular file owned by the broker's user with no group or other
    /// access (mode 0600 or 0400). Created with mode 0600 when neither it nor the vault exists.
    File(PathBuf),
    /// The systemd credential [`SYSTEMD_CREDENTIAL_NAME`] in `dir`, or in
    /// `$CREDENTIALS_DIRECTORY` when `dir` is `None`. Never created.
    SystemdCredential { dir: Option<PathBuf> },
}

impl KeySource {
    /// The default: `<state_dir>/master.key`.
    pub fn default_file(state_dir: &Path) -> Self {
        Self::File(state_dir.join(KEY_FILE))
    }
}

/// What `secret list` shows: never a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: SecretName,
    /// 1 for a new secret, +1 on every `set` or `rotate`.
    pub version: u64,
    /// Unix seconds when the first version was stored.
    pub created_unix: u64,
    /// Unix seconds when the latest version was stored.
    pub updated_unix: u64,
}

/// Everything the vault can refuse. Messages name the file or secret, never a value.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Locking, creating, checking or opening the file, or reading or writing it.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "vault {vault} exists but its master key file {key} is missing; refusing to create a new key for an existing vault (restore the key file)"
    )]
    KeyFileMissing { key: PathBuf, vault: PathBuf },
    #[error("cannot read master key {path}")]
    KeyFileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create master key file {path}")]
    KeyFileCreate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("master key file {path} is not a regular file")]
    KeyFileNotRegular { path: PathBuf },
    #[error(
        "master key file {path} has mode {mode:04o}; group and others must have no access (chmod 600 {path})",
        path = path.display()
    )]
    KeyFilePermissions { path: PathBuf, mode: u32 },
    #[error(
        "master key file {path} is owned by uid {owner}, not by uid {euid} that runs the broker",
        path = path.display()
    )]
    KeyFileOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "master key {path} is {len} bytes; it must be exactly 32 raw bytes (e.g. head -c 32 /dev/urandom)",
        path = path.display()
    )]
    KeyFileLength { path: PathBuf, len: u64 },
    #[error(
        "the master key is to come from a systemd credential but ${CREDENTIALS_DIRECTORY_ENV} is not set (add LoadCredential={SYSTEMD_CREDENTIAL_NAME}:... to the unit)"
    )]
    CredentialsDirectoryUnset,
    #[error(
        "systemd credential {path} does not exist (add LoadCredential={SYSTEMD_CREDENTIAL_NAME}:... to the unit)",
        path = path.display()
    )]
    CredentialMissing { path: PathBuf },
    #[error("cannot get random bytes from the operating system")]
    Random {
        #[source]
        source: getrandom::Error,
    },
    #[error("wrong master key for vault {path}")]
    WrongKey { path: PathBuf },
    #[error("vault {path}: malformed record: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error(
        "secret {name} failed to decrypt: its record was altered, or moved from another name or version"
    )]
    Decrypt { name: String },
    #[error("vault blob {name} failed to decrypt: its record was altered or moved")]
    BlobDecrypt { name: String },
    #[error("cannot seal {what}: the value is too long")]
    TooLong { what: String },
    #[error("no secret named {name}")]
    NotFound { name: SecretName },
    #[error("secret {name} not stored")]
    InvalidValue {
        name: SecretName,
        #[source]
        source: SecretError,
    },
    #[error("invalid vault blob name {name:?}: 1-{MAX_BLOB_NAME_LEN} bytes")]
    InvalidBlobName { name: String },
    #[error("invalid handle record: {reason}")]
    InvalidHandle { reason: String },
    #[error("handle {id} has the same token hash as handle {other}")]
    HandleTokenConflict { id: String, other: String },
    #[error(
        "the vault file {path} was replaced or removed while brokerd runs; refusing to write to the file brokerd opened (it would be lost at the next start): restart brokerd to open what is there now"
    )]
    Replaced { path: PathBuf },
}

/// The device and inode `path` names now, if it exists.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl VaultError {
    fn seal(e: SealError, what: impl FnOnce() -> String) -> Self {
        match e {
            SealError::Random(source) => Self::Random { source },
            SealError::TooLong => Self::TooLong { what: what() },
        }
    }
}

/// The open vault. See the module docs for the threading and durability contract.
pub struct Vault {
    // Declared before `_lock`: the database closes before the lock is released.
    db: Database,
    cipher: Cipher,
    path: PathBuf,
    /// The shapes of the stored shaped handles, each once, sorted: what requests are searched
    /// for (see `agent_broker_core::handle`). Read from the handles at open, grown by
    /// [`Vault::put_handle`]; handles are never removed (revoked and expired ones stay, so
    /// their tokens are still recognised and refused).
    handle_shapes: RwLock<Arc<[TokenShape]>>,
    /// Bumped whenever a secret is stored, rotated or removed (see [`Vault::generation`]).
    generation: AtomicU64,
    /// The device and inode of the file opened: a write is refused once the path names
    /// another file (see [`Vault::write_txn`]).
    file_id: (u64, u64),
    _lock: Flock<File>,
}

// The daemon shares one vault between tasks, and its errors cross threads inside anyhow.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vault>();
    assert_send_sync::<VaultError>();
};

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens `<state_dir>/vault.redb`, creating the state directory (0700), the key file and the
    /// vault on first start.
    ///
    /// Refuses, without writing to the vault: a key file others can read or that is not 32
    /// bytes, an existing vault whose key file is missing, a wrong key, a corrupt or foreign
    /// file, a symlink or anything else that is not a regular file, and a vault another process
    /// has open.
    pub fn open(state_dir: &Path, key: KeySource) -> Result<Vault, VaultError> {
        let locked = Locked::take(&STORE, state_dir)?;
        let vault_exists = locked.exists()?;
        let master = match &key {
            KeySource::File(key_path) => {
                key::load_or_create_file(key_path, locked.path(), vault_exists)?
            }
            KeySource::SystemdCredential { dir } => key::load_systemd_credential(dir.as_deref())?,
        };
        let cipher = Cipher::new(&master);
        drop(master);

        if !vault_exists {
            // Sealed before the file exists, so a failure here leaves nothing behind.
            let check = cipher
                .seal(KEY_CHECK_AAD, KEY_CHECK_PLAINTEXT)
                .map_err(|e| VaultError::seal(e, || "the key check record".into()))?;
            locked.create(|txn| init_vault(txn, &check))?;
        }
        let checked = locked.path().to_path_buf();
        let Opened { db, path, lock } = locked.open(|db| check_key(db, &cipher, &checked))?;
        let file_id = file_id(&path).ok_or_else(|| VaultError::Replaced { path: path.clone() })?;
        let vault = Vault {
            file_id,
            db,
            cipher,
            path,
            handle_shapes: RwLock::new(Arc::from([])),
            generation: AtomicU64::new(0),
            _lock: lock,
        };
        check_key(&vault.db, &vault.cipher, &vault.path)?;
        vault.ensure_tables()?;
        // A handle row that does not parse refuses the open: its shape could not be searched
        // for, and its token would reach an upstream unswapped.
        vault.load_handle_shapes()?;
        Ok(vault)
    }

    /// Changes whenever a secret value may have changed (stored, rotated or removed through
    /// this vault), so what is derived from the values (the scrubbing automata) can be cached.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores `value` as the secret `name`: version 1 if new, else the next version.
    pub fn set(&self, name: &SecretName, value: SecretValue) -> Result<SecretMeta, VaultError> {
        self.write_secret(name, &value, false)
    }

    /// Stores `value` as the next version of the existing secret `name`.
    pub fn rotate(&self, name: &SecretName, value: SecretValue) -> Result<SecretMeta, VaultError> {
        self.write_secret(name, &value, true)
    }

    /// The latest version of `name`, or `None` if there is no such secret. A record that fails
    /// to decrypt (altered, or moved from another name or version) is an error naming the secret.
    pub fn get(&self, name: &SecretName) -> Result<Option<SecretValue>, VaultError> {
        let txn = self.read_txn()?;
        let table = txn
            .open_table(SECRETS)
            .map_err(self.storage("opening the secrets table"))?;
        let Some(guard) = table
            .get(name.as_str())
            .map_err(self.storage("reading a secret"))?
        else {
            return Ok(None);
        };
        let record = self.decode_secret(name.as_str(), guard.value())?;
        let plaintext = self
            .cipher
            .open(&secret_aad(name.as_str(), record.version), &record.sealed)
            .ok_or_else(|| VaultError::Decrypt {
                name: name.to_string(),
            })?;
        Ok(Some(SecretValue::from_zeroizing(plaintext)))
    }

    /// Names, versions and dates of all secrets, sorted by name. Decrypts nothing.
    pub fn list(&self) -> Result<Vec<SecretMeta>, VaultError> {
        let txn = self.read_txn()?;
        let table = txn
            .open_table(SECRETS)
            .map_err(self.storage("opening the secrets table"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(self.storage("listing secrets"))? {
            let (key, value) = entry.map_err(self.storage("listing secrets"))?;
            let name = SecretName::new(key.value()).map_err(|e| self.malformed(e.to_string()))?;
            let record = self.decode_secret(name.as_str(), value.value())?;
            out.push(SecretMeta {
                name,
                version: record.version,
                created_unix: record.created_unix,
                updated_unix: record.updated_unix,
            });
        }
        Ok(out)
    }

    /// Deletes `name`; `false` if there was no such secret.
    pub fn remove(&self, name: &SecretName) -> Result<bool, VaultError> {
        let removed = self.remove_from(SECRETS, name.as_str(), "removing a secret");
        self.generation.fetch_add(1, Ordering::AcqRel);
        removed
    }

    /// Seals an internal blob (such as the broker CA private key) under `name`, replacing any
    /// previous one. Blobs are kept apart from secrets: they never show in [`Vault::list`] and
    /// cannot be injected.
    pub fn put_blob(&self, name: &str, value: &SecretValue) -> Result<(), VaultError> {
        check_blob_name(name)?;
        let sealed = self
            .cipher
            .seal(&blob_aad(name), value.expose())
            .map_err(|e| VaultError::seal(e, || format!("vault blob {name}")))?;
        let txn = self.write_txn()?;
        {
            let mut table = txn
                .open_table(BLOBS)
                .map_err(self.storage("opening the blobs table"))?;
            table
                .insert(name, sealed.encode().as_slice())
                .map_err(self.storage("writing a blob"))?;
        }
        self.commit(txn)
    }

    /// The blob `name`, or `None` if there is none.
    pub fn get_blob(&self, name: &str) -> Result<Option<SecretValue>, VaultError> {
        let txn = self.read_txn()?;
        let table = txn
            .open_table(BLOBS)
            .map_err(self.storage("opening the blobs table"))?;
        let Some(guard) = table.get(name).map_err(self.storage("reading a blob"))? else {
            return Ok(None);
        };
        let sealed = Sealed::decode(guard.value())
            .ok_or_else(|| self.malformed(format!("vault blob {name}")))?;
        let plaintext =
            self.cipher
                .open(&blob_aad(name), &sealed)
                .ok_or_else(|| VaultError::BlobDecrypt {
                    name: name.to_string(),
                })?;
        Ok(Some(SecretValue::from_zeroizing(plaintext)))
    }

    /// Deletes the blob `name`; `false` if there was none.
    pub fn remove_blob(&self, name: &str) -> Result<bool, VaultError> {
        self.remove_from(BLOBS, name, "removing a blob")
    }

    /// Stores `handle`, replacing the record with the same id (and its token index entry).
    pub fn put_handle(&self, handle: &HandleRecord) -> Result<(), VaultError> {
        let row = serde_json::to_vec(&HandleRow::from(handle)).map_err(|e| {
            VaultError::InvalidHandle {
                reason: e.to_string(),
            }
        })?;
        let txn = self.write_txn()?;
        {
            let mut handles = txn
                .open_table(HANDLES)
                .map_err(self.storage("opening the handles table"))?;
            let mut tokens = txn
                .open_table(HANDLE_TOKENS)
                .map_err(self.storage("opening the handle token table"))?;
            let previous = match handles
                .get(handle.id.as_str())
                .map_err(self.storage("reading a handle"))?
            {
                Some(guard) => Some(self.decode_handle(handle.id.as_str(), guard.value())?),
                None => None,
            };
            if let Some(previous) = previous
                && previous.token_hash != handle.token_hash
            {
                tokens
                    .remove(previous.token_hash.0.as_slice())
                    .map_err(self.storage("removing a handle token"))?;
            }
            let other = tokens
                .get(handle.token_hash.0.as_slice())
                .map_err(self.storage("reading a handle token"))?
                .map(|guard| guard.value().to_string());
            if let Some(other) = other
                && other != handle.id.as_str()
            {
                return Err(VaultError::HandleTokenConflict {
                    id: handle.id.as_str().to_string(),
                    other,
                });
            }
            handles
                .insert(handle.id.as_str(), row.as_slice())
                .map_err(self.storage("writing a handle"))?;
            tokens
                .insert(handle.token_hash.0.as_slice(), handle.id.as_str())
                .map_err(self.storage("writing a handle token"))?;
        }
        self.commit(txn)?;
        if let Some(shape) = &handle.shape {
            self.add_handle_shapes([shape.clone()]);
        }
        Ok(())
    }

    /// The shapes of the stored shaped handles, each once: what every request is searched for.
    pub fn handle_shapes(&self) -> Arc<[TokenShape]> {
        self.handle_shapes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn load_handle_shapes(&self) -> Result<(), VaultError> {
        let shapes = self.list_handles()?.into_iter().filter_map(|h| h.shape);
        *self
            .handle_shapes
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::from([]);
        self.add_handle_shapes(shapes);
        Ok(())
    }

    fn add_handle_shapes(&self, new: impl IntoIterator<Item = TokenShape>) {
        let mut shapes = self
            .handle_shapes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut all = shapes.to_vec();
        all.extend(new);
        all.sort();
        all.dedup();
        if all.len() != shapes.len() {
            *shapes = Arc::from(all);
        }
    }

    /// The handle whose token hashes to `token_sha256`, revoked or expired ones included (the
    /// caller decides, and can say why it refused).
    pub fn handle_by_token_hash(
        &self,
        token_hash: &TokenHash,
    ) -> Result<Option<HandleRecord>, VaultError> {
        let txn = self.read_txn()?;
        let tokens = txn
            .open_table(HANDLE_TOKENS)
            .map_err(self.storage("opening the handle token table"))?;
        let Some(id) = tokens
            .get(token_hash.0.as_slice())
            .map_err(self.storage("reading a handle token"))?
            .map(|guard| guard.value().to_string())
        else {
            return Ok(None);
        };
        let handle = self.handle_in(&txn, &id)?.ok_or_else(|| {
            self.malformed(format!("handle token index names missing handle {id}"))
        })?;
        if handle.token_hash != *token_hash {
            return Err(self.malformed(format!("handle token index disagrees with handle {id}")));
        }
        Ok(Some(handle))
    }

    /// The handle `id`, or `None`.
    pub fn get_handle(&self, id: &str) -> Result<Option<HandleRecord>, VaultError> {
        let txn = self.read_txn()?;
        self.handle_in(&txn, id)
    }

    /// All handles, sorted by id.
    pub fn list_handles(&self) -> Result<Vec<HandleRecord>, VaultError> {
        let txn = self.read_txn()?;
        let table = txn
            .open_table(HANDLES)
            .map_err(self.storage("opening the handles table"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(self.storage("listing handles"))? {
            let (key, value) = entry.map_err(self.storage("listing handles"))?;
            out.push(self.decode_handle(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// Marks the handle `id` revoked (kept, so its misuse can still be reported); `false` if
    /// there is no such handle. Revoking twice is not an error.
    pub fn revoke_handle(&self, id: &str) -> Result<bool, VaultError> {
        let txn = self.write_txn()?;
        {
            let mut handles = txn
                .open_table(HANDLES)
                .map_err(self.storage("opening the handles table"))?;
            let current = match handles.get(id).map_err(self.storage("reading a handle"))? {
                Some(guard) => self.decode_handle(id, guard.value())?,
                None => return Ok(false),
            };
            if current.revoked {
                return Ok(true);
            }
            let revoked = HandleRecord {
                revoked: true,
                ..current
            };
            let row = serde_json::to_vec(&HandleRow::from(&revoked)).map_err(|e| {
                VaultError::InvalidHandle {
                    reason: e.to_string(),
                }
            })?;
            handles
                .insert(id, row.as_slice())
                .map_err(self.storage("writing a handle"))?;
        }
        self.commit(txn)?;
        Ok(true)
    }

    /// Deletes the handle `id` and its token index entry; `false` if there is no such handle.
    /// Nothing prunes handles yet (a revoked or expired one stays, so its misuse is reported).
    #[cfg(test)]
    pub fn remove_handle(&self, id: &str) -> Result<bool, VaultError> {
        let txn = self.write_txn()?;
        {
            let mut handles = txn
                .open_table(HANDLES)
                .map_err(self.storage("opening the handles table"))?;
            let removed = match handles
                .remove(id)
                .map_err(self.storage("removing a handle"))?
            {
                Some(guard) => self.decode_handle(id, guard.value())?,
                None => return Ok(false),
            };
            let mut tokens = txn
                .open_table(HANDLE_TOKENS)
                .map_err(self.storage("opening the handle token table"))?;
            tokens
                .remove(removed.token_hash.0.as_slice())
                .map_err(self.storage("removing a handle token"))?;
        }
        self.commit(txn)?;
        self.load_handle_shapes()?;
        Ok(true)
    }

    fn write_secret(
        &self,
        name: &SecretName,
        value: &SecretValue,
        must_exist: bool,
    ) -> Result<SecretMeta, VaultError> {
        // A credential spec (`agent_broker_core::credential`) is never injected itself; its
        // parser checks it. A static value goes into headers as it is.
        if !agent_broker_core::credential::is_spec(value) {
            value
                .check_header_safe()
                .map_err(|source| VaultError::InvalidValue {
                    name: name.clone(),
                    source,
                })?;
        }
        let now = now_unix_secs();
        let txn = self.write_txn()?;
        let meta = {
            let mut table = txn
                .open_table(SECRETS)
                .map_err(self.storage("opening the secrets table"))?;
            let previous = match table
                .get(name.as_str())
                .map_err(self.storage("reading a secret"))?
            {
                Some(guard) => Some(self.decode_secret(name.as_str(), guard.value())?),
                None => None,
            };
            let (version, created_unix) = match previous {
                Some(p) => (
                    p.version.checked_add(1).ok_or_else(|| {
                        self.malformed(format!("secret {name}: version overflow"))
                    })?,
                    p.created_unix,
                ),
                None if must_exist => return Err(VaultError::NotFound { name: name.clone() }),
                None => (1, now),
            };
            let sealed = self
                .cipher
                .seal(&secret_aad(name.as_str(), version), value.expose())
                .map_err(|e| VaultError::seal(e, || format!("secret {name}")))?;
            let record = SecretRecord {
                version,
                created_unix,
                updated_unix: now,
                sealed,
            };
            table
                .insert(name.as_str(), record.encode().as_slice())
                .map_err(self.storage("writing a secret"))?;
            SecretMeta {
                name: name.clone(),
                version,
                created_unix,
                updated_unix: now,
            }
        };
        self.commit(txn)?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(meta)
    }

    fn remove_from(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        key: &str,
        action: &'static str,
    ) -> Result<bool, VaultError> {
        let txn = self.write_txn()?;
        let removed = {
            let mut table = txn.open_table(table).map_err(self.storage(action))?;
            table.remove(key).map_err(self.storage(action))?.is_some()
        };
        if removed {
            self.commit(txn)?;
        }
        Ok(removed)
    }

    fn handle_in(
        &self,
        txn: &ReadTransaction,
        id: &str,
    ) -> Result<Option<HandleRecord>, VaultError> {
        let table = txn
            .open_table(HANDLES)
            .map_err(self.storage("opening the handles table"))?;
        let guard = table.get(id).map_err(self.storage("reading a handle"))?;
        guard
            .map(|guard| self.decode_handle(id, guard.value()))
            .transpose()
    }

    /// Creates any table a vault written by an older build lacks, so reads never meet a missing
    /// table.
    fn ensure_tables(&self) -> Result<(), VaultError> {
        let txn = self.write_txn()?;
        for table in [SECRETS, BLOBS, HANDLES] {
            txn.open_table(table)
                .map_err(self.storage("creating tables"))?;
        }
        txn.open_table(HANDLE_TOKENS)
            .map_err(self.storage("creating tables"))?;
        self.commit(txn)
    }

    fn decode_secret(&self, name: &str, bytes: &[u8]) -> Result<SecretRecord, VaultError> {
        SecretRecord::decode(bytes).ok_or_else(|| self.malformed(format!("secret {name}")))
    }

    /// A stored handle, parsed and checked once here: a record that does not parse is a
    /// malformed vault, not an unknown handle.
    fn decode_handle(&self, id: &str, bytes: &[u8]) -> Result<HandleRecord, VaultError> {
        let row: HandleRow = serde_json::from_slice(bytes)
            .map_err(|e| self.malformed(format!("handle {id}: {e}")))?;
        row.into_record()
            .map_err(|what| self.malformed(format!("handle {id}: {what}")))
    }

    fn read_txn(&self) -> Result<ReadTransaction, VaultError> {
        self.db
            .begin_read()
            .map_err(self.storage("starting a read transaction"))
    }

    fn write_txn(&self) -> Result<WriteTransaction, VaultError> {
        // What is written to a file the path no longer names would be lost at the next start.
        if file_id(&self.path) != Some(self.file_id) {
            return Err(VaultError::Replaced {
                path: self.path.clone(),
            });
        }
        self.db
            .begin_write()
            .map_err(self.storage("starting a write transaction"))
    }

    fn commit(&self, txn: WriteTransaction) -> Result<(), VaultError> {
        txn.commit().map_err(self.storage("committing"))
    }

    fn storage<E: Into<redb::Error>>(&self, action: &'static str) -> impl FnOnce(E) -> VaultError {
        let storage = StoreError::storage(NAME, &self.path, action);
        move |e| storage(e).into()
    }

    fn malformed(&self, what: String) -> VaultError {
        VaultError::Malformed {
            path: self.path.clone(),
            what,
        }
    }
}

/// What a new vault holds: its format, the key-check record sealed with its key, and every
/// table, empty.
fn init_vault(txn: &WriteTransaction, check: &Sealed) -> Result<(), redb::Error> {
    let mut meta = txn.open_table(META)?;
    meta.insert(FORMAT_KEY, FORMAT.to_be_bytes().as_slice())?;
    meta.insert(KEY_CHECK_KEY, check.encode().as_slice())?;
    for table in [SECRETS, BLOBS, HANDLES] {
        txn.open_table(table)?;
    }
    txn.open_table(HANDLE_TOKENS)?;
    Ok(())
}

store::wraps_store_error!(VaultError);

/// The format record names a format this code reads, and the key opens the key-check record.
fn check_key(db: &impl ReadableDatabase, cipher: &Cipher, path: &Path) -> Result<(), VaultError> {
    let storage = |action: &'static str| {
        let storage = StoreError::storage(NAME, path, action);
        move |e: redb::Error| VaultError::from(storage(e))
    };
    let corrupt = |detail: &str| VaultError::from(StoreError::corrupt(NAME, path, detail));
    let txn = db
        .begin_read()
        .map_err(|e| storage("starting a read transaction")(e.into()))?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Err(corrupt("it has no meta table")),
        Err(e) => return Err(storage("opening the meta table")(e.into())),
    };
    let format = meta
        .get(FORMAT_KEY)
        .map_err(|e| storage("reading the format record")(e.into()))?;
    store::check_format(NAME, path, format.as_ref().map(|g| g.value()), FORMAT)?;
    let check = meta
        .get(KEY_CHECK_KEY)
        .map_err(|e| storage("reading the key check record")(e.into()))?
        .ok_or_else(|| corrupt("it has no key check record"))?;
    let sealed = Sealed::decode(check.value())
        .ok_or_else(|| corrupt("its key check record is malformed"))?;
    match cipher.open(KEY_CHECK_AAD, &sealed) {
        Some(plaintext) if plaintext.as_slice() == KEY_CHECK_PLAINTEXT => Ok(()),
        _ => Err(VaultError::WrongKey {
            path: path.to_path_buf(),
        }),
    }
}

fn check_blob_name(name: &str) -> Result<(), VaultError> {
    if name.is_empty() || name.len() > MAX_BLOB_NAME_LEN {
        return Err(VaultError::InvalidBlobName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// A handle as stored: what `brokerctl handle list` shows of it, and the token's hash in hex
/// (JSON, the fields side by side).
#[derive(Serialize, Deserialize)]
struct HandleRow {
    token_sha256: String,
    #[serde(flatten)]
    info: HandleInfo,
}

impl From<&HandleRecord> for HandleRow {
    fn from(h: &HandleRecord) -> Self {
        Self {
            token_sha256: h.token_hash.to_hex(),
            info: handle_info(h),
        }
    }
}

/// A handle as operators see it: the record without the token's hash.
pub fn handle_info(h: &HandleRecord) -> HandleInfo {
    HandleInfo {
        id: h.id.as_str().to_string(),
        cgroup: h.binding.cgroup.as_str().to_string(),
        secret: h.binding.secret.as_str().to_string(),
        host: h.binding.host.to_string(),
        created_unix: unix_secs(h.created),
        expires_unix: unix_secs(h.expires),
        revoked: h.revoked,
        shape: h.shape.as_ref().map(ToString::to_string),
    }
}

/// Which field of a stored handle does not parse.
#[derive(Debug, thiserror::Error)]
enum BadHandleRow {
    #[error("token_sha256 is not 64 lowercase hex digits")]
    TokenHash,
    #[error("cgroup: {0}")]
    Cgroup(#[from] agent_broker_core::cgroup::CgroupError),
    #[error("secret: {0}")]
    Secret(#[from] SecretError),
    #[error("host: {0}")]
    Host(#[source] agent_broker_core::handle::HandleError),
    #[error("id: {0}")]
    Id(#[source] agent_broker_core::handle::HandleError),
    #[error("shape: {0}")]
    Shape(#[source] agent_broker_core::handle::ShapeError),
}

impl HandleRow {
    /// The typed record; says which field does not parse.
    fn into_record(self) -> Result<HandleRecord, BadHandleRow> {
        let token_hash = TokenHash::from_hex(&self.token_sha256).ok_or(BadHandleRow::TokenHash)?;
        let info = self.info;
        let cgroup = CgroupPath::parse(&info.cgroup)?;
        let secret = SecretName::new(info.secret)?;
        let binding = HandleBinding::new(cgroup, secret, &info.host).map_err(BadHandleRow::Host)?;
        Ok(HandleRecord {
            id: HandleId::parse(&info.id).map_err(BadHandleRow::Id)?,
            token_hash,
            binding,
            created: from_unix_secs(info.created_unix),
            expires: from_unix_secs(info.expires_unix),
            revoked: info.revoked,
            shape: info
                .shape
                .as_deref()
                .map(TokenShape::parse)
                .transpose()
                .map_err(BadHandleRow::Shape)?,
        })
    }
}
