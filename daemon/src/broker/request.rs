//! The first step of a request: the policy's decision, and the plain-HTTP rule.

use std::time::SystemTime;

use agent_broker_core::{
    inject::Injection,
    policy::{LimitKey, Policy, RequestDecision, RequestInfo},
};
use http::{StatusCode, request::Parts};

use crate::{
    approvals::AskingRule,
    proxy::{Approval, Denial, DenialReason, NameBinding, RequestFacts},
};

/// A request the policy allowed, and what the later steps need of the rule that allowed it.
pub(super) struct Allowed<'p> {
    /// The rule (file and index), for the grant, denials and the audit record.
    pub rule: String,
    /// What the rule writes into the request.
    pub inject: &'p Injection,
    /// Limits to charge, one per level whose rule has any.
    pub limit_keys: Vec<LimitKey>,
    /// Whether secrets may be written into this request: over TLS, or over plain HTTP when
    /// every level's rule says so (ARCHITECTURE invariant 2).
    pub may_write_secrets: bool,
    /// How long the response may pause between frames, when the rule says.
    pub idle_timeout: Option<std::time::Duration>,
    /// The `Host` a plain HTTP request was matched by: nothing but the agent's word ties it to
    /// the address, which must be proven to be the name's.
    pub bind_name: Option<NameBinding>,
    /// The name an HTTPS request was matched by, if a credential written into it must go only
    /// to the name's own addresses (unless every level's rule says `any_address = true`): a
    /// certificate valid for the name (a wildcard, a shared one) may be served elsewhere too.
    pub credential_name: Option<NameBinding>,
}

impl Allowed<'_> {
    /// A 403 naming the rule that allowed the destination, for a later step's refusal.
    pub fn deny(&self, reason: DenialReason) -> Denial {
        Denial {
            status: StatusCode::FORBIDDEN,
            reason,
            rule: Some(self.rule.clone()),
            retry_after: None,
        }
    }

    /// A 403: the rule that allowed the destination cannot be carried out for this request.
    pub fn cannot(&self, reason: String) -> Denial {
        self.deny(DenialReason::Rule(reason))
    }
}

/// What an approved request carries when no rule allows it: nothing.
static NOTHING: std::sync::LazyLock<Injection> = std::sync::LazyLock::new(Injection::default);

/// A request that may go only once an operator approves it.
pub(super) struct NeedsApproval {
    /// The rule that asked (and its file's cgroup); none for a destination no rule allows.
    pub rule: Option<AskingRule>,
    /// Why it waits, in words.
    pub why: String,
}

/// Whether the request must wait for an operator (a rule that asks, or a refusal an operator
/// may overturn), and why.
pub(super) fn needs_approval(
    policy: &Policy,
    facts: &RequestFacts<'_>,
    parts: &Parts,
) -> Option<NeedsApproval> {
    match policy.decide_request(&facts.origin.cgroup, &info(facts, parts)) {
        RequestDecision::Allow {
            ask: Some(rule), ..
        } => {
            let level = policy
                .chain(&facts.origin.cgroup)
                .into_iter()
                .find(|f| *f.path() == *rule.file)?
                .cgroup()
                .clone();
            Some(NeedsApproval {
                why: format!("rule {rule} says approve = \"ask\""),
                rule: Some(AskingRule {
                    rule: rule.to_string(),
                    level,
                }),
            })
        }
        RequestDecision::Deny {
            askable: true,
            reason,
            ..
        } => Some(NeedsApproval {
            rule: None,
            why: format!("no rule allows it, and the policy asks about such requests ({reason})"),
        }),
        _ => None,
    }
}

fn info<'a>(facts: &RequestFacts<'a>, parts: &'a Parts) -> RequestInfo<'a> {
    RequestInfo {
        method: &parts.method,
        path: parts.uri.path(),
        headers: &parts.headers,
        host: facts.host,
        port: facts.port,
        dst_ip: facts.origin.original_dst.ip(),
        tls: facts.tls,
        now: SystemTime::now(),
    }
}

