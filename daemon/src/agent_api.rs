//! "Agents can ask" (issue 16.3): the reserved name [`NAME`], which brokerd's DNS answers for
//! every tagged agent with [`ADDRESS`] and which brokerd serves itself ([`AgentApi`], the
//! proxy's [`LocalService`]). An agent learns there what its own policy lets it do, without
//! trial and error:
//!
//! - an MCP server over streamable HTTP at `/mcp` (JSON-RPC 2.0; answers are
//!   `application/json`, sessions by `Mcp-Session-Id`), with the tools `allowed`, `explain` and
//!   `request_access`;
//! - plain HTTPS GETs with the same answers as JSON: `/v1/allowed`,
//!   `/v1/explain?method=GET&url=...`.
//!
//! The caller is the agent the kernel attributed the connection to (its cgroup), as for every
//! other call; nothing the agent sends names it. Answers hold names only: destinations,
//! methods, paths, limits and what is left of them, credential *names*; never a value, never
//! another agent's policy. The one write is `request_access`, which files an approval request
//! through [`AccessRequests`] when brokerd has one. Each agent gets a small token bucket of
//! calls ([`CALLS_PER_SECOND`], [`CALL_BURST`]); the proxy records every call.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime},
};

use agent_broker_core::{
    cgroup::CgroupPath,
    policy::{EffectiveRule, Limiter, Policy},
    time::format_rfc3339,
};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    capture::ConnectionOrigin,
    proxy::{LocalAnswer, LocalService},
};

/// The reserved name.
pub const NAME: &str = "agent-broker.internal";

/// The address brokerd's DNS answers for [`NAME`] (A record; AAAA queries get no address).
/// A loopback address no upstream is expected at: the agent's connect to it is redirected to
/// brokerd by the capture like every connect, so it is never dialed; the proxy sees it as the
/// original destination and serves nothing but [`NAME`] there.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 65, 66, 1);

/// The DNS answer's time to live.
pub const TTL_SECS: u32 = 300;

/// Calls each agent may make per second, sustained.
pub const CALLS_PER_SECOND: f64 = 5.0;
/// Calls each agent may make at once.
pub const CALL_BURST: f64 = 20.0;

/// MCP protocol revisions this server speaks, newest first.
const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// Sessions kept per agent; the oldest is dropped for a new one.
const SESSIONS_PER_AGENT: usize = 16;
/// Agents whose buckets and sessions are kept; beyond, full buckets are forgotten first.
const MAX_AGENTS: usize = 4096;
/// Longest `reason` of a `request_access`.
const MAX_REASON: usize = 1000;

/// Files approval requests (issue 16.1). brokerd's approvals implement it; without one,
/// `request_access` answers that approvals are not enabled.
pub trait AccessRequests: Send + Sync {
    /// Files a request from `agent` (the cgroup the kernel attributed the call to, as policies
    /// name it; `origin` has its pid, exe and the rest) for `method url`, with the agent's
    /// stated `reason`. `Ok`: what happened, in words for the agent (`filed as request 7`);
    /// `Err`: why it was refused. Must not block for long: the agent's call waits on it.
    fn request_access(
        &self,
        agent: &str,
        origin: &ConnectionOrigin,
        method: &str,
        url: &str,
        reason: &str,
    ) -> Result<String, String>;
}

/// A token bucket of calls.
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// An MCP session: which agent opened it.
struct Session {
    agent: CgroupPath,
    opened: Instant,
}

#[derive(Default)]
struct State {
    buckets: HashMap<CgroupPath, Bucket>,
    sessions: HashMap<String, Session>,
}

/// brokerd's answers to agents about their own policy (see the module doc).
pub struct AgentApi {
    policy: watch::Receiver<Arc<Policy>>,
    /// The proxy's rate limits and budgets, read for what is left (never charged here).
    limiter: Arc<Limiter>,
    access: Option<Arc<dyn AccessRequests>>,
    state: Mutex<State>,
}

impl AgentApi {
    pub fn new(policy: watch::Receiver<Arc<Policy>>, limiter: Arc<Limiter>) -> Self {
        Self {
            policy,
            limiter,
            access: None,
            state: Mutex::default(),
        }
    }

    /// Lets `request_access` file approval requests.
    pub fn with_access_requests(mut self, access: Arc<dyn AccessRequests>) -> Self {
        self.access = Some(access);
        self
    }

