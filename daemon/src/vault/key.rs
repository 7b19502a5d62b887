//! Loading and creating the master key.
//!
//! The key is exactly [`MASTER_KEY_LEN`] raw bytes (not hex, no newline): `head -c 32
//! /dev/urandom` makes one, and `systemd-creds encrypt` takes it as is.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::VaultError;
use super::seal::{MASTER_KEY_LEN, MasterKey};

/// Loads the key file at `path`, or creates it when neither it nor the vault exists.
pub(super) fn load_or_create_file(
    path: &Path,
    vault: &Path,
    vault_exists: bool,
) -> Result<MasterKey, VaultError> {
    match File::open(path) {
        Ok(file) => load_key_file(file, path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if vault_exists {
                return Err(VaultError::KeyFileMissing {
                    key: path.to_path_buf(),
                    vault: vault.to_path_buf(),
                });
            }
            create_key_file(path)
        }
        Err(source) => Err(VaultError::KeyFileRead {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A key file must be a regular file owned by this process's user, with no group or other
/// access, holding exactly 32 bytes. Checked on the open descriptor, so a swap between the check
/// and the read is not possible.
fn load_key_file(mut file: File, path: &Path) -> Result<MasterKey, VaultError> {
    let meta = file.metadata().map_err(|source| VaultError::KeyFileRead {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(VaultError::KeyFileNotRegular {
            path: path.to_path_buf(),
        });
    }
    check_key_file_access(
        path,
        meta.permissions().mode() & 0o7777,
        meta.uid(),
        nix::unistd::geteuid().as_raw(),
    )?;
    read_key(&mut file, path)
}

/// No group or other access, and owned by the user the broker runs as (whoever owns the file
/// could replace the key).
fn check_key_file_access(path: &Path, mode: u32, owner: u32, euid: u32) -> Result<(), VaultError> {
    if mode & 0o077 != 0 {
        return Err(VaultError::KeyFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if owner != euid {
        return Err(VaultError::KeyFileOwner {
            path: path.to_path_buf(),
            owner,
            euid,
        });
    }
    Ok(())
}

/// Reads exactly [`MASTER_KEY_LEN`] bytes and checks nothing follows them.
pub(super) fn read_key(file: &mut File, path: &Path) -> Result<MasterKey, VaultError> {
    // One byte of room past the key so a longer file is noticed; fixed size, so no reallocation
    // leaves copies of the key behind.
    let mut buf = Zeroizing::new([0u8; MASTER_KEY_LEN + 1]);
    let mut filled = 0;
    loop {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(VaultError::KeyFileRead {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    if filled != MASTER_KEY_LEN {
        let len = file.metadata().map_or(filled as u64, |m| m.len());
        return Err(VaultError::KeyFileLength {
            path: path.to_path_buf(),
            len,
        });
    }
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    key.copy_from_slice(&buf[..MASTER_KEY_LEN]);
    Ok(MasterKey::from_bytes(key))
}

/// Creates the key file: O_EXCL, mode 0600, written and fsynced, then the directory fsynced so
/// the file's name is durable before any vault is sealed with the key.
fn create_key_file(path: &Path) -> Result<MasterKey, VaultError> {
    let key = MasterKey::generate().map_err(|source| VaultError::Random { source })?;
    let create_err = |source| VaultError::KeyFileCreate {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create_err)?;
    let written = file
        .write_all(key.bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| crate::store::sync_parent(path));
    if let Err(source) = written {
        // A short key file would be refused on the next start; do not leave one behind.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(create_err(source));
    }
    tracing::info!(path = %path.display(), "created vault master key file (mode 0600)");
    Ok(key)
}

/// Loads the systemd credential `agent-broker-master-key` from `dir`, or from
/// `$CREDENTIALS_DIRECTORY` when `dir` is `None`. systemd owns that directory and the modes of
/// its files, so only the length is checked.
pub(super) fn load_systemd_credential(dir: Option<&Path>) -> Result<MasterKey, VaultError> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::var_os(super::CREDENTIALS_DIRECTORY_ENV)
            .map(PathBuf::from)
            .ok_or(VaultError::CredentialsDirectoryUnset)?,
    };
    let path = dir.join(super::SYSTEMD_CREDENTIAL_NAME);
    let mut file = File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            VaultError::CredentialMissing { path: path.clone() }
        } else {
            VaultError::KeyFileRead {
                path: path.clone(),
                source,
            }
        }
    })?;
    read_key(&mut file, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_access_rule() {
        let p = Path::new("/state/master.key");
        assert!(check_key_file_access(p, 0o600, 0, 0).is_ok());
        assert!(check_key_file_access(p, 0o400, 1000, 1000).is_ok());
        for mode in [0o640, 0o604, 0o610, 0o601, 0o700 | 0o007, 0o4600 | 0o020] {
            assert!(
                matches!(
                    check_key_file_access(p, mode, 0, 0),
                    Err(VaultError::KeyFilePermissions { .. })
                ),
                "mode {mode:o}"
            );
        }
        let e = check_key_file_access(p, 0o600, 1000, 0).expect_err("foreign owner");
        assert_eq!(
            e.to_string(),
            "master key file /state/master.key is owned by uid 1000, not by uid 0 that runs the broker"
        );
    }
}
