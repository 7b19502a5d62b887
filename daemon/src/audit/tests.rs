use std::path::Path;
use std::time::Duration;

use agent_broker_core::{fmt::error_chain, time::now_unix_ms};
use agent_broker_protocol::{AuditEvent, Decision, EventKind, LogFilter, RequestOutcome, Side};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::tables::{Link, META, RECORDS, StoredRecord, record_hash};
use super::*;

fn fast() -> WriterConfig {
    WriterConfig {
        commit_interval: Duration::from_millis(5),
        ..WriterConfig::default()
    }
}

fn event(
    cgroup: Option<&str>,
    kind: EventKind,
    decision: Option<Decision>,
    time_ms: u64,
) -> AuditEvent {
    AuditEvent {
        time_ms,
        kind: Some(kind),
        cgroup: cgroup.map(str::to_string),
        pid: Some(4242),
        comm: Some("curl".into()),
        exe: Some("/usr/bin/curl".into()),
        original_dst: Some("127.0.0.1:443".parse().expect("addr")),
        sni: Some("api.example.test".into()),
        method: Some("GET".into()),
        host: Some("api.example.test".into()),
        path: Some("/v1/models".into()),
        status: Some(200),
        bytes_in: 10,
        bytes_out: 20,
        latency_us: Some(1234),
        decision,
        rule: Some("agents/a.toml:3 allow[0]".into()),
        secrets: vec!["OPENAI_KEY".into()],
        ..AuditEvent::default()
    }
}

/// `n` request events in `agents/a`, one ms apart.
fn requests(n: u64) -> Vec<AuditEvent> {
    (0..n)
        .map(|i| {
            event(
                Some("agents/a"),
                EventKind::Request,
                Some(Decision::Allow),
                1_000 + i,
            )
        })
        .collect()
}

/// Opens the log in `dir`, records `events`, stops the writer; returns the last seq.
fn write_events(dir: &Path, retention: Retention, events: Vec<AuditEvent>) -> u64 {
    let log = AuditLog::open(dir, retention).expect("open");
    let (handle, thread) = log.writer_with(fast()).expect("writer");
    for e in events {
        handle.record(e);
    }
    let last = handle.flush_and_stop().expect("flush and stop");
    drop(handle);
    thread
        .join()
        .expect("writer thread")
        .expect("writer result");
    last
}

fn open(dir: &Path) -> AuditLog {
    AuditLog::open(dir, Retention::KEEP_ALL).expect("open")
}

/// A copy of the log in `dir` in a new state directory.
fn copy_of(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    std::fs::copy(dir.join(AUDIT_FILE), copy.path().join(AUDIT_FILE)).expect("copy");
    copy
}

/// Edits the log in `dir` with redb directly, as someone with access to the file could.
fn tamper(dir: &Path, edit: impl FnOnce(&mut redb::Table<'_, u64, &[u8]>)) {
    let db = Database::open(dir.join(AUDIT_FILE)).expect("raw open");
    let txn = db.begin_write().expect("begin");
    {
        let mut table = txn.open_table(RECORDS).expect("table");
        edit(&mut table);
    }
    txn.commit().expect("commit");
    db.close().expect("close");
}

fn raw_record(table: &redb::Table<'_, u64, &[u8]>, seq: u64) -> Vec<u8> {
    table
        .get(seq)
        .expect("get")
        .expect("record exists")
        .value()
        .to_vec()
}

fn first_bad(dir: &Path) -> (u64, String) {
    let report = open(dir).verify().expect("verify");
    let bad = report.first_bad.expect("tampering detected");
    (bad.seq, bad.problem)
}

#[test]
fn new_log_is_private_and_empty_and_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let log = AuditLog::open(&state, Retention::KEEP_ALL).expect("open");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(log.path()), 0o600);
    assert_eq!(log.last_seq().expect("last seq"), 0);
    assert_eq!(log.query(&LogFilter::default()).expect("query"), vec![]);
    let report = log.verify().expect("verify");
    assert_eq!(report.records, 0);
    assert_eq!(report.first_bad, None);
    assert!(!state.join("audit.redb.new").exists());
}

