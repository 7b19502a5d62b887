//! The share book: counts held and given back, rates refilled, refusals audited in aggregate.

use std::path::PathBuf;

use super::*;

#[derive(Default)]
struct Events(Mutex<Vec<AuditEvent>>);

impl EventSink for Events {
    fn record(&self, event: AuditEvent) {
        self.0.lock().expect("events").push(event);
    }
}

impl Events {
    fn all(&self) -> Vec<AuditEvent> {
        self.0.lock().expect("events").clone()
    }
}

fn book(
    shares: &str,
    max_open: usize,
) -> (Arc<ShareBook>, Arc<Events>, watch::Sender<Arc<Policy>>) {
    let policy = Policy::from_files(vec![(
        PathBuf::from("a.toml"),
        format!("cgroup = \"agents\"\n[shares]\n{shares}\n"),
    )])
    .expect("policy");
    let (tx, rx) = watch::channel(Arc::new(policy));
    let events = Arc::new(Events::default());
    let refusals = Arc::new(RefusalAudit::new(events.clone()));
    (Arc::new(ShareBook::new(rx, refusals, max_open)), events, tx)
}

fn agent(name: &str, id: u64) -> ConnectionOrigin {
    ConnectionOrigin {
        cgroup: CgroupPath::parse(name).expect("cgroup"),
        cgroup_id: CgroupId(id),
        pid: 100,
        tid: 100,
        comm: "agent".into(),
        exe: None,
        cgroup_path: None,
        pod: None,
        original_dst: "127.0.0.1:443".parse().expect("addr"),
        sandboxed: false,
    }
}

#[test]
fn connections_are_held_until_dropped_and_each_agent_has_its_own() {
    let (book, events, _p) = book("connections = 3", 1000);
    let a = agent("agents/a", 1);
    let b = agent("agents/b", 2);
    let held: Vec<Held> = (0..3)
        .map(|_| book.admit(&a).expect("within share"))
        .collect();
    let refused = book.admit(&a).err().expect("over the share");
    assert_eq!(refused.kind, Some(ShareKind::Connections));
    assert!(refused.reason.contains("agents/a"), "{}", refused.reason);
    assert!(
        refused.reason.contains("shares.connections"),
        "{}",
        refused.reason
    );
    assert!(book.admit(&b).is_ok(), "another agent is not affected");
    drop(held);
    assert!(book.admit(&a).is_ok(), "given back when closed");
    let denials = events.all();
    assert_eq!(denials.len(), 1, "{denials:#?}");
    assert_eq!(denials[0].kind, Some(EventKind::Denial));
    assert_eq!(denials[0].cgroup.as_deref(), Some("agents/a"));
    assert_eq!(book.open_connections().0, 0, "all given back");
}

#[test]
fn brokerds_own_limit_holds_across_agents() {
    let (book, _events, _p) = book("", 4);
    let held: Vec<Held> = (0..4)
        .map(|i| {
            book.admit(&agent(&format!("agents/n{i}"), i))
                .expect("admit")
        })
        .collect();
    let refused = book.admit(&agent("agents/late", 99)).err().expect("full");
    assert_eq!(refused.kind, None);
    assert!(
        refused.reason.contains("file descriptor"),
        "{}",
        refused.reason
    );
    assert_eq!(book.open_connections(), (4, 4));
    drop(held);
    assert_eq!(book.open_connections().0, 0);
}

#[test]
fn new_connections_per_second_is_a_token_bucket() {
    let (book, _events, _p) = book("new_connections_per_second = 5", 1000);
    let a = agent("agents/a", 1);
    let ok = (0..20).filter(|_| book.admit(&a).is_ok()).count();
    assert_eq!(ok, 5, "the burst is one second's worth");
    std::thread::sleep(Duration::from_millis(450));
    let ok = (0..20).filter(|_| book.admit(&a).is_ok()).count();
    assert!((2..=3).contains(&ok), "refilled at 5 a second: {ok}");
}

#[test]
fn handshakes_and_requests_are_held_within_a_connection() {
    let (book, _events, _p) = book("pending_handshakes = 1\nrequests_in_flight = 2", 1000);
    let a = agent("agents/a", 1);
    let c1 = book.admit(&a).expect("c1");
    let c2 = book.admit(&a).expect("c2");
    let h = book.handshake(&c1).expect("handshake");
    assert_eq!(
        book.handshake(&c2).err().map(|r| r.kind),
        Some(Some(ShareKind::PendingHandshakes))
    );
    drop(h);
    assert!(book.handshake(&c2).is_ok());
    let r1 = book.request(&c1).expect("r1");
    let _r2 = book.request(&c2).expect("r2");
    assert_eq!(
        book.request(&c1).err().map(|r| r.kind),
        Some(Some(ShareKind::RequestsInFlight))
    );
    let usage = book.usage();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].connections, usage[0].requests), (2, 2));
    assert_eq!(usage[0].requests_limit, 2);
    drop(r1);
    assert!(book.request(&c1).is_ok());
}

