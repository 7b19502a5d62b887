//! Vault tests. They compare secret values with `assert!(a == b)`, never `assert_eq!`, so a
//! failure never prints a value.

use std::fs;

use agent_broker_core::fmt::error_chain;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn name(s: &str) -> SecretName {
    SecretName::new(s).expect("valid name")
}

fn value(s: &str) -> SecretValue {
    SecretValue::from_string(s.to_string()).expect("valid value")
}

fn is(v: &SecretValue, expected: &str) -> bool {
    v.expose() == expected.as_bytes()
}

fn open_default(dir: &Path) -> Result<Vault, VaultError> {
    Vault::open(dir, KeySource::default_file(dir))
}

fn write_key(path: &Path, key: &[u8], mode: u32) {
    fs::write(path, key).expect("write key");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod key");
}

/// A vault in `dir` holding one secret, closed again.
fn make_vault(dir: &Path) {
    let vault = open_default(dir).expect("create vault");
    vault
        .set(&name("EXAMPLE_KEY"), value("sk-example"))
        .expect("set");
}

fn vault_bytes(dir: &Path) -> Vec<u8> {
    fs::read(dir.join(VAULT_FILE)).expect("read vault file")
}

#[test]
fn set_get_rotate_list_remove_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    let a = name("A_KEY");
    let b = name("B_KEY");

    assert!(vault.get(&a).expect("get").is_none());
    assert!(vault.list().expect("list").is_empty());

    let m1 = vault.set(&a, value("first")).expect("set");
    assert_eq!((m1.name.as_str(), m1.version), ("A_KEY", 1));
    assert!(is(&vault.get(&a).expect("get").expect("present"), "first"));

    let m2 = vault.set(&a, value("second")).expect("set again");
    assert_eq!(m2.version, 2);
    assert_eq!(m2.created_unix, m1.created_unix);
    assert!(m2.updated_unix >= m1.updated_unix);
    let m3 = vault.rotate(&a, value("third")).expect("rotate");
    assert_eq!(m3.version, 3);
    assert!(is(&vault.get(&a).expect("get").expect("present"), "third"));

    vault.set(&b, value("bee")).expect("set b");
    let list = vault.list().expect("list");
    let summary: Vec<_> = list.iter().map(|m| (m.name.as_str(), m.version)).collect();
    assert_eq!(summary, [("A_KEY", 3), ("B_KEY", 1)]);

    assert!(vault.remove(&a).expect("remove"));
    assert!(!vault.remove(&a).expect("remove again"));
    assert!(vault.get(&a).expect("get").is_none());
    // A removed secret starts again at version 1.
    assert_eq!(vault.set(&a, value("again")).expect("set").version, 1);

    // Durable and readable after reopening.
    drop(vault);
    let vault = open_default(dir.path()).expect("reopen");
    assert!(is(&vault.get(&b).expect("get").expect("present"), "bee"));
    assert_eq!(vault.list().expect("list").len(), 2);
}

#[test]
fn rotate_requires_an_existing_secret_and_values_must_be_header_safe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    let n = name("MISSING");
    match vault.rotate(&n, value("x")) {
        Err(VaultError::NotFound { name }) => assert_eq!(name.as_str(), "MISSING"),
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    let e = vault
        .set(&n, SecretValue::binary(b"two\nlines".to_vec()))
        .expect_err("newline refused");
    assert!(matches!(e, VaultError::InvalidValue { .. }), "{e}");
    assert!(vault.list().expect("list").is_empty());
}

