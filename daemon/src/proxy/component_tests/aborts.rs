//! Issue 13: requests an agent abandons are audited (items 2 and 8), and pooled upstream
//! connections are never shared across agents or credentials (item 12).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use agent_broker_core::policy::UsageReading;
use agent_broker_protocol::{AuditEvent, Decision, RequestOutcome};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt as _;
use tokio::{io::AsyncWriteExt as _, sync::Notify};
use zeroize::Zeroizing;

use super::{
    EventKind, Grant, Side,
    harness::{
        AGENT_CGROUP, Agent, AgentProto, Broker, HOST, OTHER_AGENT_CGROUP, Offer, RULE,
        SECRET_NAME, Setup, Step, TestAuthorizer, TestEvents, TestSecret, TestUpstream, full,
        grant, handler, streamed, tls_connect, within,
    },
};

/// An upstream that tells `arrived` of each request to `/hold` and never answers it; other
/// paths get 200 `ok`.
fn holding(arrived: Arc<Notify>) -> super::harness::Handler {
    handler(move |req| {
        let arrived = arrived.clone();
        async move {
            if req.uri().path() == "/hold" {
                arrived.notify_one();
                std::future::pending::<()>().await;
            }
            full(StatusCode::OK, "ok")
        }
    })
}

/// The `forwarded` record of the one request recorded so far.
fn forwarded(events: &TestEvents) -> AuditEvent {
    let raw = events.raw();
    let forwarded: Vec<_> = raw
        .iter()
        .filter(|e| e.outcome == Some(RequestOutcome::Forwarded))
        .collect();
    assert_eq!(forwarded.len(), 1, "one forwarded record: {raw:?}");
    forwarded[0].clone()
}

