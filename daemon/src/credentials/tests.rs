//! The credentials' state machine against a scripted token endpoint and a real vault: single
//! flight, rotation stored before use and taken over by the next brokerd, final and passing
//! failures, exec values past their TTL. (End to end, against a real OAuth server:
//! `tests/tests/credentials.rs`.)

use std::sync::{Arc, Mutex};

use agent_broker_core::{
    credential::CredentialSpec,
    secret::{SecretName, SecretValue},
};
use agent_broker_protocol::{AuditEvent, Decision, EventKind};
use zeroize::Zeroizing;

use super::{
    Credentials, Lookup,
    oauth::{TokenClient, TokenResponse},
};
use crate::{
    audit::EventSink,
    vault::{KeySource, Vault},
};

#[derive(Default)]
struct Events(Mutex<Vec<AuditEvent>>);

impl EventSink for Events {
    fn record(&self, event: AuditEvent) {
        self.0.lock().expect("events").push(event);
    }
}

/// A token endpoint that answers from a script and remembers every form it got.
#[derive(Default)]
struct Script {
    answers: Mutex<Vec<(u16, String)>>,
    forms: Mutex<Vec<String>>,
    /// How long each answer takes, so concurrent requests overlap.
    delay_ms: u64,
}

impl Script {
    fn answer(&self, status: u16, body: &str) {
        self.answers
            .lock()
            .expect("answers")
            .push((status, body.to_string()));
    }

    fn forms(&self) -> Vec<String> {
        self.forms.lock().expect("forms").clone()
    }
}

impl TokenClient for Script {
    fn post_form(
        &self,
        _url: &str,
        form: Zeroizing<String>,
    ) -> futures_util::future::BoxFuture<'_, Result<TokenResponse, String>> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(self.delay_ms)).await;
            self.forms.lock().expect("forms").push(form.to_string());
            let mut answers = self.answers.lock().expect("answers");
            if answers.is_empty() {
                return Err("no answer scripted".into());
            }
            let (status, body) = answers.remove(0);
            Ok(TokenResponse {
                status,
                body: Zeroizing::new(body.into_bytes()),
            })
        })
    }
}

fn name(s: &str) -> SecretName {
    SecretName::new(s).expect("name")
}

fn oauth_spec(refresh: &str) -> SecretValue {
    CredentialSpec::Oauth {
        token_url: "https://auth.example.test/token".into(),
        client_id: "agent".into(),
        client_secret: None,
        refresh_token: refresh.into(),
        scope: None,
    }
    .to_value()
    .expect("spec")
}

struct Setup {
    _dir: tempfile::TempDir,
    vault: Arc<Vault>,
    script: Arc<Script>,
    events: Arc<Events>,
}

impl Setup {
    fn new(delay_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault =
            Arc::new(Vault::open(dir.path(), KeySource::default_file(dir.path())).expect("vault"));
        Self {
            _dir: dir,
            vault,
            script: Arc::new(Script {
                delay_ms,
                ..Script::default()
            }),
            events: Arc::new(Events::default()),
        }
    }

    fn credentials(&self) -> Arc<Credentials> {
        let c = Arc::new(Credentials::new(
            self.vault.clone(),
            self.script.clone(),
            self.events.clone(),
        ));
        c.reload();
        c
    }

    fn credential_events(&self) -> Vec<AuditEvent> {
        self.events
            .0
            .lock()
            .expect("events")
            .iter()
            .filter(|e| e.kind == Some(EventKind::Credential))
            .cloned()
            .collect()
    }
}

