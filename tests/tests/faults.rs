//! Faults, end to end (issue 17 part 3, the first cases), with the test API and a scripted
//! upstream (tests/src/scripted.rs): a TLS alert and a certificate that changes between
//! connections are 502s with nothing sent; an upstream that never sends its
//! response head is given up at brokerd's deadline (`--upstream-header-timeout`), not waited
//! for; a stream that stalls mid-body is cut at the rule's `idle_timeout` and reaches the agent
//! as an error, never as a complete reply; the policy directory removed while brokerd runs keeps
//! the last good policy, and its return is picked up; a full audit disk refuses calls (or lets
//! them go, if so set) until space returns; a vault file replaced under brokerd refuses writes;
//! a name whose address flips stops getting the credential at the old address once brokerd's
//! knowledge of it expires, and gets it again when it flips back; SIGTERM to `cargo xtask run`
//! stops the brokerd it started (the command becomes brokerd).
//! Real curl clients in the agent's cgroup,
//! the test API's `/attack/slow` and `/attack/stream-cut` (tests/src/upstream.rs).
//!
//! Needs root, cgroup v2 and BPF, and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test faults -- --test-threads=1`.

use std::time::{Duration, Instant};

use agent_broker_protocol::{AuditEvent, EventKind, Side};
use agent_broker_tests::{
    TestCa, TestCgroup, TestUpstream, clients, poll_until,
    world::{API, World, api_ip, rule},
};

const WAIT: Duration = Duration::from_secs(15);

