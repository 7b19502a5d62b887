//! The name brokerd serves itself (`agent-broker.internal`, [`crate::agent_api`]) through the
//! proxy's [`LocalService`] seam: answered locally over TLS with a broker-CA leaf, never
//! forwarded, never decided by the authorizer, identity from the connection's origin, every
//! call recorded, and its address usable for nothing else.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use agent_broker_core::policy::{Limiter, Policy};
use agent_broker_protocol::Decision;
use bytes::Bytes;
use http::{StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    ConnectionOrigin, ConnectionVerdict, EventKind,
    harness::{
        AGENT_CGROUP, Agent, AgentProto, Broker, HOST, Offer, TestAuthorizer, TestUpstream, answer,
        empty,
    },
};
use crate::agent_api::{self, AccessRequests, AgentApi};

/// The agent's policy: one rule with limits and a credential; nothing else.
fn policy() -> Policy {
    let text = format!(
        r#"
cgroup = "{AGENT_CGROUP}"

[[allow]]
name = "models"
host = "{HOST}"
methods = ["GET"]
paths = ["/v1/models/**"]
rate = {{ per_minute = 60 }}
budget = {{ requests_per_day = 100 }}
inject.headers = {{ authorization = "Bearer {{secret:COMPONENT_TEST_KEY}}" }}
"#
    );
    Policy::from_files(vec![(PathBuf::from("component.toml"), text)]).expect("policy")
}

/// An approvals test double: records what it was asked and files everything.
#[derive(Default)]
struct Approvals(Mutex<Vec<Asked>>);

/// What [`Approvals`] was asked: agent, method, URL, reason, pid.
type Asked = (String, String, String, String, u32);

impl AccessRequests for Approvals {
    fn request_access(
        &self,
        agent: &str,
        origin: &ConnectionOrigin,
        method: &str,
        url: &str,
        reason: &str,
    ) -> Result<String, String> {
        let mut asked = self.0.lock().expect("approvals");
        asked.push((
            agent.into(),
            method.into(),
            url.into(),
            reason.into(),
            origin.pid,
        ));
        Ok(format!("filed as request {}", asked.len()))
    }
}

struct World {
    broker: Broker,
    upstream: TestUpstream,
    _policy: watch::Sender<Arc<Policy>>,
}

async fn world(original_dst: Option<SocketAddr>, approvals: Option<Arc<Approvals>>) -> World {
    world_with(TestAuthorizer::allow(), original_dst, approvals).await
}

async fn world_with(
    authorizer: TestAuthorizer,
    original_dst: Option<SocketAddr>,
    approvals: Option<Arc<Approvals>>,
) -> World {
    let upstream = TestUpstream::start(Offer::H2, answer("upstream")).await;
    let (tx, rx) = watch::channel(Arc::new(policy()));
    let mut api = AgentApi::new(rx, Arc::new(Limiter::new()));
    if let Some(a) = approvals {
        api = api.with_access_requests(a);
    }
    let broker = Broker::start_with_local(
        authorizer,
        &upstream.ca_pem,
        original_dst.unwrap_or(upstream.addr),
        Arc::new(api),
    )
    .await;
    World {
        broker,
        upstream,
        _policy: tx,
    }
}

/// An MCP client over one agent connection.
struct Mcp {
    agent: Agent,
    session: Option<String>,
    next_id: u64,
}

impl Mcp {
    async fn connect(broker: &Broker, proto: AgentProto) -> Self {
        Self {
            agent: Agent::tls(broker, agent_api::NAME, proto).await,
            session: None,
            next_id: 1,
        }
    }

    async fn post(&mut self, message: &Value) -> (StatusCode, http::HeaderMap, Value) {
        let mut req = self
            .agent
            .request("POST", agent_api::NAME, "/mcp")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        let req = req
            .body(Full::new(Bytes::from(
                serde_json::to_vec(message).expect("json"),
            )))
            .expect("request");
        let got = self.agent.fetch(req).await;
        let body = if got.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&got.body).expect("a JSON answer")
        };
        (got.status, got.headers, body)
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let (status, _, body) = self
            .post(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        assert_eq!(status, StatusCode::OK, "{method}: {body}");
        assert_eq!(body["id"], json!(id));
        body
    }

    async fn initialize(&mut self) -> Value {
        let (status, headers, body) = self
            .post(&json!({
                "jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "component-test", "version": "1"},
                },
            }))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let session = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .expect("a session id")
            .to_string();
        assert!(
            session.len() >= 32 && session.bytes().all(|b| b.is_ascii_graphic()),
            "visible ASCII, hard to guess"
        );
        self.session = Some(session);
        let (status, _, _) = self
            .post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "a notification is accepted");
        body
    }

    async fn tool(&mut self, name: &str, arguments: Value) -> Value {
        let body = self
            .call("tools/call", json!({"name": name, "arguments": arguments}))
            .await;
        body["result"].clone()
    }
}

