use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;

use agent_broker_core::fmt::error_chain;
use redb::{ReadableDatabase, TableDefinition};

use super::*;

const NAME: StoreName = StoreName {
    store: "test store",
    file: "test store file",
};

static SPEC: Spec = Spec {
    name: NAME,
    file: "test.redb",
    cache_size: 1024 * 1024,
    full_check_below: None,
};

const MARKS: TableDefinition<&str, &str> = TableDefinition::new("marks");

/// A new store holding `mark`.
fn init(mark: &'static str) -> impl FnOnce(&WriteTransaction) -> Result<(), redb::Error> {
    move |txn| {
        txn.open_table(MARKS)?.insert("mark", mark)?;
        Ok(())
    }
}

/// The caller's check: the store has a mark; says which.
fn read_mark(db: &Database, path: &Path) -> Result<String, StoreError> {
    let txn = db.begin_read().map_err(StoreError::storage(
        NAME,
        path,
        "starting a read transaction",
    ))?;
    let table = match txn.open_table(MARKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(StoreError::corrupt(NAME, path, "it has no marks table"));
        }
        Err(e) => {
            return Err(StoreError::storage(NAME, path, "opening the marks table")(
                e,
            ));
        }
    };
    let mark = table
        .get("mark")
        .map_err(StoreError::storage(NAME, path, "reading the mark"))?
        .ok_or_else(|| StoreError::corrupt(NAME, path, "it has no mark"))?;
    Ok(mark.value().to_string())
}

/// Takes, creates when missing (with `mark`), checks and opens the store in `dir`.
fn open(dir: &Path, mark: &'static str) -> Result<Opened, StoreError> {
    let locked = Locked::take(&SPEC, dir)?;
    if !locked.exists()? {
        locked.create(init(mark))?;
    }
    let path = locked.path().to_path_buf();
    locked.open(|db| read_mark(db, &path).map(drop))
}

fn mark_of(opened: &Opened) -> String {
    read_mark(&opened.db, &opened.path).expect("mark")
}

/// Every entry of `dir` with its bytes (a directory or link as its kind).
fn listing(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| {
            let entry = entry.expect("entry");
            let kind = entry.file_type().expect("type");
            let content = if kind.is_file() {
                std::fs::read(entry.path()).expect("read")
            } else {
                format!("{kind:?}").into_bytes()
            };
            (entry.file_name().to_string_lossy().into_owned(), content)
        })
        .collect()
}

/// A store's bytes, made in a directory of their own.
fn store_bytes(mark: &'static str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path(), mark).expect("open"));
    std::fs::read(dir.path().join(SPEC.file)).expect("read")
}

#[test]
fn a_new_store_is_complete_private_and_reopens() {
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("state");
    let opened = open(&dir, "first").expect("create");
    assert_eq!(mark_of(&opened), "first");
    assert_eq!(opened.path, dir.join(SPEC.file));
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&opened.path), 0o600);
    assert_eq!(mode(&dir.join("test.lock")), 0o600);
    assert!(!dir.join("test.redb.new").exists());
    drop(opened);

    // An existing store is opened, never made again.
    let opened = open(&dir, "second").expect("reopen");
    assert_eq!(mark_of(&opened), "first");
}

#[test]
fn a_symlink_is_refused_and_never_followed() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let target = elsewhere.path().join("real.redb");
    std::fs::write(&target, store_bytes("real")).expect("write");
    let before = listing(elsewhere.path());

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SPEC.file);
    std::os::unix::fs::symlink(&target, &path).expect("symlink");
    let locked = Locked::take(&SPEC, dir.path()).expect("lock");
    let e = locked.exists().expect_err("symlink");
    assert!(matches!(e, StoreError::NotARegularFile { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "test store file {} is not a regular file (a symlink is not followed)",
            path.display()
        )
    );
    // Opened without asking first: still refused, by the open itself.
    let e = locked
        .open(|_| Ok::<(), StoreError>(()))
        .err()
        .expect("symlink opened");
    assert!(matches!(e, StoreError::NotARegularFile { .. }), "{e}");
    assert_eq!(listing(elsewhere.path()), before, "the target changed");
    assert!(std::fs::symlink_metadata(&path).expect("link").is_symlink());

    // A directory in its place is no store either.
    std::fs::remove_file(&path).expect("rm");
    std::fs::create_dir(&path).expect("mkdir");
    let e = open(dir.path(), "m").err().expect("directory opened");
    assert!(matches!(e, StoreError::NotARegularFile { .. }), "{e}");

    // Nor is a lock file that is a symlink taken.
    let other = tempfile::tempdir().expect("tempdir");
    let lock_target = elsewhere.path().join("lock");
    std::os::unix::fs::symlink(&lock_target, other.path().join("test.lock")).expect("link");
    let e = Locked::take(&SPEC, other.path()).expect_err("symlinked lock");
    assert!(matches!(e, StoreError::Lock { .. }), "{e}");
    assert!(
        !lock_target.exists(),
        "a lock file was made through the link"
    );
}