fn curl_args(w: &World, path: &str, http2: bool) -> Vec<String> {
    let port = w.api.port();
    let mut argv: Vec<String> = [
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "30",
        "-w",
        "%{stderr}ABTEST status=%{http_code}\\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(if http2 { "--http2" } else { "--http1.1" }.into());
    argv.push("--resolve".into());
    argv.push(format!("{API}:{port}:{}", api_ip()));
    argv.push(format!("https://{API}:{port}{path}"));
    argv
}

#[test]
fn an_upstream_that_never_answers_is_given_up_at_the_header_deadline() {
    let w = World::with_broker_args(
        TestCa::new("abtest upstream CA"),
        &["--upstream-header-timeout", "2"],
        |cg: &TestCgroup, api: &TestUpstream| {
            vec![(
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            )]
        },
    );
    for (http2, tag) in [(false, "h1"), (true, "h2")] {
        let path = format!("/attack/slow?ms=60000&v={tag}");
        let started = Instant::now();
        let run = clients::run_in_cgroup(
            &w.broker,
            &w.agent,
            "curl",
            &w.trust().var("curl"),
            &curl_args(&w, &path, http2),
        );
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
        assert!(
            stderr.contains("ABTEST status=504"),
            "{tag}: {}",
            run.show()
        );
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(10),
            "{tag}: answered after {took:?}"
        );
        let body = String::from_utf8_lossy(&run.output.stdout).into_owned();
        assert!(body.contains("sent no response within 2s"), "{tag}: {body}");
        let record = w.broker.wait_record("the 504's record", WAIT, |r| {
            r.kind == Some(EventKind::Request)
                && r.status == Some(504)
                && r.path.as_deref() == Some("/attack/slow")
                && !r.secrets.is_empty()
                && r.reason.as_deref().is_some_and(|x| x.contains("within 2s"))
        });
        assert_eq!(record.side, Some(Side::Upstream), "{tag}: {record:?}");
        // brokerd is fine: the next call goes through.
        let run = clients::run_in_cgroup(
            &w.broker,
            &w.agent,
            "curl",
            &w.trust().var("curl"),
            &curl_args(&w, "/hash", http2),
        );
        let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
        assert!(
            stderr.contains("ABTEST status=200"),
            "{tag}: {}",
            run.show()
        );
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn a_stream_that_stalls_mid_body_is_cut_at_the_idle_timeout_and_never_looks_complete() {
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}idle_timeout = \"2s\"\n",
                cg.child("agent"),
                rule(API, api.port(), true)
            ),
        )]
    });
    for (http2, tag) in [(false, "h1"), (true, "h2")] {
        let started = Instant::now();
        let run = clients::run_in_cgroup(
            &w.broker,
            &w.agent,
            "curl",
            &w.trust().var("curl"),
            &curl_args(&w, &format!("/attack/stream-cut?events=5&v={tag}"), http2),
        );
        let took = started.elapsed();
        // The events sent before the stall arrived; then curl reports an error (a chunked body
        // without its last chunk, an h2 stream reset), not a complete reply, and not its own
        // timeout.
        let body = String::from_utf8_lossy(&run.output.stdout).into_owned();
        assert!(
            body.contains("token 4 of a long answer"),
            "{tag}: {}",
            run.show()
        );
        assert!(!body.contains("[DONE]"), "{tag}: {}", run.show());
        let code = run.output.status.code();
        assert!(
            code.is_some_and(|c| c != 0 && c != 28),
            "{tag}: curl must fail on a cut stream (exit {code:?}): {}",
            run.show()
        );
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(15),
            "{tag}: cut after {took:?}"
        );
        let record = w.broker.wait_record("the cut stream's record", WAIT, |r| {
            r.kind == Some(EventKind::Request)
                && r.path.as_deref() == Some("/attack/stream-cut")
                && r.side == Some(Side::Upstream)
                && r.bytes_out > 0
        });
        assert_eq!(record.status, Some(200), "{tag}: {record:?}");
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn the_policy_directory_removed_keeps_the_last_good_policy_until_it_returns() {
    let w = World::new();
    let dir = w.broker.policy_dir();
    let saved = std::env::temp_dir().join(format!("abtest-policy-saved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&saved);
    std::fs::rename(&dir, &saved).expect("move the policy directory away");
    let error = poll_until(WAIT, || w.broker.status().policy.error)
        .unwrap_or_else(|| panic!("no policy error reported\n{}", w.broker.log()));
    assert!(error.contains(&dir.display().to_string()), "{error}");
    // The agent's calls still follow the last good policy.
    let run = clients::run_in_cgroup(
        &w.broker,
        &w.agent,
        "curl",
        &w.trust().var("curl"),
        &curl_args(&w, "/hash", false),
    );
    let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
    assert!(stderr.contains("ABTEST status=200"), "{}", run.show());
    assert_eq!(w.broker.status().policy.files, 1);
    // The reload failure is in the audit log.
    w.broker.wait_record("the failed reload", WAIT, |r| {
        r.kind == Some(EventKind::PolicyReload)
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("kept the previous policy"))
    });
    std::fs::rename(&saved, &dir).expect("put the policy directory back");
    poll_until(WAIT, || {
        w.broker.status().policy.error.is_none().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the directory's return was not picked up\n{}",
            w.broker.log()
        )
    });
}

/// A world whose agent may call `name` on the scripted upstream's port, with the key injected.
fn scripted_world(ca: TestCa, name: &'static str, port: u16) -> World {
    let w = World::with_ca(ca, move |cg, _| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}",
                cg.child("agent"),
                rule(name, port, true)
            ),
        )]
    });
    w.broker.add_name(name, api_ip());
    w
}

fn curl_to(w: &World, name: &str, port: u16) -> (String, String) {
    let out = curl_output(w, name, port, false);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl in the agent's cgroup to `https://name:port/v1/thing`, over HTTP/2 or HTTP/1.1.
fn curl_output(w: &World, name: &str, port: u16, http2: bool) -> std::process::Output {
    let argv: Vec<String> = [
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "-w",
        "%{stderr}ABTEST status=%{http_code}\\n",
        if http2 { "--http2" } else { "--http1.1" },
        "--resolve",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("{name}:{port}:{}", api_ip()),
        format!("https://{name}:{port}/v1/thing"),
    ])
    .collect();
    clients::run_in_cgroup(&w.broker, &w.agent, "curl", &w.trust().var("curl"), &argv).output
}

