//! Content codings: a request that carries an injected secret asks the upstream for
//! `identity`; a response compressed anyway (gzip, deflate, br, zstd) is decoded, scrubbed and
//! sent as identity, a bomb is cut, and a coding brokerd cannot decode is withheld (502).
//! Without an injection, codings pass through untouched.

use agent_broker_protocol::Decision;
use http::{StatusCode, header};

use super::{
    EventKind, PLACEHOLDER, Side,
    harness::{
        AgentProto, HOST, Handler, Offer, RULE, SECRET_NAME, Setup, TestAuthorizer, TestSecret,
        assert_no_secret, empty, full, handler,
    },
};
use crate::proxy::decode::{Coding, testing::encode};

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
async fn with_an_injection_a_compressed_answer_is_decoded_scrubbed_and_sent_as_identity() {
    for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd] {
        let secret = TestSecret::generate();
        let plain = [b"echo: ".as_slice(), secret.expose().as_bytes(), b" end"].concat();
        let name = match coding {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        };
        let setup = Setup::start(
            Offer::H1,
            encoded_answer(name, encode(coding, &plain)),
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
        assert_eq!(got.status, StatusCode::OK, "{name}");
        assert_no_secret(&got.body, &secret, "the decoded response");
        assert_eq!(
            got.body,
            [b"echo: ".as_slice(), PLACEHOLDER, b" end"].concat(),
            "{name}"
        );
        assert_eq!(
            got.header("content-encoding"),
            None,
            "{name}: a removed coding advertised"
        );
        assert_eq!(got.header("content-length"), None, "{name}");
        setup.upstream.single(|seen| {
            assert_eq!(
                seen.header("accept-encoding"),
                ["identity"],
                "the agent's codings replaced"
            );
        });
        let event = setup.broker.events.single().await;
        assert_eq!(event.kind, Some(EventKind::Request));
        assert_eq!(event.status, Some(200));
        let reason = event.reason.as_deref().unwrap_or("");
        assert!(
            reason.contains("quoted a secret value of the agent's policy 1 time"),
            "{name}: the record says the response was scrubbed: {reason}"
        );
        setup.broker.events.assert_no_secret(&secret);
    }
}

#[tokio::test]
async fn with_an_injection_an_unknown_or_stacked_coding_is_withheld() {
    for coding in ["compress", "gzip, br"] {
        let secret = TestSecret::generate();
        // Whatever the coding, the body holds the secret in the clear: it must not get out.
        let body = secret.expose().as_bytes().to_vec();
        let setup = Setup::start(
            Offer::H1,
            encoded_answer(coding, body),
            TestAuthorizer::injecting(&secret),
        )
        .await;
        let mut agent = setup.agent(AgentProto::H2).await;
        let req = agent
            .request("GET", HOST, "/v1")
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        assert_no_secret(&got.body, &secret, "the withheld response");
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{coding}");
        assert_eq!(got.header("content-encoding"), None);
        let json = got.json();
        assert_eq!(json["error"], "response withheld by agent-broker");
        assert_eq!(json["rule"], RULE);
        let reason = json["reason"].as_str().expect("reason");
        assert!(
            reason.contains("cannot be checked for the credential"),
            "{reason}"
        );
        let event = setup.broker.events.single().await;
        assert_eq!(event.decision, Some(Decision::Allow));
        assert_eq!(event.side, Some(Side::Upstream));
        assert_eq!(event.status, Some(502));
        assert_eq!(event.secrets, [SECRET_NAME]);
        setup.broker.events.assert_no_secret(&secret);
    }
}

#[tokio::test]
async fn with_an_injection_a_compression_bomb_gets_a_502() {
    let secret = TestSecret::generate();
    // 64 MiB of zeros in about 64 KiB: far past the expansion limit, caught in its first
    // bytes, before the response head goes out.
    let bomb = encode(Coding::Gzip, &vec![0u8; 64 << 20]);
    let setup = Setup::start(
        Offer::H1,
        encoded_answer("gzip", bomb),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/bomb")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let reason = got.json()["reason"].as_str().expect("reason").to_string();
    assert!(reason.contains("compression bomb"), "{reason}");
    let event = setup.broker.events.single().await;
    assert_eq!(event.side, Some(Side::Upstream));
    assert_eq!(event.status, Some(502));
    assert!(
        event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("compression bomb")),
        "{:?}",
        event.reason
    );
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