#[test]
fn append_and_query_with_each_filter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = vec![
        event(
            Some("agents/a"),
            EventKind::Request,
            Some(Decision::Allow),
            1_000,
        ),
        event(
            Some("agents/a/sub"),
            EventKind::Denial,
            Some(Decision::Deny),
            2_000,
        ),
        event(
            Some("agents/ab"),
            EventKind::Request,
            Some(Decision::Allow),
            3_000,
        ),
        event(Some("agents/b"), EventKind::TlsFailure, None, 4_000),
        event(Some("agents/a"), EventKind::HandleMisuse, None, 5_000),
        event(
            Some("agents/a"),
            EventKind::Attach,
            Some(Decision::Allow),
            6_000,
        ),
        event(None, EventKind::PolicyReload, None, 7_000),
        event(
            Some("agents/b"),
            EventKind::Request,
            Some(Decision::Deny),
            8_000,
        ),
    ];
    assert_eq!(
        write_events(dir.path(), Retention::KEEP_ALL, events.clone()),
        8
    );
    let log = open(dir.path());
    let times = |filter: LogFilter| -> Vec<u64> {
        log.query(&filter)
            .expect("query")
            .iter()
            .map(|e| e.time_ms)
            .collect()
    };

    let all = log.query(&LogFilter::default()).expect("query");
    assert_eq!(all.len(), 8);
    for (i, (stored, sent)) in all.iter().zip(&events).enumerate() {
        assert_eq!(stored.seq, i as u64 + 1);
        assert_eq!(
            &AuditEvent {
                seq: 0,
                ..stored.clone()
            },
            sent
        );
    }
    let cgroup = |c: &str| LogFilter {
        cgroup: Some(c.into()),
        ..LogFilter::default()
    };
    assert_eq!(times(cgroup("agents/a")), [1_000, 2_000, 5_000, 6_000]);
    assert_eq!(times(cgroup("/agents/a/")), [1_000, 2_000, 5_000, 6_000]);
    assert_eq!(times(cgroup("agents/a/sub")), [2_000]);
    assert_eq!(times(cgroup("agents")).len(), 7, "all but the reload");
    assert_eq!(
        times(LogFilter {
            denied_only: true,
            ..LogFilter::default()
        }),
        [2_000, 4_000, 5_000, 8_000]
    );
    assert_eq!(
        times(LogFilter {
            since_ms: Some(5_000),
            ..LogFilter::default()
        }),
        [5_000, 6_000, 7_000, 8_000]
    );
    assert_eq!(
        times(LogFilter {
            limit: 3,
            ..LogFilter::default()
        }),
        [6_000, 7_000, 8_000],
        "the newest, oldest first"
    );
    assert_eq!(
        times(LogFilter {
            cgroup: Some("agents/a".into()),
            denied_only: true,
            since_ms: Some(1_500),
            limit: 1,
        }),
        [5_000]
    );
    assert_eq!(
        times(LogFilter {
            limit: 100,
            ..LogFilter::default()
        })
        .len(),
        8
    );
}

#[test]
fn the_chain_verifies_and_links_each_record_to_the_one_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(50));
    let report = open(dir.path()).verify().expect("verify");
    assert_eq!(report.records, 50);
    assert_eq!(report.first_bad, None);

    let db = Database::open(dir.path().join(AUDIT_FILE)).expect("raw open");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(RECORDS).expect("table");
    let mut prev = Link::ORIGIN.hash;
    for entry in table.iter().expect("iter") {
        let (key, value) = entry.expect("entry");
        let record = StoredRecord::decode(value.value()).expect("decode");
        assert_eq!(record.prev_hash, prev);
        assert_eq!(
            record.hash,
            record_hash(&prev, key.value(), record.event_json)
        );
        let event: AuditEvent = serde_json::from_slice(record.event_json).expect("json");
        assert_eq!(event.seq, key.value());
        prev = record.hash;
    }
    let meta = txn.open_table(META).expect("meta");
    let head = Link::decode(
        meta.get(tables::HEAD_KEY)
            .expect("get")
            .expect("head")
            .value(),
    )
    .expect("head");
    assert_eq!(
        head,
        Link {
            seq: 50,
            hash: prev
        }
    );
}

