//! Issue 17.2, HTTP/2: protocol attacks on brokerd's agent side, from inside an agent cgroup
//! through the kernel's redirect, by `tests/src/attacker.py` (raw frames over TLS).
//!
//! Each attack is checked four ways ([`attacker::attack`]): the attacker gets an error or a
//! bounded answer (GOAWAY ENHANCE_YOUR_CALM for floods, a refused stream past the concurrency
//! limit), brokerd's RSS and task count stay bounded, the other agent's call made meanwhile is
//! served with its key, and the audit log records the attacker's connection with the reason.
//!
//! Needs root, cgroup v2 and BPF, python3 (/usr/bin/python3) and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test attacks_h2 -- --test-threads=1`.

use agent_broker_tests::attacker::{self, attack};

/// GOAWAY and RST_STREAM error codes (RFC 9113, 7).
const FLOW_CONTROL_ERROR: u64 = 0x3;
const REFUSED_STREAM: &str = "7";
const ENHANCE_YOUR_CALM: u64 = 0xb;

/// How far brokerd's RSS may grow during one attack.
const RSS_GROWTH: u64 = 64 << 20;

fn goaway_code(report: &serde_json::Value) -> Option<u64> {
    report["goaway"]["code"].as_u64()
}

#[test]
fn http2_floods_end_in_goaway_and_leave_brokerd_bounded() {
    let w = attacker::world(&[], "");

    // Rapid Reset (CVE-2023-44487): streams opened and reset at once, 2000 of them.
    let (report, _) = attack(
        &w,
        "h2-rapid-reset",
        &["n=2000", "linger=3"],
        RSS_GROWTH,
        "GOAWAY ENHANCE_YOUR_CALM",
        |r| {
            assert_eq!(goaway_code(r), Some(ENHANCE_YOUR_CALM), "rapid reset: {r}");
            assert_eq!(r["closed"], true, "rapid reset: {r}");
        },
    );
    // brokerd stopped the connection long before the last stream.
    let last = report["goaway"]["last_stream"].as_u64().unwrap_or(u64::MAX);
    assert!(last < 2 * 2000, "rapid reset: {report}");
    // Few of them reached the upstream.
    let slow = w
        .api
        .requests()
        .iter()
        .filter(|r| r.path == "/attack/slow")
        .count();
    assert!(slow < 2000, "{slow} reset requests reached the upstream");

    // MadeYouReset (CVE-2025-8671): streams brokerd itself must reset (a WINDOW_UPDATE past
    // the largest window).
    attack(
        &w,
        "h2-made-you-reset",
        &["n=500", "linger=3"],
        RSS_GROWTH,
        "GOAWAY ENHANCE_YOUR_CALM",
        |r| {
            assert_eq!(
                goaway_code(r),
                Some(ENHANCE_YOUR_CALM),
                "made you reset: {r}"
            );
            let resets: u64 = r["rst"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
                .unwrap_or(0);
            assert!(
                resets <= 101,
                "at most the limit of resets before GOAWAY: {r}"
            );
        },
    );

    // A CONTINUATION flood: a header block that never ends, 20 MB of it.
    attack(
        &w,
        "h2-continuation-flood",
        &["bytes=20000000", "linger=3"],
        RSS_GROWTH,
        "GOAWAY",
        |r| {
            assert!(
                goaway_code(r).is_some_and(|c| c != 0),
                "continuation flood: {r}"
            );
            assert_eq!(r["all_sent"], false, "cut before the flood was sent: {r}");
        },
    );

    // An HPACK bomb: 4 KB in the dynamic table, referred to 16000 times (64 MB decoded).
    attack(
        &w,
        "h2-hpack-bomb",
        &["refs=16000", "linger=3"],
        RSS_GROWTH,
        "GOAWAY ENHANCE_YOUR_CALM",
        |r| {
            assert_eq!(goaway_code(r), Some(ENHANCE_YOUR_CALM), "hpack bomb: {r}");
            assert_eq!(r["responses"], 0, "no request came of it: {r}");
        },
    );

    // A window-update flood: 200000 WINDOW_UPDATE frames cost brokerd nothing it keeps (it
    // still answers a PING after them), and one past 2^31-1 ends the connection.
    attack(
        &w,
        "h2-window-update",
        &["n=200000", "linger=3"],
        RSS_GROWTH,
        "GOAWAY FLOW_CONTROL_ERROR",
        |r| {
            assert_eq!(r["ping_acks"], 1, "window-update flood: {r}");
            assert_eq!(
                goaway_code(r),
                Some(FLOW_CONTROL_ERROR),
                "window-update flood: {r}"
            );
        },
    );
}

#[test]
fn http2_stream_and_data_floods_get_bounded_answers() {
    let w = attacker::world(&[], "");

    // 150 concurrent streams where brokerd allows 100: the 50 past it are refused, the 100
    // answered.
    let (_, record) = attack(
        &w,
        "h2-streams",
        &["n=150", "ms=1500", "expect=100", "linger=30"],
        RSS_GROWTH,
        "",
        |r| {
            assert_eq!(
                r["settings"]["3"], 100,
                "SETTINGS_MAX_CONCURRENT_STREAMS: {r}"
            );
            assert_eq!(r["responses"], 100, "100 answered: {r}");
            assert_eq!(r["rst"][REFUSED_STREAM], 50, "50 refused: {r}");
            assert!(r["goaway"].is_null(), "{r}");
        },
    );
    // The answered ones are audited as the attacker's requests.
    assert_eq!(record.path.as_deref(), Some("/attack/slow"), "{record:?}");
    // 300: past 100 refused streams (each a reset brokerd sends), GOAWAY.
    attack(
        &w,
        "h2-streams",
        &["n=300", "ms=1500", "linger=4"],
        RSS_GROWTH,
        "GOAWAY ENHANCE_YOUR_CALM",
        |r| {
            assert_eq!(goaway_code(r), Some(ENHANCE_YOUR_CALM), "{r}");
            assert_eq!(r["rst"][REFUSED_STREAM], 100, "{r}");
        },
    );

    // 200000 empty DATA frames on one request: h2 counts them, and ends the connection.
    attack(
        &w,
        "h2-empty-data",
        &["n=200000", "linger=3"],
        RSS_GROWTH,
        "GOAWAY ENHANCE_YOUR_CALM",
        |r| {
            assert_eq!(
                goaway_code(r),
                Some(ENHANCE_YOUR_CALM),
                "empty DATA flood: {r}"
            );
            // (Its 1.8 MB may all fit in the sockets' buffers before the GOAWAY comes.)
            assert_eq!(r["responses"], 0, "{r}");
        },
    );
}
