//! The paths around the scrubber an independent attack run found (issue 13): a key quoted in a
//! gRPC trailer, in an HTTP/1.1 reason phrase, in a header's name, under a transfer coding, in
//! WebSocket frames after an upgrade, or stored by one request and read back by another; and
//! `Connection` naming the headers a decision rests on. Each test fails without its fix: the
//! key reaches the agent, or the upstream gets a request the decision did not see.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_broker_protocol::Decision;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use hyper::{body::Incoming, ext::ReasonPhrase};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tungstenite::protocol::frame::{
    FrameHeader,
    coding::{Control, Data, OpCode},
};
use zeroize::Zeroizing;

use super::{
    EventKind, PLACEHOLDER, Side,
    harness::{
        AgentProto, HOST, Handler, Offer, RULE, SECRET_NAME, Setup, Step, TestAuthorizer,
        TestSecret, assert_no_secret, contains, empty, full, grant, handler, sha256_hex, streamed,
        within,
    },
};
use crate::proxy::{
    Denial, DenialReason, Grant, Needles,
    decode::{Coding, testing::encode},
};

/// An authorizer for an agent whose policy injects `secret` somewhere, but not into these
/// requests: nothing is injected, yet every response is scrubbed of it.
fn policy_knows(secret: &TestSecret) -> TestAuthorizer {
    let set =
        Needles::new(vec![Zeroizing::new(secret.expose().as_bytes().to_vec())]).expect("needles");
    TestAuthorizer::new(move |_, _| {
        Ok(Grant {
            scrub: set.clone(),
            ..grant()
        })
    })
}

/// Asserts the event of an exchange whose response quoted the key says so.
async fn assert_recorded_redaction(setup: &Setup, secret: &TestSecret) {
    let event = setup.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    let reason = event.reason.as_deref().unwrap_or("");
    assert!(
        reason.contains("quoted a secret value"),
        "the record says the response was scrubbed: {reason:?}"
    );
    setup.broker.events.assert_no_secret(secret);
}

// --- Item 3: trailers ------------------------------------------------------------------------

/// gRPC carries its error text in the `grpc-message` trailer: an API that quotes the key there
/// has it replaced, for an h2 agent of an h2 upstream (gRPC is HTTP/2).
#[tokio::test]
async fn a_key_quoted_in_a_grpc_message_trailer_is_scrubbed() {
    for offer in [Offer::H2] {
        let secret = TestSecret::generate();
        let quoted = format!("invalid API key {}", secret.expose());
        let upstream = handler(move |_req| {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("16"));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_str(&quoted).expect("value"),
            );
            async move {
                let mut response = streamed(vec![
                    Step::Data(b"\0\0\0\0\0".to_vec()),
                    Step::Trailers(trailers),
                ]);
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, "application/grpc".parse().expect("v"));
                response
            }
        });
        let setup = Setup::start(offer, upstream, TestAuthorizer::injecting(&secret)).await;
        let mut agent = setup.agent(AgentProto::H2).await;
        let req = agent
            .request("POST", HOST, "/pkg.Service/Call")
            .header(header::TE, "trailers")
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        assert_eq!(got.status, StatusCode::OK, "{offer:?}");
        let trailers = got
            .trailers
            .unwrap_or_else(|| panic!("{offer:?}: the trailers arrive"));
        assert_eq!(trailers["grpc-status"], "16", "{offer:?}");
        let message = trailers["grpc-message"].as_bytes();
        assert_no_secret(message, &secret, "grpc-message");
        assert_eq!(
            message,
            [b"invalid API key ".as_slice(), PLACEHOLDER].concat(),
            "{offer:?}"
        );
        assert_recorded_redaction(&setup, &secret).await;
    }
}

// --- Item 5: reason phrase, header names, transfer codings ----------------------------------