#[test]
fn records_are_bound_to_their_name_and_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    let (a, b) = (name("A_KEY"), name("B_KEY"));
    vault.set(&a, value("value-of-a")).expect("set a");
    vault.set(&b, value("value-of-b")).expect("set b");

    let raw = |key: &str| -> Vec<u8> {
        let txn = vault.db.begin_read().expect("read");
        let t = txn.open_table(SECRETS).expect("table");
        t.get(key).expect("get").expect("present").value().to_vec()
    };
    let put = |key: &str, bytes: &[u8]| {
        let txn = vault.db.begin_write().expect("write");
        txn.open_table(SECRETS)
            .expect("table")
            .insert(key, bytes)
            .expect("insert");
        txn.commit().expect("commit");
    };

    // Swap the two records: each now holds the other's ciphertext.
    let (ra, rb) = (raw("A_KEY"), raw("B_KEY"));
    put("A_KEY", &rb);
    put("B_KEY", &ra);
    for n in [&a, &b] {
        match vault.get(n) {
            Err(VaultError::Decrypt { name }) => assert_eq!(name, n.as_str()),
            other => panic!(
                "expected Decrypt, got {:?}",
                other.map(|v| v.map(|v| v.len()))
            ),
        }
    }
    put("A_KEY", &ra);
    put("B_KEY", &rb);
    assert!(is(
        &vault.get(&a).expect("get").expect("present"),
        "value-of-a"
    ));

    // Relabel version 1 as version 2: the version is in the associated data.
    let mut record = SecretRecord::decode(&ra).expect("decode");
    record.version = 2;
    put("A_KEY", &record.encode());
    assert!(matches!(vault.get(&a), Err(VaultError::Decrypt { .. })));

    // Flip one ciphertext bit.
    let mut record = SecretRecord::decode(&ra).expect("decode");
    record.sealed.ciphertext[0] ^= 0x01;
    put("A_KEY", &record.encode());
    let e = vault.get(&a).map(|_| ()).expect_err("tampered");
    assert_eq!(
        e.to_string(),
        "secret A_KEY failed to decrypt: its record was altered, or moved from another name or version"
    );

    // Garbage bytes are a malformed record, not a panic.
    put("A_KEY", b"\x01short");
    assert!(matches!(vault.get(&a), Err(VaultError::Malformed { .. })));
    assert!(matches!(vault.list(), Err(VaultError::Malformed { .. })));
}

#[test]
fn key_file_is_created_0600_with_32_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    make_vault(&state);
    let key = state.join(KEY_FILE);
    let meta = fs::metadata(&key).expect("key file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    assert_eq!(
        fs::metadata(&state)
            .expect("state dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(!state.join("vault.redb.new").exists());
    let vault = open_default(&state).expect("reopen");
    assert!(is(
        &vault
            .get(&name("EXAMPLE_KEY"))
            .expect("get")
            .expect("present"),
        "sk-example"
    ));
}

#[test]
fn readable_key_file_is_refused_naming_its_mode_and_vault_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_vault(dir.path());
    let key = dir.path().join(KEY_FILE);
    let before = vault_bytes(dir.path());
    for mode in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).expect("chmod");
        let e = open_default(dir.path()).expect_err("readable key refused");
        assert!(matches!(e, VaultError::KeyFilePermissions { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
        assert!(msg.contains(&key.display().to_string()), "{msg}");
        assert!(vault_bytes(dir.path()) == before, "vault changed");
    }
    assert_eq!(
        open_default(dir.path()).expect_err("0644").to_string(),
        format!(
            "master key file {p} has mode 0660; group and others must have no access (chmod 600 {p})",
            p = key.display()
        )
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).expect("chmod");
    open_default(dir.path()).expect("0400 is fine");
}

#[test]
fn key_file_of_wrong_length_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join(KEY_FILE);
    for len in [0usize, 31, 33, 64] {
        write_key(&key, &vec![7u8; len], 0o600);
        let e = open_default(dir.path()).expect_err("wrong length");
        assert!(
            matches!(e, VaultError::KeyFileLength { len: l, .. } if l == len as u64),
            "{e}"
        );
        assert!(e.to_string().contains("exactly 32 raw bytes"), "{e}");
    }
    assert!(!dir.path().join(VAULT_FILE).exists());
    // A provided 32-byte key is used for a new vault.
    write_key(&key, &[7u8; 32], 0o600);
    open_default(dir.path()).expect("provided key");
}