#[test]
fn a_stream_the_upstream_resets_half_closes_or_truncates_never_looks_complete() {
    use agent_broker_tests::scripted::{End, LAST_EVENT, ScriptedUpstream, Step, event};
    const NAME: &str = "streaming.example.test";
    const EVENTS: usize = 5;
    let ca = TestCa::new("abtest upstream CA");
    let ends = [
        End::Reset,
        End::HalfClose,
        End::CloseDelimitedTruncated,
        End::CloseDelimited,
    ];
    // Each stream takes a connection of its own (none of them can be reused), in this order.
    let script = ends
        .iter()
        .flat_map(|end| [*end, *end])
        .map(|end| Step::stream(&ca, &[NAME], EVENTS, end))
        .collect();
    let upstream = ScriptedUpstream::start(api_ip(), script);
    let w = scripted_world(ca, NAME, upstream.port());
    for end in ends {
        for (http2, tag) in [(false, "h1"), (true, "h2")] {
            let started = Instant::now();
            let out = curl_output(&w, NAME, upstream.port(), http2);
            let took = started.elapsed();
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            let show = format!(
                "{end:?} {tag}: curl {:?}, after {took:?}\n{}\n{body}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("ABTEST status=200"),
                "{show}"
            );
            // What the upstream sent before its end arrived, at once.
            for i in 0..EVENTS - 1 {
                assert!(body.contains(&event(i)), "{show}");
            }
            assert!(took < Duration::from_secs(10), "{show}");
            if end == End::CloseDelimited {
                assert!(out.status.success(), "a whole stream: {show}");
                assert!(body.ends_with(LAST_EVENT), "{show}");
            } else {
                // An error (a chunked body without its last chunk, an h2 stream reset), not a
                // complete reply and not curl's own timeout.
                let code = out.status.code();
                assert!(code.is_some_and(|c| c != 0 && c != 28), "{show}");
                assert!(!body.contains(LAST_EVENT), "{show}");
            }
        }
    }
    // One record per stream: the cut ones say the upstream failed, and why; the whole ones
    // do not.
    let records = poll_until(WAIT, || {
        let done: Vec<_> = w
            .broker
            .audit_records()
            .into_iter()
            .filter(|r| {
                r.kind == Some(EventKind::Request)
                    && r.path.as_deref() == Some("/v1/thing")
                    && r.status.is_some()
            })
            .collect();
        (done.len() == 2 * ends.len()).then_some(done)
    })
    .unwrap_or_else(|| panic!("not one record per stream: {:#?}", w.broker.audit_records()));
    let cut = records
        .iter()
        .filter(|r| r.side == Some(Side::Upstream) && r.reason.is_some() && r.bytes_out > 0)
        .count();
    assert_eq!(cut, 2 * (ends.len() - 1), "{records:#?}");
    let seen = upstream.seen();
    assert_eq!(
        seen.len(),
        2 * ends.len(),
        "one connection per stream: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.authorization_sha256.as_deref() == Some(w.injected_hash().as_str())),
        "every stream carried the key: {seen:?}"
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn pooled_connections_the_upstream_evicts_under_load_cost_no_call() {
    use agent_broker_tests::scripted::{ScriptedUpstream, Step};
    const NAME: &str = "evicting.example.test";
    const AGENTS: usize = 4;
    const CALLS: usize = 25;
    // Every upstream connection answers three requests, then closes under the fourth: the
    // pooled connection brokerd picks for it is gone once the request is on its way.
    let ca = TestCa::new("abtest upstream CA");
    let upstream = ScriptedUpstream::start(api_ip(), vec![Step::keep_alive(&ca, &[NAME], 3)]);
    let w = scripted_world(ca, NAME, upstream.port());
    let port = upstream.port();
    let outputs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..AGENTS)
            .map(|_| {
                let w = &w;
                scope.spawn(move || {
                    // One curl per agent: CALLS requests on one keep-alive connection.
                    let mut argv: Vec<String> = [
                        "curl",
                        "-sS",
                        "--noproxy",
                        "*",
                        "--max-time",
                        "60",
                        "--http1.1",
                        "-w",
                        "%{stderr}ABTEST status=%{http_code}\\n",
                        "--resolve",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    argv.push(format!("{NAME}:{port}:{}", api_ip()));
                    argv.extend(
                        (0..CALLS).map(|i| format!("https://{NAME}:{port}/v1/thing?i={i}")),
                    );
                    clients::run_in_cgroup(
                        &w.broker,
                        &w.agent,
                        "curl",
                        &w.trust().var("curl"),
                        &argv,
                    )
                    .output
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| panic!("a curl thread panicked"))
            })
            .collect()
    });
    for out in &outputs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ok = stderr.matches("ABTEST status=200").count();
        assert_eq!(ok, CALLS, "every call succeeds: {stderr}");
    }
    let seen = poll_until(WAIT, || {
        let seen = upstream.seen();
        (seen.iter().filter(|s| s.answered).count() >= AGENTS * CALLS).then_some(seen)
    })
    .unwrap_or_else(|| {
        panic!(
            "the upstream did not answer every call: {:?}",
            upstream.seen()
        )
    });
    let answered = seen.iter().filter(|s| s.answered).count();
    let dropped = seen
        .iter()
        .filter(|s| s.request.is_some() && !s.answered)
        .count();
    assert_eq!(
        answered,
        AGENTS * CALLS,
        "each call answered once: {seen:?}"
    );
    assert!(
        dropped >= AGENTS * CALLS / 4 - AGENTS,
        "the upstream evicted connections under requests ({dropped} times)"
    );
    assert!(
        seen.iter()
            .filter(|s| s.request.is_some())
            .all(|s| s.authorization_sha256.as_deref() == Some(w.injected_hash().as_str())),
        "every request carried the key"
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn an_upstream_tls_alert_is_a_502_that_names_it_and_nothing_is_sent() {
    use agent_broker_tests::scripted::{ScriptedUpstream, Step};
    const NAME: &str = "alerting.example.test";
    let upstream = ScriptedUpstream::start(api_ip(), vec![Step::Alert]);
    let w = scripted_world(TestCa::new("abtest upstream CA"), NAME, upstream.port());
    let (body, stderr) = curl_to(&w, NAME, upstream.port());
    assert!(stderr.contains("ABTEST status=502"), "{stderr}\n{body}");
    assert!(
        body.to_ascii_lowercase().contains("handshake"),
        "the reason names the alert: {body}"
    );
    let record = w.broker.wait_record("the 502's record", WAIT, |r| {
        r.kind == Some(EventKind::Request) && r.status == Some(502)
    });
    assert_eq!(record.side, Some(Side::Upstream), "{record:?}");
    assert!(upstream.seen().iter().all(|s| s.request.is_none()));
    w.assert_no_secret_in_logs();
}

#[test]
fn a_certificate_that_changes_between_connections_is_refused_on_the_new_one() {
    use agent_broker_tests::scripted::{ScriptedUpstream, Step};
    const NAME: &str = "changing.example.test";
    let trusted = TestCa::new("abtest upstream CA");
    let stranger = TestCa::new("abtest CA nobody trusts");
    let upstream = ScriptedUpstream::start(
        api_ip(),
        vec![
            Step::serve(&trusted, &[NAME]),
            Step::serve(&stranger, &[NAME]),
        ],
    );
    let w = scripted_world(trusted, NAME, upstream.port());
    // The first connection's certificate verifies: the call goes, with the key.
    let (body, stderr) = curl_to(&w, NAME, upstream.port());
    assert!(stderr.contains("ABTEST status=200"), "{stderr}\n{body}");
    // The upstream closed it; the next connection presents another CA's certificate for the
    // same name: refused before anything is sent, the key included.
    let (body, stderr) = curl_to(&w, NAME, upstream.port());
    assert!(stderr.contains("ABTEST status=502"), "{stderr}\n{body}");
    assert!(
        body.contains("certificate") || body.contains("UnknownIssuer"),
        "the reason names the certificate: {body}"
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0].authorization_sha256.as_deref(),
        Some(w.injected_hash().as_str()),
        "the first connection got the key"
    );
    assert_eq!(
        seen[1].request, None,
        "nothing went over the second: {seen:?}"
    );
    let record = w.broker.wait_record("the 502's record", WAIT, |r| {
        r.kind == Some(EventKind::Request) && r.status == Some(502)
    });
    assert_eq!(record.side, Some(Side::Upstream), "{record:?}");
    w.assert_no_secret_in_logs();
}

/// Unmounts what a test mounted over brokerd's state directory, after brokerd is gone
/// (declared before the world, so it drops after it).
struct Unmount(std::sync::Mutex<Option<std::path::PathBuf>>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(dir) = self.0.lock().ok().and_then(|mut d| d.take()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&dir)
                .status();
        }
    }
}