/// An HTTP/1.1 upstream's reason phrase reaches an HTTP/1.1 agent as it was: one quoting the
/// key has it replaced.
#[tokio::test]
async fn a_key_quoted_in_the_reason_phrase_is_scrubbed() {
    let secret = TestSecret::generate();
    let reason = format!("Bad key {}", secret.expose());
    let upstream = handler(move |_req| {
        let reason = reason.clone();
        async move {
            let mut response = full(StatusCode::UNAUTHORIZED, "no");
            response
                .extensions_mut()
                .insert(ReasonPhrase::try_from(reason.into_bytes()).expect("a reason phrase"));
            response
        }
    });
    let setup = Setup::start(Offer::H1, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    let response = agent.send(req).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let phrase = response
        .extensions()
        .get::<ReasonPhrase>()
        .map(|r| r.as_bytes().to_vec())
        .expect("a custom reason phrase arrives");
    assert_no_secret(&phrase, &secret, "the reason phrase");
    assert_eq!(phrase, [b"Bad key ".as_slice(), PLACEHOLDER].concat());
    let _ = super::harness::Received::read(response).await;
    assert_recorded_redaction(&setup, &secret).await;
}

/// A response header whose name holds the key (lowercased on the way: the check ignores case)
/// is dropped; the other headers arrive.
#[tokio::test]
async fn a_header_named_after_the_key_is_dropped() {
    // A key that is a valid header name, in mixed case.
    let secret = TestSecret::token();
    let name = format!("x-echo-{}", secret.expose().to_ascii_lowercase());
    let upstream = handler(move |_req| {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a header name");
        async move {
            let mut response = full(StatusCode::OK, "ok");
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static("1"));
            response
                .headers_mut()
                .insert("x-other", HeaderValue::from_static("kept"));
            response
        }
    });
    for proto in [AgentProto::H1, AgentProto::H2] {
        let setup = Setup::start(
            Offer::H2,
            upstream.clone(),
            TestAuthorizer::injecting(&secret),
        )
        .await;
        let mut agent = setup.agent(proto).await;
        let req = agent
            .request("GET", HOST, "/")
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        assert_eq!(got.status, StatusCode::OK);
        for name in got.headers.keys() {
            let lower = secret.expose().to_ascii_lowercase();
            assert!(
                !contains(name.as_str().as_bytes(), lower.as_bytes()),
                "{proto:?}: a header named after the key arrived"
            );
        }
        assert_eq!(got.header("x-other"), Some("kept"));
        assert_recorded_redaction(&setup, &secret).await;
    }
}

/// `Transfer-Encoding: gzip, chunked` compresses the body like a content coding: the body is
/// decoded and scrubbed (it used to pass compressed once the hop-by-hop header was gone), and a
/// transfer coding brokerd cannot decode is withheld.
#[tokio::test]
async fn a_transfer_coding_is_decoded_and_scrubbed_or_withheld() {
    fn answer(coding: &'static str, body: Vec<u8>) -> Handler {
        handler(move |_req| {
            let body = body.clone();
            async move {
                let mut response = full(StatusCode::OK, body);
                response.headers_mut().remove(header::CONTENT_LENGTH);
                response
                    .headers_mut()
                    .insert(header::TRANSFER_ENCODING, coding.parse().expect("coding"));
                response
            }
        })
    }
    let secret = TestSecret::generate();
    let plain = [b"key: ".as_slice(), secret.expose().as_bytes(), b" end"].concat();
    let setup = Setup::start(
        Offer::H1,
        answer("gzip, chunked", encode(Coding::Gzip, &plain)),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.body,
        [b"key: ".as_slice(), PLACEHOLDER, b" end"].concat()
    );
    assert!(got.header("content-encoding").is_none());

    let setup = Setup::start(
        Offer::H1,
        answer("x-unknown, chunked", plain.clone()),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_no_secret(&got.body, &secret, "the 502");
    let reason = got.json()["reason"].as_str().unwrap_or("").to_string();
    assert!(reason.contains("x-unknown"), "{reason}");
    let event = setup.broker.events.single().await;
    assert_eq!(event.side, Some(Side::Upstream));
    assert!(event.reason.as_deref().unwrap_or("").contains("withheld"));
}

// --- Item 6: Connection ----------------------------------------------------------------------

/// `Connection` naming headers no longer strips, after the decision, a header the decision
/// required, nor one the injection wrote: the policy sees the request as it goes upstream.
#[tokio::test]
async fn connection_cannot_strip_what_the_decision_rests_on() {
    let secret = TestSecret::generate();
    let key = secret.expose().to_string();
    let authorizer = TestAuthorizer::new(move |_, parts| {
        // A rule with `headers = { x-required = "yes" }` that injects x-api-key.
        if parts.headers.get("x-required").map(|v| v.as_bytes()) != Some(b"yes") {
            return Err(Denial::forbidden(DenialReason::Policy(
                "no rule allows this request: x-required must be yes".into(),
            )));
        }
        let mut value = HeaderValue::from_str(&key).expect("value");
        value.set_sensitive(true);
        parts.headers.insert("x-api-key", value);
        Ok(Grant {
            secrets: vec![SECRET_NAME.into()],
            needles: vec![Zeroizing::new(key.as_bytes().to_vec())],
            ..grant()
        })
    });
    let setup = Setup::start(Offer::H2, super::harness::answer("ok"), authorizer).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    // The required header, named hop-by-hop: the decision does not see it.
    let req = agent
        .request("GET", HOST, "/a")
        .header(header::CONNECTION, "x-required")
        .header("x-required", "yes")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(
        got.status,
        StatusCode::FORBIDDEN,
        "the rule's condition fails"
    );
    assert_eq!(setup.upstream.count(), 0, "nothing went upstream");
    // The injected header, named hop-by-hop: it still goes upstream, and the required one too.
    let req = agent
        .request("GET", HOST, "/b")
        .header(header::CONNECTION, "x-api-key, keep-alive")
        .header("x-required", "yes")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.header_digests("x-api-key"),
            vec![sha256_hex(secret.expose().as_bytes())],
            "the injected header reached the upstream"
        );
        assert_eq!(seen.header("x-required"), ["yes"]);
        assert!(seen.header("connection").is_empty());
    });
    let events = setup.broker.events.wait_for(2).await;
    assert_eq!(events[0].decision, Some(Decision::Deny));
    assert!(
        events[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("x-required must be yes")
    );
}

