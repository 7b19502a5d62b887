//! Streams and deadlines: a stream has no total deadline, an upstream that sends no response
//! head in time gets the agent a 504, and a body the upstream cuts or stalls is cut for the
//! agent too (never presented as complete) and recorded as the upstream's failure.

use std::{sync::Arc, time::Duration};

use agent_broker_protocol::Decision;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use tokio::sync::Notify;

use super::{
    Deadlines, Grant, Side,
    harness::{
        AgentProto, HOST, Handler, Offer, Setup, Step, TestAuthorizer, TestBody, empty, handler,
        streamed, within,
    },
};

const SHORT: Duration = Duration::from_millis(300);

fn quick_head() -> Deadlines {
    Deadlines {
        response_head: SHORT,
        ..Deadlines::default()
    }
}

fn quick_idle() -> Deadlines {
    Deadlines {
        body_idle: SHORT,
        ..Deadlines::default()
    }
}

#[tokio::test]
async fn an_upstream_that_sends_no_response_head_in_time_gets_the_agent_a_504() {
    let upstream = handler(|_req| std::future::pending::<Response<TestBody>>());
    let setup =
        Setup::with_deadlines(Offer::H1, upstream, TestAuthorizer::allow(), quick_head()).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/slow")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    let json = got.json();
    assert_eq!(json["error"], "upstream timed out");
    let reason = json["reason"].as_str().expect("reason");
    assert!(reason.contains("sent no response within"), "{reason}");
    let event = setup.broker.events.single().await;
    assert_eq!(event.status, Some(504));
    assert_eq!(event.side, Some(Side::Upstream));
    assert_eq!(event.decision, Some(Decision::Allow));
}

/// An upstream that sends one event, then nothing until `never` is notified.
fn one_event_then_silence(never: &Arc<Notify>) -> Handler {
    let never = never.clone();
    handler(move |_req| {
        let steps = vec![
            Step::Data(b"data: one\n\n".to_vec()),
            Step::Gate(never.clone()),
        ];
        async move { streamed(steps) }
    })
}

/// A stream whose upstream pauses longer than the idle deadline: the agent gets what came
/// before, then an error (h1: no terminal chunk; h2: a reset stream), and the record says the
/// upstream stalled.
async fn a_stalled_stream_is_cut(proto: AgentProto) {
    let never = Arc::new(Notify::new());
    let upstream = one_event_then_silence(&never);
    let setup =
        Setup::with_deadlines(Offer::H2, upstream, TestAuthorizer::allow(), quick_idle()).await;
    let mut agent = setup.agent(proto).await;
    let req = agent
        .request("GET", HOST, "/sse")
        .body(empty())
        .expect("request");
    let response = agent.send(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("the first event arrives");
    assert_eq!(
        first.into_data().ok(),
        Some(Bytes::from_static(b"data: one\n\n"))
    );
    let next = within("the cut", async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) if frame.is_data() => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(next, Some(Err(_))),
        "the agent must see the stream cut, not a complete body: {next:?}"
    );
    let event = setup.broker.events.single().await;
    assert_eq!(event.side, Some(Side::Upstream));
    let reason = event.reason.expect("why the stream ended");
    assert!(reason.contains("stream was cut"), "{reason}");
    assert_eq!(event.bytes_out, 11);
    never.notify_waiters();
}

#[tokio::test]
async fn a_stalled_stream_is_cut_for_an_h1_agent() {
    a_stalled_stream_is_cut(AgentProto::H1).await;
}

#[tokio::test]
async fn a_stalled_stream_is_cut_for_an_h2_agent() {
    a_stalled_stream_is_cut(AgentProto::H2).await;
}

/// An upstream that promises more bytes than it sends, then closes: the agent's stream is cut,
/// never completed.
#[tokio::test]
async fn a_stream_the_upstream_cuts_is_cut_for_the_agent() {
    let upstream = handler(|_req| async {
        let mut response = streamed(vec![
            Step::Data(b"only part".to_vec()),
            Step::Pause(Duration::from_millis(100)),
        ]);
        response.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("1000"),
        );
        response
    });
    let setup = Setup::start(Offer::H1, upstream, TestAuthorizer::allow()).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/cut")
        .body(empty())
        .expect("request");
    let response = agent.send(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let collected = within("the body", response.into_body().collect()).await;
    assert!(collected.is_err(), "a cut body must not arrive as complete");
    let event = setup.broker.events.single().await;
    assert_eq!(event.side, Some(Side::Upstream));
    assert!(
        event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("stream was cut")),
        "{:?}",
        event.reason
    );
}

/// gRPC over h2 needs `te: trailers` (the one TE value HTTP/2 allows); any other TE value is
/// hop-by-hop and dropped.
#[tokio::test]
async fn te_trailers_reaches_the_upstream_and_nothing_else_of_te_does() {
    for (sent, forwarded) in [("trailers", Some("trailers")), ("gzip", None)] {
        let setup = Setup::start(
            Offer::H2,
            handler(|_req| async { streamed(vec![Step::Data(b"ok".to_vec())]) }),
            TestAuthorizer::allow(),
        )
        .await;
        let mut agent = setup.agent(AgentProto::H1).await;
        let req = agent
            .request("POST", HOST, "/grpc.Service/Call")
            .header(http::header::TE, sent)
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        assert_eq!(got.status, StatusCode::OK);
        setup.upstream.single(|seen| {
            let te = seen.header("te");
            assert_eq!(te.first().map(String::as_str), forwarded, "TE {sent}");
        });
    }
}

/// A rule's `idle_timeout` (in the grant) overrides the proxy's default for its responses.
#[tokio::test]
async fn the_grant_sets_how_long_a_stream_may_pause() {
    let never = Arc::new(Notify::new());
    let upstream = one_event_then_silence(&never);
    let authorizer = TestAuthorizer::new(|_, _| {
        Ok(Grant {
            rule: "test rule".into(),
            idle_timeout: Some(SHORT),
            ..Grant::default()
        })
    });
    // The proxy's own default is minutes: only the grant's deadline can cut this in time.
    let setup = Setup::start(Offer::H2, upstream, authorizer).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/sse")
        .body(empty())
        .expect("request");
    let mut body = agent.send(req).await.into_body();
    let cut = within("the cut", async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(matches!(cut, Some(Err(_))), "{cut:?}");
    never.notify_waiters();
}