    /// Takes one call from `agent`'s bucket; `Err`: seconds to wait.
    fn take_call(&self, agent: &CgroupPath) -> Result<(), f64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.buckets.len() >= MAX_AGENTS && !state.buckets.contains_key(agent) {
            // Forget the agents whose buckets would be full again by now.
            state.buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.refilled).as_secs_f64() * CALLS_PER_SECOND
                    < CALL_BURST
            });
        }
        let bucket = state.buckets.entry(agent.clone()).or_insert(Bucket {
            tokens: CALL_BURST,
            refilled: now,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * CALLS_PER_SECOND).min(CALL_BURST);
        bucket.refilled = now;
        if bucket.tokens < 1.0 {
            return Err((1.0 - bucket.tokens) / CALLS_PER_SECOND);
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    fn open_session(&self, agent: &CgroupPath) -> Option<String> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).ok()?;
        let id = data_encoding::HEXLOWER.encode(&bytes);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mine: Vec<(String, Instant)> = state
            .sessions
            .iter()
            .filter(|(_, s)| &s.agent == agent)
            .map(|(id, s)| (id.clone(), s.opened))
            .collect();
        if mine.len() >= SESSIONS_PER_AGENT
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, opened)| *opened)
        {
            state.sessions.remove(oldest);
        }
        if state.sessions.len() >= MAX_AGENTS * 4
            && let Some(oldest) = state
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.opened)
                .map(|(id, _)| id.clone())
        {
            state.sessions.remove(&oldest);
        }
        state.sessions.insert(
            id.clone(),
            Session {
                agent: agent.clone(),
                opened: Instant::now(),
            },
        );
        Some(id)
    }

    /// Whether `id` is a session `agent` opened (another agent's is unknown to it).
    fn has_session(&self, agent: &CgroupPath, id: &str) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sessions.get(id).is_some_and(|s| &s.agent == agent)
    }

    fn close_session(&self, agent: &CgroupPath, id: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.sessions.get(id).is_some_and(|s| &s.agent == agent) {
            state.sessions.remove(id);
            return true;
        }
        false
    }

    /// What `agent` may do: its narrowed rules, names only, with what each limit has left.
    pub fn allowed(&self, agent: &CgroupPath) -> Value {
        let policy = self.policy.borrow().clone();
        let effective = policy.effective(agent);
        let now = SystemTime::now();
        let rules: Vec<Value> = effective
            .rules
            .iter()
            .filter(|e| e.not_after.is_none_or(|t| t > now))
            .map(|e| self.rule_json(e))
            .collect();
        let dns: Vec<String> = effective
            .dns
            .first()
            .map(|(_, d)| d.patterns().iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        json!({
            "agent": agent.to_string(),
            "governed": !effective.files.is_empty(),
            "rules": rules,
            "dns": dns,
            "note": format!(
                "a request must match one of these rules (and every level above the agent's \
                 policy file, already folded in); everything else is denied. {NAME} is always \
                 available. Credentials are written by agent-broker: send requests without \
                 them. Ask {NAME} tool `explain` for one request."
            ),
        })
    }

    fn rule_json(&self, e: &EffectiveRule) -> Value {
        let r = &e.rule;
        let now = Instant::now();
        let limits: Vec<Value> = e
            .limits
            .iter()
            .map(|l| {
                let mut limit = json!({
                    "counted_for": l.cgroup.to_string(),
                    "rule": l.rule.to_string(),
                });
                if let Some(rate) = &l.rate {
                    limit["rate"] = json!({
                        "per_second": rate.per_second(),
                        "burst": rate.burst,
                    });
                }
                if let Some(budget) = &l.budget {
                    limit["budget"] = json!({
                        "requests_per_day": budget.requests_per_day,
                        "bytes_per_day": budget.bytes_per_day,
                        "tokens_per_day": budget.tokens_per_day,
                    });
                }
                if let Some(key) = &l.key {
                    let left = self.limiter.remaining(key, now);
                    limit["left"] = json!({
                        "requests_now": left.rate_requests_now,
                        "requests_today": left.requests_today,
                        "bytes_today": left.bytes_today,
                        "tokens_today": left.tokens_today,
                    });
                }
                limit
            })
            .collect();
        let credentials: Vec<String> = r
            .injection()
            .secret_names()
            .into_iter()
            .map(|n| n.as_str().to_string())
            .collect();
        json!({
            "rule": r.rule_ref().to_string(),
            "name": r.name(),
            r.destination().field(): r.destination().to_string(),
            "port": r.port(),
            "tcp": r.is_tcp(),
            "methods": if r.methods().is_any() {
                json!("any")
            } else {
                json!(r.methods().names())
            },
            "paths": r.paths().map(|p| p.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>()),
            "required_headers": r.required_headers().iter().map(|(n, _)| n.as_str().to_string()).collect::<Vec<_>>(),
            "expires": e.not_after.map(format_rfc3339),
            "credentials": credentials,
            "injects": r.injection().slots(),
            "plain_http": e.plain_http,
            "limits": limits,
        })
    }

    /// Whether `method url` from `agent` would be allowed now, and why not.
    pub fn explain(&self, agent: &CgroupPath, method: &str, url: &str) -> Result<Value, String> {
        if let Ok(uri) = url.parse::<http::Uri>()
            && uri.host().is_some_and(|h| h.eq_ignore_ascii_case(NAME))
        {
            return Ok(json!({
                "allowed": true,
                "agent": agent.to_string(),
                "method": method.to_ascii_uppercase(),
                "url": url,
                "rule": NAME,
                "reason": null,
                "notes": [format!("{NAME} is served by agent-broker itself, always available")],
            }));
        }
        let policy = self.policy.borrow().clone();
        let e = policy
            .explain(agent, method, url, SystemTime::now())
            .map_err(|e| e.to_string())?;
        Ok(json!({
            "allowed": e.allowed,
            "agent": agent.to_string(),
            "method": e.method,
            "url": e.url,
            "reason": e.reason,
            "rule": e.rule.as_ref().map(ToString::to_string),
            "refused_by": e.refused_by.as_ref().map(ToString::to_string),
            "injects": e.injects,
            "limits": e.limits,
            "plain_http": e.plain_http,
            "notes": e.notes,
        }))
    }

    /// Files an approval request for `method url`, or says why not.
    fn request_access(
        &self,
        origin: &ConnectionOrigin,
        method: &str,
        url: &str,
        reason: &str,
    ) -> Result<String, String> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err("give a reason: the operator decides on it".into());
        }
        if reason.chars().count() > MAX_REASON {
            return Err(format!("the reason is longer than {MAX_REASON} characters"));
        }
        let explained = self.explain(&origin.cgroup, method, url)?;
        if explained["allowed"] == Value::Bool(true) {
            return Err(format!(
                "{} {url} is already allowed (rule {}): nothing to ask for",
                method.to_ascii_uppercase(),
                explained["rule"].as_str().unwrap_or("")
            ));
        }
        let Some(access) = &self.access else {
            return Err(
                "approvals are not enabled on this agent-broker: ask the operator to add a \
                 rule to your policy"
                    .into(),
            );
        };
        access.request_access(
            origin.cgroup.as_str(),
            origin,
            &method.to_ascii_uppercase(),
            url,
            reason,
        )
    }

    async fn answer(&self, origin: &ConnectionOrigin, request: Request<Bytes>) -> LocalAnswer {
        if let Err(wait) = self.take_call(&origin.cgroup) {
            let reason = format!(
                "too many calls to {NAME}: each agent may make {CALLS_PER_SECOND} a second \
                 (bursts of {CALL_BURST}); retry after {wait:.1}s"
            );
            let mut response = json_reply(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"error": "rate limited", "reason": reason}),
            );
            let secs = wait.ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return LocalAnswer {
                response,
                refused: Some(reason),
                note: None,
            };
        }
        let agent = &origin.cgroup;
        let path = request.uri().path().to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, "/v1/allowed") => LocalAnswer::answered(
                json_reply(StatusCode::OK, &self.allowed(agent)),
                Some("allowed".into()),
            ),
            (Method::GET, "/v1/explain") => {
                let query = query_pairs(request.uri().query());
                let method = query.get("method").map_or("GET", String::as_str);
                let Some(url) = query.get("url") else {
                    return LocalAnswer::answered(
                        json_reply(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": "give url (and method, default GET) in the query"}),
                        ),
                        Some("explain".into()),
                    );
                };
                let (status, body) = match self.explain(agent, method, url) {
                    Ok(v) => (StatusCode::OK, v),
                    Err(e) => (StatusCode::BAD_REQUEST, json!({"error": e})),
                };
                LocalAnswer::answered(json_reply(status, &body), Some("explain".into()))
            }
            (Method::POST, "/mcp") => self.mcp_post(origin, &request),
            (Method::DELETE, "/mcp") => {
                let closed = session_id(&request).is_some_and(|id| self.close_session(agent, id));
                let status = if closed {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                LocalAnswer::answered(plain(status), Some("mcp DELETE".into()))
            }
            (_, "/mcp") => {
                // No server-initiated stream: every answer comes with its request.
                let mut response = plain(StatusCode::METHOD_NOT_ALLOWED);
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
                LocalAnswer::answered(response, None)
            }
            _ => LocalAnswer::answered(
                json_reply(
                    StatusCode::NOT_FOUND,
                    &json!({
                        "error": "not found",
                        "endpoints": ["POST /mcp", "GET /v1/allowed", "GET /v1/explain?method=GET&url=URL"],
                    }),
                ),
                None,
            ),
        }
    }

    /// One JSON-RPC message POSTed to `/mcp` (streamable HTTP transport).
    fn mcp_post(&self, origin: &ConnectionOrigin, request: &Request<Bytes>) -> LocalAnswer {
        let agent = &origin.cgroup;
        let message: Value = match serde_json::from_slice(request.body()) {
            Ok(v) => v,
            Err(e) => {
                return rpc_reply(
                    StatusCode::BAD_REQUEST,
                    rpc_error(Value::Null, -32700, &format!("parse error: {e}")),
                    None,
                );
            }
        };
        let Some(object) = message.as_object() else {
            return rpc_reply(
                StatusCode::BAD_REQUEST,
                rpc_error(
                    Value::Null,
                    -32600,
                    "send one JSON-RPC message per POST (no batches)",
                ),
                None,
            );
        };
        let id = object.get("id").cloned();
        if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return rpc_reply(
                StatusCode::BAD_REQUEST,
                rpc_error(
                    id.unwrap_or(Value::Null),
                    -32600,
                    "not a JSON-RPC 2.0 message",
                ),
                None,
            );
        }
        if let Some(asked) = request
            .headers()
            .get("mcp-protocol-version")
            .and_then(|v| v.to_str().ok())
            && !PROTOCOL_VERSIONS.contains(&asked)
        {
            return rpc_reply(
                StatusCode::BAD_REQUEST,
                rpc_error(
                    id.unwrap_or(Value::Null),
                    -32600,
                    &format!(
                        "unsupported MCP-Protocol-Version {asked:?}; this server speaks {}",
                        PROTOCOL_VERSIONS.join(", ")
                    ),
                ),
                None,
            );
        }
        let Some(method) = object.get("method").and_then(Value::as_str) else {
            // A response or error from the client: nothing to answer.
            return LocalAnswer::answered(plain(StatusCode::ACCEPTED), None);
        };
        let params = object.get("params").cloned().unwrap_or(Value::Null);
        let note = Some(format!("mcp {method}"));
        if method == "initialize" {
            let Some(id) = id else {
                return LocalAnswer::answered(plain(StatusCode::ACCEPTED), note);
            };
            let asked = params["protocolVersion"].as_str().unwrap_or("");
            let version = PROTOCOL_VERSIONS
                .iter()
                .find(|v| **v == asked)
                .unwrap_or(&PROTOCOL_VERSIONS[0]);
            let Some(session) = self.open_session(agent) else {
                return rpc_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    rpc_error(id, -32603, "cannot make a session id"),
                    None,
                );
            };
            let result = json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {
                    "name": "agent-broker",
                    "title": "agent-broker: what this agent may do",
                    "version": env!("CARGO_PKG_VERSION"),
                },
                "instructions": format!(
                    "You are {agent}, as the kernel attributes your connections. Your network \
                     calls go through agent-broker, which allows only what your policy says and \
                     writes credentials itself. Before a call, ask `allowed` (everything you \
                     may do) or `explain` (one METHOD URL); ask `request_access` for something \
                     you need that is not allowed, with your reason."
                ),
            });
            return rpc_reply(StatusCode::OK, rpc_result(id, result), Some(&session))
                .with_note(note);
        }
        match session_id(request) {
            None => {
                return rpc_reply(
                    StatusCode::BAD_REQUEST,
                    rpc_error(
                        id.unwrap_or(Value::Null),
                        -32600,
                        "missing Mcp-Session-Id: send initialize first",
                    ),
                    None,
                );
            }
            Some(s) if !self.has_session(agent, s) => {
                return rpc_reply(
                    StatusCode::NOT_FOUND,
                    rpc_error(
                        id.unwrap_or(Value::Null),
                        -32001,
                        "unknown session: send initialize again",
                    ),
                    None,
                );
            }
            Some(_) => {}
        }
        let Some(id) = id else {
            // notifications/initialized, notifications/cancelled, ...: accepted.
            return LocalAnswer::answered(plain(StatusCode::ACCEPTED), note);
        };
        let outcome = match method {
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({ "tools": tools() })),
            "tools/call" => self.call_tool(origin, &params),
            other => Err((-32601, format!("method not found: {other}"))),
        };
        let note = match method {
            "tools/call" => Some(format!(
                "mcp tools/call {}",
                params["name"].as_str().unwrap_or("?")
            )),
            _ => note,
        };
        let message = match outcome {
            Ok(result) => rpc_result(id, result),
            Err((code, message)) => rpc_error(id, code, &message),
        };
        rpc_reply(StatusCode::OK, message, None).with_note(note)
    }

    /// A `tools/call`: `Ok` a CallToolResult (a tool's own failure has `isError`), `Err` a
    /// JSON-RPC error (no such tool, bad arguments).
    fn call_tool(&self, origin: &ConnectionOrigin, params: &Value) -> Result<Value, (i64, String)> {
        let name = params["name"].as_str().unwrap_or("");
        let args = &params["arguments"];
        let string = |key: &str| -> Result<&str, (i64, String)> {
            args[key].as_str().ok_or_else(|| {
                (
                    -32602,
                    format!("{name}: argument {key:?} (a string) is missing"),
                )
            })
        };
        match name {
            "allowed" => Ok(tool_result(self.allowed(&origin.cgroup))),
            "explain" => {
                let method = args["method"].as_str().unwrap_or("GET");
                let url = string("url")?;
                Ok(match self.explain(&origin.cgroup, method, url) {
                    Ok(v) => tool_result(v),
                    Err(e) => tool_error(&e),
                })
            }
            "request_access" => {
                let (method, url, reason) = (string("method")?, string("url")?, string("reason")?);
                Ok(match self.request_access(origin, method, url, reason) {
                    Ok(done) => tool_result(json!({"filed": true, "result": done})),
                    Err(why) => tool_error(&why),
                })
            }
            other => Err((-32602, format!("unknown tool: {other}"))),
        }
    }
}