// --- Item 16: stored echoes --------------------------------------------------------------------

/// A key that an earlier request had the upstream store comes back in a later request that
/// injects nothing (another rule, another path): every response to the agent is scrubbed of
/// every secret its policy can inject, head, body and trailers.
#[tokio::test]
async fn a_stored_echo_of_the_key_is_scrubbed_from_a_request_that_injects_nothing() {
    let secret = TestSecret::generate();
    let stored = secret.expose().to_string();
    let upstream = handler(move |_req| {
        let stored = stored.clone();
        async move {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-stored", HeaderValue::from_str(&stored).expect("value"));
            let mut response = streamed(vec![
                Step::Data(format!("{{\"stored\":\"{stored}\"}}").into_bytes()),
                Step::Trailers(trailers),
            ]);
            response
                .headers_mut()
                .insert("x-stored", HeaderValue::from_str(&stored).expect("value"));
            response
        }
    });
    let setup = Setup::start(Offer::H2, upstream, policy_knows(&secret)).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/v1/load")
        .header(header::TE, "trailers")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.body,
        [b"{\"stored\":\"".as_slice(), PLACEHOLDER, b"\"}"].concat()
    );
    assert_eq!(got.headers["x-stored"].as_bytes(), PLACEHOLDER);
    let trailers = got.trailers.expect("trailers");
    assert_eq!(trailers["x-stored"].as_bytes(), PLACEHOLDER);
    setup.upstream.single(|seen| {
        assert_eq!(
            seen.header("accept-encoding"),
            ["identity"],
            "a response that may need scrubbing is asked for uncompressed"
        );
    });
    assert_recorded_redaction(&setup, &secret).await;
}

// --- Item 4: WebSocket -----------------------------------------------------------------------

/// A server WebSocket frame (optionally masked, which servers must not do) with `payload`.
fn ws_frame(opcode: OpCode, fin: bool, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        is_final: fin,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask,
    };
    let mut out = Vec::new();
    header
        .format(payload.len() as u64, &mut out)
        .expect("header");
    let mut body = payload.to_vec();
    if let Some(mask) = mask {
        for (i, b) in body.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    out.extend_from_slice(&body);
    out
}

/// The data messages and control frames in a server's byte stream, payloads joined.
fn ws_messages(mut bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let mut out = Vec::new();
    let mut current: Option<(OpCode, Vec<u8>)> = None;
    while !bytes.is_empty() {
        let mut cursor = std::io::Cursor::new(bytes);
        let (header, len) = FrameHeader::parse(&mut cursor)
            .expect("a valid frame")
            .expect("a whole frame");
        assert!(header.mask.is_none(), "the agent gets unmasked frames");
        assert!(!header.rsv1, "no compressed frame");
        let start = cursor.position() as usize;
        let end = start + len as usize;
        let payload = bytes[start..end].to_vec();
        bytes = &bytes[end..];
        match header.opcode {
            OpCode::Control(_) => out.push((header.opcode, payload)),
            OpCode::Data(Data::Continue) => current
                .as_mut()
                .expect("a message in progress")
                .1
                .extend_from_slice(&payload),
            op => current = Some((op, payload)),
        }
        if header.is_final && matches!(header.opcode, OpCode::Data(_)) {
            out.extend(current.take());
        }
    }
    out
}