#[test]
fn a_stale_temporary_file_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let new = dir.path().join("test.redb.new");
    std::fs::write(&new, b"half of a store").expect("write");
    let opened = open(dir.path(), "fresh").expect("create");
    assert_eq!(mark_of(&opened), "fresh");
    assert!(!new.exists());
    drop(opened);

    // A symlink left there is removed, not written through.
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let victim = elsewhere.path().join("victim");
    std::fs::write(&victim, b"keep me").expect("write");
    let new = dir.path().join("test.redb.new");
    std::os::unix::fs::symlink(&victim, &new).expect("symlink");
    let opened = open(dir.path(), "fresh").expect("create");
    assert_eq!(mark_of(&opened), "fresh");
    assert!(std::fs::symlink_metadata(&new).is_err(), "link left");
    assert_eq!(std::fs::read(&victim).expect("read"), b"keep me");
}

#[test]
fn a_corrupt_file_is_refused_clearly_and_left_unchanged() {
    let good = store_bytes("good");
    let mut flipped = good.clone();
    for b in flipped.iter_mut().skip(4096).step_by(97) {
        *b ^= 0x5a;
    }
    let foreign = {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("foreign.redb");
        let db = Database::create(&path).expect("create");
        let txn = db.begin_write().expect("write");
        txn.open_table(TableDefinition::<u64, u64>::new("other"))
            .expect("table")
            .insert(1, 2)
            .expect("insert");
        txn.commit().expect("commit");
        drop(db);
        std::fs::read(&path).expect("read")
    };
    let mut text = b"SQLite format 3\0".to_vec();
    text.resize(8192, 0);
    let cases: [(&str, Vec<u8>, &str); 7] = [
        ("empty", Vec::new(), "too short"),
        ("short", b"redb".to_vec(), "too short"),
        ("not redb", text, "not a redb database"),
        ("zeros", vec![0; 8192], "not a redb database"),
        ("truncated", good[..good.len() / 2].to_vec(), ""),
        ("flipped bytes", flipped, ""),
        ("another redb file", foreign, "it has no marks table"),
    ];
    for (what, bytes, expect) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SPEC.file);
        std::fs::write(&path, &bytes).expect("write");
        let locked = Locked::take(&SPEC, dir.path()).expect("lock");
        let before = listing(dir.path());
        let e = locked
            .open(|db| read_mark(db, &path).map(drop))
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        let shown = error_chain(&e);
        assert!(matches!(e, StoreError::Corrupt { .. }), "{what}: {shown}");
        assert!(
            e.to_string().starts_with(&format!(
                "test store file {} is corrupt or not an agent-broker test store: ",
                path.display()
            )),
            "{what}: {shown}"
        );
        assert!(shown.contains(expect), "{what}: {shown}");
        assert_eq!(listing(dir.path()), before, "{what}: something changed");
    }
}

#[test]
fn the_callers_check_decides_and_its_read_failures_are_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path(), "m").expect("create"));
    let path = dir.path().join(SPEC.file);
    let before = listing(dir.path());

    #[derive(Debug)]
    enum Caller {
        Store(StoreError),
        Mine,
    }
    impl From<StoreError> for Caller {
        fn from(e: StoreError) -> Self {
            Self::Store(e)
        }
    }
    impl WrapsStoreError for Caller {
        fn into_store_error(self) -> Result<StoreError, Self> {
            match self {
                Self::Store(e) => Ok(e),
                e => Err(e),
            }
        }
    }

    let locked = Locked::take(&SPEC, dir.path()).expect("lock");
    let e = locked.open(|_| Err(Caller::Mine)).err().expect("refused");
    assert!(matches!(e, Caller::Mine), "{e:?}");

    let locked = Locked::take(&SPEC, dir.path()).expect("lock");
    let e = locked
        .open(|_| {
            Err(Caller::Store(StoreError::storage(
                NAME,
                &path,
                "reading the mark",
            )(redb::StorageError::Corrupted(
                "a bad page".into(),
            ))))
        })
        .err()
        .expect("refused");
    match e {
        Caller::Store(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().ends_with(": reading the mark failed"), "{e}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(listing(dir.path()), before, "the check wrote");
}

#[test]
fn the_lock_is_held_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SPEC.file);
    let locked = Locked::take(&SPEC, dir.path()).expect("first");
    let e = Locked::take(&SPEC, dir.path()).expect_err("second");
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "test store {} is in use by another process (is brokerd already running?)",
            path.display()
        )
    );
    drop(locked);

    // An open store keeps it.
    let opened = open(dir.path(), "m").expect("open");
    let e = open(dir.path(), "m").err().expect("second open");
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    drop(opened);
    open(dir.path(), "m").expect("open after close");
}

