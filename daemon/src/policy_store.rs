//! The live policy: loaded at start, reloaded when the policy directory changes, replaced whole.
//!
//! Readers take the current [`Policy`] snapshot from a `watch` channel; a reload builds a new
//! `Policy` and swaps it in atomically, so a request sees either the old rules or the new ones,
//! never a mix. A directory that fails to load keeps the last-known-good policy, and the error
//! (file, line and field) is logged and kept for `brokerctl status`.
//!
//! Changes are found by polling a fingerprint of the directory (names, sizes, mtimes, inodes of
//! its `*.toml` files) every [`POLL_INTERVAL`], so an edit applies within a second without
//! depending on inotify semantics of editors' rename-over writes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use agent_broker_core::{
    fmt::error_chain,
    policy::{Policy, PolicyError},
    time::now_unix_ms,
};
use agent_broker_protocol::Decision;

/// How often the directory is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What `brokerctl status` shows about the policy.
#[derive(Clone, Debug, Default)]
pub struct PolicyState {
    /// Files in the active policy.
    pub files: usize,
    /// When the active policy was loaded.
    pub loaded: Option<SystemTime>,
    /// The error of the last failed load, if the newest files did not load (the previous
    /// policy is still active).
    pub error: Option<String>,
}

/// The policy directory and its live snapshot.
pub struct PolicyStore {
    dir: PathBuf,
    /// Told about every reload, successful or not (the audit log).
    events: Mutex<Option<Arc<dyn crate::audit::EventSink>>>,
    tx: watch::Sender<Arc<Policy>>,
    state: Mutex<PolicyState>,
    fingerprint: Mutex<Fingerprint>,
}

type Fingerprint = Vec<(String, u64, u64, u64, i64)>;

impl PolicyStore {
    /// Loads the directory; a missing directory is an empty policy (everything denied), an
    /// invalid one is an error (brokerd refuses to start on a bad policy).
    pub fn open(dir: &Path) -> Result<Arc<Self>, agent_broker_core::policy::PolicyError> {
        let fingerprint = fingerprint(dir);
        let policy = load(dir)?;
        let files = policy.files().len();
        let (tx, _) = watch::channel(Arc::new(policy));
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            events: Mutex::new(None),
            tx,
            state: Mutex::new(PolicyState {
                files,
                loaded: Some(SystemTime::now()),
                error: None,
            }),
            fingerprint: Mutex::new(fingerprint),
        }))
    }

    /// Records every later reload with `sink`.
    pub fn report_to(&self, sink: Arc<dyn crate::audit::EventSink>) {
        if let Ok(mut e) = self.events.lock() {
            *e = Some(sink);
        }
    }

    fn report(&self, outcome: Result<usize, &str>) {
        let Some(sink) = self.events.lock().ok().and_then(|e| e.clone()) else {
            return;
        };
        let (decision, reason) = match outcome {
            Ok(files) => (
                Decision::Allow,
                format!("{files} file(s) from {}", self.dir.display()),
            ),
            Err(e) => (Decision::Deny, format!("kept the previous policy: {e}")),
        };
        sink.record(agent_broker_protocol::AuditEvent {
            time_ms: now_unix_ms(),
            kind: Some(agent_broker_protocol::EventKind::PolicyReload),
            decision: Some(decision),
            reason: Some(reason),
            side: Some(agent_broker_protocol::Side::Broker),
            ..Default::default()
        });
    }

    /// The current policy.
    pub fn current(&self) -> Arc<Policy> {
        self.tx.borrow().clone()
    }

    /// A receiver that always holds the current policy.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.tx.subscribe()
    }

    /// The policy directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Load state for status.
    pub fn state(&self) -> PolicyState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Loads the directory now. On success the new policy is active; on failure the previous
    /// one stays and the error is returned (and kept for status).
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let fp = fingerprint(&self.dir);
        if let Ok(mut f) = self.fingerprint.lock() {
            *f = fp;
        }
        // Unlike at start, a directory that is gone is an error: the last good policy stays
        // (an operator's `rm -rf` or a failed mount must not drop every agent's rules).
        match Policy::load_dir(&self.dir) {
            Ok(policy) => {
                let files = policy.files().len();
                self.tx.send_replace(Arc::new(policy));
                if let Ok(mut s) = self.state.lock() {
                    *s = PolicyState {
                        files,
                        loaded: Some(SystemTime::now()),
                        error: None,
                    };
                }
                info!(dir = %self.dir.display(), files, "policy reloaded");
                self.report(Ok(files));
                Ok(files)
            }
            Err(e) => {
                let message = error_chain(&e);
                warn!(dir = %self.dir.display(), error = %message, "policy reload failed; keeping the last good policy");
                if let Ok(mut s) = self.state.lock() {
                    s.error = Some(message.clone());
                }
                self.report(Err(&message));
                Err(e)
            }
        }
    }

    /// Reloads whenever the directory changes, until `cancel` fires.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let store = self.clone();
            let changed = tokio::task::spawn_blocking(move || {
                let fp = fingerprint(&store.dir);
                store.fingerprint.lock().map(|f| *f != fp).unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if changed {
                let store = self.clone();
                let _ = tokio::task::spawn_blocking(move || store.reload()).await;
            }
        }
    }
}

