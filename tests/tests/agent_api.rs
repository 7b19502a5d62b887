//! Agents can ask (issue 16.3): an agent under `brokerctl run` resolves `agent-broker.internal`
//! through brokerd's DNS (its policy names no such host) and talks to the MCP server brokerd
//! serves there with the official MCP Python SDK (`mcp` from PyPI, its streamable HTTP client),
//! trusting the broker CA through `SSL_CERT_FILE`. It lists the tools, asks `allowed` and
//! `explain`, and the answers must match its policy: the API's host and port, the credential's
//! name (never its value). `request_access` files a request `brokerctl approve list` shows,
//! with the agent's reason; allowed always, the call goes through. curl GETs `/v1/allowed` with the same answer. Every call is in the audit log under the
//! agent the kernel attributed it to. A name that is not reserved still needs a rule.
//!
//! Needs root, cgroup v2 and BPF, and PyPI once per machine (the SDK is installed into a
//! virtualenv under /var/tmp, see `agent_broker_tests::mcp`). Run alone:
//! `cargo test -p agent-broker-tests --test agent_api -- --test-threads=1`.

use std::time::Duration;

use agent_broker_protocol::{Decision, EventKind};
use agent_broker_tests::{
    clients::{self, Call},
    mcp::mcp_python,
    world::{API, OTHER, SECRET_NAME, World, api_ip},
};

const NAME: &str = "agent-broker.internal";

/// The agent: the MCP SDK's streamable HTTP client against https://agent-broker.internal/mcp.
const AGENT_PY: &str = r#"
import asyncio, json, os, ssl, sys
import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

cfg = json.loads(sys.argv[1])

async def main():
    verify = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    out = {}
    async with httpx.AsyncClient(verify=verify, timeout=30) as http:
        async with streamable_http_client(f"https://{cfg['name']}/mcp", http_client=http) as (read, write, session_id):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                out["server"] = init.serverInfo.name
                out["protocol"] = init.protocolVersion
                out["session"] = bool(session_id())
                tools = await session.list_tools()
                out["tools"] = [t.name for t in tools.tools]
                allowed = await session.call_tool("allowed", {})
                out["allowed"] = {"error": allowed.isError, "data": allowed.structuredContent,
                                  "text": allowed.content[0].text}
                for key, args in [
                    ("explain_yes", {"method": "GET", "url": cfg["allowed_url"]}),
                    ("explain_no", {"method": "GET", "url": cfg["denied_url"]}),
                ]:
                    r = await session.call_tool("explain", args)
                    out[key] = {"error": r.isError, "data": r.structuredContent}
                r = await session.call_tool("request_access", {"method": "GET", "url": cfg["denied_url"], "reason": "the task needs it"})
                out["request_access"] = {"error": r.isError, "text": r.content[0].text}
    print(json.dumps(out))

asyncio.run(main())
"#;