async fn mcp_session_answers_from_the_agents_own_policy(proto: AgentProto) {
    let w = world(None, None).await;
    let mut mcp = Mcp::connect(&w.broker, proto).await;
    let init = mcp.initialize().await;
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    assert!(init["result"]["capabilities"]["tools"].is_object());

    let tools = mcp.call("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["allowed", "explain", "request_access"]);

    let allowed = mcp.tool("allowed", json!({})).await;
    assert_eq!(allowed["isError"], false);
    let view = &allowed["structuredContent"];
    assert_eq!(view["agent"], AGENT_CGROUP, "the agent the origin names");
    let rules = view["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["host"], HOST);
    assert_eq!(rules[0]["methods"], json!(["GET"]));
    assert_eq!(rules[0]["paths"], json!(["/v1/models/**"]));
    assert_eq!(rules[0]["credentials"], json!(["COMPONENT_TEST_KEY"]));
    assert_eq!(rules[0]["injects"], json!(["header authorization"]));
    let limit = &rules[0]["limits"][0];
    assert_eq!(limit["budget"]["requests_per_day"], 100);
    assert_eq!(limit["left"]["requests_today"], 100);
    assert_eq!(limit["left"]["requests_now"], 60);
    let text = allowed["content"][0]["text"]
        .as_str()
        .expect("text content");
    let as_text: Value = serde_json::from_str(text).expect("the text is the same JSON");
    assert_eq!(&as_text, view);

    let yes = mcp
        .tool(
            "explain",
            json!({"method": "GET", "url": format!("https://{HOST}/v1/models/gpt")}),
        )
        .await;
    assert_eq!(yes["structuredContent"]["allowed"], true);
    assert!(
        yes["structuredContent"]["rule"]
            .as_str()
            .is_some_and(|r| r.contains("models"))
    );
    let no = mcp
        .tool(
            "explain",
            json!({"method": "POST", "url": format!("https://{HOST}/v1/models/gpt")}),
        )
        .await;
    assert_eq!(no["structuredContent"]["allowed"], false);
    assert!(
        no["structuredContent"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("GET")),
        "the reason names what is allowed: {no}"
    );
    let bad = mcp
        .tool("explain", json!({"method": "GET", "url": "ftp://x"}))
        .await;
    assert_eq!(bad["isError"], true, "a bad URL is the tool's error");

    let ask = mcp
        .tool(
            "request_access",
            json!({"method": "POST", "url": "https://other.example.test/", "reason": "need it"}),
        )
        .await;
    assert_eq!(ask["isError"], true);
    assert!(
        ask["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("approvals are not enabled")),
        "{ask}"
    );
    let unknown = mcp.call("tools/call", json!({"name": "nope"})).await;
    assert_eq!(unknown["error"]["code"], -32602);
    let unknown = mcp.call("resources/list", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32601);

    // Nothing went upstream, and the policy authorizer was never asked.
    assert_eq!(w.upstream.count(), 0);
    assert!(w.broker.authorizer.requests().is_empty());
    // Every call is recorded as a request on the reserved name, answered.
    let events = w.broker.events.wait_for(10).await;
    for e in &events {
        assert_eq!(e.kind, Some(EventKind::Request), "{e:?}");
        assert_eq!(e.decision, Some(Decision::Allow));
        assert_eq!(e.host.as_deref(), Some(agent_api::NAME));
        assert_eq!(e.rule.as_deref(), Some(agent_api::NAME));
        assert_eq!(e.path.as_deref(), Some("/mcp"));
        assert_eq!(e.cgroup.as_deref(), Some(AGENT_CGROUP));
    }
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("mcp tools/call explain"))
    );
}

#[tokio::test]
async fn mcp_over_h1_answers_from_the_agents_own_policy() {
    mcp_session_answers_from_the_agents_own_policy(AgentProto::H1).await;
}

#[tokio::test]
async fn mcp_over_h2_answers_from_the_agents_own_policy() {
    mcp_session_answers_from_the_agents_own_policy(AgentProto::H2).await;
}

#[tokio::test]
async fn sessions_are_required_and_belong_to_the_agent_that_opened_them() {
    let w = world(None, None).await;
    let mut mcp = Mcp::connect(&w.broker, AgentProto::H1).await;
    let (status, _, body) = mcp
        .post(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no session: {body}");
    mcp.initialize().await;
    let session = mcp.session.clone();

    // The second agent presents the first one's session id: unknown to it.
    let mut other = Mcp {
        agent: Agent::tls_at(
            &w.broker,
            w.broker.other_agent,
            agent_api::NAME,
            AgentProto::H1,
        )
        .await,
        session: session.clone(),
        next_id: 1,
    };
    let (status, _, _) = other
        .post(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Its own view is its own: no policy governs it.
    other.initialize().await;
    let allowed = other.tool("allowed", json!({})).await;
    assert_eq!(
        allowed["structuredContent"]["agent"],
        super::harness::OTHER_AGENT_CGROUP
    );
    assert_eq!(allowed["structuredContent"]["rules"], json!([]));

    // A protocol revision the server does not speak, and a message that is not JSON-RPC 2.0.
    let req = mcp
        .agent
        .request("POST", agent_api::NAME, "/mcp")
        .header(header::CONTENT_TYPE, "application/json")
        .header("mcp-session-id", session.as_deref().expect("session"))
        .header("mcp-protocol-version", "1999-01-01")
        .body(Full::new(Bytes::from_static(
            br#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#,
        )))
        .expect("request");
    assert_eq!(mcp.agent.fetch(req).await.status, StatusCode::BAD_REQUEST);
    let (status, _, body) = mcp
        .post(&json!({"jsonrpc": "1.0", "id": 3, "method": "tools/list"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], -32600);

    // DELETE ends the session; it is unknown afterwards.
    let req = mcp
        .agent
        .request("DELETE", agent_api::NAME, "/mcp")
        .header("mcp-session-id", session.as_deref().expect("session"))
        .body(empty())
        .expect("request");
    assert_eq!(mcp.agent.fetch(req).await.status, StatusCode::OK);
    let (status, _, _) = mcp
        .post(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // No server-initiated stream.
    let req = mcp
        .agent
        .request("GET", agent_api::NAME, "/mcp")
        .body(empty())
        .expect("request");
    assert_eq!(
        mcp.agent.fetch(req).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn request_access_files_through_the_approvals_with_the_kernel_identity() {
    let approvals = Arc::new(Approvals::default());
    let w = world(None, Some(approvals.clone())).await;
    let mut mcp = Mcp::connect(&w.broker, AgentProto::H2).await;
    mcp.initialize().await;
    let filed = mcp
        .tool(
            "request_access",
            json!({
                "method": "post",
                "url": "https://other.example.test/v1/upload",
                "reason": "the task needs an upload",
            }),
        )
        .await;
    assert_eq!(filed["isError"], false, "{filed}");
    assert_eq!(filed["structuredContent"]["result"], "filed as request 1");
    let asked = approvals.0.lock().expect("approvals").clone();
    assert_eq!(
        asked,
        [(
            AGENT_CGROUP.to_string(),
            "POST".to_string(),
            "https://other.example.test/v1/upload".to_string(),
            "the task needs an upload".to_string(),
            super::harness::TEST_PID,
        )]
    );
    // Already allowed: nothing is filed.
    let moot = mcp
        .tool(
            "request_access",
            json!({"method": "GET", "url": format!("https://{HOST}/v1/models/x"), "reason": "r"}),
        )
        .await;
    assert_eq!(moot["isError"], true);
    // No reason: refused.
    let bare = mcp
        .tool(
            "request_access",
            json!({"method": "GET", "url": "https://other.example.test/", "reason": " "}),
        )
        .await;
    assert_eq!(bare["isError"], true);
    assert_eq!(approvals.0.lock().expect("approvals").len(), 1);
}

#[tokio::test]
async fn the_json_endpoints_answer_the_same_over_get() {
    let w = world(None, None).await;
    let mut agent = Agent::tls(&w.broker, agent_api::NAME, AgentProto::H2).await;
    let req = agent
        .request("GET", agent_api::NAME, "/v1/allowed")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    let allowed = got.json();
    assert_eq!(allowed["agent"], AGENT_CGROUP);
    assert_eq!(
        allowed["rules"][0]["credentials"],
        json!(["COMPONENT_TEST_KEY"])
    );

    let url = format!("https%3A%2F%2F{HOST}%2Fv1%2Fmodels%2Fgpt");
    let req = agent
        .request(
            "GET",
            agent_api::NAME,
            &format!("/v1/explain?method=DELETE&url={url}"),
        )
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    let explained = got.json();
    assert_eq!(explained["allowed"], false);
    assert_eq!(explained["method"], "DELETE");
    assert_eq!(explained["url"], format!("https://{HOST}/v1/models/gpt"));

    let req = agent
        .request("GET", agent_api::NAME, "/v1/explain")
        .body(empty())
        .expect("request");
    assert_eq!(agent.fetch(req).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(w.upstream.count(), 0);
    let events = w.broker.events.wait_for(3).await;
    assert!(
        events
            .iter()
            .all(|e| e.path.as_deref().is_some_and(|p| !p.contains('?'))),
        "the query is never recorded"
    );
}

#[tokio::test]
async fn the_services_address_serves_nothing_else() {
    // The agent dialed agent-broker.internal's address but names another host: refused, and
    // nothing is forwarded to that address, whatever the authorizer would allow.
    let address = SocketAddr::new(IpAddr::V4(agent_api::ADDRESS), 443);
    let w = world(Some(address), None).await;
    let mut agent = Agent::tls(&w.broker, HOST, AgentProto::H1).await;
    let req = agent
        .request("GET", HOST, "/v1/models/x")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert!(
        got.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("serves nothing else")),
        "{}",
        got.json()
    );
    assert!(w.broker.authorizer.requests().is_empty());
    let event = w.broker.events.single().await;
    assert_eq!(event.kind, Some(EventKind::Denial));
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(event.rule.as_deref(), Some(agent_api::NAME));
}

#[tokio::test]
async fn a_tcp_rule_never_splices_the_services_address_or_name() {
    let address = SocketAddr::new(IpAddr::V4(agent_api::ADDRESS), 443);
    // At the service's address, a tcp rule for that address (asked before any byte is read)
    // or for the name; elsewhere, a tcp rule matched by the service's name as SNI (a rule for
    // the address the agent dialed would splice there before the SNI is read, which reaches
    // only what that rule allows).
    for (dst, sni) in [(Some(address), HOST), (None, agent_api::NAME)] {
        let at_address = dst.is_some();
        let splicing = TestAuthorizer::allow().with_verdict(move |seen| {
            if at_address || seen.is_some() {
                ConnectionVerdict::Splice {
                    rule: "tcp rule".into(),
                    on_done: None,
                    bind_name: None,
                }
            } else {
                ConnectionVerdict::Intercept
            }
        });
        let w = world_with(splicing, dst, None).await;
        // Intercepted (a broker-CA leaf, HTTP), not spliced to the address or upstream.
        let mut agent = Agent::tls(&w.broker, sni, AgentProto::H1).await;
        let req = agent
            .request("GET", sni, "/v1/allowed")
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        let want = if sni == agent_api::NAME {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(got.status, want, "{sni}");
        assert_eq!(w.upstream.count(), 0);
    }
}

#[tokio::test]
async fn the_reserved_name_never_goes_upstream_and_a_mismatched_host_is_refused() {
    // SNI agent-broker.internal to the upstream's address: served locally, never forwarded.
    let w = world(None, None).await;
    let mut agent = Agent::tls(&w.broker, agent_api::NAME, AgentProto::H1).await;
    let req = agent
        .request("GET", agent_api::NAME, "/nothing-here")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    // The same connection asking for another host: SNI and Host disagree, refused.
    let req = agent
        .request("GET", HOST, "/v1/models/x")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert_eq!(w.upstream.count(), 0);
    assert!(w.broker.authorizer.requests().is_empty());
}

#[tokio::test]
async fn calls_are_rate_limited_per_agent_and_the_refusals_recorded() {
    let w = world(None, None).await;
    let mut agent = Agent::tls(&w.broker, agent_api::NAME, AgentProto::H2).await;
    let mut limited = 0;
    for _ in 0..(agent_api::CALL_BURST as usize + 5) {
        let req = agent
            .request("GET", agent_api::NAME, "/v1/allowed")
            .body(empty())
            .expect("request");
        let got = agent.fetch(req).await;
        if got.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(got.header("retry-after").is_some());
            limited += 1;
        } else {
            assert_eq!(got.status, StatusCode::OK);
        }
    }
    assert!(limited >= 4, "over the burst is refused ({limited})");
    // The other agent has its own bucket.
    let mut other = Agent::tls_at(
        &w.broker,
        w.broker.other_agent,
        agent_api::NAME,
        AgentProto::H1,
    )
    .await;
    let req = other
        .request("GET", agent_api::NAME, "/v1/allowed")
        .body(empty())
        .expect("request");
    assert_eq!(other.fetch(req).await.status, StatusCode::OK);
    let events = w
        .broker
        .events
        .wait_for(agent_api::CALL_BURST as usize + 6)
        .await;
    let denials = events
        .iter()
        .filter(|e| e.decision == Some(Decision::Deny))
        .count();
    assert_eq!(denials, limited);
}

#[tokio::test]
async fn plain_http_at_the_services_address_is_served_by_name_only() {
    let address = SocketAddr::new(IpAddr::V4(agent_api::ADDRESS), 80);
    let w = world(Some(address), None).await;
    let mut agent = Agent::plain(&w.broker).await;
    let req = agent
        .request("GET", agent_api::NAME, "/v1/allowed")
        .body(empty())
        .expect("request");
    let got = agent.fetch(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["agent"], AGENT_CGROUP);
    let req = agent
        .request("GET", HOST, "/v1/models/x")
        .body(empty())
        .expect("request");
    assert_eq!(agent.fetch(req).await.status, StatusCode::FORBIDDEN);
    assert_eq!(w.upstream.count(), 0);
    assert!(w.broker.authorizer.requests().is_empty());
}