#[test]
fn wrong_key_is_refused_and_the_vault_file_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_vault(dir.path());
    let key = dir.path().join(KEY_FILE);
    let right_key = fs::read(&key).expect("key");
    let before = vault_bytes(dir.path());
    let mut wrong = right_key.clone();
    wrong[0] ^= 0xff;
    write_key(&key, &wrong, 0o600);

    let e = open_default(dir.path()).expect_err("wrong key");
    assert_eq!(
        e.to_string(),
        format!(
            "wrong master key for vault {}",
            dir.path().join(VAULT_FILE).display()
        )
    );
    assert!(vault_bytes(dir.path()) == before, "vault changed");

    write_key(&key, &right_key, 0o600);
    let vault = open_default(dir.path()).expect("right key");
    assert!(vault.get(&name("EXAMPLE_KEY")).expect("get").is_some());
}

#[test]
fn corrupt_vault_file_is_refused_and_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_vault(dir.path());
    let good = vault_bytes(dir.path());
    let path = dir.path().join(VAULT_FILE);

    let mut flipped = good.clone();
    for b in flipped.iter_mut().skip(4096).step_by(97) {
        *b ^= 0x5a;
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"this is not a database\n".repeat(100)),
        ("zeros", vec![0u8; 8192]),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped bytes", flipped),
    ];
    for (what, bytes) in cases {
        fs::write(&path, &bytes).expect("write garbage");
        let e = open_default(dir.path()).expect_err(what);
        assert!(
            matches!(e, VaultError::Store(StoreError::Corrupt { .. })),
            "{what}: {}",
            error_chain(&e)
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(
            fs::read(&path).expect("read") == bytes,
            "{what}: file changed"
        );
    }

    fs::write(&path, &good).expect("restore");
    open_default(dir.path()).expect("restored vault opens");
}

#[test]
fn single_byte_damage_anywhere_is_refused_or_harmless() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_vault(dir.path());
    let good = vault_bytes(dir.path());
    let path = dir.path().join(VAULT_FILE);
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for offset in (0..good.len()).step_by(509) {
        let mut bytes = good.clone();
        bytes[offset] ^= 0xff;
        fs::write(&path, &bytes).expect("write damaged");
        let outcome = match open_default(dir.path()) {
            Ok(vault) => {
                // Damage in unused space: whatever is read back is the stored secret or an
                // error, never another value.
                if let Ok(Some(v)) = vault.get(&name("EXAMPLE_KEY")) {
                    assert!(is(&v, "sk-example"), "offset {offset}: wrong value");
                }
                "opened".to_string()
            }
            Err(e) => {
                assert!(
                    fs::read(&path).expect("read") == bytes,
                    "offset {offset}: changed"
                );
                match e {
                    VaultError::Store(StoreError::Corrupt { .. }) => "corrupt".to_string(),
                    VaultError::WrongKey { .. } => "wrong key".to_string(),
                    e => panic!("offset {offset}: unexpected {}", error_chain(&e)),
                }
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    assert!(outcomes.contains_key("corrupt"), "{outcomes:?}");
}

#[test]
fn redb_file_that_is_not_a_vault_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_vault(dir.path());
    let path = dir.path().join(VAULT_FILE);
    fs::remove_file(&path).expect("rm");
    {
        let db = Database::create(&path).expect("foreign db");
        let txn = db.begin_write().expect("write");
        txn.open_table(redb::TableDefinition::<u64, u64>::new("other"))
            .expect("table")
            .insert(1, 2)
            .expect("insert");
        txn.commit().expect("commit");
    }
    let before = vault_bytes(dir.path());
    let e = open_default(dir.path()).expect_err("foreign db");
    assert!(e.to_string().contains("it has no meta table"), "{e}");
    assert!(vault_bytes(dir.path()) == before);
}

#[test]
fn existing_vault_with_missing_key_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_vault(dir.path());
    let key = dir.path().join(KEY_FILE);
    fs::remove_file(&key).expect("rm key");
    let before = vault_bytes(dir.path());
    let e = open_default(dir.path()).expect_err("missing key");
    assert!(matches!(e, VaultError::KeyFileMissing { .. }), "{e}");
    assert!(
        e.to_string().contains("refusing to create a new key"),
        "{e}"
    );
    assert!(!key.exists(), "a new key was created");
    assert!(vault_bytes(dir.path()) == before);
}