#[test]
fn an_agent_asks_brokerd_what_it_may_do_with_the_official_mcp_sdk() {
    let w = World::new();
    let port = w.api.port();
    let allowed_url = format!("https://{API}:{port}/hash");
    let denied_url = format!("https://{OTHER}:{port}/hash");
    let cfg = serde_json::json!({
        "name": NAME,
        "allowed_url": allowed_url,
        "denied_url": denied_url,
    });
    let argv = vec![
        mcp_python().to_string_lossy().into_owned(),
        "-c".into(),
        AGENT_PY.into(),
        cfg.to_string(),
    ];
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "mcp", &w.trust().var("python"), &argv);
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the MCP agent printed no report ({e}): {}\nbrokerd's log:\n{}",
            run.show(),
            w.broker.log()
        )
    });
    run.assert_no_secret(&w.secret);

    assert_eq!(out["server"], "agent-broker", "{out}");
    assert_eq!(out["session"], true, "a session id was given: {out}");
    assert_eq!(
        out["tools"],
        serde_json::json!(["allowed", "explain", "request_access"])
    );

    // `allowed`: the agent's own policy, the rule World::new wrote, names only.
    let allowed = &out["allowed"];
    assert_eq!(allowed["error"], false, "{out}");
    let data = &allowed["data"];
    assert_eq!(data["agent"], w.agent.as_str(), "the kernel's attribution");
    let rules = data["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "{data}");
    assert_eq!(rules[0]["host"], API);
    assert_eq!(rules[0]["port"], port);
    assert_eq!(rules[0]["methods"], "any");
    assert_eq!(rules[0]["credentials"], serde_json::json!([SECRET_NAME]));
    assert_eq!(
        rules[0]["injects"],
        serde_json::json!(["header authorization"])
    );

    // `explain`: allowed by that rule; the other name is not.
    assert_eq!(out["explain_yes"]["data"]["allowed"], true, "{out}");
    assert_eq!(out["explain_no"]["data"]["allowed"], false, "{out}");
    assert!(
        out["explain_no"]["data"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "a denial says why: {out}"
    );
    // `request_access` files a request the operator sees, with the agent's reason; allowed
    // always, the call the policy refused goes through.
    assert_eq!(out["request_access"]["error"], false, "{out}");
    assert!(
        out["request_access"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("filed as request #")),
        "{out}"
    );
    let listed = w.broker.ctl_ok(&["approve", "list", "--json"]);
    let pending: Vec<agent_broker_protocol::PendingApproval> =
        serde_json::from_str(&listed).unwrap_or_else(|e| panic!("approve list ({e}): {listed}"));
    assert_eq!(pending.len(), 1, "{listed}");
    let filed = &pending[0];
    assert_eq!(
        (
            filed.agent.as_str(),
            filed.host.as_str(),
            filed.port,
            filed.held
        ),
        (w.agent.as_str(), OTHER, port, false)
    );
    assert_eq!(filed.agent_reason.as_deref(), Some("the task needs it"));
    assert!(filed.pid.is_some(), "the kernel's pid: {filed:?}");

    // curl GETs the same view as plain JSON, resolving the name through brokerd's DNS.
    let curl = vec![
        "curl".to_string(),
        "-sS".into(),
        "--noproxy".into(),
        "*".into(),
        "--max-time".into(),
        "20".into(),
        "-w".into(),
        "%{stderr}ABTEST status=%{http_code}\\n".into(),
        format!("https://{NAME}/v1/allowed"),
    ];
    let got = clients::run_in_cgroup(&w.broker, &w.agent, "curl", &w.trust().var("curl"), &curl);
    let stderr = String::from_utf8_lossy(&got.output.stderr).into_owned();
    assert!(
        stderr.contains("ABTEST status=200"),
        "curl /v1/allowed: {}",
        got.show()
    );
    let view: serde_json::Value = serde_json::from_slice(&got.output.stdout)
        .unwrap_or_else(|e| panic!("/v1/allowed is not JSON ({e}): {}", got.show()));
    assert_eq!(&view, data, "the JSON endpoint answers what the tool did");
    got.assert_no_secret(&w.secret);

    // The filed request, allowed always: the call the policy refused goes through.
    let before = Call::new(OTHER, api_ip(), port, "/hash");
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &before);
    report.assert_denied(&w.agent, "a filed request not decided yet");
    w.broker
        .ctl_ok(&["approve", "allow", &filed.id.to_string(), "--always"]);
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &before);
    assert_eq!(report.status, 200, "{}\n{}", report.show(), run.show());

    // Every call is recorded under the agent, with the reserved name as its rule.
    let record = w
        .broker
        .wait_record("the explain call", Duration::from_secs(10), |r| {
            r.kind == Some(EventKind::Request)
                && r.rule.as_deref() == Some(NAME)
                && r.reason.as_deref() == Some("mcp tools/call explain")
        });
    assert_eq!(record.cgroup.as_deref(), Some(w.agent.as_str()));
    assert_eq!(record.decision, Some(Decision::Allow));
    assert_eq!(record.host.as_deref(), Some(NAME));
    w.broker
        .wait_record("the /v1/allowed call", Duration::from_secs(10), |r| {
            r.rule.as_deref() == Some(NAME) && r.path.as_deref() == Some("/v1/allowed")
        });
    let dns = w
        .broker
        .wait_record("the DNS answer", Duration::from_secs(10), |r| {
            r.kind == Some(EventKind::Dns) && r.host.as_deref() == Some(NAME)
        });
    assert_eq!(dns.decision, Some(Decision::Allow));
    w.assert_no_secret_in_logs();
}

#[test]
fn a_name_that_is_not_reserved_still_needs_a_rule() {
    let w = World::new();
    // Another name at the same address: no rule, refused.
    let call = Call::new(OTHER, api_ip(), w.api.port(), "/hash");
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
    report.assert_denied(&w.agent, "other.example.test");
    run.assert_no_secret(&w.secret);
    // A name below the reserved one is not reserved: brokerd's DNS refuses it, and so curl
    // cannot resolve it.
    let curl = vec![
        "curl".to_string(),
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        format!("https://api.{NAME}/v1/allowed"),
    ];
    let got = clients::run_in_cgroup(&w.broker, &w.agent, "curl", &w.trust().var("curl"), &curl);
    assert_eq!(
        got.output.status.code(),
        Some(6),
        "curl cannot resolve a name no rule allows: {}",
        got.show()
    );
    let refused = w
        .broker
        .wait_record("the refused DNS name", Duration::from_secs(10), |r| {
            r.kind == Some(EventKind::Dns) && r.host.as_deref() == Some(&format!("api.{NAME}"))
        });
    assert_eq!(refused.decision, Some(Decision::Deny));
    // Nothing reached the API for the refused call.
    assert!(
        w.api
            .requests()
            .iter()
            .all(|r| r.sni.as_deref() != Some(OTHER)),
        "{:#?}",
        w.api.requests()
    );
}