#[test]
fn verify_names_an_edited_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(10));

    // A field changed, hashes left alone.
    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        let bytes = raw_record(t, 4);
        let r = StoredRecord::decode(&bytes).expect("decode");
        let mut event: AuditEvent = serde_json::from_slice(r.event_json).expect("json");
        event.host = Some("innocent.example".into());
        let json = serde_json::to_vec(&event).expect("json");
        t.insert(
            4,
            StoredRecord::encode(&r.prev_hash, &r.hash, &json).as_slice(),
        )
        .expect("insert");
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 4, "{problem}");
    assert!(problem.contains("edited"), "{problem}");

    // A field changed and the record's own hash recomputed: the next record's link shows it.
    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        let bytes = raw_record(t, 4);
        let r = StoredRecord::decode(&bytes).expect("decode");
        let mut event: AuditEvent = serde_json::from_slice(r.event_json).expect("json");
        event.status = Some(204);
        let json = serde_json::to_vec(&event).expect("json");
        let hash = record_hash(&r.prev_hash, 4, &json);
        t.insert(
            4,
            StoredRecord::encode(&r.prev_hash, &hash, &json).as_slice(),
        )
        .expect("insert");
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 4, "{problem}");
    assert!(problem.contains("rewritten"), "{problem}");

    // Garbage bytes.
    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        t.insert(7, b"not a record".as_slice()).expect("insert");
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 7, "{problem}");
    assert!(problem.contains("malformed"), "{problem}");

    // The original is intact.
    assert_eq!(open(dir.path()).verify().expect("verify").first_bad, None);
}

#[test]
fn verify_names_a_removed_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(10));

    for (removed, named) in [(5, 5), (1, 1), (10, 10)] {
        let copy = copy_of(dir.path());
        tamper(copy.path(), |t| {
            t.remove(removed).expect("remove").expect("existed");
        });
        let (seq, problem) = first_bad(copy.path());
        assert_eq!(seq, named, "removed {removed}: {problem}");
        assert!(problem.contains("missing"), "{problem}");
    }

    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        for seq in 3..=6 {
            t.remove(seq).expect("remove");
        }
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 3, "{problem}");
    assert!(problem.contains("3..=6"), "{problem}");

    // Removed, and the following records renumbered to close the gap.
    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        for seq in 6..=10 {
            let bytes = raw_record(t, seq);
            t.insert(seq - 1, bytes.as_slice()).expect("insert");
        }
        t.remove(10).expect("remove");
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 5, "{problem}");
}

#[test]
fn verify_names_the_first_of_reordered_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(10));
    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        let a = raw_record(t, 3);
        let b = raw_record(t, 6);
        t.insert(3, b.as_slice()).expect("insert");
        t.insert(6, a.as_slice()).expect("insert");
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 3, "{problem}");
    assert!(problem.contains("out of order"), "{problem}");
}

#[test]
fn retention_prunes_oldest_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keep = Retention {
        max_age: None,
        max_records: Some(5),
    };
    let log = AuditLog::open(dir.path(), keep).expect("open");
    let (handle, thread) = log
        .writer_with(WriterConfig {
            retention_interval: Duration::ZERO,
            ..fast()
        })
        .expect("writer");
    // Retention runs at most once per commit interval: give it one after the last commit.
    let settle = || std::thread::sleep(Duration::from_millis(30));
    for e in requests(12) {
        handle.record(e);
    }
    settle();
    handle.flush().expect("flush");
    let seqs = |h: &AuditHandle| -> Vec<u64> {
        h.query(&LogFilter::default())
            .expect("query")
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs(&handle), [8, 9, 10, 11, 12]);
    let report = handle.verify().expect("verify");
    assert_eq!((report.records, report.first_bad), (5, None));
    for e in requests(3) {
        handle.record(e);
    }
    settle();
    handle.flush_and_stop().expect("stop");
    assert_eq!(seqs(&handle), [11, 12, 13, 14, 15]);
    drop(handle);
    thread.join().expect("join").expect("writer");

    // Reopened with a larger limit: nothing more goes, and the chain goes on from the floor.
    let more = Retention {
        max_age: None,
        max_records: Some(100),
    };
    write_events(dir.path(), more, requests(2));
    let log = open(dir.path());
    assert_eq!(log.verify().expect("verify").first_bad, None);
    assert_eq!(
        log.query(&LogFilter::default()).expect("query").len(),
        7,
        "11..=17"
    );

    // Removing the oldest kept record is still caught: the floor is not moved by hand.
    drop(log);
    let copy = copy_of(dir.path());
    tamper(copy.path(), |t| {
        t.remove(11).expect("remove");
    });
    let (seq, problem) = first_bad(copy.path());
    assert_eq!(seq, 11, "{problem}");
}

