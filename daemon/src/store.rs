//! One redb file's life, written once for the audit log and the vault: the lock, creation, the
//! check before opening, the open for writing, and the errors of all of them. The only place a
//! store file is created or opened.
//!
//! A store is `<state_dir>/<name>.redb`, with `<state_dir>/<name>.lock` held (an exclusive
//! `flock`) for as long as it is open, so two processes never open one store, and new ones are
//! built as `<name>.redb.new`. In order:
//!
//! 1. [`Locked::take`] creates the state directory (0700) and takes the lock without waiting: a
//!    lock held elsewhere is [`StoreError::InUse`].
//! 2. [`Locked::exists`] says whether the file is there. Anything but a regular file (a
//!    symlink, a directory, a device) is [`StoreError::NotARegularFile`], never followed.
//! 3. [`Locked::create`] builds a new store under a temporary name (0600, never an existing
//!    file), lets the caller write its tables in one transaction, commits, closes, hard-links it
//!    into place (a link never replaces a file), removes the temporary name and fsyncs the
//!    directory. A crash at any point leaves no store or a complete one; a temporary file left
//!    by a crash is removed by the next creation.
//! 4. [`Locked::open`] checks the file on a copy-on-write view ([`overlay`]): the redb magic,
//!    redb's crash repair and page checksums, then the caller's check of its own tables. Only a
//!    file that passes is opened for writing, through the descriptor that was checked. A
//!    corrupt or foreign file is refused with an error naming it and not one byte of it
//!    changed; the check holds in memory the pages redb writes, never the whole file.
//!
//! redb is synchronous, and so is this: call it off the async threads.
//!
//! Never: follow a symlink to a store, write to an existing file before it passed the check,
//! replace a store, or leave a half-made one under the store's name.

mod overlay;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use redb::backends::FileBackend;
use redb::{Builder, Database, DatabaseError, WriteTransaction};

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// One kind of store: what it is called and where its files are.
#[derive(Debug)]
pub struct Spec {
    /// What messages call it.
    pub name: StoreName,
    /// The store's file name in the state directory, `<name>.redb`. The lock file is
    /// `<name>.lock` beside it, and a new store is built as `<name>.redb.new`.
    pub file: &'static str,
    /// redb's page cache, in bytes, for the check and for the open store.
    pub cache_size: usize,
    /// Files at least this large skip redb's whole-file integrity check on open (it reads every
    /// page, so a start would take longer the larger the file); `None` checks every file. A
    /// file that skips it is still refused if it is not redb, needs a repair that fails, or
    /// fails the caller's check, and its pages are checked by whoever reads them all (`brokerctl
    /// logs verify` for the audit log).
    pub full_check_below: Option<u64>,
}

/// What messages call a store, such as "vault" and, for its file, "vault file".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreName {
    /// The store: "audit log", "vault".
    pub store: &'static str,
    /// Its file, where the file itself is meant: "audit log", "vault file".
    pub file: &'static str,
}

impl StoreName {
    /// A store whose file is called what the store is.
    pub const fn same(name: &'static str) -> Self {
        Self {
            store: name,
            file: name,
        }
    }
}

impl std::fmt::Display for StoreName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.store)
    }
}

/// What opening or creating a store can refuse. Messages name the file; the audit log's and
/// the vault's errors wrap this one.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{store} {path} is in use by another process (is brokerd already running?)")]
    InUse { store: StoreName, path: PathBuf },
    #[error(
        "{} {} is not a regular file (a symlink is not followed)",
        store.file,
        path.display()
    )]
    NotARegularFile { store: StoreName, path: PathBuf },
    #[error("cannot read {} {}", store.file, path.display())]
    FileRead {
        store: StoreName,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {store} {path}")]
    Create {
        store: StoreName,
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(
        "{} {} is corrupt or not an agent-broker {store}: {detail}",
        store.file,
        path.display()
    )]
    Corrupt {
        store: StoreName,
        path: PathBuf,
        detail: String,
        #[source]
        source: Option<Box<redb::Error>>,
    },
    #[error("{store} {path} has format {format}; this broker reads format {supported}")]
    UnsupportedFormat {
        store: StoreName,
        path: PathBuf,
        format: u64,
        supported: u64,
    },
    #[error("{store} {path}: {action} failed")]
    Storage {
        store: StoreName,
        path: PathBuf,
        action: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
}

impl StoreError {
    /// The file at `path` is not a store of this kind; `detail` says why.
    pub fn corrupt(store: StoreName, path: &Path, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            store,
            path: path.to_path_buf(),
            detail: detail.into(),
            source: None,
        }
    }

    /// Maps a redb failure while `action` to [`StoreError::Storage`].
    pub fn storage<E: Into<redb::Error>>(
        store: StoreName,
        path: &Path,
        action: &'static str,
    ) -> impl FnOnce(E) -> Self {
        let path = path.to_path_buf();
        move |e| Self::Storage {
            store,
            path,
            action,
            source: Box::new(e.into()),
        }
    }
}

