//! The vault and secret hygiene, end to end: brokerd refuses a group-readable master key and a
//! key that does not open the vault, changing nothing; `brokerctl secret list / rotate / rm`
//! behave, and no secret value ever appears in brokerctl's output, brokerd's log or the vault
//! file in clear. The secret-lifecycle test calls the test API through curl (the world is
//! `agent_broker_tests::world`).
//!
//! Needs root, cgroup v2 and BPF (brokerd loads its programs at start), and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test vault -- --test-threads=1`.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use agent_broker_tests::{
    Broker, Canary, clients, redact, require_privileges, sha256_hex,
    world::{SECRET_NAME, World},
};

fn file_hash(path: &Path) -> String {
    sha256_hex(&fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())))
}

#[test]
fn vault_refuses_a_group_readable_key_and_a_wrong_key_and_changes_nothing() {
    require_privileges();
    let mut broker = Broker::start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    broker.stop();
    let state = broker.state_dir();
    let key = state.join("master.key");
    let vault = state.join("vault.redb");
    let mode = fs::metadata(&key)
        .unwrap_or_else(|e| panic!("brokerd created no {}: {e}", key.display()))
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "master.key is created 0600, it is {mode:o}");
    assert!(vault.is_file(), "brokerd created no {}", vault.display());
    secret.assert_absent(
        &fs::read(&vault).unwrap_or_default(),
        "vault.redb (must be encrypted)",
    );
    let key_hash = file_hash(&key);
    let vault_hash = file_hash(&vault);

    // 0644: refused, naming the file.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod 0644 {}: {e}", key.display()));
    let err = match broker.try_start() {
        Ok(()) => panic!(
            "brokerd started with a 0644 master.key; its log:\n{}",
            broker.log()
        ),
        Err(e) => e,
    };
    let log = broker.log_of_last_start();
    assert!(
        log.contains(&key.display().to_string()),
        "the refusal should name {}: {err}",
        key.display()
    );
    assert_eq!(
        file_hash(&vault),
        vault_hash,
        "vault.redb changed after the 0644 refusal"
    );
    assert_eq!(
        file_hash(&key),
        key_hash,
        "master.key changed after the 0644 refusal"
    );
    assert_eq!(
        fs::metadata(&key)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0),
        0o644,
        "brokerd must not quietly chmod the key"
    );

    // Another 32-byte key, 0600: refused with a clear error.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", key.display()));
    let original_key = fs::read(&key).unwrap_or_default();
    let mut wrong = [0u8; 32];
    getrandom_fill(&mut wrong);
    fs::write(&key, wrong).unwrap_or_else(|e| panic!("cannot write {}: {e}", key.display()));
    let wrong_hash = file_hash(&key);
    let err = match broker.try_start() {
        Ok(()) => panic!(
            "brokerd started with the wrong master key; its log:\n{}",
            broker.log()
        ),
        Err(e) => e,
    };
    let log = broker.log_of_last_start().to_lowercase();
    assert!(
        log.contains("key")
            && (log.contains("wrong")
                || log.contains("does not")
                || log.contains("decrypt")
                || log.contains("mismatch")),
        "the refusal should say the master key does not open the vault: {err}"
    );
    assert_eq!(
        file_hash(&vault),
        vault_hash,
        "vault.redb changed after the wrong-key refusal"
    );
    assert_eq!(
        file_hash(&key),
        wrong_hash,
        "brokerd rewrote the (wrong) key file"
    );

    // The right key again: brokerd starts and the secret is still there.
    fs::write(&key, &original_key).unwrap_or_else(|e| panic!("cannot restore the key: {e}"));
    broker.restart();
    let list = broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(list.contains(SECRET_NAME), "the secret survived: {list}");
    secret.assert_absent(&broker.log_bytes(), "brokerd's log");
    secret.assert_absent(&broker.transcript(), "brokerctl's output");
}

fn getrandom_fill(buf: &mut [u8]) {
    let mut f = fs::File::open("/dev/urandom").unwrap_or_else(|e| panic!("/dev/urandom: {e}"));
    std::io::Read::read_exact(&mut f, buf).unwrap_or_else(|e| panic!("/dev/urandom: {e}"));
}

#[test]
fn secret_values_never_appear_in_brokerctl_output_secret_list_or_logs() {
    let w = World::new();
    // Traffic that uses the secret, so the log has request lines.
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    w.assert_injected("curl", &run, &report);

    let list = w.broker.ctl_ok(&["secret", "list", "--json"]);
    let secrets: serde_json::Value = serde_json::from_str(&list)
        .unwrap_or_else(|e| panic!("secret list --json ({e}): {}", redact(&list)));
    let entry = secrets
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(SECRET_NAME)))
        .unwrap_or_else(|| panic!("secret list --json lacks {SECRET_NAME}: {}", redact(&list)));
    let mut keys: Vec<&str> = entry
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["created_unix", "kind", "name", "updated_unix", "version"],
        "secret list fields: names, dates and the kind, never a value"
    );
    assert_eq!(entry["kind"], "static", "{entry}");
    assert_eq!(entry["version"], 1, "{entry}");

    // Rotate: a new version, injected from then on.
    let rotated = Canary::new();
    let out = w.broker.ctl_output_with_stdin(
        &["secret", "rotate", SECRET_NAME],
        rotated.expose().as_bytes(),
    );
    assert!(
        out.status.success(),
        "secret rotate: {}",
        redact(&String::from_utf8_lossy(&out.stderr))
    );
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert_eq!(report.status, 200, "{}", report.show());
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(rotated.sha256_with_prefix("Bearer ").as_str()),
        "after rotate the API receives the new value"
    );
    run.assert_no_secret(&rotated);
    run.assert_no_secret(&w.secret);
    let list = w.broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(
        list.contains("\"version\": 2") || list.contains("\"version\":2"),
        "version 2 after rotate: {}",
        redact(&list)
    );
    w.broker.ctl_ok(&["secret", "list"]);
    w.broker.ctl_ok(&["status"]);
    w.broker.ctl_ok(&["connections"]);
    w.broker.ctl_ok(&["connections", "--json"]);
    w.broker.ctl_ok(&["handle", "list"]);

    // rm: gone from the list; a request that needs it is refused, not sent with nothing.
    w.broker.ctl_ok(&["secret", "rm", SECRET_NAME]);
    let list = w.broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(
        !list.contains(SECRET_NAME),
        "secret rm left {SECRET_NAME}: {}",
        redact(&list)
    );
    let before = w.api.requests().len();
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert!(
        report.status >= 400,
        "a request whose injected secret was removed must fail: {}",
        report.show()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API got a request without its secret"
    );

    for secret in [&w.secret, &rotated] {
        secret.assert_absent(&w.broker.log_bytes(), "brokerd's log");
        secret.assert_absent(&w.broker.transcript(), "brokerctl's output");
        let vault = w.broker.state_dir().join("vault.redb");
        secret.assert_absent(&fs::read(&vault).unwrap_or_default(), "vault.redb");
    }
}
