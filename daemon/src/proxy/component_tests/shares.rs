//! One agent cannot make brokerd unavailable to the others (issue: shares and deadlines): an
//! agent at its share of connections, handshakes or requests in flight is refused more, the
//! other agent is served, and the refusals are audited in aggregate; half-sent requests and idle
//! connections are closed at their deadlines.

use std::{sync::Arc, time::Duration};

use http::StatusCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Notify,
};

use super::{
    Deadlines, EventKind,
    harness::{
        Agent, AgentProto, Broker, HOST, Handler, Offer, TestAuthorizer, TestUpstream, answer,
        empty, full, handler, tls_connect, within,
    },
};

async fn broker(handler: Handler, shares: &str, deadlines: Deadlines) -> (TestUpstream, Broker) {
    let upstream = TestUpstream::start(Offer::H1, handler).await;
    let broker = Broker::start_with_shares(
        TestAuthorizer::allow(),
        &upstream.ca_pem,
        upstream.addr,
        deadlines,
        shares,
    )
    .await;
    (upstream, broker)
}

/// Whether the broker closes `tcp` (EOF or reset) within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Waits (briefly) until every connection's share is given back.
async fn all_given_back(broker: &Broker) {
    for _ in 0..100 {
        if broker.shares.open_connections().0 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{} connections still held",
        broker.shares.open_connections().0
    );
}

async fn ok_call(agent: &mut Agent) -> StatusCode {
    let req = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    agent.fetch(req).await.status
}

#[tokio::test]
async fn an_agent_at_its_share_of_connections_is_refused_more_and_the_other_is_served() {
    let (_upstream, broker) = broker(answer("ok"), "connections = 2", Deadlines::default()).await;
    let mut first = Agent::tls(&broker, HOST, AgentProto::H1).await;
    let _second = Agent::tls(&broker, HOST, AgentProto::H1).await;
    let third = within(
        "a third connection",
        tls_connect(broker.addr, &broker.ca, HOST, &[b"http/1.1"]),
    )
    .await;
    assert!(third.is_err(), "the third connection must be closed");
    // The other agent has its own share, and the first agent's open connections still work.
    let mut other = Agent::tls_at(&broker, broker.other_agent, HOST, AgentProto::H2).await;
    assert_eq!(ok_call(&mut other).await, StatusCode::OK);
    assert_eq!(ok_call(&mut first).await, StatusCode::OK);
    let denial = broker
        .events
        .raw()
        .into_iter()
        .find(|e| e.kind == Some(EventKind::Denial))
        .expect("the refusal is audited");
    let reason = denial.reason.unwrap_or_default();
    assert!(reason.contains("shares.connections"), "{reason}");
    assert!(reason.contains(super::harness_agent_cgroup()), "{reason}");
    let usage = broker.shares.usage();
    let mine = usage
        .iter()
        .find(|u| u.cgroup == super::harness_agent_cgroup())
        .expect("usage");
    assert_eq!((mine.connections, mine.connections_limit), (2, 2));
    assert_eq!(mine.refused, 1);
}

#[tokio::test]
async fn a_flood_of_refused_connections_is_audited_as_a_few_records() {
    let (_upstream, broker) = broker(answer("ok"), "connections = 1", Deadlines::default()).await;
    let _held = Agent::tls(&broker, HOST, AgentProto::H1).await;
    for _ in 0..300 {
        let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
        assert!(closed_within(&mut tcp, Duration::from_secs(5)).await);
    }
    broker.shares.refusals().flush(true);
    let denials: Vec<_> = broker
        .events
        .raw()
        .into_iter()
        .filter(|e| e.kind == Some(EventKind::Denial))
        .collect();
    assert!(
        denials.len() <= 12,
        "{} records for 300 refusals",
        denials.len()
    );
    let counted: u64 = denials.iter().map(|e| e.count.unwrap_or(1)).sum();
    assert_eq!(counted, 300, "every refusal is counted");
}

