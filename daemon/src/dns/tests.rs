//! The DNS server against a fake upstream resolver on loopback.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
};

use hickory_proto::{
    op::Query,
    rr::{Name, Record, rdata::A},
};
use tokio::net::TcpListener;

use super::*;
use crate::shares::{RefusalAudit, ShareBook};
use agent_broker_core::cgroup::{CgroupId, CgroupPath};

const POLICY: &str = r#"
cgroup = "agents/a"

[[allow]]
host = "api.example.test"

[dns]
allow = ["api.example.test", "big.example.test", "*.pkg.example.test"]
"#;

/// What the fake resolver answers: 192.0.2.7 for every A query; for big.example.test a UDP
/// answer with TC set (the full answer only over TCP).
struct FakeResolver {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

fn answer_for(query: &[u8], over_tcp: bool) -> Vec<u8> {
    let q = Message::from_vec(query).expect("query");
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    let question = q.queries[0].clone();
    let name = question.name().clone();
    m.add_query(question);
    if name.to_ascii().starts_with("big.") && !over_tcp {
        m.metadata.truncation = true;
    } else {
        m.answers.push(Record::from_rdata(
            name,
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
        ));
    }
    m.to_vec().expect("encode")
}

impl FakeResolver {
    async fn start() -> Self {
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
            let addr = udp.local_addr().expect("addr");
            let Ok(tcp) = TcpListener::bind(addr).await else {
                continue;
            };
            let udp_queries = Arc::new(AtomicUsize::new(0));
            let tcp_queries = Arc::new(AtomicUsize::new(0));
            let counted = udp_queries.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let reply = answer_for(&buf[..n], false);
                    let _ = udp.send_to(&reply, peer).await;
                }
            });
            let counted = tcp_queries.clone();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = tcp.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).await.is_err() {
                        continue;
                    }
                    let reply = answer_for(&q, true);
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    let _ = s.write_all(&framed).await;
                }
            });
            return Self {
                addr,
                udp_queries,
                tcp_queries,
            };
        }
        panic!("no port for the fake resolver");
    }

    fn queries(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
    }
}

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

struct World {
    server: Arc<DnsServer>,
    events: Arc<Events>,
    answered: Arc<AnsweredNames>,
    origin: ConnectionOrigin,
    _policy: watch::Sender<Arc<Policy>>,
}

fn world(upstreams: Vec<SocketAddr>) -> World {
    world_with(POLICY, upstreams)
}

fn world_with(policy: &str, upstreams: Vec<SocketAddr>) -> World {
    let policy =
        Policy::from_files(vec![(PathBuf::from("a.toml"), policy.to_string())]).expect("policy");
    let (tx, rx) = watch::channel(Arc::new(policy));
    let events = Arc::new(Events::default());
    let answered = Arc::new(AnsweredNames::default());
    let refusals = Arc::new(RefusalAudit::new(events.clone()));
    let shares = Arc::new(ShareBook::new(rx.clone(), refusals, 1000));
    let server = Arc::new(DnsServer::new(
        upstreams,
        rx,
        events.clone(),
        answered.clone(),
        shares,
    ));
    World {
        server,
        events,
        answered,
        origin: ConnectionOrigin {
            cgroup: CgroupPath::parse("agents/a").expect("cgroup"),
            cgroup_id: CgroupId(7),
            pid: 4242,
            tid: 4242,
            comm: "agent".into(),
            exe: None,
            cgroup_path: None,
            pod: None,
            original_dst: "8.8.8.8:53".parse().expect("addr"),
            sandboxed: false,
        },
        _policy: tx,
    }
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m.to_vec().expect("encode")
}

fn parse(reply: &[u8]) -> Message {
    Message::from_vec(reply).expect("reply parses")
}

