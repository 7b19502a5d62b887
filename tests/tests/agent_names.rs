//! Issue 14, part 2: stable agent names (`brokerctl attach --cgroup PATH --as NAME`).
//!
//! A workload's cgroup sits at a path a container runtime chose (here
//! `<test cgroup>/libpod_parent/libpod-<random>`); the policy files are written for the name
//! `agents/named`. Real curl clients in that cgroup, and in a sub-cgroup below it, call the test
//! API through brokerd: the key is injected under the name's policy, the sub-agent is narrowed
//! by the policy file of `agents/named/sub`, the audit records name the agent and carry the
//! real cgroup path, `status` shows both, and all of it still holds after brokerd restarts.
//! Detach removes the name. A second test covers the refusals: another name for a tagged
//! cgroup, names that nest, and invalid names.
//!
//! Oracles: the client's HTTP status and brokerd's 403 body (`agent`); the sha256 of the
//! Authorization the test API received (never the value); `brokerctl status --json`,
//! `brokerctl logs --json`, `brokerctl connections --json`; brokerctl's exit status and
//! messages; the bpffs pin directory. Secrets are random canaries, never printed.
//!
//! Needs root, cgroup v2, BPF and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test agent_names -- --test-threads=1`.

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use agent_broker_protocol::{AuditEvent, EventKind, Request, RequestOutcome, Response};
use agent_broker_tests::{
    agent::agent_python,
    clients::{self, Call, ClientRun, HttpReport},
    poll_until, redact, spawn_in_cgroup, wait_with_timeout,
    world::{API, SECRET_NAME, World, rule},
};

/// A name no policy allows.
const UNALLOWED: &str = "exfil.example.test";

const NAME: &str = "agents/named";
const SUB_NAME: &str = "agents/named/sub";

/// An unpredictable runtime-style cgroup below the test cgroup, and a sub-cgroup below it.
fn runtime_cgroup(w: &World) -> (String, String) {
    let rel = format!("libpod_parent/libpod-{:016x}", rand_id());
    let runtime = w.cg.create_child(&rel);
    let sub = w.cg.create_child(&format!("{rel}/sub"));
    (runtime, sub)
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// The world: `agents/named` may GET and POST the API with the key injected; `agents/named/sub`
/// only GET /v1/models (its file narrows the parent's).
fn world() -> World {
    World::with_policies(|_, api| {
        let port = api.port();
        vec![
            (
                "named".into(),
                format!(
                    "cgroup = \"{NAME}\"\n{}methods = [\"GET\", \"POST\"]\n",
                    rule(API, port, true)
                ),
            ),
            (
                "named-sub".into(),
                format!(
                    "cgroup = \"{SUB_NAME}\"\n{}methods = [\"GET\"]\npaths = [\"/v1/models\"]\n",
                    rule(API, port, true)
                ),
            ),
        ]
    })
}

fn curl(w: &World, cgroup: &str, call: &Call) -> (ClientRun, HttpReport) {
    clients::curl(&w.broker, cgroup, &w.trust(), call)
}

/// A call from `cgroup` that must be answered by the API with `Bearer <secret>` injected.
fn assert_injected_from(w: &World, what: &str, cgroup: &str, call: &Call) -> ClientRun {
    let (run, report) = curl(w, cgroup, call);
    assert_eq!(
        report.status,
        200,
        "{what}: {}\n{}\nbrokerd's log:\n{}",
        report.show(),
        run.show(),
        w.broker.log()
    );
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(w.injected_hash().as_str()),
        "{what}: the API did not receive `Bearer <secret>`: {}",
        report.show()
    );
    run.assert_no_secret(&w.secret);
    run
}

