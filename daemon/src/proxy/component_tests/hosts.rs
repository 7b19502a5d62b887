//! SNI, Host and :authority must agree (ARCHITECTURE invariant 2): a request naming another
//! host than the TLS server name is denied before the authorizer or the upstream sees it.

use agent_broker_protocol::Decision;
use http::{StatusCode, Version, header};

use super::{
    EventKind,
    harness::{
        Agent, AgentBody, AgentProto, HOST, OTHER, Offer, Setup, TestAuthorizer, answer,
        assert_denial, assert_denied_event, assert_origin, empty,
    },
};

/// A request whose host agrees with the SNI reaches the upstream, which sees that host, and
/// is recorded as allowed.
async fn agreement_passes(proto: AgentProto, host_as_sent: &str) {
    let setup = Setup::start(Offer::H2, answer("hello"), TestAuthorizer::allow()).await;
    let mut agent = setup.agent(proto).await;
    let req = agent
        .request("GET", host_as_sent, "/v1/models?limit=2")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"hello");
    let want_version = match proto {
        AgentProto::H1 => Version::HTTP_11,
        AgentProto::H2 => Version::HTTP_2,
    };
    assert_eq!(got.version, want_version, "the agent's protocol");

    let port = setup.upstream.addr.port();
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.authority.as_deref(),
            Some(format!("{HOST}:{port}").as_str())
        );
        assert_eq!(seen.target, "/v1/models?limit=2");
    });
    let asked = setup.broker.authorizer.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        asked[0].host, HOST,
        "the authorizer gets the agreed host, lowercase"
    );
    assert_eq!(asked[0].port, port);
    assert!(asked[0].tls);
    assert_eq!(
        setup.broker.authorizer.connections(),
        [None, Some(HOST.into())]
    );

    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.sni.as_deref(), Some(HOST));
    assert_eq!(event.host.as_deref(), Some(HOST));
    assert_eq!(event.status, Some(200));
    assert_eq!(event.method.as_deref(), Some("GET"));
    assert_eq!(
        event.path.as_deref(),
        Some("/v1/models"),
        "the query is never recorded"
    );
    assert_origin(&event, setup.upstream.addr);
}

/// A request that `build` makes disagree with the SNI is denied with a reason containing
/// `reason`; neither the authorizer nor the upstream sees it.
async fn disagreement_is_denied(
    proto: AgentProto,
    build: impl FnOnce(&Agent) -> http::Request<AgentBody>,
    reason: &str,
) {
    let setup = Setup::start(Offer::H2, answer("hello"), TestAuthorizer::allow()).await;
    let mut agent = setup.agent(proto).await;
    let req = build(&agent);
    let got = agent.fetch(req).await;
    let json = assert_denial(&got, StatusCode::FORBIDDEN, reason);
    assert!(json.get("rule").is_none(), "no rule decided this");

    let event = setup.broker.events.single().await;
    assert_denied_event(&event, StatusCode::FORBIDDEN, reason);
    assert_eq!(event.sni.as_deref(), Some(HOST));
    assert_eq!(event.host, None, "no agreed host");
    assert_origin(&event, setup.upstream.addr);
    assert!(
        setup.broker.authorizer.requests().is_empty(),
        "never authorized"
    );
    assert_eq!(setup.upstream.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn h1_host_agreeing_with_sni_passes_whatever_its_case_and_port() {
    agreement_passes(AgentProto::H1, "API.Example.TEST:443").await;
}

#[tokio::test]
async fn h2_authority_agreeing_with_sni_passes() {
    agreement_passes(AgentProto::H2, HOST).await;
}

#[tokio::test]
async fn h1_host_other_than_sni_is_denied() {
    disagreement_is_denied(
        AgentProto::H1,
        |agent| {
            agent
                .request("GET", OTHER, "/")
                .body(empty())
                .expect("request")
        },
        &format!("the request is for host {OTHER} but the TLS server name (SNI) is {HOST}"),
    )
    .await;
}

#[tokio::test]
async fn h1_absolute_uri_naming_another_host_than_host_header_is_denied() {
    disagreement_is_denied(
        AgentProto::H1,
        |_| {
            http::Request::get(format!("https://{OTHER}/v1"))
                .header(header::HOST, HOST)
                .body(empty())
                .expect("request")
        },
        &format!("the request names two hosts: :authority {OTHER} and Host {HOST}"),
    )
    .await;
}

#[tokio::test]
async fn h1_request_without_host_is_denied() {
    disagreement_is_denied(
        AgentProto::H1,
        |_| http::Request::get("/v1").body(empty()).expect("request"),
        "the request names no host",
    )
    .await;
}

#[tokio::test]
async fn h2_authority_other_than_sni_is_denied() {
    disagreement_is_denied(
        AgentProto::H2,
        |agent| {
            agent
                .request("GET", OTHER, "/")
                .body(empty())
                .expect("request")
        },
        &format!("the request is for host {OTHER} but the TLS server name (SNI) is {HOST}"),
    )
    .await;
}

#[tokio::test]
async fn h2_host_header_other_than_authority_is_denied() {
    disagreement_is_denied(
        AgentProto::H2,
        |agent| {
            agent
                .request("GET", HOST, "/")
                .header(header::HOST, OTHER)
                .body(empty())
                .expect("request")
        },
        &format!("the request names two hosts: :authority {HOST} and Host {OTHER}"),
    )
    .await;
}

/// Without SNI the leaf is minted for the dialed address, and the request must name that
/// address: a host name is denied, the address passes (on the same connection).
#[tokio::test]
async fn without_sni_the_host_must_be_the_dialed_address() {
    let setup = Setup::start(Offer::H1, answer("by address"), TestAuthorizer::allow()).await;
    let ip = setup.upstream.addr.ip().to_string();
    let mut agent = Agent::tls(&setup.broker, &ip, AgentProto::H1).await;

    let named = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    let got = agent.fetch(named).await;
    let reason = format!(
        "the request is for host {HOST} but the IP address the agent connected to (no SNI was \
         sent) is {ip}"
    );
    assert_denial(&got, StatusCode::FORBIDDEN, &reason);
    assert_eq!(setup.upstream.count(), 0);

    let by_address = agent
        .request("GET", &ip, "/")
        .body(empty())
        .expect("request");
    let got = agent.fetch(by_address).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"by address");
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.authority.as_deref(),
            Some(setup.upstream.addr.to_string().as_str())
        );
    });

    let events = setup.broker.events.wait_for(2).await;
    assert_denied_event(&events[0], StatusCode::FORBIDDEN, &reason);
    assert_eq!(events[0].sni, None);
    assert_eq!(events[1].decision, Some(Decision::Allow));
    assert_eq!(events[1].host.as_deref(), Some(ip.as_str()));
    assert_eq!(setup.broker.authorizer.connections(), [None, None]);
}