#[test]
fn systemd_credential_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = tempfile::tempdir().expect("creds");
    let state = dir.path();
    let source = KeySource::SystemdCredential {
        dir: Some(creds.path().to_path_buf()),
    };

    let e = Vault::open(state, source.clone()).expect_err("no credential");
    assert!(matches!(e, VaultError::CredentialMissing { .. }), "{e}");
    assert!(e.to_string().contains(SYSTEMD_CREDENTIAL_NAME), "{e}");
    assert!(!state.join(VAULT_FILE).exists());

    // systemd makes credential files 0400 or 0440; no mode check applies.
    write_key(
        &creds.path().join(SYSTEMD_CREDENTIAL_NAME),
        &[3u8; 32],
        0o440,
    );
    let vault = Vault::open(state, source.clone()).expect("open with credential");
    vault.set(&name("K"), value("v")).expect("set");
    drop(vault);
    assert!(
        !state.join(KEY_FILE).exists(),
        "no key file for a credential"
    );
    let vault = Vault::open(state, source).expect("reopen");
    assert!(is(
        &vault.get(&name("K")).expect("get").expect("present"),
        "v"
    ));
    drop(vault);

    let other = tempfile::tempdir().expect("other creds");
    write_key(
        &other.path().join(SYSTEMD_CREDENTIAL_NAME),
        &[4u8; 32],
        0o400,
    );
    let e = Vault::open(
        state,
        KeySource::SystemdCredential {
            dir: Some(other.path().to_path_buf()),
        },
    )
    .expect_err("other credential");
    assert!(matches!(e, VaultError::WrongKey { .. }), "{e}");
}

#[test]
fn a_symlinked_vault_is_refused_not_followed() {
    let real = tempfile::tempdir().expect("tempdir");
    make_vault(real.path());
    let before = vault_bytes(real.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let key = fs::read(real.path().join(KEY_FILE)).expect("key");
    write_key(&dir.path().join(KEY_FILE), &key, 0o600);
    std::os::unix::fs::symlink(real.path().join(VAULT_FILE), dir.path().join(VAULT_FILE))
        .expect("symlink");
    let e = open_default(dir.path()).expect_err("symlinked vault");
    assert!(
        matches!(e, VaultError::Store(StoreError::NotARegularFile { .. })),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "vault file {} is not a regular file (a symlink is not followed)",
            dir.path().join(VAULT_FILE).display()
        )
    );
    assert!(vault_bytes(real.path()) == before, "the target changed");
}

#[test]
fn a_vault_opens_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    let e = open_default(dir.path()).expect_err("second open");
    assert!(
        matches!(e, VaultError::Store(StoreError::InUse { .. })),
        "{e}"
    );
    drop(vault);
    open_default(dir.path()).expect("open after close");
}