/// Waits for the completed request record of the client run `run` and returns it.
fn completed_record(w: &World, what: &str, run: &ClientRun) -> AuditEvent {
    poll_until(Duration::from_secs(5), || {
        w.broker.audit_records().into_iter().find(|e| {
            e.pid == Some(run.pid)
                && e.kind == Some(EventKind::Request)
                && e.outcome == Some(RequestOutcome::Completed)
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "{what}: no completed request record for pid {}; records: {}\nbrokerd's log:\n{}",
            run.pid,
            redact(&format!("{:#?}", w.broker.audit_records())),
            w.broker.log()
        )
    })
}

/// The first audit record of `kind` (waiting for its group commit).
fn record_of_kind(w: &World, kind: EventKind) -> AuditEvent {
    poll_until(Duration::from_secs(5), || {
        w.broker
            .audit_records()
            .into_iter()
            .find(|e| e.kind == Some(kind))
    })
    .unwrap_or_else(|| panic!("no {kind} record\nbrokerd's log:\n{}", w.broker.log()))
}

/// The status entry of the tagged cgroup `path`, if it is tagged.
fn tagged(w: &World, path: &str) -> Option<agent_broker_protocol::TaggedCgroup> {
    w.broker
        .status()
        .cgroups
        .into_iter()
        .find(|c| c.path == path)
}

/// DNS from `cgroup`: the API's name resolves (NOERROR), an unallowed one is REFUSED, and
/// both queries are recorded under `agent` with the real cgroup path.
fn assert_dns_as(w: &World, cgroup: &str, agent: &str, when: &str) {
    let mut cmd = Command::new(agent_python());
    cmd.args([
        "-c",
        agent_broker_tests::agent::DNS_RCODES_PY,
        API,
        UNALLOWED,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = spawn_in_cgroup(cgroup, &mut cmd);
    let pid = child.id();
    let out = wait_with_timeout(child, Duration::from_secs(30), "the DNS client");
    let codes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        codes,
        ["0", "5"],
        "{when}: DNS from {cgroup} ({agent}): NOERROR for {API}, REFUSED for {UNALLOWED}; \
         stderr: {}\nbrokerd's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.broker.log()
    );
    for host in [API, UNALLOWED] {
        let record = poll_until(Duration::from_secs(5), || {
            w.broker.audit_records().into_iter().find(|e| {
                e.kind == Some(EventKind::Dns)
                    && e.pid == Some(pid)
                    && e.host.as_deref() == Some(host)
            })
        })
        .unwrap_or_else(|| panic!("{when}: no DNS record of {host} from pid {pid}"));
        assert_eq!(record.cgroup.as_deref(), Some(agent), "{when}: {record:?}");
        assert_eq!(
            record.cgroup_path.as_deref(),
            Some(cgroup),
            "{when}: {record:?}"
        );
    }
}

/// Everything a named agent's calls must show, before and after a restart.
fn assert_named_agent_works(w: &World, runtime: &str, sub: &str, when: &str) {
    assert_dns_as(w, runtime, NAME, when);
    assert_dns_as(w, sub, SUB_NAME, when);
    // The name's policy injects the key.
    let what = format!("GET from the named cgroup ({when})");
    let run = assert_injected_from(w, &what, runtime, &w.call("/v1/models"));
    let record = completed_record(w, &what, &run);
    assert_eq!(record.cgroup.as_deref(), Some(NAME), "{what}: {record:?}");
    assert_eq!(
        record.cgroup_path.as_deref(),
        Some(runtime),
        "{what}: the record keeps the real cgroup path: {record:?}"
    );
    assert_eq!(record.secrets, vec![SECRET_NAME.to_string()], "{what}");
    let conn = w.broker.wait_connection(&what, |c| {
        c.origin.as_ref().is_some_and(|o| o.pid == run.pid)
    });
    assert_eq!(
        conn.origin.as_ref().map(|o| o.cgroup.as_str()),
        Some(NAME),
        "{what}: {conn:?}"
    );

    // The sub-agent below it runs as NAME/sub and is narrowed by that name's file.
    let what = format!("POST from the sub-cgroup, whose file allows only GET ({when})");
    let before = w.api.requests().len();
    let (run, report) = curl(w, sub, &w.call("/v1/models").method("POST").body("{}"));
    let reason = report.assert_denied(SUB_NAME, &what);
    assert!(reason.contains("POST"), "{what}: {}", redact(&reason));
    run.assert_no_secret(&w.secret);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "{what}: the API received the denied request"
    );
    let what = format!("GET /v1/models from the sub-cgroup ({when})");
    let run = assert_injected_from(w, &what, sub, &w.call("/v1/models"));
    let record = completed_record(w, &what, &run);
    assert_eq!(
        record.cgroup.as_deref(),
        Some(SUB_NAME),
        "{what}: {record:?}"
    );
    assert_eq!(
        record.cgroup_path.as_deref(),
        Some(sub),
        "{what}: {record:?}"
    );
    let what = format!("GET outside the sub-agent's paths ({when})");
    let (run, report) = curl(w, sub, &w.call("/v1/files"));
    report.assert_denied(SUB_NAME, &what);
    run.assert_no_secret(&w.secret);

    // status shows the name and the cgroup.
    let t = tagged(w, runtime).unwrap_or_else(|| {
        panic!(
            "{when}: {runtime} is not in status: {:?}",
            w.broker.status()
        )
    });
    assert_eq!(t.name.as_deref(), Some(NAME), "{when}: {t:?}");
    let text = w.broker.ctl_ok(&["status"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with(NAME) && l.trim_end().ends_with(runtime)),
        "{when}: status shows a row for agent {NAME} in cgroup {runtime}:\n{text}"
    );
}

#[test]
fn a_named_cgroup_is_brokered_under_its_name_its_sub_agent_narrowed_across_a_restart() {
    let mut w = world();
    let (runtime, sub) = runtime_cgroup(&w);
    let out = w
        .broker
        .ctl_ok(&["attach", "--cgroup", &runtime, "--as", NAME]);
    assert!(
        out.contains(&runtime) && out.contains(NAME),
        "attach names the cgroup and the agent: {out}"
    );

    // The attach record names the agent and keeps the cgroup.
    let attach = record_of_kind(&w, EventKind::Attach);
    assert_eq!(attach.cgroup.as_deref(), Some(NAME), "{attach:?}");
    assert_eq!(attach.cgroup_path.as_deref(), Some(runtime.as_str()));

    assert_named_agent_works(&w, &runtime, &sub, "first start");
    // policy explain answers for the name, also when given the runtime's path.
    let url = format!("https://{API}:{}/v1/models", w.api.port());
    let by_name = w
        .broker
        .ctl_ok(&["policy", "explain", "--cgroup", SUB_NAME, "POST", &url]);
    let by_path = w
        .broker
        .ctl_output(&["policy", "explain", "--cgroup", &sub, "POST", &url]);
    assert_eq!(
        String::from_utf8_lossy(&by_path.stdout),
        by_name,
        "explain by the sub-cgroup's path is explain by its name"
    );
    // logs --cgroup finds the agent's records by its name and by its cgroup path.
    for filter in [NAME, runtime.as_str()] {
        let out = w.broker.ctl_ok(&["logs", "--json", "--cgroup", filter]);
        let records: Vec<AuditEvent> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert!(
            records.iter().any(
                |e| e.cgroup.as_deref() == Some(SUB_NAME) && e.kind == Some(EventKind::Request)
            ),
            "logs --cgroup {filter} shows the sub-agent's requests: {}",
            redact(&out)
        );
    }

    // A restart keeps the name with the tag.
    w.broker.stop();
    w.broker.restart();
    assert_named_agent_works(&w, &runtime, &sub, "after a restart");

    // Detach takes the cgroup path; given the name, it says which path that is.
    let out = w.broker.ctl_output(&["detach", "--cgroup", NAME]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&runtime),
        "detach by the agent name must fail naming the cgroup: {stderr}"
    );
    // Detach removes the tag and its name; the cgroup may then take another name.
    w.broker.ctl_ok(&["detach", "--cgroup", &runtime]);
    assert!(tagged(&w, &runtime).is_none());
    let detach = record_of_kind(&w, EventKind::Detach);
    assert_eq!(detach.cgroup.as_deref(), Some(NAME), "{detach:?}");
    assert_eq!(detach.cgroup_path.as_deref(), Some(runtime.as_str()));
    let links = w.broker.pin_dir().join("links");
    let left: Vec<_> = fs::read_dir(&links)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left after detach: {left:?}");
    w.broker
        .ctl_ok(&["attach", "--cgroup", &runtime, "--as", "agents/renamed"]);
    assert_eq!(
        tagged(&w, &runtime).and_then(|t| t.name).as_deref(),
        Some("agents/renamed")
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn another_name_for_a_tagged_cgroup_nesting_names_and_invalid_names_are_refused() {
    let w = world();
    let a = w.cg.create_child("libpod-a");
    let b = w.cg.create_child("libpod-b");
    w.broker
        .ctl_ok(&["attach", "--cgroup", &a, "--as", "agents/one"]);
    let refused = |args: &[&str], needles: &[&str]| {
        let out = w.broker.ctl_output(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "brokerctl {args:?} must fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "brokerctl {args:?}: the error should name {needle}: {stderr}"
            );
        }
    };
    // The same cgroup under another name: an error naming both.
    refused(
        &["attach", "--cgroup", &a, "--as", "agents/two"],
        &[&a, "agents/one", "agents/two"],
    );
    // The same name again is fine.
    let out = w
        .broker
        .ctl_ok(&["attach", "--cgroup", &a, "--as", "agents/one"]);
    assert!(out.contains("already tagged"), "{out}");
    // Names may not nest with another tag's: equal, below, above.
    for wanted in ["agents/one", "agents/one/x", "agents"] {
        refused(
            &["attach", "--cgroup", &b, "--as", wanted],
            &[wanted, &a, "agents/one"],
        );
    }
    // Nor with another tag's cgroup path.
    refused(
        &["attach", "--cgroup", &b, "--as", &format!("{a}/x")],
        &[&a, "agents/one", "cgroup path"],
    );
    assert!(tagged(&w, &b).is_none(), "a refused attach tags nothing");
    // A cgroup below a named tag takes its name from it.
    let a_sub = format!("{a}/sub");
    w.broker.ctl_ok(&[
        "attach",
        "--cgroup",
        &a_sub,
        "--create",
        "--as",
        "agents/one/sub",
    ]);
    refused(
        &["attach", "--cgroup", &a_sub, "--as", "agents/other"],
        &["agents/one/sub", "agents/other"],
    );
    // `brokerctl run --as`: a new cgroup is tagged under the name and CMD runs there; another
    // name for a tagged cgroup starts nothing.
    let run_cg = w.cg.child("run-agent");
    let out = w.broker.ctl_output(&[
        "run",
        "--cgroup",
        &run_cg,
        "--create",
        "--as",
        "agents/run",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "run --as: {out:?}");
    assert_eq!(
        tagged(&w, &run_cg).and_then(|t| t.name).as_deref(),
        Some("agents/run")
    );
    let out = w.broker.ctl_output(&[
        "run",
        "--cgroup",
        &a,
        "--as",
        "agents/else",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(7)
            && stderr.contains("agents/one")
            && stderr.contains("agents/else"),
        "run under another name must start nothing and name both: {out:?}"
    );
    // Invalid names, refused by brokerctl and by brokerd itself.
    for bad in ["", "/", "agents/../x", ".."] {
        refused(&["attach", "--cgroup", &b, "--as", bad], &["--as"]);
        let answer = w.broker.request(&Request::Attach {
            cgroup: b.clone(),
            create: false,
            name: Some(bad.into()),
        });
        assert!(
            matches!(answer, Response::Error { .. }),
            "brokerd must refuse the name {bad:?}: {answer:?}"
        );
    }
    // A name beside the other is fine.
    w.broker
        .ctl_ok(&["attach", "--cgroup", &b, "--as", "agents/two"]);
    assert_eq!(
        tagged(&w, &b).and_then(|t| t.name).as_deref(),
        Some("agents/two")
    );
    // Without --as the name is the path, as before.
    let c = w.cg.create_child("plain");
    w.broker.attach(&c);
    assert_eq!(tagged(&w, &c).map(|t| t.name), Some(None));
}
