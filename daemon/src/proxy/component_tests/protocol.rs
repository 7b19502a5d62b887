//! Protocol attacks on the agent side (issue 17.2), at the level of one connection: hyper's
//! limits as brokerd sets them answer an oversized request head with 431 and an audit record
//! naming why, and an agent that stops sending its request body is cut at the idle deadline,
//! answered 400, and recorded as the agent's failure, not the upstream's.

use std::time::Duration;

use agent_broker_protocol::{Decision, RequestOutcome};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    Deadlines, EventKind, Side,
    harness::{Broker, Offer, TestAuthorizer, TestUpstream, full, handler, within},
};

/// A broker in front of an upstream that reads each request body whole before it answers.
async fn broker(deadlines: Deadlines) -> (TestUpstream, Broker) {
    let reads_body = handler(|req: http::Request<hyper::body::Incoming>| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        full(http::StatusCode::OK, "ok")
    });
    // The agent speaks plain HTTP, so the broker goes upstream in plain HTTP too.
    let upstream = TestUpstream::start(Offer::Plain, reads_body).await;
    let broker = Broker::start(
        TestAuthorizer::allow(),
        &upstream.ca_pem,
        upstream.addr,
        deadlines,
    )
    .await;
    (upstream, broker)
}

/// Everything the broker sends on `tcp` until it closes it (bounded by the step deadline).
async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    within("the broker answering and closing", async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_request_head_past_the_limit_gets_431_and_a_record_naming_it() {
    let (upstream, broker) = broker(Deadlines::default()).await;
    for (what, head) in [
        (
            "a 70 KiB header",
            format!(
                "GET / HTTP/1.1\r\nHost: api.example.test\r\nx-big: {}\r\n\r\n",
                "a".repeat(70 * 1024)
            ),
        ),
        (
            "101 header fields",
            format!(
                "GET / HTTP/1.1\r\nHost: api.example.test\r\n{}\r\n",
                (0..101)
                    .map(|i| format!("x-h{i}: v\r\n"))
                    .collect::<String>()
            ),
        ),
    ] {
        let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
        // The broker may answer and close before it read all of an oversized head.
        let _ = tcp.write_all(head.as_bytes()).await;
        let answer = read_to_close(&mut tcp).await;
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "{what}: {}",
            answer.lines().next().unwrap_or_default()
        );
    }
    assert_eq!(upstream.count(), 0, "nothing went upstream");
    broker.shares.refusals().flush(true);
    let events = broker.events.wait_for(2).await;
    let protocol: Vec<_> = events
        .iter()
        .filter(|e| e.kind == Some(EventKind::Denial))
        .collect();
    assert!(!protocol.is_empty(), "{events:#?}");
    for e in &protocol {
        assert_eq!(e.side, Some(Side::Agent));
        assert_eq!(e.decision, Some(Decision::Deny));
        assert!(
            e.reason
                .as_deref()
                .is_some_and(|r| r.contains("request head over 64 KiB or over 100 header fields")),
            "{e:?}"
        );
    }
    let counted: u64 = protocol.iter().map(|e| e.count.unwrap_or(1)).sum();
    assert_eq!(counted, 2, "both connections are recorded: {protocol:#?}");
}

#[tokio::test]
async fn a_request_body_the_agent_stops_sending_is_cut_and_blamed_on_the_agent() {
    let deadlines = Deadlines {
        body_idle: Duration::from_millis(300),
        ..Deadlines::default()
    };
    let (_upstream, broker) = broker(deadlines).await;
    let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await
    .expect("write");
    // 97 bytes never come; the connection stays open.
    let mut buf = vec![0u8; 4096];
    let n = within("the broker's answer to a stalled body", tcp.read(&mut buf))
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "{}",
        answer.lines().next().unwrap_or_default()
    );
    assert!(
        answer.contains("sent nothing of its request body"),
        "{answer}"
    );
    let event = broker.events.single_ended().await;
    assert_eq!(event.kind, Some(EventKind::Request));
    assert_eq!(event.outcome, Some(RequestOutcome::Failed));
    assert_eq!(event.side, Some(Side::Agent), "{event:?}");
    assert_eq!(event.status, Some(400));
    assert_eq!(event.bytes_in, 3);
    assert!(
        event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("sent nothing of its request body for 300ms")),
        "{event:?}"
    );
}

#[tokio::test]
async fn a_request_body_the_agent_cuts_is_the_agents_failure() {
    let (_upstream, broker) = broker(Deadlines::default()).await;
    let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await
    .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(tcp);
    let event = broker.events.single_ended().await;
    // Whichever hyper sees first: the body's failure (the request is cut) or the connection's
    // end (the exchange is dropped); either way the agent's doing, never the upstream's.
    assert!(
        matches!(
            event.outcome,
            Some(RequestOutcome::Failed | RequestOutcome::Cancelled)
        ),
        "{event:?}"
    );
    assert_eq!(event.side, Some(Side::Agent), "{event:?}");
    assert!(
        event.reason.as_deref().is_some_and(|r| {
            r.contains("the agent's request body failed") || r.contains("the agent went away")
        }),
        "{event:?}"
    );
}

#[tokio::test]
async fn a_head_sent_too_slowly_is_recorded_and_an_idle_keep_alive_connection_is_not() {
    let deadlines = Deadlines {
        request_head: Duration::from_millis(400),
        ..Deadlines::default()
    };
    let (_upstream, broker) = broker(deadlines).await;
    // A keep-alive connection after one request, then silence: closed at the deadline, and
    // nothing to record but the request.
    let mut idle = TcpStream::connect(broker.addr).await.expect("connect");
    idle.write_all(b"GET /one HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A head sent a byte at a time, never finished.
    let mut slow = TcpStream::connect(broker.addr).await.expect("connect");
    let mut closed = false;
    for b in b"GET /two HTTP/1.1\r\nHost: api.example.test\r\nx-slow: abcdefghijklmnop" {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed || read_to_close(&mut slow).await.is_empty());
    broker.shares.refusals().flush(true);
    broker.events.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events: Vec<_> = broker
        .events
        .raw()
        .into_iter()
        .filter(|e| e.kind == Some(EventKind::Denial))
        .collect();
    assert_eq!(events.len(), 1, "one record, the slow head's: {events:#?}");
    assert!(
        events[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no complete HTTP/1.1 request head within 400ms")),
        "{events:#?}"
    );
}
