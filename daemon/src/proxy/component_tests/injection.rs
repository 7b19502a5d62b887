//! Injection: the upstream receives the value the authorizer wrote, never the agent's own, and
//! the exchange is recorded by secret name only. Runs on every agent/upstream protocol pair.

use agent_broker_core::policy::UsageReading;
use agent_broker_protocol::Decision;
use bytes::Bytes;
use http::{StatusCode, Version, header};
use http_body_util::Full;

use super::{
    BindReason, CgroupPath, Deadlines, EventKind, Grant, ListenerOwner, NameBinding, Side,
    harness::{
        Agent, AgentProto, Broker, HOST, OTHER, Offer, RULE, SECRET_NAME, Setup, TestAuthorizer,
        TestSecret, TestUpstream, answer, assert_origin, random_token, sha256_hex,
    },
};

const REQUEST_BODY: &[u8] = b"{\"model\":\"test\",\"input\":\"hello\"}";

async fn injected(proto: AgentProto, offer: Offer) {
    let secret = TestSecret::generate();
    let setup = Setup::start(
        offer,
        answer("hello from upstream"),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(proto).await;
    let own = format!("Bearer {}", random_token("agent-own-"));
    let mut req = agent
        .request("POST", HOST, "/v1/responses")
        .header(header::AUTHORIZATION, own.as_str())
        .header("x-agent", "kept")
        // Credentials for a proxy are hop-by-hop: never forwarded.
        .header(header::PROXY_AUTHORIZATION, "Basic cHJveHk6cGFzcw==");
    if proto == AgentProto::H1 {
        // Headers named in Connection are hop-by-hop too (HTTP/2 has no Connection header).
        req = req
            .header(header::CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1");
    }
    let req = req
        .body(Full::new(Bytes::from_static(REQUEST_BODY)))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"hello from upstream");

    let want_version = match offer {
        Offer::H2 => Version::HTTP_2,
        Offer::H1 | Offer::Plain => Version::HTTP_11,
    };
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.version, want_version,
            "the upstream protocol ALPN chose"
        );
        assert_eq!(seen.method, http::Method::POST);
        assert_eq!(seen.target, "/v1/responses");
        // Exactly the injected value: the agent's own is gone.
        assert_eq!(
            seen.header_digests("authorization"),
            [sha256_hex(secret.bearer().as_bytes())],
            "the upstream sees the injected Authorization only"
        );
        assert!(
            !seen
                .header_digests("authorization")
                .contains(&sha256_hex(own.as_bytes()))
        );
        assert_eq!(seen.header("x-agent"), ["kept"]);
        assert!(seen.header("proxy-authorization").is_empty());
        assert!(seen.header("x-hop").is_empty());
        assert!(seen.header("connection").is_empty());
        assert_eq!(
            seen.header("host").len(),
            usize::from(want_version == Version::HTTP_11)
        );
    });

    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert_eq!(event.secrets, [SECRET_NAME], "the secret by name");
    assert_eq!(event.status, Some(200));
    assert_eq!(event.bytes_in, REQUEST_BODY.len() as u64);
    assert_eq!(event.bytes_out, b"hello from upstream".len() as u64);
    assert_origin(&event, setup.upstream.addr);
    setup.broker.events.assert_no_secret(&secret);

    let done = setup.broker.authorizer.completions(1).await;
    assert_eq!(done[0].bytes_in, REQUEST_BODY.len() as u64);
    assert_eq!(done[0].bytes_out, b"hello from upstream".len() as u64);
    // Whole, and not JSON: metered, its usage is unreadable (a token budget charges an
    // estimate).
    assert!(
        matches!(
            done[0].usage,
            Some(UsageReading::Unreadable { partial: None, .. })
        ),
        "{:?}",
        done[0].usage
    );
}

#[tokio::test]
async fn injection_h1_agent_to_h1_upstream() {
    injected(AgentProto::H1, Offer::H1).await;
}

#[tokio::test]
async fn injection_h1_agent_to_h2_upstream() {
    injected(AgentProto::H1, Offer::H2).await;
}

#[tokio::test]
async fn injection_h2_agent_to_h1_upstream() {
    injected(AgentProto::H2, Offer::H1).await;
}

#[tokio::test]
async fn injection_h2_agent_to_h2_upstream() {
    injected(AgentProto::H2, Offer::H2).await;
}