#[test]
fn a_crash_before_the_link_leaves_no_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SPEC.file);
    let new = dir.path().join("test.redb.new");

    // The process dies while the store is being written.
    let crashed = std::panic::catch_unwind(|| {
        let locked = Locked::take(&SPEC, dir.path()).expect("lock");
        let _ = locked.create(|txn| {
            txn.open_table(MARKS)?.insert("mark", "half")?;
            panic!("crash");
        });
    });
    assert!(crashed.is_err());
    assert!(!path.exists(), "a half-made store under the store's name");

    // Writing it fails.
    let locked = Locked::take(&SPEC, dir.path()).expect("lock");
    let e = locked
        .create(|_| Err(redb::StorageError::Io(io::Error::other("disk full")).into()))
        .expect_err("failed init");
    assert!(matches!(e, StoreError::Create { .. }), "{e}");
    assert!(!path.exists(), "a failed store under the store's name");
    assert!(!new.exists(), "a failed store left behind");
    assert!(!locked.exists().expect("exists"));
    drop(locked);

    // It dies after the commit, before the link: a complete store under the temporary name
    // is still no store, and the next start makes a new one.
    std::fs::write(&new, store_bytes("unlinked")).expect("write");
    let opened = open(dir.path(), "made again").expect("open");
    assert_eq!(mark_of(&opened), "made again");
    assert!(!new.exists());
}

#[test]
fn the_parent_of_a_bare_name_is_the_current_directory() {
    sync_parent(Path::new("store.redb")).expect("sync .");
    let dir = tempfile::tempdir().expect("tempdir");
    sync_parent(&dir.path().join("x")).expect("sync dir");
}

#[test]
fn the_format_record_is_one_big_endian_number() {
    let path = Path::new("/state/test.redb");
    let check = |stored: Option<&[u8]>| check_format(NAME, path, stored, 2);
    check(Some(&2u64.to_be_bytes())).expect("supported");
    let e = check(Some(&3u64.to_be_bytes())).expect_err("later format");
    assert_eq!(
        e.to_string(),
        "test store /state/test.redb has format 3; this broker reads format 2"
    );
    for (stored, detail) in [
        (None, "it has no format record"),
        (Some(&[0u8, 2][..]), "its format record is malformed"),
    ] {
        let e = check(stored).expect_err(detail);
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().ends_with(detail), "{e}");
    }
}

/// A store holding a mark and `n` filler records, whose bytes are found by their text.
fn store_with_filler(dir: &Path, spec: &'static Spec, n: usize) {
    let locked = Locked::take(spec, dir).expect("lock");
    locked
        .create(|txn| {
            txn.open_table(MARKS)?.insert("mark", "big")?;
            let mut t = txn.open_table(TableDefinition::<u64, &str>::new("filler"))?;
            for i in 0..n as u64 {
                t.insert(i, "FILLER-RECORD-0123456789-abcdefghijklmnopqrstuvwxyz")?;
            }
            Ok(())
        })
        .expect("create");
}

static CAPPED: Spec = Spec {
    name: NAME,
    file: "test.redb",
    cache_size: 1024 * 1024,
    full_check_below: Some(64 * 1024),
};

#[test]
fn files_above_the_cap_skip_the_whole_file_check_so_opening_does_not_read_every_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    store_with_filler(dir.path(), &SPEC, 20_000);
    let path = dir.path().join(SPEC.file);
    let mut bytes = std::fs::read(&path).expect("read");
    assert!(bytes.len() as u64 > 64 * 1024);
    // A damaged data page: only a check that reads every page finds it.
    let marker = b"FILLER-RECORD-0123456789";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("filler bytes");
    bytes[at + 3] ^= 0x20;
    std::fs::write(&path, &bytes).expect("write");

    let checked = Locked::take(&SPEC, dir.path())
        .expect("lock")
        .open(|db| read_mark(db, &path).map(drop));
    let e = checked.err().expect("the whole-file check refuses it");
    assert!(error_chain(&e).contains("integrity"), "{}", error_chain(&e));

    let capped = Locked::take(&CAPPED, dir.path())
        .expect("lock")
        .open(|db| read_mark(db, &path).map(drop))
        .map(drop)
        .map_err(|e| error_chain(&e));
    assert!(
        capped.is_ok(),
        "above the cap only the caller's check runs: {capped:?}"
    );
}