#[test]
fn vault_copied_while_open_recovers_and_still_checks_the_key() {
    // A copy taken while the vault is open looks like a crash: redb must repair it.
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    vault.set(&name("K"), value("durable")).expect("set");
    let copy = tempfile::tempdir().expect("copy");
    fs::copy(dir.path().join(VAULT_FILE), copy.path().join(VAULT_FILE)).expect("copy vault");
    let key = fs::read(dir.path().join(KEY_FILE)).expect("key");
    drop(vault);
    assert!(
        matches!(
            redb::ReadOnlyDatabase::open(copy.path().join(VAULT_FILE)),
            Err(redb::DatabaseError::RepairAborted)
        ),
        "the copy should need recovery"
    );

    let mut wrong = key.clone();
    wrong[5] ^= 1;
    write_key(&copy.path().join(KEY_FILE), &wrong, 0o600);
    let before = vault_bytes(copy.path());
    let e = open_default(copy.path()).expect_err("wrong key on unclean vault");
    assert!(matches!(e, VaultError::WrongKey { .. }), "{e}");
    assert!(vault_bytes(copy.path()) == before, "unclean vault changed");

    write_key(&copy.path().join(KEY_FILE), &key, 0o600);
    let vault = open_default(copy.path()).expect("recovered");
    assert!(is(
        &vault.get(&name("K")).expect("get").expect("present"),
        "durable"
    ));
}

#[test]
fn blobs_are_sealed_apart_from_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    // Shaped like a PEM key (built here, so no key-shaped string sits in the source).
    let pem = format!(
        "-----BEGIN {0} KEY-----\nAAAA\n-----END {0} KEY-----\n",
        "PRIVATE"
    );
    assert!(vault.get_blob("ca-key").expect("get").is_none());
    vault
        .put_blob("ca-key", &SecretValue::binary(pem.as_bytes().to_vec()))
        .expect("put");
    assert!(is(
        &vault.get_blob("ca-key").expect("get").expect("present"),
        &pem
    ));
    assert!(
        vault.list().expect("list").is_empty(),
        "blobs are not secrets"
    );

    // A blob record moved under another blob name does not open.
    let raw = {
        let txn = vault.db.begin_read().expect("read");
        let t = txn.open_table(BLOBS).expect("table");
        t.get("ca-key")
            .expect("get")
            .expect("present")
            .value()
            .to_vec()
    };
    {
        let txn = vault.db.begin_write().expect("write");
        txn.open_table(BLOBS)
            .expect("table")
            .insert("other", raw.as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    assert!(matches!(
        vault.get_blob("other"),
        Err(VaultError::BlobDecrypt { .. })
    ));

    assert!(vault.remove_blob("ca-key").expect("remove"));
    assert!(vault.get_blob("ca-key").expect("get").is_none());
    assert!(matches!(
        vault.put_blob("", &SecretValue::binary(vec![1])),
        Err(VaultError::InvalidBlobName { .. })
    ));
}

/// A handle id from a short name (`h1` -> `h_00000001`-like ids that parse).
fn hid(name: &str) -> String {
    let n = name.bytes().fold(0u32, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u32::from(b))
    });
    format!("h_{n:08x}")
}

fn handle(id: &str, token_byte: u8) -> HandleRecord {
    HandleRecord {
        id: HandleId::parse(&hid(id)).expect("id"),
        token_hash: TokenHash([token_byte; 32]),
        binding: HandleBinding::new(
            CgroupPath::parse("agents/demo").expect("cgroup"),
            SecretName::new("EXAMPLE_KEY").expect("name"),
            "api.example.test",
        )
        .expect("binding"),
        expires: from_unix_secs(2_000_000_000),
        created: from_unix_secs(1_700_000_000),
        revoked: false,
        shape: None,
    }
}

fn shaped_handle(id: &str, token_byte: u8, shape: &str) -> HandleRecord {
    HandleRecord {
        shape: Some(TokenShape::parse(shape).expect("shape")),
        ..handle(id, token_byte)
    }
}

