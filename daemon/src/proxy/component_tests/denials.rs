//! A request the authorizer denies gets the denial as JSON, is recorded, and never reaches the
//! upstream.

use crate::proxy::DenialReason;
use std::time::Duration;

use agent_broker_core::handle::{HandleDenial, HandleId};
use agent_broker_protocol::Decision;

use bytes::Bytes;
use http::{StatusCode, header};
use http_body_util::Full;

use super::{
    Denial, EventKind,
    harness::{
        AgentProto, HOST, Offer, RULE, Setup, TestAuthorizer, answer, assert_denial,
        assert_denied_event, assert_origin, empty, grant,
    },
};

#[tokio::test]
async fn a_denied_request_gets_the_reason_as_json_and_is_recorded() {
    let authorizer = TestAuthorizer::deny(|| Denial {
        rule: Some(RULE.into()),
        ..Denial::forbidden(DenialReason::Policy(
            "no rule allows POST /v1/files for agents/component-test".into(),
        ))
    });
    let setup = Setup::start(Offer::H1, answer("never"), authorizer).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("POST", HOST, "/v1/files?purpose=fine-tune")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(b"{\"file\":\"x\"}")))
        .expect("request");
    let got = agent.fetch(req).await;
    let json = assert_denial(
        &got,
        StatusCode::FORBIDDEN,
        "no rule allows POST /v1/files for agents/component-test",
    );
    // The whole body, as `deny` writes it.
    assert_eq!(
        json,
        serde_json::json!({
            "error": "denied by agent-broker",
            "reason": "no rule allows POST /v1/files for agents/component-test",
            "agent": "agents/component-test",
            "rule": RULE,
        })
    );
    assert_eq!(got.header("retry-after"), None);

    let event = setup.broker.events.single().await;
    assert_denied_event(
        &event,
        StatusCode::FORBIDDEN,
        "no rule allows POST /v1/files",
    );
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert_eq!(event.host.as_deref(), Some(HOST));
    assert_eq!(event.sni.as_deref(), Some(HOST));
    assert_eq!(event.method.as_deref(), Some("POST"));
    assert_eq!(
        event.path.as_deref(),
        Some("/v1/files"),
        "the query is never recorded"
    );
    assert!(event.secrets.is_empty());
    assert_origin(&event, setup.upstream.addr);

    assert_eq!(setup.broker.authorizer.requests().len(), 1);
    assert_eq!(setup.upstream.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_rate_limited_request_gets_429_with_retry_after_rounded_up_over_h2() {
    let authorizer = TestAuthorizer::deny(|| Denial {
        status: StatusCode::TOO_MANY_REQUESTS,
        retry_after: Some(Duration::from_millis(1500)),
        rule: Some(RULE.into()),
        ..Denial::forbidden(DenialReason::Limit(
            "rate limit of 1 request per minute reached".into(),
        ))
    });
    let setup = Setup::start(Offer::H2, answer("never"), authorizer).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/v1")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_denial(
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate limit of 1 request",
    );
    assert_eq!(
        got.header("retry-after"),
        Some("2"),
        "whole seconds, rounded up"
    );

    let event = setup.broker.events.single().await;
    assert_denied_event(&event, StatusCode::TOO_MANY_REQUESTS, "rate limit");
    assert_eq!(setup.upstream.count(), 0);
}

#[tokio::test]
async fn a_handle_misuse_is_recorded_as_such() {
    let authorizer = TestAuthorizer::deny(|| {
        Denial::forbidden(
            HandleDenial::Revoked {
                id: HandleId::parse("h_0123abcd").expect("id"),
            }
            .into(),
        )
    });
    let setup = Setup::start(Offer::H1, answer("never"), authorizer).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_denial(&got, StatusCode::FORBIDDEN, "handle h_0123abcd was revoked");

    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::HandleMisuse));
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(setup.upstream.count(), 0);
}

/// Each request on a kept-alive connection is decided afresh: a denied one (with a body the
/// agent already sent) does not spoil the connection or the next request.
#[tokio::test]
async fn after_a_denial_the_connection_serves_the_next_request() {
    let authorizer = TestAuthorizer::new(|_, parts| {
        if parts.uri.path() == "/denied" {
            Err(Denial::forbidden(DenialReason::Policy(
                "this path is denied".into(),
            )))
        } else {
            Ok(grant())
        }
    });
    let setup = Setup::start(Offer::H1, answer("allowed"), authorizer).await;
    for proto in [AgentProto::H1, AgentProto::H2] {
        let mut agent = setup.agent(proto).await;
        let denied = agent
            .request("PUT", HOST, "/denied")
            .body(Full::new(Bytes::from(vec![b'x'; 32 * 1024])))
            .expect("request");
        assert_denial(&agent.fetch(denied).await, StatusCode::FORBIDDEN, "denied");
        let allowed = agent
            .request("GET", HOST, "/ok")
            .body(empty())
            .expect("request");
        let got = agent.fetch(allowed).await;
        assert_eq!(got.status, StatusCode::OK, "{proto:?}");
        assert_eq!(got.body, b"allowed");
    }
    assert_eq!(setup.upstream.count(), 2, "only the allowed requests");
    let events = setup.broker.events.wait_for(4).await;
    let decisions: Vec<_> = events.iter().map(|e| e.decision).collect();
    let (allow, deny) = (Some(Decision::Allow), Some(Decision::Deny));
    assert_eq!(decisions, [deny, allow, deny, allow]);
}