/// A caller's error type, which wraps [`StoreError`]: what its check in [`Locked::open`]
/// returns, so that a storage failure during the check becomes [`StoreError::Corrupt`].
pub trait WrapsStoreError: From<StoreError> {
    /// The [`StoreError`] inside, or `self` when it is the caller's own.
    fn into_store_error(self) -> Result<StoreError, Self>;
}

impl WrapsStoreError for StoreError {
    fn into_store_error(self) -> Result<StoreError, Self> {
        Ok(self)
    }
}

/// Implements [`WrapsStoreError`] for an error enum whose `Store` variant holds the
/// [`StoreError`] (`#[error(transparent)] Store(#[from] StoreError)`).
macro_rules! wraps_store_error {
    ($error:ty) => {
        impl $crate::store::WrapsStoreError for $error {
            fn into_store_error(self) -> Result<$crate::store::StoreError, Self> {
                match self {
                    Self::Store(e) => Ok(e),
                    e => Err(e),
                }
            }
        }
    };
}
pub(crate) use wraps_store_error;

/// Checks a store's format record (a big-endian u64) against the one format this code reads.
pub fn check_format(
    store: StoreName,
    path: &Path,
    stored: Option<&[u8]>,
    supported: u64,
) -> Result<(), StoreError> {
    let stored =
        stored.ok_or_else(|| StoreError::corrupt(store, path, "it has no format record"))?;
    let format = <[u8; 8]>::try_from(stored)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::corrupt(store, path, "its format record is malformed"))?;
    if format != supported {
        return Err(StoreError::UnsupportedFormat {
            store,
            path: path.to_path_buf(),
            format,
            supported,
        });
    }
    Ok(())
}

/// A store whose lock is held, not yet open for writing. Dropping it releases the lock.
#[derive(Debug)]
pub struct Locked {
    spec: &'static Spec,
    path: PathBuf,
    new_path: PathBuf,
    lock: Flock<File>,
}

/// A store open for writing, and its lock. Drop `db` before `lock`.
pub struct Opened {
    pub db: Database,
    pub path: PathBuf,
    pub lock: Flock<File>,
}