#[test]
fn retention_by_age_prunes_old_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = now_unix_ms();
    let hour = 3_600_000;
    let mut events: Vec<_> = (0..4)
        .map(|i| {
            event(
                Some("agents/a"),
                EventKind::Request,
                None,
                now - 3 * hour + i,
            )
        })
        .collect();
    events.extend((0..3).map(|i| event(Some("agents/a"), EventKind::Request, None, now + i)));
    let retention = Retention {
        max_age: Some(Duration::from_secs(3600)),
        max_records: None,
    };
    write_events(dir.path(), Retention::KEEP_ALL, events);
    // Retention runs at the writer's first commit, here the stop's, with no new events.
    write_events(dir.path(), retention, requests(0));
    let log = open(dir.path());
    let kept: Vec<u64> = log
        .query(&LogFilter::default())
        .expect("query")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(kept, [5, 6, 7]);
    let report = log.verify().expect("verify");
    assert_eq!((report.records, report.first_bad), (3, None));
}

#[test]
fn flush_and_stop_commits_everything_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    // No timer commit can happen during the test: only the stop commits.
    let (handle, thread) = log
        .writer_with(WriterConfig {
            commit_interval: Duration::from_secs(600),
            max_batch: 1_000_000,
            ..WriterConfig::default()
        })
        .expect("writer");
    for e in requests(3000) {
        handle.record(e);
    }
    assert_eq!(handle.committed_seq(), 0);
    assert_eq!(handle.flush_and_stop().expect("stop"), 3000);
    assert_eq!(handle.committed_seq(), 3000);
    thread.join().expect("join").expect("writer");

    // Afterwards: dropped and counted, never blocking.
    handle.record(requests(1).remove(0));
    assert_eq!(handle.dropped(), 1);
    assert!(matches!(handle.flush(), Err(AuditError::WriterStopped)));
    drop(handle);

    let log = open(dir.path());
    assert_eq!(log.last_seq().expect("last"), 3000);
    assert_eq!(log.query(&LogFilter::default()).expect("query").len(), 3000);
    assert_eq!(log.verify().expect("verify").first_bad, None);
}

#[test]
fn a_request_that_ends_before_the_commit_is_one_record_and_one_under_way_is_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path())
        .writer_with(WriterConfig {
            commit_interval: Duration::from_secs(600),
            max_batch: 1_000_000,
            ..WriterConfig::default()
        })
        .expect("writer");
    let with = |id: u64, outcome: RequestOutcome, status: Option<u16>| AuditEvent {
        request_id: Some(id),
        outcome: Some(outcome),
        status,
        ..requests(1).remove(0)
    };
    // Request 1 ends before any commit: one record, how it ended, where it was forwarded.
    handle.record(with(1, RequestOutcome::Forwarded, None));
    handle.record(with(2, RequestOutcome::Forwarded, None));
    handle.record(with(1, RequestOutcome::Cancelled, None));
    assert_eq!(handle.flush().expect("flush"), 2);
    // Request 2 was committed as forwarded; its end is a record of its own.
    handle.record(with(2, RequestOutcome::Completed, Some(200)));
    // An ending without a pending forwarded record (never merged with another id's).
    handle.record(with(3, RequestOutcome::Completed, Some(200)));
    assert_eq!(handle.flush_and_stop().expect("stop"), 4);
    thread.join().expect("join").expect("writer");
    drop(handle);
    let stored = open(dir.path())
        .query(&LogFilter::default())
        .expect("query");
    let seen: Vec<_> = stored
        .iter()
        .map(|e| (e.seq, e.request_id, e.outcome))
        .collect();
    assert_eq!(
        seen,
        [
            (1, Some(1), Some(RequestOutcome::Cancelled)),
            (2, Some(2), Some(RequestOutcome::Forwarded)),
            (3, Some(2), Some(RequestOutcome::Completed)),
            (4, Some(3), Some(RequestOutcome::Completed)),
        ]
    );
    assert_eq!(open(dir.path()).verify().expect("verify").first_bad, None);
}

#[test]
fn dropping_every_handle_commits_and_ends_the_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path()).writer_with(fast()).expect("writer");
    for e in requests(7) {
        handle.record(e);
    }
    drop(handle);
    thread.join().expect("join").expect("writer");
    assert_eq!(open(dir.path()).last_seq().expect("last"), 7);
}