#[tokio::test]
async fn connections_that_never_finish_their_handshake_use_the_agents_share_only() {
    let (_upstream, broker) =
        broker(answer("ok"), "pending_handshakes = 2", Deadlines::default()).await;
    // Two connections that say nothing hold the agent's pending handshakes...
    let _silent1 = TcpStream::connect(broker.addr).await.expect("connect");
    let _silent2 = TcpStream::connect(broker.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a third of the same agent's is closed at once,
    let third = within(
        "a third handshake",
        tls_connect(broker.addr, &broker.ca, HOST, &[b"http/1.1"]),
    )
    .await;
    assert!(third.is_err(), "over the share of pending handshakes");
    // while the other agent gets through.
    let mut other = Agent::tls_at(&broker, broker.other_agent, HOST, AgentProto::H1).await;
    assert_eq!(ok_call(&mut other).await, StatusCode::OK);
}

#[tokio::test]
async fn requests_in_flight_over_the_share_get_a_429_and_the_share_comes_back() {
    let release = Arc::new(Notify::new());
    let waiting = release.clone();
    let slow = handler(move |req| {
        let waiting = waiting.clone();
        async move {
            if req.uri().path() == "/slow" {
                waiting.notified().await;
            }
            full(StatusCode::OK, "done")
        }
    });
    let (_upstream, broker) = broker(slow, "requests_in_flight = 1", Deadlines::default()).await;
    let mut agent = Agent::tls(&broker, HOST, AgentProto::H2).await;
    let mut second = Agent::tls(&broker, HOST, AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/slow")
        .body(empty())
        .expect("req");
    let slow_call = tokio::spawn(async move { agent.fetch(req).await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = second
        .request("GET", HOST, "/fast")
        .body(empty())
        .expect("req");
    let refused = second.fetch(req).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let reason = refused.json()["reason"].as_str().unwrap_or("").to_string();
    assert!(reason.contains("shares.requests_in_flight"), "{reason}");
    // The other agent is not affected.
    let mut other = Agent::tls_at(&broker, broker.other_agent, HOST, AgentProto::H1).await;
    assert_eq!(ok_call(&mut other).await, StatusCode::OK);
    release.notify_one();
    assert_eq!(slow_call.await.expect("slow call"), StatusCode::OK);
    // The response ended: its place is free again.
    let req = second
        .request("GET", HOST, "/fast")
        .body(empty())
        .expect("req");
    assert_eq!(second.fetch(req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_half_sent_request_head_is_not_held_past_its_deadline() {
    let deadlines = Deadlines {
        request_head: Duration::from_millis(500),
        ..Deadlines::default()
    };
    let (upstream, broker) = broker(answer("ok"), "", deadlines).await;
    // Plain HTTP: a request head that never ends.
    let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: ")
        .await
        .expect("write");
    assert!(
        closed_within(&mut tcp, Duration::from_secs(5)).await,
        "a half-sent head must be closed"
    );
    // TLS, then nothing at all.
    let mut quiet = tls_connect(broker.addr, &broker.ca, HOST, &[b"h2"])
        .await
        .expect("handshake");
    let mut buf = [0u8; 64];
    let ended = within("the broker closing a silent TLS connection", async {
        loop {
            match quiet.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    let () = ended;
    assert_eq!(upstream.count(), 0);
    all_given_back(&broker).await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_a_busy_one_is_not() {
    let deadlines = Deadlines {
        request_head: Duration::from_millis(400),
        connection_idle: Duration::from_millis(400),
        ..Deadlines::default()
    };
    let release = Arc::new(Notify::new());
    let waiting = release.clone();
    let slow = handler(move |_req| {
        let waiting = waiting.clone();
        async move {
            waiting.notified().await;
            full(StatusCode::OK, "done")
        }
    });
    let (_upstream, broker) = broker(slow, "", deadlines).await;
    // A request in flight far longer than the idle deadline is not cut.
    let mut agent = Agent::tls(&broker, HOST, AgentProto::H2).await;
    let req = agent.request("GET", HOST, "/").body(empty()).expect("req");
    let call = tokio::spawn(async move {
        let status = agent.fetch(req).await.status;
        (status, agent)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    release.notify_one();
    let (status, mut agent) = call.await.expect("call");
    assert_eq!(status, StatusCode::OK);
    // Then idle: closed (GOAWAY) after the deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let closed = match &mut agent {
        Agent::H2(s) => s.ready().await.is_err() || s.is_closed(),
        Agent::H1(_) => unreachable!(),
    };
    assert!(closed, "an idle connection must be closed");
    all_given_back(&broker).await;
}