fn ready(c: &Credentials, n: &SecretName) -> Option<Vec<u8>> {
    match c.lookup(n) {
        Lookup::Ready(v) => Some(v.expose().to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_use_makes_one_token_request() {
    let s = Setup::new(200);
    let tok = name("TOK");
    s.vault.set(&tok, oauth_spec("rt-1")).expect("set");
    s.script.answer(
        200,
        r#"{"access_token":"at-1","expires_in":3600,"refresh_token":"rt-2"}"#,
    );
    let c = s.credentials();
    assert!(matches!(c.lookup(&tok), Lookup::NotReady(_)));
    assert_eq!(c.pending(&[&tok]), vec![tok.clone()]);
    let waits: Vec<_> = (0..10)
        .map(|_| {
            let c = c.clone();
            let tok = tok.clone();
            tokio::spawn(async move { c.ensure(&[tok]).await })
        })
        .collect();
    for w in waits {
        w.await.expect("task");
    }
    assert_eq!(s.script.forms().len(), 1, "one request for ten waiters");
    assert_eq!(ready(&c, &tok).as_deref(), Some(&b"at-1"[..]));
    assert!(c.pending(&[&tok]).is_empty());
    let form = &s.script.forms()[0];
    assert!(form.contains("grant_type=refresh_token") && form.contains("refresh_token=rt-1"));
    let events = s.credential_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].decision, Some(Decision::Allow));
    assert_eq!(events[0].host.as_deref(), Some("auth.example.test"));
    // The scrubbing set holds the token and the rotated refresh token.
    let needles: Vec<Vec<u8>> = c
        .needles(&tok)
        .iter()
        .map(|v| v.expose().to_vec())
        .collect();
    assert!(needles.contains(&b"at-1".to_vec()) && needles.contains(&b"rt-2".to_vec()));
}

#[tokio::test]
async fn a_rotated_refresh_token_is_stored_and_used_by_the_next_brokerd() {
    let s = Setup::new(0);
    let tok = name("TOK");
    s.vault.set(&tok, oauth_spec("rt-1")).expect("set");
    s.script.answer(
        200,
        r#"{"access_token":"at-1","expires_in":1,"refresh_token":"rt-2"}"#,
    );
    let first = s.credentials();
    first.ensure(std::slice::from_ref(&tok)).await;
    assert_eq!(ready(&first, &tok).as_deref(), Some(&b"at-1"[..]));
    drop(first);

    // The next brokerd: the stored access token has expired (1 s); it refreshes with rt-2.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    s.script
        .answer(200, r#"{"access_token":"at-2","expires_in":3600}"#);
    let second = s.credentials();
    second.ensure(std::slice::from_ref(&tok)).await;
    assert_eq!(ready(&second, &tok).as_deref(), Some(&b"at-2"[..]));
    let forms = s.script.forms();
    assert!(
        forms[1].contains("refresh_token=rt-2"),
        "the rotated token: {forms:?}"
    );

    // And a third brokerd reuses at-2 (still valid) without a request; the server did not
    // rotate this time, so rt-2 is still the one kept.
    let third = s.credentials();
    assert_eq!(ready(&third, &tok).as_deref(), Some(&b"at-2"[..]));
    assert_eq!(s.script.forms().len(), 2);

    // A credential set again starts over: the stored state belongs to the old version.
    s.vault.set(&tok, oauth_spec("rt-9")).expect("set again");
    third.reload();
    assert!(matches!(third.lookup(&tok), Lookup::NotReady(_)));
}

#[tokio::test]
async fn a_refused_grant_is_final_and_audited_once() {
    let s = Setup::new(0);
    let tok = name("TOK");
    s.vault.set(&tok, oauth_spec("rt-1")).expect("set");
    s.script.answer(
        400,
        r#"{"error":"invalid_grant","error_description":"token revoked"}"#,
    );
    let c = s.credentials();
    c.ensure(std::slice::from_ref(&tok)).await;
    for _ in 0..3 {
        assert!(c.pending(&[&tok]).is_empty(), "not tried again");
        c.ensure(std::slice::from_ref(&tok)).await;
    }
    assert_eq!(s.script.forms().len(), 1);
    match c.lookup(&tok) {
        Lookup::NotReady(why) => assert!(why.contains("invalid_grant"), "{why}"),
        _ => panic!("a failed credential has no value"),
    }
    let status = c.status(&tok).expect("status");
    assert!(status.state.starts_with("failed:") && !status.state.contains("retrying"));
    let events = s.credential_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].decision, Some(Decision::Deny));
}

#[tokio::test]
async fn a_passing_failure_is_retried_after_the_backoff_only() {
    let s = Setup::new(0);
    let tok = name("TOK");
    s.vault.set(&tok, oauth_spec("rt-1")).expect("set");
    s.script.answer(503, "busy");
    let c = s.credentials();
    c.ensure(std::slice::from_ref(&tok)).await;
    c.ensure(std::slice::from_ref(&tok)).await;
    assert_eq!(s.script.forms().len(), 1, "within the backoff");
    assert!(c.status(&tok).expect("status").state.contains("retrying"));
}

#[tokio::test]
async fn an_exec_value_is_not_used_past_its_ttl_unless_stale_values_are_allowed() {
    for allow_stale in [false, true] {
        let s = Setup::new(0);
        let dir = tempfile::tempdir().expect("tempdir");
        let flag = dir.path().join("fail");
        let script = dir.path().join("provider.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ -e {} ] && {{ echo locked >&2; exit 2; }}\necho exec-value\n",
                flag.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        let tok = name("EXEC");
        let spec = CredentialSpec::Exec {
            command: vec![script.display().to_string()],
            ttl_secs: 1,
            timeout_secs: 5,
            allow_stale,
        };
        s.vault
            .set(&tok, spec.to_value().expect("spec"))
            .expect("set");
        let c = s.credentials();
        c.ensure(std::slice::from_ref(&tok)).await;
        assert_eq!(ready(&c, &tok).as_deref(), Some(&b"exec-value"[..]));
        std::fs::write(&flag, b"").expect("flag");
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        c.ensure(std::slice::from_ref(&tok)).await;
        let used = ready(&c, &tok);
        if allow_stale {
            assert_eq!(used.as_deref(), Some(&b"exec-value"[..]));
        } else {
            assert!(used.is_none());
            match c.lookup(&tok) {
                Lookup::NotReady(why) => {
                    assert!(why.contains("exit status 2: locked"), "{why}");
                }
                _ => panic!("past its TTL"),
            }
        }
    }
}
