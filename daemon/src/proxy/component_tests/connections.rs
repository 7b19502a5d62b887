//! What happens to a connection before (or instead of) HTTP: plain HTTP, traffic that is
//! neither TLS nor HTTP, an agent that rejects the broker CA, a splice verdict, and an upstream
//! that cannot be reached.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use agent_broker_protocol::Decision;

use http::StatusCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    BrokerCa, ConnectionVerdict, Deadlines, EventKind, Grant, NameBinding, Side,
    harness::{
        Agent, AgentProto, Broker, HOST, Offer, RULE, Setup, TestAuthorizer, answer, assert_origin,
        closed_port, echo_server, empty, throwaway_ca_pem, tls_connect, within,
    },
};

#[tokio::test]
async fn plain_http_is_forwarded_in_plain_with_the_host_header_as_host() {
    let setup = Setup::start(Offer::Plain, answer("plain"), TestAuthorizer::allow()).await;
    let mut agent = Agent::plain(&setup.broker).await;
    let req = agent
        .request("GET", "plain.example.test", "/status")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"plain");
    let port = setup.upstream.addr.port();
    let asked = setup.broker.authorizer.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].host, "plain.example.test");
    assert!(!asked[0].tls, "the authorizer is told it is plain HTTP");
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.authority.as_deref(),
            Some(format!("plain.example.test:{port}").as_str())
        );
    });
    let event = setup.broker.events.single().await;
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.sni, None);
    assert_eq!(setup.broker.authorizer.connections(), [None]);
}

#[tokio::test]
async fn a_connection_neither_tls_nor_http_is_closed_and_recorded() {
    let upstream = echo_server().await;
    let broker = Broker::start(
        TestAuthorizer::allow(),
        &throwaway_ca_pem(),
        upstream,
        Deadlines::default(),
    )
    .await;
    let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
    tcp.write_all(b"SSH-2.0-component-test\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let n = within("the broker closing", tcp.read_to_end(&mut rest))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing comes back");
    let event = broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Denial));
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(event.side, Some(Side::Agent));
    let reason = event.reason.as_deref().unwrap_or("");
    assert!(reason.contains("neither TLS nor HTTP"), "{reason}");
    assert_origin(&event, upstream);
}

#[tokio::test]
async fn an_agent_rejecting_the_broker_ca_is_a_recorded_tls_failure() {
    let setup = Setup::start(Offer::H1, answer("never"), TestAuthorizer::allow()).await;
    // Trusting some other CA, as an agent without the broker CA installed does.
    let (other, _key) = BrokerCa::generate().expect("another CA");
    let result = tls_connect(setup.broker.addr, other.cert_der(), HOST, &[b"http/1.1"]).await;
    assert!(result.is_err(), "the handshake must fail");
    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::TlsFailure));
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(event.side, Some(Side::Agent));
    assert_eq!(event.sni.as_deref(), Some(HOST));
    assert_eq!(setup.upstream.count(), 0);
}