impl Locked {
    /// Creates `state_dir` (0700) when missing and takes the store's lock file in it, without
    /// waiting.
    pub fn take(spec: &'static Spec, state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StoreError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let path = state_dir.join(spec.file);
        let lock_path = state_dir.join(Path::new(spec.file).with_extension("lock"));
        let lock = lock_exclusive(&lock_path).map_err(|failure| match failure {
            LockFailure::Held => StoreError::InUse {
                store: spec.name,
                path: path.clone(),
            },
            LockFailure::Io(source) => StoreError::Lock {
                path: lock_path,
                source,
            },
        })?;
        Ok(Self {
            spec,
            new_path: state_dir.join(format!("{}.new", spec.file)),
            path,
            lock,
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store's file exists. Anything there but a regular file is refused.
    pub fn exists(&self) -> Result<bool, StoreError> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_file() => Ok(true),
            Ok(_) => Err(self.not_a_regular_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(self.read_error(source)),
        }
    }

    /// Builds a new store: `init` writes its tables in one transaction, committed durably, and
    /// the file is linked into place only when complete. Never replaces an existing file.
    pub fn create(
        &self,
        init: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let create_err = |source: redb::Error| StoreError::Create {
            store: self.spec.name,
            path: self.path.clone(),
            source: Box::new(source),
        };
        let io_err = |source: io::Error| create_err(redb::StorageError::Io(source).into());
        // Left by a crash during an earlier creation: never a store, whatever it holds.
        match std::fs::remove_file(&self.new_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.new_path)
            .map_err(io_err)?;
        let built = self.build(file, init).and_then(|()| {
            // A hard link, unlike rename, never replaces an existing file.
            std::fs::hard_link(&self.new_path, &self.path)
                .map_err(|e| redb::StorageError::Io(e).into())
        });
        if let Err(e) = built {
            // Best effort: the next creation removes it anyway.
            let _ = std::fs::remove_file(&self.new_path);
            return Err(create_err(e));
        }
        std::fs::remove_file(&self.new_path).map_err(io_err)?;
        sync_parent(&self.path).map_err(io_err)?;
        tracing::info!(path = %self.path.display(), "created {}", self.spec.name);
        Ok(())
    }

    fn build(
        &self,
        file: File,
        init: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), redb::Error> {
        let db = self
            .builder()
            .create_with_backend(FileBackend::new(file)?)?;
        let txn = db.begin_write()?;
        init(&txn)?;
        txn.commit()?;
        db.close()?;
        Ok(())
    }

    /// Checks the existing store on a copy-on-write view of its file, with `check` judging its
    /// tables, then opens that same file for writing (repairing it after a crash). Refuses,
    /// without writing to the file: anything but a regular file, a file that is not redb or
    /// fails its checksums, whatever `check` refuses, and a store another process has open.
    pub fn open<E: WrapsStoreError>(
        self,
        check: impl FnOnce(&Database) -> Result<(), E>,
    ) -> Result<Opened, E> {
        let file = self.open_file()?;
        self.check_copy(&file, check)?;
        let opened =
            FileBackend::new(file).and_then(|backend| self.builder().create_with_backend(backend));
        let db = opened.map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                store: self.spec.name,
                path: self.path.clone(),
            },
            e => StoreError::storage(self.spec.name, &self.path, "opening it for writing")(e),
        })?;
        Ok(Opened {
            db,
            path: self.path,
            lock: self.lock,
        })
    }

    /// The store's file, read-write, refused unless it is a regular file: what is checked is
    /// what gets opened.
    fn open_file(&self) -> Result<File, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => self.not_a_regular_file(),
                _ => self.read_error(e),
            })?;
        let meta = file.metadata().map_err(|e| self.read_error(e))?;
        if !meta.is_file() {
            return Err(self.not_a_regular_file());
        }
        Ok(file)
    }

    /// The redb magic, then redb's repair and integrity check and `check`, all on a view whose
    /// writes stay in memory.
    fn check_copy<E: WrapsStoreError>(
        &self,
        file: &File,
        check: impl FnOnce(&Database) -> Result<(), E>,
    ) -> Result<(), E> {
        let corrupt = |detail: String, source: Option<Box<redb::Error>>| StoreError::Corrupt {
            store: self.spec.name,
            path: self.path.clone(),
            detail,
            source,
        };
        let mut magic = [0u8; REDB_MAGIC.len()];
        match file.read_exact_at(&mut magic, 0) {
            Ok(()) if magic == REDB_MAGIC => {}
            Ok(()) => return Err(corrupt("it is not a redb database".into(), None).into()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(corrupt("it is too short to be a redb database".into(), None).into());
            }
            Err(e) => return Err(self.read_error(e).into()),
        }
        let view = file
            .try_clone()
            .and_then(overlay::Overlay::new)
            .map_err(|e| self.read_error(e))?;
        // redb may panic on a file altered outside it; that must be a refusal, not a crash. The
        // database is private to this closure, so nothing observes state a panic interrupted.
        let checked = catch_unwind(AssertUnwindSafe(|| -> Result<(), E> {
            let mut db = self.builder().create_with_backend(view).map_err(|e| {
                corrupt(
                    "it cannot be opened as a redb database".into(),
                    Some(Box::new(e.into())),
                )
            })?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let full_check = self.spec.full_check_below.is_none_or(|cap| size < cap);
            match if full_check {
                db.check_integrity()
            } else {
                Ok(true)
            } {
                Ok(true) => {}
                Ok(false) => {
                    return Err(corrupt("some pages fail their checksums".into(), None).into());
                }
                Err(e) => {
                    let source = Some(Box::new(e.into()));
                    return Err(corrupt("the integrity check failed".into(), source).into());
                }
            }
            check(&db)
        }));
        match checked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match e.into_store_error() {
                // On a copy that redb could open and check, a read that fails is damage.
                Ok(StoreError::Storage { action, source, .. }) => {
                    corrupt(format!("{action} failed"), Some(source)).into()
                }
                Ok(e) => e.into(),
                Err(e) => e,
            }),
            Err(_) => {
                Err(corrupt("the storage engine failed while reading it".into(), None).into())
            }
        }
    }

    fn builder(&self) -> Builder {
        let mut builder = Builder::new();
        builder.set_cache_size(self.spec.cache_size);
        builder
    }

    fn not_a_regular_file(&self) -> StoreError {
        StoreError::NotARegularFile {
            store: self.spec.name,
            path: self.path.clone(),
        }
    }

    fn read_error(&self, source: io::Error) -> StoreError {
        StoreError::FileRead {
            store: self.spec.name,
            path: self.path.clone(),
            source,
        }
    }
}

/// Why the lock file could not be taken.
#[derive(Debug)]
enum LockFailure {
    /// Another process holds it.
    Held,
    /// The lock file could not be opened or locked.
    Io(io::Error),
}

/// Takes `path` (created 0600 if missing, never through a symlink) as an exclusive `flock`,
/// without waiting. Held for as long as the returned value lives.
fn lock_exclusive(path: &Path) -> Result<Flock<File>, LockFailure> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(LockFailure::Io)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            LockFailure::Held
        } else {
            LockFailure::Io(errno.into())
        }
    })
}

/// fsyncs the directory holding `path`, so a just-created or linked entry survives a crash.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
