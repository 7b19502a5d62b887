//! Issue 17.2, HTTP/1.1: request smuggling, oversized heads, slow agents and `Expect`, from
//! inside an agent cgroup through the kernel's redirect, by `tests/src/attacker.py` (raw bytes
//! over TLS).
//!
//! Each attack is checked four ways ([`attacker::attack`]): the attacker gets an error or a
//! bounded answer, brokerd's RSS and task count stay bounded, the other agent's call made
//! meanwhile is served with its key, and the audit log records the attacker with the reason
//! (for an attack answered as a request, the record of that request). Smuggling is judged
//! from the upstream's side too: what reaches it is what brokerd parsed and framed again.
//!
//! brokerd runs with `--agent-header-timeout 2` and the attacker's rule with
//! `idle_timeout = "2s"`, so the slow attacks take seconds, not minutes.
//!
//! Needs root, cgroup v2 and BPF, python3 (/usr/bin/python3) and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test attacks_http1 -- --test-threads=1`.

use agent_broker_protocol::Side;
use agent_broker_tests::{
    attacker::{self, attack},
    world::World,
};

/// How far brokerd's RSS may grow during one attack.
const RSS_GROWTH: u64 = 64 << 20;

fn world() -> World {
    attacker::world(&["--agent-header-timeout", "2"], "idle_timeout = \"2s\"")
}