#[tokio::test]
async fn a_splice_verdict_passes_the_bytes_through_unread() {
    let upstream = echo_server().await;
    let spliced = Arc::new(AtomicU64::new(0));
    let counted = spliced.clone();
    let authorizer = TestAuthorizer::allow().with_verdict(move |_sni| {
        let counted = counted.clone();
        ConnectionVerdict::Splice {
            rule: RULE.into(),
            on_done: Some(Box::new(move |bytes| {
                counted.store(bytes, Ordering::SeqCst);
            })),
            bind_name: None,
        }
    });
    let broker = Broker::start(
        authorizer,
        &throwaway_ca_pem(),
        upstream,
        Deadlines::default(),
    )
    .await;
    let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
    // Not HTTP, and spliced before anything is read: a server-first protocol would work too.
    tcp.write_all(b"\x00\x01binary").await.expect("write");
    let mut echo = [0u8; 8];
    within("the echo", tcp.read_exact(&mut echo))
        .await
        .expect("echo");
    assert_eq!(&echo, b"\x00\x01binary");
    tcp.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    within("the end", tcp.read_to_end(&mut rest))
        .await
        .expect("eof");

    let event = broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert_eq!((event.bytes_in, event.bytes_out), (8, 8));
    assert_eq!(spliced.load(Ordering::SeqCst), 16);
    assert!(
        broker.authorizer.requests().is_empty(),
        "no request was read"
    );
    assert_eq!(
        broker.authorizer.connections(),
        [None],
        "decided before any byte"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_from_the_upstream_side() {
    let nowhere = closed_port().await;
    let broker = Broker::start(
        TestAuthorizer::allow(),
        &throwaway_ca_pem(),
        nowhere,
        Deadlines::default(),
    )
    .await;
    let mut agent = Agent::tls(&broker, HOST, AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let json = got.json();
    assert_eq!(json["error"], "upstream failed");
    let event = broker.events.single().await;
    assert_eq!(event.side, Some(Side::Upstream));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert_eq!(event.status, Some(502));
}

/// A tcp rule matched by a name that only the agent's SNI ties to the address: spliced only
/// when the address is proven to be the name's; otherwise refused, recorded, and the upstream
/// gets nothing (issue 12.2: a name-matched rule must not reach any address).
#[tokio::test]
async fn a_splice_by_name_needs_the_address_to_be_the_names() {
    for (name, proven) in [(HOST, true), ("pinned.example", false)] {
        let upstream = echo_server().await;
        let authorizer =
            TestAuthorizer::allow().with_verdict(move |_sni| ConnectionVerdict::Splice {
                rule: RULE.into(),
                on_done: None,
                bind_name: Some(name.to_string()),
            });
        let broker = Broker::start(
            authorizer,
            &throwaway_ca_pem(),
            upstream,
            Deadlines::default(),
        )
        .await;
        let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
        let _ = tcp.write_all(b"\x00\x01binary").await;
        let _ = tcp.shutdown().await;
        let mut got = Vec::new();
        let _ = within("the end", tcp.read_to_end(&mut got)).await;
        assert_eq!(broker.names.asked(), [name]);
        let event = broker.events.single().await;
        if proven {
            assert_eq!(got, b"\x00\x01binary", "{name}: spliced");
            assert_eq!(event.decision, Some(Decision::Allow));
        } else {
            assert!(got.is_empty(), "{name}: nothing may come back");
            assert_eq!(event.kind, Some(EventKind::Denial));
            assert_eq!(event.decision, Some(Decision::Deny));
            let reason = event.reason.expect("reason");
            assert!(
                reason.contains(name) && reason.contains("127.0.0.1"),
                "{reason}"
            );
        }
    }
}

/// Plain HTTP matched by its `Host`: forwarded only when the address is proven to be that
/// host's; otherwise a 403 naming both, and the upstream gets nothing.
#[tokio::test]
async fn plain_http_by_host_needs_the_address_to_be_the_hosts() {
    for (host, proven) in [(HOST, true), ("elsewhere.example", false)] {
        let setup = Setup::start(
            Offer::Plain,
            answer("plain"),
            TestAuthorizer::new(move |facts, _| {
                Ok(Grant {
                    rule: RULE.into(),
                    bind_name: Some(NameBinding::matched_by_name(facts.host)),
                    ..Grant::default()
                })
            }),
        )
        .await;
        let mut agent = Agent::plain(&setup.broker).await;
        let req = agent
            .request("GET", host, "/x")
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        assert_eq!(setup.broker.names.asked(), [host]);
        if proven {
            assert_eq!(got.status, StatusCode::OK, "{host}");
            assert_eq!(setup.upstream.count(), 1);
        } else {
            assert_eq!(got.status, StatusCode::FORBIDDEN, "{host}");
            let reason = got.json()["reason"].as_str().expect("reason").to_string();
            assert!(reason.contains(host), "{reason}");
            assert_eq!(setup.upstream.count(), 0, "the upstream must get nothing");
            let event = setup.broker.events.single().await;
            assert_eq!(event.decision, Some(Decision::Deny));
        }
    }
}