/// Asks the policy about the request; refuses plain HTTP that nothing proves reaches the host
/// it names. `approval`: an operator approved the request (it waited in
/// [`crate::approvals`]), which a rule that asks needs, and which lets a refused request an
/// operator may allow go, with nothing injected.
pub(super) fn decide<'p>(
    policy: &'p Policy,
    facts: &RequestFacts<'_>,
    parts: &Parts,
    approval: Option<&Approval>,
) -> Result<Allowed<'p>, Denial> {
    let request = info(facts, parts);
    // A host that is the literal address dialed needs no proof.
    let by_name = !host_is_address(facts.host, facts.origin.original_dst.ip());
    let allowed = match policy.decide_request(&facts.origin.cgroup, &request) {
        RequestDecision::Allow {
            rule,
            inject,
            plain_http,
            any_address,
            idle_timeout,
            limit_keys,
            ask,
        } => Allowed {
            rule: match (ask, approval) {
                (None, _) => rule.to_string(),
                (Some(_), Some(a)) => format!("{rule} (approval #{} by {})", a.id, a.by),
                (Some(asking), None) => {
                    return Err(Denial {
                        rule: Some(asking.to_string()),
                        ..Denial::forbidden(DenialReason::Policy(format!(
                            "rule {asking} lets this request go only once an operator \
                             approves it, and it was not approved"
                        )))
                    });
                }
            },
            inject,
            limit_keys,
            may_write_secrets: facts.tls || plain_http,
            idle_timeout,
            // A name matched over plain HTTP is the agent's word alone; an unprivileged
            // sandbox's non-public destination needs the name proven even over TLS.
            bind_name: ((!facts.tls || facts.origin.needs_proven_address()) && by_name)
                .then(|| NameBinding::matched_by_name(facts.host)),
            credential_name: (facts.tls && by_name && !any_address)
                .then(|| NameBinding::credential(facts.host)),
        },
        RequestDecision::Deny {
            askable: true,
            rule: _,
            ..
        } if approval.is_some() => Allowed {
            rule: approval.map_or_else(String::new, |a| format!("approval #{} by {}", a.id, a.by)),
            inject: &NOTHING,
            limit_keys: Vec::new(),
            may_write_secrets: facts.tls,
            idle_timeout: None,
            bind_name: None,
            credential_name: None,
        },
        RequestDecision::Deny { reason, rule, .. } => {
            return Err(Denial {
                rule: rule.map(ToString::to_string),
                ..Denial::forbidden(DenialReason::Policy(reason))
            });
        }
    };
    // Over plain HTTP nothing proves who answers at the original address: a Host header naming
    // an allowed host could front any IP. Only an IP rule for that very address, or a rule that
    // opts in with plain_http, may pass plain HTTP.
    if !facts.tls && !allowed.may_write_secrets && by_name {
        return Err(allowed.cannot(format!(
            "plain HTTP to {} cannot be verified (nothing proves that {} is that host); use \
             https, or allow the address itself",
            facts.host,
            facts.origin.original_dst.ip()
        )));
    }
    Ok(allowed)
}

/// Whether `host` is the literal form of `ip`.
fn host_is_address(host: &str, ip: std::net::IpAddr) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|h| h == ip || h.to_canonical() == ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use agent_broker_core::cgroup::{CgroupId, CgroupPath};

    use super::*;
    use crate::{capture::ConnectionOrigin, proxy::BindReason};

    fn origin(cgroup: &str, dst: &str) -> ConnectionOrigin {
        ConnectionOrigin {
            cgroup: CgroupPath::parse(cgroup).expect("cgroup"),
            cgroup_id: CgroupId(1),
            pid: 1,
            tid: 1,
            comm: "test".into(),
            exe: None,
            cgroup_path: None,
            pod: None,
            original_dst: dst.parse().expect("addr"),
            sandboxed: false,
        }
    }

    /// The name a request to `host` over `tls` from `cgroup` (dialed at `dst`) must be proven
    /// to own the address by, and why; or the denial's reason.
    fn binding(
        policy: &Policy,
        cgroup: &str,
        dst: &str,
        host: &str,
        tls: bool,
    ) -> Result<(Option<NameBinding>, Option<NameBinding>), String> {
        let origin = origin(cgroup, dst);
        let facts = RequestFacts {
            origin: &origin,
            host,
            port: origin.original_dst.port(),
            tls,
        };
        let (parts, ()) = http::Request::get("/v1/x")
            .body(())
            .expect("request")
            .into_parts();
        decide(policy, &facts, &parts, None)
            .map(|a| (a.bind_name, a.credential_name))
            .map_err(|d| d.reason.to_string())
    }

    const PARENT: &str = r#"
cgroup = "agents"
[[allow]]
host = "api.example.test"
inject.headers = { authorization = "Bearer {secret:K}" }
[[allow]]
host = "cdn.example.test"
any_address = true
inject.headers = { authorization = "Bearer {secret:K}" }
[[allow]]
host = "127.0.0.2"
inject.headers = { authorization = "Bearer {secret:K}" }
[[allow]]
host = "plain.example.test"
port = 8080
plain_http = true
any_address = true
"#;

    const CHILD: &str = r#"