fn mount(args: &[&str]) {
    let out = std::process::Command::new("mount")
        .args(args)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A world whose brokerd keeps its state (vault, CA, audit log) on a small tmpfs of its own.
fn world_on_tmpfs(unmount: &Unmount, args: &[&str]) -> World {
    World::with_setup(
        TestCa::new("abtest upstream CA"),
        args,
        |broker| {
            let dir = broker.state_dir();
            let dir_s = dir.display().to_string();
            mount(&[
                "-t",
                "tmpfs",
                "-o",
                "size=16m,mode=0700",
                "abtest-state",
                &dir_s,
            ]);
            if let Ok(mut d) = unmount.0.lock() {
                *d = Some(dir);
            }
        },
        |cg, api| {
            vec![(
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            )]
        },
    )
}

/// Fills the state directory's file system to the last byte; the filler's path.
fn fill(w: &World) -> std::path::PathBuf {
    let filler = w.broker.state_dir().join("abtest-filler");
    let mut file = std::fs::File::create(&filler).expect("create the filler");
    let block = vec![0u8; 64 * 1024];
    loop {
        use std::io::Write as _;
        if file.write_all(&block).is_err() {
            break;
        }
    }
    // The last partial block, byte by byte in small pieces.
    loop {
        use std::io::Write as _;
        if file.write_all(&[0u8; 512]).is_err() {
            break;
        }
    }
    let _ = file.sync_all();
    filler
}

fn status_of(w: &World, path: &str) -> String {
    let run = clients::run_in_cgroup(
        &w.broker,
        &w.agent,
        "curl",
        &w.trust().var("curl"),
        &curl_args(w, path, false),
    );
    let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
    let status = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ABTEST status="))
        .unwrap_or("none")
        .to_string();
    format!("{status} {}", String::from_utf8_lossy(&run.output.stdout))
}

#[test]
fn an_audit_disk_that_is_full_refuses_calls_until_space_returns_and_nothing_is_corrupted() {
    let unmount = Unmount(std::sync::Mutex::new(None));
    let w = world_on_tmpfs(&unmount, &[]);
    assert!(status_of(&w, "/hash?n=1").starts_with("200"));
    let filler = fill(&w);
    // The next commit fails; from then on calls are refused, saying why.
    let refused = poll_until(WAIT, || {
        let got = status_of(&w, "/hash?n=2");
        got.starts_with("503").then_some(got)
    })
    .unwrap_or_else(|| panic!("calls were never refused\n{}", w.broker.log()));
    assert!(refused.contains("audit log cannot be written"), "{refused}");
    let error = w.broker.status().audit_error.unwrap_or_default();
    assert!(!error.is_empty(), "status names the audit error");
    // Space returns: the queued records commit, calls go again.
    std::fs::remove_file(&filler).expect("free the space");
    poll_until(WAIT, || {
        status_of(&w, "/hash?n=3").starts_with("200").then_some(())
    })
    .unwrap_or_else(|| panic!("calls did not resume\n{}", w.broker.log()));
    assert_eq!(w.broker.status().audit_error, None);
    let verified = w.broker.ctl_ok(&["logs", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
    // The call made before the disk went read-only is on record.
    w.broker.wait_record("the first call", WAIT, |r| {
        r.kind == Some(EventKind::Request)
            && r.status == Some(200)
            && r.path.as_deref() == Some("/hash")
    });
}

#[test]
fn with_audit_unwritable_continue_calls_go_on_and_the_log_recovers() {
    let unmount = Unmount(std::sync::Mutex::new(None));
    let w = world_on_tmpfs(&unmount, &["--audit-unwritable", "continue"]);
    assert!(status_of(&w, "/hash").starts_with("200"));
    let filler = fill(&w);
    // Calls whose records need space make the commit fail.
    poll_until(WAIT, || {
        let _ = status_of(&w, "/hash");
        w.broker.status().audit_error.map(|_| ())
    })
    .unwrap_or_else(|| panic!("the audit error was not reported\n{}", w.broker.log()));
    for _ in 0..3 {
        assert!(status_of(&w, "/hash").starts_with("200"));
    }
    std::fs::remove_file(&filler).expect("free the space");
    poll_until(WAIT, || {
        w.broker.status().audit_error.is_none().then_some(())
    })
    .unwrap_or_else(|| panic!("the audit log did not recover\n{}", w.broker.log()));
    let verified = w.broker.ctl_ok(&["logs", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
}

/// A world whose brokerd keeps its state on a small ext4 file system of its own (a loop
/// device over an image file beside the state dir), mounted `errors=remount-ro`; the image.
fn world_on_ext4(unmount: &Unmount) -> (World, std::path::PathBuf) {
    let image = std::sync::Mutex::new(None);
    let w = World::with_setup(
        TestCa::new("abtest upstream CA"),
        &[],
        |broker| {
            let dir = broker.state_dir();
            let img = dir.with_extension("img");
            run_ok("truncate", &["-s", "32M", &img.display().to_string()]);
            run_ok("mkfs.ext4", &["-q", &img.display().to_string()]);
            mount_ext4(&img, &dir);
            if let Ok(mut d) = unmount.0.lock() {
                *d = Some(dir);
            }
            if let Ok(mut i) = image.lock() {
                *i = Some(img);
            }
        },
        |cg, api| {
            vec![(
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            )]
        },
    );
    let img = image.lock().ok().and_then(|mut i| i.take()).expect("image");
    (w, img)
}

fn mount_ext4(img: &std::path::Path, dir: &std::path::Path) {
    mount(&[
        "-t",
        "ext4",
        "-o",
        "loop,errors=remount-ro",
        &img.display().to_string(),
        &dir.display().to_string(),
    ]);
    // The state dir's own mode, which mkfs gave the root of the new file system.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("state dir mode");
}

fn run_ok(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_audit_disk_that_turns_read_only_refuses_calls_and_the_log_survives_intact() {
    let unmount = Unmount(std::sync::Mutex::new(None));
    let (mut w, img) = world_on_ext4(&unmount);
    for n in 0..3 {
        assert!(status_of(&w, &format!("/hash?n={n}")).starts_with("200"));
    }
    // Each call's closing record is committed (a call's records can trail its reply by a
    // group commit).
    let completed = |records: &[AuditEvent]| {
        records
            .iter()
            .filter(|r| {
                r.kind == Some(EventKind::Request)
                    && r.status == Some(200)
                    && r.path.as_deref() == Some("/hash")
            })
            .count()
    };
    let before = poll_until(WAIT, || {
        let records = w.broker.audit_records();
        (completed(&records) == 3).then_some(records.len())
    })
    .expect("the three calls' records are committed");
    // The file system fails and the kernel turns it read-only under brokerd, open files and
    // all (ext4's errors=remount-ro; a plain `remount,ro` is refused while files are open for
    // writing).
    let state = w.broker.state_dir();
    let device = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*state.display().to_string()))
        .and_then(|l| l.split(" - ").nth(1)?.split(' ').nth(1).map(str::to_string))
        .expect("the state dir's device");
    let name = device.trim_start_matches("/dev/");
    std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1")
        .expect("trigger an ext4 error");
    let refused = poll_until(WAIT, || {
        let got = status_of(&w, "/hash?n=ro");
        got.starts_with("503").then_some(got)
    })
    .unwrap_or_else(|| panic!("calls were never refused\n{}", w.broker.log()));
    assert!(refused.contains("audit log cannot be written"), "{refused}");
    let error = w.broker.status().audit_error.unwrap_or_default();
    assert!(error.to_lowercase().contains("read-only"), "{error}");
    // The operator's way back: stop brokerd, repair the file system, start again. Every
    // record committed before the failure is there and the chain verifies.
    assert!(w.broker.stop().is_some(), "brokerd did not stop on SIGTERM");
    run_ok("umount", &[&state.display().to_string()]);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fy", &img.display().to_string()])
        .output()
        .expect("e2fsck");
    // 0: clean, 1: errors corrected.
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    mount_ext4(&img, &state);
    w.broker.restart();
    let verified = w.broker.ctl_ok(&["logs", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
    let after = w.broker.audit_records();
    assert!(
        after.len() >= before,
        "{} records before, {} after",
        before,
        after.len()
    );
    assert_eq!(
        completed(&after),
        3,
        "the calls before the failure are on record"
    );
    assert!(status_of(&w, "/hash?n=after").starts_with("200"));
}

#[test]
fn a_vault_file_replaced_while_brokerd_runs_refuses_writes_and_calls_go_on() {
    let w = World::new();
    let path = w.broker.state_dir().join("vault.redb");
    let moved = w.broker.state_dir().join("vault.redb.moved");
    std::fs::rename(&path, &moved).expect("move the vault away");
    std::fs::copy(&moved, &path).expect("put a copy in its place");
    // A write would go to the file brokerd opened, which the path no longer names: refused.
    let out = w.broker.ctl_output_with_stdin(
        &["secret", "set", "ABTEST_OTHER"],
        b"abtest-value-not-a-key",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was replaced") && err.contains("restart brokerd"),
        "{err}"
    );
    // The calls go on with what brokerd holds.
    assert!(status_of(&w, "/hash").starts_with("200"));
    w.assert_no_secret_in_logs();
}

#[test]
fn a_credential_stops_going_to_an_address_once_the_name_no_longer_resolves_to_it() {
    // A name the test API's certificate covers, so only the address is in question.
    const FLIP: &str = agent_broker_tests::world::OTHER;
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}",
                cg.child("agent"),
                rule(FLIP, api.port(), true)
            ),
        )]
    });
    let port = w.api.port();
    w.broker.set_name(FLIP, &[api_ip()], 1);
    let call = |what: &str| {
        let argv: Vec<String> = [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "-w",
            "%{stderr}ABTEST status=%{http_code}\\n",
            "--resolve",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("{FLIP}:{port}:{}", api_ip()),
            format!("https://{FLIP}:{port}/hash?{what}"),
        ])
        .collect();
        let run =
            clients::run_in_cgroup(&w.broker, &w.agent, "curl", &w.trust().var("curl"), &argv);
        String::from_utf8_lossy(&run.output.stderr).into_owned()
    };
    let delivered = || {
        w.api
            .requests()
            .iter()
            .filter(|r| r.header_hash("authorization") == Some(&w.injected_hash()))
            .count()
    };
    assert!(call("before").contains("ABTEST status=200"));
    assert_eq!(delivered(), 1);
    // The name moves to another address; the agent keeps dialing the old one. Once what
    // brokerd knew of the name expires (its TTL, at least 5 s), the key no longer goes there.
    w.broker
        .set_name(FLIP, &["127.0.0.9".parse().expect("ip")], 1);
    let refused = poll_until(Duration::from_secs(20), || {
        let got = call("after");
        got.contains("ABTEST status=403").then_some(got)
    })
    .unwrap_or_else(|| panic!("the key kept going to the old address\n{}", w.broker.log()));
    assert!(refused.contains("403"), "{refused}");
    let before_back = delivered();
    // And back: the address is the name's again, and the key goes.
    w.broker.set_name(FLIP, &[api_ip()], 1);
    poll_until(Duration::from_secs(20), || {
        call("back").contains("ABTEST status=200").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the name's address was not proven again\n{}",
            w.broker.log()
        )
    });
    assert_eq!(delivered(), before_back + 1);
    w.assert_no_secret_in_logs();
}