/// The secret goes only to an upstream whose certificate verifies for the agreed host: here
/// the upstream's certificate does not name it, so the handshake fails and nothing is sent.
#[tokio::test]
async fn a_secret_never_goes_to_an_upstream_whose_certificate_does_not_verify() {
    let secret = TestSecret::generate();
    let upstream = TestUpstream::start(Offer::H2, answer("never")).await;
    let broker = Broker::start(
        TestAuthorizer::injecting(&secret),
        &upstream.ca_pem,
        upstream.addr,
        Deadlines::default(),
    )
    .await;
    // The broker mints a leaf for any SNI; the upstream's leaf covers HOST only.
    let mut agent = Agent::tls(&broker, OTHER, AgentProto::H1).await;
    let req = agent
        .request("GET", OTHER, "/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let json = got.json();
    assert_eq!(json["error"], "upstream failed");
    let reason = json["reason"].as_str().expect("reason");
    assert!(reason.contains("TLS handshake failed"), "{reason}");
    assert_eq!(upstream.count(), 0, "no request reached the upstream");

    let event = broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.side, Some(Side::Upstream));
    assert_eq!(event.status, Some(502));
    assert_eq!(event.secrets, [SECRET_NAME]);
    broker.events.assert_no_secret(&secret);
}

/// A credential goes only to an address proven to be the name's, even over verified TLS: a
/// certificate valid for the name (a wildcard, a shared one) may be served at another address
/// too (issue 13.18). Unproven: a 403 naming both, and the upstream, whose certificate is valid
/// for the name, receives nothing. Proven: the key goes out.
#[tokio::test]
async fn a_credential_goes_only_to_an_address_proven_to_be_the_names() {
    let secret = TestSecret::generate();
    let value = secret.bearer();
    let authorizer = TestAuthorizer::new(move |facts, parts| {
        let mut v = http::HeaderValue::from_str(&value).expect("header value");
        v.set_sensitive(true);
        parts.headers.insert(header::AUTHORIZATION, v);
        Ok(Grant {
            rule: RULE.into(),
            secrets: vec![SECRET_NAME.into()],
            bind_name: Some(NameBinding::credential(facts.host)),
            ..Grant::default()
        })
    });
    let setup = Setup::start(Offer::H1, answer("keyed"), authorizer).await;
    setup.broker.names.set_owners(&[]);
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/v1/models")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    let reason = got.json()["reason"].as_str().expect("reason").to_string();
    assert!(
        reason.contains(HOST) && reason.contains("127.0.0.1"),
        "{reason}"
    );
    assert_eq!(setup.upstream.count(), 0, "the upstream must get nothing");
    assert_eq!(
        setup.broker.names.asked_why(),
        [(HOST.to_string(), BindReason::Credential)]
    );
    let event = setup.broker.events.single().await;
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert!(
        event.reason.as_deref().is_some_and(|r| r.contains(HOST)),
        "{event:?}"
    );
    setup.broker.events.assert_no_secret(&secret);

    // Proven: forwarded with the key.
    setup.broker.names.set_owners(&[HOST]);
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/v1/models")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.header_digests("authorization"),
            [sha256_hex(secret.bearer().as_bytes())]
        );
    });
}

/// Over plain HTTP nothing proves the server: a credential goes out only after brokerd learned
/// that the listener that answered is not an agent's (an agent may listen on the address of a
/// local service that is down). Checked once per connection, before the request is written.
#[tokio::test]
async fn a_credential_over_plain_http_goes_only_to_a_listener_that_is_not_an_agents() {
    let secret = TestSecret::generate();
    let setup = Setup::start(
        Offer::Plain,
        answer("plain service"),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let listeners = setup.broker.listeners.clone();

    // An agent's listener: refused before anything is written to it.
    listeners.set(ListenerOwner::Agent(
        CgroupPath::parse("agents/squatter").expect("cgroup"),
    ));
    let mut agent = Agent::plain(&setup.broker).await;
    let req = agent
        .request("GET", HOST, "/v1/status")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    let json = got.json();
    let reason = json["reason"].as_str().expect("reason");
    assert!(
        reason.contains("agent cgroup agents/squatter") && reason.contains("no credential"),
        "{reason}"
    );
    assert_eq!(setup.upstream.count(), 0, "no request reached the listener");
    let asked = listeners.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].1, setup.upstream.addr, "the connection's far end");
    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Denial));
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(event.status, Some(403));
    assert!(
        event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("agents/squatter")),
        "{event:?}"
    );
    setup.broker.events.assert_no_secret(&secret);

    // The service's own listener: the credential goes out.
    listeners.set(ListenerOwner::Other);
    let mut agent = Agent::plain(&setup.broker).await;
    let req = agent
        .request("GET", HOST, "/v1/status")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"plain service");
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.header_digests("authorization"),
            [sha256_hex(secret.bearer().as_bytes())]
        );
    });
    assert_eq!(
        listeners.asked().len(),
        2,
        "checked again on a new connection"
    );
}

/// Requests without a credential are not checked (an agent may call its own dev server through
/// the broker), and never share a connection with credentialed ones.
#[tokio::test]
async fn plain_http_without_a_credential_is_not_checked() {
    let setup = Setup::start(Offer::Plain, answer("plain"), TestAuthorizer::allow()).await;
    setup.broker.listeners.set(ListenerOwner::Agent(
        CgroupPath::parse("agents/dev-server").expect("cgroup"),
    ));
    let mut agent = Agent::plain(&setup.broker).await;
    let req = agent
        .request("GET", HOST, "/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(setup.broker.listeners.asked().is_empty());
}