fn statuses(report: &serde_json::Value) -> Vec<String> {
    report["statuses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What reached the upstream of the attacker's requests (they ask for `/v1/attacker`, the
/// victim for `/hash`), oldest first.
fn attacker_requests(w: &World) -> Vec<agent_broker_tests::UpstreamRequest> {
    w.api
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/attacker") || r.path.starts_with("/v1/smuggled"))
        .collect()
}

/// A request the parser refuses: 400 (or `status`), the connection closed, nothing of it
/// upstream, and a record naming why.
fn refused(w: &World, name: &str, status: &str, reason: &str) {
    let upstream_before = attacker_requests(w).len();
    attack(w, name, &["linger=3"], RSS_GROWTH, reason, |r| {
        assert_eq!(statuses(r), vec![status.to_string()], "{name}: {r}");
        assert_eq!(r["closed"], true, "{name}: {r}");
    });
    assert_eq!(
        attacker_requests(w).len(),
        upstream_before,
        "{name}: nothing may reach the upstream"
    );
}

#[test]
fn smuggling_attempts_are_refused_or_reframed() {
    let w = world();
    let attacker = attacker::attacker_cgroup(&w);

    // CL.TE: the body is read as chunked (Content-Length dropped), and the connection closes
    // after the answer: what followed the last chunk is never read as a request.
    let seq = attacker::last_seq(&w.broker);
    attack(&w, "h1-cl-te", &["linger=2"], RSS_GROWTH, "", |r| {
        assert_eq!(statuses(r), vec!["200".to_string()], "one answer: {r}");
        assert_eq!(r["closed"], true, "{r}");
    });
    let forwarded: Vec<_> = attacker_requests(&w);
    assert_eq!(forwarded.len(), 1, "{forwarded:#?}");
    let r = &forwarded[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/attacker")
    );
    assert!(
        !(r.header_sha256.contains_key("content-length")
            && r.header_sha256.contains_key("transfer-encoding")),
        "the upstream never gets both framings: {r:?}"
    );
    assert_eq!(r.body_len, 0, "{r:?}");
    assert_eq!(r.peer_owner, Some(w.broker.pid()));
    // The request is the attacker's in the log; nothing of the smuggled one.
    let paths: Vec<_> = w
        .broker
        .audit_records()
        .into_iter()
        .filter(|r| r.seq > seq && r.cgroup.as_deref() == Some(attacker.as_str()))
        .filter_map(|r| r.path)
        .collect();
    assert!(
        paths.contains(&"/v1/attacker".to_string()) && !paths.contains(&"/v1/smuggled".to_string()),
        "{paths:?}"
    );

    // TE.CL: Transfer-Encoding wins; the upstream gets the chunked body's 5 bytes.
    attack(&w, "h1-te-cl", &["linger=2"], RSS_GROWTH, "", |r| {
        assert_eq!(statuses(r), vec!["200".to_string()], "{r}");
        assert_eq!(r["closed"], true, "{r}");
    });
    let forwarded = attacker_requests(&w);
    assert_eq!(forwarded.len(), 2, "{forwarded:#?}");
    assert_eq!(forwarded[1].body_len, 5, "{forwarded:#?}");

    refused(
        &w,
        "h1-te-not-chunked",
        "400",
        "malformed HTTP/1.1 request (400)",
    );
    refused(
        &w,
        "h1-duplicate-cl",
        "400",
        "malformed HTTP/1.1 request (400)",
    );
    refused(&w, "h1-obs-fold", "400", "malformed HTTP/1.1 request (400)");
    refused(&w, "h1-bare-cr", "400", "malformed HTTP/1.1 request (400)");

    // Bare LF line ends are read as line ends; the upstream gets a well-formed request.
    attack(&w, "h1-bare-lf", &["linger=2"], RSS_GROWTH, "", |r| {
        assert_eq!(statuses(r), vec!["200".to_string()], "{r}");
    });
}

#[test]
fn oversized_heads_get_431_and_slow_agents_are_cut_at_their_deadlines() {
    let w = world();

    refused(
        &w,
        "h1-huge-header",
        "431",
        "request head over 64 KiB or over 100 header fields",
    );
    refused(
        &w,
        "h1-many-headers",
        "431",
        "request head over 64 KiB or over 100 header fields",
    );

    // Slowloris: a head a byte every 250 ms is cut at the 2 s deadline.
    attack(
        &w,
        "h1-slowloris",
        &["gap=0.25", "linger=1"],
        RSS_GROWTH,
        "no complete HTTP/1.1 request head within 2s",
        |r| {
            assert_eq!(r["all_sent"], false, "cut before the head was sent: {r}");
            let elapsed = r["elapsed"].as_f64().unwrap_or(0.0);
            assert!((1.5..10.0).contains(&elapsed), "cut after {elapsed} s: {r}");
        },
    );

    // A body that stops: 400 at the rule's 2 s idle deadline, the agent's failure.
    let (_, record) = attack(
        &w,
        "h1-slow-body",
        &["linger=5"],
        RSS_GROWTH,
        "sent nothing of its request body for 2s",
        |r| {
            assert_eq!(statuses(r), vec!["400".to_string()], "{r}");
            let elapsed = r["elapsed"].as_f64().unwrap_or(0.0);
            assert!(elapsed < 10.0, "{r}");
        },
    );
    assert_eq!(record.side, Some(Side::Agent), "{record:?}");
    assert_eq!(record.status, Some(400), "{record:?}");

    // A lying Content-Length: 10 promised, 4 sent, then the agent's side closes.
    let (_, record) = attack(
        &w,
        "h1-short-body",
        &["linger=3"],
        RSS_GROWTH,
        "the agent's request body failed",
        |r| {
            assert!(
                statuses(&r["after_close"]).iter().all(|s| s == "400"),
                "{r}"
            );
        },
    );
    assert_eq!(record.side, Some(Side::Agent), "{record:?}");

    // A slow reader: 200 MB it does not read. brokerd holds no more than its buffers.
    attack(
        &w,
        "h1-slow-read",
        &["rcvbuf=4096", "noread=4", "linger=0.1"],
        RSS_GROWTH,
        "the agent went away",
        |r| assert!(r["received"].as_u64().unwrap_or(0) < 64 << 20, "{r}"),
    );
    assert!(
        w.api.bulk_sent().is_empty(),
        "the upstream could not send it all: {:?}",
        w.api.bulk_sent()
    );

    // Expect: 100-continue gets its 100, then the answer.
    attack(
        &w,
        "h1-expect-continue",
        &["linger=2"],
        RSS_GROWTH,
        "",
        |r| {
            assert_eq!(
                statuses(r),
                vec!["100".to_string(), "200".to_string()],
                "{r}"
            );
        },
    );
    // An expectation brokerd does not know: an answer, not a hang.
    attack(
        &w,
        "h1-expect-unknown",
        &["linger=2"],
        RSS_GROWTH,
        "",
        |r| {
            assert_eq!(statuses(r).len(), 1, "{r}");
        },
    );
}