/// Processes whose command line mentions `needle` (brokerd's state dir: only the brokerd this
/// test started has it).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

#[test]
fn sigterm_to_cargo_xtask_run_stops_the_brokerd_it_started() {
    agent_broker_tests::require_privileges();
    // `cargo xtask run -- ARGS` as an operator types it, from the workspace: cargo runs xtask,
    // which builds (nothing to do after `cargo xtask build`) and then becomes brokerd, so the
    // pid the operator's shell or service manager holds is brokerd's own.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // From a shell's environment: without what `cargo test` sets for this test, which would make
    // cargo build everything again.
    let kept = [
        "CARGO_HOME",
        "CARGO_TERM_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTR",
    ];
    let unset: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .filter(|name| {
            (name.starts_with("CARGO") && !kept.iter().any(|k| name.starts_with(k)))
                || name.starts_with("RUSTC")
                || name.starts_with("RUSTFLAGS")
                || name.starts_with("RUSTDOCFLAGS")
                || name == "LD_LIBRARY_PATH"
        })
        .collect();
    // Built first, untimed: a test run may have left brokerd built with other features.
    let mut build = std::process::Command::new(&cargo);
    for name in &unset {
        build.env_remove(name);
    }
    let built = build
        .args(["xtask", "build"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo xtask build: {e}"));
    assert!(
        built.status.success(),
        "cargo xtask build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    // `env` execs cargo, so the pid stays the one the harness started.
    let mut command: Vec<std::ffi::OsString> = vec!["env".into()];
    for name in &unset {
        command.extend(["-u".into(), name.into()]);
    }
    command.extend([cargo, "xtask".into(), "run".into(), "--".into()]);
    let mut broker = agent_broker_tests::Broker::builder()
        .command(&command)
        .start();
    // The harness waited until `status` answered with the pid it started: cargo's.
    let pid = broker.status().pid;
    let state_dir = broker.state_dir().display().to_string();
    assert_eq!(processes_mentioning(&state_dir), vec![pid]);
    let exited = broker.stop();
    let status = exited.unwrap_or_else(|| {
        panic!(
            "`cargo xtask run` ignored SIGTERM for 10 s and was killed; brokerd's log:\n{}",
            broker.log()
        )
    });
    assert!(
        status.success(),
        "{status}; brokerd's log:\n{}",
        broker.log()
    );
    assert!(
        processes_mentioning(&state_dir).is_empty(),
        "still running after SIGTERM: {:?}",
        processes_mentioning(&state_dir)
    );
    assert!(
        !broker
            .run_dir()
            .join(agent_broker_protocol::SOCKET_NAME)
            .exists(),
        "the control socket outlived brokerd"
    );
}