impl LocalService for AgentApi {
    fn name(&self) -> &str {
        NAME
    }

    fn address(&self) -> IpAddr {
        IpAddr::V4(ADDRESS)
    }

    fn serve<'a>(
        &'a self,
        origin: &'a ConnectionOrigin,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = LocalAnswer> + Send + 'a>> {
        Box::pin(self.answer(origin, request))
    }
}

impl LocalAnswer {
    fn with_note(mut self, note: Option<String>) -> Self {
        self.note = note;
        self
    }
}

/// The tools, as `tools/list` gives them.
fn tools() -> Value {
    let url = json!({"type": "string", "description": "the full URL, e.g. https://api.example.com/v1/items"});
    let method = json!({"type": "string", "description": "the HTTP method, e.g. GET or POST"});
    json!([
        {
            "name": "allowed",
            "title": "What may I do?",
            "description": "Everything this agent's policy allows: destinations, ports, methods, \
                paths, limits and what is left of them, and the names (never values) of the \
                credentials agent-broker writes for it. Everything else is denied.",
            "inputSchema": {"type": "object", "properties": {}},
            "annotations": {"readOnlyHint": true, "openWorldHint": false},
        },
        {
            "name": "explain",
            "title": "Would this request be allowed?",
            "description": "Whether METHOD URL would be allowed for this agent now, by which \
                rule, and if not, why not.",
            "inputSchema": {
                "type": "object",
                "properties": {"method": method, "url": url},
                "required": ["url"],
            },
            "annotations": {"readOnlyHint": true, "openWorldHint": false},
        },
        {
            "name": "request_access",
            "title": "Ask the operator for access",
            "description": "Files a request for the operator to allow METHOD URL for this \
                agent, with your reason. The operator decides; nothing is allowed until then.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "method": method,
                    "url": url,
                    "reason": {"type": "string", "description": "why you need it, for the operator"},
                },
                "required": ["method", "url", "reason"],
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "openWorldHint": false},
        },
    ])
}

fn tool_result(value: Value) -> Value {
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    json!({
        "content": [{"type": "text", "text": text}],
        "structuredContent": value,
        "isError": false,
    })
}

fn tool_error(message: &str) -> Value {
    json!({
        "content": [{"type": "text", "text": message}],
        "isError": true,
    })
}

fn rpc_result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn rpc_reply(status: StatusCode, message: Value, session: Option<&str>) -> LocalAnswer {
    let mut response = json_reply(status, &message);
    if let Some(id) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
        response.headers_mut().insert("mcp-session-id", id);
    }
    LocalAnswer::answered(response, None)
}

fn session_id(request: &Request<Bytes>) -> Option<&str> {
    request
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
}

fn json_reply(status: StatusCode, body: &Value) -> Response<Bytes> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = Response::new(Bytes::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: StatusCode) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = status;
    response
}

/// The query's `key=value` pairs, percent-decoded (`+` is a space).
fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

fn decode(s: &str) -> Option<String> {
    use agent_broker_core::percent::{Plus, decode};
    String::from_utf8(decode(s.as_bytes(), Plus::Space)).ok()
}

#[cfg(test)]
mod tests;