#[tokio::test]
async fn an_allowed_name_is_answered_by_the_upstream_with_the_agents_id() {
    let upstream = FakeResolver::start().await;
    let w = world(vec![upstream.addr]);
    let reply = w
        .server
        .answer(
            &w.origin,
            &query(0x1234, "API.example.test", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    let m = parse(&reply);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(upstream.queries(), 1);
    assert_eq!(
        w.answered
            .lookup(&w.origin.cgroup, "192.0.2.7".parse().expect("ip")),
        Some("api.example.test".into())
    );
    let events = w.events.all();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, Some(EventKind::Dns));
    assert_eq!(events[0].decision, Some(Decision::Allow));
    assert_eq!(events[0].host.as_deref(), Some("api.example.test"));
    assert_eq!(events[0].method.as_deref(), Some("A"));
}

#[tokio::test]
async fn names_the_policy_does_not_allow_are_refused_and_nothing_is_forwarded() {
    let upstream = FakeResolver::start().await;
    let w = world(vec![upstream.addr]);
    let tunnel = format!("{}.api.example.test", "c2VjcmV0".repeat(6));
    for (i, name) in ["other.example.test", tunnel.as_str(), "pkg.example.test"]
        .iter()
        .enumerate()
    {
        let reply = w
            .server
            .answer(
                &w.origin,
                &query(i as u16, name, RecordType::A),
                Transport::Udp,
            )
            .await
            .expect("reply");
        let m = parse(&reply);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert_eq!(m.metadata.id, i as u16);
        assert!(m.answers.is_empty());
    }
    assert_eq!(
        upstream.queries(),
        0,
        "a refused name must not leave brokerd"
    );
    // The first refusal is recorded at once, the two after it (within a second) as one
    // record with their number.
    assert_eq!(w.events.all().len(), 1);
    w.server.shares.refusals().flush(true);
    let events = w.events.all();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e.decision == Some(Decision::Deny) && e.reason.is_some())
    );
    assert_eq!(events[0].host.as_deref(), Some("other.example.test"));
    assert_eq!(events[0].count, None);
    assert_eq!(events[1].count, Some(2));
    assert_eq!(
        events[1].host.as_deref(),
        Some("pkg.example.test"),
        "the newest"
    );
    assert!(
        events[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("2 more")),
        "{:?}",
        events[1].reason
    );
    // A wildcard allows names below its suffix.
    let reply = w
        .server
        .answer(
            &w.origin,
            &query(9, "files.pkg.example.test", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    assert_eq!(parse(&reply).metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn a_flood_of_refused_names_is_audited_as_a_few_records() {
    let upstream = FakeResolver::start().await;
    let w = world(vec![upstream.addr]);
    for i in 0..5000u16 {
        let name = format!("x{i}.tunnel.test");
        let reply = w
            .server
            .answer(&w.origin, &query(i, &name, RecordType::A), Transport::Udp)
            .await
            .expect("reply");
        assert_eq!(parse(&reply).metadata.response_code, ResponseCode::Refused);
    }
    w.server.shares.refusals().flush(true);
    let events = w.events.all();
    // 5000 queries in well under the default rate's burst window would be 5000 records; the
    // rate share refuses most unread and both kinds are summed per second.
    assert!(events.len() <= 8, "{} records: {events:#?}", events.len());
    let counted: u64 = events.iter().map(|e| e.count.unwrap_or(1)).sum();
    assert_eq!(counted, 5000, "every query is accounted for: {events:#?}");
    assert_eq!(upstream.queries(), 0);
}

#[tokio::test]
async fn an_agent_over_its_dns_share_is_refused_unread_and_others_are_not() {
    let upstream = FakeResolver::start().await;
    let policy = format!("{POLICY}\n[shares]\ndns_queries_per_second = 5\n");
    let w = world_with(&policy, vec![upstream.addr]);
    let mut refused = 0;
    for i in 0..20u16 {
        let reply = w
            .server
            .answer(
                &w.origin,
                &query(i, "api.example.test", RecordType::A),
                Transport::Udp,
            )
            .await
            .expect("reply");
        match parse(&reply).metadata.response_code {
            ResponseCode::NoError => {}
            ResponseCode::Refused => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // A burst of 5, then about 5 a second: the loop takes far less than a second.
    assert!((14..=15).contains(&refused), "{refused} refused");
    assert_eq!(
        upstream.queries(),
        20 - refused,
        "refused queries are not forwarded"
    );
    // Another agent has its own share.
    let other = ConnectionOrigin {
        cgroup: CgroupPath::parse("agents/a/other").expect("cgroup"),
        cgroup_id: CgroupId(8),
        ..w.origin.clone()
    };
    let reply = w
        .server
        .answer(
            &other,
            &query(99, "api.example.test", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    assert_eq!(parse(&reply).metadata.response_code, ResponseCode::NoError);
    w.server.shares.refusals().flush(true);
    let denials: Vec<_> = w
        .events
        .all()
        .into_iter()
        .filter(|e| e.decision == Some(Decision::Deny))
        .collect();
    assert!(!denials.is_empty() && denials.len() <= 2, "{denials:#?}");
    assert!(
        denials[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("shares.dns_queries_per_second")),
        "{denials:#?}"
    );
    let counted: u64 = denials.iter().map(|e| e.count.unwrap_or(1)).sum();
    assert_eq!(counted, refused as u64);
}

#[tokio::test]
async fn https_and_svcb_queries_get_no_records() {
    let upstream = FakeResolver::start().await;
    let w = world(vec![upstream.addr]);
    for qtype in [RecordType::HTTPS, RecordType::SVCB] {
        let reply = w
            .server
            .answer(
                &w.origin,
                &query(5, "api.example.test", qtype),
                Transport::Udp,
            )
            .await
            .expect("reply");
        let m = parse(&reply);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
    }
    assert_eq!(upstream.queries(), 0);
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing_and_never_a_panic() {
    let w = world(vec!["127.0.0.1:9".parse().expect("addr")]);
    assert!(
        w.server
            .answer(&w.origin, b"", Transport::Udp)
            .await
            .is_none()
    );
    assert!(
        w.server
            .answer(&w.origin, &[0; 11], Transport::Udp)
            .await
            .is_none()
    );
    // Two questions.
    let mut m = Message::new(77, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("api.example.test").expect("name"),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("api.example.test").expect("name"),
        RecordType::AAAA,
    ));
    let reply = w
        .server
        .answer(&w.origin, &m.to_vec().expect("encode"), Transport::Udp)
        .await
        .expect("reply");
    assert_eq!(parse(&reply).metadata.response_code, ResponseCode::FormErr);
    // A response sent as a query is never answered.
    let mut response = query(3, "api.example.test", RecordType::A);
    response[2] |= 0x80;
    assert!(
        w.server
            .answer(&w.origin, &response, Transport::Udp)
            .await
            .is_none()
    );
    // Random bytes: whatever comes back, nothing panics and nothing is forwarded.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..400 {
        let bytes: Vec<u8> = (0..(len % 64 + 12))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = w.server.answer(&w.origin, &bytes, Transport::Udp).await;
    }
}

#[tokio::test]
async fn a_truncated_answer_is_retried_over_tcp() {
    let upstream = FakeResolver::start().await;
    let w = world(vec![upstream.addr]);
    let reply = w
        .server
        .answer(
            &w.origin,
            &query(8, "big.example.test", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    let m = parse(&reply);
    assert_eq!(m.answers.len(), 1, "the TCP answer is passed on");
    assert!(!m.metadata.truncation);
    assert_eq!(upstream.tcp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let w = world(vec![silent.local_addr().expect("addr")]);
    let started = Instant::now();
    let reply = w
        .server
        .answer(
            &w.origin,
            &query(4, "api.example.test", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    assert_eq!(parse(&reply).metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < UPSTREAM_TIMEOUT + Duration::from_secs(1));
    let events = w.events.all();
    assert_eq!(events.len(), 1);
    assert!(
        events[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("timed out"))
    );
}

#[tokio::test]
async fn dns_over_tcp_answers_several_queries_on_one_connection() {
    let upstream = FakeResolver::start().await;
    let w = world(vec![upstream.addr]);
    let (mut client, server_side) = tokio::io::duplex(8192);
    let server = w.server.clone();
    let origin = w.origin.clone();
    let serving = tokio::spawn(async move { server.serve_tcp(server_side, origin).await });
    for (id, name, code) in [
        (1u16, "api.example.test", ResponseCode::NoError),
        (2, "other.example.test", ResponseCode::Refused),
    ] {
        let q = query(id, name, RecordType::A);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        client.write_all(&framed).await.expect("write");
        let mut len = [0u8; 2];
        client.read_exact(&mut len).await.expect("len");
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        client.read_exact(&mut reply).await.expect("reply");
        let m = parse(&reply);
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.metadata.response_code, code, "{name}");
    }
    drop(client);
    serving.await.expect("served");
}

#[test]
fn resolv_conf_nameservers_are_read() {
    let text = "# comment\nnameserver 127.0.0.53\nsearch example\nnameserver fe80::1%eth0\n\
                nameserver not-an-ip\n";
    assert_eq!(
        nameservers(text),
        vec![
            "127.0.0.53:53".parse::<SocketAddr>().expect("addr"),
            "[fe80::1]:53".parse().expect("addr"),
        ]
    );
}

#[tokio::test]
async fn the_reserved_name_is_answered_for_every_agent_and_never_forwarded() {
    let upstream = FakeResolver::start().await;
    // A policy that allows no name at all: agent-broker.internal is answered anyway.
    let w = world_with("cgroup = \"agents/a\"\n", vec![upstream.addr]);
    let reply = w
        .server
        .answer(
            &w.origin,
            &query(0x4242, "Agent-Broker.Internal.", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    let m = parse(&reply);
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    match &m.answers[0].data {
        RData::A(a) => assert_eq!(a.0, crate::agent_api::ADDRESS),
        other => panic!("expected an A record, got {other:?}"),
    }
    for qtype in [RecordType::AAAA, RecordType::HTTPS, RecordType::TXT] {
        let reply = w
            .server
            .answer(
                &w.origin,
                &query(7, crate::agent_api::NAME, qtype),
                Transport::Tcp,
            )
            .await
            .expect("reply");
        let m = parse(&reply);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{qtype}");
        assert!(m.answers.is_empty(), "{qtype}: no record but the A");
    }
    // A name below it is not reserved: the policy refuses it.
    let reply = w
        .server
        .answer(
            &w.origin,
            &query(8, "x.agent-broker.internal", RecordType::A),
            Transport::Udp,
        )
        .await
        .expect("reply");
    assert_eq!(parse(&reply).metadata.response_code, ResponseCode::Refused);
    assert_eq!(upstream.queries(), 0, "nothing was forwarded");
    let events = w.events.all();
    assert_eq!(events.len(), 5);
    assert!(
        events[..4]
            .iter()
            .all(|e| e.decision == Some(Decision::Allow)
                && e.rule.as_deref() == Some(crate::agent_api::NAME)
                && e.kind == Some(EventKind::Dns))
    );
}

#[test]
fn a_refusal_unread_echoes_the_header_and_question_and_parses() {
    let q = query(0x1234, "x1.tunnel.test", RecordType::AAAA);
    let reply = refused_unread(&q).expect("a reply");
    let m = parse(&reply);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
    assert_eq!(m.queries.len(), 1);
    assert_eq!(m.queries[0].name().to_ascii(), "x1.tunnel.test.");
    assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
    assert!(m.answers.is_empty() && m.additionals.is_empty());

    // An EDNS record after the question is not echoed.
    let mut with_edns = Message::from_vec(&q).expect("query");
    with_edns.edns = Some(hickory_proto::op::Edns::new());
    let with_edns = with_edns.to_vec().expect("encode");
    assert!(with_edns.len() > q.len());
    assert_eq!(refused_unread(&with_edns).expect("reply"), reply);
}

#[test]
fn a_refusal_unread_of_what_cannot_be_walked_has_no_question_and_responses_get_none() {
    // Too short, or a response: nothing.
    assert_eq!(refused_unread(&[0u8; 11]), None);
    let mut response = query(1, "a.test", RecordType::A);
    response[2] |= 0x80;
    assert_eq!(refused_unread(&response), None);
    // Cut inside the name, a compression pointer, two questions, a name past 255 bytes: the
    // header alone, still REFUSED with the id.
    let q = query(9, "abc.example.test", RecordType::A);
    let mut pointer = q[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    let mut two = q.clone();
    two[5] = 2;
    let mut long = q[..12].to_vec();
    for _ in 0..5 {
        long.push(63);
        long.extend_from_slice(&[b'a'; 63]);
    }
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    for (what, bad) in [
        ("cut", q[..16].to_vec()),
        ("pointer", pointer),
        ("two questions", two),
        ("long", long),
    ] {
        let reply = refused_unread(&bad).unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(reply.len(), 12, "{what}");
        let m = parse(&reply);
        assert_eq!(
            m.metadata.id,
            u16::from_be_bytes([bad[0], bad[1]]),
            "{what}"
        );
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{what}");
        assert!(m.queries.is_empty(), "{what}");
    }
}

/// Over UDP, through the listener's own loop: one agent floods far past its share while
/// another resolves. The flood is refused in the loop (never forwarded, one summed record),
/// and every one of the other agent's queries is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_past_its_share_does_not_cost_another_agent_an_answer() {
    let upstream = FakeResolver::start().await;
    let policy = format!("{POLICY}\n[shares]\ndns_queries_per_second = 10\n");
    let victim_policy = "cgroup = \"agents/b\"\n\n[dns]\nallow = [\"api.example.test\"]\n";
    let policy = Policy::from_files(vec![
        (PathBuf::from("a.toml"), policy),
        (PathBuf::from("b.toml"), victim_policy.to_string()),
    ])
    .expect("policy");
    let w = world(vec![upstream.addr]);
    w._policy.send(Arc::new(policy)).expect("policy sent");

    let listener = UdpSocket::bind("127.0.0.1:0").await.expect("listener");
    let addr = listener.local_addr().expect("addr");
    let flooder = std::net::UdpSocket::bind("127.0.0.1:0").expect("flooder");
    let victim = std::net::UdpSocket::bind("127.0.0.1:0").expect("victim");
    let (flooder_addr, victim_addr) = (
        flooder.local_addr().expect("addr"),
        victim.local_addr().expect("addr"),
    );
    let attacker = w.origin.clone();
    let other = ConnectionOrigin {
        cgroup: CgroupPath::parse("agents/b").expect("cgroup"),
        cgroup_id: CgroupId(8),
        ..w.origin.clone()
    };
    let origin_of: Arc<dyn Fn(SocketAddr) -> Option<ConnectionOrigin> + Send + Sync> =
        Arc::new(move |peer| {
            if peer == flooder_addr {
                Some(attacker.clone())
            } else if peer == victim_addr {
                Some(other.clone())
            } else {
                None
            }
        });
    let cancel = CancellationToken::new();
    let served = tokio::spawn(
        w.server
            .clone()
            .serve_udp(listener, origin_of, cancel.clone()),
    );

    let flood = 3000u16;
    let answered = tokio::task::spawn_blocking(move || {
        for i in 0..flood {
            let q = query(i, &format!("x{i}.tunnel.test"), RecordType::A);
            flooder.send_to(&q, addr).expect("flood");
        }
        // The victim, right behind the flood: every query answered.
        victim
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut codes = Vec::new();
        for i in 0..20u16 {
            victim
                .send_to(&query(i, "api.example.test", RecordType::A), addr)
                .expect("send");
            let mut buf = [0u8; 4096];
            let (n, _) = victim.recv_from(&mut buf).expect("the victim is answered");
            codes.push(parse(&buf[..n]).metadata.response_code);
        }
        codes
    })
    .await
    .expect("clients");
    assert!(
        answered.iter().all(|c| *c == ResponseCode::NoError),
        "{answered:?}"
    );
    cancel.cancel();
    served.await.expect("listener stops");
    w.server.shares.refusals().flush(true);
    let refused: u64 = w
        .events
        .all()
        .iter()
        .filter(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.contains("shares.dns_queries_per_second"))
        })
        .map(|e| {
            // Refused unread: the record names no query.
            assert_eq!(e.host, None, "{e:?}");
            e.count.unwrap_or(1)
        })
        .sum();
    // All but the first ten (the kernel may drop some of a burst where brokerd cannot
    // enlarge its buffer).
    assert!(refused >= 200, "{refused} of {flood} refused");
    // The flood's names were never forwarded: only the victim's 20 queries were.
    assert_eq!(upstream.queries(), 20);
}