#[test]
fn reopen_continues_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        write_events(dir.path(), Retention::KEEP_ALL, requests(3)),
        3
    );
    assert_eq!(
        write_events(dir.path(), Retention::KEEP_ALL, requests(4)),
        7
    );
    let log = open(dir.path());
    let seqs: Vec<u64> = log
        .query(&LogFilter::default())
        .expect("query")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    let report = log.verify().expect("verify");
    assert_eq!((report.records, report.first_bad), (7, None));
    drop(log);

    let db = Database::open(dir.path().join(AUDIT_FILE)).expect("raw open");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(RECORDS).expect("table");
    let third = raw_record_read(&table, 3);
    let fourth = raw_record_read(&table, 4);
    let third = StoredRecord::decode(&third).expect("decode");
    let fourth = StoredRecord::decode(&fourth).expect("decode");
    assert_eq!(fourth.prev_hash, third.hash);
}

fn raw_record_read(table: &redb::ReadOnlyTable<u64, &[u8]>, seq: u64) -> Vec<u8> {
    table
        .get(seq)
        .expect("get")
        .expect("record exists")
        .value()
        .to_vec()
}

#[test]
fn a_crash_loses_only_uncommitted_records_and_the_chain_verifies_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path())
        .writer_with(WriterConfig {
            commit_interval: Duration::from_secs(600),
            ..WriterConfig::default()
        })
        .expect("writer");
    for e in requests(40) {
        handle.record(e);
    }
    assert_eq!(handle.flush().expect("flush"), 40);
    // Recorded, not yet committed (the commit interval is long): what a SIGKILL now loses.
    for e in requests(25) {
        handle.record(e);
    }
    let committed = handle.committed_seq();
    assert_eq!(committed, 40);
    // The file as a SIGKILL leaves it: open, not shut down.
    let crashed = copy_of(dir.path());
    assert_eq!(handle.flush_and_stop().expect("stop"), 65);
    drop(handle);
    thread.join().expect("join").expect("writer");

    let original = std::fs::read(crashed.path().join(AUDIT_FILE)).expect("read");
    assert_eq!(
        write_events(crashed.path(), Retention::KEEP_ALL, requests(5)),
        45,
        "the chain goes on after the last committed record"
    );
    assert_ne!(
        std::fs::read(crashed.path().join(AUDIT_FILE)).expect("read"),
        original
    );
    let log = open(crashed.path());
    let report = log.verify().expect("verify");
    assert_eq!((report.records, report.first_bad), (45, None));
}

#[test]
fn a_corrupt_or_foreign_file_is_refused_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(200));
    let good = std::fs::read(dir.path().join(AUDIT_FILE)).expect("read");

    // Every stored copy of one event field altered in place: page checksums fail.
    let marker = b"/v1/models";
    let mut flipped = good.clone();
    let mut hits = 0;
    for i in 0..flipped.len() - marker.len() {
        if &flipped[i..i + marker.len()] == marker {
            flipped[i + 1] ^= 0x20;
            hits += 1;
        }
    }
    assert!(hits > 0);

    // A redb file that is not an audit log.
    let foreign_dir = tempfile::tempdir().expect("tempdir");
    let foreign_path = foreign_dir.path().join("other.redb");
    {
        let db = Database::create(&foreign_path).expect("create");
        let txn = db.begin_write().expect("begin");
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("secrets"))
                .expect("table");
            t.insert("K", b"v".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let foreign = std::fs::read(&foreign_path).expect("read");

    let mut not_redb = b"SQLite format 3\0".to_vec();
    not_redb.resize(8192, 0);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("a flipped byte", flipped, "integrity check"),
        ("a foreign redb file", foreign, "no audit tables"),
        ("not redb", not_redb, "not a redb database"),
        ("empty", Vec::new(), "too short"),
        ("truncated", good[..good.len() / 3].to_vec(), ""),
    ];
    for (what, bytes, expect) in cases {
        let state = tempfile::tempdir().expect("tempdir");
        let path = state.path().join(AUDIT_FILE);
        std::fs::write(&path, &bytes).expect("write");
        let err = AuditLog::open(state.path(), Retention::KEEP_ALL).expect_err(what);
        let shown = error_chain(&err);
        assert!(
            matches!(err, AuditError::Store(StoreError::Corrupt { .. })),
            "{what}: {shown}"
        );
        assert!(
            shown.contains(&path.display().to_string()),
            "{what}: {shown}"
        );
        assert!(
            shown.contains(expect) || (expect == "integrity check" && shown.contains("checksum")),
            "{what}: {shown}"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "{what}: changed"
        );
        assert!(
            !state.path().join("audit.redb.new").exists(),
            "{what}: nothing created"
        );
    }
}