/// An upstream that accepts a WebSocket upgrade, answering with `extensions` if any, then
/// writes `script(the Authorization value it got)` and, with `echo`, echoes what it reads.
fn websocket_upstream(
    extensions: Option<&'static str>,
    script: fn(&[u8]) -> Vec<u8>,
    echo: bool,
) -> Handler {
    handler(move |mut req: Request<Incoming>| async move {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            if io.write_all(&script(&auth)).await.is_err() {
                return;
            }
            if echo {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
            let _ = io.shutdown().await;
        });
        let mut response = full(StatusCode::SWITCHING_PROTOCOLS, "");
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, "websocket".parse().expect("value"));
        headers.insert(header::CONNECTION, "Upgrade".parse().expect("value"));
        if let Some(extensions) = extensions {
            headers.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                extensions.parse().expect("value"),
            );
        }
        response
    })
}

/// An upgrade request offering permessage-deflate, as browsers and most clients do.
fn upgrade_request(agent: &super::harness::Agent) -> Request<super::harness::AgentBody> {
    agent
        .request("GET", HOST, "/v1/realtime")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .header(
            header::SEC_WEBSOCKET_EXTENSIONS,
            "permessage-deflate; client_max_window_bits",
        )
        .body(empty())
        .expect("request")
}

/// The upstream quotes the injected header in a text message fragmented inside the key (one
/// fragment masked, a ping between fragments), then in a close frame's reason: the agent gets
/// the frames re-framed with the key replaced, never offered permessage-deflate upstream, and
/// the record counts the bytes both ways.
#[tokio::test]
async fn a_key_echoed_in_websocket_frames_is_scrubbed() {
    fn script(auth: &[u8]) -> Vec<u8> {
        let text = [b"you sent: ".as_slice(), auth, b" ok"].concat();
        let cut = 10 + "Bearer ".len() + 9;
        let mut out = ws_frame(OpCode::Data(Data::Text), false, None, &text[..cut]);
        out.extend(ws_frame(
            OpCode::Data(Data::Continue),
            false,
            Some([9, 8, 7, 6]),
            &text[cut..cut + 20],
        ));
        out.extend(ws_frame(OpCode::Control(Control::Ping), true, None, b"p"));
        out.extend(ws_frame(
            OpCode::Data(Data::Continue),
            true,
            None,
            &text[cut + 20..],
        ));
        let mut close = 1008u16.to_be_bytes().to_vec();
        close.extend_from_slice(&auth[auth.len().saturating_sub(50)..]);
        out.extend(ws_frame(
            OpCode::Control(Control::Close),
            true,
            None,
            &close,
        ));
        out
    }
    let secret = TestSecret::generate();
    let setup = Setup::start(
        Offer::H1,
        websocket_upstream(None, script, false),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let response = agent.send(upgrade_request(&agent)).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = within("the agent's upgrade", hyper::upgrade::on(response))
        .await
        .expect("upgraded");
    let mut io = TokioIo::new(upgraded);
    let mut got = Vec::new();
    within("the stream", io.read_to_end(&mut got))
        .await
        .expect("read");
    assert_no_secret(&got, &secret, "the WebSocket stream");
    let messages = ws_messages(&got);
    assert_eq!(messages.len(), 3, "ping, text, close");
    assert_eq!(messages[0], (OpCode::Control(Control::Ping), b"p".to_vec()));
    assert_eq!(
        messages[1],
        (
            OpCode::Data(Data::Text),
            [b"you sent: Bearer ".as_slice(), PLACEHOLDER, b" ok"].concat()
        )
    );
    assert_eq!(messages[2].0, OpCode::Control(Control::Close));
    assert_no_secret(&messages[2].1, &secret, "the close reason");
    setup.upstream.single(|seen| {
        assert!(
            seen.header("sec-websocket-extensions").is_empty(),
            "no extension is offered upstream on a scrubbed upgrade"
        );
    });
    drop(io);
    let event = setup.broker.events.single_ended().await;
    assert_eq!(event.status, Some(101));
    assert_eq!(event.bytes_out, got.len() as u64, "the bytes the agent got");
    assert!(
        event
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("quoted a secret value"),
        "{:?}",
        event.reason
    );
    setup.broker.events.assert_no_secret(&secret);
}

/// An upstream that accepts permessage-deflate anyway (brokerd did not offer it) would send
/// compressed frames the scrubber cannot read: the 101 is withheld (502) and recorded.
#[tokio::test]
async fn an_upstream_accepting_permessage_deflate_is_refused() {
    let secret = TestSecret::generate();
    let setup = Setup::start(
        Offer::H1,
        websocket_upstream(Some("permessage-deflate"), |_| Vec::new(), false),
        TestAuthorizer::injecting(&secret),
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let got = agent.fetch(upgrade_request(&agent)).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let reason = got.json()["reason"].as_str().unwrap_or("").to_string();
    assert!(reason.contains("permessage-deflate"), "{reason}");
    let event = setup.broker.events.single().await;
    assert_eq!(event.rule.as_deref(), Some(RULE));
    assert!(
        event
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("permessage-deflate")
    );
}

/// An upgraded connection's bytes are counted both ways and charged as they pass: once the
/// rule's budget is used up the connection is cut, and the record says so with the bytes.
#[tokio::test]
async fn websocket_bytes_are_counted_and_a_used_up_budget_cuts_the_connection() {
    const BUDGET: u64 = 200_000;
    let secret = TestSecret::generate();
    let charged = Arc::new(AtomicU64::new(0));
    let completions = Arc::new(Mutex::new(Vec::new()));
    let authorizer = {
        let (charged, completions) = (charged.clone(), completions.clone());
        let key = secret.expose().to_string();
        TestAuthorizer::new(move |_, parts| {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}")).expect("value");
            value.set_sensitive(true);
            parts.headers.insert(header::AUTHORIZATION, value);
            let charged = charged.clone();
            let completions = completions.clone();
            Ok(Grant {
                needles: vec![Zeroizing::new(key.as_bytes().to_vec())],
                meter: Some(Arc::new(move |bytes| {
                    let total = charged.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    if total > BUDGET {
                        Err(format!("daily budget used up: {BUDGET} bytes per day"))
                    } else {
                        Ok(())
                    }
                })),
                on_complete: Some(Box::new(move |done: &super::Completion| {
                    completions
                        .lock()
                        .expect("completions")
                        .push((done.bytes_in, done.bytes_out));
                    super::Charge::default()
                })),
                ..grant()
            })
        })
    };
    let setup = Setup::start(
        Offer::H1,
        websocket_upstream(None, |_| Vec::new(), true),
        authorizer,
    )
    .await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let response = agent.send(upgrade_request(&agent)).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = within("the agent's upgrade", hyper::upgrade::on(response))
        .await
        .expect("upgraded");
    let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
    // 5 MB in 50 binary messages of 100 kB (masked, as a client sends them), read as echoed.
    let message = ws_frame(
        OpCode::Data(Data::Binary),
        true,
        Some([1, 2, 3, 4]),
        &vec![b'x'; 100_000],
    );
    let writer = tokio::spawn(async move {
        for _ in 0..50 {
            if write.write_all(&message).await.is_err() {
                return;
            }
        }
        // Kept open: the broker must end the connection.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut received = Vec::new();
    // Ends (a reset, as the broker drops the TLS connection) within the deadline.
    let _ = within("the cut", read.read_to_end(&mut received)).await;
    writer.abort();
    assert!(
        (received.len() as u64) < BUDGET,
        "{} bytes reached the agent past a {BUDGET}-byte budget",
        received.len()
    );
    let event = setup.broker.events.single().await;
    assert_eq!(event.status, Some(101));
    assert!(event.bytes_in > 0, "bytes from the agent are counted");
    assert_eq!(event.bytes_out, received.len() as u64);
    assert_eq!(event.side, Some(Side::Agent));
    let reason = event.reason.as_deref().unwrap_or("");
    assert!(
        reason.contains("daily budget used up") && reason.contains("cut"),
        "{reason}"
    );
    let done = completions.lock().expect("completions").clone();
    assert_eq!(done, vec![(event.bytes_in, event.bytes_out)]);
}
