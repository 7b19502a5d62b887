//! Scrubbing: an upstream that echoes the injected secret, whole or split across chunks, DATA
//! frames and pauses, never gets it to the agent; everything else arrives intact, and streamed
//! bytes are not held back longer than a match needs.

use std::{sync::Arc, time::Duration};

use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt as _;
use tokio::sync::Notify;

use super::{
    PLACEHOLDER,
    harness::{
        AgentProto, HOST, Offer, Setup, Step, TestAuthorizer, TestSecret, assert_no_secret,
        assert_same_bytes, empty, full, handler, random_token, streamed, within,
    },
};

const PAUSE: Duration = Duration::from_millis(15);

/// An upstream that echoes `Bearer <secret>` in a header and, split over several pauses, in
/// its body; returns what the agent should get instead of the body.
async fn echo_split(proto: AgentProto, offer: Offer) {
    let secret = TestSecret::generate();
    let s = secret.expose().as_bytes().to_vec();
    let (a, rest) = s.split_at(5);
    let (b, c) = rest.split_at(20);
    // The pieces the upstream sends, each after a pause: the first echo is cut twice inside
    // the secret, the second sits inside one chunk, the third ends the body.
    let pieces: Vec<Vec<u8>> = vec![
        [b"{\"echo\":\"Bearer ".as_slice(), a].concat(),
        b.to_vec(),
        [
            c,
            b"\",\"again\":\"".as_slice(),
            &s,
            b"\",\"n\":1}\n".as_slice(),
        ]
        .concat(),
        [b"tail:".as_slice(), &s].concat(),
    ];
    let want: Vec<u8> = [
        b"{\"echo\":\"Bearer ".as_slice(),
        PLACEHOLDER,
        b"\",\"again\":\"",
        PLACEHOLDER,
        b"\",\"n\":1}\ntail:",
        PLACEHOLDER,
    ]
    .concat();
    let header_echo = secret.bearer().to_string();
    let upstream = handler(move |_req| {
        let pieces = pieces.clone();
        let header_echo = header_echo.clone();
        async move {
            let mut steps = Vec::new();
            for piece in pieces {
                steps.push(Step::Data(piece));
                steps.push(Step::Pause(PAUSE));
            }
            let mut response = streamed(steps);
            response.headers_mut().insert(
                "x-echo",
                HeaderValue::from_str(&header_echo).expect("header"),
            );
            response
        }
    });
    let setup = Setup::start(offer, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(proto).await;
    let req = agent
        .request("GET", HOST, "/echo")
        .body(empty())
        .expect("request");
    let response = agent.send(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let x_echo = response
        .headers()
        .get("x-echo")
        .map(|v| v.as_bytes().to_vec());
    assert_no_secret(
        x_echo.as_deref().unwrap_or_default(),
        &secret,
        "the x-echo header",
    );
    assert_eq!(
        x_echo.as_deref(),
        Some([b"Bearer ".as_slice(), PLACEHOLDER].concat().as_slice()),
        "the header is scrubbed in place"
    );
    assert!(
        response.headers().get(header::CONTENT_LENGTH).is_none(),
        "a scrubbed body's length is not known in advance"
    );

    // Read frame by frame: no frame, and not the whole, holds the secret.
    let mut body = response.into_body();
    let mut got = Vec::new();
    let mut frames = 0;
    while let Some(frame) = within("the next frame", body.frame()).await {
        let frame = frame.expect("a frame");
        if let Some(data) = frame.data_ref() {
            assert_no_secret(data, &secret, "a frame");
            got.extend_from_slice(data);
            frames += 1;
        }
    }
    assert_no_secret(&got, &secret, "the body");
    assert_same_bytes(&got, &want, "the scrubbed body");
    assert!(frames > 1, "the body arrived streamed ({frames} frames)");

    let event = setup.broker.events.single().await;
    assert_eq!(event.bytes_out, want.len() as u64);
    setup.broker.events.assert_no_secret(&secret);
    let done = setup.broker.authorizer.completions(1).await;
    assert_eq!(
        done[0].bytes_out,
        want.len() as u64,
        "the bytes the grant was told of"
    );
}

#[tokio::test]
async fn a_secret_split_across_h1_chunks_is_scrubbed() {
    echo_split(AgentProto::H1, Offer::H1).await;
}

#[tokio::test]
async fn a_secret_split_across_h2_data_frames_is_scrubbed() {
    echo_split(AgentProto::H2, Offer::H2).await;
}

#[tokio::test]
async fn a_secret_split_across_h2_upstream_frames_is_scrubbed_for_an_h1_agent() {
    echo_split(AgentProto::H1, Offer::H2).await;
}

/// A large body in chunks of many sizes (1 byte to 40 KiB), with the secret at chunk
/// boundaries and inside chunks, arrives byte for byte except for the placeholders.
#[tokio::test]
async fn a_large_body_arrives_intact_around_scrubbed_secrets() {
    let secret = TestSecret::generate();
    let s = secret.expose().as_bytes().to_vec();
    // Filler that cannot contain the secret (no base64 '+' '/' '=' and lowercase runs only).
    let filler = |n: usize, seed: usize| -> Vec<u8> {
        (0..n)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz"[(i * 7 + seed) % 26])
            .collect()
    };
    let mut sent = Vec::new();
    let mut want = Vec::new();
    for i in 0..12 {
        let f = filler(20_000 + i * 1_000, i);
        sent.extend_from_slice(&f);
        want.extend_from_slice(&f);
        sent.extend_from_slice(&s);
        want.extend_from_slice(PLACEHOLDER);
    }
    let sizes = [1usize, 3, 7, 44, 45, 1000, 16_384, 40_000, 2, 9_999];
    let mut chunks = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at == sent.len() {
            break;
        }
        let end = (at + size).min(sent.len());
        chunks.push(Step::Data(sent[at..end].to_vec()));
        at = end;
    }
    let chunks = std::sync::Mutex::new(Some(chunks));
    let upstream = handler(move |_req| {
        let steps = chunks.lock().expect("chunks").take().unwrap_or_default();
        async move { streamed(steps) }
    });
    let setup = Setup::start(Offer::H1, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/large")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_no_secret(&got.body, &secret, "the body");
    assert_same_bytes(&got.body, &want, "the large body");
}

/// Streaming is not buffering: the bytes of a chunk that cannot be part of a secret reach the
/// agent while the upstream still holds the rest of the body back.
#[tokio::test]
async fn streamed_bytes_flow_before_the_body_ends() {
    let secret = TestSecret::generate();
    let first = vec![b'a'; 4096];
    let gate = Arc::new(Notify::new());
    let upstream = {
        let gate = gate.clone();
        let first = first.clone();
        handler(move |_req| {
            let steps = vec![
                Step::Data(first.clone()),
                Step::Gate(gate.clone()),
                Step::Data(b"rest".to_vec()),
            ];
            async move { streamed(steps) }
        })
    };
    let setup = Setup::start(Offer::H2, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/stream")
        .body(empty())
        .expect("request");
    let response = agent.send(req).await;
    let mut body = response.into_body();
    let mut got = Vec::new();
    // At most a secret's longest encoding (well under 4 x its length) is held back.
    let enough = first.len() - 4 * secret.expose().len();
    while got.len() < enough {
        let frame = within("bytes before the upstream continues", body.frame())
            .await
            .expect("more frames")
            .expect("a frame");
        got.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d.as_ref()));
    }
    gate.notify_one();
    while let Some(frame) = within("the rest", body.frame()).await {
        got.extend_from_slice(
            frame
                .expect("a frame")
                .data_ref()
                .map_or(&[][..], |d| d.as_ref()),
        );
    }
    assert_same_bytes(
        &got,
        &[first.as_slice(), b"rest"].concat(),
        "the streamed body",
    );
}

/// Without an injection there is nothing to scrub: the response passes untouched, its length
/// included, even when it echoes what the agent sent.
#[tokio::test]
async fn without_an_injection_the_response_passes_untouched() {
    let upstream = handler(|req: http::Request<hyper::body::Incoming>| {
        let echoed = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        async move { full(StatusCode::OK, echoed) }
    });
    let setup = Setup::start(Offer::H1, upstream, TestAuthorizer::allow()).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let own = format!("Bearer {}", random_token("agent-own-"));
    let req = agent
        .request("GET", HOST, "/echo")
        .header(header::AUTHORIZATION, own.as_str())
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, own.as_bytes());
    assert_eq!(
        got.header("content-length"),
        Some(own.len().to_string().as_str())
    );
}