#[test]
fn records_past_the_head_are_never_overwritten_and_verify_judges_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(10));
    tamper(dir.path(), |t| {
        t.insert(11, b"planted".as_slice()).expect("insert");
    });
    assert_eq!(
        write_events(dir.path(), Retention::KEEP_ALL, requests(2)),
        13
    );
    let (seq, problem) = first_bad(dir.path());
    assert_eq!(seq, 11, "{problem}");
    let db = Database::open(dir.path().join(AUDIT_FILE)).expect("raw open");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(RECORDS).expect("table");
    assert_eq!(raw_record_read(&table, 11), b"planted");
}

#[test]
fn a_symlink_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_events(dir.path(), Retention::KEEP_ALL, requests(1));
    let other = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(dir.path().join(AUDIT_FILE), other.path().join(AUDIT_FILE))
        .expect("symlink");
    let err = AuditLog::open(other.path(), Retention::KEEP_ALL).expect_err("symlink");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn a_second_open_is_refused_while_the_log_is_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path()).writer_with(fast()).expect("writer");
    let err = AuditLog::open(dir.path(), Retention::KEEP_ALL).expect_err("in use");
    assert!(
        matches!(err, AuditError::Store(StoreError::InUse { .. })),
        "{err}"
    );
    handle.flush_and_stop().expect("stop");
    drop(handle);
    thread.join().expect("join").expect("writer");
    open(dir.path());
}

#[test]
fn bad_settings_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let zero = Retention {
        max_age: None,
        max_records: Some(0),
    };
    assert!(matches!(
        AuditLog::open(dir.path(), zero),
        Err(AuditError::InvalidRetention { .. })
    ));
    let bad = WriterConfig {
        queue_capacity: 0,
        ..WriterConfig::default()
    };
    assert!(matches!(
        open(dir.path()).writer_with(bad),
        Err(AuditError::InvalidWriterConfig { .. })
    ));
}

#[test]
fn many_threads_recording_get_dense_seqs_and_a_valid_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path()).writer_with(fast()).expect("writer");
    const THREADS: u32 = 8;
    const EACH: u32 = 2_000;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let handle = handle.clone();
            s.spawn(move || {
                for i in 0..EACH {
                    let mut e = event(Some("agents/a"), EventKind::Request, None, 1);
                    e.comm = Some(format!("t{t}"));
                    e.pid = Some(i);
                    handle.record(e);
                }
            });
        }
    });
    let total = u64::from(THREADS * EACH);
    assert_eq!(handle.flush_and_stop().expect("stop"), total);
    assert_eq!(handle.dropped(), 0);
    drop(handle);
    thread.join().expect("join").expect("writer");

    let log = open(dir.path());
    let all = log.query(&LogFilter::default()).expect("query");
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    for t in 0..THREADS {
        let comm = format!("t{t}");
        let pids: Vec<u32> = all
            .iter()
            .filter(|e| e.comm.as_deref() == Some(comm.as_str()))
            .filter_map(|e| e.pid)
            .collect();
        assert_eq!(pids, (0..EACH).collect::<Vec<_>>(), "thread {t} in order");
    }
    let report = log.verify().expect("verify");
    assert_eq!((report.records, report.first_bad), (total, None));
}

#[test]
fn a_full_queue_drops_counts_and_records_the_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path())
        .writer_with(WriterConfig {
            queue_capacity: 4,
            ..fast()
        })
        .expect("writer");
    let release = handle.block_writer();
    for e in requests(10) {
        handle.record(e);
    }
    let dropped = handle.dropped();
    assert!(dropped >= 6, "dropped {dropped}");
    drop(release);
    let last = handle.flush_and_stop().expect("stop");
    drop(handle);
    thread.join().expect("join").expect("writer");

    let log = open(dir.path());
    let all = log.query(&LogFilter::default()).expect("query");
    assert_eq!(last, all.len() as u64);
    assert_eq!(
        all.len() as u64,
        10 - dropped + 1,
        "kept events and the notice"
    );
    let notice = all.last().expect("notice");
    assert_eq!(notice.side, Some(Side::Broker));
    assert!(
        notice
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&format!("{dropped} events were dropped"))),
        "{notice:?}"
    );
    assert_eq!(log.verify().expect("verify").first_bad, None);
}

