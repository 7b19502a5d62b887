//! Content codings: a compressed echo of a secret could not be scrubbed, so a request that
//! carries an injected secret asks the upstream for `identity`, and a response encoded anyway
//! is withheld (502). Without an injection, codings pass through untouched.

use agent_broker_protocol::Decision;
use http::{StatusCode, header};

use super::{
    EventKind, PLACEHOLDER, Side,
    harness::{
        AgentProto, HOST, Handler, Offer, RULE, SECRET_NAME, Setup, TestAuthorizer, TestSecret,
        assert_no_secret, empty, full, handler,
    },
};

/// An upstream answering with `content-encoding: <coding>` and `body`.
fn encoded_answer(coding: &'static str, body: Vec<u8>) -> Handler {
    handler(move |_req| {
        let body = body.clone();
        async move {
            let mut response = full(StatusCode::OK, body);
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, coding.parse().expect("coding"));
            response
        }
    })
}

#[tokio::test]
async fn with_an_injection_identity_is_asked_for_and_an_encoded_answer_is_withheld() {
    let secret = TestSecret::generate();
    // Not really gzip: the coding is what counts. It holds the secret in the clear, which the
    // agent must not get either.
    let body = [b"\x1f\x8b\x08\x00".as_slice(), secret.expose().as_bytes()].concat();
    let setup = Setup::start(
        Offer::H1,
        encoded_answer("gzip", body),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/v1")
        .header(header::ACCEPT_ENCODING, "gzip, br")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_no_secret(&got.body, &secret, "the withheld response");
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("content-encoding"), None);
    let json = got.json();
    assert_eq!(json["error"], "response withheld by agent-broker");
    assert_eq!(json["rule"], RULE);
    let reason = json["reason"].as_str().expect("reason");
    assert!(
        reason.contains("sent an encoded (compressed) response to a request carrying a credential"),
        "{reason}"
    );
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.header("accept-encoding"),
            ["identity"],
            "the agent's codings replaced"
        );
    });

    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.side, Some(Side::Upstream));
    assert_eq!(event.status, Some(502));
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert_eq!(event.secrets, [SECRET_NAME]);
    setup.broker.events.assert_no_secret(&secret);
}

#[tokio::test]
async fn with_an_injection_an_identity_coded_answer_passes_scrubbed() {
    let secret = TestSecret::generate();
    let body = [b"echo:".as_slice(), secret.expose().as_bytes()].concat();
    let setup = Setup::start(
        Offer::H2,
        encoded_answer("identity", body),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    // An agent that asks for nothing still gets identity asked for on its behalf.
    let req = agent
        .request("GET", HOST, "/v1")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-encoding"), Some("identity"));
    assert_eq!(got.body, [b"echo:".as_slice(), PLACEHOLDER].concat());
    setup.upstream.single(|seen| {
        assert_eq!(seen.header("accept-encoding"), ["identity"]);
    });
}

#[tokio::test]
async fn without_an_injection_codings_pass_through() {
    let compressed = b"\x1f\x8b\x08\x00compressed bytes".to_vec();
    let setup = Setup::start(
        Offer::H2,
        encoded_answer("gzip", compressed.clone()),
        TestAuthorizer::allow(),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/v1")
        .header(header::ACCEPT_ENCODING, "gzip, br")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(got.body, compressed);
    setup.upstream.single(|seen| {
        assert_eq!(seen.header("accept-encoding"), ["gzip, br"]);
    });
}