#[test]
fn shaped_handles_keep_their_shape_and_the_vault_knows_every_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    assert!(vault.handle_shapes().is_empty());
    let gh = "ghp_[0-9A-Za-z]{36}";
    let hex = "[0-9a-f]{40}";
    vault.put_handle(&handle("h0", 1)).expect("put brk_");
    assert!(vault.handle_shapes().is_empty());
    let h1 = shaped_handle("h1", 2, gh);
    vault.put_handle(&h1).expect("put");
    vault.put_handle(&shaped_handle("h2", 3, gh)).expect("put");
    vault.put_handle(&shaped_handle("h3", 4, hex)).expect("put");
    let shapes =
        |v: &Vault| -> Vec<String> { v.handle_shapes().iter().map(ToString::to_string).collect() };
    assert_eq!(shapes(&vault), [hex, gh]);
    assert_eq!(
        vault
            .handle_by_token_hash(&TokenHash([2; 32]))
            .expect("lookup"),
        Some(h1.clone())
    );
    assert_eq!(
        vault
            .list_handles()
            .expect("list")
            .iter()
            .map(|h| handle_info(h).shape)
            .collect::<Vec<_>>(),
        [None, Some(gh.into()), Some(gh.into()), Some(hex.into())]
    );
    // Revoked handles keep their shape: their tokens are still recognised, and refused.
    assert!(vault.revoke_handle(&hid("h3")).expect("revoke"));
    assert_eq!(shapes(&vault), [hex, gh]);
    drop(vault);
    let vault = open_default(dir.path()).expect("reopen");
    assert_eq!(shapes(&vault), [hex, gh]);
    assert!(vault.remove_handle(&hid("h3")).expect("remove"));
    assert_eq!(shapes(&vault), [gh]);
}