#[test]
fn subscribers_get_committed_events_and_a_slow_one_lags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path())
        .writer_with(WriterConfig {
            live_capacity: 4,
            ..fast()
        })
        .expect("writer");
    let mut live = handle.subscribe();
    let mut slow = handle.subscribe();
    for e in requests(3) {
        handle.record(e);
    }
    for seq in 1..=3 {
        let e = live.blocking_recv().expect("live event");
        assert_eq!(e.seq, seq);
        assert!(handle.committed_seq() >= seq, "published after commit");
    }
    for e in requests(20) {
        handle.record(e);
    }
    // The writer is not held up by `slow`, which never reads.
    assert_eq!(handle.flush_and_stop().expect("stop"), 23);
    assert!(matches!(
        slow.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_))
    ));
    drop(handle);
    thread.join().expect("join").expect("writer");
}

#[test]
fn secret_names_round_trip_and_records_have_no_place_for_a_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut e = event(
        Some("agents/a"),
        EventKind::Request,
        Some(Decision::Allow),
        1,
    );
    e.secrets = vec!["OPENAI_KEY".into(), "GITHUB_TOKEN".into()];
    write_events(dir.path(), Retention::KEEP_ALL, vec![e.clone()]);
    let stored = open(dir.path())
        .query(&LogFilter::default())
        .expect("query");
    assert_eq!(stored, vec![AuditEvent { seq: 1, ..e }]);

    // A new field on AuditEvent lands in every stored record: whoever adds one must decide
    // here that it can never hold a secret value (headers, bodies, query strings, tokens).
    let json = serde_json::to_value(AuditEvent::default()).expect("json");
    let mut fields: Vec<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "bytes_in",
            "bytes_out",
            "cgroup",
            "comm",
            "decision",
            "exe",
            "host",
            "kind",
            "latency_us",
            "method",
            "original_dst",
            "path",
            "pid",
            "reason",
            "rule",
            "secrets",
            "seq",
            "side",
            "sni",
            "status",
            "time_ms",
        ]
    );
}

/// The scheduling policy of thread `tid`.
fn policy_of(tid: i32) -> libc::c_int {
    // SAFETY: plain syscall; a bad tid returns -1.
    unsafe { libc::sched_getscheduler(tid) }
}

/// Polls `check` for up to two seconds.
fn eventually(check: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    check()
}

/// Whether this process may move a thread out of `SCHED_IDLE`: root (brokerd always is), or a
/// nonzero `RLIMIT_NICE`.
fn may_leave_the_idle_class() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0;
    nix::unistd::geteuid().is_root() || (got && limit.rlim_cur > 0)
}

#[test]
fn the_writer_idles_in_the_idle_class_and_is_raised_by_a_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, thread) = open(dir.path()).writer_with(fast()).expect("writer");
    assert!(
        eventually(|| handle.writer_tid() != 0),
        "the writer registers"
    );
    let tid = handle.writer_tid();
    assert!(
        eventually(|| policy_of(tid) == libc::SCHED_IDLE),
        "an idle writer is in the idle class, not {}",
        policy_of(tid)
    );
    // A writer that takes nothing (blocked here, starved in production) while records pile up
    // is raised by the recording side.
    let release = handle.block_writer();
    for e in requests(super::priority::PROMOTE_QUEUED as u64 + 1) {
        handle.record(e);
    }
    if may_leave_the_idle_class() {
        assert_eq!(
            policy_of(tid),
            libc::SCHED_BATCH,
            "a backlog raises the writer"
        );
    } else {
        // Run without privilege (plain `cargo test` as a user): the kernel lets no one leave
        // SCHED_IDLE without CAP_SYS_NICE or RLIMIT_NICE, so the raise fails, and must fail
        // quietly: the writer still commits everything below.
        assert_eq!(policy_of(tid), libc::SCHED_IDLE);
    }
    drop(release);
    // Once it has caught up it goes back to the idle class, and nothing was lost.
    let committed = handle.flush().expect("flush");
    assert_eq!(committed, super::priority::PROMOTE_QUEUED as u64 + 1);
    assert!(
        eventually(|| policy_of(tid) == libc::SCHED_IDLE),
        "the writer stays raised after catching up: {}",
        policy_of(tid)
    );
    assert_eq!(handle.dropped(), 0);
    handle.flush_and_stop().expect("stop");
    drop(handle);
    thread.join().expect("join").expect("writer");
}