#[test]
fn requests_are_refused_past_the_agents_rate_however_few_are_in_flight() {
    let (book, _events, _p) = book("requests_per_second = 5\nrequests_in_flight = 100", 1000);
    let a = agent("agents/a", 1);
    let b = agent("agents/b", 2);
    let (ca, cb) = (book.admit(&a).expect("a"), book.admit(&b).expect("b"));
    // Each request ends at once (nothing held), as a fast stream flood's do.
    let ok = (0..50).filter(|_| book.request(&ca).is_ok()).count();
    assert_eq!(ok, 5, "the burst is one second's worth");
    let refused = book.request(&ca).err().expect("over the rate");
    assert_eq!(refused.kind, Some(ShareKind::RequestsPerSecond));
    assert!(
        refused.reason.contains("shares.requests_per_second"),
        "{}",
        refused.reason
    );
    // The other agent has its own.
    assert_eq!((0..5).filter(|_| book.request(&cb).is_ok()).count(), 5);
    assert_eq!(book.usage()[0].requests_per_second_limit, 5);
    std::thread::sleep(Duration::from_millis(450));
    let ok = (0..20).filter(|_| book.request(&ca).is_ok()).count();
    assert!((2..=3).contains(&ok), "refilled at 5 a second: {ok}");
}

#[test]
fn a_policy_change_applies_to_the_next_admission() {
    let (book, _events, tx) = book("connections = 1", 1000);
    let a = agent("agents/a", 1);
    let _c = book.admit(&a).expect("first");
    assert!(book.admit(&a).is_err());
    let wider = Policy::from_files(vec![(
        PathBuf::from("a.toml"),
        "cgroup = \"agents\"\n[shares]\nconnections = 2\n".to_string(),
    )])
    .expect("policy");
    tx.send(Arc::new(wider)).expect("send");
    assert!(book.admit(&a).is_ok());
}

#[test]
fn a_burst_of_refusals_is_its_first_record_and_a_count() {
    let events = Arc::new(Events::default());
    let audit = RefusalAudit::new(events.clone());
    let a = agent("agents/a", 1);
    let refused = Refused {
        kind: Some(ShareKind::Connections),
        reason: "over".into(),
    };
    for _ in 0..1000 {
        audit.refused_connection(&a, &refused);
    }
    assert_eq!(events.all().len(), 1, "only the first at once");
    audit.flush(false);
    assert_eq!(events.all().len(), 1, "the window is not over yet");
    audit.flush(true);
    let all = events.all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].count, Some(999));
    assert!(
        all[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("999 more"))
    );
    assert_eq!(audit.refused_total(CgroupId(1)), 1000);
    // A new window starts a new burst.
    audit.refused_connection(&a, &refused);
    assert_eq!(events.all().len(), 3);
    assert_eq!(events.all()[2].count, None);
}

#[test]
fn bursts_are_kept_apart_by_agent_and_kind() {
    let events = Arc::new(Events::default());
    let audit = RefusalAudit::new(events.clone());
    let over = |kind| Refused {
        kind: Some(kind),
        reason: "over".into(),
    };
    audit.refused_connection(&agent("agents/a", 1), &over(ShareKind::Connections));
    audit.refused_connection(&agent("agents/b", 2), &over(ShareKind::Connections));
    audit.refused_connection(
        &agent("agents/a", 1),
        &over(ShareKind::NewConnectionsPerSecond),
    );
    assert_eq!(events.all().len(), 3, "each is the first of its own burst");
}

#[test]
fn the_connection_limit_follows_the_fd_limit() {
    assert_eq!(max_connections(1024), 576);
    assert_eq!(max_connections(1_048_576), (1_048_576 - 256) / 4 * 3);
    assert_eq!(max_connections(10), 16, "never below a floor");
}

#[test]
fn past_its_request_rate_an_agent_is_read_at_that_rate_and_its_held_refusals_are_bounded() {
    let (book, _events, _p) = book("requests_per_second = 100", 1000);
    let a = agent("agents/a", 1);
    let b = agent("agents/b", 2);
    let (ca, cb) = (book.admit(&a).expect("a"), book.admit(&b).expect("b"));
    // Within the share: read freely.
    assert_eq!(ca.read_pace(), ReadPace::Free);
    while book.request(&ca).is_ok() {}
    // Past it: paced reads, at the share's rate for all the agent's connections together.
    let ca2 = book.admit(&a).expect("a again");
    let paced = (0..50)
        .filter(|i| {
            let conn = if i % 2 == 0 { &ca } else { &ca2 };
            conn.read_pace() == ReadPace::Paced
        })
        .count();
    assert!(paced <= 2, "{paced} paced reads at once");
    match ca.read_pace() {
        ReadPace::Wait(d) => assert!(d <= Duration::from_millis(10), "{d:?}"),
        other => panic!("expected a wait, got {other:?}"),
    }
    // The other agent is read freely.
    assert_eq!(cb.read_pace(), ReadPace::Free);
    // Held refusals: bounded per agent, given back when dropped.
    let held: Vec<HeldRefusal> = std::iter::from_fn(|| ca.hold_refusal())
        .take(10_000)
        .collect();
    assert_eq!(held.len(), MAX_HELD_REFUSALS as usize);
    assert!(ca2.hold_refusal().is_none(), "the bound is the agent's");
    assert!(cb.hold_refusal().is_some());
    drop(held);
    assert!(ca.hold_refusal().is_some());
}