/// Waits for the record of how the request `id` ended.
async fn ended(events: &TestEvents, id: u64) -> AuditEvent {
    within("the record of how the request ended", async {
        loop {
            let done = events
                .raw()
                .into_iter()
                .find(|e| e.request_id == Some(id) && e.outcome != Some(RequestOutcome::Forwarded));
            if let Some(done) = done {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Asserts `forwarded` is the record of an allowed request carrying the test secret, written
/// before the upstream had it, and `done` says it was cancelled by the agent.
fn assert_cancelled(forwarded: &AuditEvent, done: &AuditEvent, status: Option<u16>) {
    assert_eq!(forwarded.kind, Some(EventKind::Request));
    assert_eq!(forwarded.decision, Some(Decision::Allow));
    assert_eq!(forwarded.rule.as_deref(), Some(RULE));
    assert_eq!(forwarded.secrets, [SECRET_NAME]);
    assert_eq!(forwarded.host.as_deref(), Some(HOST));
    assert_eq!(forwarded.status, None);
    assert!(forwarded.request_id.is_some());
    assert_eq!(done.outcome, Some(RequestOutcome::Cancelled));
    assert_eq!(done.kind, Some(EventKind::Request));
    assert_eq!(done.decision, Some(Decision::Allow));
    assert_eq!(done.secrets, [SECRET_NAME]);
    assert_eq!(done.side, Some(Side::Agent));
    assert_eq!(done.status, status);
    assert!(
        done.reason
            .as_deref()
            .is_some_and(|r| r.contains("the agent went away")),
        "{:?}",
        done.reason
    );
}

/// An agent that closes its HTTP/1.1 connection while the upstream works on its request: the
/// request was recorded as forwarded before the upstream had it, and as cancelled when the
/// agent went away; the grant was told (a budget charges it).
#[tokio::test]
async fn an_h1_agent_that_hangs_up_before_the_answer_is_recorded_as_cancelled() {
    let secret = TestSecret::generate();
    let arrived = Arc::new(Notify::new());
    let setup = Setup::start(
        Offer::H1,
        holding(arrived.clone()),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut tls = tls_connect(setup.broker.addr, &setup.broker.ca, HOST, &[b"http/1.1"])
        .await
        .expect("TLS to the broker");
    let request = format!("POST /hold HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 2\r\n\r\n{{}}");
    tls.write_all(request.as_bytes()).await.expect("write");
    tls.flush().await.expect("flush");
    within("the request reaching the upstream", arrived.notified()).await;
    let forwarded = forwarded(&setup.broker.events);
    // Closed (close_notify and FIN) before any answer.
    let _ = tls.shutdown().await;
    drop(tls);
    let done = ended(&setup.broker.events, forwarded.request_id.expect("id")).await;
    assert_cancelled(&forwarded, &done, None);
    assert_eq!(done.bytes_in, 2);
    assert_eq!(setup.upstream.count(), 1, "the upstream had the request");
    let charged = setup.broker.authorizer.completions(1).await;
    assert_eq!(charged[0].bytes_in, 2);
    assert!(
        matches!(charged[0].usage, Some(UsageReading::Unreadable { .. })),
        "{:?}",
        charged[0].usage
    );
    setup.broker.events.assert_no_secret(&secret);
}

/// Sends `req` on an HTTP/2 connection and returns the pending response (the request is on its
/// way once this returns).
async fn h2_send(
    agent: &mut Agent,
    req: http::Request<super::harness::AgentBody>,
) -> impl Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>> + use<> {
    let Agent::H2(sender) = agent else {
        panic!("an HTTP/2 agent")
    };
    sender.ready().await.expect("h2 connection ready");
    sender.send_request(req)
}

/// An agent that resets its HTTP/2 stream while the upstream works on its request: recorded as
/// forwarded, then cancelled; its other requests on the connection still succeed.
#[tokio::test]
async fn an_h2_agent_that_resets_its_stream_before_the_answer_is_recorded_as_cancelled() {
    let secret = TestSecret::generate();
    let arrived = Arc::new(Notify::new());
    let setup = Setup::start(
        Offer::H2,
        holding(arrived.clone()),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("POST", HOST, "/hold")
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let pending = h2_send(&mut agent, req).await;
    within("the request reaching the upstream", arrived.notified()).await;
    let forwarded = forwarded(&setup.broker.events);
    // Dropping the response future resets the stream (RST_STREAM CANCEL).
    drop(pending);
    let done = ended(&setup.broker.events, forwarded.request_id.expect("id")).await;
    assert_cancelled(&forwarded, &done, None);
    // The connection carries on.
    let req = agent
        .request("GET", HOST, "/after")
        .body(super::harness::empty())
        .expect("request");
    let after = agent.fetch(req).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.body, b"ok");
    setup.broker.events.assert_no_secret(&secret);
}

/// An agent that stops reading a stream after its first event: recorded as cancelled with the
/// status and bytes it got, and the usage the stream reported before is what the grant is told,
/// marked unreadable (a budget charges an estimate, never zero).
#[tokio::test]
async fn an_agent_that_drops_a_stream_before_its_usage_is_recorded_as_cancelled() {
    let secret = TestSecret::generate();
    let never = Arc::new(Notify::new());
    let gate = never.clone();
    let first: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n";
    let upstream = handler(move |_req| {
        let gate = gate.clone();
        async move {
            let mut response = streamed(vec![Step::Data(first.to_vec()), Step::Gate(gate)]);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            response
        }
    });
    let setup = Setup::start(Offer::H2, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("POST", HOST, "/v1/messages")
        .body(super::harness::empty())
        .expect("request");
    let response = agent.send(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let frame = within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("data");
    assert_eq!(frame.data_ref().map(|d| d.len()), Some(first.len()));
    drop(body);
    let forwarded = forwarded(&setup.broker.events);
    let done = ended(&setup.broker.events, forwarded.request_id.expect("id")).await;
    assert_cancelled(&forwarded, &done, Some(200));
    assert_eq!(done.bytes_out, first.len() as u64);
    let charged = setup.broker.authorizer.completions(1).await;
    assert!(
        matches!(
            charged[0].usage,
            Some(UsageReading::Unreadable {
                partial: Some(26),
                ..
            })
        ),
        "{:?}",
        charged[0].usage
    );
}

/// A response far larger than any capture (n > 1, logprobs) with its usage at the very end:
/// the usage is read as the body streams.
#[tokio::test]
async fn usage_at_the_end_of_a_large_response_is_read() {
    let secret = TestSecret::generate();
    let mut body = br#"{"choices":["#.to_vec();
    while body.len() < 1 << 20 {
        body.extend_from_slice(br#"{"text":"0123456789abcdef","logprobs":[0.1,0.2,0.3]},"#);
    }
    body.extend_from_slice(br#"{}],"usage":{"prompt_tokens":3000,"completion_tokens":10000}}"#);
    let len = body.len();
    let upstream = handler(move |_req| {
        let body = body.clone();
        async move {
            let chunks = body.chunks(16 * 1024).map(|c| Step::Data(c.to_vec()));
            streamed(chunks.collect())
        }
    });
    let setup = Setup::start(Offer::H1, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("POST", HOST, "/v1/chat/completions")
        .body(super::harness::empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.body.len(), len);
    let charged = setup.broker.authorizer.completions(1).await;
    assert_eq!(charged[0].usage, Some(UsageReading::Reported(13000)));
    let seen = setup.upstream.single(|s| s.header("accept-encoding"));
    assert_eq!(
        seen,
        ["identity"],
        "a metered response is asked for uncompressed"
    );
}

/// An upstream that authenticates connections: once a request on a connection carried an
/// `Authorization` header, every later request on it is answered as authenticated.
async fn authenticating_upstream(offer: Offer) -> TestUpstream {
    TestUpstream::per_connection(offer, || {
        let authenticated = Arc::new(AtomicBool::new(false));
        handler(move |req| {
            let authenticated = authenticated.clone();
            async move {
                if req.headers().contains_key(header::AUTHORIZATION) {
                    authenticated.store(true, Ordering::SeqCst);
                }
                let body = if authenticated.load(Ordering::SeqCst) {
                    "authenticated"
                } else {
                    "anonymous"
                };
                full(StatusCode::OK, body)
            }
        })
    })
    .await
}

/// Injects the secret into the first agent's requests to `/with-key`, nothing elsewhere.
fn injecting_for_the_first_agent(secret: &TestSecret) -> TestAuthorizer {
    let value = secret.bearer();
    let needle = Zeroizing::new(secret.expose().as_bytes().to_vec());
    TestAuthorizer::new(move |facts, parts| {
        if facts.origin.cgroup.as_str() != AGENT_CGROUP || parts.uri.path() != "/with-key" {
            return Ok(grant());
        }
        let mut v = HeaderValue::from_str(&value).expect("header value");
        v.set_sensitive(true);
        parts.headers.insert(header::AUTHORIZATION, v);
        Ok(Grant {
            rule: RULE.into(),
            secrets: vec![SECRET_NAME.into()],
            needles: vec![needle.clone()],
            ..Grant::default()
        })
    })
}

async fn body_of(agent: &mut Agent, path: &str) -> Vec<u8> {
    let req = agent
        .request("GET", HOST, path)
        .body(super::harness::empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    got.body
}

/// Item 12: a connection the upstream authenticated for one agent's credential never carries
/// another agent's request, nor the same agent's request without the credential.
async fn no_shared_authenticated_connection(offer: Offer, proto: AgentProto) {
    let secret = TestSecret::generate();
    let upstream = authenticating_upstream(offer).await;
    let broker = Broker::start(
        injecting_for_the_first_agent(&secret),
        &upstream.ca_pem,
        upstream.addr,
        Default::default(),
    )
    .await;
    let mut victim = Agent::tls(&broker, HOST, proto).await;
    let mut attacker = Agent::tls_at(&broker, broker.other_agent, HOST, proto).await;
    assert_eq!(body_of(&mut victim, "/with-key").await, b"authenticated");
    // The attacker sends no credential, before and after the victim's next call.
    assert_eq!(body_of(&mut attacker, "/steal").await, b"anonymous");
    assert_eq!(body_of(&mut victim, "/with-key").await, b"authenticated");
    assert_eq!(body_of(&mut attacker, "/steal").await, b"anonymous");
    // The victim's own requests without the credential are not served as its credential's.
    assert_eq!(body_of(&mut victim, "/plain").await, b"anonymous");
    let events = broker.events.wait_for(5).await;
    let agents: Vec<_> = events.iter().filter_map(|e| e.cgroup.as_deref()).collect();
    assert_eq!(
        agents,
        [
            AGENT_CGROUP,
            OTHER_AGENT_CGROUP,
            AGENT_CGROUP,
            OTHER_AGENT_CGROUP,
            AGENT_CGROUP
        ]
    );
}

#[tokio::test]
async fn pooled_h1_connections_are_not_shared_across_agents_or_credentials() {
    no_shared_authenticated_connection(Offer::H1, AgentProto::H1).await;
}

#[tokio::test]
async fn pooled_h2_connections_are_not_shared_across_agents_or_credentials() {
    no_shared_authenticated_connection(Offer::H2, AgentProto::H2).await;
}
