//! The approval webhook: brokerd POSTs each new pending request (JSON, no secret values) to a
//! configured `http://` URL, with a callback address and a token of that request's own; the
//! receiver decides by POSTing to `http://<callback>/approvals/<id>` with
//! `Authorization: Bearer <token>` and a JSON body `{"decision": "allow_once" | "allow_until" |
//! "allow_always" | "deny", "until_ms": ..., "reason": ...}`.
//!
//! Only plain `http://` is supported: the receiver is expected to be a local relay (a chat bot,
//! a ticketing bridge) on this host or a trusted network. The token is 32 random bytes; brokerd
//! keeps only its SHA-256, and compares in constant time.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use agent_broker_protocol::{ApprovalDecision, PendingApproval};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Approvals;

/// How long a webhook POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest decision body the callback reads.
const MAX_CALLBACK_BODY: usize = 4096;

/// Where the webhook POSTs: a parsed `http://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    uri: Uri,
    authority: String,
}

impl Target {
    /// Parses a webhook URL; only `http://` with a host.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("approval webhook {url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "approval webhook {url:?}: only http:// URLs are supported (a local relay)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("approval webhook {url:?} names no host"))?;
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{}:80", authority.host())
        };
        Ok(Self { uri, authority })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.uri)
    }
}

/// A fresh callback token (hex of 32 random bytes).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    // getrandom fails only where the kernel has no randomness; brokerd could not run there.
    if getrandom::fill(&mut bytes).is_err() {
        warn!("no randomness for an approval token; the webhook callback will refuse it");
        return String::new();
    }
    data_encoding::HEXLOWER.encode(&bytes)
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What the webhook receives.
#[derive(Serialize)]
pub struct Payload {
    #[serde(flatten)]
    pub request: PendingApproval,
    /// Where to POST the decision; none when brokerd has no callback address configured.
    pub callback: Option<String>,
    /// The bearer token the decision must carry.
    pub token: String,
}

pub fn payload(info: &PendingApproval, callback: Option<SocketAddr>, token: &str) -> Payload {
    Payload {
        request: info.clone(),
        callback: callback.map(|a| format!("http://{a}/approvals/{}", info.id)),
        token: token.to_string(),
    }
}

/// POSTs `payload` to `target`.
pub async fn post(target: &Target, payload: Payload) -> Result<(), String> {
    let body = serde_json::to_vec(&payload).map_err(|e| format!("encoding: {e}"))?;
    let work = async {
        let stream = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let path = target
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, &target.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {}", response.status()))
        }
    };
    tokio::time::timeout(POST_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {}s", POST_TIMEOUT.as_secs()))?
}

/// Why a callback's decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("no request #{0} is waiting for approval")]
    Unknown(u64),
    #[error("the token is not request #{0}'s")]
    BadToken(u64),
    #[error("{0}")]
    Refused(String),
}

/// Serves webhook decisions on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, approvals: Arc<Approvals>, cancel: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "approval callback listening");
    }
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "approval callback accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let approvals = approvals.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let approvals = approvals.clone();
                async move { Ok::<_, std::convert::Infallible>(callback(&approvals, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

async fn callback(
    approvals: &Approvals,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let answer = |status: StatusCode, message: String| {
        let body = serde_json::json!({ "message": message }).to_string();
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    let Some(id) = req
        .uri()
        .path()
        .strip_prefix("/approvals/")
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return answer(StatusCode::NOT_FOUND, "POST /approvals/<id>".into());
    };
    if req.method() != Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /approvals/<id>".into(),
        );
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(token) = token else {
        return answer(
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer <the request's token> is required".into(),
        );
    };
    let body = match Limited::new(req.into_body(), MAX_CALLBACK_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return answer(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let decision: ApprovalDecision = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be {{\"decision\": \"allow_once\" | \"allow_until\" (with \
                     until_ms) | \"allow_always\" | \"deny\" (with an optional reason)}}: {e}"
                ),
            );
        }
    };
    match approvals.decide_with_token(id, &token, decision) {
        Ok(outcome) => answer(StatusCode::OK, outcome),
        Err(e @ CallbackError::Unknown(_)) => answer(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ CallbackError::BadToken(_)) => answer(StatusCode::FORBIDDEN, e.to_string()),
        Err(e @ CallbackError::Refused(_)) => answer(StatusCode::CONFLICT, e.to_string()),
    }
}
