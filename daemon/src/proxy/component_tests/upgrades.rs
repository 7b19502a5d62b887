//! Upgrades and tunnels: a WebSocket upgrade is forwarded over HTTP/1.1 and spliced once the
//! upstream switches protocols; an `h2c` upgrade, CONNECT and TRACE are refused before the
//! authorizer or the upstream sees them.

use agent_broker_protocol::Decision;
use http::{Method, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    EventKind,
    harness::{
        AgentBody, AgentProto, HOST, Handler, Offer, Setup, TestAuthorizer, answer, assert_denial,
        assert_denied_event, empty, full, handler, within,
    },
};

/// An upstream that accepts a WebSocket upgrade and then echoes every byte back, prefixed
/// once with `upstream:`.
fn websocket_echo() -> Handler {
    handler(|mut req: Request<Incoming>| async move {
        if req.headers().get(header::UPGRADE).is_none() {
            return full(StatusCode::BAD_REQUEST, "not an upgrade");
        }
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            if io.write_all(b"upstream:").await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let mut response = full(StatusCode::SWITCHING_PROTOCOLS, "");
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, "websocket".parse().expect("value"));
        headers.insert(header::CONNECTION, "Upgrade".parse().expect("value"));
        headers.insert("sec-websocket-accept", "dGVzdA==".parse().expect("value"));
        response
    })
}

#[tokio::test]
async fn a_websocket_upgrade_is_forwarded_over_http1_and_spliced() {
    // The upstream offers h2 too: an upgrade must still go over HTTP/1.1.
    let setup = Setup::start(Offer::H2, websocket_echo(), TestAuthorizer::allow()).await;
    let mut agent = setup.agent(AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/v1/realtime")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(empty())
        .expect("request");
    let response = agent.send(req).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response
            .headers()
            .get(header::UPGRADE)
            .map(|v| v.as_bytes()),
        Some(b"websocket".as_slice())
    );
    let upgraded = within("the agent's upgrade", hyper::upgrade::on(response))
        .await
        .expect("upgraded");
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping").await.expect("write");
    let mut got = [0u8; 13];
    within("the echo", io.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(&got, b"upstream:ping");

    setup.upstream.single(|seen| {
        assert_eq!(
            seen.version,
            http::Version::HTTP_11,
            "upgrades go over HTTP/1.1"
        );
        assert_eq!(seen.header("upgrade"), ["websocket"]);
        assert_eq!(seen.header("connection"), ["upgrade"]);
        assert_eq!(
            seen.header("sec-websocket-key"),
            ["dGhlIHNhbXBsZSBub25jZQ=="]
        );
    });
    // The record is written when the upgraded connection ends, with its bytes.
    drop(io);
    let event = setup.broker.events.single_ended().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.decision, Some(Decision::Allow));
    assert_eq!(event.status, Some(101));
    assert_eq!(
        (event.bytes_in, event.bytes_out),
        (4, 13),
        "counted both ways"
    );
}

/// A refused request form: 403 with `reason`, recorded, and neither authorized nor forwarded.
async fn refused_form(proto: AgentProto, req: Request<AgentBody>, reason: &str) {
    let setup = Setup::start(Offer::H2, answer("never"), TestAuthorizer::allow()).await;
    let mut agent = setup.agent(proto).await;
    let got = agent.fetch(req).await;
    assert_denial(&got, StatusCode::FORBIDDEN, reason);
    let event = setup.broker.events.single().await;
    assert_denied_event(&event, StatusCode::FORBIDDEN, reason);
    assert!(
        setup.broker.authorizer.requests().is_empty(),
        "never authorized"
    );
    assert_eq!(setup.upstream.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn an_h2c_upgrade_is_refused() {
    let req = Request::get("/")
        .header(header::HOST, HOST)
        .header(header::UPGRADE, "h2c")
        .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(empty())
        .expect("request");
    refused_form(AgentProto::H1, req, "only WebSocket upgrades are brokered").await;
}

#[tokio::test]
async fn connect_is_refused_over_h1() {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{HOST}:443"))
        .header(header::HOST, format!("{HOST}:443"))
        .body(empty())
        .expect("request");
    refused_form(AgentProto::H1, req, "CONNECT tunnels are not brokered").await;
}

#[tokio::test]
async fn connect_is_refused_over_h2() {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{HOST}:443"))
        .version(http::Version::HTTP_2)
        .body(empty())
        .expect("request");
    refused_form(AgentProto::H2, req, "CONNECT tunnels are not brokered").await;
}

#[tokio::test]
async fn trace_is_refused() {
    let req = Request::builder()
        .method(Method::TRACE)
        .uri("/")
        .header(header::HOST, HOST)
        .body(empty())
        .expect("request");
    refused_form(
        AgentProto::H1,
        req,
        "TRACE is not allowed through the broker",
    )
    .await;
}