cgroup = "agents/coder"
[[allow]]
host = "cdn.example.test"
inject.headers = { authorization = "Bearer {secret:K}" }
[[allow]]
host = "api.example.test"
inject.headers = { authorization = "Bearer {secret:K}" }
"#;

    #[test]
    fn credentials_over_tls_are_bound_to_the_names_addresses_unless_every_level_opts_out() {
        let policy = Policy::from_files(vec![
            (PathBuf::from("agents.toml"), PARENT.to_string()),
            (PathBuf::from("coder.toml"), CHILD.to_string()),
        ])
        .expect("policy");
        let bound = |cgroup, host: &str| {
            binding(&policy, cgroup, "127.0.0.9:443", host, true).expect("allowed")
        };
        // A name: bound, because a credential would go there.
        assert_eq!(
            bound("agents/a", "api.example.test"),
            (None, Some(NameBinding::credential("api.example.test")))
        );
        // any_address = true on the only level: the certificate alone decides.
        assert_eq!(bound("agents/a", "cdn.example.test"), (None, None));
        // The child did not say it: its parent's any_address does not carry down.
        assert_eq!(
            bound("agents/coder/x", "cdn.example.test"),
            (None, Some(NameBinding::credential("cdn.example.test")))
        );
        // The address itself, dialed at that address: nothing to prove.
        assert_eq!(
            binding(&policy, "agents/a", "127.0.0.2:443", "127.0.0.2", true).expect("allowed"),
            (None, None)
        );
        // Plain HTTP by Host stays bound by name, any_address or not.
        let (plain, credential) = binding(
            &policy,
            "agents/a",
            "127.0.0.9:8080",
            "plain.example.test",
            false,
        )
        .expect("allowed");
        assert_eq!(
            plain.map(|b| (b.name, b.why)),
            Some(("plain.example.test".to_string(), BindReason::MatchedByName))
        );
        assert_eq!(credential, None);
    }

    /// Issue 19: brokerd dials for an unprivileged sandbox with its user's own reach, so a
    /// name-matched rule reaches a non-public address only once the address is proven to be
    /// the name's, over TLS too and whatever `any_address` says; a public address, or a rule
    /// naming the address itself, needs no proof.
    #[test]
    fn a_sandboxs_non_public_destination_is_bound_to_the_name_a_rule_matched() {
        let policy = Policy::from_files(vec![(PathBuf::from("agents.toml"), PARENT.to_string())])
            .expect("policy");
        let sandboxed = |dst: &str, host: &str| {
            let mut origin = origin("agents/a", dst);
            origin.sandboxed = true;
            let facts = RequestFacts {
                origin: &origin,
                host,
                port: origin.original_dst.port(),
                tls: true,
            };
            let (parts, ()) = http::Request::get("/v1/x")
                .body(())
                .expect("request")
                .into_parts();
            decide(&policy, &facts, &parts, None)
                .map(|a| a.bind_name.map(|b| (b.name, b.why)))
                .expect("allowed")
        };
        let bound = |host: &str| Some((host.to_string(), BindReason::MatchedByName));
        for private in [
            "127.0.0.9:443",
            "10.1.2.3:443",
            "169.254.169.254:443",
            "[fd00::1]:443",
        ] {
            assert_eq!(
                sandboxed(private, "cdn.example.test"),
                bound("cdn.example.test"),
                "{private}"
            );
            assert_eq!(
                sandboxed(private, "api.example.test"),
                bound("api.example.test"),
                "{private}"
            );
        }
        assert_eq!(sandboxed("192.0.2.9:443", "cdn.example.test"), None);
        assert_eq!(sandboxed("127.0.0.2:443", "127.0.0.2"), None);
        // The same request from a root-mode agent: the certificate alone proves the name.
        assert_eq!(
            binding(
                &policy,
                "agents/a",
                "10.1.2.3:443",
                "cdn.example.test",
                true
            )
            .expect("allowed"),
            (None, None)
        );
    }

    #[test]
    fn only_the_literal_address_counts() {
        let ip = "127.0.0.1".parse().expect("ip");
        assert!(host_is_address("127.0.0.1", ip));
        assert!(!host_is_address("127.0.0.2", ip));
        assert!(!host_is_address("api.example.test", ip));
        let v6 = "::1".parse().expect("ip");
        assert!(host_is_address("[::1]", v6));
        assert!(host_is_address("::1", v6));
    }
}