#[test]
fn a_handle_row_with_a_bad_shape_refuses_the_open() {
    let row = serde_json::to_string(&HandleRow::from(&shaped_handle(
        "h",
        7,
        "ghp_[0-9A-Za-z]{36}",
    )))
    .expect("json");
    assert!(row.contains(r#""shape":"ghp_[0-9A-Za-z]{36}""#), "{row}");
    let bad = row.replace("{36}", "{3}");
    let e = serde_json::from_str::<HandleRow>(&bad)
        .expect("parse")
        .into_record()
        .expect_err("too short");
    assert!(e.to_string().starts_with("shape: "), "{e}");

    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    vault
        .put_handle(&shaped_handle("h", 7, "ghp_[0-9A-Za-z]{36}"))
        .expect("put");
    let txn = vault.write_txn().expect("txn");
    {
        let mut handles = txn.open_table(HANDLES).expect("table");
        handles
            .insert(hid("h").as_str(), bad.as_bytes())
            .expect("write");
    }
    vault.commit(txn).expect("commit");
    drop(vault);
    let e = open_default(dir.path()).expect_err("a handle row that does not parse");
    assert!(matches!(e, VaultError::Malformed { .. }), "{e}");
    assert!(error_chain(&e).contains("shape"), "{}", error_chain(&e));
}

#[test]
fn handles_round_trip_and_revoke() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    let h1 = handle("h1", 1);
    let h2 = handle("h2", 2);
    vault.put_handle(&h1).expect("put h1");
    vault.put_handle(&h2).expect("put h2");

    assert_eq!(
        vault
            .handle_by_token_hash(&TokenHash([1; 32]))
            .expect("lookup"),
        Some(h1.clone())
    );
    assert_eq!(
        vault
            .handle_by_token_hash(&TokenHash([9; 32]))
            .expect("lookup"),
        None
    );
    assert_eq!(vault.get_handle(&hid("h2")).expect("get"), Some(h2.clone()));
    assert_eq!(
        vault.list_handles().expect("list"),
        [h1.clone(), h2.clone()]
    );

    assert!(vault.revoke_handle(&hid("h1")).expect("revoke"));
    assert!(vault.revoke_handle(&hid("h1")).expect("revoke twice"));
    assert!(!vault.revoke_handle("nope").expect("revoke unknown"));
    let revoked = vault
        .handle_by_token_hash(&TokenHash([1; 32]))
        .expect("lookup")
        .expect("still found");
    assert!(revoked.revoked);

    // Re-keying a handle drops its old token from the index.
    let rekeyed = HandleRecord {
        token_hash: TokenHash([3; 32]),
        ..h2.clone()
    };
    vault.put_handle(&rekeyed).expect("rekey");
    assert_eq!(
        vault
            .handle_by_token_hash(&TokenHash([2; 32]))
            .expect("lookup"),
        None
    );
    assert_eq!(
        vault
            .handle_by_token_hash(&TokenHash([3; 32]))
            .expect("lookup"),
        Some(rekeyed)
    );

    // Another handle may not take an existing token hash.
    let e = vault.put_handle(&handle("h3", 1)).expect_err("conflict");
    assert!(matches!(e, VaultError::HandleTokenConflict { .. }), "{e}");
    assert_eq!(vault.get_handle(&hid("h3")).expect("get"), None);

    assert!(vault.remove_handle(&hid("h1")).expect("remove"));
    assert!(!vault.remove_handle(&hid("h1")).expect("remove again"));
    assert_eq!(
        vault
            .handle_by_token_hash(&TokenHash([1; 32]))
            .expect("lookup"),
        None
    );

    drop(vault);
    let vault = open_default(dir.path()).expect("reopen");
    assert_eq!(vault.list_handles().expect("list").len(), 1);
}

#[test]
fn handle_rows_hold_the_hash_in_hex_and_never_a_token() {
    let row = serde_json::to_string(&HandleRow::from(&handle("h", 0xab))).expect("json");
    assert!(row.contains(&"ab".repeat(32)), "{row}");
    let back: HandleRow = serde_json::from_str(&row).expect("parse");
    assert_eq!(back.into_record().ok(), Some(handle("h", 0xab)));
    let bad = row.replace(&"ab".repeat(32), &"+b".repeat(32));
    let bad: HandleRow = serde_json::from_str(&bad).expect("parse");
    assert!(bad.into_record().is_err());
    let bad_cgroup = row.replace("agents/demo", "../escape");
    let bad_cgroup: HandleRow = serde_json::from_str(&bad_cgroup).expect("parse");
    assert!(
        bad_cgroup
            .into_record()
            .is_err_and(|e| e.to_string().starts_with("cgroup"))
    );
}

#[test]
fn errors_and_debug_never_show_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    let secret = "sk-live-SHOULD-NEVER-APPEAR";
    vault.set(&name("K"), value(secret)).expect("set");
    let got = vault.get(&name("K")).expect("get").expect("present");
    let shown = format!("{vault:?} {got:?} {got} {:?}", vault.list().expect("list"));
    assert!(!shown.contains("SHOULD-NEVER"), "value shown");
    let e = vault
        .set(
            &name("K"),
            SecretValue::binary(format!("{secret}\nx").into_bytes()),
        )
        .expect_err("refused");
    assert!(!error_chain(&e).contains("SHOULD-NEVER"));
    assert!(!format!("{e:?}").contains("SHOULD-NEVER"));
}

#[test]
fn a_vault_file_replaced_while_open_refuses_writes_and_keeps_serving_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = open_default(dir.path()).expect("open");
    vault.set(&name("KEEP"), value("kept value")).expect("set");
    // Another file takes the vault's path (a restore, an editor, a careless cp).
    let path = dir.path().join("vault.redb");
    let moved = dir.path().join("vault.redb.old");
    std::fs::rename(&path, &moved).expect("move away");
    std::fs::write(&path, b"not the vault").expect("replace");
    let err = vault
        .set(&name("LOST"), value("would be lost"))
        .expect_err("a write to the replaced file is refused");
    assert!(
        matches!(err, VaultError::Replaced { .. }),
        "{}",
        agent_broker_core::fmt::error_chain(&err)
    );
    assert!(err.to_string().contains("restart brokerd"), "{err}");
    // Reads go on from the file opened.
    let kept = vault.get(&name("KEEP")).expect("get").expect("present");
    assert!(is(&kept, "kept value"));
}