/// HTTP/2 trailers reach an HTTP/2 agent, after the body's held-back tail (which the scrubber
/// flushes first).
#[tokio::test]
async fn h2_trailers_follow_the_scrubbed_body() {
    let secret = TestSecret::generate();
    let upstream = handler(|_req| async move {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        streamed(vec![
            Step::Data(b"short body".to_vec()),
            Step::Pause(PAUSE),
            Step::Trailers(trailers),
        ])
    });
    let setup = Setup::start(Offer::H2, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("POST", HOST, "/grpc.Service/Call")
        .header(header::TE, "trailers")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"short body");
    let trailers = got.trailers.expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(b"0".as_slice())
    );
}

/// Invariant 1 covers trailers too: an h2 upstream that echoes the injected header in a
/// trailer has it scrubbed there, like in the response head.
#[tokio::test]
async fn a_secret_echoed_in_h2_trailers_never_reaches_the_agent() {
    let secret = TestSecret::generate();
    let bearer = secret.bearer().to_string();
    let upstream = handler(move |_req| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-echo", HeaderValue::from_str(&bearer).expect("value"));
        async move { streamed(vec![Step::Data(b"body".to_vec()), Step::Trailers(trailers)]) }
    });
    let setup = Setup::start(Offer::H2, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H2).await;
    let req = agent
        .request("GET", HOST, "/")
        .header(header::TE, "trailers")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.body, b"body");
    let trailers = got.trailers.expect("the trailers arrive");
    let echo = trailers.get("x-echo").expect("the echoed trailer arrives");
    assert_no_secret(echo.as_bytes(), &secret, "a trailer");
    assert!(
        echo.as_bytes()
            .windows(PLACEHOLDER.len())
            .any(|w| w == PLACEHOLDER),
        "the secret is replaced by the placeholder"
    );
}

/// Only bytes that could still start a match are held back: with a secret injected, an SSE
/// event reaches the agent whole while the upstream pauses before the next one.
#[tokio::test]
async fn a_short_streamed_event_flows_before_the_next_one() {
    let secret = TestSecret::generate();
    let gate = Arc::new(Notify::new());
    let event = b"data: {\"delta\":\"hi\"}\n\n".to_vec();
    let upstream = {
        let gate = gate.clone();
        let event = event.clone();
        handler(move |_req| {
            let steps = vec![
                Step::Data(event.clone()),
                Step::Gate(gate.clone()),
                Step::Data(b"data: [DONE]\n\n".to_vec()),
            ];
            async move { streamed(steps) }
        })
    };
    let setup = Setup::start(Offer::H1, upstream, TestAuthorizer::injecting(&secret)).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/sse")
        .body(empty())
        .expect("request");
    let mut body = agent.send(req).await.into_body();
    let first = tokio::time::timeout(Duration::from_millis(500), body.frame()).await;
    gate.notify_one();
    let frame = first
        .expect("the event arrives while the upstream waits")
        .expect("a frame")
        .expect("a frame");
    assert_eq!(frame.data_ref().map(|d| d.as_ref()), Some(event.as_slice()));
}