fn load(dir: &Path) -> Result<Policy, PolicyError> {
    if !dir.exists() {
        return Ok(Policy::empty());
    }
    Policy::load_dir(dir)
}

/// Names, sizes, mtimes and inodes of the directory's `*.toml` files, sorted. Entries in
/// subdirectories are not policy and are left out.
fn fingerprint(dir: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut fp: Fingerprint = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if !name.ends_with(".toml") || name.starts_with('.') {
                return None;
            }
            let m = std::fs::metadata(e.path()).ok()?;
            Some((name, m.len(), m.ino(), m.mtime() as u64, m.mtime_nsec()))
        })
        .collect();
    fp.sort();
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "cgroup = \"agents/a\"\n[[allow]]\nhost = \"api.example.test\"\n";

    #[test]
    fn a_bad_edit_keeps_the_last_good_policy_and_reports_where() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.toml"), GOOD).expect("write");
        let store = PolicyStore::open(dir.path()).expect("open");
        let before = store.current();
        assert_eq!(before.files().len(), 1);

        std::fs::write(
            dir.path().join("a.toml"),
            "cgroup = \"agents/a\"\n[[allow]]\nhots = 1\n",
        )
        .expect("write");
        let err = error_chain(&store.reload().expect_err("bad file"));
        assert!(err.contains("a.toml") && err.contains(":3"), "{err}");
        assert!(
            Arc::ptr_eq(&before, &store.current()),
            "the old policy stays active"
        );
        assert_eq!(store.state().error.as_deref(), Some(err.as_str()));

        std::fs::write(dir.path().join("a.toml"), GOOD).expect("write");
        assert_eq!(store.reload().ok(), Some(1));
        assert!(store.state().error.is_none());
    }

    #[test]
    fn a_removed_directory_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("mkdir");
        std::fs::write(policies.join("a.toml"), GOOD).expect("write");
        let store = PolicyStore::open(&policies).expect("open");
        std::fs::remove_dir_all(&policies).expect("rm");
        let err = store.reload().expect_err("a missing directory is an error");
        assert!(
            error_chain(&err).contains(&policies.display().to_string()),
            "{}",
            error_chain(&err)
        );
        assert_eq!(
            store.current().files().len(),
            1,
            "the last good policy stays"
        );
        assert!(store.state().error.is_some());
        // It comes back: loaded again.
        std::fs::create_dir(&policies).expect("mkdir");
        std::fs::write(policies.join("a.toml"), GOOD).expect("write");
        assert_eq!(store.reload().expect("reload"), 1);
        assert!(store.state().error.is_none());
    }

    #[test]
    fn fingerprints_change_with_content_and_ignore_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = fingerprint(dir.path());
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        assert_eq!(a, fingerprint(dir.path()));
        std::fs::write(dir.path().join("a.toml"), GOOD).expect("write");
        let b = fingerprint(dir.path());
        assert_ne!(a, b);
        std::fs::write(dir.path().join("a.toml"), format!("{GOOD}\n")).expect("write");
        assert_ne!(b, fingerprint(dir.path()));
    }
}
